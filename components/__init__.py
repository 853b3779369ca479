"""The Kubeflow components of fedllm: one lightweight KFP v2 component per step.

Each component is a typed function whose body imports ``fedllm`` and makes one
call into ``fedllm.pipeline.steps`` (the same ``fedllm.run`` functions the CLI
calls). They run in the project's image (``images/fedllm``), which already holds
fedllm and kfp, so nothing is pip-installed when a step starts.

``build_components(image)`` turns the functions into components for an image.
"""

from __future__ import annotations

from types import SimpleNamespace

from kfp import dsl

from components.evaluate import evaluate
from components.federate import federate
from components.partition import partition
from components.report import report
from components.train import train

STEPS = {"partition": partition, "federate": federate, "train": train, "evaluate": evaluate, "report": report}


def build_components(image: str) -> SimpleNamespace:
    """The five components, each running in ``image``."""
    return SimpleNamespace(
        **{name: dsl.component(func, base_image=image, install_kfp_package=False) for name, func in STEPS.items()}
    )
