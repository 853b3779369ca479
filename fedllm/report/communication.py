"""Bytes on the wire: what each site sent and received in each round of a federation.

Compared with the full model in fp32 (parameters × 4 bytes) so a reader sees what the
method saves: a LoRA adapter travels at a small fraction of the model, full SFT at
about 100% per direction (less with quantized transfer).
"""

from __future__ import annotations

import numpy as np

from fedllm.errors import FedllmError
from fedllm.report.charts import byte_unit, human_bytes, new_figure, png_bytes
from fedllm.report.document import Cell, Paragraph, Picture, Section, Table, not_recorded
from fedllm.report.run_summary import display_name, is_federated, number, ordered_settings

BYTES_PER_FP32_PARAMETER = 4


def communication_section(summary: dict, source: str) -> Section:
    section = Section("Communication")
    federated = [(k, s) for k, s in ordered_settings(summary) if is_federated(k, s)]
    parameters = number((summary.get("model") or {}).get("parameters"), f"{source}: model.parameters")
    full_model = parameters * BYTES_PER_FP32_PARAMETER if parameters else None
    if full_model:
        section.blocks.append(Paragraph(
            f"Full model in fp32: {human_bytes(full_model)} ({int(parameters):,} parameters × 4 bytes)."
        ))
    else:
        section.blocks.append(not_recorded("Model size (parameters)"))

    recorded = False
    for key, setting in federated:
        traffic = site_traffic(setting.get("bytes_per_round"), f"{source}: settings.{key}.bytes_per_round")
        if not traffic:
            continue
        recorded = True
        section.blocks.append(_chart(key, traffic))
        section.blocks.append(_table(key, traffic, full_model))
        section.blocks.append(Paragraph(_mean_line(traffic, full_model)))
    if not recorded:
        section.blocks.append(not_recorded("Bytes sent and received per site and round"))

    memory = [(key, rows) for key, setting in federated
              if (rows := server_memory(setting.get("rounds"), f"{source}: settings.{key}.rounds"))]
    for key, rows in memory:
        section.blocks.append(_memory_table(key, rows))
    if not memory:
        section.blocks.append(not_recorded("The server's peak memory per round"))
    return section


def server_memory(rounds, where: str) -> list[tuple[int, float, float | None, float | None]]:
    """``[(round, server peak RSS, RSS before the round or None, global model bytes or None)]``
    from a setting's ``rounds`` (fedllm.federation.persistor records them); empty when not recorded."""
    if not isinstance(rounds, list):
        return []
    rows = []
    for i, entry in enumerate(rounds):
        if not isinstance(entry, dict) or entry.get("server_peak_rss") is None:
            continue
        at = f"{where}[{i}]"
        rows.append((int(number(entry.get("round"), f"{at}.round") or i + 1),
                     number(entry["server_peak_rss"], f"{at}.server_peak_rss"),
                     number(entry.get("server_rss_before_round"), f"{at}.server_rss_before_round"),
                     number(entry.get("bytes"), f"{at}.bytes")))
    return rows


def _memory_table(setting_key: str, rows: list) -> Table:
    table_rows = []
    for r, peak, before, model in rows:
        grew = peak - before if before is not None else None
        table_rows.append([
            Cell(str(r), numeric=True), Cell(human_bytes(peak), numeric=True),
            Cell(human_bytes(grew) if grew is not None else "–", numeric=True),
            Cell(human_bytes(model) if model else "–", numeric=True),
            Cell(f"{grew / model:.2f}×" if grew is not None and model else "–", numeric=True),
        ])
    return Table(["Round", "Server peak memory", "Above its start", "Global model", "Above ÷ model"], table_rows,
                 caption=f"{display_name(setting_key)}: the server process's peak resident memory per round "
                         "(in the simulator the process also runs the simulator itself); a round's growth above "
                         "what the process held when it began (the first round: from the job's start).")


def site_traffic(per_site, where: str) -> dict[str, list[tuple[int, float, float]]]:
    """``{site: [(round, sent, received), ...]}`` sorted by round; empty when not recorded."""
    if per_site is None:
        return {}
    if not isinstance(per_site, dict):
        raise FedllmError(f"{where}: expected a mapping of site to a list of {{round, sent, received}}")
    traffic = {}
    for site, rounds in per_site.items():
        if not isinstance(rounds, list):
            raise FedllmError(f"{where}.{site}: expected a list of {{round, sent, received}}")
        rows = []
        for i, entry in enumerate(rounds):
            at = f"{where}.{site}[{i}]"
            round_number = number(entry.get("round"), f"{at}.round") if isinstance(entry, dict) else None
            if round_number is None:
                raise FedllmError(f"{at}: expected {{round: n, sent: bytes, received: bytes}}, got {entry!r}")
            rows.append((int(round_number),
                         number(entry.get("sent"), f"{at}.sent") or 0.0,
                         number(entry.get("received"), f"{at}.received") or 0.0))
        traffic[str(site)] = sorted(rows)
    return traffic


def _chart(setting_key: str, traffic: dict) -> Picture:
    rounds = sorted({r for rows in traffic.values() for r, _, _ in rows})
    largest = max(max(sent, received) for rows in traffic.values() for _, sent, received in rows)
    unit, size = byte_unit(largest)
    figure = new_figure(width=9.0, height=3.8)
    sent_axes, received_axes = figure.subplots(1, 2, sharey=True)
    width = 0.8 / len(traffic)
    x = np.arange(len(rounds))
    for i, (site, rows) in enumerate(traffic.items()):
        by_round = {r: (sent, received) for r, sent, received in rows}
        offset = (i - (len(traffic) - 1) / 2) * width
        for axes, direction in ((sent_axes, 0), (received_axes, 1)):
            heights = [by_round.get(r, (0.0, 0.0))[direction] / size for r in rounds]
            axes.bar(x + offset, heights, width, label=site, color=f"C{i}")
    for axes, title in ((sent_axes, "sent by each site"), (received_axes, "received by each site")):
        axes.set_title(title)
        axes.set_xticks(x, [str(r) for r in rounds])
        axes.set_xlabel("round")
        axes.grid(True, axis="y", alpha=0.3)
    sent_axes.set_ylabel(unit)
    figure.legend(*sent_axes.get_legend_handles_labels(), loc="outside right upper", fontsize="small", title="site")
    figure.suptitle(f"{display_name(setting_key)}: bytes per site and round")
    return Picture(f"communication_{_slug(setting_key)}.png",
                   f"{display_name(setting_key)}: bytes each site sent to and received from the server per round.",
                   png_bytes(figure))


def _table(setting_key: str, traffic: dict, full_model: float | None) -> Table:
    columns = ["Site", "Round", "Sent", "Received"]
    if full_model:
        columns += ["Sent ÷ fp32 model", "Received ÷ fp32 model"]
    rows = []
    for site, site_rows in traffic.items():
        for r, sent, received in site_rows:
            row = [Cell(site), Cell(str(r), numeric=True),
                   Cell(human_bytes(sent), numeric=True), Cell(human_bytes(received), numeric=True)]
            if full_model:
                row += [Cell(_ratio(n / full_model), numeric=True) for n in (sent, received)]
            rows.append(row)
    return Table(columns, rows, caption=f"{display_name(setting_key)}: bytes per site and round.")


def _mean_line(traffic: dict, full_model: float | None) -> str:
    parts = []
    for site, rows in traffic.items():
        mean_sent = sum(sent for _, sent, _ in rows) / len(rows)
        share = f" ({_ratio(mean_sent / full_model)} of the fp32 model)" if full_model else ""
        parts.append(f"{site} {human_bytes(mean_sent)}{share}")
    return "Mean sent per round: " + "; ".join(parts) + "."


def _ratio(r: float) -> str:
    percent = r * 100
    if percent >= 10:
        return f"{percent:.0f}%"
    if percent >= 0.01:
        return f"{percent:.2f}%"
    return "< 0.01%" if percent > 0 else "0%"


def _slug(setting_key: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in setting_key)
