"""Record formats: how the rows of a data file become ``Example`` records.

One registry, ``FORMATS``; adding a format is one entry there (and, for a new
kind of file, one row parser). Each format has two halves:

* a **file parser** per file kind (``.json`` list, ``.jsonl``, ``.csv``,
  ``.parquet``, PhraseBank ``.txt``) that turns a file into *rows*
  ``(origin, record dict)``, where ``origin`` is ``path:line`` (``path:#index``
  for a JSON list or a Parquet table);
* a **row mapper** that turns the rows into examples. The hub loader feeds
  dataset rows to the same mapper, so a format reads the same from a file and
  from ``hf://``.

    examples = FORMATS["dolly"].read(Path("/data/dolly_15k"))   # a folder: every .json, sorted

Readers leave ``Example.source`` empty; the caller (``load_source``) sets it.
Every error is a ``FedllmError`` naming the file and line.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from fedllm.data.records import Example
from fedllm.errors import FedllmError
from fedllm.files import json_object

Row = tuple[str, dict]  # (origin "path:line" or "path:#index", the raw record)

GENERIC_FIELDS = ("instruction", "input", "output", "label")


# --------------------------------------------------------------------------
# file parsers: one file -> rows
# --------------------------------------------------------------------------


def _read_text(path: Path, encoding: str = "utf-8") -> str:
    data = path.read_bytes()
    try:
        # utf-8-sig: files saved by Windows tools start with a byte-order mark
        return data.decode("utf-8-sig" if encoding == "utf-8" else encoding)
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise FedllmError(f"{path}:{line}: not {encoding} text ({e.reason} at byte {e.start})") from None


def _json_list_rows(path: Path) -> list[Row]:
    try:
        records = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise FedllmError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(records, list):
        raise FedllmError(f"{path}: expected a JSON list of records, got a JSON {type(records).__name__}")
    rows = []
    for i, record in enumerate(records):
        origin = f"{path}:#{i}"
        if not isinstance(record, dict):
            raise FedllmError(f"{origin}: expected a JSON object per record, got {type(record).__name__}")
        rows.append((origin, record))
    return rows


def _jsonl_rows(path: Path) -> list[Row]:
    rows = []
    for n, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        origin = f"{path}:{n}"
        rows.append((origin, json_object(line, origin)))
    return rows


def _csv_rows(path: Path) -> list[Row]:
    rows = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        first_line = 2  # line 1 is the header
        try:
            for record in reader:
                # a quoted field may span lines; name the line the record starts on
                origin = f"{path}:{first_line}"
                first_line = reader.line_num + 1
                if None in record:
                    raise FedllmError(f"{origin}: more values than the header has columns")
                rows.append((origin, {k: v for k, v in record.items() if v is not None}))
        except csv.Error as e:
            raise FedllmError(f"{path}:{reader.line_num}: invalid CSV: {e}") from None
        except UnicodeDecodeError as e:
            raise FedllmError(f"{path}: not utf-8 text ({e.reason})") from None
    return rows


def _parquet_rows(path: Path) -> list[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise FedllmError(f"{path}: not a readable Parquet file: {e}") from None
    return [(f"{path}:#{i}", record) for i, record in enumerate(records)]


def _phrasebank_rows(path: Path) -> list[Row]:
    """``sentence@label`` lines in ISO-8859-1, as the Financial PhraseBank release."""
    rows = []
    # split on "\n" only: str.splitlines would also break on Latin-1 "\x85"
    for n, line in enumerate(_read_text(path, "iso-8859-1").split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        origin = f"{path}:{n}"
        if "@" not in line:
            raise FedllmError(f"{origin}: expected 'sentence@label' (a Financial PhraseBank line)")
        sentence, label = line.rsplit("@", 1)
        rows.append((origin, {"sentence": sentence.strip(), "label": label.strip()}))
    return rows


FILE_PARSERS: dict[str, Callable[[Path], list[Row]]] = {
    ".json": _json_list_rows,
    ".jsonl": _jsonl_rows,
    ".csv": _csv_rows,
    ".parquet": _parquet_rows,
}


# --------------------------------------------------------------------------
# field access shared by the row mappers
# --------------------------------------------------------------------------


def _require(row: dict, origin: str, needs: tuple[str, ...], what: str) -> None:
    for key in needs:
        if key not in row:
            raise FedllmError(f"{origin}: missing field {key!r} ({what} needs {', '.join(needs)})")


def _text(value: Any, origin: str, key: str) -> str:
    """A field as prompt text: None/NaN (an empty CSV or Parquet cell) is ''."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)):
        return str(value)
    raise FedllmError(f"{origin}: field {key!r} must be text, got {type(value).__name__}")


def _label(value: Any, origin: str, key: str) -> Optional[str]:
    text = _text(value, origin, key).strip()
    return text or None


# --------------------------------------------------------------------------
# row mappers: rows -> examples, one per format
# --------------------------------------------------------------------------


def _from_columns(
    rows: list[Row], columns: dict[str, Optional[str]], needs: tuple[str, ...], what: str
) -> list[Example]:
    """One example per row, its fields read from the columns ``columns`` names (instruction,
    input, output, label; None: no such column). ``needs`` are the columns a row must have;
    ``what`` names the format in the error for a row that lacks one."""
    out = []
    for origin, row in rows:
        _require(row, origin, needs, what)
        out.append(
            Example(
                instruction=_text(row[columns["instruction"]], origin, columns["instruction"]),
                input=_text(row.get(columns["input"]), origin, columns["input"]),
                output=_text(row[columns["output"]], origin, columns["output"]),
                label=_label(row.get(columns["label"]), origin, columns["label"]),
                origin=origin,
            )
        )
    return out


def _dolly(rows: list[Row], fields: dict) -> list[Example]:
    columns = {"instruction": "instruction", "input": "context", "output": "response", "label": "category"}
    return _from_columns(rows, columns, ("instruction", "context", "response"), "format dolly")


def _medical_meadow(rows: list[Row], fields: dict) -> list[Example]:
    columns = {"instruction": "instruction", "input": "input", "output": "output", "label": None}
    return _from_columns(rows, columns, ("instruction", "input", "output"), "format medical_meadow")


def _financial_phrasebank(rows: list[Row], fields: dict) -> list[Example]:
    needs = ("sentence", "label")
    out = []
    for origin, row in rows:
        _require(row, origin, needs, "format financial_phrasebank")
        label = _label(row["label"], origin, "label")
        if label is None:
            raise FedllmError(f"{origin}: empty sentiment label (expected e.g. negative, neutral, positive)")
        out.append(
            Example(
                instruction=_text(row["sentence"], origin, "sentence"),
                output=label,
                label=label,
                origin=origin,
            )
        )
    return out


def _oasst1(rows: list[Row], fields: dict) -> list[Example]:
    """Each best-ranked (rank 0) English assistant reply, with the prompter
    message it answers as the instruction. Deleted messages are skipped, and so
    is a reply whose parent is not in the rows (filtered out upstream)."""
    needs = ("message_id", "parent_id", "role", "text", "lang", "rank")
    by_id = {}
    for origin, row in rows:
        _require(row, origin, needs, "format oasst1")
        by_id[row["message_id"]] = row
    out = []
    for origin, row in rows:
        if row["role"] != "assistant" or row["rank"] != 0 or row["lang"] != "en" or row.get("deleted"):
            continue
        parent = by_id.get(row["parent_id"])
        if parent is None or parent["role"] != "prompter" or parent.get("deleted"):
            continue
        out.append(
            Example(
                instruction=_text(parent["text"], origin, "text"),
                output=_text(row["text"], origin, "text"),
                origin=origin,
                meta={
                    "message_id": row["message_id"],
                    "parent_id": row["parent_id"],
                    "message_tree_id": row.get("message_tree_id"),
                },
            )
        )
    return out


def check_fields(fields: dict, where: str = "fields") -> dict[str, str]:
    """The generic format's field mapping, completed with defaults.

    Keys are instruction, input, output, label; values are column names.
    ``where`` names the config field in errors (``data.sources[0].fields``).
    """
    for key, column in fields.items():
        if key not in GENERIC_FIELDS:
            raise FedllmError(
                f"config field '{where}': unknown key {key!r}; allowed keys: {', '.join(GENERIC_FIELDS)}"
            )
        if not isinstance(column, str) or not column:
            raise FedllmError(f"config field '{where}.{key}': expected a column name, got {column!r}")
    return {key: fields.get(key, key) for key in GENERIC_FIELDS}


def _generic(rows: list[Row], fields: dict) -> list[Example]:
    columns = check_fields(fields)
    # instruction and output must be there; input and label only when mapped explicitly
    needs = tuple(columns[k] for k in ("instruction", "output")) + tuple(
        columns[k] for k in ("input", "label") if k in fields
    )
    return _from_columns(rows, columns, needs, f"format generic with fields {columns}")


# --------------------------------------------------------------------------
# the registry
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordFormat:
    """A named record format: the file kinds it reads and its row mapper."""

    name: str
    suffixes: tuple[str, ...]
    to_examples: Callable[[list[Row], dict], list[Example]]
    parse_file: Optional[Callable[[Path], list[Row]]] = None  # default: by file suffix

    def read(self, path: str | Path, fields: Optional[dict] = None) -> list[Example]:
        """Examples from a file, or from every file of this format's kinds in a
        folder (recursively, in sorted path order)."""
        rows: list[Row] = []
        for file in self.files(Path(path)):
            parse = self.parse_file or FILE_PARSERS[file.suffix.lower()]
            rows.extend(parse(file))
        return self.to_examples(rows, fields or {})

    def files(self, path: Path) -> list[Path]:
        kinds = ", ".join(self.suffixes)
        if path.is_file():
            if path.suffix.lower() not in self.suffixes:
                raise FedllmError(f"{path}: format {self.name} reads {kinds} files")
            return [path]
        if path.is_dir():
            found = [
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in self.suffixes
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            ]
            if not found:
                raise FedllmError(f"{path}: no {kinds} files in this folder (format {self.name})")
            return sorted(found, key=lambda p: p.relative_to(path).as_posix())
        raise FedllmError(f"{path}: no such file or folder")


FORMATS: dict[str, RecordFormat] = {
    f.name: f
    for f in (
        RecordFormat("dolly", (".json", ".jsonl"), _dolly),
        RecordFormat("oasst1", (".jsonl", ".json"), _oasst1),
        RecordFormat("medical_meadow", (".json", ".jsonl"), _medical_meadow),
        RecordFormat("financial_phrasebank", (".txt",), _financial_phrasebank, _phrasebank_rows),
        RecordFormat("generic", (".json", ".jsonl", ".csv", ".parquet"), _generic),
    )
}


def get_format(name: str, where: str = "format") -> RecordFormat:
    """The registered format ``name``; an error naming the config field ``where``
    and the allowed values otherwise."""
    if name not in FORMATS:
        raise FedllmError(f"config field '{where}': unknown format {name!r}; allowed values: {', '.join(FORMATS)}")
    return FORMATS[name]


def read_format(name: str, path: str | Path, fields: Optional[dict] = None) -> list[Example]:
    """``FORMATS[name].read(path, fields)`` with a clear error for an unknown name."""
    return get_format(name).read(path, fields)
