"""HellaSwag validation read from klosax's text layout, as lm-eval's ``hellaswag`` documents.

File, under the task-data directory: ``hellaswag/hellaswag_val_full.txt.bz2`` (the
layout llama.cpp's ``perplexity --hellaswag`` reads), 6 lines per item::

    <activity_label>: <ctx>
    <gold label, 0-3>
    <ending 0>
    <ending 1>
    <ending 2>
    <ending 3>

Each item becomes a document in the schema of the hub dataset lm-eval reads
(``Rowan/hellaswag``): ``ind``, ``activity_label``, ``ctx_a``, ``ctx_b``, ``ctx``,
``endings``, ``source_id``, ``split``, ``split_type`` and ``label`` (a string). lm-eval's
own ``process_docs`` then builds the query and choices, so prompts, choices and metrics
are exactly those of lm-eval's ``hellaswag.yaml``.

What the text layout has lost, and how it is handled:

* **Where ``ctx_b`` starts.** lm-eval's query is
  ``preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())``; the file
  holds only ``ctx`` (= ``ctx_a + " " + ctx_b`` in the original). The split point,
  and with it lm-eval's capitalisation of ``ctx_b`` (first letter upper-cased, the
  rest of ``ctx_b`` lower-cased), cannot be recovered. Nothing is guessed: every
  document gets ``ctx_a = ctx`` and ``ctx_b = ""``, so lm-eval's formula yields
  ``activity_label + ": " + ctx`` exactly as in the file (its trailing space is
  stripped by ``preprocess``). For the first item lm-eval on the hub rows asks
  ``"Roof shingle removal: A man is sitting on a roof. He"``; here it asks
  ``"... on a roof. he"``. The endings and the gold label are unaffected.
  Scores are therefore comparable between models evaluated with these files, and
  close to, but not guaranteed equal to, published lm-eval HellaSwag numbers.
* **Preprocessing.** The extractor already removed ``[header]``/``[step]``/
  ``[substeps]``/``[title]`` markers; lm-eval's ``preprocess`` runs again on the text.
  It removes every remaining ``[...]`` span (18 lines of the validation file keep one,
  e.g. ``[www.kiddio.org]``), which is what lm-eval does to the original text too.
* **``ind``, ``source_id``, ``split_type``** are not in the file: ``ind`` is the item's
  position (0-based), the two others are empty strings. lm-eval does not read them.
"""

from __future__ import annotations

import bz2
import os
from pathlib import Path

from fedllm.errors import FedllmError
from fedllm.evaluate.tasks.rows import validation_split_loader

ITEMS = "hellaswag/hellaswag_val_full.txt.bz2"
LINES_PER_ITEM = 6


def read_lines(path: Path) -> list[str]:
    """The lines of the bz2-compressed UTF-8 text file (a final newline adds no line)."""
    if not path.is_file():
        raise FedllmError(f"{path}: task data file not found")
    try:
        with bz2.open(path, "rt", encoding="utf-8", newline="\n") as f:
            return f.read().splitlines()
    except (OSError, EOFError) as e:  # bz2 raises OSError("Invalid data stream") on non-bz2 input
        raise FedllmError(f"{path}: not a readable bz2 file ({e})") from None
    except UnicodeDecodeError as e:
        raise FedllmError(f"{path}: not utf-8 text ({e.reason})") from None


def read_docs(data_dir: str | os.PathLike) -> list[dict]:
    """Every HellaSwag validation item as a ``Rowan/hellaswag`` row, in file order."""
    path = Path(data_dir) / ITEMS
    lines = read_lines(path)
    if len(lines) % LINES_PER_ITEM:
        raise FedllmError(
            f"{path}: {len(lines)} lines is not a multiple of {LINES_PER_ITEM} "
            "(each item is a context line, a label line and 4 ending lines)"
        )
    docs = []
    for index in range(len(lines) // LINES_PER_ITEM):
        first = index * LINES_PER_ITEM  # 0-based line index of the context line
        context, label, *endings = lines[first : first + LINES_PER_ITEM]
        activity_label, sep, ctx = context.partition(": ")
        if not sep:
            raise FedllmError(f"{path}:{first + 1}: item {index} context line has no 'activity label: ' prefix")
        if label.strip() not in ("0", "1", "2", "3"):
            raise FedllmError(f"{path}:{first + 2}: item {index} label {label!r} is not one of 0, 1, 2, 3")
        for offset, ending in enumerate(endings):
            if not ending.strip():
                raise FedllmError(f"{path}:{first + 3 + offset}: item {index} ending {offset} is empty")
        docs.append(
            {
                "ind": index,
                "activity_label": activity_label,
                "ctx_a": ctx,
                "ctx_b": "",
                "ctx": ctx,
                "endings": endings,
                "source_id": "",
                "split": "val",
                "split_type": "",
                "label": label.strip(),
            }
        )
    return docs


# lm-eval's ``custom_dataset`` hook (see fedllm.evaluate.tasks).
load_rows = validation_split_loader(read_docs)
