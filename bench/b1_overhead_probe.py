"""B1 — what an NVFlare FedAvg round costs beyond the sites' training, before and after tuning.

Runs a real NVFlare 2.9 FedAvg job in the simulator (``FedAvgRecipe`` + ``SimEnv``): a tiny
torch model, N sites whose "training" is a sleep of ``--train-ms``, R rounds. The site script
(``bench/common.py``) records when each site receives each round's model, so

* per-round overhead = time between the first receives of two consecutive rounds, minus the
  training time (rounds 1..R-1; round 0 includes start-up),
* fixed cost per job = wall time of ``recipe.run`` minus R x the median round time.

Variants (each repeated ``--repeats`` times, medians reported):

* ``nvflare-defaults``  the recipe as NVFlare builds it (in-process site script);
* ``tuned-in-process``  ``apply_round_tuning`` with the in-process site script;
* ``tuned``             ``apply_round_tuning`` + ``site_process_settings()`` (fedllm's choice:
  the site script in its own process).

    .venv/bin/python bench/b1_overhead_probe.py --sites 2 --rounds 6 --repeats 3

Prints a Markdown table and writes ``bench/results/b1_overhead_probe.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import median, print_table, round_overheads, write_result  # noqa: E402
from fedllm.federation.tuning import apply_round_tuning, site_process_settings  # noqa: E402

VARIANTS = ("nvflare-defaults", "tuned-in-process", "tuned")


def run_probe(variant: str, sites: int, rounds: int, train_ms: float, workdir: Path) -> dict:
    """Run one federation of the probe job; return its round overheads and fixed cost."""
    from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
    from nvflare.recipe.sim_env import SimEnv

    times_dir = workdir / "site_times"
    process_settings = site_process_settings() if variant == "tuned" else {}
    recipe = FedAvgRecipe(
        name=f"b1-{variant}",
        model={"class_path": "torch.nn.Linear", "args": {"in_features": 64, "out_features": 8}},
        min_clients=sites,
        num_rounds=rounds,
        # relative to the repo root: the external-process command is built from this path
        train_script="bench/common.py",
        train_args=f"--train-ms {train_ms} --times-dir {times_dir}",
        **process_settings,
    )
    if variant != "nvflare-defaults":
        apply_round_tuning(recipe)
    env = SimEnv(num_clients=sites, workspace_root=str(workdir / "simulator"))
    started = time.monotonic()
    recipe.run(env)
    total_s = time.monotonic() - started
    overheads = round_overheads(times_dir, train_ms / 1000.0)
    if len(overheads) < 1:
        raise RuntimeError(f"{variant}: the sites recorded fewer than 3 rounds in {times_dir}; see {workdir}")
    round_s = median(overheads) + train_ms / 1000.0
    return {
        "total_s": total_s,
        "round_overheads_s": overheads,
        "median_round_overhead_s": median(overheads),
        "fixed_cost_s": total_s - rounds * round_s,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--train-ms", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--keep", action="store_true", help="keep the simulator workspaces (logs)")
    args = parser.parse_args(argv)
    os.chdir(REPO)  # train_script is relative to the repo root

    runs = {variant: [] for variant in args.variants}
    for repeat in range(args.repeats):
        for variant in args.variants:  # interleaved, so machine load hits every variant alike
            workdir = Path(tempfile.mkdtemp(prefix=f"b1-{variant}-"))
            try:
                result = run_probe(variant, args.sites, args.rounds, args.train_ms, workdir)
            finally:
                if not args.keep:
                    shutil.rmtree(workdir, ignore_errors=True)
            result["repeat"] = repeat
            runs[variant].append(result)
            print(
                f"[b1] {variant} repeat {repeat}: round overhead {result['median_round_overhead_s']:.3f} s, "
                f"fixed {result['fixed_cost_s']:.1f} s, total {result['total_s']:.1f} s",
                flush=True,
            )

    summary = {
        variant: {
            "median_round_overhead_s": median([r["median_round_overhead_s"] for r in results]),
            "median_fixed_cost_s": median([r["fixed_cost_s"] for r in results]),
            "median_total_s": median([r["total_s"] for r in results]),
        }
        for variant, results in runs.items()
    }
    print_table(
        ["variant", "round overhead (s, median)", "fixed cost per job (s, median)", "total (s, median)"],
        [
            [v, s["median_round_overhead_s"], s["median_fixed_cost_s"], s["median_total_s"]]
            for v, s in summary.items()
        ],
    )
    payload = {
        "benchmark": "b1_overhead_probe",
        "setup": {
            "sites": args.sites,
            "rounds": args.rounds,
            "train_ms": args.train_ms,
            "repeats": args.repeats,
            "environment": "nvflare simulator (SimEnv), CPU",
            "cpus": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
            "python": platform.python_version(),
            "nvflare": _version("nvflare"),
            "torch": _version("torch"),
        },
        "summary": summary,
        "runs": runs,
    }
    path = write_result("b1_overhead_probe", payload)
    print(f"[b1] wrote {path}")
    return payload


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()
