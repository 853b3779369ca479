"""The results table as the CLI prints it: row order, best marks, gaps."""

from __future__ import annotations

import pytest

from fedllm.errors import FedllmError
from fedllm.report import format_table_text, results_table

METRICS = ["hellaswag/acc", "hellaswag/acc_norm", "piqa/acc", "piqa/acc_norm", "winogrande/acc", "mean"]


def _eval(value: float, stderr="N/A") -> dict:
    return {m: {"value": value, "stderr": stderr} for m in METRICS}


def _summary() -> dict:
    # Recorded out of order on purpose: the table must still read base, sites, centralized, FedAvg.
    return {
        "name": "order",
        "sites": ["b_site", "a_site"],
        "settings": {
            "fedavg": {"kind": "federated", "val_loss": 4.9001, "eval": _eval(0.3004, 0.01)},
            "site:a_site": {"kind": "site", "val_loss": 5.5, "eval": _eval(0.2996)},
            "centralized": {"kind": "centralized", "val_loss": 4.9004},
            "base": {"kind": "base", "val_loss": 7.0, "eval": _eval(0.25)},
            "site:b_site": {"kind": "site", "val_loss": None, "eval": _eval(0.28)},
        },
    }


def test_rows_follow_the_seed_layout_and_ties_at_three_decimals_are_all_best():
    rows = results_table(_summary())

    assert [r["name"] for r in rows] == ["Base", "b_site", "a_site", "Centralized", "FedAvg"]
    by_name = {r["name"]: r["cells"] for r in rows}
    # 0.3004 and 0.2996 both show as 0.300: both are marked best.
    assert [n for n, c in by_name.items() if c["piqa/acc"]["best"]] == ["a_site", "FedAvg"]
    # Val loss: lower is better; 4.9001 and 4.9004 tie at 4.900; a missing loss is never best.
    assert [n for n, c in by_name.items() if c["val_loss"]["best"]] == ["Centralized", "FedAvg"]
    assert by_name["b_site"]["val_loss"] == {"value": None, "stderr": None, "best": False}
    # Centralized has no eval: no value, never best. lm-eval's "N/A" stderr reads as none.
    assert by_name["Centralized"]["mean"] == {"value": None, "stderr": None, "best": False}
    assert by_name["a_site"]["mean"]["stderr"] is None and by_name["FedAvg"]["mean"]["stderr"] == 0.01


def test_terminal_table_has_one_aligned_line_per_setting():
    lines = format_table_text(_summary()).splitlines()

    names = ["Base", "b_site", "a_site", "Centralized", "FedAvg"]
    setting_lines = [line for line in lines if line.split(" ")[0] in names]
    assert [line.split()[0] for line in setting_lines] == names
    assert lines[0].split()[:2] == ["Setting", "H"] and lines[0].endswith("Val loss")
    # Right-aligned numbers: every value ends in its header's last column, the best mark just after.
    assert {len(line.rstrip("*")) for line in setting_lines} == {len(lines[0]) - 1}
    assert setting_lines[3].split() == ["Centralized", "–", "–", "–", "–", "–", "–", "4.900*"]
    assert setting_lines[4].split()[1] == "0.300*" and setting_lines[2].split()[1] == "0.300*"


def test_a_malformed_score_names_the_setting_and_metric():
    summary = _summary()
    summary["settings"]["base"]["eval"]["piqa/acc"] = {"value": "high", "stderr": 0.1}
    with pytest.raises(FedllmError, match=r"settings\.base\.eval\.piqa/acc\.value: expected a number"):
        results_table(summary)
