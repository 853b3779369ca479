"""What each Kubeflow component does, as plain functions of artifact paths.

The components in ``components/`` are one call each into this module; this
module calls the same ``fedllm.run`` step functions ``fedllm run`` calls. Each
step works in a run dir laid out from its input artifacts (see
``fedllm.pipeline.workspace``) and writes only what it added to its output
artifact, so the artifacts of one pipeline run, put together, are exactly the
run dir ``fedllm run`` makes.

    partition_step   config text or URI → prepared run dir; the settings to train
    train_step       one of base / site:<name> / centralized → settings/ + models/
    federate_step    FedAvg (simulator, or submitted to a running federation)
    evaluate_step    zero-shot lm-eval of one setting → {"setting", "result"}
    report_step      every artifact → full run dir, summary.json, report
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from fedllm.errors import FedllmError

FEDERATION_MODES = ("simulator", "submit")


def load_pipeline_config(config: str, overrides: list[str]):
    """The experiment config a pipeline run was started with.

    ``config`` is the YAML text itself (what the Kubeflow UI's parameter box
    holds), or one line naming a file: an ``s3://`` URI (read from MinIO with
    the credentials in the step's environment) or a local path.
    """
    from fedllm.config import load_config

    text = config.strip()
    if not text:
        raise FedllmError("pipeline parameter 'config': empty; give the experiment YAML text or an s3:// URI of it")
    if "\n" not in text and (text.startswith("s3://") or text.startswith("file://") or text.endswith((".yaml", ".yml"))):
        from fedllm.store import fetch_path

        with tempfile.TemporaryDirectory(prefix="fedllm-config-") as tmp:
            return load_config(fetch_path(text, tmp), overrides)
    with tempfile.TemporaryDirectory(prefix="fedllm-config-") as tmp:
        # The file name is what an error message shows: it names the parameter.
        path = Path(tmp) / "pipeline-parameter-config.yaml"
        path.write_text(config)
        return load_config(path, overrides)


def check_federation_mode(mode: str) -> str:
    if mode not in FEDERATION_MODES:
        raise FedllmError(f"pipeline parameter 'federation_mode': {mode!r}; allowed: {', '.join(FEDERATION_MODES)}")
    return mode


def partition_step(config: str, overrides: list[str], run_out: str, federation_mode: str = "simulator") -> list[str]:
    """Prepare the run dir at ``run_out``; return the settings trained outside
    the federation (``base``, ``site:<name>`` per site, ``centralized``), in the
    order ``fedllm run`` trains them."""
    from fedllm.run import prepare, settings_of

    check_federation_mode(federation_mode)
    cfg = load_pipeline_config(config, overrides)
    run = prepare(cfg, run_out)
    return [s for s in settings_of(run) if s != "fedavg"]


def train_step(prepared: str, setting: str, model_out: str) -> dict:
    """Train (or, for ``base``, only score) one setting; its files go to ``model_out``."""
    from fedllm.pipeline.workspace import open_workspace, pack_new_files
    from fedllm.run import run_baseline, score_base

    work = open_workspace([prepared])
    try:
        if setting == "base":
            score_base(work)
        else:
            run_baseline(work, setting)
        result = relocatable(work, setting)
        pack_new_files(work, model_out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def federate_step(
    prepared: str,
    model_out: str,
    mode: str = "simulator",
    admin_kit: Optional[str] = None,
    shared_run_root: Optional[str] = None,
    timeout_s: float = 0,
) -> dict:
    """FedAvg over the run's sites; ``settings/fedavg.json``, ``models/fedavg``,
    the per-round global models and every site's events go to ``model_out``.

    ``simulator``: NVFlare's simulator in this process (the pod holds the GPUs).
    ``submit``: the job goes to a running federation through its admin API
    (``admin_kit``: the admin startup kit, a Secret mount or a kit dir); the run
    dir is copied under ``shared_run_root``, a folder the federation's server
    and sites see at the same path.
    """
    from fedllm.pipeline.workspace import open_workspace, pack_new_files
    from fedllm.run import run_federation

    check_federation_mode(mode)
    if mode == "simulator":
        work = open_workspace([prepared])
        try:
            run_federation(work)
            result = relocatable(work, "fedavg")
            pack_new_files(work, model_out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return result

    from fedllm.federation.submit import submitter

    if not admin_kit:
        raise FedllmError("federate (submit mode): no admin startup kit; mount the admin kit Secret (pipeline parameter 'admin_kit_secret')")
    if not shared_run_root:
        raise FedllmError(
            "pipeline parameter 'shared_run_root': required in submit mode; a folder the federation's server and sites "
            "mount at the same path (e.g. a ReadWriteMany volume at /shared/fedllm-runs)"
        )
    Path(shared_run_root).mkdir(parents=True, exist_ok=True)
    # The federation's processes read the run dir: real copies, not links into this pod's artifacts.
    work = open_workspace([prepared], under=shared_run_root, copy=True)
    try:
        run_federation(work, runner=submitter(admin_kit, timeout_s=timeout_s))
        result = relocatable(work, "fedavg")
        pack_new_files(work, model_out, baseline=prepared)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def relocatable(work: Path, setting: str) -> dict:
    """Rewrite ``settings/<setting>.json`` with its model paths relative to the
    run dir: the step's workspace is gone when the next step reads the entry."""
    from fedllm.files import write_json_atomic
    from fedllm.rundir import RunDir

    path = RunDir(work).setting_file(setting)
    entry = json.loads(path.read_text())
    for key in ("model_dir", "adapter_dir"):
        value = entry.get(key)
        if value and Path(value).is_absolute() and Path(value).is_relative_to(work):
            entry[key] = Path(value).relative_to(work).as_posix()
    write_json_atomic(path, entry)
    return entry


def evaluate_step(prepared: str, model: str, setting: str, scores_out: str) -> Optional[dict]:
    """Score one setting's model; write ``{"setting", "result"}`` to ``scores_out``
    and return the metrics (``None``, and ``"result": null``, when the config
    turns evaluation off)."""
    from fedllm.config import load_config
    from fedllm.pipeline.workspace import open_workspace
    from fedllm.run import evaluate_setting
    from fedllm.rundir import RunDir

    work = open_workspace([prepared, model])
    try:
        enabled = load_config(RunDir(work).config).evaluation.enabled
        result = evaluate_setting(work, setting) if enabled else None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(scores_out).parent.mkdir(parents=True, exist_ok=True)
    Path(scores_out).write_text(json.dumps({"setting": setting, "result": result}, indent=2))
    return result["metrics"] if result else None


def report_step(prepared: str, models: list[str], scores: list[str], run_out: str, html_out: str, markdown_out: str) -> dict:
    """Put every artifact together into the run dir ``fedllm run`` would have
    made (at ``run_out``), write summary.json and the report; copy the report's
    index.html and report.md to ``html_out`` and ``markdown_out``."""
    from fedllm.pipeline.workspace import copy_run, open_workspace
    from fedllm.files import write_json_atomic
    from fedllm.report import write_report
    from fedllm.run import write_summary
    from fedllm.rundir import RunDir

    work = open_workspace([prepared, *models])
    try:
        for path in scores:
            entry = json.loads(Path(path).read_text())
            if entry["result"] is not None:
                write_json_atomic(RunDir(work).eval_file(entry["setting"]), entry["result"])
        summary = write_summary(work)
        index = write_report(work)
        copy_run(work, run_out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = RunDir(run_out).report
    for source, out in ((report / index.name, html_out), (report / "report.md", markdown_out)):
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, out)
    return summary
