"""Small file helpers every layer shares: atomic writes, and reading YAML and
JSON lines with errors that name the file and line."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any, BinaryIO, Callable

import yaml

from fedllm.errors import FedllmError


# Temporary files of unfinished writes start with this; LocalStore never lists them.
TEMP_PREFIX = ".fedllm-tmp-"


def write_atomic(
    path: str | os.PathLike, content: bytes | Callable[[BinaryIO], object], *, mode: int = 0o666
) -> None:
    """Make ``path`` from ``content`` (the bytes, or a function that writes them to the open
    file, for a stream too large to hold) through a temporary file in the same folder, fsynced
    and renamed into place: a reader sees the old file or the whole new one, never a part.
    ``mode`` is the new file's permissions before the umask, as for ``open``; 0o600 keeps it
    owner-only from its first byte (private keys)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A random name, so two writers of one path (threads, pods on a shared volume) never
    # share a temporary file; O_EXCL fails rather than reuse someone else's.
    tmp = path.with_name(TEMP_PREFIX + secrets.token_hex(8))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(content, (bytes, bytearray, memoryview)):
                f.write(content)
            else:
                content(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the folder's entry is on disk too.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """``data`` as indented UTF-8 JSON with a final newline, written as ``write_atomic`` does."""
    write_atomic(path, (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def read_yaml(path: str | os.PathLike) -> Any:
    """A YAML file's content; a syntax error names ``path:line``."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise FedllmError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from None


def json_object(line: str, origin: str) -> dict:
    """One JSON-lines record; errors name ``origin`` (``path:line``)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise FedllmError(f"{origin}: invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(record, dict):
        raise FedllmError(f"{origin}: expected a JSON object per line, got {type(record).__name__}")
    return record
