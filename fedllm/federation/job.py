"""The NVFlare job for a fedllm experiment: FedAvg from NVFlare's recipe API.

The same job runs in the simulator (``fedllm federate``), in POC mode and on a
production federation (submitted through the admin API). The server rebuilds
the initial global model from ``CausalLMModule``'s constructor arguments; every
site runs ``fedllm/federation/client.py`` against the shared run dir.
"""

from __future__ import annotations

import os

from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe

from fedllm.config import ExperimentConfig
from fedllm.federation import client as client_script
from fedllm.federation.aggregation import RunningWeightedAverage
from fedllm.federation.persistor import RoundCheckpointPersistor
from fedllm.rundir import RunDir
from fedllm.tracking import add_receivers
from fedllm.federation.tuning import (
    apply_memory_settings,
    apply_round_tuning,
    server_memory_settings,
    site_process_settings,
)
from fedllm.train.methods import get_method
from fedllm.train.site import PRECISION_DTYPE, train_args

MODULE_CLASS = "fedllm.train.module.CausalLMModule"


def job_name(cfg: ExperimentConfig) -> str:
    return f"fedllm-{cfg.name}"


class ResumableFedAvgRecipe(FedAvgRecipe):
    """FedAvgRecipe whose controller starts at ``start_round`` (NVFlare's FedAvg
    controller supports it; the recipe does not pass it on)."""

    def __init__(self, *, start_round: int = 0, **kwargs):
        self.start_round = start_round  # read by _get_controller_kwargs during super().__init__
        super().__init__(**kwargs)

    def _get_controller_kwargs(self) -> dict:
        return {**super()._get_controller_kwargs(), "start_round": self.start_round}


def build_recipe(cfg: ExperimentConfig, run_dir: str | os.PathLike, sites: list[str], start_round: int = 0,
                 store: str = "", site_python: str | None = None) -> FedAvgRecipe:
    """A FedAvg recipe over ``sites`` for the prepared run dir.

    ``run_dir`` must hold ``config.yaml``, ``data/`` and ``models/base`` (see
    ``fedllm.run.prepare_run``) and be readable by the server and every site
    (one machine, a shared volume, or a per-site copy at the same path).
    ``start_round`` > 0 resumes: the job runs rounds ``start_round+1 .. rounds``
    from round ``start_round``'s persisted global model. ``store``: the run's
    store URI, where every round's global model is uploaded. ``site_python``: the
    interpreter each site starts its training process with, ``python -u -m
    fedllm.federation.client`` (default: this one, right wherever the sites share this
    machine's environment, as in the simulator).
    """
    layout = RunDir(run_dir)
    module_args = {
        "model_dir": str(layout.base_model),
        "method": cfg.method.name,
        "method_params": dict(cfg.method.params),
        "train_args": train_args(cfg, total_steps=1),  # the server never steps an optimizer
        "dtype": PRECISION_DTYPE[cfg.training.precision],
    }
    persistor = RoundCheckpointPersistor(
        model={"path": MODULE_CLASS, "args": module_args},
        checkpoint_dir=str(layout.rounds),
        events_file=str(layout.server_events),
        store=store or "",
        config_hash=cfg.fingerprint(),
        resume_round=start_round,
    )
    recipe = ResumableFedAvgRecipe(
        start_round=start_round,
        name=job_name(cfg),
        min_clients=cfg.federation.min_clients or len(sites),
        num_rounds=cfg.federation.rounds - start_round,
        train_script=client_script.__file__,
        train_args=f"--run-dir {layout.root}",
        model_persistor=persistor,
        # Tensors stay tensors end to end (no numpy round trip of every weight), and the
        # server downloads each site's update to disk where NVFlare can (not the simulator).
        **server_memory_settings(),
        # Each site's training runs in its own process, launched once per job: tasks and
        # results are handed over with events, not 0.5 s polls.
        **site_process_settings(python=site_python, module=client_script.__name__),
        # Offloaded updates summed at the end of the round in site order; in-memory ones
        # into one running sum as they arrive, each freed as it is added. Either way the
        # global model does not depend on the order sites report in (fedllm.federation.aggregation).
        aggregator=RunningWeightedAverage(lora_aggregation=cfg.federation.lora_aggregation),
        key_metric="val_loss",
        key_metric_mode="min",
    )
    _apply_settings(recipe, cfg)
    add_receivers(recipe, cfg, layout, start_round)  # tracking: the server's TensorBoard / MLflow receivers
    return recipe


def _apply_settings(recipe: FedAvgRecipe, cfg: ExperimentConfig) -> None:
    """Round timing and memory settings, and message quantization."""
    # No polling on a round's critical path (NVFlare's defaults wait 2 s per site
    # per round).
    apply_round_tuning(recipe)
    if not get_method(cfg.method.name).is_peft:
        # Full weights: collect and trim the server's heap after every round, so freed
        # updates go back to the OS. A collection costs ~0.3 s on the round's critical path
        # in the simulator (one process holds everything), nothing against a full-model
        # round, but more than a whole PEFT round's overhead, whose updates are megabytes.
        apply_memory_settings(recipe)
    if cfg.federation.quantization:
        from fedllm.federation.quantization import add_quantization

        add_quantization(recipe, cfg.federation.quantization)
