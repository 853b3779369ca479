"""The partition step: config -> a folder of per-site train/val/test files.

    parts = prepare_partitions(cfg, "runs/demo/data")     # `fedllm partition CONFIG --out DIR`
    parts = load_partitions("runs/demo/data")              # any later step
    parts.train("site-1"), parts.combined_val(), parts.pooled_train()

Folder layout::

    sites/<site>/train.jsonl, val.jsonl, test.jsonl   one Example per line
    combined_val.jsonl        every site's val, in site order: every setting is scored on it
    partition_summary.json    records per site × label (or source), per split
    partition_summary.png
    partition.json            sites, counts, strategy, seed, config fingerprint, file sha256s

``partition.json`` is written last, atomically: a folder without it is an
incomplete partition and ``load_partitions`` refuses it. The same config gives
byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from fedllm.config import ExperimentConfig
from fedllm.data.jsonl import dumps_jsonl, read_jsonl
from fedllm.files import write_atomic, write_json_atomic
from fedllm.data.partition import partition_examples
from fedllm.data.prompts import get_template
from fedllm.data.records import Example
from fedllm.data.seeding import rng_for, sample_indices
from fedllm.data.sources import load_source
from fedllm.data.splits import SPLITS, split_examples
from fedllm.data.summary import partition_summary, write_summary
from fedllm.rundir import PARTITION_MARKER, PARTITION_SUMMARY_JSON, PARTITION_SUMMARY_PNG
from fedllm.errors import FedllmError

MANIFEST = PARTITION_MARKER
SUMMARY_JSON = PARTITION_SUMMARY_JSON
SUMMARY_PNG = PARTITION_SUMMARY_PNG
COMBINED_VAL = "combined_val.jsonl"
MANIFEST_VERSION = 1
SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass
class Partitions:
    """A prepared partition folder. Records are read from disk on each call."""

    dir: Path
    sites: list[str]
    summary: dict = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)

    def site_file(self, site: str, split: str) -> Path:
        if site not in self.sites:
            raise FedllmError(f"{self.dir}: no site {site!r}; sites: {', '.join(self.sites)}")
        return self.dir / "sites" / site / f"{split}.jsonl"

    def train(self, site: str) -> list[Example]:
        return read_jsonl(self.site_file(site, "train"))

    def val(self, site: str) -> list[Example]:
        return read_jsonl(self.site_file(site, "val"))

    def test(self, site: str) -> list[Example]:
        return read_jsonl(self.site_file(site, "test"))

    def combined_val(self) -> list[Example]:
        """Every site's val records, in site order (the set every setting is scored on)."""
        return read_jsonl(self.dir / COMBINED_VAL)

    def pooled_train(self) -> list[Example]:
        """Every site's train records, in site order (the centralized baseline's data)."""
        return [ex for site in self.sites for ex in self.train(site)]

    def counts(self) -> dict[str, dict[str, int]]:
        """site -> split -> records, as recorded in partition.json."""
        return self.manifest["counts"]


def prepare_partitions(cfg: ExperimentConfig, out_dir: str | Path) -> Partitions:
    """Load every source, partition into sites, split each site, and write the
    folder described in the module docstring. Returns it as ``Partitions``."""
    out = Path(out_dir)
    get_template(cfg.data.template)  # a typo in the template name fails here, not in round 1

    site_of = {}
    for i, src in enumerate(cfg.data.sources):
        site_of[src.name] = src.site or src.name
        if not SITE_NAME.fullmatch(site_of[src.name]):
            field_name = "site" if src.site else "name"
            raise FedllmError(
                f"config field 'data.sources[{i}].{field_name}': site name {site_of[src.name]!r} is not allowed; "
                "use letters, digits, '.', '_' and '-' (it names a folder and an NVFlare client)"
            )
    cap = cfg.data.max_val_records_per_site
    if cap is not None and cap < 1:
        raise FedllmError(f"config field 'data.max_val_records_per_site': must be ≥ 1 or null, got {cap}")

    by_source = {src.name: load_source(src, cfg) for src in cfg.data.sources}
    sites = partition_examples(by_source, cfg.data.partition, cfg.seed, site_of)

    site_splits = {}
    for site, examples in sites.items():
        splits = split_examples(examples, cfg.data.split, cfg.seed, site)
        if cap is not None:
            keep = sample_indices(len(splits["val"]), cap, rng_for(cfg.seed, "val_cap", site))
            splits["val"] = [splits["val"][i] for i in keep]
        site_splits[site] = splits

    # An older partition in this folder is invalid from here on: drop its
    # manifest first, so a crash below leaves a folder known to be incomplete.
    (out / MANIFEST).unlink(missing_ok=True)
    if (out / "sites").is_dir():
        shutil.rmtree(out / "sites")

    files = {}
    for site, splits in site_splits.items():
        files[site] = {}
        for split in SPLITS:
            rel = f"sites/{site}/{split}.jsonl"
            files[site][split] = _write(out / rel, dumps_jsonl(splits[split]))
    combined = [ex for splits in site_splits.values() for ex in splits["val"]]
    files_combined = _write(out / COMBINED_VAL, dumps_jsonl(combined))

    summary = partition_summary(site_splits)
    write_summary(summary, out / SUMMARY_JSON, out / SUMMARY_PNG)

    part = cfg.data.partition
    manifest = {
        "version": MANIFEST_VERSION,
        "sites": list(site_splits),
        "counts": {site: {s: len(splits[s]) for s in SPLITS} for site, splits in site_splits.items()},
        "combined_val_records": len(combined),
        "strategy": part.strategy,
        "num_sites": len(site_splits),
        "alpha": part.alpha if part.strategy == "dirichlet" else None,
        "label_field": part.label_field if part.strategy == "dirichlet" else None,
        "split": {"train": cfg.data.split.train, "val": cfg.data.split.val, "test": cfg.data.split.test},
        "max_val_records_per_site": cfg.data.max_val_records_per_site,
        "template": cfg.data.template,
        "seed": cfg.seed,
        "sources": [
            {"name": src.name, "format": src.format, "path": src.path, "site": site_of[src.name],
             "records": len(by_source[src.name])}
            for src in cfg.data.sources
        ],
        "config_fingerprint": cfg.fingerprint(),
        "files": {"sites": files, "combined_val": files_combined},
    }
    write_json_atomic(out / MANIFEST, manifest)
    return Partitions(dir=out, sites=list(site_splits), summary=summary, manifest=manifest)


def _write(path: Path, data: bytes) -> dict:
    write_atomic(path, data)
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def load_partitions(out_dir: str | Path) -> Partitions:
    """The partition folder written by ``prepare_partitions``.

    Raises FedllmError naming the folder when ``partition.json`` is missing
    (never prepared, or interrupted) or a site file it lists is absent.
    """
    out = Path(out_dir)
    manifest_path = out / MANIFEST
    if not manifest_path.is_file():
        raise FedllmError(
            f"{out}: no {MANIFEST}; the partition folder is missing or incomplete "
            "(run `fedllm partition CONFIG --out DIR` first)"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise FedllmError(f"{manifest_path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION or "sites" not in manifest:
        raise FedllmError(f"{manifest_path}: not a version {MANIFEST_VERSION} partition manifest")
    parts = Partitions(dir=out, sites=list(manifest["sites"]), manifest=manifest)
    for site in parts.sites:
        for split in SPLITS:
            if not parts.site_file(site, split).is_file():
                raise FedllmError(f"{out}: partition.json lists site {site!r} but {parts.site_file(site, split)} is missing")
    summary_path = out / SUMMARY_JSON
    if summary_path.is_file():
        parts.summary = json.loads(summary_path.read_text(encoding="utf-8"))
    return parts
