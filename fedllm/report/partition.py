"""How the records were dealt to the sites: the partition chart and a site × label table.

Both come from the partition step (``fedllm/data/summary.py``): the chart is copied
beside the report, the tables are read from the partition summary JSON::

    {"group_by": "label", "groups": [...], "splits": ["train", "val", "test"],
     "totals": {"records": N, "by_group": {g: n}},
     "sites": {site: {"records": n, "by_group": {g: n},
                      "splits": {"train": {"records": n, "by_group": {g: n}}, ...}}}}

Only ``sites.<site>.by_group`` is required; the per-split table is shown when splits are.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedllm.errors import FedllmError
from fedllm.report.document import Cell, Paragraph, Picture, Section, Table, not_recorded

FILE_NAME = "partition.png"


def partition_section(summary: dict, run_dir: Path, source: str) -> Section:
    section = Section("Data partition")
    partition = summary.get("partition") or {}

    chart = _run_file(run_dir, partition.get("chart_png"), "Partition chart", section)
    if chart is not None:
        png = chart.read_bytes()
        if not png.startswith(b"\x89PNG"):
            raise FedllmError(f"{source}: partition.chart_png: {chart} is not a PNG file")
        section.blocks.append(Picture(FILE_NAME, "Records per site, as drawn by the partition step.", png))

    counts_file = _run_file(run_dir, partition.get("summary_json"), "Records per site and label", section)
    if counts_file is None:
        return section
    counts = read_partition_summary(counts_file)
    if not counts["sites"]:
        section.blocks.append(Paragraph(f"Records per site and label: {counts_file.name} lists no sites."))
        return section
    section.blocks.append(_group_table(counts))
    split_table = _split_table(counts)
    if split_table is not None:
        section.blocks.append(split_table)
    return section


def read_partition_summary(path: Path) -> dict:
    """The partition summary at ``path``, checked for what the tables read; raises
    ``FedllmError`` naming the file and field otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise FedllmError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("sites"), dict):
        raise FedllmError(f"{path}: sites: expected a mapping of site name to its record counts")
    for site, entry in data["sites"].items():
        _by_group(entry, f"{path}: sites.{site}")
        splits = entry.get("splits") or {}
        if not isinstance(splits, dict):
            raise FedllmError(f"{path}: sites.{site}.splits: expected a mapping of split to record counts")
        for split, counts in splits.items():
            _by_group(counts, f"{path}: sites.{site}.splits.{split}")
    return data


def _by_group(entry, where: str) -> dict[str, int]:
    counts = entry.get("by_group") if isinstance(entry, dict) else None
    if not isinstance(counts, dict) or not all(isinstance(n, int) and not isinstance(n, bool) for n in counts.values()):
        raise FedllmError(f"{where}.by_group: expected a mapping of label (or source) to a record count")
    return counts


def _group_table(counts: dict) -> Table:
    sites = counts["sites"]
    groups = counts.get("groups") or sorted({g for entry in sites.values() for g in entry["by_group"]})
    rows = []
    for site, entry in sites.items():
        by_group = entry["by_group"]
        rows.append([Cell(site), *(_count(by_group.get(g, 0)) for g in groups), _count(sum(by_group.values()))])
    all_sites = [sum(entry["by_group"].get(g, 0) for entry in sites.values()) for g in groups]
    rows.append([Cell("All sites"), *(_count(n) for n in all_sites), _count(sum(all_sites))])
    group_by = counts.get("group_by") or "label"
    return Table(["Site", *(str(g) for g in groups), "Total"], rows,
                 caption=f"Records per site and {group_by} (all splits).")


def _split_table(counts: dict) -> Table | None:
    sites = counts["sites"]
    splits = counts.get("splits") or list(dict.fromkeys(s for e in sites.values() for s in e.get("splits") or {}))
    if not splits or not any(entry.get("splits") for entry in sites.values()):
        return None
    rows = []
    for site, entry in sites.items():
        per_split = entry.get("splits") or {}
        cells = [_count(sum(per_split[s]["by_group"].values())) if s in per_split else Cell("–", numeric=True)
                 for s in splits]
        rows.append([Cell(site), *cells])
    return Table(["Site", *splits], rows, caption="Records per site and split.")


def _count(n: int) -> Cell:
    return Cell(f"{n:,}", numeric=True)


def _run_file(run_dir: Path, relative, what: str, section: Section) -> Path | None:
    """A file named in summary.json (relative to the run dir); when there is none, the
    section says so and None is returned."""
    if not relative:
        section.blocks.append(not_recorded(what))
        return None
    path = run_dir / relative
    if not path.is_file():
        section.blocks.append(Paragraph(f"{what}: {relative} is named in summary.json but missing from the run."))
        return None
    return path
