"""Small file helpers every layer shares: atomic writes, and reading YAML and
JSON lines with errors that name the file and line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from fedllm.errors import FedllmError


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename, so a
    reader sees the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
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
