"""Examples on disk: one ``Example.to_dict`` per JSON line, written atomically."""

from __future__ import annotations

import json
from pathlib import Path

from fedllm.data.records import Example
from fedllm.errors import FedllmError
from fedllm.files import json_object, write_atomic


def dumps_jsonl(examples: list[Example]) -> bytes:
    """The file content ``write_jsonl`` writes: stable key order, UTF-8, one line each."""
    return "".join(json.dumps(ex.to_dict(), ensure_ascii=False) + "\n" for ex in examples).encode("utf-8")


def write_jsonl(path: str | Path, examples: list[Example]) -> None:
    write_atomic(path, dumps_jsonl(examples))


def read_jsonl(path: str | Path) -> list[Example]:
    """Examples written by ``write_jsonl``; errors name ``path:line``."""
    path = Path(path)
    if not path.is_file():
        raise FedllmError(f"{path}: no such file")
    examples = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            record = json_object(line, f"{path}:{n}")
            try:
                examples.append(Example.from_dict(record))
            except TypeError as e:
                raise FedllmError(
                    f"{path}:{n}: not an Example record ({e}); expected keys instruction, output, "
                    "input, label, source, origin, meta"
                ) from None
    return examples
