"""``training.backend: nemo``: sites whose model NeMo AutoModel builds (and shards with FSDP2)
keep the hf backend's contract: the same exchanged names, bytes and events, and, on the same
data from the same global model, the same numbers; a site of two processes (gloo) trains as one.

The federations are NVFlare's simulator, 2 real-data sites x 2 rounds, on the tiny model.
"""

from __future__ import annotations

import importlib.metadata
import math
import subprocess
import sys
import tomllib

import pytest
import torch

from conftest import REPO, TINY_CONFIG, TINY_RUN
from fedllm.config import load_config
from fedllm.errors import FedllmError
from fedllm.events import read_events
from fedllm.federation.persistor import load_round
from fedllm.run import prepare_run, run_federation
from fedllm.rundir import RunDir

TWO_SITES = ("data.sources=[{name: dolly, format: dolly, path: dolly_15k, max_records: 80}, "
             "{name: medical, format: medical_meadow, path: medical_meadow/medical_meadow_small.json, max_records: 80}]")


def tiny(*changes: str):
    return load_config(TINY_CONFIG, TINY_RUN + [TWO_SITES, "federation.rounds=2", *changes])


# -- what the nemo backend refuses ----------------------------------------------------------------
@pytest.mark.parametrize("method", ["ptuning", "prompt_tuning", "ia3"])
def test_methods_nemo_automodel_lacks_are_refused_naming_the_hf_backend(method):
    with pytest.raises(FedllmError, match=rf"'method.name': '{method}' is not available with training.backend: nemo.*training.backend: hf"):
        tiny("training.backend=nemo", f"method.name={method}")


def test_lora_parameters_nemo_lacks_are_refused_and_dora_is_accepted():
    with pytest.raises(FedllmError, match=r"'method.params': init_lora_weights not available with training.backend: nemo"):
        tiny("training.backend=nemo", "method.name=lora", "method.params={init_lora_weights: gaussian}")
    tiny("training.backend=nemo", "method.name=lora", "method.params={use_dora: true}")


def test_several_processes_per_site_need_the_nemo_backend_and_one_process_fedprox():
    with pytest.raises(FedllmError, match=r"'training.processes_per_site'.*training.backend: nemo"):
        tiny("training.processes_per_site=2")
    with pytest.raises(FedllmError, match=r"'training.processes_per_site': must be ≥ 1"):
        tiny("training.backend=nemo", "training.processes_per_site=0")
    with pytest.raises(FedllmError, match=r"'training.processes_per_site': FedProx"):
        tiny("training.backend=nemo", "training.processes_per_site=2", "federation.algorithm=fedprox")


# -- the CPU guards and the version they were written for ----------------------------------------
def test_the_cpu_guards_are_pinned_to_the_installed_and_required_nemo_automodel():
    from fedllm.train.nemo import NEMO_AUTOMODEL_VERSION

    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"nemo-automodel=={NEMO_AUTOMODEL_VERSION}" in pins
    assert importlib.metadata.version("nemo-automodel") == NEMO_AUTOMODEL_VERSION


def test_the_cpu_guards_refuse_another_nemo_automodel_and_build_a_model_without_cuda(tmp_path):
    # In a process of its own: the guards patch torch and NeMo for the rest of a process.
    check = f"""
import sys, torch
from fedllm.train import nemo
assert not torch.cuda.is_available()
try:
    nemo.apply_cpu_guards(installed="0.8.0")
    sys.exit("no error for another version")
except RuntimeError as e:
    assert "0.8.0" in str(e) and nemo.NEMO_AUTOMODEL_VERSION in str(e), e
nemo.apply_cpu_guards()
from fedllm.config import load_config
from fedllm.run import prepare_run
cfg = load_config({str(TINY_CONFIG)!r}, {TINY_RUN + [TWO_SITES, "method.name=lora", "training.backend=nemo"]!r})
run = prepare_run(cfg, {str(tmp_path / "run")!r})
model = nemo.NemoSiteModel(cfg, str(run / "models" / "base"))
assert next(iter(model.parameters)).device.type == "cpu"
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


@pytest.mark.parametrize("method,params", [("sft", None), ("lora", None), ("lora", "{use_dora: true}")])
def test_the_exchanged_weights_are_the_round_0_weights_by_name_shape_and_value(method, params, tmp_path):
    """NeMo's model takes in the hf backend's round-0 weights (hf names) and hands back the same."""
    from safetensors.torch import load_file

    from fedllm.train.nemo import NemoSiteModel

    changes = ["training.backend=nemo", f"method.name={method}"] + ([f"method.params={params}"] if params else [])
    cfg = tiny(*changes)
    run = RunDir(prepare_run(cfg, tmp_path / "run"))
    round_0 = load_file(str(run.initial_weights))
    model = NemoSiteModel(cfg, str(run.base_model))
    model.load_exchanged(round_0)
    back = model.exchanged_state_dict()
    assert list(back) == list(round_0)
    for name, value in round_0.items():
        assert back[name].dtype == value.dtype and torch.equal(back[name], value), name
    assert model.num_exchanged_parameters == sum(v.numel() for v in round_0.values())


# -- federations: nemo against hf, and a site of two processes --------------------------------------
def federate(tmp_path, name: str, *changes: str) -> tuple[RunDir, dict]:
    run = prepare_run(tiny(*changes), tmp_path / name)
    return RunDir(run), run_federation(run)


def site_events(run: RunDir, site: str, kinds=("site_start", "validate", "round_end")) -> list[dict]:
    return [e for e in read_events(run.site_events(site)) if e["event"] in kinds]


def assert_same_numbers(a, b, what: str, tol: float):
    assert a.keys() == b.keys(), what
    for key in a:
        if isinstance(a[key], float):
            assert math.isclose(a[key], b[key], rel_tol=tol, abs_tol=tol), (what, key, a[key], b[key])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "sft"])
def test_a_nemo_federation_keeps_the_hf_contract_and_numbers(method, tmp_path):
    hf_run, hf = federate(tmp_path, "hf", f"method.name={method}")
    nemo_run, nemo = federate(tmp_path, "nemo", f"method.name={method}", "training.backend=nemo")

    # Same exchanged names, shapes, dtypes; the same global model after each round (the tiny model
    # in fp32: NeMo's model code and HF's compute the same function).
    for round_number in (1, 2):
        expected, got = load_round(hf_run.rounds, round_number), load_round(nemo_run.rounds, round_number)
        assert list(got) == list(expected)
        for name in expected:
            assert got[name].dtype == expected[name].dtype and got[name].shape == expected[name].shape, name
            torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)

    # The same events, field for field (timings aside), from every site.
    timing = {"ts", "tokens_per_s", "train_seconds", "wall_seconds"}
    for site in ("dolly", "medical"):
        expected, got = site_events(hf_run, site), site_events(nemo_run, site)
        assert [(e["event"], e.get("round"), e.get("step")) for e in got] == \
            [(e["event"], e.get("round"), e.get("step")) for e in expected], site
        for e, g in zip(expected, got):
            g = {k: v for k, v in g.items() if k not in ("backend", "processes")}  # the nemo site says which it is
            assert g.keys() == e.keys(), (site, e["event"])
            assert_same_numbers({k: v for k, v in e.items() if k not in timing},
                                {k: v for k, v in g.items() if k not in timing}, f"{site} {e['event']}", 1e-4)
    assert [e["backend"] for e in site_events(nemo_run, "dolly", ("site_start",))] == ["nemo"]

    # The same summary entry: curve, bytes per round, the exported model loads the hf way.
    assert nemo.keys() == hf.keys()
    assert [s for s, _ in nemo["val_loss_curve"]] == [s for s, _ in hf["val_loss_curve"]]
    for (_, a), (_, b) in zip(hf["val_loss_curve"], nemo["val_loss_curve"]):
        assert math.isclose(a, b, rel_tol=1e-4)
    assert nemo["bytes_per_round"] == hf["bytes_per_round"]
    assert bool(nemo["adapter_dir"]) == bool(hf["adapter_dir"]) == (method == "lora")


@pytest.mark.slow
def test_a_site_of_two_processes_trains_as_one(tmp_path):
    """Each site runs 2 processes under torchrun (FSDP2 over gloo, each process half of every
    batch): the global models equal the one-process federation's."""
    one_run, one = federate(tmp_path, "one", "method.name=lora", "training.backend=nemo")
    two_run, two = federate(tmp_path, "two", "method.name=lora", "training.backend=nemo", "training.processes_per_site=2")

    assert [e["processes"] for e in site_events(two_run, "dolly", ("site_start",))] == [2]
    for round_number in (1, 2):
        expected, got = load_round(one_run.rounds, round_number), load_round(two_run.rounds, round_number)
        assert list(got) == list(expected)
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)
    first, last = load_round(two_run.rounds, 1), load_round(two_run.rounds, 2)
    assert any(not torch.equal(first[n], last[n]) for n in first), "the second round changed nothing"
    for (_, a), (_, b) in zip(one["val_loss_curve"], two["val_loss_curve"]):
        assert math.isclose(a, b, rel_tol=1e-5)
