"""The ``fedllm`` CLI run as a user runs it, in its own process, on a tiny config cut to
seconds of work.

    config = tiny_config(tmp_path, rounds=2)
    fedllm("run", str(config), "--out", str(tmp_path / "run"))
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import REPO, SHARED_DATA


def tiny_config(folder: Path, rounds: int = 3, **changes) -> Path:
    """configs/tiny.yaml cut down to 2 sites x ``rounds`` rounds x 2 steps, ~60 records per
    source, a 1-layer model, no lm-eval; ``changes`` replace top-level sections' keys."""
    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    cfg["data_dir"] = str(SHARED_DATA)
    cfg["data"]["sources"] = [dict(s, max_records=60) for s in cfg["data"]["sources"][:2]]
    cfg["data"]["max_val_records_per_site"] = 8
    cfg["training"].update(steps_per_round=2, val_check_steps=2, micro_batch_size=4)
    cfg["model"]["tiny"].update(hidden_size=32, intermediate_size=64, num_layers=1, vocab_size=1024)
    cfg["federation"]["rounds"] = rounds
    cfg["evaluation"]["enabled"] = False
    for section, values in changes.items():
        cfg[section].update(values)
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def fedllm(*args: str, env_extra: dict | None = None, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run the ``fedllm`` CLI as a user would, in its own process."""
    env = dict(os.environ, **(env_extra or {}))
    done = subprocess.run(
        [sys.executable, "-m", "fedllm.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and done.returncode != 0:
        raise AssertionError(f"fedllm {' '.join(args)} exited {done.returncode}:\n{done.stderr[-4000:]}")
    return done
