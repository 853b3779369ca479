"""Run the FedAvg federation in NVFlare's simulator and summarise it.

Reads the run dir ``fedllm.run.prepare_run`` made, runs the job, then builds
the ``fedavg`` entry of summary.json from the event logs the server and sites
wrote, and exports the final global model as a loadable HF directory.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import time
from pathlib import Path
from typing import Optional

from fedllm import events
from fedllm.config import ExperimentConfig
from fedllm.errors import FedllmError
from fedllm.federation.job import build_recipe, job_name
from fedllm.federation.persistor import load_round, round_dir


def simulate(cfg: ExperimentConfig, run_dir: str | os.PathLike, sites: list[str]) -> float:
    """Run the job in the simulator; return its wall time in seconds.

    NVFlare's simulator returns an exit code instead of raising: a non-zero
    code becomes a FedllmError pointing at the server's log.
    """
    from nvflare.recipe.sim_env import SimEnv

    run_dir = Path(run_dir).resolve()
    workspace = run_dir / "federation" / "workspace"
    if workspace.exists():
        shutil.rmtree(workspace)
    workspace.mkdir(parents=True)
    recipe = build_recipe(cfg, run_dir, sites)
    env = SimEnv(clients=list(sites), num_threads=cfg.federation.threads or len(sites), workspace_root=str(workspace))
    started = time.perf_counter()
    log = workspace / "simulator-console.log"
    try:
        with open(log, "w") as console, contextlib.redirect_stderr(console):
            recipe.run(env)
    except (RuntimeError, ValueError) as e:
        server_log = workspace / job_name(cfg) / "server" / "simulate_job" / "log.txt"
        raise FedllmError(f"federation failed: {e.__class__.__name__}: {str(e).splitlines()[0]} (server log: {server_log})") from None
    return time.perf_counter() - started


def summarize_federation(cfg: ExperimentConfig, run_dir: str | os.PathLike, sites: list[str], steps_per_round: dict[str, int]) -> dict:
    """The fedavg setting's entry for summary.json, from the event logs.

    The global model's loss on the combined validation set at round r is the
    token-weighted mean of every site's validation of it on its own val split
    (the combined set is exactly their union), so no site's data leaves it.
    """
    run_dir = Path(run_dir)
    server = events.read_events(run_dir / "events" / "server.jsonl")
    per_site = {s: events.read_events(run_dir / "events" / f"site-{s}.jsonl") for s in sites}

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
    marks = [e["ts"] for e in server if e["event"] in ("job_start", "global_model")]
    rounds = [e for e in server if e["event"] == "global_model"]
    time_per_round = [round(b - a, 3) for a, b in zip(marks, marks[1:])]

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
    return {
        "kind": "federated",
        "val_loss_curve": curve,
        "rounds": [
            {"round": e["round"], "seconds": time_per_round[i] if i < len(time_per_round) else None}
            for i, e in enumerate(rounds)
        ],
        "time_per_round_s": time_per_round,
        "bytes_per_round": bytes_per_round,
        "train_tokens_per_s": sum(tokens_per_s) / len(tokens_per_s) if tokens_per_s else None,
        "site_curves": site_curves,
        "steps_per_round": steps_per_round,
    }


def final_round(run_dir: str | os.PathLike, rounds: int) -> int:
    """The last round whose global model was persisted (0 if none)."""
    for r in range(rounds, 0, -1):
        if (round_dir(Path(run_dir) / "federation" / "rounds", r) / "exchanged.safetensors").is_file():
            return r
    return 0


def load_global_module(cfg: ExperimentConfig, run_dir: str | os.PathLike, round_number: int):
    """A CausalLMModule holding the global model of ``round_number``."""
    from fedllm.train.site import build_module

    module = build_module(cfg, str(Path(run_dir) / "models" / "base"), total_steps=1)
    module.load_state_dict(load_round(Path(run_dir) / "federation" / "rounds", round_number))
    return module


def federate(cfg: ExperimentConfig, run_dir: str | os.PathLike, sites: Optional[list[str]] = None) -> dict:
    """Run FedAvg over the run's sites and return the ``fedavg`` summary entry.

    The final global model is exported to ``<run>/models/fedavg`` and scored
    on the combined validation set, which closes the validation curve.
    """
    from fedllm.data import load_partitions
    from fedllm.train.model import load_tokenizer
    from fedllm.train.site import evaluate_loss, steps_per_round

    run_dir = Path(run_dir).resolve()
    parts = load_partitions(run_dir / "data")
    sites = sites or parts.sites
    for s in sites:
        (run_dir / "events" / f"site-{s}.jsonl").unlink(missing_ok=True)
    (run_dir / "events" / "server.jsonl").unlink(missing_ok=True)
    shutil.rmtree(run_dir / "federation" / "rounds", ignore_errors=True)

    seconds = simulate(cfg, run_dir, sites)
    last = final_round(run_dir, cfg.federation.rounds)
    if last != cfg.federation.rounds:
        raise FedllmError(
            f"federation ended after {last} of {cfg.federation.rounds} rounds "
            f"(see {run_dir / 'federation' / 'workspace'})"
        )
    spr = {s: steps_per_round(cfg, len(parts.train(s))) for s in sites}
    summary = summarize_federation(cfg, run_dir, sites, spr)

    module = load_global_module(cfg, run_dir, last)
    tokenizer = load_tokenizer(run_dir / "models" / "base")
    module.site_name = "fedavg"
    final_loss = evaluate_loss(cfg, module, tokenizer, parts.combined_val())
    summary["val_loss_curve"].append([last * max(spr.values()), final_loss])
    summary["val_loss"] = final_loss
    summary["rounds"][-1]["val_loss"] = final_loss
    summary["job_seconds"] = seconds
    summary["steps"] = last * max(spr.values())
    summary.update(module.export(str(run_dir / "models" / "fedavg"), tokenizer=tokenizer))
    return summary
