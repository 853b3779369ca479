"""Round-time settings for fedllm's NVFlare jobs: no polling on a round's critical path.

NVFlare 2.9's defaults are sized for many sites over a WAN: each site sleeps 2 s before
asking the server for the next task, the FedAvg controller looks for finished results every
0.5 s (and the WFCommServer under it every 0.2 s, whatever the controller was given), and
the in-process Client API bridge polls both ways every 0.5 s (a constant in
``nvflare/app_common/executors/client_api/in_process_backend.py`` that no job setting
reaches). On a tiny job that is 2.4-2.9 s per round of pure waiting. fedllm federates a
handful of sites, so it asks sooner and more often, hands the controller's period to the
WFCommServer too (:class:`TunedFedAvg`), and runs the site script in its own process, where
the Client API hands tasks and results over with events instead of polls.

    recipe = FedAvgRecipe(..., **site_process_settings(module="my_site_script"))
    apply_round_tuning(recipe)
    apply_memory_settings(recipe)   # see fedllm/federation/aggregation.py

Every setting lands in the exported job's config JSON (``config_fed_server.json`` /
``config_fed_client.json``), so a job submitted to a POC or production federation carries
it; nothing depends on the process that built the job.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from nvflare.app_common.workflows.fedavg import FedAvg

from fedllm.errors import FedllmError

# The key under which the server's runner settings live in config_fed_server.json
# (nvflare/private/fed/server/server_json_config.py reads "server.task_request_interval").
_SERVER_SECTION = "server"


@dataclass(frozen=True)
class RoundTuning:
    """The polling intervals fedllm sets on a FedAvg job, in seconds.

    Attributes:
        task_request_interval: how long a site waits, after finishing a task or after the
            server said "no task yet", before asking again. NVFlare default: 2.0 s (server
            config ``server.task_request_interval``, sent to sites in every task reply).
            It is the largest single cost of a round: every site sleeps it once per round.
            Asking every 50 ms costs the server one small request per site per 50 ms while
            sites wait for aggregation: nothing for fedllm's 2-16 sites.
        task_check_period: how often the FedAvg controller (and the WFCommServer under it)
            checks whether all results of a round are in. NVFlare default: 0.5 s for the
            controller's loop, 0.2 s for WFCommServer. After the last site's result the next
            round starts at most this late; a 10 ms loop is a negligible CPU cost.
        default_task_fetch_interval: how long a site waits before its very first task
            request (before the server has told it ``task_request_interval``) and after an
            empty reply. NVFlare default: 0.5 s (client config, top level).
    """

    task_request_interval: float = 0.05
    task_check_period: float = 0.01
    default_task_fetch_interval: float = 0.05


class TunedFedAvg(FedAvg):
    """NVFlare's FedAvg whose task-check period reaches the WFCommServer that runs its tasks.

    ``Controller.set_communicator`` hands the period over as ``communicator.task_check_period``
    but ``WFCommServer`` sleeps ``_task_check_period`` (its constructor's 0.2 s) between checks
    of whether a round's results are all in: NVFlare 2.9 drops the setting on the floor, and the
    next round starts up to 0.2 s late. Nothing else differs from ``FedAvg``.
    """

    def set_communicator(self, communicator) -> None:
        super().set_communicator(communicator)
        if hasattr(communicator, "_task_check_period"):
            communicator._task_check_period = self._task_check_period


def apply_round_tuning(recipe, tuning: RoundTuning = RoundTuning()) -> RoundTuning:
    """Set fedllm's round-time settings on an NVFlare FedAvg recipe, in place.

    ``recipe`` is a ``nvflare.recipe.fedavg.FedAvgRecipe`` (the PyTorch one included) or any
    recipe whose server app runs one ``BaseModelController`` workflow. Call it after the
    recipe is built and before ``recipe.run`` / ``recipe.export``; calling it twice with
    the same settings is harmless. Returns the settings applied.

    Raises FedllmError if a setting is not a positive number or the recipe has no
    FedAvg-style controller to tune.
    """
    for name in ("task_request_interval", "task_check_period", "default_task_fetch_interval"):
        value = getattr(tuning, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise FedllmError(f"RoundTuning.{name}={value!r}: expected a positive number of seconds")

    for controller in _model_controllers(recipe):
        # BaseModelController.__init__ stores the period as _task_check_period; the job
        # exporter reads the same attribute back as the constructor argument.
        controller._task_check_period = float(tuning.task_check_period)
        if type(controller) is FedAvg:
            # The recipe built NVFlare's FedAvg; TunedFedAvg only adds a method, so the
            # object becomes one as is and the job config names fedllm's class.
            controller.__class__ = TunedFedAvg
        elif not isinstance(controller, TunedFedAvg):
            raise FedllmError(
                f"apply_round_tuning: controller {type(controller).__name__} is neither NVFlare's FedAvg nor "
                "fedllm.federation.tuning.TunedFedAvg; derive it from TunedFedAvg so its period reaches the server"
            )

    recipe.add_server_config({_SERVER_SECTION: {"task_request_interval": float(tuning.task_request_interval)}})
    recipe.add_client_config({"default_task_fetch_interval": float(tuning.default_task_fetch_interval)})
    return tuning


def apply_memory_settings(recipe, gc_every_rounds: int = 1) -> None:
    """Keep the FedAvg server's memory from creeping up across rounds, in place.

    Sets the controller's ``memory_gc_rounds`` (NVFlare default 0 = never): every
    ``gc_every_rounds`` rounds the server runs ``gc.collect()`` and glibc ``malloc_trim`` so
    the previous round's freed update buffers go back to the OS instead of staying in the
    process's heap. One collection per round costs milliseconds against a round of minutes.
    Pair it with ``aggregator=RunningWeightedAverage()`` (fedllm/federation/aggregation.py)
    when building the recipe. Raises FedllmError for a non-positive interval.
    """
    if not isinstance(gc_every_rounds, int) or isinstance(gc_every_rounds, bool) or gc_every_rounds < 1:
        raise FedllmError(f"apply_memory_settings gc_every_rounds={gc_every_rounds!r}: expected an integer >= 1")
    for controller in _model_controllers(recipe):
        if not hasattr(controller, "memory_gc_rounds"):
            raise FedllmError(
                f"apply_memory_settings: controller {type(controller).__name__} has no memory_gc_rounds; "
                "expected NVFlare's FedAvg"
            )
        controller.memory_gc_rounds = gc_every_rounds


def server_memory_settings() -> dict:
    """``FedAvgRecipe`` keyword arguments for the server's memory during aggregation.

    Tensors travel as PyTorch tensors end to end (no numpy copy of every weight on the
    server), and the server downloads each site's update to disk instead of memory
    (NVFlare's tensor disk offload): ``RunningWeightedAverage`` then holds references to the
    files and sums them parameter by parameter at the end of the round, so the updates cost
    the aggregator one fp32 result, whatever the number of sites (NVFlare's own copies of the
    model on the server come on top: B3 in bench/README.md). Where offload cannot
    engage (NVFlare's simulator: no server cell for it), updates arrive in memory and are
    summed as they come. ``bench/b3_server_memory.py`` measures both (B3 in bench/README.md).
    Pair with ``aggregator=RunningWeightedAverage()`` and ``apply_memory_settings(recipe)``.
    """
    from nvflare.client.config import ExchangeFormat

    return {"server_expected_format": ExchangeFormat.PYTORCH, "enable_tensor_disk_offload": True}


def site_process_settings(python: str | None = None, module: str | None = None, processes: int = 1) -> dict:
    """``FedAvgRecipe`` keyword arguments that run each site's script in its own process.

    Pass them when building the recipe: ``FedAvgRecipe(..., **site_process_settings())``.
    In its own process the site script talks to the site over an NVFlare cell, which hands
    over tasks and results with events. In-process (NVFlare's default) it polls both ways
    every 0.5 s (``_RESULT_POLL_INTERVAL`` in ``nvflare/app_common/executors/client_api/
    in_process_backend.py``, a constant no job setting reaches): about 0.5-1 s per round.
    The process is launched once per job (``launch_once``), so start-up is paid once (fedllm's
    job launches a new one at the next task if it dies: fedllm.federation.relaunch).

    ``module``: run the site script as an installed module (``python -m module``) instead of
    the job's copy of ``train_script``. A script that lives inside a package needs it: NVFlare
    2.9 copies it to ``custom/<package path>/<name>.py`` but launches ``custom/<name>.py``. The
    module then receives that path as its first argument and must accept it (fedllm's
    ``fedllm.federation.client`` does). ``python`` defaults to the interpreter running this
    code, so the site uses the same environment in the simulator; in containers it is the
    image's ``python3``.

    ``processes`` > 1: the site script runs as that many processes under ``torchrun``
    (``torch.distributed.run --standalone``: a free local port for their rendezvous), which
    share the site's model (``training.processes_per_site``, fedllm.train.nemo).
    """
    command = f"{python or sys.executable} -u"
    if processes > 1:
        if module is None:
            raise ValueError("site_process_settings: several processes per site need the site script as a module")
        command += f" -m torch.distributed.run --standalone --nproc_per_node {processes}"
    if module is not None:
        command += f" -m {module}"
    return {
        "launch_external_process": True,
        "command": command,
        "launch_once": True,
    }


def _model_controllers(recipe) -> list:
    """The server workflows of ``recipe`` that take a ``task_check_period`` (FedAvg and kin)."""
    from nvflare.app_common.workflows.base_model_controller import BaseModelController

    # Recipe keeps its FedJob as ``_job``; the server app's config holds the workflows
    # (nvflare/job_config/fed_app_config.py). There is no public accessor in NVFlare 2.9.
    job = getattr(recipe, "_job", None)
    server_app = getattr(job, "_deploy_map", {}).get("server") if job is not None else None
    workflows = getattr(getattr(server_app, "app_config", None), "workflows", None)
    if workflows is None:
        raise FedllmError(
            f"apply_round_tuning: {type(recipe).__name__} has no server app with workflows; "
            "expected an nvflare FedAvgRecipe built before tuning"
        )
    controllers = [wf.controller for wf in workflows if isinstance(wf.controller, BaseModelController)]
    if not controllers:
        found = [type(wf.controller).__name__ for wf in workflows]
        raise FedllmError(
            f"apply_round_tuning: server workflows {found} of {type(recipe).__name__} include no "
            "BaseModelController (FedAvg); expected a FedAvg recipe"
        )
    return controllers
