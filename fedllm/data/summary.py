"""The partition summary: records per site × label (or × source), per split.

Saved with every run (``partition_summary.json`` and a stacked bar chart
``partition_summary.png``) so a reader sees how skewed the sites are.
"""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

from fedllm.files import write_atomic, write_json_atomic
from fedllm.data.records import Example
from fedllm.data.splits import SPLITS


def partition_summary(site_splits: dict[str, dict[str, list[Example]]]) -> dict:
    """Counts of each site's records by group, overall and per split.

    Groups are labels when every record has one, else source names. Shape::

        {"group_by": "label", "groups": [...], "splits": ["train", "val", "test"],
         "totals": {"records": N, "by_group": {g: n}},
         "sites": {site: {"records": n, "by_group": {g: n},
                          "splits": {"train": {"records": n, "by_group": {g: n}}, ...}}}}

    Every ``by_group`` lists every group (zeros included), in sorted order.
    """
    everything = [ex for splits in site_splits.values() for examples in splits.values() for ex in examples]
    group_by = "label" if everything and all(ex.label for ex in everything) else "source"
    groups = sorted({getattr(ex, group_by) for ex in everything})

    def counts(examples: list[Example]) -> dict:
        c = Counter(getattr(ex, group_by) for ex in examples)
        return {"records": len(examples), "by_group": {g: c.get(g, 0) for g in groups}}

    sites = {}
    for site, splits in site_splits.items():
        whole = counts([ex for s in SPLITS for ex in splits.get(s, [])])
        whole["splits"] = {s: counts(splits.get(s, [])) for s in SPLITS}
        sites[site] = whole
    return {
        "group_by": group_by,
        "groups": groups,
        "splits": list(SPLITS),
        "totals": counts(everything),
        "sites": sites,
    }


def write_summary(summary: dict, json_path: str | Path, png_path: str | Path) -> None:
    """Save the summary as JSON and as a PNG chart (one panel per split, a
    stacked bar per site); both written atomically."""
    write_json_atomic(json_path, summary)
    write_atomic(png_path, render_summary_png(summary))


def render_summary_png(summary: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")  # no display on sites and in pods
    import matplotlib.pyplot as plt

    sites = list(summary["sites"])
    groups = summary["groups"]
    cmap = plt.get_cmap("tab20" if len(groups) > 10 else "tab10")
    fig, axes = plt.subplots(
        1, len(summary["splits"]), figsize=(max(8.0, 1.0 + 1.1 * len(sites) * len(summary["splits"])), 4.5)
    )
    for ax, split in zip(axes, summary["splits"]):
        bottom = [0] * len(sites)
        for g_index, group in enumerate(groups):
            heights = [summary["sites"][s]["splits"][split]["by_group"][group] for s in sites]
            ax.bar(sites, heights, bottom=bottom, color=cmap(g_index % cmap.N), label=str(group))
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.set_title(f"{split} ({sum(bottom)} records)")
        ax.set_ylabel("records")
        ax.tick_params(axis="x", labelrotation=45 if len(sites) > 4 else 0)
    axes[-1].legend(title=summary["group_by"], fontsize="small", bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.suptitle(f"records per site × {summary['group_by']}")
    fig.tight_layout()
    buffer = io.BytesIO()
    # no Software/date metadata: the same partition gives the same bytes
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()
