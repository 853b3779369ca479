"""One tiny ``fedllm run`` per test session, shared by two test files (conftest.py imports
these fixtures): tests/cli_runs.py's tiny config, 2 sites x 2 rounds, each site alone and
centralized, with tracking on (a real ``mlflow server`` on localhost, and TensorBoard), run
as a user runs it in its own process with stdout piped (a pod, CI, ``| tee``).

- test_tracking.py checks what MLflow and TensorBoard received;
- test_progress.py checks what the run printed, piped: the event lines only.

One run instead of two whole tiny runs that differ only in ``tracking:``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from cli_runs import fedllm, tiny_config

TRACKED_ROUNDS = 2
TRACKED_EXPERIMENT = "fedllm-tracking-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class TrackedRun:
    root: Path  # the run dir
    done: subprocess.CompletedProcess  # the `fedllm run` process: its stdout (piped) and stderr


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` on a free localhost port, a SQLite store in a temp folder; stopped by its pid."""
    pytest.importorskip("mlflow", reason="MLflow and its server: pip install 'fedllm[test]'")
    folder = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(folder / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--default-artifact-root", str(folder / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"mlflow server did not come up:\n{(folder / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # its own session: the server and its workers
        try:
            server.wait(timeout=3)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


@pytest.fixture(scope="session")
def tracked_cli_run(tmp_path_factory, mlflow_server, shared_data) -> TrackedRun:
    """The tiny run with MLflow and TensorBoard on, piped: no ``--no-progress``, so the CLI
    itself picks the event lines because stdout is not a terminal."""
    folder = tmp_path_factory.mktemp("tracked")
    config = tiny_config(folder, rounds=TRACKED_ROUNDS)
    cfg = yaml.safe_load(config.read_text())
    cfg["tracking"] = {"tensorboard": True, "mlflow": {"uri": mlflow_server, "experiment": TRACKED_EXPERIMENT}}
    config.write_text(yaml.safe_dump(cfg))
    run = folder / "run"
    return TrackedRun(run, fedllm("run", str(config), "--out", str(run)))
