"""Submit mode of the pipeline's federate step, against a real federation.

A server and two sites run on localhost as separate processes from startup kits
that ``fedllm.deploy.provision`` made (the kits the Helm chart mounts as
Secrets), every link gRPC over mutual TLS. The federate step, in submit mode,
logs in with the admin kit laid out as a Secret mount, submits the tiny LoRA
job of a prepared run, streams the rounds into its log and reads the result
back into its output artifact.
"""

from __future__ import annotations

import json
import sys

import pytest
from participants import running_federation

from fedllm.pipeline.steps import federate_step
from fedllm.run import prepare_run

pytestmark = pytest.mark.federation

SITES = ["site-1", "site-2"]
# Two sources, each one site named like the federation's clients; LoRA keeps the exchange small.
TINY_LORA = [
    "data.sources=[{name: dolly, format: dolly, path: dolly_15k, max_records: 60, site: site-1},"
    " {name: oasst1, format: oasst1, path: oasst1/en-validation.jsonl, max_records: 60, site: site-2}]",
    "data.max_val_records_per_site=8",
    "model.tiny.hidden_size=32",
    "model.tiny.intermediate_size=64",
    "model.tiny.vocab_size=512",
    "model.tiny.num_heads=2",
    "method.name=lora",
    "training.steps_per_round=2",
    "training.micro_batch_size=4",
    "federation.rounds=2",
    "evaluation.enabled=false",
]


@pytest.fixture
def federation(tmp_path):
    with running_federation(tmp_path, SITES) as fed:
        yield fed.admin_kit, fed.procs


def test_submit_mode_runs_the_job_on_the_federation_and_reads_the_result_back(federation, tmp_path, shared_data, capsys,
                                                                               monkeypatch):
    from fedllm.config import load_config
    from fedllm.federation.submit import SITE_PYTHON_ENV, site_python
    from conftest import TINY_CONFIG

    assert site_python() == "python3"  # the fedllm image's interpreter
    # this federation's sites are local processes of this environment
    monkeypatch.setenv(SITE_PYTHON_ENV, sys.executable)

    admin_kit, procs = federation
    prepared = prepare_run(load_config(TINY_CONFIG, TINY_LORA), tmp_path / "prepared")
    model_out = tmp_path / "artifacts" / "model"

    result = federate_step(str(prepared), str(model_out), mode="submit", admin_kit=str(admin_kit),
                           shared_run_root=str(tmp_path / "shared"), timeout_s=180)

    log = capsys.readouterr().out
    assert "submitted job" in log and "FINISHED:COMPLETED" in log
    assert "round 2/2: global model saved" in log
    for site in SITES:
        assert f"site {site} round 2/2" in log

    # The output artifact holds what the run gained, read back from the shared run dir.
    entry = json.loads((model_out / "settings" / "fedavg.json").read_text())
    assert entry == result
    assert entry["kind"] == "federated" and entry["val_loss"] > 0
    assert [r["round"] for r in entry["rounds"]] == [1, 2] and entry["best_round"] in (1, 2)
    assert set(entry["bytes_per_round"]) == set(SITES)
    for site in SITES:
        sent = [r["sent"] for r in entry["bytes_per_round"][site]]
        assert len(sent) == 2 and all(b > 0 for b in sent)
        assert (model_out / "events" / f"site-{site}.jsonl").is_file()
    assert (model_out / "federation" / "rounds" / "round-002" / "exchanged.safetensors").is_file()
    # A relative path: the step's workspace on the shared volume is gone, the artifact stays.
    assert not entry["adapter_dir"].startswith("/") and (model_out / entry["adapter_dir"]).is_dir()
    assert not (model_out / "data").exists() and not (model_out / "models" / "base").exists()
    assert not list((tmp_path / "shared").iterdir()), "the shared run copy is removed after the step"


@pytest.mark.timeout(1800)
def test_submit_mode_runs_the_real_model_from_its_gguf_file(federation, tmp_path, shared_data, capsys, monkeypatch):
    """The demo's source, a GGUF file inside a Python package: the partition step converts
    it, and the federation's server and sites load the run's HF base folder."""
    from fedllm.config import load_config
    from fedllm.errors import FedllmError
    from fedllm.federation.submit import SITE_PYTHON_ENV
    from fedllm.train.gguf import SMOLLM2_SOURCE, locate_gguf
    from conftest import DEMO_CONFIG

    try:
        locate_gguf(SMOLLM2_SOURCE)
    except FedllmError as e:
        pytest.skip(str(e))
    monkeypatch.setenv(SITE_PYTHON_ENV, sys.executable)
    admin_kit, _ = federation
    # The Dirichlet split names its sites site-1, site-2: this federation's clients.
    small = ["data.sources.0.max_records=300", "data.partition.num_sites=2", "data.partition.min_site_records=30",
             "training.steps_per_round=1", "training.micro_batch_size=2", "training.max_seq_length=64",
             "data.max_val_records_per_site=8", "federation.rounds=1", "evaluation.enabled=false"]
    prepared = prepare_run(load_config(DEMO_CONFIG, small), tmp_path / "prepared")
    model_out = tmp_path / "artifacts" / "model"

    result = federate_step(str(prepared), str(model_out), mode="submit", admin_kit=str(admin_kit),
                           shared_run_root=str(tmp_path / "shared"), timeout_s=600)

    assert "FINISHED:COMPLETED" in capsys.readouterr().out
    assert json.loads((model_out / "settings" / "fedavg.json").read_text()) == result
    adapter_bytes = json.loads((prepared / "model.json").read_text())["trainable_parameters"] * 4
    for site in SITES:
        assert [r["sent"] for r in result["bytes_per_round"][site]] == [adapter_bytes], site
    assert result["task"]["n"] > 0 and 0 <= result["task"]["accuracy"] <= 1
    assert (model_out / result["task"]["predictions"]).is_file()


class _RegisteringServer:
    """Answers ``check_status("client")`` as NVFlare's server does while sites come up:
    NoClientsAvailable before the first site registers, then the registered ones."""

    def __init__(self, answers):
        self.answers = list(answers)

    def check_status(self, target):
        from nvflare.fuel.flare_api.api_spec import NoClientsAvailable

        assert target == "client"
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if answer is None:
            raise NoClientsAvailable("no clients available")
        return {"client_status": [{"client_name": name} for name in answer]}


def test_waiting_for_sites_outlasts_a_server_with_no_site_yet(monkeypatch):
    from fedllm.errors import FedllmError
    from fedllm.federation import submit

    monkeypatch.setattr(submit.time, "sleep", lambda s: None)
    submit.wait_for_sites(_RegisteringServer([None, None, ["site-1"], ["site-1", "site-2"]]), ["site-1", "site-2"], 60)
    with pytest.raises(FedllmError, match=r"site\(s\) site-2 of this run not registered after 0 s \(registered: none\)"):
        submit.wait_for_sites(_RegisteringServer([None]), ["site-2"], 0)
