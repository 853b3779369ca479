"""The fine-tuning task's own metric: accuracy and macro-F1 of each setting, per round.

Each setting's ``task`` entry (see fedllm.evaluate.task_metric) holds its final
``accuracy`` and ``macro_f1`` on the task's rows and a ``curve`` with one point per
round. Round 0 is before training; for a site alone or centralized, round r is the
optimizer-step budget of r FedAvg rounds, so all settings share one round axis. On the
chart, sites and centralized are lines; a federated setting is steps with a dot per
round (its global model only changes at each aggregation); the base model is a
horizontal dotted line.
"""

from __future__ import annotations

from fedllm.errors import FedllmError
from fedllm.report.charts import new_figure, png_bytes
from fedllm.report.document import Cell, Paragraph, Picture, Section, Table
from fedllm.report.curves import plot_setting_curves
from fedllm.report.run_summary import display_name, number, ordered_settings

FILE_NAME = "task_curves.png"
DECIMALS = 3
MISSING = "–"
NOT_RECORDED = "Task metric: not recorded in this run (set evaluation.task.metric: label_choice to score it)."

_METRICS = (("accuracy", "accuracy"), ("macro_f1", "macro-F1"))


def task_entry(setting: dict, where: str) -> dict | None:
    """A setting's ``task`` entry, checked: ``None`` when absent; raises naming ``where`` when not an object."""
    task = setting.get("task")
    if task is None:
        return None
    if not isinstance(task, dict):
        raise FedllmError(f"{where}: expected an object with metric, accuracy, macro_f1, curve")
    return task


def has_task(summary: dict) -> bool:
    """Whether any setting of the run recorded the task metric."""
    return any(s.get("task") is not None for s in (summary.get("settings") or {}).values())


def task_value(setting: dict, metric: str, where: str) -> float | None:
    """``settings.<key>.task.<metric>`` as a number, ``None`` when not recorded."""
    task = task_entry(setting, f"{where}.task")
    return None if task is None else number(task.get(metric), f"{where}.task.{metric}")


def task_curve(setting: dict, where: str) -> list[tuple[int, float | None, float | None]]:
    """``task.curve`` as ``(round, accuracy, macro_f1)`` sorted by round; empty when not recorded."""
    task = task_entry(setting, f"{where}.task")
    points = None if task is None else task.get("curve")
    if points is None:
        return []
    if not isinstance(points, list):
        raise FedllmError(f"{where}.task.curve: expected a list of {{round, step, accuracy, macro_f1}}")
    curve = []
    for i, point in enumerate(points):
        at = f"{where}.task.curve[{i}]"
        if not isinstance(point, dict):
            raise FedllmError(f"{at}: expected an object with round, accuracy, macro_f1, got {point!r}")
        round_number = number(point.get("round"), f"{at}.round")
        if round_number is None:
            raise FedllmError(f"{at}.round: expected a round number, got {point.get('round')!r}")
        curve.append((int(round_number), number(point.get("accuracy"), f"{at}.accuracy"),
                      number(point.get("macro_f1"), f"{at}.macro_f1")))
    return sorted(curve, key=lambda p: p[0])


def rows_description(summary: dict) -> str:
    """What the task metric was scored on, e.g. ``the 227 test rows (choices: negative / neutral / positive)``."""
    tasks = [s["task"] for s in (summary.get("settings") or {}).values() if isinstance(s.get("task"), dict)]
    if not tasks:
        return "the task's rows"
    task = tasks[0]
    split = task.get("split") or "evaluation"
    n = task.get("n")
    rows = f"the {n} {split} rows" if isinstance(n, int) else f"the {split} rows"
    choices = task.get("choices")
    if isinstance(choices, list) and choices:
        rows += f" (choices: {' / '.join(str(c) for c in choices)})"
    return rows


def task_curves_section(summary: dict, source: str) -> Section:
    section = Section("Task metric per round")
    if not has_task(summary):
        section.blocks.append(Paragraph(NOT_RECORDED))
        return section
    settings = ordered_settings(summary)
    curves = {key: task_curve(setting, f"{source}: settings.{key}") for key, setting in settings}
    if not any(curves.values()):
        section.blocks.append(Paragraph("Task metric per round: not recorded in this run (no task.curve)."))
        return section
    section.blocks.append(_chart(summary, settings, curves, source))
    section.blocks.append(_table(summary, settings, curves))
    return section


def _chart(summary: dict, settings: list[tuple[str, dict]], curves: dict, source: str) -> Picture:
    figure = new_figure(width=10.0, height=4.8)
    axes_by_metric = figure.subplots(1, 2)
    for column, ((metric, label), axes) in enumerate(zip(_METRICS, axes_by_metric)):
        points = {key: [(r, p[column]) for r, *p in curves[key] if p[column] is not None] for key, _ in settings}

        def base_value(key: str, setting: dict, base_points: list, metric=metric):
            value = task_value(setting, metric, f"{source}: settings.{key}")
            return base_points[-1][1] if value is None and base_points else value

        plot_setting_curves(axes, settings, points, base_value)
        axes.set_xlabel("round (sites alone, centralized: the same step budget)")
        axes.set_ylabel(f"task {label}")
        axes.set_title(f"Task {label}")
        axes.grid(True, alpha=0.3)
        axes.xaxis.get_major_locator().set_params(integer=True)
    # One legend under both charts: inside either it would hide the curves' ends.
    handles, labels = axes_by_metric[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncol=min(4, len(labels)) or 1, fontsize="small")
    return Picture(
        FILE_NAME,
        f"Task accuracy and macro-F1 on {rows_description(summary)} after each round; the dotted line is "
        "the base model before training. Lines: each site alone and centralized, after the optimizer steps one site makes in that "
        "many FedAvg rounds; steps with dots: the federated global model after each round.",
        png_bytes(figure),
    )


def _table(summary: dict, settings: list[tuple[str, dict]], curves: dict) -> Table:
    rounds = sorted({r for curve in curves.values() for r, *_ in curve})
    rows = [(key, {r: acc for r, acc, _ in curves[key]}) for key, _ in settings if curves[key]]
    best = {}
    for r in rounds:
        shown = [round(values[r], DECIMALS) for _, values in rows if values.get(r) is not None]
        best[r] = max(shown) if shown else None
    table_rows = []
    entries = dict(settings)
    for key, values in rows:
        cells = [Cell(display_name(key, entries.get(key)))]
        for r in rounds:
            value = values.get(r)
            text = MISSING if value is None else f"{value:.{DECIMALS}f}"
            cells.append(Cell(text, best=value is not None and round(value, DECIMALS) == best[r], numeric=True))
        table_rows.append(cells)
    return Table(
        ["Setting", *(f"Round {r}" for r in rounds)],
        table_rows,
        caption=f"Task accuracy on {rows_description(summary)} after each round (round 0: before training; "
        "sites alone and centralized: the same optimizer-step budget). Best per round in bold.",
    )
