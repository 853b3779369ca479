"""Checkpoints and artifacts by URI: a local folder (the embedded default) or S3 / MinIO.

    store = open_store("s3://fedllm/runs/exp1")      # or "runs/exp1", "file:///data/runs"
    store.put_dir("out/round-3", "checkpoints/round-3", meta={"round": 3})
    store.get_dir("checkpoints/round-3", "/tmp/round-3")   # sha256-checked
    model_dir = fetch_path("s3://models/tiny-llama", "/cache/tiny-llama")
    bundle("models/tiny-llama", "s3://models/tiny-llama")  # backs `fedllm bundle`

Every write is atomic, every folder carries a MANIFEST.json written last, and no message
or repr carries an S3 key: pass any text headed for a log through :func:`redact`.
"""

from fedllm.store.base import ObjectNotFound, Store
from fedllm.store.credentials import S3Settings, load_settings, redact
from fedllm.store.local import LocalStore
from fedllm.store.manifest import MANIFEST_NAME
from fedllm.store.s3 import S3Store
from fedllm.store.transfer import bundle, fetch_dir, fetch_path
from fedllm.store.uri import is_remote, open_store

__all__ = [
    "MANIFEST_NAME",
    "LocalStore",
    "ObjectNotFound",
    "S3Settings",
    "S3Store",
    "Store",
    "bundle",
    "fetch_dir",
    "fetch_path",
    "is_remote",
    "load_settings",
    "open_store",
    "redact",
]
