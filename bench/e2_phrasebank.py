"""E2 — federated LoRA on Financial PhraseBank: does FedAvg beat every bank alone?

The demo's experiment (configs/demo.yaml: SmolLM2-135M-Instruct, LoRA r 8 on q/v, three
sites from a Dirichlet split over the label, 3 rounds x 10 steps) at the seed's
alpha = 1, 5, 10 and at the demo's own alpha, each a whole ``fedllm run`` without the
zero-shot evaluation: base, each site alone, centralized and FedAvg (plus whatever
``baselines.lora_aggregations`` the config lists), scored by the task metric (the label
with the highest log-likelihood, on the 227 pooled test rows), and FedAvg against every
other setting with its paired bootstrap 95% interval.

    .venv/bin/python bench/e2_phrasebank.py [--alphas 1 5 10] [--quick] [--set key=value ...]
    .venv/bin/python bench/e2_phrasebank.py --alphas 1 --result e2_fedprox \
        --set 'baselines.algorithms=[fedprox]' --set federation.fedprox.mu=0.1   # FedAvg and FedProx side by side

Prints a table and writes ``bench/results/<result>.json`` (default ``e2``); runs of other
alphas already there under the same overrides are kept (a rerun alpha replaces its own).
About 5-10 minutes per alpha on an idle 2-core CPU, plus 2-3 per side-by-side algorithm.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import describe_setup, print_table, write_result  # noqa: E402

DEMO_CONFIG = REPO / "configs" / "demo.yaml"
SEED_ALPHAS = (1.0, 5.0, 10.0)
QUICK = ["training.steps_per_round=2", "federation.rounds=2", "data.sources.0.max_records=400",
         "data.partition.min_site_records=30"]


def run_alpha(alpha: float, overrides: list[str], work: Path) -> dict:
    """One whole run at ``alpha``; its summary's task numbers and comparisons."""
    from fedllm.config import load_config
    from fedllm.data import load_partitions
    from fedllm.report.run_summary import display_name
    from fedllm.run import run_experiment

    cfg = load_config(DEMO_CONFIG, [f"data.partition.alpha={alpha}", "evaluation.enabled=false", *overrides])
    started = time.perf_counter()
    summary = run_experiment(cfg, work / f"alpha-{alpha:g}", progress=False)
    seconds = time.perf_counter() - started
    parts = load_partitions(work / f"alpha-{alpha:g}" / "data")
    labels = {s: _label_counts(parts.train(s)) for s in parts.sites}
    settings = {
        key: {
            "name": display_name(key, entry),
            "accuracy": entry["task"]["accuracy"],
            "macro_f1": entry["task"]["macro_f1"],
            "curve": entry["task"]["curve"],
            "val_loss": entry.get("val_loss"),
        }
        for key, entry in summary["settings"].items()
        if entry.get("task")
    }
    return {"alpha": alpha, "seconds": round(seconds, 1), "site_labels": labels, "settings": settings,
            "comparisons": summary.get("comparisons", []), "setup": describe_setup(cfg, alpha=alpha)}


def _label_counts(rows) -> dict:
    counts: dict = {}
    for row in rows:
        counts[row.label] = counts.get(row.label, 0) + 1
    return dict(sorted(counts.items()))


def verdict(comparison: dict) -> str:
    lo, hi = comparison["ci95"]
    return "better" if lo > 0 else "worse" if hi < 0 else "within noise"


def table_rows(results: list[dict]) -> list[list]:
    rows = []
    for r in results:
        s = r["settings"]
        sites = sorted(k for k in s if k.startswith("site:"))
        best_site = max(sites, key=lambda k: s[k]["accuracy"]) if sites else None
        fed = [k for k in s if k == "fedavg" or k.startswith("fedavg:")]
        for key in fed:
            against = {c["against"]: c for c in r["comparisons"] if c["setting"] == key and c["metric"] == "accuracy"}
            vs_best = against.get(best_site)
            vs_central = against.get("centralized")
            vs_fedavg = against.get("fedavg")
            rows.append([
                f"{r['alpha']:g}", s[key].get("name", key),
                f"{s['base']['accuracy']:.3f}" if "base" in s else "",
                " / ".join(f"{s[k]['accuracy']:.3f}" for k in sites),
                f"{s['centralized']['accuracy']:.3f}" if "centralized" in s else "",
                " → ".join(f"{p['accuracy']:.3f}" for p in s[key]["curve"]),
                f"{s[key]['macro_f1']:.3f}",
                f"{vs_best['difference']:+.3f} [{vs_best['ci95'][0]:+.3f}, {vs_best['ci95'][1]:+.3f}] {verdict(vs_best)}" if vs_best else "",
                f"{vs_central['difference']:+.3f} [{vs_central['ci95'][0]:+.3f}, {vs_central['ci95'][1]:+.3f}] {verdict(vs_central)}" if vs_central else "",
                f"{vs_fedavg['difference']:+.3f} [{vs_fedavg['ci95'][0]:+.3f}, {vs_fedavg['ci95'][1]:+.3f}] {verdict(vs_fedavg)}" if vs_fedavg else "",
            ])
    return rows


HEADER = ["alpha", "federated setting", "base acc", "sites alone acc", "centralized acc", "acc per round",
          "macro-F1", "− best site [95% CI]", "− centralized [95% CI]", "− FedAvg [95% CI]"]


def earlier_runs(path: Path, overrides: list[str], quick: bool, exclude: list[float]) -> list[dict]:
    """The other alphas' runs already in ``path`` (``bench/results/e2.json``) under the same overrides:
    each alpha takes minutes, so a run of some alphas adds to the file instead of
    replacing it (an alpha run again replaces its old numbers)."""
    if not path.is_file():
        return []
    earlier = json.loads(path.read_text())
    if earlier.get("overrides") != overrides or earlier.get("quick") != quick:
        return []
    return [run for run in earlier.get("runs", []) if run["alpha"] not in exclude]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--alphas", nargs="+", type=float, help="default: the demo's alpha, then 1, 5, 10")
    parser.add_argument("--quick", action="store_true", help="2 rounds x 2 steps on 400 rows: a smoke run")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    parser.add_argument("--keep", help="keep the run dirs under this folder")
    parser.add_argument("--result", default="e2", help="bench/results/<RESULT>.json (default e2): runs with other "
                                                       "overrides go to a file of their own")
    args = parser.parse_args(argv)

    from fedllm.config import load_config

    demo_alpha = load_config(DEMO_CONFIG).data.partition.alpha
    alphas = args.alphas or [demo_alpha, *[a for a in SEED_ALPHAS if a != demo_alpha]]
    overrides = (QUICK if args.quick else []) + list(args.set)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fedllm-e2-"))
    results = earlier_runs(REPO / "bench" / "results" / f"{args.result}.json", overrides, args.quick, exclude=alphas)
    payload = {"demo_alpha": demo_alpha, "overrides": overrides, "runs": results, "quick": args.quick}
    try:
        for alpha in alphas:
            results.append(run_alpha(alpha, overrides, work))
            results.sort(key=lambda run: run["alpha"])
            write_result(args.result, payload)  # each alpha's numbers as soon as they exist
            print_table(HEADER, table_rows([run for run in results if run["alpha"] == alpha]))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print_table(HEADER, table_rows(results))
    print(f"[e2] wrote {write_result(args.result, payload)}")
    return payload


if __name__ == "__main__":
    main()
