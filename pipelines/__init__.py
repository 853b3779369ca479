"""The Kubeflow face of fedllm, beside the package in the source tree.

``federated_finetune`` is the pipeline (its components are in ``components/``);
``build`` compiles it, ``local_run`` runs the compiled YAML with kfp.local, every
step a local process, and ``submit`` starts a run on a Kubeflow Pipelines host.
From a checkout: ``python -m pipelines compile|run --local|submit``.

The library (``fedllm``) imports none of this: the components call
``fedllm.pipeline.steps``, and the image needs neither folder, as each step's
code travels inside the compiled YAML.
"""

from pathlib import Path

# The committed compiled pipeline, next to its source.
COMPILED = Path(__file__).resolve().parent / "federated_finetune.yaml"
