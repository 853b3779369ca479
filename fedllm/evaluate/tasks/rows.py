"""Reading the original release files of the evaluation sets, line by line.

PIQA and WinoGrande ship as a JSONL file of questions plus a separate file with one
label per line. Every problem is reported as a :class:`FedllmError` naming the file
and line, because a silently skipped or shifted row would move every later label.
"""

from __future__ import annotations

from pathlib import Path

from fedllm.errors import FedllmError
from fedllm.files import json_object


def read_text_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file without line endings (a final newline adds no line)."""
    if not path.is_file():
        raise FedllmError(f"{path}: task data file not found")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise FedllmError(f"{path}: not utf-8 text ({e.reason} at byte {e.start})") from None


def read_questions_and_labels(questions: Path, labels: Path, fields: tuple[str, ...]) -> list[tuple[dict, str, str]]:
    """``(row, label, origin)`` per question, in file order.

    ``row`` is the parsed JSON object of one line of ``questions`` (it must have every
    key in ``fields``, each a string); ``label`` the stripped line of ``labels`` with
    the same number; ``origin`` is ``path:line`` for later messages.
    """
    question_lines = read_text_lines(questions)
    label_lines = read_text_lines(labels)
    if len(question_lines) != len(label_lines):
        raise FedllmError(
            f"{labels}: {len(label_lines)} labels for {len(question_lines)} questions in {questions} "
            "(expected one label per question line)"
        )
    out = []
    for number, (text, label) in enumerate(zip(question_lines, label_lines), start=1):
        origin = f"{questions}:{number}"
        row = json_object(text, origin)
        for name in fields:
            if name not in row:
                raise FedllmError(f"{origin}: missing field {name!r} (each row needs {', '.join(fields)})")
            if not isinstance(row[name], str):
                raise FedllmError(f"{origin}: field {name!r} must be a string, got {type(row[name]).__name__}")
        out.append((row, label.strip(), origin))
    return out


def check_label(label: str, allowed: tuple[str, ...], labels: Path, number: int) -> str:
    """``label`` itself if it is one of ``allowed``, else an error naming ``labels:number``."""
    if label not in allowed:
        raise FedllmError(f"{labels}:{number}: label {label!r} is not one of {', '.join(allowed)}")
    return label


def validation_split_loader(read_docs):
    """An lm-eval ``custom_dataset`` hook serving ``read_docs(data_dir)`` as the task's
    ``validation`` split.

    Every row is read and checked; with ``first_docs`` only the first ones are handed
    to lm-eval (see :mod:`fedllm.evaluate.tasks`). lm-eval also passes the task's
    metadata (version, config source, ...) as keyword arguments; they are ignored.
    """

    def load_rows(data_dir: str, first_docs: int | None = None, **_task_metadata):
        import datasets

        docs = read_docs(data_dir)
        return datasets.DatasetDict({"validation": datasets.Dataset.from_list(docs[:first_docs])})

    return load_rows
