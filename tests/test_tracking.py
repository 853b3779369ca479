"""``tracking:`` as a user sets it up: a real MLflow tracking server (the PyPI package's
``mlflow server``) on localhost, and ``fedllm run`` of the tiny config with TensorBoard and
MLflow on. MLflow's API then lists a run for the federation (its sites' runs nested under
it) and one per baseline, each with its metrics per round and the config as parameters;
TensorBoard's own reader finds the scalars of every site.

The run is the session's one tiny tracked run (tests/tracked_runs.py), which
test_progress.py also checks, for what it prints piped."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY_CONFIG
from fedllm.config import load_config
from fedllm.errors import FedllmError
from fedllm.tracking import config_params
from tracked_runs import TRACKED_EXPERIMENT, TRACKED_ROUNDS

ROUNDS = TRACKED_ROUNDS  # 2
SITES = ["dolly", "oasst1"]  # tiny_config's two sources, one site each


def test_tracking_is_off_by_default_and_leaves_the_fingerprint_alone():
    plain = load_config(TINY_CONFIG)
    tracked = load_config(TINY_CONFIG, ["tracking.tensorboard=true", "tracking.mlflow.uri=http://127.0.0.1:5000"])
    assert not plain.tracking.enabled and tracked.tracking.enabled
    assert tracked.tracking.mlflow.experiment is None  # the config's name is used
    # where metrics go changes no result: a run dir resumes with tracking switched on
    assert tracked.fingerprint() == plain.fingerprint()


def test_tracking_fields_are_checked_at_load():
    with pytest.raises(FedllmError, match=r"tracking.mlflow.uri': an MLflow tracking URI is required"):
        load_config(TINY_CONFIG, ["tracking.mlflow.experiment=x"])
    with pytest.raises(FedllmError, match=r"'tracking.mlflow.experiment': must not be empty"):
        load_config(TINY_CONFIG, ["tracking.mlflow.uri=http://127.0.0.1:5000", "tracking.mlflow.experiment=''"])
    with pytest.raises(FedllmError, match=r"'tracking.wandb' is unknown; allowed fields of tracking: mlflow, tensorboard"):
        load_config(TINY_CONFIG, ["tracking.wandb=true"])


def test_config_params_flatten_the_resolved_config():
    params = config_params(load_config(TINY_CONFIG, ["method.params={note: " + "x" * 600 + "}", "method.name=lora"]))
    assert params["federation.rounds"] == "3" and params["training.lr"] == "0.003"
    assert params["data.sources.2.name"] == "medical" and params["training.adam_betas"] == "[0.9, 0.98]"
    assert params["model.revision"] == "null" and len(params["method.params.note"]) == 500  # MLflow's limit
    assert all(len(v) <= 500 for v in params.values())


def test_importing_fedllm_imports_no_tracker():
    code = ("import sys, fedllm.run, fedllm.tracking; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'mlflow', 'tensorboard', 'torch.utils.tensorboard'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "[]"


@pytest.fixture(scope="module")
def tracked_run(tracked_cli_run):
    """The session's tiny tracked run (tests/tracked_runs.py; test_progress.py checks its piped
    output): its run dir."""
    return tracked_cli_run.root


def runs_by_setting(uri: str) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(TRACKED_EXPERIMENT)
    assert experiment is not None, "the experiment named in tracking.mlflow.experiment was not created"
    runs = client.search_runs([experiment.experiment_id])
    return client, {r.data.tags.get("fedllm.setting"): r for r in runs if "mlflow.parentRunId" not in r.data.tags}, runs


@pytest.mark.slow  # one tiny run of every setting, and an MLflow server: 2-3 minutes on 2 shared cores
def test_mlflow_server_lists_the_federation_and_each_baseline(tracked_run, mlflow_server):
    client, settings, runs = runs_by_setting(mlflow_server)
    expected = {"base", "fedavg", "centralized", *(f"site:{s}" for s in SITES)}
    assert set(settings) == expected
    config = yaml.safe_load((tracked_run / "config.yaml").read_text())
    summary = json.loads((tracked_run / "summary.json").read_text())
    for name, run in settings.items():
        assert run.info.status == "FINISHED", name
        assert run.info.run_name == name
        # the resolved config as parameters, flattened
        params = run.data.params
        assert params["federation.rounds"] == str(ROUNDS)
        assert float(params["training.lr"]) == config["training"]["lr"]
        assert params["data.sources.0.name"] == "dolly"
        assert params["tracking.mlflow.uri"] == mlflow_server
        # all of them (logged MLFLOW_BATCH at a time: MLflow takes 100 per call)
        assert len(params) == len(config_params(load_config(tracked_run / "config.yaml")))
        assert run.data.tags["fedllm.config_sha256"] == summary["config_sha256"]
        # the setting's final validation loss, as summary.json has it
        assert run.data.metrics["val_loss"] == pytest.approx(summary["settings"][name]["val_loss"], rel=1e-5)

    # The global model per round: the validation loss of rounds 0..R (as the report's curve),
    # the seconds and bytes of each round.
    fedavg = settings["fedavg"].info.run_id
    history = client.get_metric_history(fedavg, "val_loss")
    assert [(m.step, round(m.value, 5)) for m in history] == [
        (step, round(loss, 5)) for step, loss in summary["settings"]["fedavg"]["val_loss_curve"]]
    assert len(history) >= ROUNDS + 1
    for metric in ("round_seconds", "bytes_sent", "bytes_received"):
        assert len(client.get_metric_history(fedavg, metric)) == ROUNDS, metric
    sent = sum(r["sent"] for site in summary["settings"]["fedavg"]["bytes_per_round"].values() for r in site if r["round"] == 1)
    assert client.get_metric_history(fedavg, "bytes_sent")[0].value == sent

    # Each site's run, streamed by NVFlare's MLflow receiver, nested under the federation's.
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == fedavg]
    assert sorted(r.info.run_name.split("-")[0] for r in children) == SITES
    for child in children:
        site_loss = client.get_metric_history(child.info.run_id, "val_loss")
        assert len(site_loss) == ROUNDS  # the global model of each round, on the site's own val split
        assert len(client.get_metric_history(child.info.run_id, "bytes_sent")) == ROUNDS
        assert child.data.params["federation.rounds"] == str(ROUNDS)

    # A baseline's curve: validated every training.val_check_steps over the whole budget.
    site_alone = client.get_metric_history(settings[f"site:{SITES[0]}"].info.run_id, "val_loss")
    assert {m.step for m in site_alone} == {step for step, _ in summary["settings"][f"site:{SITES[0]}"]["val_loss_curve"]}
    assert "tokens_per_s" in settings["centralized"].data.metrics


@pytest.mark.slow  # shares test_mlflow_server_lists...'s run
def test_tensorboard_reader_finds_scalars_per_site(tracked_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def scalars(folder: Path) -> dict:
        files = list(folder.glob("events.out.tfevents.*"))
        assert files, f"no TensorBoard event file in {folder}"
        reader = EventAccumulator(str(folder))
        reader.Reload()
        return {tag: [(e.step, e.value) for e in reader.Scalars(tag)] for tag in reader.Tags()["scalars"]}

    board = tracked_run / "tracking" / "tensorboard"
    for site in SITES:  # streamed through NVFlare's TensorBoard receiver
        found = scalars(board / "fedavg" / site)
        assert len(found["val_loss"]) == ROUNDS
        assert len(found["bytes_sent"]) == ROUNDS and all(v > 0 for _, v in found["bytes_sent"])
        assert "round_tokens_per_s" in found
    summary = json.loads((tracked_run / "summary.json").read_text())
    global_loss = scalars(board / "fedavg" / "global")["val_loss"]
    assert [s for s, _ in global_loss] == [s for s, _ in summary["settings"]["fedavg"]["val_loss_curve"]]
    for setting in ["base", "centralized", *(f"site-{s}" for s in SITES)]:
        assert "val_loss" in scalars(board / setting), setting
