"""Offline HellaSwag, PIQA and WinoGrande: lm-eval's own tasks, rows from local files.

Each offline task is lm-eval's stock task YAML, ``include``-d unchanged (prompt,
choices, target, metrics, ``process_docs``), with only where the rows come from
overridden: a ``custom_dataset`` hook that reads the original release files from a
task-data directory (layout of the shared ``data/`` folder beside a checkout, see each module) and returns
the rows in the schema of the hub dataset lm-eval would have downloaded.

lm-eval resolves ``include:`` against a file path, and the path of lm-eval's task
folder depends on where it is installed, so the YAML files are written at run time
into a folder of the caller's choosing by :func:`write_task_folder`; a
``TaskManager(include_path=that_folder, include_defaults=False)`` then knows exactly
these tasks, under lm-eval's names (``hellaswag``, ``piqa``, ``winogrande``).

With a document limit, lm-eval scores the first ``limit`` documents of a task in file
order; the hook is then told to hand lm-eval only those (``first_docs``). Scores are
unchanged, and lm-eval no longer re-runs HellaSwag's ``process_docs`` over all 10042
rows on each of its passes over the documents (tens of seconds on two cores). Every
row is still read and checked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fedllm.errors import FedllmError

#: task name -> (lm-eval's stock YAML, relative to lm_eval/tasks; fedllm module reading the rows)
OFFLINE_TASKS: dict[str, tuple[str, str]] = {
    "hellaswag": ("hellaswag/hellaswag.yaml", "fedllm.evaluate.tasks.hellaswag"),
    "piqa": ("piqa/piqa.yaml", "fedllm.evaluate.tasks.piqa"),
    "winogrande": ("winogrande/default.yaml", "fedllm.evaluate.tasks.winogrande"),
}
TASK_NAMES = tuple(OFFLINE_TASKS)


def lm_eval_task_dir() -> Path:
    """The folder of lm-eval's built-in task YAML files in this installation."""
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def check_task_names(tasks) -> tuple[str, ...]:
    """``tasks`` as a tuple, or an error naming the unknown one and the allowed ones."""
    names = tuple(tasks)
    if not names:
        raise FedllmError(f"no evaluation task given; choose from {', '.join(TASK_NAMES)}")
    for name in names:
        if name not in OFFLINE_TASKS:
            raise FedllmError(f"unknown evaluation task {name!r}; choose from {', '.join(TASK_NAMES)}")
    if len(set(names)) != len(names):
        raise FedllmError(f"evaluation tasks {', '.join(names)}: a task is named twice")
    return names


def task_yaml(name: str, data_dir: Path, first_docs: int | None = None) -> str:
    """The YAML of the offline task ``name`` reading its rows from ``data_dir``."""
    stock_yaml, module = OFFLINE_TASKS[name]
    # json.dumps gives a double-quoted YAML scalar, safe for any path.
    return "\n".join(
        [
            f"# lm-eval's own {name} task; only where its rows come from is changed.",
            f"include: {json.dumps(str(lm_eval_task_dir() / stock_yaml))}",
            f"task: {name}",
            f"dataset_path: {json.dumps(str(data_dir))}",
            "dataset_name: null",
            "dataset_kwargs:",
            f"  data_dir: {json.dumps(str(data_dir))}",
            f"  first_docs: {json.dumps(first_docs)}",
            f"custom_dataset: !function {module}.load_rows",
            # The hook returns the validation rows only; no train split, so no few-shot pool.
            "training_split: null",
            "validation_split: validation",
            "test_split: null",
            "",
        ]
    )


def write_task_folder(data_dir: str | os.PathLike, folder: str | os.PathLike, tasks=TASK_NAMES, first_docs: int | None = None) -> Path:
    """Write one YAML per task in ``tasks`` into ``folder``; return ``folder``.

    ``data_dir`` must be a local directory (an ``s3://`` copy is fetched before).
    Rows are read, and checked, only when lm-eval builds the task; ``first_docs``
    (the evaluation's document limit, or None for all) is how many it is handed.
    """
    data = Path(data_dir).expanduser().resolve()
    if not data.is_dir():
        raise FedllmError(f"task data {data_dir}: not a directory (expected piqa/, winogrande/, hellaswag/ inside)")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for name in check_task_names(tasks):
        (out / f"{name}.yaml").write_text(task_yaml(name, data, first_docs), encoding="utf-8")
    return out
