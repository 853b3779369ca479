"""A real production-mode federation on localhost, without Kubernetes.

The server and two sites run as separate processes from the startup kits that
``fedllm.deploy.provision`` made, unpacked the way a pod unpacks its Secret volume
(``python -m fedllm.deploy.participant``). All links are NVFlare's gRPC over mutual
TLS. The admin kit logs in through ``nvflare.fuel.flare_api``, submits a tiny FedAvg
fedllm LoRA job on real data and checks every round's global adapter; then a site holding a kit from a different
provisioning tries to join and must never register. On the same federation, ``fedllm federate CONFIG --submit
ADMIN_KIT`` runs the same job and writes the settings/fedavg.json a simulator run of the config writes.
A second federation, provisioned with ``server.transport: tcp``, runs a job too.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from participants import kill_site_training_in_round, mount_secret, running_federation

from conftest import TINY_CONFIG, TINY_RUN
from fedllm.config import load_config
from fedllm.data import load_partitions
from fedllm.deploy.provision import provision
from fedllm.events import read_events
from fedllm.federation.job import build_recipe, job_name
from fedllm.federation.persistor import load_round
from fedllm.run import prepare_run

pytestmark = pytest.mark.federation

ROUNDS = 2
# A tiny fedllm LoRA job on real data, IID over the federation's two sites.
LORA_JOB = TINY_RUN + [
    "method.name=lora",
    f"federation.rounds={ROUNDS}",
    "data.sources=[{name: dolly, format: dolly, path: dolly_15k, max_records: 120}]",
    "data.partition.strategy=iid",
    "data.partition.num_sites=2",
]


def registered_sites(session) -> set[str]:
    from nvflare.fuel.flare_api.api_spec import NoClientsAvailable

    try:
        status = session.check_status("client")
    except NoClientsAvailable:  # how NVFlare answers before the first site has registered
        return set()
    return {c["client_name"] for c in status.get("client_status", [])}


def wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """One federation for this module's tests (each job in a run dir of its own)."""
    root = tmp_path_factory.mktemp("federation")
    with running_federation(root, ["site-1", "site-2"]) as fed:
        # Same server address, but its own root CA: what a stale or forged Secret looks like.
        foreign_values = root / "foreign-values.yaml"
        foreign_values.write_text(yaml.safe_dump({**fed.values, "sites": [{"name": "site-3"}]}))
        foreign = provision(foreign_values, root / "foreign-kits")
        assert foreign["root_ca_sha256"] != fed.kits["root_ca_sha256"]
        yield fed, foreign


def test_federation_trains_over_mtls_and_refuses_a_foreign_kit(federation, tmp_path):
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    fed, foreign = federation
    good, procs, admin_kit = fed.kits, fed.procs, fed.admin_kit
    # flare_api reads an NVFlare kit layout (startup/ ...): lay the admin Secret out as one.
    admin_dir = tmp_path / "admin"
    (admin_dir / "startup").mkdir(parents=True)
    for f in admin_kit.iterdir():
        folder, _, name = f.name.partition(".")
        (admin_dir / folder).mkdir(exist_ok=True)
        (admin_dir / folder / name).write_bytes(f.read_bytes())

    session = wait_for(
        lambda: _try_session(new_secure_session, good["admin_name"], admin_dir), 60, "the admin login over mTLS"
    )
    try:
        wait_for(lambda: registered_sites(session) == {"site-1", "site-2"}, 120, "site-1 and site-2 to register")

        # A tiny fedllm LoRA job on real data, as `fedllm federate` builds it; both sites
        # and the server read the prepared run dir (one machine here, a volume on K8s).
        cfg = load_config(TINY_CONFIG, LORA_JOB)
        run = prepare_run(cfg, tmp_path / "run")
        assert load_partitions(run / "data").sites == ["site-1", "site-2"]
        recipe = build_recipe(cfg, run, ["site-1", "site-2"])
        recipe.export(str(tmp_path / "jobs"))
        job_id = session.submit_job(str(tmp_path / "jobs" / job_name(cfg)))
        meta = session.wait_for_job(job_id, timeout=240, poll_interval=1)
        assert meta["status"] == "FINISHED:COMPLETED", meta
        assert sorted(meta["job_deploy_detail"]) == ["server: OK", "site-1: OK", "site-2: OK"]

        # the server persisted every round's global adapter, and training moved it
        first, last = load_round(run / "federation" / "rounds", 1), load_round(run / "federation" / "rounds", ROUNDS)
        assert set(first) == set(last) and all("lora_" in k for k in last)
        assert any(not torch.equal(first[k], last[k]) for k in last)
        for site in ("site-1", "site-2"):
            ends = [e for e in read_events(run / "events" / f"site-{site}.jsonl") if e["event"] == "round_end"]
            assert len(ends) == ROUNDS, site

        intruder = procs.start("site-3", mount_secret(foreign["secrets"]["site-3"], tmp_path / "mounts" / "site-3"))
        # The server's TLS layer rejects the foreign certificate chain before NVFlare sees a name.
        wait_for(lambda: "CERTIFICATE_VERIFY_FAILED" in procs.log("site-3"), 60, "the TLS handshake to fail")
        time.sleep(5)  # and a register retry after it
        assert intruder.poll() is None, "the intruding site should keep retrying, not crash"
        assert registered_sites(session) == {"site-1", "site-2"}
        assert "Successfully registered" not in procs.log("site-3")
        assert "New client site-3" not in procs.log("server")
    finally:
        session.close()


def _try_session(new_secure_session, username: str, admin_dir: Path):
    try:
        return new_secure_session(username, str(admin_dir), timeout=10)
    except Exception:
        return None


@pytest.mark.parametrize("algorithm, overrides", [
    ("fedprox", ["federation.algorithm=fedprox", "federation.fedprox.mu=0.5"]),
    ("fedopt", ["federation.algorithm=fedopt", "federation.fedopt.momentum=0.6"]),
])
def test_fedprox_and_fedopt_jobs_complete_on_the_federation(federation, tmp_path, capsys, monkeypatch, algorithm,
                                                            overrides):
    """`federation.algorithm: fedprox` (mu > 0) and `fedopt`, submitted with `fedllm federate
    --submit`: the job completes, only the LoRA adapter travels, FedOpt's server optimizer
    state is persisted with every round, and the summary records which algorithm ran
    (tests/test_federation_algorithms.py checks the numbers in the simulator)."""
    from fedllm.cli import main
    from fedllm.federation.submit import SITE_PYTHON_ENV

    fed, _ = federation
    monkeypatch.setenv(SITE_PYTHON_ENV, sys.executable)  # this federation's sites run this environment
    run = tmp_path / algorithm
    sets = [arg for override in [*LORA_JOB, *overrides] for arg in ("--set", override)]
    assert main(["federate", str(TINY_CONFIG), *sets, "--out", str(run), "--submit", str(fed.admin_kit),
                 "--timeout", "240"]) == 0
    out = capsys.readouterr().out
    assert "FINISHED:COMPLETED" in out, out
    summary = json.loads((run / "settings" / "fedavg.json").read_text())
    assert summary["algorithm"]["name"] == algorithm
    assert [r["round"] for r in summary["rounds"]] == list(range(1, ROUNDS + 1))
    adapter_bytes = json.loads((run / "model.json").read_text())["trainable_parameters"] * 4  # fp32
    assert all(r["sent"] == r["received"] == adapter_bytes for rounds in summary["bytes_per_round"].values() for r in rounds)
    for r in range(1, ROUNDS + 1):
        state = run / "federation" / "rounds" / f"round-{r:03d}" / "server_optimizer.safetensors"
        assert state.is_file() == (algorithm == "fedopt"), state


def test_fedllm_federate_submit_runs_the_job_there_and_summarizes_it_as_the_simulator(federation, tmp_path, capsys,
                                                                                    monkeypatch):
    """`fedllm federate CONFIG --submit ADMIN_KIT --out RUN`: the admin Secret as mounted,
    the job on this federation, and the settings/fedavg.json a simulator run writes."""
    from fedllm.cli import main
    from fedllm.federation.submit import SITE_PYTHON_ENV

    fed, _ = federation
    monkeypatch.setenv(SITE_PYTHON_ENV, sys.executable)  # this federation's sites run this environment
    sets = [arg for override in LORA_JOB for arg in ("--set", override)]
    submitted_run, simulated_run = tmp_path / "submitted", tmp_path / "simulated"

    assert main(["federate", str(TINY_CONFIG), *sets, "--out", str(submitted_run),
                 "--submit", str(fed.admin_kit), "--timeout", "240"]) == 0
    out = capsys.readouterr().out
    assert "submitted job" in out and "FINISHED:COMPLETED" in out, out
    assert f"round {ROUNDS}/{ROUNDS}: global model saved" in out
    for site in ("site-1", "site-2"):
        assert f"site {site} round {ROUNDS}/{ROUNDS}" in out
    assert "fedavg: val_loss" in out

    assert main(["federate", str(TINY_CONFIG), *sets, "--out", str(simulated_run)]) == 0

    submitted = json.loads((submitted_run / "settings" / "fedavg.json").read_text())
    simulated = json.loads((simulated_run / "settings" / "fedavg.json").read_text())
    assert set(submitted) == set(simulated)
    assert submitted["kind"] == "federated" and math.isfinite(submitted["val_loss"]) and submitted["val_loss"] > 0
    for key in ("kind", "steps", "steps_per_round"):
        assert submitted[key] == simulated[key], key
    assert [r["round"] for r in submitted["rounds"]] == [r["round"] for r in simulated["rounds"]] == list(range(1, ROUNDS + 1))
    assert len(submitted["time_per_round_s"]) == ROUNDS and all(s > 0 for s in submitted["time_per_round_s"])
    # The same seeds, data and order-independent aggregation: the same global models.
    assert [step for step, _ in submitted["val_loss_curve"]] == [step for step, _ in simulated["val_loss_curve"]]
    assert [loss for _, loss in submitted["val_loss_curve"]] == pytest.approx([loss for _, loss in simulated["val_loss_curve"]], rel=1e-3)
    assert set(submitted["site_curves"]) == set(simulated["site_curves"]) == {"site-1", "site-2"}
    assert submitted["bytes_per_round"] == simulated["bytes_per_round"]  # the same adapter, each round
    assert submitted["job_seconds"] > 0 and submitted["best_round"] in range(1, ROUNDS + 1)
    assert (submitted_run / submitted["adapter_dir"]).is_dir()


def test_a_job_completes_when_a_sites_training_process_is_killed_mid_round(federation, tmp_path, capsys, monkeypatch):
    """``federation.min_clients`` 1 of 2: SIGKILL of site-2's training process in round 1
    (the process NVFlare's site started for the job); the server aggregates site-1 alone,
    logs ``site_lost`` and the job completes every round (fedllm.federation.participation)."""
    import threading

    from fedllm.cli import main
    from fedllm.federation.submit import SITE_PYTHON_ENV

    fed, _ = federation
    monkeypatch.setenv(SITE_PYTHON_ENV, sys.executable)
    run = tmp_path / "run"
    overrides = LORA_JOB + ["federation.min_clients=1", "training.steps_per_round=60", "training.val_check_steps=60"]
    killed = []
    stop = threading.Event()
    killer = threading.Thread(target=lambda: killed.append(kill_site_training_in_round(
        run / "events" / "site-site-2.jsonl", fed.procs.root, "site-2", 0, stop.is_set)))
    killer.start()
    try:
        code = main(["federate", str(TINY_CONFIG), *[a for o in overrides for a in ("--set", o)], "--out", str(run),
                     "--submit", str(fed.admin_kit), "--timeout", "240"])
    finally:
        stop.set()
        killer.join()
    out = capsys.readouterr().out
    assert killed[0] is not None, "site-2 never trained in round 1"
    assert code == 0 and "FINISHED:COMPLETED" in out, out[-3000:]
    lost = [e for e in read_events(run / "events" / "server.jsonl") if e["event"] == "site_lost"]
    assert lost[0]["lost_site"] == "site-2" and lost[0]["round"] == 1
    fedavg = json.loads((run / "settings" / "fedavg.json").read_text())
    assert [r["round"] for r in fedavg["rounds"]] == list(range(1, ROUNDS + 1))
    assert fedavg["rounds"][0]["aggregated_sites"] == ["site-1"] and "site-2" in fedavg["rounds"][0]["lost_sites"]


def test_a_federation_on_tcp_runs_a_job(tmp_path, capsys, monkeypatch):
    """server.transport tcp (the chart's way around gRPC clients that crash-loop on Linux 7.0):
    the kits as mounted say so, every link is TCP over mTLS, and a one-round job completes."""
    from fedllm.cli import main
    from fedllm.federation.submit import SITE_PYTHON_ENV

    root = tmp_path / "federation"
    root.mkdir()
    with running_federation(root, ["site-1", "site-2"], transport="tcp") as fed:
        def kit_file(name, key):
            return json.loads((root / "mounts" / name / key).read_text())

        assert kit_file("server", "startup.fed_server.json")["servers"][0]["service"]["scheme"] == "tcp"
        for site in ("site-1", "site-2"):
            assert kit_file(site, "startup.fed_client.json")["servers"][0]["service"]["scheme"] == "tcp"
        assert kit_file("admin", "startup.fed_admin.json")["admin"]["scheme"] == "tcp"

        monkeypatch.setenv(SITE_PYTHON_ENV, sys.executable)
        sets = [arg for override in [*LORA_JOB, "federation.rounds=1"] for arg in ("--set", override)]
        assert main(["federate", str(TINY_CONFIG), *sets, "--out", str(tmp_path / "run"),
                     "--submit", str(fed.admin_kit), "--timeout", "240"]) == 0
        out = capsys.readouterr().out
        assert "FINISHED:COMPLETED" in out, out
        for site in ("site-1", "site-2"):
            assert f"site {site} round 1/1" in out
        summary = json.loads((tmp_path / "run" / "settings" / "fedavg.json").read_text())
        assert summary["kind"] == "federated" and math.isfinite(summary["val_loss"])
        for site in ("site-1", "site-2"):
            assert f"Connected to server: tcp://localhost:{fed.values['server']['flPort']}" in fed.procs.log(site)
