from kfp.dsl import Dataset, Input, Model, Output


def federate(run: Input[Dataset], mode: str, admin_kit: str, shared_run_root: str, timeout_s: float, model: Output[Model]):
    """FedAvg over the run's sites: ``simulator`` (NVFlare's simulator in this pod)
    or ``submit`` (the job goes to a running federation through its admin API).

    ``model``: settings/fedavg.json, models/fedavg, the per-round global models
    and every site's events.
    """
    from fedllm.pipeline.steps import federate_step

    result = federate_step(run.path, model.path, mode, admin_kit, shared_run_root, timeout_s)
    model.metadata.update({"setting": "fedavg", "val_loss": result["val_loss"]})
