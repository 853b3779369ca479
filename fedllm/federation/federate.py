"""Run the FedAvg federation in NVFlare's simulator and summarise it.

Reads the run dir ``fedllm.run.prepare_run`` made, runs the job, then builds
the ``fedavg`` entry of summary.json from the event logs the server and sites
wrote, and exports the final global model as a loadable HF directory.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from fedllm import events
from fedllm.config import ExperimentConfig
from fedllm.errors import FedllmError
from fedllm.federation.algorithms import algorithm_record
from fedllm.federation.job import build_recipe, job_name
from fedllm.federation.persistor import load_round, round_dir
from fedllm.rundir import RunDir, round_name


@contextlib.contextmanager
def _events_to_this_stdout():
    """Route event lines of child processes to this process's stdout (Linux)."""
    own_stdout = f"/proc/{os.getpid()}/fd/1"
    if os.environ.get(events.EVENTS_FILE_ENV) or not os.path.exists(own_stdout):
        yield
        return
    sys.stdout.flush()
    os.environ[events.EVENTS_FILE_ENV], os.environ[events.QUIET_ENV] = own_stdout, "1"
    try:
        yield
    finally:
        os.environ.pop(events.EVENTS_FILE_ENV, None)
        os.environ.pop(events.QUIET_ENV, None)


def _write_simulator_log_config(workspace: Path) -> Path:
    """NVFlare's logging for the simulator and its worker processes, as a file they all read.

    NVFlare's own configuration logs to stdout; a piped run's stdout holds event lines only,
    so its warnings (a site's "Failed to get_task from server" on a loaded machine) go to
    the process's real stderr (``sys.__stderr__``: this process redirects ``sys.stderr`` to a
    file only while the simulator runs, and the handler outlives that). Warnings and errors
    also go to the workspace's log files, where failures point.
    """
    from nvflare.fuel.utils.log_utils import default_log_dict

    log_config = copy.deepcopy(default_log_dict)
    console = log_config["handlers"]["consoleHandler"]
    console["stream"], console["level"] = "ext://sys.__stderr__", "WARNING"
    log_config["loggers"]["root"]["level"] = "WARNING"
    path = workspace / "simulator-log-config.json"
    path.write_text(json.dumps(log_config, indent=2))
    return path


@contextlib.contextmanager
def _site_threads(concurrent_sites: int):
    """Share this machine's cores among the simulator's sites, which train at once.

    Each site's training process would otherwise take torch's default, every core:
    three such processes on two cores ran about 3x slower together than the cores
    allowed. The share goes to the site processes through ``$FEDLLM_SITE_THREADS``
    (fedllm.train.site.set_threads); ``training.num_threads`` still wins.
    """
    from fedllm.train.site import SITE_THREADS_ENV

    if os.environ.get(SITE_THREADS_ENV):
        yield
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ[SITE_THREADS_ENV] = str(max(1, cores // max(concurrent_sites, 1)))
    try:
        yield
    finally:
        os.environ.pop(SITE_THREADS_ENV, None)


def stop_processes_mentioning(*markers: str) -> int:
    """Kill every process (but this one) whose command line contains one of ``markers``;
    wait up to 10 s for them to end. Returns how many there were."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        command = " ".join(proc.info["cmdline"] or [])
        if proc.info["pid"] != os.getpid() and any(marker in command for marker in markers):
            found.append(proc)
    for proc in found:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(found, timeout=10)
    return len(found)


def _stop_leftover_processes(run_dir: Path, workspace: Path) -> None:
    """End the processes an earlier, killed job of this run dir left running.

    NVFlare's simulator starts each site's worker in a session of its own, and each site's
    training process in a process group of its own, so killing ``fedllm federate`` (say, its
    process group, before a ``--resume``) leaves them running until their heartbeats time out,
    writing into the workspace this job is about to recreate; the new sites' training
    processes then fail to start. They are recognised by this run's paths in their command
    line: the workspace (workers) and ``--run-dir`` (training processes).
    """
    stopped = stop_processes_mentioning(str(workspace) + os.sep, f"--run-dir {run_dir}")
    if stopped:
        events.emit("stopped_leftovers", site="driver", processes=stopped, run_dir=str(run_dir))


def simulate(cfg: ExperimentConfig, run_dir: str | os.PathLike, sites: list[str], start_round: int = 0,
             store: str = "", site_python: str | None = None) -> float:
    """Run the job in the simulator; return its wall time in seconds.

    ``site_python``: the interpreter the sites' training processes start with (default:
    this one; see ``build_recipe``).

    NVFlare's simulator returns an exit code instead of raising: a non-zero
    code becomes a FedllmError pointing at the server's log.
    """
    from nvflare.recipe.sim_env import SimEnv

    run_dir = Path(run_dir).resolve()
    workspace = RunDir(run_dir).workspace
    _stop_leftover_processes(run_dir, workspace)
    if workspace.exists():
        shutil.rmtree(workspace)
    workspace.mkdir(parents=True)
    recipe = build_recipe(cfg, run_dir, sites, start_round=start_round, store=store, site_python=site_python)
    # fedllm's event lines are the only thing on stdout: the sites (running in the
    # simulator's worker processes) write them straight to this process's stdout.
    env = SimEnv(
        clients=list(sites),
        num_threads=cfg.federation.threads or len(sites),
        workspace_root=str(workspace),
        log_config=str(_write_simulator_log_config(workspace)),
    )
    started = time.perf_counter()
    log = workspace / "simulator-console.log"
    try:
        with open(log, "w") as console, contextlib.redirect_stderr(console), _events_to_this_stdout(), \
                _site_threads(len(sites) if not cfg.federation.threads else min(cfg.federation.threads, len(sites))):
            recipe.run(env)
    except (RuntimeError, ValueError) as e:
        server = workspace / job_name(cfg) / "server"
        server_log = next((p for p in (server / "simulate_job" / "log.txt", server / "log.txt") if p.is_file()), server)
        raise FedllmError(f"federation failed: {failure_reason(run_dir) or e.__class__.__name__ + ': ' + str(e).splitlines()[0]} "
                          f"(server log: {server_log})") from None
    return time.perf_counter() - started


def failure_reason(run_dir: str | os.PathLike) -> str:
    """Why the server stopped the job, from its event log: the last ``round_failed`` message
    (fedllm.federation.participation), else ""."""
    layout = RunDir(run_dir)
    failed = [e for e in events.read_events(layout.server_events) if e["event"] == "round_failed"] \
        if layout.server_events.is_file() else []
    return (failed[-1].get("message") or "") if failed else ""


def summarize_federation(cfg: ExperimentConfig, run_dir: str | os.PathLike, sites: list[str], steps_per_round: dict[str, int]) -> dict:
    """The fedavg setting's entry for summary.json, from the event logs.

    The global model's loss on the combined validation set at round r is the
    token-weighted mean of every site's validation of it on its own val split
    (the combined set is exactly their union), so no site's data leaves it.
    With ``federation.lora_aggregation=product_svd`` it also holds ``lora_aggregation``:
    one ``{"round", "factor_error", "svd_error"}`` per round (the server's ``lora_aggregation``
    events; see ``fedllm.federation.aggregation``).
    """
    layout = RunDir(run_dir)
    server = events.read_events(layout.server_events)
    per_site = {s: events.read_events(layout.site_events(s)) for s in sites}

    # A resumed job appends to the logs of the one that died: per (site, round)
    # the last validation and round end count, and a round's time runs from the
    # previous save (or job start) of the job that saved it.
    per_site = {s: _last_per_round(evs, ("validate", "round_end")) for s, evs in per_site.items()}

    # Global model quality per round, from the sites' validations.
    rounds_seen: dict[int, list[tuple[float, int]]] = {}
    for site, evs in per_site.items():
        for e in evs:
            if e["event"] == "validate" and e.get("round") is not None:
                rounds_seen.setdefault(int(e["round"]), []).append((e["loss"], e["tokens"]))
    spr = max(steps_per_round.values())
    curve = []
    for r in sorted(rounds_seen):
        vals = rounds_seen[r]
        tokens = sum(t for _, t in vals)
        curve.append([r * spr, sum(l * t for l, t in vals) / max(tokens, 1)])

    # Time per round: between consecutive global-model saves on the server.
    seconds_of, saved, previous = {}, {}, None
    for e in server:
        if e["event"] == "global_model" and previous is not None:
            seconds_of[int(e["round"])] = e["ts"] - previous
            saved[int(e["round"])] = e
        if e["event"] in ("job_start", "global_model"):
            previous = e["ts"]
    rounds = [saved[r] for r in sorted(saved)]
    time_per_round = [round(seconds_of[r], 3) for r in sorted(saved)]

    bytes_per_round = {}
    tokens_per_s = []
    for site, evs in per_site.items():
        ends = [e for e in evs if e["event"] == "round_end"]
        bytes_per_round[site] = [
            {"round": int(e["round"]) + 1, "sent": e["bytes_sent"], "received": e["bytes_received"]} for e in ends
        ]
        secs = sum(e.get("train_seconds", 0) for e in ends)
        if secs:
            tokens_per_s.append(sum(e.get("tokens", 0) for e in ends) / secs)

    site_curves = {
        site: [[e["step"], e["loss"]] for e in evs if e["event"] == "validate"] for site, evs in per_site.items()
    }
    # lora_aggregation=product_svd: the server's per-round diagnostic (the last per round on resume).
    lora = {int(e["round"]): {k: e.get(k) for k in ("round", "factor_error", "svd_error")}
            for e in server if e["event"] == "lora_aggregation"}
    extra = {"lora_aggregation": [lora[r] for r in sorted(lora)]} if lora else {}
    return {
        "kind": "federated",
        "val_loss_curve": curve,
        "rounds": [
            {"round": e["round"], "seconds": time_per_round[i] if i < len(time_per_round) else None,
             # which sites this round's global model averages, and who was left out and why
             **{key: e[key] for key in ("aggregated_sites", "rejected_sites", "lost_sites") if key in e},
             # the server process's peak resident memory during the round, and the model's bytes
             **{key: e[key] for key in ("server_peak_rss", "server_peak_rss_scope", "server_rss_before_round", "bytes")
                if key in e}}
            for i, e in enumerate(rounds)
        ],
        "time_per_round_s": time_per_round,
        "bytes_per_round": bytes_per_round,
        "train_tokens_per_s": sum(tokens_per_s) / len(tokens_per_s) if tokens_per_s else None,
        "site_curves": site_curves,
        "steps_per_round": steps_per_round,
        **extra,
    }


def _last_per_round(evs: list[dict], kinds: tuple[str, ...]) -> list[dict]:
    """``evs`` with only the last event of each (kind, round) for ``kinds``."""
    last = {(e["event"], e.get("round")): i for i, e in enumerate(evs) if e["event"] in kinds}
    return [e for i, e in enumerate(evs) if e["event"] not in kinds or last[(e["event"], e.get("round"))] == i]


def final_round(run_dir: str | os.PathLike, rounds: int) -> int:
    """The last round whose global model was persisted (0 if none)."""
    layout = RunDir(run_dir)
    for r in range(rounds, 0, -1):
        if layout.round_weights(r).is_file():
            return r
    return 0


def load_global_module(cfg: ExperimentConfig, run_dir: str | os.PathLike, round_number: int):
    """A CausalLMModule holding the global model of ``round_number``."""
    from fedllm.train.site import build_module

    layout = RunDir(run_dir)
    module = build_module(cfg, str(layout.base_model), total_steps=1)
    module.load_state_dict(load_round(layout.rounds, round_number))
    return module


def federate(cfg: ExperimentConfig, run_dir: str | os.PathLike, sites: Optional[list[str]] = None,
             resume: bool = False, store: Optional[str] = None, partitions=None,
             runner: Optional[Callable[..., float]] = None) -> dict:
    """Run FedAvg over the run's sites and return the ``fedavg`` summary entry.

    The final global model is exported to ``<run>/models/fedavg`` and scored
    on the combined validation set, which closes the validation curve.
    ``store``: every round's global model (and the best one) also goes there.
    ``resume``: continue from the last round persisted for this config (in the
    store when given, else in ``federation/rounds``), checked by its manifest;
    persisted rounds are not run again. Without it the federation starts over.
    ``runner``: runs the job, ``runner(cfg, run_dir, sites, start_round=, store=)`` → its wall
    seconds; default ``simulate`` (NVFlare's simulator), or a running federation's
    (``fedllm.federation.submit.run_on_federation``).
    ``partitions``: the run's, when the caller has them open already.
    """
    from fedllm import artifacts
    from fedllm.data import load_partitions

    layout = RunDir(run_dir)
    run_dir = layout.root
    parts = partitions or load_partitions(layout.data)
    sites = sites or parts.sites
    checkpoints = layout.rounds
    done = artifacts.persisted_rounds(checkpoints, store, cfg.fingerprint()) if resume else []
    start = done[-1] if done else 0
    if start:
        artifacts.fetch_round(checkpoints, store, start)  # checked before anything runs
        events.emit("resume", site="driver", round=start, rounds=cfg.federation.rounds, store=artifacts.describe_store(store))
    else:
        for s in sites:
            layout.site_events(s).unlink(missing_ok=True)
        layout.server_events.unlink(missing_ok=True)
        layout.best_record.unlink(missing_ok=True)
        shutil.rmtree(checkpoints, ignore_errors=True)
        artifacts.clear_rounds(store)

    run_job = runner or simulate
    seconds = run_job(cfg, run_dir, sites, start_round=start, store=store or "") if start < cfg.federation.rounds else 0.0
    return finish_federation(cfg, run_dir, sites, seconds, store, partitions=parts)


def finish_federation(cfg: ExperimentConfig, run_dir: str | os.PathLike, sites: list[str], seconds: float,
                      store: Optional[str] = None, partitions=None) -> dict:
    """The fedavg summary entry of a finished job, however it ran (simulator, or
    submitted to a federation): curves and traffic from the event logs, the final
    global model checked, scored on the combined validation set and exported to
    ``models/fedavg``."""
    from fedllm import artifacts
    from fedllm.data import load_partitions
    from fedllm.train.model import load_tokenizer
    from fedllm.evaluate.task_metric import make_scorer, record_task
    from fedllm.train.site import autocast_dtype, evaluate_loss, set_threads, steps_per_round

    layout = RunDir(run_dir)
    run_dir = layout.root
    set_threads(cfg)
    parts = partitions or load_partitions(layout.data)
    checkpoints = layout.rounds
    last = final_round(run_dir, cfg.federation.rounds)
    if last != cfg.federation.rounds:
        raise FedllmError(
            f"federation ended after {last} of {cfg.federation.rounds} rounds "
            f"(no {round_name(cfg.federation.rounds)} under {checkpoints})"
        )
    spr = {s: steps_per_round(cfg, len(parts.train(s))) for s in sites}
    summary = summarize_federation(cfg, run_dir, sites, spr)

    artifacts.verify_local_dir(round_dir(checkpoints, last))
    module = load_global_module(cfg, run_dir, last)
    tokenizer = load_tokenizer(layout.base_model)
    module.site_name = "fedavg"
    final_loss = evaluate_loss(cfg, module, tokenizer, parts.combined_val())
    summary["val_loss_curve"].append([last * max(spr.values()), final_loss])
    summary["val_loss"] = final_loss
    # The last round's model is scored only here, after the job.
    artifacts.record_best(store, checkpoints, last, final_loss, cfg.fingerprint())
    summary["best_round"] = artifacts.best_of(store, checkpoints)["round"]
    summary["rounds"][-1]["val_loss"] = final_loss
    scorer = make_scorer(cfg, parts, tokenizer)
    if scorer is not None:
        # The global model of every round, scored on the pooled test rows: the
        # persisted rounds are loaded into the same module one after the other,
        # ending with the last (the one exported below).
        curve, final = [], None
        for r in range(1, last + 1):
            module.load_state_dict(load_round(checkpoints, r))
            final = scorer.score(module.model, autocast_dtype=autocast_dtype(cfg))
            curve.append({"round": r, "step": r * max(spr.values()), "accuracy": final["accuracy"], "macro_f1": final["macro_f1"]})
        summary["task"] = record_task(cfg, run_dir, "fedavg", curve, final)
    summary["job_seconds"] = seconds
    summary["steps"] = last * max(spr.values())
    # which federated algorithm produced these models, with its parameters (fedllm.federation.algorithms)
    summary["algorithm"] = algorithm_record(cfg.federation)
    from fedllm.federation.privacy import privacy_record

    # what left the sites, and the ε the run spent (fedllm.federation.privacy); absent without privacy filters
    if (privacy := privacy_record(cfg)) is not None:
        summary["privacy"] = privacy
    from fedllm.federation.transfer import run_transfer_settings

    # NVFlare's transfer timeouts the job carried, in seconds (fedllm.federation.transfer)
    summary["transfer_timeouts"] = run_transfer_settings(cfg, layout, len(sites))
    summary.update(module.export(str(layout.model("fedavg")), tokenizer=tokenizer))
    return summary
