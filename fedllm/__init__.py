"""fedllm: federated fine-tuning of large language models with NVIDIA FLARE.

One library, thin faces: the CLI (`fedllm.cli`), the Kubeflow components and the
container entrypoint all call the step functions exported by the submodules.
"""

__version__ = "0.1.0"
