"""Is the difference real? Each federated setting against each site alone and centralized.

Reads summary.json's ``comparisons`` (written by fedllm.evaluate.bootstrap.compare_settings):
per pair of settings and task metric, the difference on all rows and its paired
bootstrap 95% interval. The verdict is "better" or "worse" when the interval lies
entirely above or below 0, else "within noise".
"""

from __future__ import annotations

from fedllm.errors import FedllmError
from fedllm.report.document import Cell, Paragraph, Section, Table, not_recorded
from fedllm.report.run_summary import display_name, number
from fedllm.rundir import SUMMARY
from fedllm.report.task import NOT_RECORDED, has_task

DECIMALS = 3
METRIC_NAMES = {"accuracy": "accuracy", "macro_f1": "macro-F1"}


def comparisons(summary: dict, source: str) -> list[dict]:
    """summary.json's ``comparisons``, checked: ``[]`` when absent; each entry has
    ``setting``, ``against``, ``metric`` (str), ``difference`` (float), ``ci95`` (lo, hi),
    ``rows`` and ``resamples`` (int or None). Raises naming the malformed field."""
    entries = summary.get("comparisons")
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise FedllmError(f"{source}: comparisons: expected a list of {{setting, against, metric, difference, ci95}}")
    checked = []
    for i, entry in enumerate(entries):
        at = f"{source}: comparisons[{i}]"
        if not isinstance(entry, dict):
            raise FedllmError(f"{at}: expected an object with setting, against, metric, difference, ci95")
        for field in ("setting", "against", "metric"):
            if not isinstance(entry.get(field), str):
                raise FedllmError(f"{at}.{field}: expected a string, got {entry.get(field)!r}")
        ci95 = entry.get("ci95")
        if not isinstance(ci95, list) or len(ci95) != 2:
            raise FedllmError(f"{at}.ci95: expected [lo, hi], got {ci95!r}")
        lo, hi = number(ci95[0], f"{at}.ci95[0]"), number(ci95[1], f"{at}.ci95[1]")
        difference = number(entry.get("difference"), f"{at}.difference")
        if lo is None or hi is None or difference is None:
            raise FedllmError(f"{at}: difference and ci95 must be finite numbers")
        counts = {f: number(entry.get(f), f"{at}.{f}") for f in ("rows", "resamples")}
        checked.append({**entry, "difference": difference, "ci95": (lo, hi),
                        **{f: None if v is None else int(v) for f, v in counts.items()}})
    return checked


def verdict(ci95: tuple[float, float]) -> str:
    """``better`` / ``worse`` when the 95% interval excludes 0 (above / below), else ``within noise``."""
    lo, hi = ci95
    if lo > 0:
        return "better"
    if hi < 0:
        return "worse"
    return "within noise"


def signed(value: float) -> str:
    """A difference with its sign at 3 decimals; one that rounds to zero reads ``0.000``."""
    text = f"{value:+.{DECIMALS}f}"
    return f"{0:.{DECIMALS}f}" if float(text) == 0 else text


def interval(ci95: tuple[float, float]) -> str:
    return f"[{signed(ci95[0])}, {signed(ci95[1])}]"


def method_line(entries: list[dict], summary: dict) -> str:
    """One sentence on how the intervals were made, e.g. ``Paired bootstrap over the same 227 test rows, 2000 resamples: ...``."""
    rows = " / ".join(str(n) for n in sorted({e["rows"] for e in entries if e["rows"] is not None}))
    resamples = " / ".join(str(n) for n in sorted({e["resamples"] for e in entries if e["resamples"] is not None}))
    split = next((s["task"].get("split") for s in (summary.get("settings") or {}).values()
                  if isinstance(s.get("task"), dict) and isinstance(s["task"].get("split"), str)), "task")
    over = f"the same {rows} {split} rows" if rows else f"the same {split} rows"
    counted = f", {resamples} resamples" if resamples else ""
    return (
        f"Paired bootstrap over {over}{counted}: rows are drawn with replacement and both settings are "
        "scored on the same drawn rows. Difference = setting − against (higher is better); "
        "better / worse: the 95% interval excludes 0."
    )


def significance_section(summary: dict, source: str) -> Section:
    section = Section("Is the difference real?")
    entries = comparisons(summary, source)
    if not entries:
        section.blocks.append(Paragraph(NOT_RECORDED) if not has_task(summary)
                              else not_recorded("Comparisons of FedAvg with each site alone and centralized"))
        return section
    settings = summary.get("settings") or {}
    rows = [
        [
            Cell(display_name(e["setting"], settings.get(e["setting"]))),
            Cell(display_name(e["against"], settings.get(e["against"]))),
            Cell(METRIC_NAMES.get(e["metric"], e["metric"])),
            Cell(signed(e["difference"]), numeric=True),
            Cell(interval(e["ci95"]), numeric=True),
            Cell(verdict(e["ci95"])),
        ]
        for e in entries
    ]
    section.blocks.append(
        Table(["Setting", "Against", "Metric", "Difference", "95% interval", "Verdict"], rows,
              caption=method_line(entries, summary))
    )
    return section


def format_comparisons_text(summary: dict, source: str = SUMMARY) -> str:
    """The comparisons as aligned plain text for a terminal (a title line, one line per
    comparison, the method line); ``""`` when the run recorded none."""
    entries = comparisons(summary, source)
    if not entries:
        return ""
    settings = summary.get("settings") or {}
    lines = [
        [display_name(e["setting"], settings.get(e["setting"])), "vs", display_name(e["against"], settings.get(e["against"])),
         METRIC_NAMES.get(e["metric"], e["metric"]),
         signed(e["difference"]), interval(e["ci95"]), verdict(e["ci95"])]
        for e in entries
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    right = {4, 5}  # numbers are right-aligned
    text = ["  ".join(f.rjust(w) if i in right else f.ljust(w) for i, (f, w) in enumerate(zip(line, widths))).rstrip()
            for line in lines]
    return "\n".join(["Is the difference real?", *text, method_line(entries, summary)])
