"""``fedllm``: one CLI, one subcommand per step. Each calls one library function;
the Kubeflow components and the container entrypoint call the same ones.

Errors are one line (``error: ...``) and a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from fedllm.errors import FedllmError


def _load(args):
    from fedllm.config import load_config

    return load_config(args.config, overrides=args.set)


def _out_dir(args, cfg) -> Path:
    return Path(args.out or cfg.output_dir)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment config (YAML), e.g. configs/demo.yaml")
    p.add_argument("--out", help="run directory (default: the config's output_dir)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field, e.g. federation.rounds=5 (repeatable)")


def cmd_partition(args) -> int:
    from fedllm.run import prepare_run

    cfg = _load(args)
    run = prepare_run(cfg, _out_dir(args, cfg))
    print(f"prepared {run}: data/partition_summary.json, data/partition_summary.png, models/base")
    return 0


def cmd_federate(args) -> int:
    from fedllm.run import prepare_run, run_federation

    cfg = _load(args)
    run = _out_dir(args, cfg)
    if not (run / "data" / "partition.json").is_file() or args.set or args.reprepare:
        run = prepare_run(cfg, run)
    result = run_federation(run)
    print(f"fedavg: val_loss {result['val_loss']:.4f} after {len(result['time_per_round_s'])} rounds "
          f"({result['job_seconds']:.1f} s); global models in {run}/federation/rounds")
    return 0


def cmd_train(args) -> int:
    from fedllm.run import run_baseline, score_base

    result = score_base(args.run_dir) if args.setting == "base" else run_baseline(args.run_dir, args.setting, progress=True)
    print(f"{args.setting}: val_loss {result['val_loss']:.4f}")
    return 0


def cmd_summarize(args) -> int:
    from fedllm.run import write_summary

    write_summary(args.run_dir)
    print(f"{Path(args.run_dir) / 'summary.json'}")
    return 0


def cmd_run(args) -> int:
    from fedllm.run import run_experiment

    cfg = _load(args)
    summary = run_experiment(cfg, _out_dir(args, cfg), progress=not args.no_progress)
    print()
    print(settings_table(summary))
    print(f"\nsummary: {_out_dir(args, cfg) / 'summary.json'}")
    return 0


def settings_table(summary: dict) -> str:
    """The settings of a run, one line each (val loss on the combined set)."""
    rows = [("setting", "val_loss", "tokens/s", "steps")]
    for name, s in summary["settings"].items():
        tps = s.get("train_tokens_per_s")
        rows.append((name, f"{s['val_loss']:.4f}", f"{tps:.0f}" if tps else "-", str(s.get("steps", "-"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedllm", description="Federated fine-tuning of LLMs with NVIDIA FLARE.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("partition", help="load the data sources, partition them into sites, split, build the base model")
    _config_args(p)
    p.set_defaults(func=cmd_partition)

    p = sub.add_parser("federate", help="run the FedAvg federation in NVFlare's simulator")
    _config_args(p)
    p.add_argument("--reprepare", action="store_true", help="rebuild partitions and base model even if present")
    p.set_defaults(func=cmd_federate)

    p = sub.add_parser("train", help="train one non-federated setting of a prepared run: site:<name>, centralized, or base (score only)")
    p.add_argument("run_dir")
    p.add_argument("--setting", required=True, help="site:<name>, centralized or base")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("summarize", help="collect a run's finished settings into summary.json")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_summarize)

    p = sub.add_parser("run", help="the whole experiment: partition, FedAvg, baselines, summary")
    _config_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_run)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FedllmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
