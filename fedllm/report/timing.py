"""Time: wall time per federated round, whole-job time, and training throughput per setting."""

from __future__ import annotations

from fedllm.errors import FedllmError
from fedllm.report.charts import new_figure, png_bytes
from fedllm.report.document import Cell, Paragraph, Picture, Section, Table, not_recorded
from fedllm.report.run_summary import display_name, is_federated, number, ordered_settings

MISSING = "–"


def timing_section(summary: dict, source: str) -> Section:
    section = Section("Time")
    settings = ordered_settings(summary)
    rounds_recorded = False
    for key, setting in settings:
        if not is_federated(key, setting):
            continue
        where = f"{source}: settings.{key}"
        rounds = round_times(setting, where)
        if rounds:
            rounds_recorded = True
            section.blocks.append(_chart(key, rounds))
            section.blocks.append(_round_table(key, rounds))
        job_seconds = number(setting.get("job_seconds"), f"{where}.job_seconds")
        if job_seconds is not None:
            in_rounds = sum(seconds for _, seconds, _ in rounds)
            overhead = f"; {job_seconds - in_rounds:.1f} s outside rounds (start-up, shutdown)" if rounds else ""
            section.blocks.append(Paragraph(f"{display_name(key, setting)} job: {job_seconds:.1f} s in all{overhead}."))
    if not rounds_recorded:
        section.blocks.append(not_recorded("Time per round"))

    throughput = _throughput_table(settings, source)
    section.blocks.append(throughput if throughput is not None else not_recorded("Training time and tokens/s"))
    return section


def round_times(setting: dict, where: str) -> list[tuple[int, float, float | None]]:
    """``[(round, seconds, val_loss after the round or None), ...]`` from ``rounds``,
    else from ``time_per_round_s`` (rounds numbered from 1); empty when not recorded."""
    rounds = setting.get("rounds")
    if isinstance(rounds, list) and rounds:
        rows = []
        for i, entry in enumerate(rounds):
            at = f"{where}.rounds[{i}]"
            if not isinstance(entry, dict):
                raise FedllmError(f"{at}: expected {{\"round\": n, \"seconds\": s, \"val_loss\": x}}, got {entry!r}")
            seconds = number(entry.get("seconds"), f"{at}.seconds")
            if seconds is None:
                continue
            round_number = number(entry.get("round"), f"{at}.round")
            rows.append((int(round_number) if round_number is not None else i + 1, seconds,
                         number(entry.get("val_loss"), f"{at}.val_loss")))
        if rows:
            return sorted(rows)
    per_round = setting.get("time_per_round_s")
    if per_round is None:
        return []
    if not isinstance(per_round, list):
        raise FedllmError(f"{where}.time_per_round_s: expected a list of seconds, one per round")
    times = [number(s, f"{where}.time_per_round_s[{i}]") for i, s in enumerate(per_round)]
    return [(i + 1, s, None) for i, s in enumerate(times) if s is not None]


def _chart(setting_key: str, rounds: list) -> Picture:
    figure = new_figure(width=6.5, height=3.4)
    axes = figure.add_subplot()
    numbers = [r for r, _, _ in rounds]
    seconds = [s for _, s, _ in rounds]
    axes.bar([str(r) for r in numbers], seconds, color="tab:red", width=0.6)
    axes.axhline(sum(seconds) / len(seconds), color="black", linestyle="--", linewidth=1,
                 label=f"mean {sum(seconds) / len(seconds):.1f} s")
    axes.set_xlabel("round")
    axes.set_ylabel("wall time (s)")
    axes.set_title(f"{display_name(setting_key)}: time per round")
    axes.grid(True, axis="y", alpha=0.3)
    axes.legend(fontsize="small")
    slug = "".join(ch if ch.isalnum() else "-" for ch in setting_key)
    return Picture(f"time_per_round_{slug}.png",
                   f"{display_name(setting_key)}: wall time of each round (sites train, then the server aggregates).",
                   png_bytes(figure))


def _round_table(setting_key: str, rounds: list) -> Table:
    rows = [
        [Cell(str(r), numeric=True), Cell(f"{seconds:.1f}", numeric=True),
         Cell(f"{loss:.3f}" if loss is not None else MISSING, numeric=True)]
        for r, seconds, loss in rounds
    ]
    return Table(["Round", "Seconds", "Val loss after round"], rows,
                 caption=f"{display_name(setting_key)}: time per round and the global model's validation loss.")


def _throughput_table(settings: list[tuple[str, dict]], source: str) -> Table | None:
    rows = []
    for key, setting in settings:
        where = f"{source}: settings.{key}"
        seconds = number(setting.get("train_seconds"), f"{where}.train_seconds")
        steps = number(setting.get("steps"), f"{where}.steps")
        tokens_per_s = number(setting.get("train_tokens_per_s"), f"{where}.train_tokens_per_s")
        job = number(setting.get("job_seconds"), f"{where}.job_seconds")
        if seconds is None and tokens_per_s is None and job is None:
            continue  # the base model is not trained
        rows.append([
            Cell(display_name(key, setting)),
            Cell(f"{seconds:.1f}" if seconds is not None else MISSING, numeric=True),
            Cell(f"{int(steps):,}" if steps is not None else MISSING, numeric=True),
            Cell(f"{tokens_per_s:,.0f}" if tokens_per_s is not None else MISSING, numeric=True),
            Cell(f"{job:.1f}" if job is not None else MISSING, numeric=True),
        ])
    if not rows:
        return None
    return Table(["Setting", "Train seconds", "Steps", "Train tokens/s", "Job seconds"], rows,
                 caption="Training time and throughput per setting (FedAvg: tokens/s is the mean over sites).")
