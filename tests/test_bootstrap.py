"""Paired bootstrap: hand-computable intervals, a plain-loop reference, and the run-level comparisons."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest

from fedllm.errors import FedllmError
from fedllm.evaluate.bootstrap import compare_settings, paired_bootstrap
from fedllm.evaluate.task_metric import accuracy, macro_f1

CHOICES = ["negative", "neutral", "positive"]


def _percentile(values: list[float], q: float) -> float:
    """numpy's default (linear) percentile, written out."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _loop_bootstrap(gold, a, b, metric, num_classes, resamples, seed):
    """The same resampling, one resample and one row at a time, scored by task_metric."""
    index = np.random.default_rng(seed).integers(0, len(gold), size=(resamples, len(gold)))
    score = (lambda g, p: accuracy(g, p)) if metric == "accuracy" else (lambda g, p: macro_f1(g, p, num_classes))
    differences = []
    for line in index.tolist():
        g = [gold[i] for i in line]
        differences.append(score(g, [a[i] for i in line]) - score(g, [b[i] for i in line]))
    return [_percentile(differences, 2.5), _percentile(differences, 97.5)]


def _labels(n: int, seed: int) -> tuple[list[int], list[int], list[int]]:
    rng = random.Random(seed)
    gold = [rng.randrange(3) for _ in range(n)]
    # a is right 80% of the time, b 60%: a real but noisy gap.
    a = [g if rng.random() < 0.8 else rng.randrange(3) for g in gold]
    b = [g if rng.random() < 0.6 else rng.randrange(3) for g in gold]
    return gold, a, b


@pytest.mark.parametrize("metric", ["accuracy", "macro_f1"])
def test_identical_predictions_differ_by_exactly_zero(metric):
    gold, a, _ = _labels(50, 1)
    result = paired_bootstrap(gold, a, list(a), metric, 3, resamples=300, seed=7)
    assert result == {"difference": 0.0, "ci95": [0.0, 0.0], "resamples": 300, "seed": 7, "rows": 50}


def test_always_right_against_always_wrong_is_one_on_every_resample():
    gold = [0, 1, 2, 2, 1, 0, 0, 2]
    wrong = [(g + 1) % 3 for g in gold]
    result = paired_bootstrap(gold, gold, wrong, "accuracy", 3, resamples=500)
    assert result["difference"] == 1.0 and result["ci95"] == [1.0, 1.0]
    assert (result["resamples"], result["seed"], result["rows"]) == (500, 1234, 8)
    # Macro-F1 too: 1 for a perfect classifier, 0 for one never right.
    assert paired_bootstrap(gold, gold, wrong, "macro_f1", 3, resamples=500)["ci95"] == [1.0, 1.0]


@pytest.mark.parametrize("metric", ["accuracy", "macro_f1"])
def test_vectorised_resampling_matches_a_plain_loop(metric):
    gold, a, b = _labels(60, 2)
    result = paired_bootstrap(gold, a, b, metric, 3, resamples=400, seed=99)

    whole = accuracy if metric == "accuracy" else (lambda g, p: macro_f1(g, p, 3))
    assert result["difference"] == pytest.approx(whole(gold, a) - whole(gold, b), abs=1e-12)
    assert result["ci95"] == pytest.approx(_loop_bootstrap(gold, a, b, metric, 3, 400, 99), abs=1e-12)
    lo, hi = result["ci95"]
    assert lo < result["difference"] < hi
    # Another seed draws other rows: the interval moves, the point difference does not.
    other = paired_bootstrap(gold, a, b, metric, 3, resamples=400, seed=100)
    assert other["difference"] == result["difference"] and other["ci95"] != result["ci95"]


def test_macro_f1_leaves_out_classes_absent_from_a_resample():
    # Only classes 0 and 1 ever occur; class 2 (and, in many resamples, one more) is left out of the mean.
    gold = [0, 0, 0, 1, 1, 0, 1, 0]
    a = [0, 0, 1, 1, 1, 0, 1, 0]
    b = [0, 1, 1, 1, 0, 0, 0, 0]
    result = paired_bootstrap(gold, a, b, "macro_f1", 3, resamples=300, seed=5)
    assert result["difference"] == pytest.approx(macro_f1(gold, a, 3) - macro_f1(gold, b, 3))
    assert result["ci95"] == pytest.approx(_loop_bootstrap(gold, a, b, "macro_f1", 3, 300, 5), abs=1e-12)


def test_paired_intervals_are_narrower_than_the_gap_when_the_settings_mostly_agree():
    # b is a with 10 of 200 right answers turned wrong: a small gap, but every resample shows it.
    gold, a, _ = _labels(200, 3)
    right = [i for i, (g, p) in enumerate(zip(gold, a)) if g == p][:10]
    b = [(p + 1) % 3 if i in right else p for i, p in enumerate(a)]
    result = paired_bootstrap(gold, a, b, "accuracy", 3)
    assert result["difference"] == pytest.approx(0.05)
    assert 0 < result["ci95"][0] < 0.05 < result["ci95"][1]


def test_bad_inputs_name_the_problem():
    with pytest.raises(FedllmError, match="metric 'f1'"):
        paired_bootstrap([0], [0], [0], "f1", 3)
    with pytest.raises(FedllmError, match="3 gold labels, 3 and 2 predictions"):
        paired_bootstrap([0, 1, 2], [0, 1, 2], [0, 1], "accuracy", 3)
    with pytest.raises(FedllmError, match=r"predicted_b has a label outside \[0, 3\)"):
        paired_bootstrap([0, 1], [0, 1], [0, 3], "accuracy", 3)


def _write_predictions(run_dir, key, gold, predicted, origins=None):
    path = f"tasks/{key.replace(':', '-')}.json"
    (run_dir / "tasks").mkdir(exist_ok=True)
    origins = origins or [f"data/phrasebank/test.jsonl:{i + 1}" for i in range(len(gold))]
    (run_dir / path).write_text(json.dumps(
        {"setting": key, "choices": CHOICES, "gold": gold, "predicted": predicted, "origins": origins}
    ))
    return {"metric": "label_choice", "split": "test", "choices": CHOICES, "n": len(gold),
            "accuracy": accuracy(gold, predicted), "macro_f1": macro_f1(gold, predicted, 3), "predictions": path}


def _run(tmp_path):
    gold, a, b = _labels(40, 4)
    settings = {
        "base": {"kind": "base", "task": _write_predictions(tmp_path, "base", gold, [1] * 40)},
        "fedavg": {"kind": "federated", "task": _write_predictions(tmp_path, "fedavg", gold, a)},
        "site:dolly": {"kind": "site", "task": _write_predictions(tmp_path, "site:dolly", gold, b)},
        "site:oasst1": {"kind": "site", "task": _write_predictions(tmp_path, "site:oasst1", gold, gold)},
        "centralized": {"kind": "centralized", "task": _write_predictions(tmp_path, "centralized", gold, a)},
        "fedavg:product_svd": {"kind": "federated", "task": _write_predictions(tmp_path, "fedavg:product_svd", gold, b)},
    }
    return settings, gold, a, b


def test_compare_settings_pairs_every_federated_setting_with_every_baseline(tmp_path):
    settings, gold, a, b = _run(tmp_path)

    comparisons = compare_settings(tmp_path, settings)

    pairs = [(c["setting"], c["against"], c["metric"]) for c in comparisons]
    expected = [(s, o, m)
                for s, against in [("fedavg", ["site:dolly", "site:oasst1", "centralized"]),
                                   ("fedavg:product_svd", ["site:dolly", "site:oasst1", "centralized", "fedavg"])]
                for o in against for m in ["accuracy", "macro_f1"]]
    assert pairs == expected
    first = comparisons[0]
    assert set(first) == {"setting", "against", "metric", "difference", "ci95", "rows", "resamples", "seed"}
    assert first == {"setting": "fedavg", "against": "site:dolly", "metric": "accuracy",
                     **paired_bootstrap(gold, a, b, "accuracy", 3)}
    by_pair = {(c["setting"], c["against"], c["metric"]): c for c in comparisons}
    # FedAvg and centralized predicted the same labels: no difference at all.
    assert by_pair[("fedavg", "centralized", "macro_f1")]["ci95"] == [0.0, 0.0]
    # oasst1 alone is always right: FedAvg is worse on every resample.
    assert by_pair[("fedavg", "site:oasst1", "accuracy")]["ci95"][1] < 0
    # The summary must stay plain JSON.
    assert json.loads(json.dumps(comparisons)) == comparisons


def test_compare_settings_without_task_predictions_is_empty(tmp_path):
    assert compare_settings(tmp_path, {"base": {"val_loss": 7.0}, "fedavg": {"val_loss": 5.0},
                                       "site:dolly": {"val_loss": 5.5}}) == []
    settings, *_ = _run(tmp_path)
    for key in ("fedavg", "fedavg:product_svd"):
        del settings[key]["task"]
    assert compare_settings(tmp_path, settings) == []


def test_compare_settings_refuses_files_that_hold_other_rows(tmp_path):
    settings, gold, a, b = _run(tmp_path)
    origins = [f"data/phrasebank/test.jsonl:{i + 1}" for i in range(40)]
    origins[3], origins[4] = origins[4], origins[3]
    settings["site:oasst1"]["task"] = _write_predictions(tmp_path, "site:oasst1", gold, gold, origins)
    message = re.escape(f"{tmp_path / 'tasks/site-oasst1.json'}: not the same rows as {tmp_path / 'tasks/fedavg.json'}")
    with pytest.raises(FedllmError, match=message + r" \(origins differ at index 3"):
        compare_settings(tmp_path, settings)

    settings["site:oasst1"]["task"] = _write_predictions(tmp_path, "site:oasst1", gold[:39], gold[:39])
    with pytest.raises(FedllmError, match=r"site-oasst1\.json: not the same rows .*origins differ: 39 vs 40 entries"):
        compare_settings(tmp_path, settings)

    (tmp_path / "tasks/site-oasst1.json").unlink()
    with pytest.raises(FedllmError, match=r"site-oasst1\.json: task predictions of setting 'site:oasst1' not found"):
        compare_settings(tmp_path, settings)
