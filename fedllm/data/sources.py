"""One data source of the config -> its examples, wherever the data lives.

``load_source`` is the single entry point. A source's ``path`` is

* a local file or folder (relative paths resolve against ``data_dir`` or
  ``$FEDLLM_DATA_DIR``; ``file://`` is accepted too),
* an ``s3://`` URI of a file or a folder prefix (downloaded with ``fedllm.store``),
* ``hf://<dataset id>[:<split>]``, read with ``datasets.load_dataset`` (only
  here does the data layer touch the hub; offline sites give a path or URI).

``max_records`` then keeps a random subset, seeded by the experiment seed and
the source name, in the records' original order.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from fedllm.config import ExperimentConfig, SourceConfig
from fedllm.data.formats import RecordFormat, check_fields, get_format
from fedllm.data.records import Example
from fedllm.data.seeding import rng_for, sample_indices
from fedllm.errors import FedllmError


def load_source(src: SourceConfig, cfg: ExperimentConfig) -> list[Example]:
    """Every example of ``src`` (or its seeded ``max_records`` subset), each with
    ``source = src.name`` and ``origin`` naming the file (or URI) and line.

    Raises FedllmError naming ``data.sources[i].<field>`` for a bad format, field
    mapping, path or record cap, and the file:line for a bad record.
    """
    where = _where(src, cfg)
    fmt = get_format(src.format, f"{where}.format")
    if src.format == "generic":
        check_fields(src.fields, f"{where}.fields")
    elif src.fields:
        raise FedllmError(
            f"config field '{where}.fields': only format generic takes a field mapping; "
            f"format {src.format} reads its own fields"
        )
    if src.max_records is not None and src.max_records < 1:
        raise FedllmError(f"config field '{where}.max_records': must be ≥ 1 or null, got {src.max_records}")

    location = cfg.resolve_data_path(src.path)
    if src.hub and "://" not in location and not Path(location).exists():
        # No local copy (a user without the offline data dir): the hub has it.
        if not src.hub.startswith("hf://"):
            raise FedllmError(f"config field '{where}.hub': expected hf://<dataset id>[:<split>], got {src.hub!r}")
        location = src.hub
    if location.startswith("hf://"):
        examples = _read_hub(fmt, location, src, where)
    elif location.startswith("s3://"):
        examples = _read_s3(fmt, location, src)
    elif location.startswith("file://") or "://" not in location:
        examples = _read_local(fmt, location.removeprefix("file://"), src, where)
    else:
        raise FedllmError(
            f"config field '{where}.path': unsupported URI {src.path!r}; "
            "accepted: a local path, file://, s3://<bucket>/<key> or hf://<dataset id>[:<split>]"
        )
    if not examples:
        raise FedllmError(f"data source {src.name!r} ({location}): no records of format {src.format}")

    if src.max_records is not None:
        keep = sample_indices(len(examples), src.max_records, rng_for(cfg.seed, "max_records", src.name))
        examples = [examples[i] for i in keep]
    for ex in examples:
        ex.source = src.name
    return examples


def _where(src: SourceConfig, cfg: ExperimentConfig) -> str:
    """``data.sources[i]`` for a source of this config (by identity, then name)."""
    for i, other in enumerate(cfg.data.sources):
        if other is src:
            return f"data.sources[{i}]"
    for i, other in enumerate(cfg.data.sources):
        if other.name == src.name:
            return f"data.sources[{i}]"
    return f"data source {src.name!r}"


def _read_local(fmt: RecordFormat, location: str, src: SourceConfig, where: str) -> list[Example]:
    path = Path(location)
    if not path.exists():
        raise FedllmError(
            f"config field '{where}.path': {src.path!r} resolves to {path.absolute()}, which does not exist "
            "(relative paths resolve against data_dir or $FEDLLM_DATA_DIR)"
        )
    return fmt.read(path, src.fields)


def _read_s3(fmt: RecordFormat, uri: str, src: SourceConfig) -> list[Example]:
    from fedllm.store import fetch_path  # the store pulls in the S3 client; only load it when used

    uri = uri.rstrip("/")
    with tempfile.TemporaryDirectory(prefix="fedllm-source-") as tmp:
        local = str(fetch_path(uri, tmp))
        # errors and origins name the URI the user wrote, not the temporary copy
        try:
            examples = fmt.read(local, src.fields)
        except FedllmError as e:
            raise FedllmError(str(e).replace(local, uri)) from None
    for ex in examples:
        ex.origin = ex.origin.replace(local, uri, 1)
    return examples


def _read_hub(fmt: RecordFormat, location: str, src: SourceConfig, where: str) -> list[Example]:
    dataset_id, _, split = location.removeprefix("hf://").partition(":")
    split = split or "train"
    if not dataset_id:
        raise FedllmError(f"config field '{where}.path': expected hf://<dataset id>[:<split>], got {src.path!r}")
    try:
        import datasets
    except ImportError:
        raise FedllmError(f"config field '{where}.path': reading {location} needs the 'datasets' package") from None
    try:
        table = datasets.load_dataset(dataset_id, split=split)
    except Exception as e:  # the hub client raises many types (offline, not found, bad split)
        raise FedllmError(
            f"config field '{where}.path': cannot load hub dataset {dataset_id!r} split {split!r} "
            f"({type(e).__name__}: {e}); without the hub, give a local path or s3:// URI"
        ) from None
    # class-label columns hold ints on the hub; the formats expect the label names
    names = {
        col: feature.names
        for col, feature in table.features.items()
        if isinstance(feature, datasets.ClassLabel)
    }
    rows = []
    for i, record in enumerate(table.to_list()):
        for col, labels in names.items():
            if record.get(col) is not None:
                record[col] = labels[record[col]]
        rows.append((f"hf://{dataset_id}:{split}#{i}", record))
    return fmt.to_examples(rows, src.fields)
