"""PIQA validation read from the original release files, as lm-eval's ``piqa`` documents.

Files, under the task-data directory: ``piqa/valid.jsonl`` (one ``{"goal", "sol1",
"sol2"}`` object per line) and ``piqa/valid-labels.lst`` (``0`` or ``1`` per line).
The documents are the rows of the hub dataset lm-eval reads (``baber/piqa``):
``goal``, ``sol1``, ``sol2`` as given, ``label`` an int. Prompts, choices and metrics
come from lm-eval's own ``piqa.yaml``.
"""

from __future__ import annotations

import os
from pathlib import Path

from fedllm.evaluate.tasks.rows import check_label, read_questions_and_labels, validation_split_loader

QUESTIONS = "piqa/valid.jsonl"
LABELS = "piqa/valid-labels.lst"


def read_docs(data_dir: str | os.PathLike) -> list[dict]:
    """Every PIQA validation question as ``{"goal", "sol1", "sol2", "label"}``, in file order."""
    questions, labels = Path(data_dir) / QUESTIONS, Path(data_dir) / LABELS
    docs = []
    for number, (row, label, _origin) in enumerate(read_questions_and_labels(questions, labels, ("goal", "sol1", "sol2")), start=1):
        label = check_label(label, ("0", "1"), labels, number)
        docs.append({"goal": row["goal"], "sol1": row["sol1"], "sol2": row["sol2"], "label": int(label)})
    return docs


# lm-eval's ``custom_dataset`` hook (see fedllm.evaluate.tasks).
load_rows = validation_split_loader(read_docs)
