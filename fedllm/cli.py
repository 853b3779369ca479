"""``fedllm``: one CLI, one subcommand per step. Each calls one library function;
the Kubeflow components and the container entrypoint call the same ones.

Errors are one line (``error: ...``) and a non-zero exit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedllm.errors import FedllmError, run_command


def _load(args):
    from fedllm.config import load_config

    return load_config(args.config, overrides=args.set)


def _out_dir(args, cfg) -> Path:
    return Path(args.out or cfg.output_dir)


def _log_format_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-format", choices=("auto", "live", "json"), default="auto",
                   help="live: one live view of the steps, sites, loss, tokens/s and ETA; json: the event lines, one "
                        "per event (stdout holds nothing else; the closing summary goes to stderr); "
                        "auto (default): live at a terminal, json otherwise")


def _console(args, plan):
    """The command's output: the live view or the event lines (fedllm.progress)."""
    from fedllm.progress import console_output

    return console_output(plan, "json" if getattr(args, "no_progress", False) else args.log_format)


def _say(on_stdout: bool, *lines: str) -> None:
    """The command's closing lines: after the live view, on stdout; with JSON event lines,
    on stderr, so that stdout holds event lines only."""
    print(*lines, sep="\n", file=sys.stdout if on_stdout else sys.stderr)


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


def _federate(args, cfg):
    from fedllm.run import is_prepared, open_run, prepare, run_federation
    from fedllm.rundir import RunDir

    out = _out_dir(args, cfg)
    if args.resume and not args.reprepare:
        run = open_run(out, args.store) if is_prepared(cfg, out) else prepare(cfg, out, store=args.store)
    elif not RunDir(out).partition_marker.is_file() or args.set or args.reprepare:
        run = prepare(cfg, out, store=args.store)
    else:
        run = open_run(out, args.store)
    runner = None
    if args.submit:  # the same job, on the running federation the admin kit logs in to
        from fedllm.federation.submit import submitter

        runner = submitter(args.submit, timeout_s=args.timeout)
    result = run_federation(run, resume=args.resume, runner=runner)
    return result, run


def cmd_federate(args) -> int:
    from fedllm.progress import Plan

    cfg = _load(args)
    if args.submit:  # its log is the job's own, in plain lines (fedllm.federation.submit.EventTail)
        result, run = _federate(args, cfg)
    else:
        with _console(args, Plan.of_run(cfg, "federate", steps=["prepare", "fedavg"])) as view:
            result, run = _federate(args, cfg)
    _say(bool(args.submit) or view is not None,
         f"fedavg: val_loss {result['val_loss']:.4f} after {len(result['time_per_round_s'])} rounds "
         f"({result['job_seconds']:.1f} s); global models in {run.dir.rounds}")
    return 0


def cmd_train(args) -> int:
    from fedllm.progress import Plan
    from fedllm.run import open_run, run_baseline, score_base
    from fedllm.rundir import Setting

    kind = Setting.parse(args.setting).kind
    steps = ["base" if kind == "base" else args.setting if kind == "fedavg" else "baseline"]
    try:
        plan = Plan.of_run(open_run(args.run_dir).cfg, "train", steps=steps)
    except FedllmError:  # not a prepared run: the step itself says so
        plan = Plan("train", steps)
    with _console(args, plan) as view:
        result = score_base(args.run_dir) if args.setting == "base" else run_baseline(args.run_dir, args.setting)
    _say(view is not None, f"{args.setting}: val_loss {result['val_loss']:.4f}")
    return 0


def cmd_summarize(args) -> int:
    from fedllm.run import write_summary

    write_summary(args.run_dir)
    print(f"{Path(args.run_dir) / 'summary.json'}")
    return 0


def cmd_run(args) -> int:
    from fedllm.progress import Plan
    from fedllm.report import format_table_text
    from fedllm.run import run_experiment

    cfg = _load(args)
    run = _out_dir(args, cfg)
    # The live view (or the event lines) is the progress: no Lightning bars.
    with _console(args, Plan.of_run(cfg)) as view:
        summary = run_experiment(cfg, run, progress=False, store=args.store, resume=args.resume)
    _say(view is not None, "", format_table_text(summary),
         f"\nsummary: {run / 'summary.json'}\nreport:  {run / 'report' / 'index.html'}")
    return 0


def cmd_report(args) -> int:
    from fedllm.report import write_report

    print(write_report(args.run_dir))
    return 0


def cmd_bundle(args) -> int:
    from fedllm.store import bundle, redact

    meta = {}
    for item in args.meta:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise FedllmError(f"--meta {item!r}: expected KEY=VALUE, e.g. --meta source=hf:org/name")
        meta[key] = value
    local_path = args.local_path
    if local_path.startswith("pkg://"):  # a GGUF file inside an installed Python package
        from fedllm.train.gguf import locate_gguf

        local_path = locate_gguf(local_path)
    manifest = bundle(local_path, args.uri, meta)
    print(f"bundled {len(manifest['files'])} files ({manifest['total_bytes']} bytes) to {redact(args.uri)}")
    return 0


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", help="store URI (s3://bucket/prefix or a path) that receives every checkpoint and "
                                   "artifact of the run (default: $FEDLLM_STORE; none if unset)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run: reuse finished steps, "
                                                         "resume the federation from its last persisted round")


def cmd_evaluate(args) -> int:
    from fedllm.evaluate import batch_size_from_text, evaluate_model
    from fedllm.progress import Plan

    # Its scores below are its result, on stdout in either mode: it writes no event lines.
    with _console(args, Plan("evaluate", ["evaluate"])):
        result = evaluate_model(
            args.model,
            adapter_path=args.adapter,
            tasks=[t.strip() for t in args.tasks.split(",") if t.strip()],
            limit=args.limit,
            batch_size=batch_size_from_text(args.batch_size),
            task_data=args.task_data,
            output=args.output,
            source=args.source,
            dtype=args.dtype,
        )
    for name, m in result["metrics"].items():
        err = f" ± {m['stderr']:.3f}" if m.get("stderr") is not None else ""
        print(f"{name:22s} {m['value']:.4f}{err}")
    if args.output:
        print(f"written: {args.output}")
    return 0


def cmd_provision(args) -> int:
    from fedllm.deploy.provision import provision

    result = provision(args.values, args.out, release=args.release, chart_dir=args.chart)
    print(f"startup kits in {args.out}; apply the Secrets with: kubectl apply -n <namespace> -f {args.out}/secrets/")
    for participant, name in result["secret_names"].items():
        print(f"  {participant:20s} {name}")
    print(f"then: helm install {args.release} {args.chart or 'charts/fedllm-federation'} -f {args.values} -f {result['provisioned_values']}")
    return 0


def cmd_logs(args) -> int:
    from fedllm.deploy.logs import follow_logs

    return follow_logs(args.release, namespace=args.namespace, follow=not args.no_follow, since=args.since)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedllm", description="Federated fine-tuning of LLMs with NVIDIA FLARE.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("partition", help="load the data sources, partition them into sites, split, build the base model")
    _config_args(p)
    p.set_defaults(func=cmd_partition)

    p = sub.add_parser("federate", help="run the FedAvg federation in NVFlare's simulator, or on a running federation (--submit)")
    _config_args(p)
    p.add_argument("--reprepare", action="store_true", help="rebuild partitions and base model even if present")
    p.add_argument("--submit", metavar="ADMIN_KIT", help="run the job on the running federation (Helm chart, POC) this admin startup "
                   "kit logs in to (a kit dir, or the admin Secret mounted as files), not in the simulator; its server and "
                   "sites must see the run dir at the same path; the store (--store, $FEDLLM_STORE) receives the server's uploads and needs its credentials")
    p.add_argument("--timeout", type=float, default=0, metavar="SECONDS", help="with --submit: abort the job after this long (default: no limit)")
    _store_args(p)
    _log_format_arg(p)
    p.set_defaults(func=cmd_federate)

    p = sub.add_parser("train", help="train one non-federated setting of a prepared run: site:<name>, centralized, or base (score only)")
    p.add_argument("run_dir")
    p.add_argument("--setting", required=True, help="site:<name>, centralized or base")
    _log_format_arg(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("summarize", help="collect a run's finished settings into summary.json")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_summarize)

    p = sub.add_parser("evaluate", help="zero-shot lm-eval (HellaSwag, PIQA, WinoGrande) of a model or base + PEFT adapter")
    p.add_argument("--model", required=True, help="HF model dir or s3:// copy (the base, when --adapter is given)")
    p.add_argument("--adapter", help="PEFT adapter dir or s3:// copy (LoRA, IA3, p-tuning, prompt tuning)")
    p.add_argument("--tasks", default="hellaswag,piqa,winogrande", help="comma-separated task names")
    p.add_argument("--limit", type=int, help="score only the first N documents of each task")
    p.add_argument("--batch-size", default="auto", help="an integer or 'auto' (lm-eval's probe on a GPU, 16 on a CPU)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"), help="weights' dtype; auto: bf16 on a CPU with native bf16, else the model's")
    p.add_argument("--task-data", help="folder or s3:// prefix with piqa/, winogrande/, hellaswag/ (default: $FEDLLM_EVAL_DATA_DIR)")
    p.add_argument("--source", default="offline", choices=["offline", "hub"], help="offline task data, or lm-eval's hub datasets")
    p.add_argument("--output", help="write the results JSON here")
    _log_format_arg(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("provision", help="NVFlare provisioning from the chart's values: startup kits and one K8s Secret per participant")
    p.add_argument("values", help="the chart values file listing the server and sites")
    p.add_argument("-o", "--out", required=True, help="output folder (kits/ and secrets/); keep it private")
    p.add_argument("--release", default="fedllm", help="the Helm release name the Secrets are named for")
    p.add_argument("--chart", help="the chart whose values.yaml and values.schema.json apply (default: the copy packaged "
                                   "with fedllm, equal to charts/fedllm-federation)")
    p.set_defaults(func=cmd_provision)

    p = sub.add_parser("logs", help="follow every site of a Helm release, each line prefixed with its site")
    p.add_argument("release")
    p.add_argument("-n", "--namespace", default="default")
    p.add_argument("--since", type=int, help="only lines from the last N seconds")
    p.add_argument("--no-follow", action="store_true", help="print what is there and stop")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("report", help="write RUN_DIR/report/index.html and report.md from summary.json")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("run", help="the whole experiment: partition, FedAvg, baselines, summary")
    _config_args(p)
    p.add_argument("--no-progress", action="store_true", help="no live view: the same as --log-format json")
    _store_args(p)
    _log_format_arg(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("bundle", help="upload a local model, data set or eval task folder to a store URI, with a manifest")
    p.add_argument("local_path", help="a folder (HF model dir, data set, eval task data), one file, or a GGUF file "
                                      "inside an installed Python package: pkg://<package>/<file>.gguf")
    p.add_argument("uri", help="where it goes, e.g. s3://models/tiny-llama")
    p.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE", help="recorded in the manifest (repeatable)")
    p.set_defaults(func=cmd_bundle)
    return parser


def main(argv=None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
