"""The NVFlare job for a fedllm experiment: FedAvg from NVFlare's recipe API (FedProx and
FedOpt on the same recipe: fedllm.federation.algorithms).

The same job runs in the simulator (``fedllm federate``), in POC mode and on a
production federation (submitted through the admin API). The server reads the
initial global model from the round-0 weights ``prepare`` wrote (it builds no model);
every site runs ``fedllm/federation/client.py`` against the shared run dir.
"""

from __future__ import annotations

import os

from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe

from fedllm.config import ExperimentConfig
from fedllm.federation import client as client_script
from fedllm.federation import nemo_client as nemo_client_script
from fedllm.federation.aggregation import RunningWeightedAverage
from fedllm.federation.algorithms import server_optimizer_args
from fedllm.federation.persistor import RoundCheckpointPersistor
from fedllm.federation.transfer import add_transfer_timeouts, run_transfer_settings
from fedllm.rundir import RunDir
from fedllm.tracking import add_receivers
from fedllm.federation.tuning import (
    apply_memory_settings,
    apply_round_tuning,
    server_memory_settings,
    site_process_settings,
)
from fedllm.train.methods import get_method


def job_name(cfg: ExperimentConfig) -> str:
    return f"fedllm-{cfg.name}"


class ResumableFedAvgRecipe(FedAvgRecipe):
    """FedAvgRecipe whose controller starts at ``start_round`` (NVFlare's FedAvg
    controller supports it; the recipe does not pass it on).

    ``server_optimizer``: NVFlare's ``optimizer_args`` for FedOpt; the controller is then
    fedllm's :class:`~fedllm.federation.fedopt.ServerOptimizer` (NVFlare's FedOpt controller
    over this recipe's persistor and aggregator; why not NVFlare's FedOptRecipe: see
    fedllm/federation/fedopt.py). None: fedllm's FedAvg controller,
    :class:`~fedllm.federation.participation.SiteTolerantFedAvg`. ``participation``: its
    arguments (``participation_args``).
    """

    def __init__(self, *, start_round: int = 0, server_optimizer: dict | None = None,
                 participation: dict | None = None, **kwargs):
        # all read by the controller's construction during super().__init__
        self.start_round = start_round
        self.server_optimizer = server_optimizer
        self.participation = dict(participation or {})
        super().__init__(**kwargs)

    def _prepare_client_apps(self) -> None:
        super()._prepare_client_apps()
        # A site whose training process died launches a new one at its next task and rejoins
        # the job (fedllm.federation.relaunch); NVFlare's executor fails every later task instead.
        from fedllm.federation.relaunch import restart_dead_site_trainers

        restart_dead_site_trainers(self._job)
        # The server and the sites run the installed fedllm (the simulator's environment, an image's):
        # a partial copy in the job's custom/ folder, a package without its __init__, would shadow an
        # editable install and hide the modules NVFlare's import scan did not copy.
        self._job.set_app_packages(["fedllm"])

    def _get_controller_kwargs(self) -> dict:
        # min_responses, round timeout, wait after the minimum, event log: fedllm.federation.participation
        return {**super()._get_controller_kwargs(), "start_round": self.start_round, **self.participation}

    def _create_controller(self, persistor_id: str, model_params, model_aggregator):
        # FedAvgRecipe._create_controller's arguments, to fedllm's FedAvg (rounds that survive
        # lost sites) or, with a server optimizer, to FedOpt's controller over the same.
        arguments = dict(
            num_clients=self.min_clients,
            num_rounds=self.num_rounds,
            persistor_id=persistor_id,
            model=model_params,
            save_filename=self.save_filename,
            aggregator=model_aggregator,
            stop_cond=self.stop_cond,
            patience=self.patience,
            task_name="train",
            exclude_vars=self.exclude_vars,
            aggregation_weights=self.aggregation_weights,
            memory_gc_rounds=self.server_memory_gc_rounds,
            enable_tensor_disk_offload=self.enable_tensor_disk_offload,
            **self._get_controller_kwargs(),
        )
        if self.server_optimizer is None:
            from fedllm.federation.participation import SiteTolerantFedAvg

            return SiteTolerantFedAvg(**arguments)
        from nvflare.recipe.utils import ensure_config_type_dict

        from fedllm.federation.fedopt import ServerOptimizer

        # config_type "dict": the job's config loader must not build the optimizer itself
        return ServerOptimizer(optimizer_args=ensure_config_type_dict(self.server_optimizer), **arguments)


def build_recipe(cfg: ExperimentConfig, run_dir: str | os.PathLike, sites: list[str], start_round: int = 0,
                 store: str = "", site_python: str | None = None) -> FedAvgRecipe:
    """A FedAvg recipe over ``sites`` for the prepared run dir, running ``federation.algorithm``.

    ``run_dir`` must hold ``config.yaml``, ``data/`` and ``models/base`` with the round-0 weights (see
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
    # the site's training script: Lightning's Client API (hf) or the plain one (nemo)
    site_script = nemo_client_script if cfg.training.backend == "nemo" else client_script
    persistor = RoundCheckpointPersistor(
        # round 0: the weights prepare wrote; the server builds no model
        initial_weights=str(layout.initial_weights),
        checkpoint_dir=str(layout.rounds),
        events_file=str(layout.server_events),
        store=store or "",
        config_hash=cfg.fingerprint(),
        resume_round=start_round,
    )
    recipe = ResumableFedAvgRecipe(
        start_round=start_round,
        # FedOpt steps a server optimizer on the global weights; FedAvg and FedProx average
        # (FedProx's term is in the sites' loss: fedllm/federation/client.py).
        server_optimizer=server_optimizer_args(cfg.federation),
        participation=participation_args(cfg, layout),
        name=job_name(cfg),
        min_clients=cfg.federation.min_clients or len(sites),
        num_rounds=cfg.federation.rounds - start_round,
        train_script=site_script.__file__,
        train_args=f"--run-dir {layout.root}",
        model_persistor=persistor,
        # Tensors stay tensors end to end (no numpy round trip of every weight), and the
        # server downloads each site's update to disk where NVFlare can (not the simulator).
        **server_memory_settings(),
        # Each site's training runs in its own process, launched once per job: tasks and
        # results are handed over with events, not 0.5 s polls.
        **site_process_settings(python=site_python, module=site_script.__name__,
                                processes=cfg.training.processes_per_site),
        # Offloaded updates summed at the end of the round in site order; in-memory ones
        # into one running sum as they arrive, each freed as it is added. Either way the
        # global model does not depend on the order sites report in (fedllm.federation.aggregation).
        # An update with NaN/Inf, the wrong names, shapes or dtypes, or a norm above
        # federation.max_update_norm is rejected for the round (an update_rejected event).
        aggregator=RunningWeightedAverage(lora_aggregation=cfg.federation.lora_aggregation,
                                          max_update_norm=cfg.federation.max_update_norm,
                                          events_file=str(layout.server_events)),
        key_metric="val_loss",
        key_metric_mode="min",
    )
    _apply_settings(recipe, cfg, layout, len(sites))
    add_receivers(recipe, cfg, layout, start_round)  # tracking: the server's TensorBoard / MLflow receivers
    return recipe


def participation_args(cfg: ExperimentConfig, layout: RunDir) -> dict:
    """The controller's arguments for rounds that survive lost sites (fedllm.federation.participation)."""
    federation = cfg.federation
    return {
        "min_responses": federation.min_clients or 0,
        "round_timeout": float(federation.round_timeout or 0.0),
        "wait_after_min_responses": -1.0 if federation.wait_after_min_clients is None else float(federation.wait_after_min_clients),
        "min_bandwidth": float(federation.min_bandwidth_mb_s) * 1e6,
        "events_file": str(layout.server_events),
        # no copy of the global model per round, unless a server filter (quantization's)
        # changes what it sends in place
        "share_global_model": not federation.quantization,
    }


def _apply_settings(recipe: FedAvgRecipe, cfg: ExperimentConfig, layout: RunDir, sites: int) -> None:
    """Round timing, transfer timeouts and memory settings, privacy filters and message quantization."""
    # No polling on a round's critical path (NVFlare's defaults wait 2 s per site
    # per round).
    apply_round_tuning(recipe)
    # NVFlare's transfer timeouts sized from the exchanged model (fedllm.federation.transfer)
    add_transfer_timeouts(recipe, run_transfer_settings(cfg, layout, sites))
    if not get_method(cfg.method.name).is_peft:
        # Full weights: collect and trim the server's heap after every round, so freed
        # updates go back to the OS. A collection costs ~0.3 s on the round's critical path
        # in the simulator (one process holds everything), nothing against a full-model
        # round, but more than a whole PEFT round's overhead, whose updates are megabytes.
        apply_memory_settings(recipe)
    from fedllm.federation import privacy

    private = privacy.enabled(cfg.federation.privacy)
    if private:
        # A site's update is made private first, then quantized for the wire ...
        privacy.add_site_privacy(recipe, cfg, str(layout.root))
    if cfg.federation.quantization:
        from fedllm.federation.quantization import add_quantization

        add_quantization(recipe, cfg.federation.quantization)
    if private:
        # ... and privacy's input filters see the weights dequantized.
        privacy.add_privacy_inputs(recipe, cfg)
