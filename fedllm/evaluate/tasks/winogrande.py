"""WinoGrande dev read from the original release files, as lm-eval's ``winogrande`` documents.

Files, under the task-data directory: ``winogrande/dev.jsonl`` (one ``{"qID",
"sentence", "option1", "option2", "answer"}`` object per line) and
``winogrande/dev-labels.lst`` (``1`` or ``2`` per line). The documents are the rows of
the hub dataset lm-eval reads (``allenai/winogrande``, ``winogrande_xl`` validation):
``sentence``, ``option1``, ``option2`` and ``answer`` as the string ``"1"`` or ``"2"``.
The labels file is the answer key; when a row carries its own ``answer`` as well the
two must agree. lm-eval's ``doc_to_text``/``doc_to_choice``/``doc_to_target`` split the
sentence at its ``_`` blank, so a sentence without one is rejected here, with its line.
"""

from __future__ import annotations

import os
from pathlib import Path

from fedllm.errors import FedllmError
from fedllm.evaluate.tasks.rows import check_label, read_questions_and_labels, validation_split_loader

QUESTIONS = "winogrande/dev.jsonl"
LABELS = "winogrande/dev-labels.lst"


def read_docs(data_dir: str | os.PathLike) -> list[dict]:
    """Every WinoGrande dev item as ``{"sentence", "option1", "option2", "answer"}``, in file order."""
    questions, labels = Path(data_dir) / QUESTIONS, Path(data_dir) / LABELS
    docs = []
    rows = read_questions_and_labels(questions, labels, ("sentence", "option1", "option2"))
    for number, (row, label, origin) in enumerate(rows, start=1):
        answer = check_label(label, ("1", "2"), labels, number)
        if "answer" in row and str(row["answer"]) != answer:
            raise FedllmError(f"{origin}: answer {row['answer']!r} disagrees with {labels}:{number} ({answer!r})")
        if "_" not in row["sentence"]:
            raise FedllmError(f"{origin}: sentence has no '_' blank for the options to fill")
        docs.append({"sentence": row["sentence"], "option1": row["option1"], "option2": row["option2"], "answer": answer})
    return docs


# lm-eval's ``custom_dataset`` hook (see fedllm.evaluate.tasks).
load_rows = validation_split_loader(read_docs)
