"""The committed pipeline, run end to end with kfp.local, gives what ``fedllm run`` gives.

Every step of ``pipelines/federated_finetune.yaml`` runs as its own process (kfp.local's
SubprocessRunner), handing the run over only through artifacts, on the demo config
shrunk to seconds (its three sites kept). The run dir the report step puts together
has the summary.json contract of ``fedllm run`` — the same settings with the same
keys — and the report; the per-setting artifacts carry the Kubeflow UI's metrics.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TINY_CONFIG, TINY_RUN

pytestmark = pytest.mark.slow

# The shared tiny demo, scored by lm-eval on a few documents of two tasks.
TINY_DEMO = [o for o in TINY_RUN if not o.startswith("evaluation.")] + [
    "evaluation.limit=5",
    "evaluation.tasks=[piqa, winogrande]",
]


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, shared_data):
    from pipelines.local_run import run_local

    root = tmp_path_factory.mktemp("pipeline-root")
    return run_local(TINY_CONFIG, TINY_DEMO, root), root


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, shared_data):
    from fedllm.cli import main

    out = tmp_path_factory.mktemp("cli-run")
    args = ["run", str(TINY_CONFIG), "--out", str(out), "--no-progress"]
    for item in TINY_DEMO:
        args += ["--set", item]
    assert main(args) == 0
    return out


def key_shape(value):
    """The keys of a summary, nested, without the values."""
    if isinstance(value, dict):
        return {k: key_shape(v) for k, v in value.items()}
    return type(value).__name__ if value is None else "value"


def test_the_pipeline_run_dir_keeps_the_fedllm_run_contract(pipeline_run, cli_run):
    run, _ = pipeline_run
    summary = json.loads((run / "summary.json").read_text())
    expected = json.loads((cli_run / "summary.json").read_text())

    assert set(summary["settings"]) == set(expected["settings"])
    assert {"base", "fedavg", "centralized"} < set(summary["settings"])
    assert len([s for s in summary["settings"] if s.startswith("site:")]) == 3, "the demo's three sites, each alone"
    assert set(summary) == set(expected)
    for name, entry in summary["settings"].items():
        assert set(entry) == set(expected["settings"][name]), name
        assert set(entry["eval"]) == set(expected["settings"][name]["eval"]) >= {"piqa/acc", "winogrande/acc", "mean"}
        # Paths stay inside the run dir, as `fedllm run` writes them, and the models are there.
        assert not Path(entry["model_dir"]).is_absolute() and (run / entry["model_dir"]).is_dir(), name
    # The same config and seeds: the same partition, hence the same data in every setting.
    assert summary["config_sha256"] == expected["config_sha256"]
    assert summary["sites"] == expected["sites"] and summary["steps_per_round"] == expected["steps_per_round"]
    # Seeded, single-threaded training outside the federation: the same numbers, step by step.
    for name in set(summary["settings"]) - {"fedavg"}:
        assert summary["settings"][name]["val_loss"] == pytest.approx(expected["settings"][name]["val_loss"], rel=1e-6), name
    # The simulator's sites run in threads, so FedAvg only agrees closely.
    assert summary["settings"]["fedavg"]["val_loss"] == pytest.approx(expected["settings"]["fedavg"]["val_loss"], rel=0.05)
    assert len(summary["settings"]["fedavg"]["rounds"]) == 2

    for name in ("index.html", "report.md"):
        assert (run / "report" / name).stat().st_size > 1000
    html = (run / "report" / "index.html").read_text()
    assert "fedavg" in html and "centralized" in html
    for path in ("data/partition_summary.json", "events/server.jsonl", "federation/rounds/round-002/exchanged.safetensors"):
        assert (run / path).is_file(), path


def test_the_kubeflow_ui_gets_metrics_per_model_and_the_report(pipeline_run):
    run, root = pipeline_run
    summary = json.loads((run / "summary.json").read_text())
    # Each evaluate task logged its setting's metrics in its Metrics artifact
    # (kfp.local writes executor_output.json next to each task's outputs).
    logged = {}
    for output in root.rglob("evaluate*/executor_output.json"):
        data = json.loads(output.read_text())
        metrics = data["artifacts"]["metrics"]["artifacts"][0]["metadata"]
        scores = json.loads(Path(data["artifacts"]["scores"]["artifacts"][0]["uri"]).read_text())
        logged[scores["setting"]] = metrics
    assert set(logged) == set(summary["settings"])
    for setting, metrics in logged.items():
        assert metrics["mean"] == pytest.approx(summary["settings"][setting]["eval"]["mean"]["value"])

    (html,) = root.rglob("report/report_html")
    (markdown,) = root.rglob("report/report_markdown")
    assert html.read_text() == (run / "report" / "index.html").read_text()
    assert markdown.read_text() == (run / "report" / "report.md").read_text()


@pytest.mark.timeout(1800)
def test_the_pipeline_runs_the_real_model_from_its_gguf_file(tmp_path, shared_data):
    """The demo's GGUF source through every step, each a process handing over artifacts:
    the partition step converts it, the others load the run's HF base folder; the run
    dir keeps the contract, task metric and zero-shot scores included."""
    from fedllm.errors import FedllmError
    from pipelines.local_run import run_local
    from fedllm.train.gguf import SMOLLM2_SOURCE, locate_gguf
    from conftest import DEMO_CONFIG

    try:
        locate_gguf(SMOLLM2_SOURCE)
    except FedllmError as e:
        pytest.skip(str(e))
    small = ["data.sources.0.max_records=300", "data.partition.num_sites=2", "data.partition.min_site_records=30",
             "training.steps_per_round=1", "training.micro_batch_size=2", "training.max_seq_length=64",
             "data.max_val_records_per_site=8", "federation.rounds=1",
             "evaluation.limit=3", "evaluation.tasks=[piqa]", "evaluation.batch_size='8'"]
    run = run_local(DEMO_CONFIG, small, tmp_path / "root")
    summary = json.loads((run / "summary.json").read_text())

    assert summary["model"]["source"] == SMOLLM2_SOURCE and summary["model"]["parameters"] == 134_515_008
    assert set(summary["settings"]) == {"base", "fedavg", "centralized", *(f"site:{s}" for s in summary["sites"])}
    rows = None
    for name, entry in summary["settings"].items():
        assert {"val_loss", "model_dir", "task", "eval"} <= set(entry), name
        assert set(entry["eval"]) == {"piqa/acc", "piqa/acc_norm", "mean"}, name
        predictions = json.loads((run / entry["task"]["predictions"]).read_text())
        rows = rows or predictions["origins"]
        assert predictions["origins"] == rows and len(predictions["predicted"]) == entry["task"]["n"], name
    assert {c["against"] for c in summary["comparisons"]} == set(summary["settings"]) - {"base", "fedavg"}
    assert "quantization_config" not in json.loads((run / "models" / "base" / "config.json").read_text())
