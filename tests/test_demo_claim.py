"""The seed's Figure 3 claim on a small real-data run: the FedAvg model's loss on
the combined validation set is lower than that of every site trained alone."""

import json

from conftest import TINY_CONFIG
from fedllm.config import load_config
from fedllm.run import run_experiment

SMALL_RUN = [
    "data.sources.0.max_records=240",
    "data.sources.1.max_records=240",
    "data.sources.2.max_records=240",
    "data.max_val_records_per_site=24",
    "model.tiny.hidden_size=64",
    "model.tiny.intermediate_size=128",
    "model.tiny.vocab_size=1024",
    "training.steps_per_round=10",
    "training.val_check_steps=10",
    "federation.rounds=3",
    "baselines.centralized=false",
    "evaluation.enabled=false",
]


def test_fedavg_beats_every_site_alone(tmp_path):
    cfg = load_config(TINY_CONFIG, SMALL_RUN)
    summary = run_experiment(cfg, tmp_path / "run", progress=False)
    settings = summary["settings"]
    sites = {name: s["val_loss"] for name, s in settings.items() if name.startswith("site:")}
    assert len(sites) == 3
    fedavg = settings["fedavg"]["val_loss"]
    assert fedavg < min(sites.values()), (fedavg, sites)
    # everyone learned something; the base model is the common starting point
    assert all(loss < settings["base"]["val_loss"] for loss in sites.values())
    # the contract the pipeline and report read
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    for name, s in on_disk["settings"].items():
        assert "val_loss" in s, name
        if name != "base":
            assert s["val_loss_curve"] and s["train_tokens_per_s"] > 0, name
    assert set(on_disk["settings"]["fedavg"]["bytes_per_round"]) == set(on_disk["sites"])
    assert (tmp_path / "run" / "report" / "index.html").is_file()
    # a site's federation log and its baseline's log are two files, each with its own events
    events = tmp_path / "run" / "events"
    for site in on_disk["sites"]:
        federated = [json.loads(line) for line in (events / f"site-{site}.jsonl").read_text().splitlines()]
        alone = [json.loads(line) for line in (events / f"baseline-site-{site}.jsonl").read_text().splitlines()]
        assert any(e["event"] == "round_end" for e in federated) and {e["site"] for e in federated} == {site}
        assert any(e["event"] == "setting_end" for e in alone) and {e["site"] for e in alone} == {f"site:{site}"}
