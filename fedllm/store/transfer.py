"""Moving whole things between a machine and a store: what ``fedllm bundle`` and every
loader of models, data sets and eval tasks by URI use.

- :func:`bundle` uploads a local model folder, data set or file under a URI with a manifest;
- :func:`fetch_path` brings back a single object or a whole folder, checked against its
  manifest; a local path needs no fetching and is returned as it is.
"""

from __future__ import annotations

import os
from pathlib import Path

from fedllm.errors import FedllmError
from fedllm.store.base import ObjectNotFound, join_key
from fedllm.store.manifest import MANIFEST_NAME, sha256_of_file
from fedllm.store.s3 import S3Store
from fedllm.store.uri import is_remote, local_path_of, open_store, split_s3_uri


def _bucket_store(uri: str) -> tuple[S3Store, str]:
    bucket, key = split_s3_uri(uri)
    return S3Store(bucket), key


def _local_as_is(uri: str, want_dir: bool) -> Path:
    path = local_path_of(uri)
    if want_dir and not path.is_dir():
        raise FedllmError(f"{uri}: no such directory")
    if not path.exists():
        raise FedllmError(f"{uri}: no such file or directory")
    return path


def _fetch_prefix(store: S3Store, key: str, uri: str, local_dir: Path) -> Path:
    """Download the folder at ``key``: by its manifest when it has one, else every object."""
    manifest_key = join_key(key, MANIFEST_NAME)
    if store.exists(manifest_key):
        return store.get_dir(key, local_dir, verify=True)
    folder = key + "/" if key else ""
    keys = store.list(folder)
    if not keys:
        raise ObjectNotFound(f"{uri}: no object and no folder under this URI")
    for object_key in keys:
        store.get_file(object_key, local_dir / object_key[len(folder):])
    return local_dir


def fetch_path(uri: str, local_dir: str | os.PathLike) -> Path:
    """A local path holding what ``uri`` names.

    - a plain path or ``file://``: that path, unchanged (FedllmError if it does not exist);
    - ``s3://bucket/key`` naming one object: downloaded to ``local_dir/<last part of key>``;
      if the folder it sits in has a manifest that lists it, its sha256 is checked;
    - ``s3://bucket/prefix`` naming a folder: its contents downloaded into ``local_dir``
      (like ``aws s3 sync``), checked against ``prefix/MANIFEST.json`` when there is one.
    Files already present in ``local_dir`` with the manifest's sha256 are not downloaded again.
    """
    if not is_remote(uri):
        return _local_as_is(uri, want_dir=False)
    local_dir = Path(local_dir)
    store, key = _bucket_store(uri)
    if key and store.exists(key):
        parent, _, name = key.rpartition("/")
        entry = None
        try:
            entry = store.read_manifest(parent)["files"].get(name)
        except ObjectNotFound:
            pass
        dest = local_dir / name
        if entry and dest.is_file() and sha256_of_file(dest) == entry["sha256"]:
            return dest
        store.get_checked(key, dest, entry, name)
        return dest
    return _fetch_prefix(store, key, uri, local_dir)


def fetch_dir(uri: str, local_dir: str | os.PathLike) -> Path:
    """The folder ``uri`` names, as a local folder: ``local_dir`` filled from S3 (checked against
    its manifest when there is one), or a local folder as it is."""
    if not is_remote(uri):
        return _local_as_is(uri, want_dir=True)
    store, key = _bucket_store(uri)
    return _fetch_prefix(store, key, uri, Path(local_dir))


def bundle(local_path: str | os.PathLike, uri: str, meta: dict | None = None) -> dict:
    """Upload a local folder (a model, a data set, eval task files) or a single file under
    ``uri`` with a ``MANIFEST.json``, and return the manifest.

    ``uri`` names a folder in a store: a folder's contents go directly under it, a single
    file goes to ``uri/<file name>``. ``meta`` is stored in the manifest next to
    ``"bundled_from"`` (the local name) and ``"kind"`` ("dir" or "file").
    """
    local_path = Path(local_path)
    if not local_path.exists():
        raise FedllmError(f"{local_path}: no such file or directory to bundle")
    store = open_store(uri)
    meta = {"bundled_from": local_path.name, "kind": "dir" if local_path.is_dir() else "file", **(meta or {})}
    if local_path.is_dir():
        return store.put_dir(local_path, "", meta)
    entry = (local_path, local_path.name, sha256_of_file(local_path), local_path.stat().st_size)
    return store.put_files([entry], "", meta)
