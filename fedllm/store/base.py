"""What every store offers: objects by key, and folders with a manifest.

A store has a root (a local folder, or an S3 bucket and prefix). Keys are '/'-separated
paths relative to that root, such as ``checkpoints/round-3/model.safetensors``. Backends
implement the object operations; the folder operations (``put_dir``, ``get_dir``) are
written once here on top of them.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path

from fedllm.errors import FedllmError
from fedllm.store.manifest import (
    MANIFEST_NAME,
    build_manifest,
    encode_manifest,
    local_files,
    parse_manifest,
    sha256_of_file,
)

# A site's data and weights are private to it: the files a store writes (objects in a
# local store, downloads from any store) are owner-only.
LOCAL_FILE_MODE = 0o600


class ObjectNotFound(FedllmError):
    """No object under the key asked for; the message names its URI."""


def check_key(key: str, *, folder: bool = False) -> str:
    """``key`` normalised, or FedllmError saying what a key may look like.

    Object keys are non-empty; a folder key may be "" (the store's root) and may end in "/".
    """
    if not isinstance(key, str):
        raise FedllmError(f"store key {key!r}: expected a string such as 'checkpoints/round-3'")
    if folder:
        key = key.rstrip("/")
    parts = key.split("/")
    bad = (
        key.startswith("/")
        or "\\" in key
        or (key and any(p in ("", ".", "..") for p in parts))
        or (not key and not folder)
    )
    if bad:
        raise FedllmError(
            f"store key {key!r}: expected a '/'-separated path relative to the store root "
            "with no empty, '.' or '..' parts, e.g. 'checkpoints/round-3/model.safetensors'"
        )
    return key


def join_key(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


class Store(ABC):
    """Objects and manifest-checked folders under one root URI.

    Writes are atomic: an object under its final key is either the old one or the whole new
    one. Missing objects raise :class:`ObjectNotFound` (a FedllmError) naming the URI.
    """

    #: URI of the root, e.g. ``file:///data/ckpt`` or ``s3://bucket/prefix``.
    root_uri: str

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root_uri!r})"

    # -- objects (backends) -------------------------------------------------------------

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def put_file(self, local_path: str | os.PathLike, key: str) -> None: ...

    @abstractmethod
    def get_file(self, key: str, local_path: str | os.PathLike) -> Path:
        """Download ``key`` to ``local_path`` (parent folders are made), atomically."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys of all objects whose key starts with ``prefix`` (a string prefix, as
        in S3: ``"ckpt/round-1"`` also matches ``"ckpt/round-10/..."``)."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; removing a missing key is not an error."""

    @abstractmethod
    def uri_of(self, key: str) -> str: ...

    # -- folders with a manifest --------------------------------------------------------

    def put_dir(self, local_dir: str | os.PathLike, key: str, meta: dict | None = None) -> dict:
        """Upload every file under ``local_dir`` to ``key/``, then ``key/MANIFEST.json`` last.

        Returns the manifest. An older manifest under ``key`` is removed first, so while the
        upload runs no reader sees a manifest whose files are not all there.
        """
        local_dir = Path(local_dir)
        key = check_key(key, folder=True)
        if not local_dir.is_dir():
            raise FedllmError(f"{local_dir}: not a directory; put_dir uploads a folder")
        files = [(path, rel, sha256_of_file(path), path.stat().st_size) for path, rel in local_files(local_dir)]
        return self.put_files(files, key, meta)

    def put_files(self, files: list[tuple[Path, str, str, int]], key: str, meta: dict | None) -> dict:
        """Upload (local path, relative name, sha256, size) entries under ``key``, then
        ``key/MANIFEST.json``; return the manifest. ``put_dir`` and ``bundle`` use it."""
        manifest_key = join_key(key, MANIFEST_NAME)
        self.delete(manifest_key)
        entries = {}
        for path, rel, sha256, size in files:
            self.put_file(path, join_key(key, rel))
            entries[rel] = {"size": size, "sha256": sha256}
        manifest = build_manifest(entries, meta)
        self.put_bytes(manifest_key, encode_manifest(manifest))
        return manifest

    def read_manifest(self, key: str) -> dict:
        """The manifest of the folder at ``key``; FedllmError if there is none or it is invalid."""
        key = check_key(key, folder=True)
        manifest_key = join_key(key, MANIFEST_NAME)
        try:
            data = self.get_bytes(manifest_key)
        except ObjectNotFound as e:
            raise ObjectNotFound(
                f"{self.uri_of(manifest_key)}: no manifest; the folder was not written by "
                "put_dir/bundle, or its upload did not finish"
            ) from e
        return parse_manifest(data, self.uri_of(manifest_key))

    def get_dir(self, key: str, local_dir: str | os.PathLike, verify: bool = True) -> Path:
        """Download the folder at ``key`` into ``local_dir`` and return ``local_dir``.

        Only the files the manifest lists are fetched. With ``verify`` each one is checked for
        size and sha256 (a local file that already matches is not downloaded again); a
        mismatch raises FedllmError "<uri>: file <name>: corrupted: sha256 mismatch" and
        leaves no partial file behind.
        """
        key = check_key(key, folder=True)
        local_dir = Path(local_dir)
        manifest = self.read_manifest(key)
        for rel, entry in manifest["files"].items():
            dest = local_dir / rel
            if verify and dest.is_file() and dest.stat().st_size == entry["size"]:
                if sha256_of_file(dest) == entry["sha256"]:
                    continue
            self.get_checked(join_key(key, rel), dest, entry if verify else None, rel)
        return local_dir

    def get_checked(self, key: str, dest: Path, entry: dict | None, rel: str) -> None:
        """Download ``key`` to ``dest`` through a temporary name beside it. With a manifest
        ``entry`` ({"size", "sha256"}) the file is checked first and ``dest`` is only made if
        it matches; ``rel`` is the file's name in the messages."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.parent / f".{dest.name}.fedllm-partial"
        try:
            self.get_file(key, partial)
            if entry is not None:
                got = sha256_of_file(partial)
                if got != entry["sha256"]:
                    raise FedllmError(
                        f"{self.uri_of(key)}: file {rel}: corrupted: sha256 mismatch "
                        f"(manifest {entry['sha256'][:16]}, stored object {got[:16]}, "
                        f"{partial.stat().st_size} of {entry['size']} bytes)"
                    )
            os.replace(partial, dest)
        finally:
            partial.unlink(missing_ok=True)
