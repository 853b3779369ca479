"""The FedAvg job of a prepared run on a running federation, beside the simulator.

Where ``fedllm.federation.federate.simulate`` runs the job in NVFlare's simulator,
this sends the very same job (``fedllm.federation.job.build_recipe``) to a
federation that is already up — the Helm chart's server and site pods, or a
localhost POC / production-mode federation — with the admin startup kit, over mTLS:

    log in → wait for the run's sites → recipe.run(ProdEnv) submits the job →
    monitor it (each poll prints the rounds and site updates the run dir's event
    logs gained) → check it COMPLETED → the fedavg summary entry, built by
    ``fedllm.federation.federate`` exactly as for a simulator run

NVFlare's production environment (``nvflare.recipe.ProdEnv``) submits the job
(it exports it, logs in with the kit and calls ``submit_job``) and aborts it on
timeout. It has no call to list the registered sites and its ``Run.get_result``
monitors with NVFlare's own printing callback, then downloads the job's whole
workspace; so waiting for the sites and following the job (``monitor_job`` with
``EventTail`` as callback) use one ``flare_api`` session logged in with the same kit.

The run dir must be visible at the same path to this process, the server and
every site (a shared volume on a cluster, the same disk on localhost): the sites
read their partitions and the base model from it, the server writes each round's
global model to ``federation/rounds`` and everyone appends to ``events/``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

from fedllm.config import ExperimentConfig
from fedllm.errors import FedllmError
from fedllm.rundir import RunDir

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
        for path in sorted(RunDir(self.run).events.glob("*.jsonl")):
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


@contextlib.contextmanager
def _no_fingerprint_warning():
    """NVFlare's secret scan flags the config's sha256 fingerprint in the job (a 64-hex
    string, no secret); keep that warning off the console, as the simulator does."""
    try:
        from nvflare.fuel.utils.secret_utils import PotentialSecretWarning
    except ImportError:  # pragma: no cover - older NVFlare has no scan
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PotentialSecretWarning)
        yield


def run_on_federation(
    cfg: ExperimentConfig,
    run_dir: str | os.PathLike,
    sites: list[str],
    start_round: int = 0,
    store: str = "",
    *,
    admin_kit: str | os.PathLike,
    username: Optional[str] = None,
    timeout_s: float = 0,
    poll_s: float = 2.0,
    sites_timeout_s: float = 300.0,
    login_timeout_s: float = 60.0,
    log: Callable[[str], None] = lambda line: print(line, flush=True),
) -> float:
    """Run the job on the federation the admin kit logs in to; return its wall time
    in seconds. The counterpart of ``fedllm.federation.federate.simulate`` (same
    arguments first), passed to ``federate`` as its ``runner``.

    ``admin_kit``: an NVFlare admin kit dir (``startup/``) or the admin Secret mounted
    as files (``startup.fed_admin.json``, ...). ``timeout_s``: how long the job may
    run (0: no limit); on timeout it is aborted. Raises FedllmError if the login
    fails, a site is missing, or the job ends other than COMPLETED.
    """
    from nvflare.fuel.flare_api.api_spec import MonitorReturnCode
    from nvflare.fuel.flare_api.flare_api import new_secure_session
    from nvflare.recipe.prod_env import ProdEnv

    from fedllm.deploy.check import admin_kit_dir
    from fedllm.federation.job import build_recipe, job_name

    run_dir = Path(run_dir).resolve()
    name = job_name(cfg)
    recipe = build_recipe(cfg, run_dir, sites, start_round=start_round, store=store, site_python=site_python())
    with tempfile.TemporaryDirectory(prefix="fedllm-admin-") as tmp, _no_fingerprint_warning():
        recipe.export(str(RunDir(run_dir).exported_jobs))  # what was submitted, for the record
        kit = admin_kit_dir(Path(admin_kit), Path(tmp) / "admin")
        user = username or admin_username(kit)
        env = ProdEnv(startup_kit_location=str(kit), login_timeout=login_timeout_s, username=user)
        try:
            session = new_secure_session(user, str(kit), timeout=login_timeout_s)
        except Exception as e:  # flare_api raises its own types for refused logins and timeouts
            raise FedllmError(f"federation: admin login as {user} with the kit at {admin_kit} failed: {e}") from None
        try:
            wait_for_sites(session, sites, sites_timeout_s)
            started = time.perf_counter()
            try:
                job = recipe.run(env)  # ProdEnv.deploy: export, log in, submit_job
            except RuntimeError as e:
                raise FedllmError(f"federation: submitting job {name} failed: {e}") from None
            job_id = job.get_job_id()
            log(f"submitted job {job_id} ({name}): {len(sites)} sites ({', '.join(sites)}), "
                f"rounds {start_round + 1}..{cfg.federation.rounds}")
            tail = EventTail(run_dir, cfg.federation.rounds, log)
            code, meta = session.monitor_job_and_return_job_meta(job_id, timeout=timeout_s, poll_interval=poll_s, cb=tail)
            if code == MonitorReturnCode.TIMEOUT:
                job.abort()  # ProdEnv.abort_job
                raise FedllmError(f"federation: job {job_id} still running after {timeout_s:.0f} s (its time limit); aborted")
            tail(session, job_id, meta)  # the last rounds' lines
            seconds = time.perf_counter() - started
        finally:
            session.close()
    status = meta.get("status")
    if status != COMPLETED:
        failed = [d for d in meta.get("job_deploy_detail") or [] if not str(d).endswith(": OK")]
        detail = f"; deployment: {', '.join(map(str, failed))}" if failed else ""
        from fedllm.federation.federate import failure_reason

        reason = failure_reason(run_dir)  # the server's round_failed event, where the run dir is shared
        detail += f"; {reason}" if reason else ""
        raise FedllmError(f"federation: job {job_id} ({name}) ended {status}, not {COMPLETED}{detail}; see the server's log")
    return seconds


def submitter(admin_kit: str | os.PathLike, **options) -> Callable[..., float]:
    """A ``runner`` for ``fedllm.run.run_federation`` / ``federate``: the job goes to the
    running federation ``admin_kit`` logs in to instead of the simulator; everything
    else (clearing or resuming rounds, the ``fedavg`` entry, settings/fedavg.json, the
    store) is the simulator run's own code. ``options``: ``run_on_federation``'s
    (``timeout_s``, ``username``, ``poll_s``, ``sites_timeout_s``, ``login_timeout_s``, ``log``)."""
    return functools.partial(run_on_federation, admin_kit=admin_kit, **options)
