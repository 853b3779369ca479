"""A real production-mode federation on localhost, without Kubernetes.

The server and two sites run as separate processes from the startup kits that
``fedllm.deploy.provision`` made, unpacked the way a pod unpacks its Secret volume
(``python -m fedllm.deploy.participant``). All links are NVFlare's gRPC over mutual
TLS. The admin kit logs in through ``nvflare.fuel.flare_api``, submits a tiny FedAvg
fedllm LoRA job on real data and checks every round's global adapter; then a site holding a kit from a different
provisioning tries to join and must never register.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import yaml
from participants import Participants, free_port, mount_secret

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


def registered_sites(session) -> set[str]:
    status = session.check_status("client")
    return {c["client_name"] for c in status.get("client_status", [])}


def wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def federation(tmp_path):
    fl_port, admin_port = free_port(), free_port()
    values = {
        "server": {"host": "localhost", "flPort": fl_port, "adminPort": admin_port},
        "sites": [{"name": "site-1"}, {"name": "site-2"}],
    }
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    good = provision(values_file, tmp_path / "kits")

    # Same server address, but its own root CA: what a stale or forged Secret looks like.
    foreign_values = tmp_path / "foreign-values.yaml"
    foreign_values.write_text(yaml.safe_dump({**values, "sites": [{"name": "site-3"}]}))
    foreign = provision(foreign_values, tmp_path / "foreign-kits")
    assert foreign["root_ca_sha256"] != good["root_ca_sha256"]

    procs = Participants(tmp_path)
    try:
        for name in ("server", "site-1", "site-2"):
            procs.start(name, mount_secret(good["secrets"][name], tmp_path / "mounts" / name))
        yield good, foreign, procs, tmp_path
    finally:
        procs.stop_all()


def test_federation_trains_over_mtls_and_refuses_a_foreign_kit(federation):
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    good, foreign, procs, tmp_path = federation
    admin_kit = mount_secret(good["secrets"]["admin"], tmp_path / "mounts" / "admin-flat")
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
        wait_for(lambda: registered_sites(session) == {"site-1", "site-2"}, 60, "site-1 and site-2 to register")

        # A tiny fedllm LoRA job on real data, as `fedllm federate` builds it; both sites
        # and the server read the prepared run dir (one machine here, a volume on K8s).
        cfg = load_config(TINY_CONFIG, TINY_RUN + [
            "method.name=lora",
            f"federation.rounds={ROUNDS}",
            "data.sources=[{name: dolly, format: dolly, path: dolly_15k, max_records: 120}]",
            "data.partition.strategy=iid",
            "data.partition.num_sites=2",
        ])
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
