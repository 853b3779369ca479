"""NVFlare participants on localhost, started from the startup kits that
``fedllm.deploy.provision`` made, each kit unpacked the way a pod unpacks its Secret volume.

    procs = Participants(tmp_path)
    procs.start("server", mount_secret(kits["secrets"]["server"], tmp_path / "mounts" / "server"))
    ...
    procs.stop_all()  # every process group, NVFlare's job workers included

or a whole federation, provisioned on free localhost ports and stopped on exit:

    with running_federation(tmp_path, ["site-1", "site-2"]) as fed:
        ...  # fed.admin_kit: the admin Secret mounted as files; fed.kits, fed.procs, fed.values
"""

from __future__ import annotations

import base64
import json
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from conftest import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def mount_secret(secret_file: Path, mount_dir: Path) -> Path:
    """Write a Secret manifest's data as files, as the kubelet does for a Secret volume."""
    mount_dir.mkdir(parents=True)
    for key, value in yaml.safe_load(secret_file.read_text())["data"].items():
        (mount_dir / key).write_bytes(base64.b64decode(value))
    return mount_dir


class Participants:
    """Participant processes, each in its own process group so the test can end them all."""

    def __init__(self, root: Path):
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, kit: Path, env: dict | None = None) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedllm.deploy.participant", "--kit", str(kit), "--workspace", str(self.root / "ws" / name)],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for proc in self.procs.values():
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + 10
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
            try:  # NVFlare's job workers live in the same group; leave nothing behind
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@dataclass
class Federation:
    values: dict  # the chart values it was provisioned from
    kits: dict  # fedllm.deploy.provision's result: secrets, admin_name, root_ca_sha256, ...
    procs: Participants
    admin_kit: Path  # the admin Secret, mounted as files


@contextlib.contextmanager
def running_federation(root: Path, sites: list[str], transport: str | None = None):
    """A production-mode federation on localhost: a server on free ports, ``sites`` and an
    admin provisioned by ``fedllm.deploy.provision``; the server and sites run from their kits
    mounted as Secrets, every link mutual TLS over ``transport`` (the chart's server.transport;
    default grpc). Everything is stopped on exit."""
    from fedllm.deploy.provision import provision

    values = {
        "server": {"host": "localhost", "flPort": free_port(), "adminPort": free_port()},
        "sites": [{"name": s} for s in sites],
    }
    if transport:
        values["server"]["transport"] = transport
    (root / "values.yaml").write_text(yaml.safe_dump(values))
    kits = provision(root / "values.yaml", root / "kits")
    procs = Participants(root)
    try:
        for name in ["server", *sites]:
            procs.start(name, mount_secret(kits["secrets"][name], root / "mounts" / name))
        yield Federation(values, kits, procs, mount_secret(kits["secrets"]["admin"], root / "mounts" / "admin"))
    finally:
        procs.stop_all()


def site_training_pids(under: Path, site: str) -> list[int]:
    """The training processes (``python -m fedllm.federation.client``) of ``site`` whose
    working directory is below ``under``: NVFlare runs a site's job in a folder named after
    the site (the simulator: ``<workspace>/<job>/<site>/...``; a participant: its workspace)."""
    found = subprocess.run(["pgrep", "-f", "fedllm.federation.client"], capture_output=True, text=True).stdout.split()
    pids = []
    for pid in found:
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd") + "/"
        except OSError:
            continue  # exited meanwhile
        if cwd.startswith(str(Path(under).resolve()) + "/") and f"/{site}/" in cwd:
            pids.append(int(pid))
    return pids


def kill_site_training_in_round(events_file: Path, under: Path, site: str, in_round: int, stop) -> float | None:
    """Poll ``site``'s event log until it trains in ``in_round`` (0-based, as the sites count),
    then SIGKILL its training process; returns when (time.time()), or None once ``stop()``."""
    while not stop():
        if events_file.is_file():
            training = [json.loads(line) for line in events_file.read_text().splitlines() if '"event": "train"' in line]
            if any(e["round"] == in_round for e in training):
                pids = site_training_pids(under, site)
                assert len(pids) == 1, f"expected one training process of {site} under {under}, found {pids}"
                os.kill(pids[0], signal.SIGKILL)
                return time.time()
        time.sleep(0.05)
    return None

