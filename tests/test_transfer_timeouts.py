"""NVFlare's transfer timeouts are sized from the exchanged model and land in the exported job."""

import inspect
import json
import subprocess
import sys

import pytest

from conftest import TINY_CONFIG
from fedllm.config import load_config
from fedllm.errors import FedllmError
from fedllm.federation.transfer import (
    HEADROOM,
    SERVER_KEYS,
    TENSOR_CHUNK_BYTES,
    TIMEOUTS,
    exchanged_model_bytes,
    transfer_settings,
)
from fedllm.rundir import RunDir

MB_S = 1e6  # federation.min_bandwidth_mb_s: 1 (the default), in bytes/s
DEFAULTS = {key: default for key, (default, _) in TIMEOUTS.items()}


def test_a_small_model_keeps_nvflare_defaults():
    assert transfer_settings(0, MB_S) == DEFAULTS
    # a LoRA adapter of ~2.3M fp32 weights moves in seconds: nothing to raise
    assert transfer_settings(9_000_000, MB_S) == DEFAULTS


def test_the_defaults_are_nvflare_2_9s():
    from nvflare.app_opt.pt import decomposers
    from nvflare.fuel.f3.streaming.transfer_progress import DEFAULT_STREAMING_IDLE_TIMEOUT
    from nvflare.fuel.utils.fobs.decomposers import via_downloader
    from nvflare.private.fed.client import fed_client_base

    assert DEFAULTS["streaming_idle_timeout"] == DEFAULTS["tensor_min_download_timeout"] == DEFAULT_STREAMING_IDLE_TIMEOUT
    # get_task_timeout and submit_task_result_timeout, unset, are the client's communication timeout
    assert '"communication_timeout", 300.0' in inspect.getsource(fed_client_base)
    assert DEFAULTS["get_task_timeout"] == DEFAULTS["submit_task_result_timeout"] == 300.0
    assert "ConfigVarName.STREAMING_PER_REQUEST_TIMEOUT), 600.0" in inspect.getsource(via_downloader)
    assert DEFAULTS["tensor_streaming_per_request_timeout"] == 600.0
    # TensorDecomposer's chunk: what the chunk bounds wait for
    assert '1024 * 1024 * 2, "tensor_"' in inspect.getsource(decomposers.TensorDecomposer)
    assert TENSOR_CHUNK_BYTES == 2 * 1024 * 1024


def test_a_whole_model_bound_grows_with_the_model():
    seven_b = 28_000_000_000  # a 7B model's full weights in fp32
    settings = transfer_settings(seven_b, MB_S)
    assert settings["get_task_timeout"] == settings["submit_task_result_timeout"] == HEADROOM * seven_b / MB_S == 56_000.0
    # a chunk's bounds do not: a dead peer is noticed as soon as with a small model
    for key in ("tensor_streaming_per_request_timeout", "tensor_min_download_timeout", "streaming_idle_timeout"):
        assert settings[key] == DEFAULTS[key]
    # at 1 kB/s a chunk takes over half an hour: its bounds rise above NVFlare's too
    slow = transfer_settings(seven_b, 1e3)
    assert slow["tensor_streaming_per_request_timeout"] == slow["streaming_idle_timeout"] == 4195.0

    previous = transfer_settings(0, MB_S)
    for model_bytes in (10**6, 538_000_000, 2 * 10**9, 28 * 10**9, 280 * 10**9):
        current = transfer_settings(model_bytes, MB_S)
        assert all(current[key] >= previous[key] >= DEFAULTS[key] for key in TIMEOUTS), model_bytes
        previous = current
    assert transfer_settings(28 * 10**9, 10 * MB_S)["get_task_timeout"] == 5600.0  # faster link, shorter bound


def test_a_site_may_wait_for_the_others_within_the_servers_transfer_budgets():
    # the send window can serve the sites one after another; updates are received RECEIVE_AT_ONCE at a time
    from fedllm.federation.sending import RECEIVE_AT_ONCE

    assert RECEIVE_AT_ONCE == 2
    one, five = transfer_settings(28 * 10**9, MB_S), transfer_settings(28 * 10**9, MB_S, sites=5)
    assert five["get_task_timeout"] == 5 * one["get_task_timeout"] == 280_000.0
    assert five["submit_task_result_timeout"] == 3 * one["submit_task_result_timeout"] == 168_000.0
    for key in ("tensor_streaming_per_request_timeout", "tensor_min_download_timeout", "streaming_idle_timeout"):
        assert five[key] == one[key]  # a chunk's wait does not queue behind other sites
    assert transfer_settings(9_000_000, MB_S, sites=16) == DEFAULTS  # an adapter: NVFlare's defaults still
    with pytest.raises(FedllmError, match="sites=0"):
        transfer_settings(1, MB_S, sites=0)


def test_an_override_wins_and_an_unknown_key_is_refused():
    settings = transfer_settings(28 * 10**9, MB_S, {"get_task_timeout": 90, "streaming_idle_timeout": 1200})
    assert settings["get_task_timeout"] == 90.0  # below NVFlare's default too: the user's word
    assert settings["streaming_idle_timeout"] == 1200.0
    assert settings["submit_task_result_timeout"] == 56_000.0

    with pytest.raises(FedllmError, match=r"'federation.transfer_timeouts.submit_result_timeout' is unknown; allowed keys: get_task_timeout"):
        transfer_settings(1, MB_S, {"submit_result_timeout": 60})
    with pytest.raises(FedllmError, match=r"config field 'federation.transfer_timeouts.max_resends' is unknown"):
        load_config(TINY_CONFIG, ["federation.transfer_timeouts.max_resends=3"])
    with pytest.raises(FedllmError, match=r"'federation.transfer_timeouts.get_task_timeout': expected a number of seconds > 0, got -1"):
        load_config(TINY_CONFIG, ["federation.transfer_timeouts.get_task_timeout=-1"])


def test_model_bytes_come_from_the_run_dirs_model_json(tmp_path):
    cfg = load_config(TINY_CONFIG)
    layout = RunDir(tmp_path)
    assert exchanged_model_bytes(cfg, layout) == 0  # no model.json: NVFlare's defaults
    layout.model_info.write_text(json.dumps({"parameters": 7_000_000_000, "trainable_parameters": 134_500_000}))
    assert exchanged_model_bytes(cfg, layout) == 538_000_000  # fp32
    cfg.federation.exchange_dtype = "bfloat16"  # a later field: weights sent in 2 bytes
    assert exchanged_model_bytes(cfg, layout) == 269_000_000


def test_the_exported_job_carries_them(tmp_path):
    from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe

    from fedllm.federation.job import _apply_settings

    run = tmp_path / "run"
    run.mkdir()
    # a full fine-tuning of a 7B model: 28 GB of fp32 weights each way
    RunDir(run).model_info.write_text(json.dumps({"trainable_parameters": 7_000_000_000}))
    cfg = load_config(TINY_CONFIG, ["federation.transfer_timeouts.tensor_min_download_timeout=900"])
    script = tmp_path / "site.py"
    script.write_text("import nvflare.client as flare\nflare.init()\n")
    recipe = FedAvgRecipe(name="sized", model={"class_path": "torch.nn.Linear", "args": {"in_features": 4, "out_features": 2}},
                          min_clients=2, num_rounds=1, train_script=str(script))
    _apply_settings(recipe, cfg, RunDir(run), 2)  # what build_recipe applies to fedllm's job, for two sites
    recipe.export(str(tmp_path / "job"))
    config = tmp_path / "job" / "sized" / "app" / "config"
    client = json.loads((config / "config_fed_client.json").read_text())
    server = json.loads((config / "config_fed_server.json").read_text())

    expected = transfer_settings(28 * 10**9, MB_S, {"tensor_min_download_timeout": 900}, sites=2)
    assert {key: client[key] for key in TIMEOUTS} == expected
    assert client["get_task_timeout"] == 112_000.0 and client["tensor_min_download_timeout"] == 900.0
    assert {key: server[key] for key in TIMEOUTS if key in server} == {key: expected[key] for key in SERVER_KEYS}
    assert client["default_task_fetch_interval"] == 0.05  # beside fedllm's other job settings

    # read back as NVFlare 2.9 reads them: the job config's top level is ConfigService's
    # application section (client_json_config.py / server_json_config.py), which ClientRunner
    # and the tensor downloader query (app_config_utils.get_positive_float_var); a subprocess,
    # as ConfigService is process-wide
    read = (
        "import json, sys\n"
        "from nvflare.apis.fl_constant import SystemConfigs\n"
        "from nvflare.fuel.utils.config_service import ConfigService\n"
        "import nvflare.fuel.utils.app_config_utils as acu\n"
        "ConfigService.initialize(section_files={}, config_path=[sys.argv[1]])\n"
        "ConfigService.add_section(section_name=SystemConfigs.APPLICATION_CONF, data=json.load(open(sys.argv[2])))\n"
        "print(json.dumps({k: acu.get_positive_float_var(k, None) for k in sys.argv[3:]}))\n"
    )
    for name, keys in (("config_fed_client.json", list(TIMEOUTS)), ("config_fed_server.json", list(SERVER_KEYS))):
        out = subprocess.run([sys.executable, "-c", read, str(config), str(config / name), *keys],
                             check=True, capture_output=True, text=True).stdout
        assert json.loads(out.strip().splitlines()[-1]) == {key: expected[key] for key in keys}, name
