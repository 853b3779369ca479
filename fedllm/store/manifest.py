"""MANIFEST.json: the list of files of a stored folder, with size and sha256.

A folder in a store (a checkpoint, a bundled model or data set) is complete exactly when
its ``MANIFEST.json`` exists: it is written last, after every file it lists. Readers check
each file against it, so a truncated or altered object is caught on download.

Layout (``format`` lets later versions change it)::

    {"format": "fedllm-manifest/1",
     "created": "2026-11-23T00:48:21Z",
     "files": {"config.json": {"size": 512, "sha256": "..."}, ...},
     "total_bytes": 12345,
     "meta": {"round": 3, "config_hash": "..."}}
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path, PurePosixPath

from fedllm.errors import FedllmError

MANIFEST_NAME = "MANIFEST.json"
MANIFEST_FORMAT = "fedllm-manifest/1"
_CHUNK = 1 << 20


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_of_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def local_files(local_dir: Path) -> list[tuple[Path, str]]:
    """Every regular file under ``local_dir`` (following symlinks, as the HF cache uses them),
    as (path, '/'-separated relative name), sorted by name.

    A top-level MANIFEST.json is left out: it describes a previous upload and is rewritten.
    """
    found = []
    for path in sorted(local_dir.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(local_dir).as_posix()
        if rel == MANIFEST_NAME:
            continue
        found.append((path, rel))
    return found


def build_manifest(files: dict[str, dict], meta: dict | None) -> dict:
    """A manifest for ``files`` (relative name -> {"size", "sha256"}) and the caller's ``meta``."""
    try:
        json.dumps(meta or {})
    except TypeError as e:
        raise FedllmError(f"manifest meta: {e}; expected JSON values (str, int, float, bool, list, dict)") from e
    return {
        "format": MANIFEST_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": dict(sorted(files.items())),
        "total_bytes": sum(entry["size"] for entry in files.values()),
        "meta": dict(meta or {}),
    }


def encode_manifest(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode("utf-8")


def check_relative_name(name: str, where: str) -> str:
    """``name`` if it is a safe '/'-separated relative path, else FedllmError naming ``where``."""
    parts = PurePosixPath(name).parts
    if not name or name.startswith("/") or "\\" in name or any(p in ("..", ".") for p in parts):
        raise FedllmError(f"{where}: file name {name!r} is not a relative path inside the folder")
    return name


def parse_manifest(data: bytes, uri: str) -> dict:
    """The manifest in ``data`` read from ``uri``, checked for the fields readers rely on."""
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FedllmError(f"{uri}: not a valid manifest: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise FedllmError(f"{uri}: not a fedllm manifest; expected \"format\": \"{MANIFEST_FORMAT}\"")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise FedllmError(f"{uri}: manifest has no \"files\" mapping")
    for name, entry in files.items():
        check_relative_name(name, uri)
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("size"), int)
            or not isinstance(entry.get("sha256"), str)
        ):
            raise FedllmError(f"{uri}: manifest entry {name!r} needs an integer size and a sha256 string")
    return manifest
