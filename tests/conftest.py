"""Shared test settings: where the real data is, and a tiny experiment.

The repository's sibling ``../shared/data`` holds the real public data sets
(Dolly, OASST1, medical meadow, Financial PhraseBank, PIQA, WinoGrande,
HellaSwag); tests read them through ``FEDLLM_DATA_DIR`` like a user would.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()
TINY_CONFIG = REPO / "configs" / "tiny.yaml"  # the pipeline on a tiny random model: seconds
DEMO_CONFIG = REPO / "configs" / "demo.yaml"  # `make run`: SmolLM2-135M-Instruct, minutes

os.environ.setdefault("FEDLLM_DATA_DIR", str(SHARED_DATA))
os.environ.setdefault("FEDLLM_EVAL_DATA_DIR", str(SHARED_DATA))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The tiny demo, shrunk to seconds: few records, tiny steps, no lm-eval.
TINY_RUN = [
    "data.sources.0.max_records=80",
    "data.sources.1.max_records=80",
    "data.sources.2.max_records=80",
    "data.max_val_records_per_site=8",
    "model.tiny.hidden_size=32",
    "model.tiny.intermediate_size=64",
    "model.tiny.vocab_size=512",
    "model.tiny.num_heads=2",
    "training.steps_per_round=2",
    "training.micro_batch_size=4",
    "training.max_seq_length=128",
    "federation.rounds=2",
    "evaluation.enabled=false",
]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


# Session-wide runs shared by several test files (imported last: they import this module).
from tracked_runs import mlflow_server, tracked_cli_run  # noqa: E402,F401  test_tracking.py, test_progress.py
