"""Compile the Kubeflow pipeline (``pipelines/federated_finetune.py``) to YAML.

The pipeline and its components live next to the package in the source tree
(``pipelines/``, ``components/``), not inside it: they are only needed where a
pipeline is compiled or started, never in the image, where each step's code
travels inside the compiled YAML.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Optional

import yaml

from fedllm.errors import FedllmError

REPO = Path(__file__).resolve().parents[2]
PIPELINE_SOURCE = REPO / "pipelines" / "federated_finetune.py"
COMPILED = REPO / "pipelines" / "federated_finetune.yaml"


def pipeline_module():
    """``pipelines.federated_finetune``, imported from the source tree."""
    if not PIPELINE_SOURCE.is_file():
        raise FedllmError(f"{PIPELINE_SOURCE}: pipeline source not found; run fedllm pipeline commands from a fedllm source checkout")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return importlib.import_module("pipelines.federated_finetune")


def load_placement(path: str | os.PathLike) -> dict:
    """Per-step placement from a YAML file, e.g.::

        federate: {gpus: 4, node_selector: {nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}}
        evaluate: {gpus: 1, tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]}
    """
    module = pipeline_module()
    path = Path(path)
    if not path.is_file():
        raise FedllmError(f"{path}: placement file not found")
    tree = yaml.safe_load(path.read_text()) or {}
    steps = module.default_placement()
    fields = {f.name for f in module.dataclasses.fields(module.StepPlacement)}
    placement = {}
    for step, values in tree.items():
        if step not in steps:
            raise FedllmError(f"{path}: unknown step {step!r}; allowed: {', '.join(steps)}")
        unknown = set(values or {}) - fields
        if unknown:
            raise FedllmError(f"{path}: step {step!r}: unknown field {sorted(unknown)[0]!r}; allowed: {', '.join(sorted(fields))}")
        placement[step] = module.StepPlacement(**(values or {}))
    return placement


def compile_pipeline(out: str | os.PathLike = COMPILED, image: Optional[str] = None, placement: Optional[dict] = None) -> Path:
    """Write the compiled pipeline YAML to ``out`` and return its path.

    Without arguments this rewrites the committed ``pipelines/federated_finetune.yaml``.
    """
    from kfp import compiler

    module = pipeline_module()
    func = module.build_pipeline(image or module.DEFAULT_IMAGE, placement)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(func, str(out))
    return out
