"""B4 — a fedllm site's training speed against the plain HF loop, and what makes it faster.

Same run dir (model, data, seed), same number of optimizer steps, same batch:

* ``plain``: ``bench/plain_loop.py`` in the run's precision — the reference;
* ``fedllm``: a site's training as the federation runs it (``SiteDataModule``,
  ``build_module``, ``make_trainer``, Lightning ``fit``), fedllm's defaults;
* ``fedllm+<speed-up>``: the same with one of the config's speed settings on:
  ``training.pack_sequences`` (rows packed to ``max_seq_length``, no compute on padding),
  ``training.compile`` (torch.compile), and on a GPU ``training.precision=bf16-mixed`` and
  ``training.fused_optimizer``.

Tokens/s counts real (non-padding) tokens, timed from a batch's forward to its optimizer
step, as a site reports it. Each variant is run ``--repeats`` times, interleaved; medians.

``--model smollm2``: the same on the laptop demo's real model (SmolLM2-135M-Instruct,
``configs/demo.yaml``: Financial PhraseBank rows, LoRA r 8 on q_proj/v_proj by default,
``--method sft`` for full fine-tuning; bf16 autocast where the CPU has it, in the plain loop
too), sized for a 2-core CPU: batch 8, 64 tokens, 10 steps, median of 2; no torch.compile
variant (its compile time on 2 cores would dwarf 10 steps).

    .venv/bin/python bench/b4_training_speed.py [--quick] [--method sft] [--model smollm2]

Prints a table and writes ``bench/results/b4.json`` (``b4_smollm2.json`` for ``--model smollm2``,
``b4_smollm2_sft.json`` with ``--method sft``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import MODELS, bench_config, describe_setup, median, method_overrides, print_table, write_result  # noqa: E402

#: per model: (repeats, steps) of a full run, and of ``--quick``; the method by default
BUDGETS = {"tiny": ((3, 30), (1, 10)), "smollm2": ((2, 10), (1, 3))}
DEFAULT_METHOD = {"tiny": "sft", "smollm2": "lora"}


def site_train(cfg, run_dir: Path, site: str, steps: int) -> dict:
    """Train ``steps`` steps the way a fedllm site does; return its tokens/s."""
    import pytorch_lightning as pl

    from fedllm.data import load_partitions
    from fedllm.train.model import load_tokenizer
    from fedllm.train.site import SiteDataModule, build_module, make_trainer, set_threads

    set_threads(cfg)
    pl.seed_everything(cfg.seed, verbose=False)
    base = str(run_dir / "models" / "base")
    parts = load_partitions(run_dir / "data")
    data = SiteDataModule(cfg, load_tokenizer(base), parts.train(site), parts.val(site), seed_key=site)
    module = build_module(cfg, base, total_steps=steps)
    trainer = make_trainer(cfg, max_steps=steps)
    trainer.fit(module, datamodule=data)
    return {"steps": trainer.global_step, "tokens": module.train_tokens, "train_seconds": module.train_seconds,
            "tokens_per_s": module.tokens_per_second}


def variants(gpu: bool, quick: bool, compile: bool = True) -> dict[str, list[str]]:
    """Config overrides per fedllm variant; GPU-only settings only where a GPU is."""
    out = {"fedllm": [], "fedllm+packing": ["training.pack_sequences=true"]}
    if gpu:
        out["fedllm+bf16"] = ["training.precision=bf16-mixed"]
        out["fedllm+bf16+fused"] = ["training.precision=bf16-mixed", "training.fused_optimizer=true"]
        out["fedllm+bf16+fused+packing"] = out["fedllm+bf16+fused"] + ["training.pack_sequences=true"]
    if compile and not quick:
        out["fedllm+compile"] = ["training.compile=true"]
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 repeat, fewer steps, no torch.compile")
    parser.add_argument("--model", default="tiny", choices=list(MODELS),
                        help="tiny: configs/tiny.yaml's random llama; smollm2: configs/demo.yaml's SmolLM2-135M-Instruct")
    parser.add_argument("--repeats", type=int, help="default 3 (smollm2: 2)")
    parser.add_argument("--steps", type=int, help="default 30 (smollm2: 10)")
    parser.add_argument("--method", choices=["sft", "lora"], help="default sft (smollm2: lora, as the demo)")
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides (key=value)")
    args = parser.parse_args(argv)
    full, quick = BUDGETS[args.model]
    repeats, steps = quick if args.quick else full
    args.repeats, args.steps = args.repeats or repeats, args.steps or steps
    args.method = args.method or DEFAULT_METHOD[args.model]

    import torch

    from bench.plain_loop import plain_train
    from fedllm.data import load_partitions
    from fedllm.run import prepare_run

    base_overrides = [*method_overrides(args.method, args.model), "federation.rounds=1", *args.set]
    cfg = bench_config(base_overrides, model=args.model)
    gpu = torch.cuda.is_available()
    runs: dict[str, list[dict]] = {"plain": []}
    workdir = Path(tempfile.mkdtemp(prefix="bench-b4-"))
    try:
        run_dir = prepare_run(cfg, workdir / "run")
        site = load_partitions(run_dir / "data").sites[0]
        for repeat in range(args.repeats):
            # The order alternates (plain first, then last): whichever runs first in the
            # process also pays its first-use costs (kernels for each new batch shape).
            if repeat % 2 == 0:
                runs["plain"].append(plain_train(cfg, run_dir, site, args.steps))
            for name, overrides in variants(gpu, args.quick, compile=args.model == "tiny").items():
                runs.setdefault(name, []).append(
                    site_train(bench_config(base_overrides + overrides, model=args.model), run_dir, site, args.steps))
            if repeat % 2 == 1:
                runs["plain"].append(plain_train(cfg, run_dir, site, args.steps))
            print(f"[b4] repeat {repeat}: " + ", ".join(f"{k} {v[-1]['tokens_per_s']:.0f}" for k, v in runs.items()) + " tok/s", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    tokens_per_s = {name: median([r["tokens_per_s"] for r in rs]) for name, rs in runs.items()}
    plain = tokens_per_s["plain"]
    best = max((n for n in tokens_per_s if n != "plain"), key=tokens_per_s.get)
    print_table(["variant", "tokens/s (median)", "x plain"], [[n, v, v / plain] for n, v in tokens_per_s.items()])
    name = "b4" if args.model == "tiny" else f"b4_{args.model}"
    if args.model != "tiny" and args.method != DEFAULT_METHOD[args.model]:
        name += f"_{args.method}"  # the real model's SFT rows sit beside its LoRA rows
    payload = {
        "benchmark": name,
        "quick": args.quick,
        "setup": describe_setup(cfg, steps=args.steps, repeats=args.repeats, method=args.method, model_key=args.model,
                                method_params=dict(cfg.method.params), plain_precision=runs["plain"][0]["precision"],
                                gpu_note=None if gpu else "no GPU lent to this run: CPU numbers only"),
        "tokens_per_s": tokens_per_s,
        "fedllm_over_plain": tokens_per_s["fedllm"] / plain,
        "best_variant": best,
        "speedup_over_plain": tokens_per_s[best] / plain,
        "runs": runs,
    }
    print(f"[b4] wrote {write_result(name, payload)}")
    return payload


if __name__ == "__main__":
    main()
