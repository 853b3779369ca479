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


def _task(accuracy: float, macro_f1: float) -> dict:
    return {"metric": "label_choice", "split": "test", "choices": ["negative", "neutral", "positive"], "n": 227,
            "accuracy": accuracy, "macro_f1": macro_f1, "curve": [], "predictions": "tasks/x.json"}


def _task_summary() -> dict:
    summary = _summary()
    settings = summary["settings"]
    # The variant is recorded first on purpose: it still reads right after FedAvg.
    summary["settings"] = {"fedavg:product_svd": {"kind": "federated", "val_loss": 4.95, "task": _task(0.8812, 0.85)},
                           **settings}
    settings = summary["settings"]
    settings["fedavg"]["task"] = _task(0.8809, 0.86)
    settings["site:a_site"]["task"] = _task(0.7, 0.6)
    settings["base"]["task"] = _task(0.27, 0.2)
    # centralized and b_site: no task entry (not scored) — shown as missing, never best.
    return summary


def test_task_columns_follow_val_loss_and_mark_the_best():
    rows = results_table(_task_summary())

    assert [r["name"] for r in rows] == ["Base", "b_site", "a_site", "Centralized", "FedAvg", "FedAvg (product SVD)"]
    by_name = {r["name"]: r["cells"] for r in rows}
    assert list(by_name["Base"])[-3:] == ["val_loss", "task/accuracy", "task/macro_f1"]
    # 0.8809 and 0.8812 both show as 0.881: both best; macro-F1 0.86 alone.
    assert [n for n, c in by_name.items() if c["task/accuracy"]["best"]] == ["FedAvg", "FedAvg (product SVD)"]
    assert [n for n, c in by_name.items() if c["task/macro_f1"]["best"]] == ["FedAvg"]
    assert by_name["Centralized"]["task/accuracy"] == {"value": None, "stderr": None, "best": False}

    lines = format_table_text(_task_summary()).splitlines()
    assert lines[0].endswith("Val loss  Task acc  Task F1")
    assert lines[7].split()[-2:] == ["0.881*", "0.850"] and lines[7].startswith("FedAvg (product SVD)")
    assert lines[5].split()[-3:] == ["4.900*", "–", "–"]  # Centralized
    assert "Task acc / Task F1: accuracy and macro-F1 on the 227 test rows (choices: negative / neutral / positive)" in lines
    # No comparisons recorded: the terminal table ends with its legend.
    assert "Is the difference real?" not in lines


def test_without_task_entries_there_are_no_task_columns():
    rows = results_table(_summary())
    assert "task/accuracy" not in rows[0]["cells"]
    assert "Task acc" not in format_table_text(_summary())


def test_comparisons_print_under_the_terminal_table():
    summary = _task_summary()
    summary["comparisons"] = [
        {"setting": "fedavg", "against": "site:a_site", "metric": "accuracy", "difference": 0.1809,
         "ci95": [0.12, 0.24], "rows": 227, "resamples": 2000, "seed": 1234},
        {"setting": "fedavg:product_svd", "against": "fedavg", "metric": "macro_f1", "difference": -0.01,
         "ci95": [-0.03, 0.0104], "rows": 227, "resamples": 2000, "seed": 1234},
        {"setting": "fedavg", "against": "centralized", "metric": "accuracy", "difference": -0.05,
         "ci95": [-0.08, -0.0004], "rows": 227, "resamples": 2000, "seed": 1234},
    ]
    lines = format_table_text(summary).splitlines()
    start = lines.index("Is the difference real?")
    assert [line.split() for line in lines[start + 1:start + 4]] == [
        ["FedAvg", "vs", "a_site", "accuracy", "+0.181", "[+0.120,", "+0.240]", "better"],
        ["FedAvg", "(product", "SVD)", "vs", "FedAvg", "macro-F1", "-0.010", "[-0.030,", "+0.010]", "within", "noise"],
        # -0.0004 rounds to 0.000 but is below 0: the verdict uses the numbers, not their rounding.
        ["FedAvg", "vs", "Centralized", "accuracy", "-0.050", "[-0.080,", "0.000]", "worse"],
    ]
    assert lines[start + 4].startswith("Paired bootstrap over the same 227 test rows, 2000 resamples")


def test_malformed_task_or_comparison_names_the_field():
    summary = _task_summary()
    summary["settings"]["fedavg"]["task"]["macro_f1"] = "0.9"
    with pytest.raises(FedllmError, match=r"settings\.fedavg\.task\.macro_f1: expected a number"):
        results_table(summary)
    summary = _task_summary()
    summary["comparisons"] = [{"setting": "fedavg", "against": "centralized", "metric": "accuracy",
                               "difference": 0.1, "ci95": [0.1]}]
    with pytest.raises(FedllmError, match=r"comparisons\[0\]\.ci95: expected \[lo, hi\]"):
        format_table_text(summary)
