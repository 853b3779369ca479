"""Reading a run's ``summary.json``: the one input of the report.

The report tolerates missing optional fields (a section then says "not recorded"),
but a field that is present with the wrong shape is an upstream bug and raises
``FedllmError`` naming the field, e.g. ``runs/demo/summary.json: settings.fedavg.val_loss_curve[2]``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from fedllm.errors import FedllmError
from fedllm.rundir import SUMMARY

SUMMARY_FILE = SUMMARY

# Rows of the results table in the seed's layout; sites go between base and centralized.
_DISPLAY_NAMES = {"base": "Base", "centralized": "Centralized", "fedavg": "FedAvg"}
# Words of a variant name that a reader knows in capitals (``fedavg:product_svd`` → product SVD).
_ACRONYMS = {"svd": "SVD", "lora": "LoRA", "qr": "QR", "pca": "PCA"}


def load_summary(run_dir: str | Path) -> tuple[dict, Path]:
    """Return the parsed ``summary.json`` of ``run_dir`` and its path.

    Raises ``FedllmError`` naming the path when the file is missing, is not JSON
    (with its line), or is not a JSON object with a ``settings`` mapping.
    """
    path = Path(run_dir) / SUMMARY_FILE
    if not path.is_file():
        raise FedllmError(
            f"{path}: no run summary here; give the directory of a finished `fedllm run` (it holds summary.json)"
        )
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise FedllmError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(summary, dict):
        raise FedllmError(f"{path}: expected a JSON object with name, model, settings; got {type(summary).__name__}")
    settings = summary.get("settings", {})
    if not isinstance(settings, dict) or not all(isinstance(s, dict) for s in settings.values()):
        raise FedllmError(f"{path}: settings: expected a mapping of setting name to an object (base, site:<name>, ...)")
    for name in ("model", "partition"):
        if summary.get(name) is not None and not isinstance(summary[name], dict):
            raise FedllmError(f"{path}: {name}: expected an object, got {type(summary[name]).__name__}")
    return summary, path


def ordered_settings(summary: dict) -> list[tuple[str, dict]]:
    """Settings in the seed's row order: base, each site, centralized, fedavg, its
    variants (``fedavg:<variant>``, in the order recorded), then any others.

    Sites follow ``summary["sites"]`` when given, else the order they were recorded in.
    """
    settings: dict = summary.get("settings") or {}
    site_keys = [f"site:{name}" for name in summary.get("sites") or []]
    site_keys += [k for k in settings if k.startswith("site:") and k not in site_keys]
    variants = [k for k in settings if k.startswith("fedavg:")]
    order = ["base", *site_keys, "centralized", "fedavg", *variants]
    order += [k for k in settings if k not in order]
    return [(key, settings[key]) for key in order if key in settings]


def display_name(setting_key: str, setting: Optional[dict] = None) -> str:
    """The name a reader sees for a setting: ``site:dolly`` → ``dolly``, ``fedavg`` → ``FedAvg``,
    ``fedavg:product_svd`` → ``FedAvg (product SVD)``. Given the setting's entry, a federated
    setting is named by the algorithm it records (``algorithm``): ``FedProx (μ=0.01)``,
    ``FedOpt (SGD, lr 1, momentum 0.6, product SVD)``; the key stays ``fedavg`` whatever ran."""
    from fedllm.federation.algorithms import algorithm_label

    if setting_key.startswith("site:"):
        return setting_key[len("site:"):]
    federated = setting_key == "fedavg" or setting_key.startswith("fedavg:")
    record = (setting or {}).get("algorithm") if federated else None
    private = _privacy_words((setting or {}).get("privacy")) if federated else []
    if setting_key.startswith("fedavg:"):
        words = setting_key[len("fedavg:"):].replace("-", "_").split("_")
        variant = " ".join(_ACRONYMS.get(w.lower(), w) for w in words if w)
        if isinstance(record, dict):  # a variant named by its algorithm is that algorithm, nothing more
            extra = [] if record.get("name") == setting_key[len("fedavg:"):] else [variant]
            return algorithm_label(record, extra=extra + private)
        return f"FedAvg ({', '.join([variant, *private])})"
    if isinstance(record, dict) or private:
        return algorithm_label(record, extra=private)
    return _DISPLAY_NAMES.get(setting_key, setting_key)


def _privacy_words(record: Any) -> list[str]:
    """``["DP ε=4.2"]`` for a setting whose sites noised their updates (fedllm.federation.privacy),
    ``["DP σ=0"]`` without noise, ``["excluded weights"]`` / ``["percentile"]`` for the other filters."""
    if not isinstance(record, dict):
        return []
    words = []
    if record.get("mechanism"):
        epsilon = record.get("epsilon")
        words.append(f"DP ε={epsilon:.3g}" if isinstance(epsilon, (int, float)) else "DP σ=0")
    if record.get("percentile"):
        words.append("percentile")
    if record.get("exclude_vars"):
        words.append("excluded weights")
    return words


def is_federated(setting_key: str, setting: dict) -> bool:
    return setting.get("kind") == "federated" or setting_key == "fedavg" or setting_key.startswith("fedavg:")


def number(value: Any, where: str) -> Optional[float]:
    """``value`` as a finite float, ``None`` when absent (null); raises naming ``where`` otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FedllmError(f"{where}: expected a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        return None  # a diverged loss (nan/inf) is shown as not recorded, not plotted
    return value


def curve(points: Any, where: str) -> list[tuple[float, float]]:
    """A ``[[step, loss], ...]`` list as (step, loss) pairs, sorted by step; non-finite losses dropped."""
    if points is None:
        return []
    if not isinstance(points, list):
        raise FedllmError(f"{where}: expected a list of [step, loss] pairs, got {type(points).__name__}")
    pairs = []
    for i, point in enumerate(points):
        if not isinstance(point, (list, tuple)) or len(point) != 2:
            raise FedllmError(f"{where}[{i}]: expected a [step, loss] pair, got {point!r}")
        step, loss = number(point[0], f"{where}[{i}][0]"), number(point[1], f"{where}[{i}][1]")
        if step is not None and loss is not None:
            pairs.append((step, loss))
    return sorted(pairs)
