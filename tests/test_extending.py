"""README's "Extending": a PEFT method is one entry in ``fedllm.train.methods.METHODS``.

peft's LoHa is registered here the way README shows (and nowhere else); the config then
accepts ``method.name: loha``, model.json counts its adapter, and a site's module trains
and exchanges the adapter only.
"""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_CONFIG, TINY_RUN
from fedllm.config import load_config
from fedllm.errors import FedllmError
from fedllm.run import describe_model, prepare_run
from fedllm.train import methods
from fedllm.train.methods import Method
from fedllm.train.module import CausalLMModule


def _loha():
    from peft import LoHaConfig

    return LoHaConfig


@pytest.fixture
def loha_registered(monkeypatch):
    registry = dict(methods.METHODS)
    registry["loha"] = Method("loha", "LoHa: low-rank Hadamard adapters", _loha, {"r": 8, "alpha": 16})  # as README shows
    monkeypatch.setattr(methods, "METHODS", registry)


def test_an_unregistered_method_is_refused_at_load():
    with pytest.raises(FedllmError, match=r"config field 'method.name': 'loha' is not allowed; allowed values: sft, lora"):
        load_config(TINY_CONFIG, TINY_RUN + ["method.name=loha"])


def test_one_registry_entry_makes_a_method(loha_registered, tmp_path):
    cfg = load_config(TINY_CONFIG, TINY_RUN + ["method.name=loha"])
    run = prepare_run(cfg, tmp_path / "run")
    base = run / "models" / "base"

    module = CausalLMModule(str(base), "loha", dict(methods.METHODS["loha"].defaults))
    exchanged = module.state_dict()
    assert exchanged and all("hada_" in key for key in exchanged)
    assert describe_model(cfg, base)["trainable_parameters"] == sum(t.numel() for t in exchanged.values())

    # one step moves the adapter and nothing else
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    ids = torch.randint(0, 100, (2, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    module.training_step(batch, 0).backward()
    optimizer.step()
    changed = {k for k, v in module.model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and {"model." + k for k in changed} <= set(exchanged)
