"""Federated algorithms: one registry (``federation.algorithm``), one entry per algorithm.

- ``fedavg``: the server's new global model is the sites' weighted mean (McMahan et al.).
- ``fedprox``: FedAvg on the server; each site adds mu/2·‖w − w_global‖² to its training
  loss, over the weights it exchanges, against the global weights it received that round
  (Li et al.; NVFlare's ``PTFedProxLoss``, see ``fedllm.train.proximal``). ``mu`` = 0 adds
  nothing: FedAvg, bit for bit.
- ``fedopt``: the sites train as in FedAvg; the server takes (global − weighted mean) as a
  gradient and steps a torch optimizer (SGD with momentum, or Adam) on the global weights
  (Reddi et al.; NVFlare's FedOpt controller, see ``fedllm.federation.fedopt``).

Every algorithm exchanges what FedAvg does: the method's trainable weights (the adapter,
for PEFT). What summary.json records of an algorithm is :func:`algorithm_record`; the
report names it with :func:`algorithm_label`, from that record alone. Adding an algorithm
touches this file (its entry), ``fedllm/config.py`` (its parameters' section) and
whatever it changes on the server (``fedllm/federation/job.py``) or at the sites
(``fedllm/federation/client.py``).

Imports nothing heavy: the config loader checks names against this registry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from fedllm.errors import FedllmError


@dataclass(frozen=True)
class Algorithm:
    name: str
    title: str  # what a reader sees: "FedProx"
    description: str
    # the algorithm's parameters from ``federation`` (what summary.json records), checked
    # (FedllmError naming the field) before they are returned
    params: Callable[[object], dict]


def _no_params(federation) -> dict:
    return {}


def _fedprox_params(federation) -> dict:
    mu = federation.fedprox.mu
    if not math.isfinite(mu) or mu < 0:
        raise FedllmError(f"config field 'federation.fedprox.mu': must be a finite number ≥ 0, got {mu}")
    return {"mu": mu}


def _fedopt_params(federation) -> dict:
    opt = federation.fedopt
    if not math.isfinite(opt.lr) or opt.lr <= 0:
        raise FedllmError(f"config field 'federation.fedopt.lr': must be > 0, got {opt.lr}")
    if opt.optimizer == "sgd":
        if not 0 <= opt.momentum < 1:
            raise FedllmError(f"config field 'federation.fedopt.momentum': must be in [0, 1), got {opt.momentum}")
        return {"optimizer": "sgd", "lr": opt.lr, "momentum": opt.momentum}
    if len(opt.betas) != 2 or not all(0 <= b < 1 for b in opt.betas):
        raise FedllmError(f"config field 'federation.fedopt.betas': expected two numbers in [0, 1), got {opt.betas}")
    if not math.isfinite(opt.eps) or opt.eps <= 0:
        raise FedllmError(f"config field 'federation.fedopt.eps': must be > 0, got {opt.eps}")
    return {"optimizer": "adam", "lr": opt.lr, "betas": list(opt.betas), "eps": opt.eps}


ALGORITHMS: dict[str, Algorithm] = {
    "fedavg": Algorithm("fedavg", "FedAvg", "the weighted mean of the sites' weights", _no_params),
    "fedprox": Algorithm(
        "fedprox", "FedProx", "FedAvg with a proximal term mu/2·‖w − w_global‖² in every site's loss", _fedprox_params
    ),
    "fedopt": Algorithm(
        "fedopt", "FedOpt", "a server optimizer stepped on (global − the sites' weighted mean)", _fedopt_params
    ),
}

# torch.optim classes of ``federation.fedopt.optimizer`` (imported where the server builds one)
SERVER_OPTIMIZERS = {"sgd": "torch.optim.SGD", "adam": "torch.optim.Adam"}


def get_algorithm(name: str, field: str = "federation.algorithm") -> Algorithm:
    if name not in ALGORITHMS:
        raise FedllmError(f"config field '{field}': {name!r} is not allowed; allowed values: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]


def check_algorithm(federation) -> None:
    """FedllmError naming the field when ``federation.algorithm`` or any algorithm's parameters
    are wrong (an unused section's too: switching algorithms must not surface a stale error)."""
    get_algorithm(federation.algorithm)
    for algorithm in ALGORITHMS.values():
        algorithm.params(federation)


def algorithm_record(federation) -> dict:
    """``{"name": <algorithm>, **its parameters}``: what summary.json keeps of the algorithm run,
    e.g. ``{"name": "fedprox", "mu": 0.01}``."""
    algorithm = get_algorithm(federation.algorithm)
    return {"name": algorithm.name, **algorithm.params(federation)}


def fedprox_mu(federation) -> float:
    """The proximal coefficient the sites train with: ``fedprox.mu`` under FedProx, else 0."""
    return federation.fedprox.mu if federation.algorithm == "fedprox" else 0.0


def server_optimizer_args(federation) -> dict | None:
    """NVFlare's ``optimizer_args`` (``{"path": torch.optim class, "args": {...}}``) of the
    FedOpt server optimizer; None unless ``federation.algorithm`` is ``fedopt``."""
    if federation.algorithm != "fedopt":
        return None
    params = dict(algorithm_record(federation))
    params.pop("name")
    optimizer = params.pop("optimizer")
    return {"path": SERVER_OPTIMIZERS[optimizer], "args": params}


def algorithm_label(record: dict | None, extra: list[str] = ()) -> str:
    """A reader's name for a recorded algorithm: ``FedAvg``, ``FedProx (μ=0.01)``,
    ``FedOpt (SGD, lr 1, momentum 0.6)``, ``FedOpt (Adam, lr 0.01, betas 0.9/0.99)``;
    ``extra`` words join the parentheses (``FedProx (μ=0.01, product SVD)``). No record (a
    run from before algorithms were recorded) is FedAvg."""
    record = record or {"name": "fedavg"}
    algorithm = ALGORITHMS.get(record.get("name"))
    title = algorithm.title if algorithm else str(record.get("name"))
    details = []
    if algorithm is not None and algorithm.name == "fedprox":
        details.append(f"μ={_num(record.get('mu'))}")
    elif algorithm is not None and algorithm.name == "fedopt":
        if record.get("optimizer") == "adam":
            betas = "/".join(_num(b) for b in record.get("betas") or [])
            details += ["Adam", f"lr {_num(record.get('lr'))}", f"betas {betas}"]
        else:
            details += ["SGD", f"lr {_num(record.get('lr'))}", f"momentum {_num(record.get('momentum'))}"]
    details += [word for word in extra if word]
    return f"{title} ({', '.join(details)})" if details else title


def _num(value) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)
