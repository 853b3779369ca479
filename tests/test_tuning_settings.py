"""fedllm's round and memory settings land in the exported NVFlare job config."""

import json
import sys

import pytest
from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe

from fedllm.errors import FedllmError
from fedllm.federation.aggregation import RunningWeightedAverage
from fedllm.federation.tuning import (
    RoundTuning,
    apply_memory_settings,
    apply_round_tuning,
    site_process_settings,
)


def _recipe(tmp_path, **kwargs):
    script = tmp_path / "site.py"
    script.write_text("import nvflare.client as flare\nflare.init()\n")
    return FedAvgRecipe(
        name="tuned",
        model={"class_path": "torch.nn.Linear", "args": {"in_features": 4, "out_features": 2}},
        min_clients=2,
        num_rounds=3,
        train_script=str(script),
        **kwargs,
    )


def _exported_configs(recipe, job_dir):
    recipe.export(str(job_dir))
    app = job_dir / "tuned" / "app" / "config"
    return json.loads((app / "config_fed_server.json").read_text()), json.loads((app / "config_fed_client.json").read_text())


def test_tuned_job_exports_every_setting(tmp_path):
    recipe = _recipe(tmp_path, aggregator=RunningWeightedAverage(), **site_process_settings())
    applied = apply_round_tuning(recipe)
    apply_memory_settings(recipe)
    server, client = _exported_configs(recipe, tmp_path / "job")

    assert server["server"]["task_request_interval"] == applied.task_request_interval == 0.05
    (controller,) = [wf for wf in server["workflows"] if wf["path"] == "fedllm.federation.tuning.TunedFedAvg"]
    assert controller["args"]["task_check_period"] == 0.01
    assert controller["args"]["memory_gc_rounds"] == 1
    assert controller["args"]["aggregator"]["path"] == "fedllm.federation.aggregation.RunningWeightedAverage"

    assert client["default_task_fetch_interval"] == 0.05
    (executor,) = client["executors"]
    assert executor["executor"]["args"]["execution_mode"] == "external_process"
    assert executor["executor"]["args"]["command"][0] == sys.executable


def test_the_check_period_reaches_the_server_that_runs_the_tasks(tmp_path):
    from nvflare.apis.impl.wf_comm_server import WFCommServer
    from nvflare.app_common.workflows.fedavg import FedAvg

    from fedllm.federation.tuning import TunedFedAvg

    # NVFlare's own FedAvg leaves its WFCommServer at 0.2 s whatever period it was given
    plain = FedAvg(num_clients=1, num_rounds=1, task_check_period=0.01)
    plain.set_communicator(stock := WFCommServer())
    assert stock._task_check_period == 0.2

    recipe = _recipe(tmp_path)
    apply_round_tuning(recipe, RoundTuning(task_check_period=0.03))
    (workflow,) = recipe._job._deploy_map["server"].app_config.workflows
    assert type(workflow.controller) is TunedFedAvg
    workflow.controller.set_communicator(tuned := WFCommServer())
    assert tuned._task_check_period == 0.03


def test_site_runs_an_installed_module(tmp_path):
    from fedllm.federation import client

    settings = site_process_settings(python="/usr/bin/python3", module="fedllm.federation.client")
    assert settings["command"] == "/usr/bin/python3 -u -m fedllm.federation.client"
    recipe = _recipe(tmp_path, **settings)
    _, config = _exported_configs(recipe, tmp_path / "job")
    (executor,) = config["executors"]
    # NVFlare appends its copy's path; fedllm's client takes it and ignores it
    command = executor["executor"]["args"]["command"]
    assert command[:4] == ["/usr/bin/python3", "-u", "-m", "fedllm.federation.client"]
    assert command[4] == "custom/site.py"
    with pytest.raises(FedllmError, match="config.yaml: config file not found"):
        client.main(["custom/client.py", "--run-dir", str(tmp_path / "missing")])


def test_nvflare_defaults_are_what_the_tuning_replaces(tmp_path):
    server, client = _exported_configs(_recipe(tmp_path), tmp_path / "job")
    (controller,) = server["workflows"]
    # NVFlare leaves these at their defaults (2 s request interval, 0.5 s check period)
    assert "server" not in server and "default_task_fetch_interval" not in client
    assert "task_check_period" not in controller["args"] and "memory_gc_rounds" not in controller["args"]


def test_custom_intervals_and_bad_values(tmp_path):
    recipe = _recipe(tmp_path)
    apply_round_tuning(recipe, RoundTuning(task_request_interval=0.2, task_check_period=0.05))
    server, _ = _exported_configs(recipe, tmp_path / "job")
    assert server["server"]["task_request_interval"] == 0.2
    assert server["workflows"][0]["args"]["task_check_period"] == 0.05

    with pytest.raises(FedllmError, match=r"RoundTuning.task_check_period=0: expected a positive number"):
        apply_round_tuning(_recipe(tmp_path), RoundTuning(task_check_period=0))
    with pytest.raises(FedllmError, match="gc_every_rounds=0"):
        apply_memory_settings(_recipe(tmp_path), gc_every_rounds=0)
    with pytest.raises(FedllmError, match="expected an nvflare FedAvgRecipe"):
        apply_round_tuning(object())


def test_sites_relaunch_a_dead_training_process(tmp_path, monkeypatch):
    """fedllm's job puts NVFlare's ClientAPIExecutor, with its own arguments, under
    fedllm.federation.relaunch's class: its backend launches a new training process when the
    one launched once per job died (tests/test_site_dropout.py runs it)."""
    from nvflare.app_common.executors.client_api.external_process_backend import ExternalProcessBackend

    from conftest import TINY_CONFIG
    from fedllm.config import load_config
    from fedllm.federation import relaunch
    from fedllm.federation.job import build_recipe

    recipe = build_recipe(load_config(TINY_CONFIG), tmp_path, ["a", "b"])
    recipe.export(str(tmp_path / "job"))
    client = json.loads(next((tmp_path / "job").rglob("config_fed_client.json")).read_text())
    (executor,) = client["executors"]
    assert executor["executor"]["path"] == "fedllm.federation.relaunch.SiteRestartingExecutor"
    args = executor["executor"]["args"]
    assert args["execution_mode"] == "external_process" and "launch_once" not in args  # NVFlare's default: once
    rebuilt = relaunch.SiteRestartingExecutor(**args)  # as the site's job loader builds it
    assert isinstance(rebuilt._create_external_process_backend(), relaunch.SiteRestartingBackend)
    assert relaunch.run_dir_of(args["command"]) == str(tmp_path)  # where its site_restarted event goes

    # the NVFlare internals it relies on are checked, loudly
    monkeypatch.delattr(ExternalProcessBackend, "_trainer_liveness_error")
    with pytest.raises(FedllmError, match=r"ExternalProcessBackend._trainer_liveness_error, missing in the installed NVFlare 2\.9"):
        relaunch.SiteRestartingBackend()


def test_a_dead_trainer_is_relaunched_only_while_the_run_goes_on():
    from nvflare.apis.signal import Signal

    from fedllm.federation.relaunch import SiteRestartingBackend

    backend = SiteRestartingBackend()
    backend._run_abort_signal = Signal()
    assert backend._lost_trainer_reason() == "no trainer process"  # never launched / cleaned up
    backend._latch_abort("trainer process group exited (rc=-9)")  # what NVFlare latches when it dies
    assert backend._lost_trainer_reason() == "trainer process group exited (rc=-9)"
    backend._terminal_intent = "abort"  # a run abort (ExternalProcessBackend.abort) or a lost result source
    assert backend._lost_trainer_reason() is None
    backend._terminal_intent = None
    backend._run_abort_signal.trigger(True)
    assert backend._lost_trainer_reason() is None
    backend._run_abort_signal = Signal()
    backend._closed = True  # END_RUN
    assert backend._lost_trainer_reason() is None
