"""The Kubeflow pipeline: partition → federate + baselines → evaluate → report.

    partition ─┬─ federate (FedAvg: simulator pod, or a job submitted to the Helm federation) ─ evaluate
               └─ for each of base, site:<name>..., centralized (in parallel): train ─ evaluate
                                                                        all of them ─ report

Every evaluate task scores one model and depends only on the task that made it,
so the evaluations run side by side, each on its own GPU. The pipeline's
parameters are the experiment config (YAML text, or an s3:// URI of it) plus
``--set``-style overrides, the federation mode and where submit mode finds the
admin kit and the shared run folder, and the image the training steps run
(``training_image``: images/fedllm-nemo for ``training.backend: nemo``). Where
each step runs (GPUs, node selectors, tolerations) and the image of every other
step are fixed when the pipeline is compiled: ``build_pipeline(image, placement)``,
``python -m pipelines compile``.

The compiled form is committed next to this file as ``federated_finetune.yaml``.
"""

import dataclasses
from typing import List, Optional

from kfp import dsl
from kfp import kubernetes

import fedllm
from components import build_components

PIPELINE_NAME = "fedllm-federated-finetune"
DEFAULT_IMAGE = f"ghcr.io/fedllm/fedllm:{fedllm.__version__}"
# What a run passes as training_image when its config says training.backend: nemo
# (images/fedllm-nemo: the same Python environment, plus the C compiler triton needs).
NEMO_IMAGE = f"ghcr.io/fedllm/fedllm-nemo:{fedllm.__version__}"
# Where the admin startup-kit Secret (made by `fedllm provision`, installed with the
# federation chart) is mounted in the submit-mode federate pod.
ADMIN_KIT_MOUNT = "/var/run/fedllm/admin-kit"
# The chart's default Secret name for release "fedllm": <release>-admin-startup-kit.
DEFAULT_ADMIN_KIT_SECRET = "fedllm-admin-startup-kit"


@dataclasses.dataclass
class StepPlacement:
    """Where one step's pod runs.

    gpus: accelerators requested (``accelerator`` is the resource name, in both
    requests and limits); node_selector: node labels the pod must match;
    tolerations: Kubernetes tolerations ({key, operator, value, effect}).
    """

    gpus: int = 0
    accelerator: str = "nvidia.com/gpu"
    node_selector: dict = dataclasses.field(default_factory=dict)
    tolerations: list = dataclasses.field(default_factory=list)
    cpu: Optional[str] = None
    memory: Optional[str] = None


def default_placement() -> dict[str, StepPlacement]:
    """One GPU for each step that trains or evaluates a model; none elsewhere."""
    return {
        "partition": StepPlacement(),
        "federate": StepPlacement(gpus=1),
        "train": StepPlacement(gpus=1),
        "evaluate": StepPlacement(gpus=1),
        "report": StepPlacement(),
    }


def place(task: dsl.PipelineTask, placement: StepPlacement) -> dsl.PipelineTask:
    if placement.gpus:
        task.set_accelerator_type(placement.accelerator).set_accelerator_limit(placement.gpus)
    if placement.cpu:
        task.set_cpu_request(placement.cpu)
    if placement.memory:
        task.set_memory_request(placement.memory)
    for key, value in placement.node_selector.items():
        kubernetes.add_node_selector(task, key, value)
    for toleration in placement.tolerations:
        kubernetes.add_toleration(task, **toleration)
    return task


def build_pipeline(image: str = DEFAULT_IMAGE, placement: Optional[dict[str, StepPlacement]] = None):
    """The pipeline function, its steps running in ``image`` and placed per ``placement``
    (keys: partition, federate, train, evaluate, report; missing keys keep the default).

    A run's ``training_image`` (default ``image``) replaces the image of the steps that
    train: federate (the simulator's sites train in its pod) and each baseline's train."""
    where = {**default_placement(), **(placement or {})}
    c = build_components(image)

    @dsl.pipeline(name=PIPELINE_NAME, description="Federated fine-tuning of an LLM with NVIDIA FLARE: FedAvg vs each site alone vs centralized, benchmarked zero-shot.")
    def federated_finetune(
        config: str,
        overrides: List[str] = [],
        federation_mode: str = "simulator",
        admin_kit_secret: str = DEFAULT_ADMIN_KIT_SECRET,
        admin_kit_path: str = ADMIN_KIT_MOUNT,
        shared_run_root: str = "",
        federation_timeout_s: float = 0.0,
        training_image: str = image,
    ) -> dsl.Dataset:
        prepared = place(c.partition(config=config, overrides=overrides, federation_mode=federation_mode), where["partition"])
        prepared.set_display_name("partition data into sites")
        run = prepared.outputs["run"]

        # One federate task for both modes (kfp.local cannot merge artifacts of
        # dsl.If branches): it requests the federate placement's GPUs, which the
        # simulator uses; for submit-only use compile with `federate: {gpus: 0}`.
        # The admin kit Secret is optional: the simulator never reads it.
        federated = place(
            c.federate(run=run, mode=federation_mode, admin_kit=admin_kit_path, shared_run_root=shared_run_root, timeout_s=federation_timeout_s),
            where["federate"],
        ).set_display_name("federate").set_container_image(training_image)
        kubernetes.use_secret_as_volume(federated, secret_name=admin_kit_secret, mount_path=ADMIN_KIT_MOUNT, optional=True)
        fedavg = federated.outputs["model"]

        fedavg_eval = place(c.evaluate(run=run, model=fedavg, setting="fedavg"), where["evaluate"])
        fedavg_eval.set_display_name("evaluate fedavg")

        with dsl.ParallelFor(prepared.outputs["Output"], name="baselines") as setting:
            trained = place(c.train(run=run, setting=setting), where["train"]).set_container_image(training_image)
            evaluated = place(c.evaluate(run=run, model=trained.outputs["model"], setting=setting), where["evaluate"])

        summary = c.report(
            run=run,
            fedavg_model=fedavg,
            fedavg_scores=fedavg_eval.outputs["scores"],
            models=dsl.Collected(trained.outputs["model"]),
            scores=dsl.Collected(evaluated.outputs["scores"]),
        )
        place(summary, where["report"]).set_display_name("summary and report")
        return summary.outputs["full_run"]

    return federated_finetune


federated_finetune = build_pipeline()
