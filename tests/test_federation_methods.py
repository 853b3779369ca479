"""A 2-round NVFlare FedAvg federation (simulator, 2 real-data sites) for every
method; PEFT sites exchange only their trainable weights."""

import json

import pytest
import torch

from conftest import TINY_CONFIG, TINY_RUN
from fedllm.config import load_config
from fedllm.run import prepare_run, run_federation


@pytest.mark.parametrize("method", ["sft", "lora", "ptuning", "prompt_tuning", "ia3"])
def test_two_round_federation(method, tmp_path):
    two_sites = "data.sources=[{name: dolly, format: dolly, path: dolly_15k, max_records: 80}, {name: medical, format: medical_meadow, path: medical_meadow/medical_meadow_small.json, max_records: 80}]"
    cfg = load_config(TINY_CONFIG, TINY_RUN + [two_sites, f"method.name={method}", "federation.rounds=2"])
    run = prepare_run(cfg, tmp_path / "run")
    result = run_federation(run)
    model = json.loads((run / "model.json").read_text())

    # two rounds of global checkpoints, each exactly the exchanged weights
    rounds = sorted(p.name for p in (run / "federation" / "rounds").iterdir())
    assert rounds == ["round-001", "round-002"]
    assert len(result["time_per_round_s"]) == 2

    exchanged_bytes = model["trainable_parameters"] * 4  # fp32
    if method == "sft":
        assert model["trainable_parameters"] == model["parameters"]  # every weight trains
    else:
        # the frozen base never travels (p-tuning's prompt encoder is large next to a 60k-parameter toy)
        assert model["trainable_parameters"] < model["parameters"]
    for site, per_round in result["bytes_per_round"].items():
        assert [r["round"] for r in per_round] == [1, 2], site
        for r in per_round:
            assert r["sent"] == exchanged_bytes, (site, r)
            assert r["received"] == exchanged_bytes, (site, r)

    # the curve has the initial model plus one point per round, and the global model moved
    assert [step for step, _ in result["val_loss_curve"]] == [0, 2, 4]
    from fedllm.federation.persistor import load_round

    r1, r2 = load_round(run / "federation" / "rounds", 1), load_round(run / "federation" / "rounds", 2)
    assert set(r1) == set(r2)
    assert any(not torch.equal(r1[k], r2[k]) for k in r1)

    # the final model is exported in a loadable form
    if method == "sft":
        assert (run / "models" / "fedavg" / "model.safetensors").is_file()
        assert result["adapter_dir"] is None
    else:
        assert (run / "models" / "fedavg" / "adapter_config.json").is_file()
        from peft import PeftModel
        from fedllm.train.model import load_causal_lm

        PeftModel.from_pretrained(load_causal_lm(run / "models" / "base"), str(run / "models" / "fedavg"))
