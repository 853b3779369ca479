"""Zero-shot evaluation of one model with lm-eval: HellaSwag, PIQA, WinoGrande.

    result = evaluate_model("runs/exp1/global", adapter_path="runs/exp1/global/adapter",
                            tasks=("piqa", "winogrande"), limit=200, output="eval/global.json")
    result["metrics"]["piqa/acc"]   # {"value": 0.61, "stderr": 0.034}

The flow, top to bottom: check the request, bring remote inputs here, build the tasks
(lm-eval's own definitions; rows from local files unless ``source="hub"``), load the
model with lm-eval's ``hf`` backend, run ``lm_eval.simple_evaluate`` zero-shot, and
reduce its results to the metrics every report reads.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from fedllm.errors import FedllmError
from fedllm.files import write_json_atomic
from fedllm.evaluate.model import load_model_for_eval, resolve_batch_size, resolve_device, resolve_dtype
from fedllm.evaluate.tasks import OFFLINE_TASKS, TASK_NAMES, check_task_names, lm_eval_task_dir, write_task_folder

#: the lm-eval metrics reported per task (each task's YAML defines them)
TASK_METRICS = {"hellaswag": ("acc", "acc_norm"), "piqa": ("acc", "acc_norm"), "winogrande": ("acc",)}
SOURCES = ("offline", "hub")
DATA_DIR_VARIABLE = "FEDLLM_EVAL_DATA_DIR"


def evaluate_model(
    model_path: str | os.PathLike,
    adapter_path: str | os.PathLike | None = None,
    tasks: Sequence[str] = TASK_NAMES,
    limit: Optional[int] = None,
    batch_size: int | str = "auto",
    task_data: str | os.PathLike | None = None,
    device: Optional[str] = None,
    output: str | os.PathLike | None = None,
    source: str = "offline",
    dtype: str = "auto",
) -> dict:
    """Score a model zero-shot on ``tasks`` and return (and write to ``output``) the summary.

    ``model_path``: a Hugging Face model directory, or an ``s3://`` copy of one; a
    full-weight model or the base of ``adapter_path`` (a PEFT adapter directory or
    ``s3://`` copy: LoRA, IA3, p-tuning, prompt tuning). ``tasks``: names, or one
    comma-separated string (``"piqa,winogrande"``). ``limit``: score only the
    first ``limit`` documents of each task. ``task_data``: the directory (or ``s3://``
    folder) holding ``piqa/``, ``winogrande/``, ``hellaswag/`` as in
    the shared ``data/`` folder; defaults to ``$FEDLLM_EVAL_DATA_DIR``. ``source="hub"``
    uses lm-eval's stock tasks, which download their rows from the Hugging Face hub.
    ``device`` defaults to ``cuda`` when available, else ``cpu``. ``batch_size="auto"`` is
    lm-eval's probe on a GPU and a fixed 16 on a CPU (``model.CPU_BATCH_SIZE``). ``dtype``
    (``auto``, ``float32``, ``bfloat16``, ``float16``): ``auto`` is bf16 on a CPU that
    multiplies bf16 natively, else the model's own (``model.resolve_dtype``). The scores are
    those of lm-eval's own ``hf`` model given the same batch size and ``model.hflm_settings``.

    The result::

        {"metrics": {"hellaswag/acc": {"value": x, "stderr": s}, "hellaswag/acc_norm": ...,
                     "piqa/acc": ..., "piqa/acc_norm": ..., "winogrande/acc": ...,
                     "mean": {"value": plain mean of the above, "stderr": sqrt(sum(stderr^2)) / n}},
         "model": ..., "adapter": ..., "limit": ..., "n_docs": {"piqa": 200, ...},
         "seconds": ..., "tasks": [...], "source": ..., "task_data": ..., "device": ...,
         "batch_size": as asked, "batch_size_used": what lm-eval got (an int, or "auto"),
         "dtype": the weights' dtype ("float32", "bfloat16", ...), "lm_eval_version": ...}

    Only the tasks asked for appear, and the mean is over their metrics. A stderr is
    ``None`` where lm-eval gives none (a single document). ``output`` is written
    atomically (complete or untouched). Bad input raises a one-line :class:`FedllmError`.
    """
    import lm_eval

    started = time.perf_counter()
    if isinstance(tasks, str):  # "hellaswag,piqa", as the command line gives it
        tasks = [name.strip() for name in tasks.split(",") if name.strip()]
    tasks = check_task_names(tasks)
    check_request(limit, batch_size, source, task_data)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    batch_size_used = resolve_batch_size(batch_size, device)
    with tempfile.TemporaryDirectory(prefix="fedllm-eval-") as work:
        work = Path(work)
        task_manager, data_location = make_task_manager(source, task_data, tasks, work, limit)
        # Tasks are built (and their rows read and checked) before the model is fetched and
        # loaded: a malformed row fails in a second, not after minutes of loading weights.
        built = task_manager.load(list(tasks))["tasks"]
        model_dir = local_copy(model_path, work / "model")
        adapter_dir = local_copy(adapter_path, work / "adapter") if adapter_path is not None else None
        lm = load_model_for_eval(model_dir, adapter_dir, batch_size=batch_size_used, device=device, dtype=dtype)
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=[built[name] for name in tasks],
            task_manager=task_manager,
            num_fewshot=0,
            limit=limit,
            log_samples=False,
        )
    summary = {
        "metrics": summarise_metrics(results["results"], tasks),
        "model": str(model_path),
        "adapter": str(adapter_path) if adapter_path is not None else None,
        "limit": limit,
        "n_docs": {name: results["n-samples"][name]["effective"] for name in tasks},
        "seconds": round(time.perf_counter() - started, 3),
        "tasks": list(tasks),
        "source": source,
        "task_data": data_location,
        "device": str(lm.device),
        "batch_size": batch_size,
        "batch_size_used": batch_size_used,
        "dtype": str(lm.model.dtype).removeprefix("torch."),
        "lm_eval_version": lm_eval.__version__,
    }
    if output is not None:
        write_json_atomic(output, summary)
    return summary


def batch_size_from_text(text: str) -> int | str:
    """An evaluation batch size as written in a config or on the command line: digits are
    that integer; anything else (``"auto"``, or a mistake ``evaluate_model`` names) as given."""
    return int(text) if text.isdigit() else text


def check_request(limit, batch_size, source: str, task_data) -> None:
    """One-line errors for settings lm-eval would reject late or misread."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise FedllmError(f"evaluation limit {limit!r}: expected a positive number of documents per task, or none")
    if batch_size != "auto" and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise FedllmError(f"evaluation batch size {batch_size!r}: expected 'auto' or a positive integer")
    if source not in SOURCES:
        raise FedllmError(f"evaluation source {source!r}: expected one of {', '.join(SOURCES)}")
    if source == "hub" and task_data is not None:
        raise FedllmError(f"task data {task_data}: only used with source 'offline' (source 'hub' downloads lm-eval's own rows)")


def local_copy(location: str | os.PathLike, local_dir: Path) -> Path:
    """``location`` itself if local, else the ``s3://`` folder downloaded into ``local_dir``."""
    if str(location).startswith("s3://"):
        from fedllm.store import fetch_path

        return fetch_path(str(location), local_dir)
    return Path(location).expanduser()


def make_task_manager(source: str, task_data, tasks: Sequence[str], work: Path, limit: Optional[int] = None):
    """lm-eval's ``TaskManager`` knowing ``tasks``, and where their rows come from (for the record)."""
    from lm_eval.tasks import TaskManager

    if source == "hub":
        # Index only the stock tasks' folders: indexing all of lm-eval's takes half a minute.
        folders = [str(lm_eval_task_dir() / Path(OFFLINE_TASKS[name][0]).parent) for name in tasks]
        return TaskManager(include_path=folders, include_defaults=False), "hub"
    location = task_data if task_data is not None else os.environ.get(DATA_DIR_VARIABLE)
    if not location:
        raise FedllmError(
            f"no task data: pass a directory or s3:// URI holding piqa/, winogrande/, hellaswag/ "
            f"(as in the shared data/ folder), set {DATA_DIR_VARIABLE}, or use source 'hub'"
        )
    data_dir = local_copy(location, work / "task-data")
    folder = write_task_folder(data_dir, work / "tasks", tasks, first_docs=limit)
    return TaskManager(include_path=str(folder), include_defaults=False), str(location)


def summarise_metrics(lm_eval_results: dict, tasks: Sequence[str]) -> dict:
    """``{"<task>/<metric>": {"value", "stderr"}, ..., "mean": ...}`` from lm-eval's ``results``."""
    metrics = {}
    for name in tasks:
        scores = lm_eval_results[name]
        for metric in TASK_METRICS[name]:
            stderr = scores.get(f"{metric}_stderr,none")
            metrics[f"{name}/{metric}"] = {
                "value": float(scores[f"{metric},none"]),
                "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,  # lm-eval writes "N/A"
            }
    values = list(metrics.values())
    stderrs = [m["stderr"] for m in values]
    metrics["mean"] = {
        "value": sum(m["value"] for m in values) / len(values),
        # The metrics are treated as independent: the standard error of their plain mean.
        "stderr": math.sqrt(sum(s * s for s in stderrs)) / len(values) if None not in stderrs else None,
    }
    return metrics
