"""The compiled Kubeflow pipeline: committed, up to date, and shaped as designed.

What is checked is the YAML Kubeflow runs: which tasks request GPUs, that every
model gets its own evaluate task with no evaluate waiting on another, that submit
mode mounts the admin kit Secret, and that per-step placement reaches the pods.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from fedllm.errors import FedllmError
from pipelines import federated_finetune
from pipelines.build import COMPILED, compile_pipeline, load_placement

GPU = "nvidia.com/gpu"


def load(path: Path) -> tuple[dict, dict]:
    spec, platform = list(yaml.safe_load_all(path.read_text()))
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def all_tasks(spec: dict) -> dict[str, tuple[str, dict]]:
    """task name → (the DAG it sits in, its spec), over the root and every sub-DAG."""
    found = {name: ("root", task) for name, task in spec["root"]["dag"]["tasks"].items()}
    for component, body in spec["components"].items():
        for name, task in body.get("dag", {}).get("tasks", {}).items():
            found[name] = (component, task)
    return found


def executor_of(spec: dict, task: dict) -> dict:
    label = spec["components"][task["componentRef"]["name"]]["executorLabel"]
    return spec["deploymentSpec"]["executors"][label]["container"]


def tasks_of(spec: dict, component_prefix: str) -> dict[str, tuple[str, dict]]:
    return {n: (dag, t) for n, (dag, t) in all_tasks(spec).items() if t["componentRef"]["name"].startswith(f"comp-{component_prefix}")}


def test_the_committed_pipeline_is_the_compiled_source(tmp_path):
    fresh = compile_pipeline(tmp_path / "pipeline.yaml")
    assert fresh.read_text() == COMPILED.read_text(), (
        f"{COMPILED} is stale: run `python -m pipelines compile` and commit it"
    )


def pipelines_cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m pipelines ...`` as a user runs it: from the checkout."""
    return subprocess.run([sys.executable, "-m", "pipelines", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_python_m_pipelines_compile_writes_the_committed_pipeline(tmp_path):
    done = pipelines_cli("compile", "--out", str(tmp_path / "pipeline.yaml"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(tmp_path / "pipeline.yaml")
    assert (tmp_path / "pipeline.yaml").read_text() == COMPILED.read_text()


@pytest.mark.parametrize("args, message", [
    (["compile", "--placement", "no-such-placement.yaml"], "error: no-such-placement.yaml: placement file not found"),
    (["run", "configs/tiny.yaml"], "error: python -m pipelines run: only --local runs here"),
    (["run", "--local", "no-such-config.yaml"], "error: no-such-config.yaml: config file not found"),
    (["submit", "no-such-config.yaml", "--host", "http://localhost:1"], "error: no-such-config.yaml: config file not found"),
])
def test_python_m_pipelines_fails_with_one_line_and_status_2(args, message):
    done = pipelines_cli(*args)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.startswith(message) and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_federate_and_every_training_and_evaluation_request_a_gpu():
    spec, platform = load(COMPILED)
    (_, federate), = tasks_of(spec, "federate").values()
    # The mode is the run's choice: simulator (this pod's GPU) or submit.
    assert federate["inputs"]["parameters"]["mode"]["componentInputParameter"] == "federation_mode"
    accelerator = executor_of(spec, federate)["resources"]["accelerator"]
    assert accelerator["resourceType"] == GPU and accelerator["resourceCount"] == "1"
    # Submit mode logs in with the admin kit Secret; optional, as the simulator never reads it.
    (mount,) = platform[spec["components"][federate["componentRef"]["name"]]["executorLabel"]]["secretAsVolume"]
    assert mount["mountPath"] == federated_finetune.ADMIN_KIT_MOUNT and mount["optional"] is True
    assert mount["secretNameParameter"]["componentInputParameter"] == "admin_kit_secret"

    for name, (_, task) in {**tasks_of(spec, "evaluate"), **tasks_of(spec, "train")}.items():
        accelerator = executor_of(spec, task)["resources"]["accelerator"]
        assert accelerator["resourceType"] == GPU and accelerator["resourceCount"] == "1", name
    for name, (_, task) in {**tasks_of(spec, "partition"), **tasks_of(spec, "report")}.items():
        assert "resources" not in executor_of(spec, task), f"{name} needs no GPU"


def test_evaluations_fan_out_one_per_model_and_never_wait_on_each_other():
    spec, _ = load(COMPILED)
    tasks = all_tasks(spec)
    evaluations = tasks_of(spec, "evaluate")
    assert len(evaluations) == 2  # fedavg's, and the one inside the loop over the other settings
    for name, (dag, task) in evaluations.items():
        assert not set(task.get("dependentTasks", [])) & set(evaluations), f"{name} waits on another evaluation"
        model = task["inputs"]["artifacts"]["model"]
        producer = model.get("taskOutputArtifact", {}).get("producerTask") or model.get("componentInputArtifact")
        assert producer, f"{name} evaluates no model"

    (loop_eval_dag, loop_eval), = [(d, t) for d, t in evaluations.values() if d != "root"]
    loop_task = next(t for n, (d, t) in tasks.items() if t["componentRef"]["name"] == loop_eval_dag)
    assert "parameterIterator" in loop_task, "the per-setting evaluation sits in a ParallelFor"
    assert loop_task["dependentTasks"] == ["partition"], "the loop starts as soon as the data is partitioned"
    assert loop_eval["dependentTasks"] == ["train"], "each setting's evaluation waits only for its own training"
    assert loop_eval["inputs"]["artifacts"]["model"]["taskOutputArtifact"]["producerTask"] == "train"

    fedavg_eval = next(t for d, t in evaluations.values() if d == "root")
    assert fedavg_eval["inputs"]["parameters"]["setting"]["runtimeValue"]["constant"] == "fedavg"
    assert fedavg_eval["dependentTasks"] == ["federate", "partition"], "fedavg's evaluation does not wait for the baselines"
    assert fedavg_eval["inputs"]["artifacts"]["model"]["taskOutputArtifact"]["producerTask"] == "federate"

    report = tasks["report"][1]
    assert set(report["dependentTasks"]) >= {"partition", "evaluate"} and any(d.startswith("for-loop") for d in report["dependentTasks"])


def test_placement_sets_gpus_node_selectors_and_tolerations_per_step(tmp_path):
    placement_file = tmp_path / "placement.yaml"
    placement_file.write_text(yaml.safe_dump({
        "federate": {"gpus": 4, "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}},
        "evaluate": {"gpus": 2, "tolerations": [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}], "memory": "32Gi"},
    }))
    out = compile_pipeline(tmp_path / "placed.yaml", image="registry.example.com/fedllm:test", placement=load_placement(placement_file))
    spec, platform = load(out)

    for name, (_, task) in tasks_of(spec, "evaluate").items():
        container = executor_of(spec, task)
        assert container["image"] == "registry.example.com/fedllm:test"
        assert container["resources"]["accelerator"]["resourceCount"] == "2"
        label = spec["components"][task["componentRef"]["name"]]["executorLabel"]
        assert platform[label]["tolerations"] == [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}]
    (_, simulator), = tasks_of(spec, "federate").values()
    assert executor_of(spec, simulator)["resources"]["accelerator"]["resourceCount"] == "4"
    label = spec["components"][simulator["componentRef"]["name"]]["executorLabel"]
    assert platform[label]["nodeSelector"]["labels"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    # train keeps its default: one GPU, no selector
    (_, train), = tasks_of(spec, "train").values()
    assert executor_of(spec, train)["resources"]["accelerator"]["resourceCount"] == "1"


@pytest.mark.parametrize("content, message", [
    ({"federat": {"gpus": 1}}, "unknown step 'federat'; allowed: partition, federate, train, evaluate, report"),
    ({"evaluate": {"gpu": 1}}, "step 'evaluate': unknown field 'gpu'"),
])
def test_a_bad_placement_file_names_what_is_accepted(tmp_path, content, message):
    path = tmp_path / "placement.yaml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(FedllmError, match=message.replace("(", r"\(")):
        load_placement(path)


def test_a_run_chooses_the_image_its_training_steps_run_and_nothing_else_changes(tmp_path):
    # training_image: the run's choice (images/fedllm-nemo for training.backend: nemo),
    # defaulting to the compiled image, so a run that leaves it out runs as before.
    spec, _ = load(COMPILED)
    parameter = spec["root"]["inputDefinitions"]["parameters"]["training_image"]
    assert parameter == {"defaultValue": federated_finetune.DEFAULT_IMAGE, "isOptional": True, "parameterType": "STRING"}
    assert federated_finetune.NEMO_IMAGE.startswith("ghcr.io/fedllm/fedllm-nemo:")

    out = compile_pipeline(tmp_path / "imaged.yaml", image="registry.example.com/fedllm:test")
    spec, _ = load(out)
    assert spec["root"]["inputDefinitions"]["parameters"]["training_image"]["defaultValue"] == "registry.example.com/fedllm:test"
    placeholder = "{{$.inputs.parameters['pipelinechannel--training_image']}}"
    tasks = all_tasks(spec)
    for step in ("federate", "train"):  # the simulator's sites train in federate's pod
        (dag, task), = tasks_of(spec, step).values()
        assert executor_of(spec, task)["image"] == placeholder, step
        source = task["inputs"]["parameters"]["pipelinechannel--training_image"]["componentInputParameter"]
        if dag == "root":
            assert source == "training_image", step
        else:  # inside the baselines' loop: the loop task hands the run's parameter down
            loop = next(t for _, t in tasks.values() if t["componentRef"]["name"] == dag)
            assert source == "pipelinechannel--training_image"
            assert loop["inputs"]["parameters"]["pipelinechannel--training_image"]["componentInputParameter"] == "training_image"
    for step in ("partition", "evaluate", "report"):
        for name, (_, task) in tasks_of(spec, step).items():
            assert executor_of(spec, task)["image"] == "registry.example.com/fedllm:test", name
