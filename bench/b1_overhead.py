"""B1 — what federation costs a site, against a plain training loop in the same run.

For each method (LoRA, full SFT), on the same run dir (model, data, seed), repeated:

(a) ``bench/plain_loop.py``: a plain PyTorch + HF loop, ``rounds x steps_per_round`` steps;
(b) fedllm's real federation (``fedllm.run.prepare_run`` + ``fedllm.federation.federate``,
    i.e. the job ``fedllm federate`` runs) with one site, the same number of optimizer steps.

From the events the run writes (``events/site-<site>.jsonl`` ``round_end``: ``tokens``,
``train_seconds``, ``wall_seconds``; ``events/server.jsonl`` ``global_model`` times):

* ratio = site tokens/s over plain-loop tokens/s, both timed from a batch's forward to its
  optimizer step;
* round overhead = round wall time (gap between two global models) minus the site's
  training time, over the steady rounds (round 1 carries the sites' start-up), split into
  the site's Lightning ``fit`` set-up (``wall_seconds - train_seconds``) and the rest
  (validation of the received model, NVFlare's messaging, the server's aggregation and
  persistence);
* fixed cost per job = job wall time minus rounds x the median round time.

One site keeps CPU contention between sites out of the ratio on a 2-core machine; the
per-round overhead is the federation's critical path either way.

``--model smollm2``: the same on the laptop demo's real model (SmolLM2-135M-Instruct,
``configs/demo.yaml``: Financial PhraseBank rows, LoRA r 8 on q_proj/v_proj, SFT with
``method.params={}``; bf16 autocast where the CPU has it, in the plain loop too), sized for
a 2-core CPU: 3 rounds x 3 steps, batch 8, 64 tokens, 1 repeat unless ``--repeats`` says.
The GGUF is converted into an HF folder once; later methods' run dirs link it.

    .venv/bin/python bench/b1_overhead.py [--quick] [--repeats 3] [--methods lora sft] [--model smollm2]

Prints a table and writes ``bench/results/b1.json`` (``b1_smollm2.json`` for ``--model smollm2``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import (  # noqa: E402
    MODELS, bench_config, describe_setup, median, method_overrides, print_table, reuse_base_model, write_result,
)

METHODS = ("lora", "sft")
#: per model: (repeats, rounds, steps per round) of a full run, and of ``--quick``
BUDGETS = {"tiny": ((3, 5, 5), (1, 3, 5)), "smollm2": ((1, 3, 3), (1, 3, 2))}


def federated_site(cfg, run_dir: Path, site: str) -> dict:
    """Run fedllm's federation with ``site`` alone; return its timings from the events."""
    from fedllm.federation.federate import federate

    summary = federate(cfg, run_dir, sites=[site])
    return site_timings(run_dir, site, summary["job_seconds"])


def site_timings(run_dir: Path, site: str, job_seconds: float) -> dict:
    """Round times, the site's training and fit times per round, and the job's fixed cost."""
    from fedllm import events

    server = events.read_events(run_dir / "events" / "server.jsonl")
    saved = {int(e["round"]): e["ts"] for e in server if e["event"] == "global_model"}
    start = next(e["ts"] for e in server if e["event"] == "job_start")
    ends = {int(e["round"]) + 1: e for e in events.read_events(run_dir / "events" / f"site-{site}.jsonl") if e["event"] == "round_end"}
    rounds = sorted(saved)
    if rounds != sorted(ends) or len(rounds) < 3:
        raise RuntimeError(f"b1: server saved rounds {rounds}, site {site} ended rounds {sorted(ends)} in {run_dir}")
    round_s = {r: saved[r] - (saved[r - 1] if r > 1 else start) for r in rounds}
    steady = rounds[1:]  # round 1 also carries the site's start-up
    overhead = [round_s[r] - ends[r]["train_seconds"] for r in steady]
    fit_setup = [ends[r]["wall_seconds"] - ends[r]["train_seconds"] for r in steady]
    tokens = sum(ends[r]["tokens"] for r in rounds)
    train_seconds = sum(ends[r]["train_seconds"] for r in rounds)
    return {
        "rounds": len(rounds),
        "steps": sum(ends[r]["steps"] for r in rounds),
        "tokens": tokens,
        "train_seconds": train_seconds,
        "tokens_per_s": tokens / train_seconds,
        "round_seconds": [round_s[r] for r in rounds],
        "round_overhead_s": median(overhead),
        "fit_setup_s": median(fit_setup),
        "outside_fit_s": median(overhead) - median(fit_setup),
        "job_seconds": job_seconds,
        "fixed_cost_s": job_seconds - len(rounds) * median([round_s[r] for r in steady]),
    }


def measure_method(method: str, rounds: int, steps: int, repeats: int, workdir: Path, extra: list[str],
                   model: str = "tiny", base_from: Path | None = None) -> dict:
    """``base_from``: a run dir whose base model this run links instead of making its own."""
    from fedllm.data import load_partitions
    from fedllm.run import prepare_run

    from bench.plain_loop import plain_train

    overrides = [*method_overrides(method, model), f"federation.rounds={rounds}", f"training.steps_per_round={steps}", *extra]
    if base_from is not None:
        overrides += reuse_base_model(base_from)
    cfg = bench_config(overrides, model=model)
    run_dir = prepare_run(cfg, workdir / method)
    site = load_partitions(run_dir / "data").sites[0]
    plain_runs, fed_runs = [], []
    for repeat in range(repeats):  # interleaved, so machine load hits both alike
        plain_runs.append(plain_train(cfg, run_dir, site, steps=rounds * steps))
        fed_runs.append(federated_site(cfg, run_dir, site))
        print(
            f"[b1] {method} repeat {repeat}: plain {plain_runs[-1]['tokens_per_s']:.0f} tok/s, "
            f"site {fed_runs[-1]['tokens_per_s']:.0f} tok/s, round overhead {fed_runs[-1]['round_overhead_s']:.3f} s "
            f"(fit set-up {fed_runs[-1]['fit_setup_s']:.3f} s), fixed {fed_runs[-1]['fixed_cost_s']:.1f} s",
            flush=True,
        )
    ratios = [f["tokens_per_s"] / p["tokens_per_s"] for p, f in zip(plain_runs, fed_runs)]
    return {
        "site": site,
        "ratio": median(ratios),
        "plain_tokens_per_s": median([p["tokens_per_s"] for p in plain_runs]),
        "site_tokens_per_s": median([f["tokens_per_s"] for f in fed_runs]),
        "round_overhead_s": median([f["round_overhead_s"] for f in fed_runs]),
        "fit_setup_s": median([f["fit_setup_s"] for f in fed_runs]),
        "outside_fit_s": median([f["outside_fit_s"] for f in fed_runs]),
        "fixed_cost_s": median([f["fixed_cost_s"] for f in fed_runs]),
        "round_s": median([median(f["round_seconds"][1:]) for f in fed_runs]),
        "parameters": plain_runs[0]["parameters"],
        "trainable_parameters": plain_runs[0]["trainable_parameters"],
        "method_params": dict(cfg.method.params),
        "precision": plain_runs[0]["precision"],
        "rounds": rounds,
        "steps_per_round": steps,
        "repeats": {"plain": plain_runs, "federated": fed_runs},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 repeat, 3 rounds (smollm2: of 2 steps): a smoke run")
    parser.add_argument("--model", default="tiny", choices=list(MODELS),
                        help="tiny: configs/tiny.yaml's random llama; smollm2: configs/demo.yaml's SmolLM2-135M-Instruct")
    parser.add_argument("--repeats", type=int, help="default 3 (smollm2: 1)")
    parser.add_argument("--rounds", type=int, help="default 5 (smollm2: 3)")
    parser.add_argument("--steps", type=int, help="optimizer steps per round; default 5 (smollm2: 3)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides (key=value)")
    args = parser.parse_args(argv)
    full, quick = BUDGETS[args.model]
    repeats, rounds, steps = quick if args.quick else full
    args.repeats = args.repeats or repeats
    args.rounds = args.rounds or rounds
    args.steps = args.steps or steps

    workdir = Path(tempfile.mkdtemp(prefix="bench-b1-"))
    started = time.perf_counter()
    results: dict = {}
    try:
        for m in args.methods:  # the first method's run dir makes the base model; the others link it
            base_from = workdir / args.methods[0] if results else None
            results[m] = measure_method(m, args.rounds, args.steps, args.repeats, workdir, args.set, args.model, base_from)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    setup = describe_setup(bench_config(args.set, model=args.model), repeats=args.repeats, model_key=args.model)
    print_table(
        ["method", "params", "plain tok/s", "site tok/s", "ratio", "round (s)", "overhead/round (s)", "of it: fit set-up (s)", "fixed/job (s)"],
        [
            [m, r["trainable_parameters"], r["plain_tokens_per_s"], r["site_tokens_per_s"], r["ratio"], r["round_s"],
             r["round_overhead_s"], r["fit_setup_s"], r["fixed_cost_s"]]
            for m, r in results.items()
        ],
    )
    name = "b1" if args.model == "tiny" else f"b1_{args.model}"
    payload = {"benchmark": name, "setup": setup, "seconds": time.perf_counter() - started, "quick": args.quick, **results}
    print(f"[b1] wrote {write_result(name, payload)}")
    return payload


if __name__ == "__main__":
    main()
