"""``python -m pipelines run --local``: the compiled pipeline, every step a local process.

kfp.local's SubprocessRunner runs each component of the compiled YAML with this
Python (the image's role is played by the current environment), in the order and
with the artifacts Kubeflow would use. The image's node selectors, GPUs and
Secret mounts are Kubernetes-only and not applied.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

from fedllm.errors import FedllmError
from pipelines import COMPILED


def run_local(
    config: str | os.PathLike,
    overrides: Sequence[str] = (),
    pipeline_root: str | os.PathLike = "runs/pipeline",
    pipeline_yaml: str | os.PathLike = COMPILED,
    **parameters,
) -> Path:
    """Run the pipeline locally on the config file ``config``; return the final run dir.

    The returned folder is the report step's ``full_run`` artifact: the same
    layout as ``fedllm run`` (summary.json, report/index.html, settings/, ...).
    Every step's artifacts stay under ``pipeline_root``. ``parameters`` are the
    other pipeline parameters (``federation_mode``, ``shared_run_root``, ...).
    """
    from kfp import components, local

    config = Path(config)
    if not config.is_file():
        raise FedllmError(f"{config}: config file not found")
    pipeline_yaml = Path(pipeline_yaml)
    if not pipeline_yaml.is_file():
        raise FedllmError(f"{pipeline_yaml}: compiled pipeline not found (run `python -m pipelines compile`)")
    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    pipeline = components.load_component_from_file(str(pipeline_yaml))
    try:
        task = pipeline(config=config.read_text(), overrides=list(overrides), **parameters)
    except RuntimeError as e:
        # kfp.local names the failed task; the step's own error line is in the log above it.
        message = re.sub(r"\x1b\[[0-9;]*m", "", str(e).splitlines()[0])  # kfp.local colours its messages
        raise FedllmError(f"pipeline run under {root} failed: {message}") from None
    return Path(task.output.path)
