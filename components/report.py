from typing import List

from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Model, Output


def report(
    run: Input[Dataset],
    fedavg_model: Input[Model],
    fedavg_scores: Input[Artifact],
    models: Input[List[Model]],
    scores: Input[List[Artifact]],
    full_run: Output[Dataset],
    report_html: Output[HTML],
    report_markdown: Output[Markdown],
):
    """Every step's artifacts put together: the run dir ``fedllm run`` makes,
    with summary.json and the report (results table, curves, communication and
    time per round), shown in the Kubeflow UI as HTML and Markdown."""
    from fedllm.pipeline.steps import report_step

    report_step(
        run.path,
        [fedavg_model.path] + [m.path for m in models],
        [fedavg_scores.path] + [s.path for s in scores],
        full_run.path,
        report_html.path,
        report_markdown.path,
    )
