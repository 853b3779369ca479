"""`fedllm report RUN_DIR` on a hand-built run: the files a user opens, and what they show."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from fedllm.data.records import Example
from fedllm.data.summary import partition_summary, write_summary
from fedllm.errors import FedllmError
from fedllm.report import format_table_text, write_report

SITES = ["dolly", "oasst1", "medical_meadow"]
METRICS = ["hellaswag/acc", "hellaswag/acc_norm", "piqa/acc", "piqa/acc_norm", "winogrande/acc"]
# The seed's headline numbers (E1), with the demo's sites in place of Alpaca/Dolly/OASST1.
SCORES = {
    "base": [0.357, 0.439, 0.683, 0.689, 0.537],
    "site:dolly": [0.372, 0.451, 0.675, 0.687, 0.550],
    "site:oasst1": [0.376, 0.474, 0.671, 0.667, 0.529],
    "site:medical_meadow": [0.370, 0.452, 0.657, 0.655, 0.506],
    "centralized": [0.370, 0.453, 0.685, 0.690, 0.548],
    "fedavg": [0.377, 0.469, 0.688, 0.687, 0.560],
}
VAL_LOSS = {"base": 7.1, "site:dolly": 5.2, "site:oasst1": 5.4, "site:medical_meadow": 5.9, "centralized": 4.95, "fedavg": 4.9}
ROW_NAMES = ["Base", "dolly", "oasst1", "medical_meadow", "Centralized", "FedAvg"]
PARAMETERS = 1_234_567
ROUNDS, STEPS_PER_ROUND = 3, 20


def _eval(scores: list[float]) -> dict:
    entries = {m: {"value": v, "stderr": 0.004} for m, v in zip(METRICS, scores)}
    entries["mean"] = {"value": sum(scores) / len(scores), "stderr": 0.002}
    return entries


def _smooth_curve(start: float, end: float, steps: int) -> list[list[float]]:
    return [[s, end + (start - end) * np.exp(-s / 15)] for s in range(0, steps + 1, 5)]


def _write_run(run_dir: Path, with_eval: bool = True) -> dict:
    settings: dict = {"base": {"kind": "base", "model_dir": "models/base", "adapter_dir": None, "val_loss": VAL_LOSS["base"]}}
    total_steps = ROUNDS * STEPS_PER_ROUND
    for key in ["site:dolly", "site:oasst1", "site:medical_meadow", "centralized"]:
        settings[key] = {
            "kind": "centralized" if key == "centralized" else "site",
            "model_dir": "models/base", "adapter_dir": f"models/{key.replace(':', '-')}",
            "val_loss": VAL_LOSS[key], "val_loss_curve": _smooth_curve(7.1, VAL_LOSS[key], total_steps),
            "train_tokens_per_s": 5321.0, "train_seconds": 12.3, "steps": total_steps,
        }
        if key.startswith("site:"):
            settings[key]["site"] = key[5:]
    fed_losses = [7.1, 5.9, 5.3, 4.9]
    settings["fedavg"] = {
        "kind": "federated", "model_dir": "models/base", "adapter_dir": "models/fedavg", "val_loss": 4.9,
        "val_loss_curve": [[r * STEPS_PER_ROUND, loss] for r, loss in enumerate(fed_losses)],
        "train_tokens_per_s": 5000.0,
        "rounds": [{"round": r, "seconds": s, "val_loss": fed_losses[r]} for r, s in [(1, 8.2), (2, 7.9), (3, 8.0)]],
        "time_per_round_s": [8.2, 7.9, 8.0],
        "bytes_per_round": {
            site: [{"round": r, "sent": 32768 * (i + 1), "received": 40000} for r in range(1, ROUNDS + 1)]
            for i, site in enumerate(SITES)
        },
        "job_seconds": 40.1,
    }
    if with_eval:
        for key, scores in SCORES.items():
            settings[key]["eval"] = _eval(scores)

    site_labels = {  # site -> split -> label -> records
        "dolly": {"train": {"open_qa": 40, "summarization": 8}, "val": {"open_qa": 5, "summarization": 1}},
        "oasst1": {"train": {"assistant": 30}, "val": {"assistant": 4}},
        "medical_meadow": {"train": {"wikidoc": 24}, "val": {"wikidoc": 3}},
    }
    site_splits = {
        site: {split: [Example("q", "a", label=label, source=site) for label, n in labels.items() for _ in range(n)]
               for split, labels in splits.items()}
        for site, splits in site_labels.items()
    }
    # The partition step's own writer, so the report is tested against the real file layout.
    write_summary(partition_summary(site_splits), run_dir / "data/partition_summary.json",
                  run_dir / "data/partition_summary.png")

    summary = {
        "name": "demo", "config": "config.yaml",
        "model": {"source": "tiny", "description": "tiny llama, 2 layers x 128 hidden, random init",
                  "parameters": PARAMETERS, "trainable_parameters": 8192},
        "method": "lora", "sites": SITES,
        "partition": {"dir": "data", "summary_json": "data/partition_summary.json", "chart_png": "data/partition_summary.png"},
        "rounds": ROUNDS, "steps_per_round": STEPS_PER_ROUND, "settings": settings, "eval": None,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


class _Tables(HTMLParser):
    """Each <table> as rows of (cell text, bold?) pairs."""

    def __init__(self):
        super().__init__()
        self.tables: list[list[list[tuple[str, bool]]]] = []
        self._cell: list[str] | None = None
        self._bold = False

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag == "td":
            self._cell, self._bold = [], False
        elif tag == "strong" and self._cell is not None:
            self._bold = True
        elif tag == "small" and self._cell is not None:
            self._cell.append(" ")

    def handle_endtag(self, tag):
        if tag == "td":
            self.tables[-1][-1].append(("".join(self._cell).strip(), self._bold))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _expected_best() -> list[set[str]]:
    """Per column (5 metrics, Mean, Val loss), the set of rows holding the best value at 3 decimals."""
    keys = list(SCORES)
    columns = [{k: round(SCORES[k][i], 3) for k in keys} for i in range(5)]
    columns.append({k: round(sum(SCORES[k]) / 5, 3) for k in keys})
    best = [{k for k, v in col.items() if v == max(col.values())} for col in columns]
    losses = {k: round(VAL_LOSS[k], 3) for k in keys}
    best.append({k for k, v in losses.items() if v == min(losses.values())})
    return best


def _assert_real_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    pixels = (matplotlib.image.imread(path) * 255).astype(np.uint8)  # H × W × RGB(A), floats in [0, 1]
    rgba = np.zeros(pixels.shape[:2] + (4,), np.uint8)
    rgba[..., : pixels.shape[-1]] = pixels
    colours = np.unique(rgba.view(np.uint32))  # one 32-bit number per pixel: fast to count
    assert len(colours) > 10, f"{path.name} looks blank ({len(colours)} colours)"


def test_report_files_table_and_pictures(tmp_path):
    summary = _write_run(tmp_path)

    index = write_report(tmp_path)

    report = tmp_path / "report"
    assert index == report / "index.html"
    page = index.read_text()
    # Offline: nothing fetched from the network, no scripts or stylesheets at all.
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page)
    assert "url(" not in page and "<script" not in page and "<link" not in page
    assert "demo" in page and "lora" in page and "tiny llama, 2 layers x 128 hidden" in page
    assert "1,234,567" in page and "8,192" in page
    assert "near chance" in page  # the tiny-model caveat

    # The results table: 6 settings × (5 scores + Mean + Val loss), best per column in bold.
    results = _Tables()
    results.feed(page)
    table = [row for row in results.tables[0] if row]
    assert [row[0][0] for row in table] == ROW_NAMES
    keys = list(SCORES)
    for row, key in zip(table, keys):
        values = [float(text.split()[0]) for text, _ in row[1:]]
        assert values[:5] == pytest.approx(SCORES[key], abs=5e-4)
        assert values[5] == pytest.approx(sum(SCORES[key]) / 5, abs=5e-4)
        assert values[6] == pytest.approx(VAL_LOSS[key], abs=5e-4)
        assert all("± 0.00" in text for text, _ in row[1:7])  # stderr shown beside each score
    bold = [{keys[r] for r, row in enumerate(table) if row[1 + c][1]} for c in range(7)]
    assert bold == _expected_best()
    assert bold[0] == {"fedavg"} and bold[6] == {"fedavg"} and bold[3] == {"centralized"}

    # The pictures: written beside the page, real non-blank PNGs, and embedded in the page.
    pictures = sorted(p.name for p in report.glob("*.png"))
    assert pictures == ["communication_fedavg.png", "partition.png", "time_per_round_fedavg.png", "val_loss_curves.png"]
    for name in pictures:
        _assert_real_png(report / name)
        assert f'href="{name}"' in page
    assert page.count('src="data:image/png;base64,') == len(pictures)

    # Partition table from the partition summary: site × label with totals.
    partition = next(t for t in results.tables if any(r and r[0][0] == "All sites" for r in t))
    by_site = {row[0][0]: [text for text, _ in row[1:]] for row in partition if row}
    # labels sorted: assistant, open_qa, summarization, wikidoc; then Total
    assert by_site["dolly"] == ["0", "45", "9", "0", "54"]
    assert by_site["All sites"] == ["34", "45", "9", "27", "115"]
    split_table = results.tables[results.tables.index(partition) + 1]
    assert [[text for text, _ in row] for row in split_table if row][0] == ["dolly", "48", "6", "0"]

    # Communication: human units and the share of the fp32 model (1,234,567 × 4 bytes = 4.94 MB).
    assert "4.9 MB" in page and "32.8 KB" in page and "40.0 KB" in page
    assert f"{32768 / (PARAMETERS * 4):.2%}" in page  # dolly's sent bytes per round vs. the full model
    # Time: per-round seconds and the job time.
    assert "8.2" in page and "40.1 s" in page and "5,321" in page

    # report.md holds the same table, best in bold.
    markdown = (report / "report.md").read_text()
    md_rows = [line for line in markdown.splitlines() if line.startswith("| ") and line.split("|")[1].strip() in ROW_NAMES]
    md_rows = md_rows[: len(ROW_NAMES)]
    assert [line.split("|")[1].strip() for line in md_rows] == ROW_NAMES
    md_bold = [{keys[r] for r, line in enumerate(md_rows) if line.split("|")[2 + c].strip().startswith("**")} for c in range(7)]
    assert md_bold == _expected_best()
    assert "](val_loss_curves.png)" in markdown

    # The terminal table: one line per setting.
    text = format_table_text(summary).splitlines()
    assert sum(1 for line in text if line.split("  ")[0].strip() in ROW_NAMES) == len(ROW_NAMES)
    fedavg_line = next(line for line in text if line.startswith("FedAvg"))
    assert "0.377*" in fedavg_line and "4.900*" in fedavg_line


def test_report_without_eval_or_optional_fields_says_not_recorded(tmp_path):
    summary = _write_run(tmp_path, with_eval=False)
    del summary["settings"]["fedavg"]["bytes_per_round"]
    del summary["partition"]
    (tmp_path / "summary.json").write_text(json.dumps(summary))

    page = write_report(tmp_path).read_text()

    results = _Tables()
    results.feed(page)
    table = [row for row in results.tables[0] if row]
    assert all(text == "–" for row in table for text, _ in row[1:7])
    assert [row[7][1] for row in table] == [False, False, False, False, False, True]  # val loss still ranked
    assert "Zero-shot evaluation: not recorded" in page
    assert "Bytes sent and received per site and round: not recorded" in page
    assert "Partition chart: not recorded" in page
    assert not (tmp_path / "report" / "communication_fedavg.png").exists()


def test_missing_summary_names_the_path(tmp_path):
    with pytest.raises(FedllmError, match=re.escape(str(tmp_path / "summary.json"))):
        write_report(tmp_path)
    assert not (tmp_path / "report").exists()


def test_malformed_curve_names_the_field(tmp_path):
    summary = _write_run(tmp_path)
    summary["settings"]["fedavg"]["val_loss_curve"][2] = [40]
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(FedllmError, match=r"settings\.fedavg\.val_loss_curve\[2\]"):
        write_report(tmp_path)


# The task's own metric: every setting scored on the same 30 rows; FedAvg and a variant compared.
CHOICES = ["negative", "neutral", "positive"]
TASK_ROWS = 30
# How many of the 30 rows each setting gets right (the rest predicted one label off).
TASK_RIGHT = {"base": 9, "site:dolly": 21, "site:oasst1": 20, "site:medical_meadow": 15,
              "centralized": 28, "fedavg": 27, "fedavg:product_svd": 28}
TASK_NAMES = [*ROW_NAMES, "FedAvg (product SVD)"]


def _add_task(run_dir: Path, summary: dict) -> dict:
    from fedllm.evaluate.bootstrap import compare_settings
    from fedllm.evaluate.task_metric import accuracy, macro_f1

    settings = summary["settings"]
    settings["fedavg:product_svd"] = {**settings["fedavg"], "adapter_dir": "models/fedavg-product_svd",
                                      "val_loss": 4.95}
    gold = [i % 3 for i in range(TASK_ROWS)]
    (run_dir / "tasks").mkdir()
    for key, right in TASK_RIGHT.items():
        predicted = [g if i < right else (g + 1) % 3 for i, g in enumerate(gold)]
        path = f"tasks/{key.replace(':', '-')}.json"
        (run_dir / path).write_text(json.dumps({
            "setting": key, "choices": CHOICES, "gold": gold, "predicted": predicted,
            "origins": [f"data/phrasebank/test.jsonl:{i + 1}" for i in range(TASK_ROWS)]}))
        final = accuracy(gold, predicted)
        curve_rounds = [0] if key == "base" else list(range(ROUNDS + 1))
        settings[key]["task"] = {
            "metric": "label_choice", "split": "test", "choices": CHOICES, "n": TASK_ROWS,
            "accuracy": final, "macro_f1": macro_f1(gold, predicted, 3),
            "curve": [{"round": r, "step": r * STEPS_PER_ROUND, "accuracy": 0.3 + (final - 0.3) * r / ROUNDS,
                       "macro_f1": 0.2 + (final - 0.3) * r / ROUNDS} for r in curve_rounds],
            "predictions": path,
        }
    summary["comparisons"] = compare_settings(run_dir, settings)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def test_report_with_the_task_metric_a_variant_and_comparisons(tmp_path):
    summary = _add_task(tmp_path, _write_run(tmp_path))

    page = write_report(tmp_path).read_text()

    tables = _Tables()
    tables.feed(page)
    results = [row for row in tables.tables[0] if row]
    assert [row[0][0] for row in results] == TASK_NAMES  # the variant right after FedAvg
    # Columns: 5 scores, Mean, Val loss, then Task acc and Task F1, best (28 of 30 right) in bold.
    task_acc = {row[0][0]: (row[8][0], row[8][1]) for row in results}
    assert task_acc["Centralized"] == ("0.933", True) and task_acc["FedAvg (product SVD)"] == ("0.933", True)
    assert task_acc["FedAvg"] == ("0.900", False) and task_acc["Base"] == ("0.300", False)
    assert [row[0][0] for row in results if row[9][1]] == ["Centralized", "FedAvg (product SVD)"]
    assert "<th>Task acc</th><th>Task F1</th>" in page
    assert "accuracy and macro-F1 on the 30 test rows (choices: negative / neutral / positive)" in page

    # Is the difference real? One row per comparison: 3 sites + centralized for FedAvg, and FedAvg too for the variant.
    compared = next(t for t in tables.tables if len(t) > 1 and t[1][0][0] == "FedAvg" and t[1][2][0] == "accuracy")
    compared = [[text for text, _ in row] for row in compared if row]
    assert len(compared) == (4 + 5) * 2 == len(summary["comparisons"])
    assert [row[:3] for row in compared[:2]] == [["FedAvg", "dolly", "accuracy"], ["FedAvg", "dolly", "macro-F1"]]
    first = summary["comparisons"][0]
    lo, hi = first["ci95"]
    assert compared[0][3:] == ["+0.200", f"[{lo:+.3f}, {hi:+.3f}]", "better"]  # 27 vs 21 right of 30
    by_pair = {(row[0], row[1], row[2]): row for row in compared}
    assert by_pair[("FedAvg", "Centralized", "accuracy")][3] == "-0.033"
    assert by_pair[("FedAvg", "Centralized", "accuracy")][5] == "within noise"
    assert by_pair[("FedAvg (product SVD)", "FedAvg", "accuracy")][3] == "+0.033"
    assert "Paired bootstrap over the same 30 test rows, 2000 resamples" in page

    # Task metric per round: a chart and one row per setting, rounds 0..3.
    report = tmp_path / "report"
    _assert_real_png(report / "task_curves.png")
    assert 'href="task_curves.png"' in page
    per_round = next(t for t in tables.tables if len(t) > 1 and len(t[1]) == ROUNDS + 2)
    per_round = {row[0][0]: [text for text, _ in row[1:]] for row in per_round if row}
    assert per_round["Base"] == ["0.300", "–", "–", "–"]
    assert per_round["FedAvg"] == ["0.300", "0.500", "0.700", "0.900"]
    assert "<th>Round 0</th>" in page

    # report.md has the same sections; the terminal table the task columns and the comparisons.
    markdown = (report / "report.md").read_text()
    assert "## Is the difference real?" in markdown and "## Task metric per round" in markdown
    assert "| FedAvg | dolly | accuracy | +0.200 |" in markdown
    text = format_table_text(summary)
    assert text.splitlines()[0].endswith("Task acc  Task F1")
    variant_line = next(line for line in text.splitlines() if line.startswith("FedAvg (product SVD)"))
    assert variant_line.split()[-2:] == ["0.933*", f"{summary['settings']['fedavg:product_svd']['task']['macro_f1']:.3f}*"]
    assert "Is the difference real?" in text
    assert re.search(r"^FedAvg\s+vs\s+dolly\s+accuracy\s+\+0\.200\s+\[[-+.0-9]+, [-+.0-9]+\]\s+better$", text, re.M)


def test_report_without_task_metric_says_how_to_get_it(tmp_path):
    _write_run(tmp_path)
    page = write_report(tmp_path).read_text()
    assert "Task acc" not in page
    assert page.count("Task metric: not recorded in this run (set evaluation.task.metric: label_choice") == 2
    assert not (tmp_path / "report" / "task_curves.png").exists()
