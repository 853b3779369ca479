"""The report's opening: which run, which method, which model produced the numbers."""

from __future__ import annotations

from fedllm.federation.algorithms import algorithm_label
from fedllm.report.document import Facts, Paragraph, Section
from fedllm.report.run_summary import number

TINY_MODEL_CAVEAT = (
    "The numbers come from a tiny randomly initialised model: its zero-shot scores are near chance "
    "(HellaSwag 0.25, PIQA 0.50, WinoGrande 0.50), so the table shows that the pipeline works end to end, "
    "not the quality of a model."
)


def run_title(summary: dict) -> str:
    return f"fedllm run: {summary.get('name') or 'unnamed'}"


def header_section(summary: dict, source: str) -> Section:
    model = summary.get("model") or {}
    parameters = number(model.get("parameters"), f"{source}: model.parameters")
    trainable = number(model.get("trainable_parameters"), f"{source}: model.trainable_parameters")

    facts = [
        ("Run", str(summary.get("name") or "unnamed")),
        ("Method", str(summary.get("method") or "not recorded")),
        ("Model", str(model.get("description") or model.get("source") or "not recorded")),
        ("Parameters", f"{_count(parameters)}; trainable: {_count(trainable)}{_share(trainable, parameters)}"),
    ]
    sites = summary.get("sites") or []
    if sites:
        facts.append(("Sites", ", ".join(str(s) for s in sites)))
    if summary.get("rounds") is not None:
        steps = summary.get("steps_per_round", "?")
        if isinstance(steps, dict):  # per site: one number when they agree
            counts = sorted(set(steps.values()))
            steps = counts[0] if len(counts) == 1 else ", ".join(f"{site} {n}" for site, n in steps.items())
        facts.append(("Federation", f"{summary['rounds']} rounds × {steps} steps per site per round"))
    federated = (summary.get("settings") or {}).get("fedavg")
    if isinstance(federated, dict):
        # the setting's key stays "fedavg" (summary.json's layout); what ran is recorded in it
        facts.append(("Algorithm", algorithm_label(federated.get("algorithm"))))

    section = Section("Run", [Facts(facts)])
    if model.get("source") == "tiny":
        section.blocks.append(Paragraph(TINY_MODEL_CAVEAT, note=True))
    return section


def _count(n: float | None) -> str:
    return "not recorded" if n is None else f"{int(n):,}"


def _share(trainable: float | None, parameters: float | None) -> str:
    if trainable is None or not parameters:
        return ""
    return f" ({trainable / parameters:.2%} of the model)"
