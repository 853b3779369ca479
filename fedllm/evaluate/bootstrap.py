"""Is a difference between two settings real? A paired bootstrap over the same rows.

Every setting of a run is scored on the very same task rows (``tasks/<setting>.json``
holds each row's gold and predicted label, in one order for all settings). To judge
"FedAvg beats dolly alone by 0.03 accuracy", the rows are resampled with replacement
and both settings are scored on each resample *with the same resampled rows*, so
the difference's spread reflects which rows happen to be drawn and not two
independent samplings: that pairing is what keeps the interval narrow when two
settings mostly agree.

    paired_bootstrap(gold, fedavg, dolly, "accuracy", num_classes=3)
    # {"difference": 0.031, "ci95": [0.004, 0.057], "resamples": 2000, "seed": 1234, "rows": 227}
    compare_settings("runs/phrasebank", summary["settings"])   # what summary.json's "comparisons" holds
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from fedllm.errors import FedllmError
from fedllm.evaluate.task_metric import accuracy, macro_f1

METRICS = ("accuracy", "macro_f1")
RESAMPLES = 2000
SEED = 1234


def paired_bootstrap(
    gold: Sequence[int],
    predicted_a: Sequence[int],
    predicted_b: Sequence[int],
    metric: str,
    num_classes: int,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> dict:
    """``metric(a) − metric(b)`` on all rows, with a paired bootstrap 95% interval.

    Returns ``{"difference", "ci95": [lo, hi], "resamples", "seed", "rows"}``.
    ``difference`` is computed on all rows by ``fedllm.evaluate.task_metric``;
    ``ci95`` is the 2.5th and 97.5th percentile (numpy's linear interpolation) of
    the differences over ``resamples`` resamples. The resampled row indices are
    exactly ``numpy.random.default_rng(seed).integers(0, rows, size=(resamples, rows))``
    (one resample per line), shared by a and b; the same inputs and seed always give
    the same interval. ``metric`` is ``"accuracy"`` or ``"macro_f1"`` (macro-F1 leaves
    out of each resample's mean the classes absent from both its gold and predicted
    labels, as ``task_metric.macro_f1`` does). Labels are indices in ``[0, num_classes)``.
    """
    if metric not in METRICS:
        raise FedllmError(f"paired_bootstrap: metric {metric!r}; allowed: {', '.join(METRICS)}")
    if num_classes < 1 or resamples < 1:
        raise FedllmError(f"paired_bootstrap: num_classes {num_classes} and resamples {resamples} must be >= 1")
    g, a, b = (np.asarray(x, dtype=np.int64) for x in (gold, predicted_a, predicted_b))
    if g.ndim != 1 or not len(g) or g.shape != a.shape or g.shape != b.shape:
        raise FedllmError(
            f"paired_bootstrap: {len(gold)} gold labels, {len(predicted_a)} and {len(predicted_b)} predictions; "
            "need the same rows, > 0"
        )
    for name, labels in (("gold", g), ("predicted_a", a), ("predicted_b", b)):
        if labels.min() < 0 or labels.max() >= num_classes:
            raise FedllmError(f"paired_bootstrap: {name} has a label outside [0, {num_classes})")

    if metric == "accuracy":
        difference = accuracy(gold, predicted_a) - accuracy(gold, predicted_b)
    else:
        difference = macro_f1(gold, predicted_a, num_classes) - macro_f1(gold, predicted_b, num_classes)

    rows = len(g)
    index = np.random.default_rng(seed).integers(0, rows, size=(resamples, rows))
    scores = _accuracies if metric == "accuracy" else _macro_f1s
    differences = scores(g[index], a[index], num_classes) - scores(g[index], b[index], num_classes)
    lo, hi = np.percentile(differences, [2.5, 97.5])
    return {"difference": float(difference), "ci95": [float(lo), float(hi)],
            "resamples": resamples, "seed": seed, "rows": rows}


def _accuracies(gold: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    return (gold == predicted).mean(axis=1)


def _macro_f1s(gold: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Macro-F1 of each resample (one per line of ``gold``/``predicted``)."""
    resamples, rows = gold.shape
    k = num_classes
    # One confusion matrix per resample from a single bincount: cell (r, g, p).
    cells = (np.arange(resamples)[:, None] * (k * k) + gold * k + predicted).ravel()
    confusion = np.bincount(cells, minlength=resamples * k * k).reshape(resamples, k, k)
    tp = np.diagonal(confusion, axis1=1, axis2=2)
    denominator = confusion.sum(axis=2) + confusion.sum(axis=1)  # (tp+fn) + (tp+fp) = 2tp + fp + fn
    present = denominator > 0
    f1 = np.divide(2 * tp, denominator, out=np.zeros(tp.shape), where=present)
    counted = present.sum(axis=1)
    return np.divide(f1.sum(axis=1), counted, out=np.zeros(resamples), where=counted > 0)


def is_federated_key(key: str) -> bool:
    """``fedavg`` and its variants ``fedavg:<variant>`` (another server-side combination)."""
    return key == "fedavg" or key.startswith("fedavg:")


def compare_settings(run_dir: str | Path, settings: dict) -> list[dict]:
    """Every federated setting against every site alone and centralized, per task metric.

    ``settings`` is summary.json's ``settings``; a setting takes part when it has
    ``task.predictions`` (a file relative to ``run_dir``). For each federated setting
    (``fedavg``, then each ``fedavg:<variant>`` in ``settings`` order) against each
    ``site:*`` (in ``settings`` order), ``centralized`` and, for a variant, ``fedavg``,
    and for ``accuracy`` then ``macro_f1``, one entry::

        {"setting": "fedavg", "against": "site:dolly", "metric": "accuracy",
         "difference": 0.031, "ci95": [0.004, 0.057], "rows": 227, "resamples": 2000, "seed": 1234}

    with ``difference`` = setting − against (see ``paired_bootstrap``). Returns ``[]``
    when no federated setting has task predictions (older runs, the tiny demo).
    Raises ``FedllmError`` naming the file when a predictions file is missing or
    malformed, or does not hold the same rows (gold labels, origins, choices) as the
    federated setting's file.
    """
    run = Path(run_dir)
    with_predictions = [k for k, s in settings.items() if isinstance((s.get("task") or {}).get("predictions"), str)]
    federated = sorted((k for k in with_predictions if is_federated_key(k)), key=lambda k: k != "fedavg")
    baselines = [k for k in with_predictions if k.startswith("site:")]
    baselines += [k for k in with_predictions if k == "centralized"]
    loaded: dict[str, tuple[Path, dict]] = {}

    def predictions(key: str) -> tuple[Path, dict]:
        if key not in loaded:
            path = run / settings[key]["task"]["predictions"]
            loaded[key] = path, _load_predictions(path, key)
        return loaded[key]

    comparisons = []
    for key in federated:
        path, mine = predictions(key)
        against = baselines + (["fedavg"] if key != "fedavg" and "fedavg" in with_predictions else [])
        for other in against:
            other_path, theirs = predictions(other)
            _same_rows(path, mine, other_path, theirs)
            for metric in METRICS:
                result = paired_bootstrap(mine["gold"], mine["predicted"], theirs["predicted"], metric,
                                          len(mine["choices"]))
                comparisons.append({"setting": key, "against": other, "metric": metric, **result})
    return comparisons


def _load_predictions(path: Path, key: str) -> dict:
    if not path.is_file():
        raise FedllmError(f"{path}: task predictions of setting {key!r} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise FedllmError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(data, dict):
        raise FedllmError(f"{path}: expected an object with choices, gold, predicted, origins")
    for field in ("choices", "gold", "predicted", "origins"):
        if not isinstance(data.get(field), list):
            raise FedllmError(f"{path}: {field}: expected a list")
    for field in ("gold", "predicted"):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in data[field]):
            raise FedllmError(f"{path}: {field}: expected label indices (integers)")
        if any(not 0 <= v < len(data["choices"]) for v in data[field]):
            raise FedllmError(f"{path}: {field}: a label index outside the {len(data['choices'])} choices")
    if not data["gold"] or not (len(data["gold"]) == len(data["predicted"]) == len(data["origins"])):
        raise FedllmError(
            f"{path}: {len(data['gold'])} gold, {len(data['predicted'])} predicted, {len(data['origins'])} origins; "
            "need the same number, > 0"
        )
    return data


def _same_rows(path: Path, mine: dict, other_path: Path, theirs: dict) -> None:
    """A paired comparison is only meaningful on the very same rows, in the same order."""
    for field in ("choices", "origins", "gold"):
        if mine[field] != theirs[field]:
            where = _first_difference(mine[field], theirs[field])
            raise FedllmError(
                f"{other_path}: not the same rows as {path} ({field} differ{where}); "
                "both settings must be scored on the same task rows"
            )


def _first_difference(a: list, b: list) -> str:
    if len(a) != len(b):
        return f": {len(b)} vs {len(a)} entries"
    i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    return f" at index {i}: {b[i]!r} vs {a[i]!r}"
