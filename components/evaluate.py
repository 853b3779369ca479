from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output


def evaluate(run: Input[Dataset], model: Input[Model], setting: str, scores: Output[Artifact], metrics: Output[Metrics]):
    """Zero-shot lm-eval (HellaSwag, PIQA, WinoGrande) of one setting's model.

    ``scores``: {"setting", "result"} as JSON; ``metrics``: every task metric and
    their mean, shown in the Kubeflow UI.
    """
    from fedllm.pipeline.steps import evaluate_step

    result = evaluate_step(run.path, model.path, setting, scores.path)
    for name, value in (result or {}).items():
        metrics.log_metric(name, value["value"])
