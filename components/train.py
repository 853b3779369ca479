from kfp.dsl import Dataset, Input, Model, Output


def train(run: Input[Dataset], setting: str, model: Output[Model]):
    """One setting outside the federation: ``site:<name>`` alone, ``centralized``
    on the pooled data, or ``base`` (scored, not trained).

    ``model``: settings/<setting>.json, models/<setting>/ and the setting's events.
    """
    from fedllm.pipeline.steps import train_step

    result = train_step(run.path, setting, model.path)
    model.metadata.update({"setting": setting, "val_loss": result["val_loss"]})
