"""``make bench``: B1-B4 in one run, one table, one JSON result.

    .venv/bin/python bench/run_all.py [--quick] [--only b1 b2 ...]

Runs each benchmark's ``main`` (each also runs alone: ``bench/b1_overhead.py`` etc.), prints
one Markdown table (model, sequence length, batch, device, medians) and writes
``bench/results/<date>-<host>.json``:

    {"b1": {"lora": {"ratio", "round_overhead_s", ...}, "sft": {...}},
     "b2": {"lora_over_sft", "q8_over_fp32", ...},
     "b3": {"peak_rss_over_model": {"106M/2", ..., "411M/8"}, ...},
     "b4": {"speedup_over_plain", ...},
     "b1_smollm2": {...as b1}, "b4_smollm2": {...as b4},   # SmolLM2-135M (--model smollm2)
     "b4_smollm2_sft": {...as b4},                          # the same, --method sft
     "device": "..."}

A benchmark that fails is recorded with its error and the others still run; the exit code
is then 1. ``--collect`` runs nothing: it builds the table and the JSON from the latest
``bench/results/b1.json`` … ``b4.json`` each benchmark wrote when run alone (marked
``"collected": true``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import socket
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import b1_overhead, b2_bytes, b3_server_memory, b4_training_speed, e2_phrasebank, eval_throughput  # noqa: E402
from bench.common import device_name, print_table, write_result  # noqa: E402

def on_model(main, model: str, *extra: str):
    """A benchmark's ``main`` run with ``--model <model>`` (B1/B4's SmolLM2-135M rows)."""
    def run(argv: list[str]) -> dict:
        return main([*argv, "--model", model, *extra])
    return run


BENCHMARKS = {"b1": b1_overhead.main, "b2": b2_bytes.main, "b3": b3_server_memory.main, "b4": b4_training_speed.main,
              "b1_smollm2": on_model(b1_overhead.main, "smollm2"), "b4_smollm2": on_model(b4_training_speed.main, "smollm2"),
              "b4_smollm2_sft": on_model(b4_training_speed.main, "smollm2", "--method", "sft"),
              "eval": eval_throughput.main, "e2": e2_phrasebank.main}


def summary_rows(result: dict) -> list[list]:
    """The one table: benchmark, what, value, target, setup."""
    rows = []
    for key, label in (("b1", ""), ("b1_smollm2", " (SmolLM2-135M)")):
        b1 = result.get(key) or {}
        for method in ("lora", "sft"):
            if method in b1:
                r, s = b1[method], b1["setup"]
                setup = f"{s['model']}, seq {s['max_seq_length']}, batch {s['micro_batch_size']}, {r['rounds']}x{r['steps_per_round']} steps, "
                if label:
                    setup += f"{s.get('effective_precision', s['precision'])}, {s['threads']} threads, "
                setup += f"median of {s['repeats']}" + (", --quick smoke run" if b1.get("quick") else "")
                rows.append(["B1", f"{method}{label}: site tok/s / plain loop", f"{r['ratio']:.3f}", ">= 0.9 (CPU)", setup])
                rows.append(["B1", f"{method}{label}: overhead per round (s)", f"{r['round_overhead_s']:.2f}", "<= 0.2 (PEFT)", setup])
                rows.append(["B1", f"{method}{label}: fixed cost per job (s)", f"{r['fixed_cost_s']:.1f}", "<= 10", setup])
    b2 = result.get("b2") or {}
    if "lora_over_sft" in b2:
        m = b2["models"][b2["headline_model"]]
        setup = f"{b2['headline_model']} ({m['parameters'] / 1e6:.0f}M params)"
        rows.append(["B2", "LoRA bytes / SFT bytes", f"{b2['lora_over_sft']:.4f}", "<= 0.01", setup])
        for label, ratio in (b2.get("lora_over_sft_by_model") or {}).items():
            if label not in (b2["headline_model"], "tiny"):  # the tiny model is mostly embeddings
                params = b2["models"][label]["methods"]["lora"]["params"]
                rows.append(["B2", "LoRA bytes / SFT bytes", f"{ratio:.4f}", "<= 0.01",
                             f"{label} ({b2['models'][label]['parameters'] / 1e6:.0f}M params), LoRA {params}"])
        rows.append(["B2", "prompt tuning bytes / SFT bytes", f"{b2['prompt_tuning_over_sft']:.6f}", "", setup])
        for q in ("fp16", "blockwise8", "float4", "normfloat4"):
            rows.append(["B2", f"SFT {q} / fp32", f"{m['methods']['sft']['over_fp32_full'][q]:.3f}",
                         "<= 0.27" if q == "blockwise8" else "", setup])
    b3 = result.get("b3") or {}
    net = b3.get("net_peak_rss_over_model") or {}
    for point, x in (b3.get("peak_rss_over_model") or {}).items():
        # "<model>/<sites>" (an older result: "<sites>")
        model, _, sites = point.rpartition("/")
        where = f"{model + ', ' if model else ''}{sites} sites"
        rows.append(["B3", f"server peak RSS / model, {where}", f"{x:.2f}", "<= 2 (>= 400M)", b3.get("setup_line", "")])
        if net.get(point) is not None:
            rows.append(["B3", f"  net of the process itself, {where}", f"{net[point]:.2f}", "<= 1.5, flat",
                         b3.get("setup_line", "")])
    b4 = result.get("b4") or {}
    if "speedup_over_plain" in b4:
        s = b4["setup"]
        setup = f"{s['model']}, seq {s['max_seq_length']}, batch {s['micro_batch_size']}, {s['method']}, {s['steps']} steps, median of {s['repeats']}"
        rows.append(["B4", "fedllm site (defaults) / plain loop", f"{b4['fedllm_over_plain']:.3f}", "", setup])
        rows.append(["B4", f"best ({b4['best_variant']}) / plain loop", f"{b4['speedup_over_plain']:.3f}", ">= 1.3 (GPU)", setup])
    for b4 in (result.get("b4_smollm2") or {}, result.get("b4_smollm2_sft") or {}):
        if "fedllm_over_plain" not in b4:
            continue
        s = b4["setup"]
        setup = (f"{s['model']}, seq {s['max_seq_length']}, batch {s['micro_batch_size']}, {s['method']}, "
                 f"{s.get('effective_precision', s['precision'])}, {s['threads']} threads, {s['steps']} steps, median of {s['repeats']}"
                 + (", --quick smoke run" if b4.get("quick") else ""))
        rows.append(["B4", f"fedllm site / plain loop (SmolLM2-135M, {s['method']})", f"{b4['fedllm_over_plain']:.3f}", "", setup])
        for variant, value in b4["tokens_per_s"].items():
            if variant not in ("plain", "fedllm"):
                rows.append(["B4", f"  {variant} / plain loop (SmolLM2-135M, {s['method']})", f"{value / b4['tokens_per_s']['plain']:.3f}", "", setup])
    ev = result.get("eval") or {}
    if "fedllm_over_lm_eval" in ev:
        fed = ev["runs"]["fedllm"]
        setup = f"{ev['model']}, {ev['limit_per_task']} docs x {len(ev['tasks'])} tasks, batch {fed['batch_size']}, {fed['dtype']}"
        rows.append(["eval", "fedllm evaluate / lm-eval, same settings (wall)", f"{ev['fedllm_over_lm_eval']:.3f}", "<= 1", setup])
        rows.append(["eval", "  scores identical to lm-eval's", str(ev["scores_identical"]), "True", setup])
        if "fedllm_over_lm_eval_defaults" in ev:
            rows.append(["eval", "fedllm evaluate / lm-eval defaults (wall)", f"{ev['fedllm_over_lm_eval_defaults']:.3f}", "<= 1", setup])
    for run in (result.get("e2") or {}).get("runs", []):
        s = run["settings"]
        sites = sorted(k for k in s if k.startswith("site:"))
        setup = f"SmolLM2-135M LoRA, PhraseBank Dirichlet alpha {run['alpha']:g}, 3 sites, {len(s['fedavg']['curve'])} rounds"
        for key in [k for k in s if k == "fedavg" or k.startswith("fedavg:")]:
            best = max(sites, key=lambda k: s[k]["accuracy"])
            (vs_best,) = [c for c in run["comparisons"] if c["setting"] == key and c["against"] == best and c["metric"] == "accuracy"]
            lo, hi = vs_best["ci95"]
            rows.append(["E2", f"alpha {run['alpha']:g}: {key} acc − best site ({best}) [95% CI]",
                         f"{vs_best['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}]", "> 0", setup])
    for name in BENCHMARKS:
        if isinstance(result.get(name), dict) and "error" in result[name]:
            rows.append([name.upper(), "FAILED", result[name]["error"], "", ""])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="each benchmark's smoke run")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    parser.add_argument("--collect", action="store_true", help="combine the latest per-benchmark results; run nothing")
    args = parser.parse_args(argv)

    result: dict = {"device": device_name(), "started": datetime.datetime.now().isoformat(timespec="seconds"),
                    "quick": args.quick, "collected": args.collect}
    failed = False
    for name in args.only if args.collect else ():
        path = Path(__file__).resolve().parent / "results" / f"{name}.json"
        bench, _, model = name.partition("_")
        hint = f"bench/{bench}_*.py" + (f" --model {model}" if model else "")
        result[name] = json.loads(path.read_text()) if path.is_file() else {"error": f"no {path.name}; run {hint}"}
    for name in () if args.collect else args.only:
        print(f"== {name} ==", flush=True)
        try:
            result[name] = BENCHMARKS[name](["--quick"] if args.quick else [])
        except Exception as error:  # one failing benchmark must not hide the others' numbers
            traceback.print_exc()
            result[name] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
            failed = True
    result["gpu_note"] = None if "no GPU" not in result["device"] else "no GPU was lent to this run: CPU numbers only"

    print()
    print(f"device: {result['device']}")
    print_table(["bench", "measure", "value", "target", "setup"], summary_rows(result))
    stamp = datetime.date.today().isoformat()
    path = write_result(f"{stamp}-{socket.gethostname()}", result)
    print(f"[bench] wrote {path}")
    return 1 if failed else 0


def exit_now(code: int) -> None:
    """Exit even if NVFlare left threads behind: a POC admin session's connector can outlive
    ``PocEnv.stop`` and retry the stopped server forever, which would keep ``make bench``
    from returning after its results are written."""
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
