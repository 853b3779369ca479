"""Resuming a federation after its server died, from the rounds persisted in S3.

- the job is killed (SIGKILL to its process group) right after round 1 of 3 reached the
  store; ``fedllm federate --resume`` runs rounds 2 and 3 only, and its final model is
  bitwise the one of an uninterrupted run;
- the S3 server dies mid-federation: the round's upload is retried, the job fails with a
  clear error, the unfinished round has no manifest (so it does not count); once S3 is
  back, ``--resume`` completes;
- a checkpoint with one byte flipped is caught by its manifest when a resume reads it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_runs import fedllm, tiny_config
from s3server import BUCKET, read_object, start_s3_server
from safetensors.torch import load_file

from conftest import REPO

pytestmark = pytest.mark.slow  # three federations each: minutes on 2 shared cores

ROUNDS = 3


def start_federate(config: Path, run: Path, store: str, env_extra: dict | None = None) -> subprocess.Popen:
    """``fedllm federate`` in its own process group: the simulator's whole process tree."""
    log = open(run.parent / f"{run.name}.log", "w")
    return subprocess.Popen(
        [sys.executable, "-m", "fedllm.cli", "federate", str(config), "--out", str(run), "--store", store],
        cwd=REPO, env=dict(os.environ, **(env_extra or {})), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_for(path_of, what: str, process: subprocess.Popen, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path_of():
            return
        if process.poll() is not None:
            raise AssertionError(f"fedllm federate exited {process.returncode} before {what}")
        time.sleep(0.02)
    raise AssertionError(f"no {what} after {timeout_s}s")


def kill_group(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def stored_rounds(server, prefix: str) -> list[int]:
    names = {o.object_name for o in server.client().list_objects(BUCKET, prefix=f"{prefix}/federation/rounds/", recursive=True)}
    return sorted(int(n.split("/")[-2][6:]) for n in names if n.endswith("/MANIFEST.json"))


def site_losses(run: Path, site: str) -> dict:
    """(event, round) -> loss of a site's validations and round ends; a resumed job's win."""
    losses = {}
    for line in (run / "events" / f"site-{site}.jsonl").read_text().splitlines():
        e = json.loads(line)
        if e["event"] in ("validate", "round_end"):
            losses[(e["event"], e["round"])] = e["loss"]
    return losses


def final_weights(run: Path) -> dict:
    return load_file(str(run / "models" / "fedavg" / "model.safetensors"))


def test_resume_after_the_server_dies_matches_an_unbroken_run(tmp_path, monkeypatch):
    server = start_s3_server("rclone", tmp_path, monkeypatch)
    try:
        config = tiny_config(tmp_path, rounds=ROUNDS)
        reference = tmp_path / "reference"
        fedllm("federate", str(config), "--out", str(reference), "--store", str(tmp_path / "reference-store"))

        run = tmp_path / "run"
        store = f"s3://{BUCKET}/runs/r"
        job = start_federate(config, run, store)
        round1 = server.object_file(BUCKET, "runs/r/federation/rounds/round-001/MANIFEST.json")
        wait_for(round1.is_file, "round 1 in the store", job)
        kill_group(job)
        killed_at = stored_rounds(server, "runs/r")
        assert killed_at and killed_at[-1] < ROUNDS, f"the job finished before it was killed: {killed_at}"
        kept = {r: read_object(server.client(), f"runs/r/federation/rounds/round-{r:03d}/MANIFEST.json") for r in killed_at}

        done = fedllm("federate", str(config), "--out", str(run), "--store", store, "--resume")
        assert f"after {ROUNDS} rounds" in done.stderr  # stdout: the event lines only
        assert stored_rounds(server, "runs/r") == list(range(1, ROUNDS + 1))
        for r, manifest in kept.items():  # persisted rounds were not run again
            assert read_object(server.client(), f"runs/r/federation/rounds/round-{r:03d}/MANIFEST.json") == manifest
        resumed = [json.loads(line) for line in (run / "events" / "server.jsonl").read_text().splitlines()]
        assert [e["round"] for e in resumed if e["event"] == "job_start"][-1] == killed_at[-1]

        # Every site trains bitwise as in the unbroken run (same losses, same data); the
        # server's in-place weighted sum (fedllm.federation.aggregation) adds the sites in
        # arrival order, and a fused multiply-add is not symmetric: 1 ulp apart at most.
        expected, got = final_weights(reference), final_weights(run)
        assert expected.keys() == got.keys()
        for name in expected:
            assert torch.allclose(expected[name], got[name], rtol=0, atol=1e-6), f"{name} differs after resume"
        for site in ("dolly", "oasst1"):
            assert site_losses(reference, site) == site_losses(run, site)
        summary = json.loads((run / "settings" / "fedavg.json").read_text())
        assert [r["round"] for r in summary["rounds"]] == list(range(1, ROUNDS + 1))

        # One byte flipped in the stored last round: a resume on a fresh machine (no local
        # copy) refuses it, naming the file.
        (run / "settings" / "fedavg.json").unlink()
        import shutil

        shutil.rmtree(run / "federation" / "rounds")
        server.corrupt(BUCKET, f"runs/r/federation/rounds/round-{ROUNDS:03d}/exchanged.safetensors", offset=200)
        broken = fedllm("federate", str(config), "--out", str(run), "--store", store, "--resume", check=False)
        assert broken.returncode == 2
        assert "exchanged.safetensors: corrupted: sha256 mismatch" in broken.stderr
        assert server.secret_key not in broken.stdout + broken.stderr
    finally:
        server.kill()


def test_s3_dies_mid_federation_then_resume_completes(tmp_path, monkeypatch):
    server = start_s3_server("rclone", tmp_path, monkeypatch)
    try:
        config = tiny_config(tmp_path, rounds=ROUNDS)
        run = tmp_path / "run"
        store = f"s3://{BUCKET}/runs/s"
        job = start_federate(config, run, store, env_extra={"FEDLLM_S3_RETRIES": "3"})
        wait_for(server.object_file(BUCKET, "runs/s/federation/rounds/round-001/MANIFEST.json").is_file,
                 "round 1 in the store", job)
        server.kill()
        assert job.wait(timeout=600) == 2
        output = (tmp_path / "run.log").read_text()
        assert "error: federation failed" in output
        server_log = next((run / "federation" / "workspace").rglob("server/log.txt")).read_text()
        assert "failed after 3 tries" in server_log and f"s3://{BUCKET}/runs/s/federation/rounds/round-002" in server_log
        assert server.secret_key not in output + server_log

        server.start()
        assert stored_rounds(server, "runs/s") == [1]  # round 2 never got its manifest
        fedllm("federate", str(config), "--out", str(run), "--store", store, "--resume")
        assert stored_rounds(server, "runs/s") == list(range(1, ROUNDS + 1))
        stored = read_object(server.client(), f"runs/s/federation/rounds/round-{ROUNDS:03d}/exchanged.safetensors")
        assert stored == (run / "federation" / "rounds" / f"round-{ROUNDS:03d}" / "exchanged.safetensors").read_bytes()
    finally:
        server.kill()


def test_corrupted_local_checkpoint_is_refused_on_resume(tmp_path):
    """No store: the run dir's own round folders carry the manifest that catches it."""
    config = tiny_config(tmp_path, rounds=2)
    run = tmp_path / "run"
    fedllm("federate", str(config), "--out", str(run))
    (run / "settings" / "fedavg.json").unlink()
    weights = run / "federation" / "rounds" / "round-002" / "exchanged.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    broken = fedllm("federate", str(config), "--out", str(run), "--resume", check=False)
    assert broken.returncode == 2
    assert "round-002: file exchanged.safetensors: corrupted" in broken.stderr
