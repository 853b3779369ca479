"""Evaluation throughput by batch size: documents/s and tokens/s of lm-eval's ``hf``
backend scoring the offline HellaSwag, PIQA and WinoGrande tasks, as ``fedllm evaluate``
runs them (same model loader, same tasks).

    python bench/eval_throughput.py [--limit N] [--batch-sizes 1,8,32,auto] [--task-data DIR]

The model is the tiny test model (built here, tokenizer trained on PIQA and WinoGrande
rows); it runs on the GPU when there is one, else the CPU. Each batch size gets a fresh
model load; only the scoring (``lm_eval.simple_evaluate`` on tasks built beforehand) is
timed. Tokens are those the model reads: context plus continuation of every request.
Prints a table and writes ``bench/results/eval-<date>-<host>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fedllm.config import TinyModelSpec  # noqa: E402
from fedllm.evaluate.model import load_model_for_eval  # noqa: E402
from fedllm.evaluate.run import make_task_manager  # noqa: E402
from fedllm.evaluate.tasks import TASK_NAMES, piqa, winogrande  # noqa: E402

SPEC = TinyModelSpec(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, vocab_size=1024)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=100, help="documents per task (default 100)")
    parser.add_argument("--batch-sizes", default="1,8,32,auto", help="comma-separated batch sizes; 'auto' lets lm-eval probe")
    parser.add_argument("--task-data", default=os.environ.get("FEDLLM_EVAL_DATA_DIR", "/work/shared/data"))
    parser.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    return parser.parse_args()


def batch_size_of(text: str):
    return text if text == "auto" else int(text)


def tokens_read(lm, samples: dict) -> int:
    """Tokens of every (context, continuation) request, as the model's tokenizer splits them."""
    total = 0
    for task_samples in samples.values():
        for sample in task_samples:
            for context, continuation in sample["arguments"]:
                total += len(lm.tok_encode(context + continuation))
    return total


def measure(model_dir: Path, batch_size, limit: int, task_data: str, work: Path) -> dict:
    import lm_eval
    import torch

    lm = load_model_for_eval(model_dir, batch_size=batch_size)
    task_manager, _ = make_task_manager("offline", task_data, TASK_NAMES, work, limit)
    tasks = task_manager.load(list(TASK_NAMES))["tasks"]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    results = lm_eval.simple_evaluate(model=lm, tasks=[tasks[name] for name in TASK_NAMES], task_manager=task_manager, limit=limit, log_samples=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    documents = sum(len(s) for s in results["samples"].values())
    requests = sum(len(sample["arguments"]) for s in results["samples"].values() for sample in s)
    tokens = tokens_read(lm, results["samples"])
    return {
        "batch_size": batch_size,
        "batch_size_used": list(lm.batch_sizes.values()) or [lm.batch_size],
        "documents": documents,
        "requests": requests,
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "documents_per_s": round(documents / seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1),
        "device": str(lm.device),
    }


def main() -> None:
    import torch

    from fedllm.train.model import build_tiny_model

    args = parse_args()
    batch_sizes = [batch_size_of(b.strip()) for b in args.batch_sizes.split(",") if b.strip()]
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedllm-eval-bench-") as work:
        work = Path(work)
        texts = [f"{d['goal']} {d['sol1']} {d['sol2']}" for d in piqa.read_docs(args.task_data)[:600]]
        texts += [d["sentence"] for d in winogrande.read_docs(args.task_data)[:600]]
        model_dir = build_tiny_model(SPEC, texts, work / "model")
        for batch_size in batch_sizes:
            rows.append(measure(model_dir, batch_size, args.limit, args.task_data, work / f"tasks-{batch_size}"))

    print(f"\n{'batch size':>10} {'used':>6} {'docs':>6} {'tokens':>8} {'seconds':>8} {'docs/s':>9} {'tokens/s':>10}  device")
    for r in rows:
        used = ",".join(str(b) for b in r["batch_size_used"])
        print(f"{r['batch_size']!s:>10} {used:>6} {r['documents']:>6} {r['tokens']:>8} {r['seconds']:>8.2f} {r['documents_per_s']:>9.1f} {r['tokens_per_s']:>10.0f}  {r['device']}")

    now = datetime.datetime.now()
    host = socket.gethostname()
    report = {
        "benchmark": "eval_throughput",
        "date": now.isoformat(timespec="seconds"),
        "host": host,
        "model": {"tiny": SPEC.__dict__},
        "tasks": list(TASK_NAMES),
        "limit_per_task": args.limit,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "results": rows,
    }
    out = Path(args.out_dir) / f"eval-{now:%Y%m%d-%H%M%S}-{host}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
