"""A site whose training process died rejoins the job at its next task.

Each fedllm site trains in an external process that NVFlare launches once per job
(``fedllm.federation.tuning.site_process_settings``). When that process dies, NVFlare 2.9's
``ExternalProcessBackend`` latches an abort and answers every later task of the job with
``EXECUTION_EXCEPTION`` (``_execute_admitted_task``: ``if self._abort: ... return
make_reply(ReturnCode.EXECUTION_EXCEPTION)``), so the server's controller loses the site for
the rest of the job (fedllm.federation.participation).

:class:`SiteRestartingExecutor` is NVFlare's ``ClientAPIExecutor`` whose external-process
backend is :class:`SiteRestartingBackend`: when a task arrives and the launch-once trainer
is gone (its process group exited, or its heartbeat timed out: it is stopped first), it
launches a fresh one with the job's command and runs the task with it. The site's
``events/site-<site>.jsonl`` gets a ``site_restarted`` event (site, round, reason). The new
``python -m fedllm.federation.client`` receives the global model with the task and starts at
its round (``start_at_round``/``RoundStart``/``RoundOrder`` in fedllm/federation/client.py): the
step count, LR schedule and data order are those of an unbroken process at that round.

It does not relaunch when the run is ending or aborting: after END_RUN (the backend is
closed), a run abort (``abort()`` with ``RUN_ABORT_REQUESTED``), or a lost lazy result source
(NVFlare fails the site's job then); each of these sets the backend's terminal intent or
triggers the run's abort signal, which this backend checks before relaunching. A task in
which the trainer dies still fails (its work is lost); the site trains again from the next
task.

NVFlare 2.9 has no public hook for this (``backend_spec.py`` calls backends "not a user
extension point"): the executor's ``_create_external_process_backend`` factory and the
backend's private members listed in ``_BACKEND_METHODS``/``_BACKEND_ATTRIBUTES`` are used, and
:func:`check_nvflare_internals` fails with a FedllmError naming the NVFlare version if any is
missing.

The executor adds no constructor argument: the job config exports ClientAPIExecutor's own
arguments under this class's path, and :func:`restart_dead_site_trainers` re-creates the
recipe's executors from those arguments (the Job API's rule: a component is re-created from
its constructor arguments, kept as same-named attributes).
"""

from __future__ import annotations

import shlex
from typing import Optional

import nvflare
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.shareable import make_reply
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.executors.client_api.external_process_backend import ExternalProcessBackend
from nvflare.app_common.executors.client_api_executor import ClientAPIExecutor, ExecutionMode
from nvflare.security.logging import secure_format_exception

from fedllm import events
from fedllm.errors import FedllmError
from fedllm.rundir import RunDir

#: ExternalProcessBackend (NVFlare 2.9.0) methods this module calls or overrides
_BACKEND_METHODS = ("_execute_admitted_task", "_launch_trainer", "_stop_trainer", "_trainer_liveness_error",
                    "_latch_abort")
#: and the state it reads/resets (set in ExternalProcessBackend/CellBackendBase.__init__)
_BACKEND_ATTRIBUTES = ("_context", "_abort", "_abort_reason", "_active_launch", "_launch_lock", "_lifecycle_lock",
                       "_terminal_intent", "_closed", "_run_abort_signal", "_site_name")
#: ClientAPIExecutor's backend factory this module overrides
_EXECUTOR_METHODS = ("_create_external_process_backend",)


def check_nvflare_internals(backend: Optional[ExternalProcessBackend] = None) -> None:
    """Raise FedllmError unless NVFlare's private members this module relies on exist."""
    backend = backend if backend is not None else ExternalProcessBackend()
    missing = [f"ExternalProcessBackend.{m}" for m in _BACKEND_METHODS if not callable(getattr(ExternalProcessBackend, m, None))]
    missing += [f"ExternalProcessBackend().{a}" for a in _BACKEND_ATTRIBUTES if not hasattr(backend, a)]
    missing += [f"ClientAPIExecutor.{m}" for m in _EXECUTOR_METHODS if not callable(getattr(ClientAPIExecutor, m, None))]
    if missing:
        raise FedllmError(
            f"fedllm.federation.relaunch needs NVFlare 2.9.0's {', '.join(missing)}, missing in the installed "
            f"NVFlare {nvflare.__version__}: a site could not relaunch its dead training process; "
            "install nvflare==2.9.0 or port fedllm/federation/relaunch.py"
        )


def run_dir_of(command) -> Optional[str]:
    """The ``--run-dir`` argument of a site's training command (argv list or string), or None."""
    argv = shlex.split(command) if isinstance(command, str) else list(command or [])
    for i, arg in enumerate(argv):
        if arg == "--run-dir" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--run-dir="):
            return arg.split("=", 1)[1]
    return None


class SiteRestartingBackend(ExternalProcessBackend):
    """NVFlare's external-process backend that relaunches a dead launch-once trainer at the next task."""

    def __init__(self):
        super().__init__()
        check_nvflare_internals(self)
        self.restarts = 0

    def _execute_admitted_task(self, task_name, shareable, fl_ctx, abort_signal):
        if self._context.launch_once and not abort_signal.triggered:
            reason = self._lost_trainer_reason()
            if reason is not None:
                failed = self._relaunch(reason, task_name, shareable, fl_ctx, abort_signal)
                if failed is not None:
                    return failed
        return super()._execute_admitted_task(task_name, shareable, fl_ctx, abort_signal)

    def _run_is_ending(self) -> bool:
        run_abort = self._run_abort_signal
        return self._closed or self._terminal_intent is not None or (run_abort is not None and run_abort.triggered)

    def _lost_trainer_reason(self) -> Optional[str]:
        """Why the launch-once trainer cannot take a task (it died), or None: it is live, or the run is ending."""
        with self._lifecycle_lock:
            if self._run_is_ending():
                return None
            if self._abort:
                # A task before this one found the trainer dead (or unresponsive) and stopped it.
                return self._abort_reason or "the trainer was lost"
        trainer = self._active_launch
        if trainer is None:
            return "no trainer process"
        if trainer.ready.is_set():
            return self._trainer_liveness_error(trainer)
        return None

    def _relaunch(self, reason, task_name, shareable, fl_ctx, abort_signal):
        """Stop what is left of the old trainer and launch a new one. Returns None on success, else the task's reply."""
        executor = self._context.executor
        old = self._active_launch
        if old is not None:
            self._stop_trainer(old, natural_exit_wait=0.0)  # idempotent: reaps the dead group, cleans its session
        with self._lifecycle_lock:
            if self._run_is_ending():
                return None  # the run ended meanwhile: NVFlare's own path fails the task
            self._abort = False
            self._abort_reason = None
        current_round = shareable.get_header(AppConstants.CURRENT_ROUND)
        executor.log_warning(fl_ctx, f"site training process lost ({reason}); launching a new one for task '{task_name}'")
        try:
            self._launch_trainer(timeout=self._context.launch_timeout, abort_signal=abort_signal)
        except Exception as e:
            if abort_signal.triggered:
                return make_reply(ReturnCode.TASK_ABORTED)
            message = f"relaunching the site training process failed: {secure_format_exception(e)}"
            self._latch_abort(message)  # the next task tries again
            executor.log_error(fl_ctx, f"{message}; failing task '{task_name}'")
            self._emit("site_restart_failed", current_round, reason=reason, error=secure_format_exception(e))
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        self.restarts += 1
        self._emit("site_restarted", current_round, reason=reason, task=task_name, restarts=self.restarts)
        return None

    def _emit(self, event: str, current_round, **fields) -> None:
        run_dir = run_dir_of(self._context.command)
        file = RunDir(run_dir).site_events(self._site_name) if run_dir else None
        try:
            events.emit(event, file=file, site=self._site_name, round=current_round, **fields)
        except OSError as e:  # the event log is a report; the relaunch stands
            self.logger.error(f"cannot write {event} to {file}: {e}")


class SiteRestartingExecutor(ClientAPIExecutor):
    """NVFlare's ClientAPIExecutor whose external_process backend relaunches a dead trainer
    (:class:`SiteRestartingBackend`). Same constructor arguments as ClientAPIExecutor."""

    def _create_external_process_backend(self):
        return SiteRestartingBackend()


def restart_dead_site_trainers(job) -> int:
    """Make every launch-once external-process ClientAPIExecutor of ``job``'s client apps a
    :class:`SiteRestartingExecutor`, re-created from its constructor arguments. Returns how
    many were replaced. ``job`` is an nvflare FedJob (a recipe's ``_job``)."""
    from nvflare.fuel.utils.class_utils import get_component_init_parameters
    from nvflare.job_config.fed_app_config import ClientAppConfig

    check_nvflare_internals()
    # FedJob keeps its apps in _deploy_map (target -> app), each app its config's executors as
    # _ExecutorDef(tasks, executor) (nvflare/job_config/api.py, fed_app_config.py); no public accessor in 2.9.
    deploy_map = getattr(job, "_deploy_map", None)
    if not isinstance(deploy_map, dict):
        raise FedllmError(f"restart_dead_site_trainers: {type(job).__name__} has no _deploy_map in NVFlare "
                          f"{nvflare.__version__}; expected NVFlare 2.9.0's FedJob")
    replaced = 0
    for target, app in deploy_map.items():
        config = getattr(app, "app_config", None)
        if not isinstance(config, ClientAppConfig):
            continue
        for definition in config.executors:
            old = definition.executor
            if (type(old) is not ClientAPIExecutor or old.execution_mode != ExecutionMode.EXTERNAL_PROCESS
                    or not getattr(old, "_launch_once", False)):
                continue
            args = {}
            for name in get_component_init_parameters(old):
                if name in ("self", "args", "kwargs"):
                    continue
                attr = name if name in old.__dict__ else f"_{name}"
                if attr not in old.__dict__:
                    raise FedllmError(f"restart_dead_site_trainers: ClientAPIExecutor of {target} keeps no {name} "
                                      f"(nor _{name}) in NVFlare {nvflare.__version__}: cannot re-create it")
                args[name] = old.__dict__[attr]
            definition.executor = SiteRestartingExecutor(**args)
            replaced += 1
    return replaced
