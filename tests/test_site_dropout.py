"""A federation that survives losing a site (fedllm.federation.participation), in NVFlare's
simulator: the sites' training processes are real processes, and one is SIGKILLed mid-round.

- ``federation.min_clients`` = N−1: the round completes with the other sites, the server logs
  ``site_lost`` naming the site and round, every configured round is persisted, and the
  setting's rounds say which sites each global model averages; at its next task the site
  launches a new training process (``site_restarted``) and the next round averages it again;
- ``federation.min_clients`` = N: the job stops with an error naming the lost site, and
  ``fedllm federate --resume`` runs the remaining rounds from the last persisted one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cli_runs import fedllm, tiny_config
from participants import kill_site_training_in_round

from conftest import REPO
from fedllm.rundir import RunDir

pytestmark = pytest.mark.slow  # two federations and a resume: ~3 minutes on 2 shared cores

SITES = ["dolly", "oasst1", "medical"]
VICTIM = "oasst1"


def three_site_config(folder: Path, min_clients: int) -> Path:
    path = tiny_config(folder, rounds=2, federation={"min_clients": min_clients})
    cfg = yaml.safe_load(path.read_text())
    tiny = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    cfg["data"]["sources"] = [dict(s, max_records=60) for s in tiny["data"]["sources"]]
    assert [s["name"] for s in cfg["data"]["sources"]] == SITES
    # long enough a round (a few seconds) that the kill lands in the middle of training
    cfg["training"]["steps_per_round"] = 60
    cfg["training"]["val_check_steps"] = 60
    path.write_text(yaml.safe_dump(cfg))
    return path


def federate_killing_a_site(config: Path, run: Path, in_round: int, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    """``fedllm federate`` in its own process; SIGKILL the victim's training process as soon as
    it trains in ``in_round`` (0-based, as the sites' events count). Returns the finished
    process and when the kill happened."""
    log = run.parent / f"{run.name}.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "fedllm.cli", "federate", str(config), "--out", str(run), *extra],
                                   cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        killed_at = kill_site_training_in_round(run / "events" / f"site-{VICTIM}.jsonl", run, VICTIM, in_round,
                                                stop=lambda: process.poll() is not None)
        try:
            process.wait(timeout=600)
        except subprocess.TimeoutExpired:
            pass
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            raise AssertionError(f"fedllm federate still running after 600 s; log: {log}")
    assert killed_at is not None, f"{VICTIM} never trained in round {in_round}; log: {log}"
    return subprocess.CompletedProcess(process.args, process.returncode, log.read_text(), ""), killed_at


def server_events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "events" / "server.jsonl").read_text().splitlines()]


def test_a_round_completes_without_a_killed_site_when_min_clients_allows(tmp_path):
    config = three_site_config(tmp_path, min_clients=2)
    run = tmp_path / "run"
    done, killed_at = federate_killing_a_site(config, run, in_round=0)
    assert done.returncode == 0, done.stdout[-3000:]

    lost = [e for e in server_events(run) if e["event"] == "site_lost"]
    assert lost and lost[0]["lost_site"] == VICTIM and lost[0]["round"] == 1 and lost[0]["ts"] >= killed_at - 1
    assert [e["round"] for e in lost] == [1]  # lost for its round only
    fedavg = json.loads((run / "settings" / "fedavg.json").read_text())
    assert [r["round"] for r in fedavg["rounds"]] == [1, 2]  # every configured round
    first, second = fedavg["rounds"]
    assert sorted(first["aggregated_sites"]) == ["dolly", "medical"] and list(first["lost_sites"]) == [VICTIM]
    # the site launched a new training process for round 2's task and rejoined (fedllm.federation.relaunch)
    assert sorted(second["aggregated_sites"]) == sorted(SITES) and not second.get("lost_sites")
    site = [json.loads(line) for line in RunDir(run).site_events(VICTIM).read_text().splitlines()]
    [restarted] = [e for e in site if e["event"] == "site_restarted"]
    assert restarted["site"] == VICTIM and restarted["round"] == 1 and restarted["ts"] >= killed_at
    assert "exited" in restarted["reason"]
    # the new process trained round 2 (0-based 1) from where an unbroken one would stand
    [round_end] = [e for e in site if e["event"] == "round_end" and e["round"] == 1]
    assert round_end["ts"] > restarted["ts"] and round_end["step"] == 2 * 60
    assert RunDir(run).round_weights(2).is_file()


def test_too_few_sites_stop_the_job_naming_the_site_and_resume_finishes_it(tmp_path):
    config = three_site_config(tmp_path, min_clients=3)
    run = tmp_path / "run"
    done, _ = federate_killing_a_site(config, run, in_round=1)  # round 1 is persisted, round 2 is not
    assert done.returncode != 0
    assert f"round 2 needs 3 of 3 sites (federation.min_clients)" in done.stdout
    assert f"{VICTIM}: its result is an error" in done.stdout
    failed = [e for e in server_events(run) if e["event"] == "round_failed"]
    assert failed and VICTIM in failed[-1]["missing"]
    assert RunDir(run).round_weights(1).is_file()
    assert not RunDir(run).round_weights(2).exists()

    resumed = fedllm("federate", str(config), "--out", str(run), "--resume")
    assert "resume" in resumed.stdout
    fedavg = json.loads((run / "settings" / "fedavg.json").read_text())
    assert [r["round"] for r in fedavg["rounds"]] == [1, 2]
    assert sorted(fedavg["rounds"][-1]["aggregated_sites"]) == sorted(SITES)  # the restarted site is back


def test_the_round_timeout_grows_with_the_model_and_the_slowest_round():
    from fedllm.federation.participation import (FIRST_ROUND_TIMEOUT_S, MIN_ROUND_TIMEOUT_S, ROUND_TIME_FACTOR,
                                                 round_timeout)

    # 1 GB down and back at 10 MB/s: 200 s of transfers on top of the training allowance
    assert round_timeout(10**9, None, 1e7) == FIRST_ROUND_TIMEOUT_S + 200
    # five sites: sent one after another at worst, received two at a time: 5 + 3 transfers
    assert round_timeout(10**9, None, 1e7, sites=5) == FIRST_ROUND_TIMEOUT_S + 800
    assert round_timeout(0, 10.0, 1e7) == MIN_ROUND_TIMEOUT_S  # a fast round: the floor
    assert round_timeout(0, 400.0, 1e7) == ROUND_TIME_FACTOR * 400.0


def test_min_clients_and_the_waits_reach_the_server_controller(tmp_path):
    from conftest import TINY_CONFIG
    from fedllm.config import load_config
    from fedllm.federation.job import build_recipe
    from fedllm.federation.participation import SiteTolerantFedAvg

    cfg = load_config(TINY_CONFIG, ["federation.min_clients=2", "federation.wait_after_min_clients=5",
                                    "federation.min_bandwidth_mb_s=20"])
    recipe = build_recipe(cfg, tmp_path, ["a", "b", "c"])
    recipe.export(str(tmp_path / "job"))
    server = json.loads(next((tmp_path / "job").rglob("config_fed_server.json")).read_text())
    [workflow] = server["workflows"]
    assert workflow["path"] == f"{SiteTolerantFedAvg.__module__}.{SiteTolerantFedAvg.__name__}"
    args = workflow["args"]
    assert args["min_responses"] == 2 and args["wait_after_min_responses"] == 5.0 and args["min_bandwidth"] == 2e7
    assert args["events_file"] == str(RunDir(tmp_path).server_events)
    assert "round_timeout" not in args  # 0: derived, NVFlare exports only what differs from the default


@pytest.mark.parametrize("override, message", [
    ("federation.min_clients=0", "'federation.min_clients': must be ≥ 1"),
    ("federation.round_timeout=-1", "'federation.round_timeout': must be > 0 seconds"),
    ("federation.min_bandwidth_mb_s=0", "'federation.min_bandwidth_mb_s': must be > 0"),
])
def test_participation_fields_are_checked(override, message):
    from conftest import TINY_CONFIG
    from fedllm.config import load_config
    from fedllm.errors import FedllmError

    with pytest.raises(FedllmError, match=message):
        load_config(TINY_CONFIG, [override])
