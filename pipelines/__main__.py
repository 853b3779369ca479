"""``python -m pipelines``: compile the Kubeflow pipeline, run it here with kfp.local,
or start a run on a Kubeflow Pipelines host. Run it from a fedllm source checkout
(the folder holding ``pipelines/`` and ``components/``).

Errors are one line (``error: ...``) and exit status 2, as in the ``fedllm`` CLI.
"""

from __future__ import annotations

import argparse
import sys

from fedllm.errors import FedllmError, run_command
from pipelines import COMPILED


def _params(items: list[str]) -> dict:
    import yaml

    params = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            raise FedllmError(f"--param {item!r}: expected NAME=VALUE, e.g. federation_mode=submit")
        params[key.strip()] = yaml.safe_load(value) if value else ""
    return params


def cmd_compile(args) -> int:
    from pipelines.build import compile_pipeline, load_placement

    placement = load_placement(args.placement) if args.placement else None
    print(compile_pipeline(args.out, image=args.image, placement=placement))
    return 0


def cmd_run(args) -> int:
    if not args.local:
        raise FedllmError("python -m pipelines run: only --local runs here; start a cluster run with "
                          "`python -m pipelines submit CONFIG --host URL`")
    from pipelines.local_run import run_local

    run = run_local(args.config, args.set, args.root, args.pipeline, **_params(args.param))
    print(f"summary: {run / 'summary.json'}\nreport:  {run / 'report' / 'index.html'}")
    return 0


def cmd_submit(args) -> int:
    from pipelines.submit import submit_run

    run_id, link = submit_run(args.config, args.host, args.set, args.pipeline, args.experiment, args.namespace, **_params(args.param))
    print(f"run {run_id}: {link}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines", description="The Kubeflow pipeline: compile it, run it locally "
                                                                             "(kfp.local), or start a run on a cluster.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("compile", help="write the compiled pipeline YAML")
    p.add_argument("--out", default=str(COMPILED), help="output file (default: the committed pipelines/federated_finetune.yaml)")
    p.add_argument("--image", help="image every step runs (default: ghcr.io/fedllm/fedllm:<version>)")
    p.add_argument("--placement", help="YAML of per-step GPUs, node selectors, tolerations, e.g. {federate: {gpus: 4}}")
    p.set_defaults(func=cmd_compile)
    for name, text, func in (("run", "run every step here with kfp.local (--local)", cmd_run),
                             ("submit", "start a run on Kubeflow Pipelines; prints its UI link", cmd_submit)):
        p = sub.add_parser(name, help=text)
        p.add_argument("config", help="experiment config (YAML); for submit also an s3:// URI")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field (repeatable)")
        p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="another pipeline parameter, e.g. federation_mode=submit (repeatable)")
        p.add_argument("--pipeline", default=str(COMPILED), help="compiled pipeline YAML")
        p.set_defaults(func=func)
    sub.choices["run"].add_argument("--local", action="store_true", help="run on this machine (the only place `run` runs)")
    sub.choices["run"].add_argument("--root", default="runs/pipeline", help="where every step's artifacts go")
    sub.choices["submit"].add_argument("--host", required=True, help="Kubeflow Pipelines API, e.g. http://localhost:8080")
    sub.choices["submit"].add_argument("--namespace", help="Kubeflow profile namespace")
    sub.choices["submit"].add_argument("--experiment", default="fedllm", help="experiment the run is filed under")
    return parser


def main(argv=None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
