"""The results table in the seed's layout: one row per setting, zero-shot scores and val loss.

Rows: base, each site alone, centralized, FedAvg, its variants (``fedavg:<variant>``).
Columns: HellaSwag acc/acc_norm, PIQA acc/acc_norm, WinoGrande acc, their mean (higher
is better), the loss on the combined validation set (lower is better) and, when the run
scored the fine-tuning task's own metric, its accuracy and macro-F1 (higher is better).
The best value of each column is marked; values that tie at the shown precision
(3 decimals) are all marked.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedllm.report.document import Cell, Paragraph, Section, Table
from fedllm.report.run_summary import display_name, number, ordered_settings
from fedllm.report.significance import format_comparisons_text
from fedllm.rundir import SUMMARY
from fedllm.report.task import has_task, rows_description, task_value

MISSING = "–"
DECIMALS = 3


@dataclass(frozen=True)
class Column:
    key: str  # the metric name in a setting's ``eval`` (or ``val_loss``, ``task/<metric>``)
    header: str
    higher_is_better: bool


COLUMNS = (
    Column("hellaswag/acc", "H acc", True),
    Column("hellaswag/acc_norm", "H acc_norm", True),
    Column("piqa/acc", "P acc", True),
    Column("piqa/acc_norm", "P acc_norm", True),
    Column("winogrande/acc", "W acc", True),
    Column("mean", "Mean", True),
    Column("val_loss", "Val loss", False),
)
# Shown only when some setting has a ``task`` entry (older runs and the tiny demo have none).
TASK_COLUMNS = (
    Column("task/accuracy", "Task acc", True),
    Column("task/macro_f1", "Task F1", True),
)


def columns_of(summary: dict) -> tuple[Column, ...]:
    """The table's columns for this run: ``COLUMNS``, then ``TASK_COLUMNS`` when the task was scored."""
    return COLUMNS + TASK_COLUMNS if has_task(summary) else COLUMNS


def results_table(summary: dict, source: str = SUMMARY) -> list[dict]:
    """One dict per setting, in row order::

        {"setting": "fedavg", "name": "FedAvg",
         "cells": {"hellaswag/acc": {"value": 0.377, "stderr": 0.005, "best": True}, ...,
                   "val_loss": {"value": 4.9, "stderr": None, "best": True}}}

    ``cells`` has every key of ``columns_of(summary)`` (``task/accuracy`` and
    ``task/macro_f1`` only when some setting has a ``task`` entry); ``value`` is ``None``
    where the setting has no such number (no eval yet, no val loss). ``source``
    prefixes error messages.
    """
    columns = columns_of(summary)
    rows = []
    for key, setting in ordered_settings(summary):
        where = f"{source}: settings.{key}"
        scores = setting.get("eval") or {}
        cells = {}
        for column in columns:
            if column.key == "val_loss":
                value, stderr = number(setting.get("val_loss"), f"{where}.val_loss"), None
            elif column.key.startswith("task/"):
                value, stderr = task_value(setting, column.key[len("task/"):], where), None
            else:
                value, stderr = _score(scores.get(column.key), f"{where}.eval.{column.key}")
            cells[column.key] = {"value": value, "stderr": stderr, "best": False}
        rows.append({"setting": key, "name": display_name(key, setting), "cells": cells})
    _mark_best(rows, columns)
    return rows


def format_table_text(summary: dict, source: str = SUMMARY) -> str:
    """The results table as aligned plain text for a terminal: a header, a rule, one
    line per setting (best per column followed by ``*``), and a one-line legend; then,
    when the run recorded them, the comparisons of FedAvg with each site alone and
    centralized (``fedllm.report.significance``)."""
    rows = results_table(summary, source)
    columns = columns_of(summary)
    header = ["Setting", *(c.header for c in columns)]
    lines = [[row["name"], *(_plain(row["cells"][c.key]) for c in columns)] for row in rows]
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]

    def align(fields: list[str]) -> str:
        first = fields[0].ljust(widths[0])
        return "  ".join([first, *(f.rjust(w) for f, w in zip(fields[1:], widths[1:]))]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    legend = "* best in column (Val loss: loss on the combined validation set, lower is better)"
    if columns != COLUMNS:
        legend += f"\nTask acc / Task F1: accuracy and macro-F1 on {rows_description(summary)}"
    text = "\n".join([align(header), rule, *(align(line) for line in lines), legend])
    comparisons = format_comparisons_text(summary, source)
    return f"{text}\n\n{comparisons}" if comparisons else text


def results_section(summary: dict, source: str) -> Section:
    rows = results_table(summary, source)
    columns = columns_of(summary)
    section = Section("Results")
    if not rows:
        section.blocks.append(Paragraph("Results: no settings recorded in this run."))
        return section
    table_rows = []
    for row in rows:
        cells = [Cell(row["name"])]
        for column in columns:
            cell = row["cells"][column.key]
            detail = f"± {cell['stderr']:.{DECIMALS}f}" if cell["stderr"] is not None else ""
            cells.append(Cell(_shown(cell["value"]), detail=detail, best=cell["best"], numeric=True))
        table_rows.append(cells)
    caption = (
        "Zero-shot accuracy (H = HellaSwag, P = PIQA, W = WinoGrande; Mean = mean of the five) "
        "and loss on the combined validation set of all sites."
    )
    if columns != COLUMNS:
        caption += f" Task acc / Task F1: the fine-tuning task's accuracy and macro-F1 on {rows_description(summary)}."
    caption += " Best per column in bold; higher is better except Val loss."
    section.blocks.append(Table(["Setting", *(c.header for c in columns)], table_rows, caption=caption))
    if all(row["cells"]["mean"]["value"] is None for row in rows):
        section.blocks.append(Paragraph("Zero-shot evaluation: not recorded in this run (run `fedllm evaluate`)."))
    return section


def _score(entry, where: str) -> tuple[float | None, float | None]:
    """A metric as (value, stderr). lm-eval reports stderr "N/A" when it skips bootstrapping."""
    if entry is None:
        return None, None
    if not isinstance(entry, dict):
        return number(entry, where), None
    stderr = entry.get("stderr")
    stderr = number(stderr, f"{where}.stderr") if not isinstance(stderr, str) else None
    return number(entry.get("value"), f"{where}.value"), stderr


def _mark_best(rows: list[dict], columns: tuple[Column, ...]) -> None:
    for column in columns:
        values = [r["cells"][column.key]["value"] for r in rows]
        shown = [round(v, DECIMALS) for v in values if v is not None]
        if not shown:
            continue
        best = max(shown) if column.higher_is_better else min(shown)
        for row in rows:
            cell = row["cells"][column.key]
            cell["best"] = cell["value"] is not None and round(cell["value"], DECIMALS) == best


def _shown(value: float | None) -> str:
    return MISSING if value is None else f"{value:.{DECIMALS}f}"


def _plain(cell: dict) -> str:
    return _shown(cell["value"]) + ("*" if cell["best"] else " ")
