"""Compile the Kubeflow pipeline (``pipelines/federated_finetune.py``) to YAML."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional

import yaml

from fedllm.errors import FedllmError
from pipelines import COMPILED, federated_finetune

__all__ = ["COMPILED", "compile_pipeline", "load_placement"]


def load_placement(path: str | os.PathLike) -> dict:
    """Per-step placement from a YAML file, e.g.::

        federate: {gpus: 4, node_selector: {nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}}
        evaluate: {gpus: 1, tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]}
    """
    path = Path(path)
    if not path.is_file():
        raise FedllmError(f"{path}: placement file not found")
    tree = yaml.safe_load(path.read_text()) or {}
    steps = federated_finetune.default_placement()
    fields = {f.name for f in dataclasses.fields(federated_finetune.StepPlacement)}
    placement = {}
    for step, values in tree.items():
        if step not in steps:
            raise FedllmError(f"{path}: unknown step {step!r}; allowed: {', '.join(steps)}")
        unknown = set(values or {}) - fields
        if unknown:
            raise FedllmError(f"{path}: step {step!r}: unknown field {sorted(unknown)[0]!r}; allowed: {', '.join(sorted(fields))}")
        placement[step] = federated_finetune.StepPlacement(**(values or {}))
    return placement


def compile_pipeline(out: str | os.PathLike = COMPILED, image: Optional[str] = None, placement: Optional[dict] = None) -> Path:
    """Write the compiled pipeline YAML to ``out`` and return its path.

    Without arguments this rewrites the committed ``pipelines/federated_finetune.yaml``.
    """
    from kfp import compiler

    func = federated_finetune.build_pipeline(image or federated_finetune.DEFAULT_IMAGE, placement)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(func, str(out))
    return out
