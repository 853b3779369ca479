"""A run's metrics streamed to TensorBoard and MLflow while it trains (``tracking:``).

    the federation  each site sends its events' metrics through NVFlare's client tracking
                    API (``nvflare.client.tracking.SummaryWriter``); the server's receivers
                    (TensorBoard, MLflow; ``nvflare.recipe.utils.add_experiment_tracking``)
                    write them: one MLflow run per site, nested under the federation's run.
                    The driver opens that run before the job and, after it, logs the global
                    model's metrics per round there (val_loss, task accuracy, seconds and
                    bytes per round).
    a baseline      ``site:<name>``, ``centralized`` and ``base`` train outside NVFlare: the
                    same metrics from the same events, written here with TensorBoard's
                    writer and MLflow's client, one MLflow run per setting.

Every MLflow run carries the resolved config as parameters (``training.lr``, ...) and the
tags ``fedllm.setting``, ``fedllm.run_dir`` and ``fedllm.config_sha256``; lm-eval scores are
added to a setting's run when it is evaluated. Steps are optimizer steps, as in the
report's curves, so the federation's and the baselines' curves share an axis.

In the run dir, ``tracking/tensorboard/<setting>/`` holds each setting's event files, a
federation's per site and for the global model (``fedavg/<site>/``, ``fedavg/global/``;
``tensorboard --logdir RUN/tracking/tensorboard``), and ``tracking/<setting>.mlflow.json``
the setting's MLflow run id. NVFlare's TensorBoard receiver writes the sites' files in the
server's job workspace; the simulator's are copied here after the job (a running
federation's server keeps them in its own workspace).

Nothing here imports MLflow or TensorBoard unless the config asks for them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

from fedllm import events
from fedllm.config import ExperimentConfig, TrackingConfig
from fedllm.errors import FedllmError
from fedllm.rundir import RunDir, Setting

#: an event → {metric name: the event's field}; the metric's step is the event's ``step``
METRICS = {
    "train": {"train_loss": "loss", "tokens_per_s": "tokens_per_s", "lr": "lr"},
    "validate": {"val_loss": "loss"},
    "round_end": {"round_tokens_per_s": "tokens_per_s", "bytes_sent": "bytes_sent", "bytes_received": "bytes_received"},
    "task_metric": {"accuracy": "accuracy", "macro_f1": "macro_f1"},
    "setting_end": {"tokens_per_s": "tokens_per_s"},  # a baseline's training speed over its whole budget
}
#: where NVFlare's TensorBoard receiver writes, under the server's job folder
SERVER_TB_FOLDER = "tb_events"
MLFLOW_PARAM_CHARS = 500  # MLflow's limit on a parameter's value in older servers
MLFLOW_BATCH = 100  # parameters per log_batch call


def metrics_of(record: dict) -> dict[str, float]:
    """The metrics one event carries (``METRICS``), numbers only."""
    fields = METRICS.get(record.get("event"), {})
    return {name: float(record[key]) for name, key in fields.items()
            if isinstance(record.get(key), (int, float)) and not isinstance(record.get(key), bool)}


def check_tracking(tracking: TrackingConfig) -> None:
    """Field checks (config load); the packages are checked where they are used."""
    if tracking.mlflow is not None:
        if not tracking.mlflow.uri.strip():
            raise FedllmError("config field 'tracking.mlflow.uri': an MLflow tracking URI is required, e.g. http://127.0.0.1:5000")
        if tracking.mlflow.experiment is not None and not tracking.mlflow.experiment.strip():
            raise FedllmError("config field 'tracking.mlflow.experiment': must not be empty (leave it out for the config's name)")


def _require(package: str, field: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise FedllmError(f"config field '{field}': needs the {package} package; pip install 'fedllm[tracking]'")


def experiment_name(cfg: ExperimentConfig) -> str:
    return cfg.tracking.mlflow.experiment or cfg.name


def config_params(cfg: ExperimentConfig) -> dict[str, str]:
    """The resolved config, flattened: ``{"training.lr": "0.003", "data.sources.0.name": "dolly", ...}``;
    values that are not strings as JSON, each cut to MLflow's 500 characters."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        elif isinstance(value, list) and any(isinstance(item, dict) for item in value):
            for i, item in enumerate(value):
                walk(f"{prefix}.{i}", item)
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            flat[prefix] = text[:MLFLOW_PARAM_CHARS]

    walk("", cfg.to_dict())
    return flat


# -- MLflow -------------------------------------------------------------------------------


def _mlflow(cfg: ExperimentConfig):
    _require("mlflow", "tracking.mlflow")
    # MLflow prints a "View run" line to stdout as a run ends; stdout carries event lines.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=cfg.tracking.mlflow.uri)


def _experiment_id(client, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # created meanwhile by another process of this run (a site, the server)
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _log_params(client, run_id: str, cfg: ExperimentConfig) -> None:
    from mlflow.entities import Param

    params = [Param(k, v) for k, v in config_params(cfg).items()]
    for i in range(0, len(params), MLFLOW_BATCH):
        client.log_batch(run_id, params=params[i:i + MLFLOW_BATCH])


def start_mlflow_run(cfg: ExperimentConfig, layout: RunDir, setting: str | Setting) -> str:
    """A new MLflow run for ``setting``, with the config as parameters; its id is kept in
    ``tracking/<setting>.mlflow.json`` (what later steps log to)."""
    client = _mlflow(cfg)
    tags = {"fedllm.setting": str(setting), "fedllm.run_dir": str(layout.root), "fedllm.config_sha256": cfg.fingerprint()}
    run = client.create_run(_experiment_id(client, experiment_name(cfg)), run_name=str(setting), tags=tags)
    _log_params(client, run.info.run_id, cfg)
    path = layout.mlflow_run_file(setting)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"run_id": run.info.run_id, "experiment": experiment_name(cfg), "uri": cfg.tracking.mlflow.uri}))
    events.emit("mlflow_run", site=str(setting), run_id=run.info.run_id, experiment=experiment_name(cfg), uri=cfg.tracking.mlflow.uri)
    return run.info.run_id


def mlflow_run_id(layout: RunDir, setting: str | Setting) -> Optional[str]:
    """The MLflow run id of ``setting`` in this run dir, if it was started."""
    path = layout.mlflow_run_file(setting)
    return json.loads(path.read_text())["run_id"] if path.is_file() else None


# -- one setting's metrics --------------------------------------------------------------------


class SettingTracker:
    """Where one setting's metrics go from this process: its TensorBoard folder
    (``tracking/tensorboard/<setting>[/<name>]``) and its MLflow run (``run_id``, if any)."""

    def __init__(self, cfg: ExperimentConfig, layout: RunDir, setting: str | Setting, run_id: Optional[str], name: str = ""):
        self.cfg, self.layout, self.setting, self.run_id = cfg, layout, Setting.parse(setting), run_id
        self.client = _mlflow(cfg) if run_id else None
        self.logged: set[tuple[str, int]] = set()  # (metric, step) logged through this tracker
        self.writer = None
        if cfg.tracking.tensorboard:
            _require("tensorboard", "tracking.tensorboard")
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(layout.tensorboard(setting) / name))

    def log(self, metrics: dict[str, float], step: Optional[int]) -> None:
        step = int(step or 0)
        for key, value in metrics.items():
            self.logged.add((key, step))
            if self.writer is not None:
                self.writer.add_scalar(key, value, step)
        if self.client is not None and metrics:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_event(self, record: dict) -> None:
        self.log(metrics_of(record), record.get("step"))

    def log_curve(self, key: str, curve: list) -> None:
        """The ``[step, value]`` points of a curve not logged yet (a baseline's curve starts
        with the base model's loss, known without an event)."""
        for step, value in curve:
            if (key, int(step)) not in self.logged:
                self.log({key: value}, step)

    def close(self, status: Optional[str] = "FINISHED") -> None:
        """Flush; ``status`` (FINISHED, FAILED) ends the MLflow run, None leaves it as it is."""
        if self.writer is not None:
            self.writer.close()
        if self.client is not None and status:
            self.client.set_terminated(self.run_id, status=status)


@contextlib.contextmanager
def track_setting(cfg: ExperimentConfig, layout: RunDir, setting: str | Setting):
    """Around one non-federated setting's training in this process (a baseline, the base
    model's scoring): a new MLflow run, and every event of ``setting`` logged as it is
    emitted. Yields the :class:`SettingTracker` (None when tracking is off); its run ends
    FINISHED, or FAILED if the block raises."""
    if not cfg.tracking.enabled:
        yield None
        return
    run_id = start_mlflow_run(cfg, layout, setting) if cfg.tracking.mlflow is not None else None
    tracker = SettingTracker(cfg, layout, setting, run_id)
    stop = events.listen(lambda record: record.get("site") == str(setting) and tracker.log_event(record))
    try:
        yield tracker
    except BaseException:
        stop()
        tracker.close("FAILED")
        raise
    stop()
    tracker.close("FINISHED")


def log_evaluation(cfg: ExperimentConfig, layout: RunDir, setting: str | Setting, metrics: dict) -> None:
    """lm-eval's scores of a finished setting (``{"piqa/acc": {"value": ...}}``) as
    ``eval/<task>/<metric>`` on its run (step 0)."""
    if not cfg.tracking.enabled:
        return
    tracker = SettingTracker(cfg, layout, setting, mlflow_run_id(layout, setting) if cfg.tracking.mlflow else None, name="eval")
    tracker.log({f"eval/{k}": v["value"] for k, v in metrics.items() if isinstance(v.get("value"), (int, float))}, 0)
    tracker.close(status=None)


# -- the federation ----------------------------------------------------------------------------


def stream_site_metrics(tracking: TrackingConfig) -> Optional[Callable[[], None]]:
    """In a federation's site process (after ``flare.init()``): send every event's metrics
    to the server's receivers through NVFlare's client tracking API. Returns the function
    that stops it (None when tracking is off)."""
    if not tracking.enabled:
        return None
    from nvflare.client.tracking import SummaryWriter

    writer = SummaryWriter()

    def send(record: dict) -> None:
        for key, value in metrics_of(record).items():
            writer.add_scalar(key, value, global_step=int(record.get("step") or 0))

    return events.listen(send)


def add_receivers(recipe, cfg: ExperimentConfig, layout: RunDir, start_round: int = 0) -> None:
    """The server's TensorBoard and MLflow receivers, added to a federation's job.

    With MLflow, the federation's own run is started here, in the process that builds
    the job (a resumed job, ``start_round`` > 0, continues the one already started); the
    receiver's per-site runs are nested under it (tag ``mlflow.parentRunId``)."""
    t = cfg.tracking
    if not t.enabled:
        return
    from nvflare.recipe.utils import add_experiment_tracking

    if t.tensorboard:
        _require("tensorboard", "tracking.tensorboard")
        add_experiment_tracking(recipe, "tensorboard", {"tb_folder": SERVER_TB_FOLDER})
    if t.mlflow is not None:
        parent = (mlflow_run_id(layout, "fedavg") if start_round else None) or start_mlflow_run(cfg, layout, "fedavg")
        add_experiment_tracking(recipe, "mlflow", {
            "tracking_uri": t.mlflow.uri,
            "kw_args": {
                "experiment_name": experiment_name(cfg),
                # given, even empty: without it NVFlare's receiver print()s a "tag key ... not found"
                # line to stdout, which carries event lines only
                "experiment_tags": {},
                "run_name": "fedavg",
                "run_tags": {"mlflow.parentRunId": parent, "fedllm.setting": "fedavg", "fedllm.run_dir": str(layout.root),
                             "fedllm.config_sha256": cfg.fingerprint()},
            },
        })


def log_federation(cfg: ExperimentConfig, layout: RunDir, setting: str | Setting, result: dict) -> None:
    """After a federation: the global model's metrics per round on the federation's run
    (``val_loss``, ``accuracy``/``macro_f1``, ``round_seconds``, ``bytes_sent``/``bytes_received``
    summed over sites, ``tokens_per_s``), the config on its sites' runs, and the sites'
    TensorBoard files copied out of the simulator's workspace. ``layout`` is the
    federation's run folder (a variant's own)."""
    if not cfg.tracking.enabled:
        return
    setting = Setting.parse(setting)
    run_id = mlflow_run_id(layout, "fedavg") if cfg.tracking.mlflow is not None else None
    tracker = SettingTracker(cfg, layout, setting, run_id, name="global")
    spr = max((result.get("steps_per_round") or {"": 1}).values())
    for step, loss in result["val_loss_curve"]:
        tracker.log({"val_loss": loss}, step)
    for point in (result.get("task") or {}).get("curve", []):
        tracker.log({"accuracy": point["accuracy"], "macro_f1": point["macro_f1"]}, point["step"])
    for entry in result.get("rounds", []):
        if entry.get("seconds") is not None:
            tracker.log({"round_seconds": entry["seconds"]}, int(entry["round"]) * spr)
    per_round: dict[int, dict[str, float]] = {}
    for site_rounds in (result.get("bytes_per_round") or {}).values():
        for r in site_rounds:
            total = per_round.setdefault(int(r["round"]), {"bytes_sent": 0.0, "bytes_received": 0.0})
            total["bytes_sent"] += r["sent"] or 0
            total["bytes_received"] += r["received"] or 0
    for r, totals in sorted(per_round.items()):
        tracker.log(totals, r * spr)
    if result.get("train_tokens_per_s") is not None:
        tracker.log({"tokens_per_s": result["train_tokens_per_s"]}, result.get("steps"))
    if tracker.client is not None:
        client = tracker.client
        client.set_tag(run_id, "mlflow.runName", str(setting))
        client.set_tag(run_id, "fedllm.setting", str(setting))
        experiment = client.get_run(run_id).info.experiment_id
        for child in client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'"):
            if not child.data.params:
                _log_params(client, child.info.run_id, cfg)
    tracker.close("FINISHED")
    if cfg.tracking.tensorboard:
        copy_server_tensorboard(layout, setting)


def copy_server_tensorboard(layout: RunDir, setting: str | Setting) -> list[str]:
    """The sites' TensorBoard files the simulator's server wrote (``<workspace>/**/tb_events/<site>``),
    copied to ``tracking/tensorboard/<setting>/<site>``; the sites copied."""
    copied = []
    for folder in sorted(layout.workspace.glob(f"**/{SERVER_TB_FOLDER}")):
        for site in sorted(p for p in folder.iterdir() if p.is_dir()):
            shutil.copytree(site, layout.tensorboard(setting) / site.name, dirs_exist_ok=True)
            copied.append(site.name)
    return copied
