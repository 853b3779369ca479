"""From a URI to a store: a local path, ``file://...`` or ``s3://bucket/prefix``."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

from fedllm.errors import FedllmError
from fedllm.store.base import Store
from fedllm.store.local import LocalStore
from fedllm.store.s3 import S3Store

_ACCEPTED = "expected a local path, file:///abs/path or s3://bucket/prefix"


def is_remote(uri: str) -> bool:
    """Whether ``uri`` names something that must be downloaded before use."""
    return str(uri).startswith("s3://")


def local_path_of(uri: str) -> Path:
    """The folder a plain path or ``file://`` URI names; FedllmError for anything else."""
    uri = str(uri)
    if uri.startswith("file://"):
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise FedllmError(f"{uri}: file:// URIs name this machine only; {_ACCEPTED}")
        return Path(unquote(parts.path))
    if "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise FedllmError(f"{uri}: unsupported URI scheme {scheme!r}; {_ACCEPTED}")
    if not uri:
        raise FedllmError(f"empty store URI; {_ACCEPTED}")
    return Path(uri)


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ("bucket", "a/b")."""
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise FedllmError(f"{uri}: not an S3 URI; expected s3://bucket/prefix")
    return parts.netloc, parts.path.strip("/")


def open_store(uri: str) -> Store:
    """The store rooted at ``uri``: LocalStore for a path or ``file://``, S3Store for ``s3://``.

    S3 endpoint and keys come from the environment or ``FEDLLM_S3_CREDENTIALS_DIR`` (see
    ``fedllm.store.credentials``). Nothing is contacted until the first operation.
    """
    uri = str(uri)
    if is_remote(uri):
        bucket, prefix = split_s3_uri(uri)
        return S3Store(bucket, prefix)
    return LocalStore(local_path_of(uri))
