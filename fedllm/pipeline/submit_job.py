"""Submit mode: the FedAvg job of a prepared run sent to a running federation.

Where ``fedllm.federation.federate`` runs the job in NVFlare's simulator, this
sends the very same job (``fedllm.federation.job.build_recipe``) to a federation
that is already up — the Helm chart's server and site pods, or a localhost POC —
through NVFlare's admin API over mTLS, with the admin startup kit:

    export the job → log in (flare_api.new_secure_session) → wait for the sites →
    submit_job → monitor_job (each poll prints the rounds and site updates the run
    dir's event logs gained) → check it COMPLETED → the fedavg summary entry

The run dir must be visible at the same path to this process, the server and
every site (a shared volume on a cluster, the same disk on localhost): the sites
read their partitions and the base model from it, the server writes each round's
global model to ``federation/rounds`` and everyone appends to ``events/``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from fedllm.errors import FedllmError

COMPLETED = "FINISHED:COMPLETED"


def admin_username(kit: Path) -> str:
    """The admin user a kit was provisioned for (its ``startup/fed_admin.json``)."""
    path = kit / "startup" / "fed_admin.json"
    try:
        return json.loads(path.read_text())["admin"]["username"]
    except (OSError, ValueError, KeyError):
        raise FedllmError(f"{path}: no admin.username; not an NVFlare admin startup kit") from None


class EventTail:
    """Each call prints what the run's event logs gained since the last call:
    one line per global model the server saved and per round a site finished.
    Used as flare_api's ``monitor_job`` callback; returns True to keep waiting."""

    def __init__(self, run: Path, rounds: int, log: Callable[[str], None]):
        self.run, self.rounds, self.log = run, rounds, log
        self.offsets: dict[Path, int] = {}
        self.status = None

    def __call__(self, session, job_id: str, job_meta: dict, *args, **kwargs) -> bool:
        status = job_meta.get("status")
        if status != self.status:
            self.log(f"job {job_id}: {status}")
            self.status = status
        for path in sorted((self.run / "events").glob("*.jsonl")):
            for event in self._new_events(path):
                line = self.describe(event)
                if line:
                    self.log(line)
        return True

    def _new_events(self, path: Path) -> list[dict]:
        with open(path, "rb") as f:
            f.seek(self.offsets.get(path, 0))
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next poll
        self.offsets[path] = self.offsets.get(path, 0) + len(complete)
        return [json.loads(line) for line in complete.splitlines() if line.strip()]

    def describe(self, e: dict) -> Optional[str]:
        if e.get("event") == "global_model":
            return f"round {e['round']}/{self.rounds}: global model saved ({e.get('bytes', 0) / 1e6:.2f} MB)"
        if e.get("event") == "round_end":
            speed = f", {e['tokens_per_s']:.0f} tokens/s" if e.get("tokens_per_s") else ""
            loss = f", loss {e['loss']:.4f}" if e.get("loss") is not None else ""
            return (
                f"site {e['site']} round {int(e['round']) + 1}/{self.rounds}: {e.get('steps')} steps{loss}{speed}, "
                f"sent {e.get('bytes_sent', 0) / 1e6:.2f} MB"
            )
        return None


def wait_for_sites(session, sites: list[str], timeout_s: float) -> None:
    """Return once every site of the run is registered with the server."""
    from nvflare.fuel.flare_api.api_spec import NoClientsAvailable

    deadline = time.time() + timeout_s
    while True:
        try:
            status = session.check_status("client")
        except NoClientsAvailable:  # the server answers so until the first site registers
            status = {}
        seen = {c["client_name"] for c in status.get("client_status", [])}
        missing = sorted(set(sites) - seen)
        if not missing:
            return
        if time.time() > deadline:
            raise FedllmError(
                f"federation: site(s) {', '.join(missing)} of this run not registered after {timeout_s:.0f} s "
                f"(registered: {', '.join(sorted(seen)) or 'none'}); the federation's site names must be the run's sites"
            )
        time.sleep(2)


SITE_PYTHON_ENV = "FEDLLM_SITE_PYTHON"


def site_python() -> str:
    """The interpreter the federation's sites train with: ``python3`` of the fedllm image,
    or ``$FEDLLM_SITE_PYTHON`` (a federation of local processes running another environment)."""
    return os.environ.get(SITE_PYTHON_ENV) or "python3"


def submit_federation(
    run_dir: str | os.PathLike,
    admin_kit: str | os.PathLike,
    *,
    username: Optional[str] = None,
    timeout_s: float = 0,
    poll_s: float = 2.0,
    sites_timeout_s: float = 300.0,
    log: Callable[[str], None] = lambda line: print(line, flush=True),
) -> dict:
    """Run the FedAvg job of the prepared ``run_dir`` on a running federation;
    return the ``fedavg`` entry of summary.json (as ``fedllm.run.run_federation``).

    ``admin_kit``: the admin startup kit, an NVFlare kit dir (``startup/``) or the
    admin Secret mounted as files (``startup.fed_admin.json``, ...). ``timeout_s``:
    how long the job may run (0: no limit); on timeout the job is aborted.
    Raises FedllmError if a site is missing, the job does not complete, or not
    every round's global model reached ``federation/rounds``.
    """
    from nvflare.fuel.flare_api.api_spec import MonitorReturnCode
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    from fedllm.data import load_partitions
    from fedllm.deploy.check import admin_kit_dir
    from fedllm.federation.job import build_recipe, job_name
    from fedllm.run import load_run

    run, cfg = load_run(run_dir)
    sites = load_partitions(run / "data").sites
    job_root = run / "federation" / "job"
    build_recipe(cfg, run, sites, site_python=site_python()).export(str(job_root))
    with tempfile.TemporaryDirectory(prefix="fedllm-admin-") as tmp:
        kit = admin_kit_dir(Path(admin_kit), Path(tmp) / "admin")
        user = username or admin_username(kit)
        try:
            session = new_secure_session(user, str(kit), timeout=60.0)
        except Exception as e:  # flare_api raises its own types for refused logins and timeouts
            raise FedllmError(f"federation: admin login as {user} with the kit at {admin_kit} failed: {e}") from None
        try:
            wait_for_sites(session, sites, sites_timeout_s)
            started = time.perf_counter()
            job_id = session.submit_job(str(job_root / job_name(cfg)))
            log(f"submitted job {job_id} ({job_name(cfg)}): {len(sites)} sites ({', '.join(sites)}), {cfg.federation.rounds} rounds")
            tail = EventTail(run, cfg.federation.rounds, log)
            code, meta = session.monitor_job_and_return_job_meta(job_id, timeout=timeout_s, poll_interval=poll_s, cb=tail)
            if code == MonitorReturnCode.TIMEOUT:
                session.abort_job(job_id)
                raise FedllmError(f"federation: job {job_id} still running after {timeout_s:.0f} s (pipeline parameter 'federation_timeout_s'); aborted")
            tail(session, job_id, meta)  # the last rounds' lines
            seconds = time.perf_counter() - started
        finally:
            session.close()
    if meta.get("status") != COMPLETED:
        raise FedllmError(f"federation: job {job_id} ended {meta.get('status')}, not {COMPLETED}; see the server's log")
    from fedllm.federation.federate import finish_federation

    return finish_federation(cfg, run, sites, seconds)


