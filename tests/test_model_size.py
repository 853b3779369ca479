"""model.json's parameter counts, read without loading the base model's weights.

``describe_model`` builds the architecture on PyTorch's meta device and applies the
method to it; its counts equal those of the model a site loads and trains, and a
weights file whose tensor data is garbage (header intact) gives the same counts.
"""

from __future__ import annotations

import json
import shutil
import struct

import pytest

from conftest import TINY_CONFIG, TINY_RUN
from fedllm.config import load_config
from fedllm.run import describe_model, prepare_run
from fedllm.train.module import CausalLMModule


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    cfg = load_config(TINY_CONFIG, TINY_RUN)
    return prepare_run(cfg, tmp_path_factory.mktemp("model-size") / "run")


def tiny_cfg(method: str):
    return load_config(TINY_CONFIG, TINY_RUN + [f"method.name={method}"])


def expected_tiny_llama(base_dir) -> int:
    """The tiny llama's parameters from its config.json: embeddings tied to the output layer."""
    c = json.loads((base_dir / "config.json").read_text())
    hidden, inter, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    assert c["tie_word_embeddings"] and c["num_key_value_heads"] == c["num_attention_heads"]
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden  # q k v o, gate up down, two norms
    return c["vocab_size"] * hidden + layers * per_layer + hidden  # + the final norm


@pytest.mark.parametrize("method", ["sft", "lora", "prompt_tuning", "ptuning", "ia3"])
def test_counts_equal_the_loaded_models(tiny_run, method):
    base_dir = tiny_run / "models" / "base"
    described = describe_model(tiny_cfg(method), base_dir)

    loaded = CausalLMModule(str(base_dir), method).model
    total = sum(p.numel() for p in loaded.parameters())
    trainable = sum(p.numel() for p in loaded.parameters() if p.requires_grad)
    assert described["trainable_parameters"] == trainable
    assert described["parameters"] == (total if method == "sft" else total - trainable)

    base = expected_tiny_llama(base_dir)
    c = json.loads((base_dir / "config.json").read_text())
    hidden, layers = c["hidden_size"], c["num_hidden_layers"]
    assert described["parameters"] == base
    expected_trainable = {
        "sft": base,
        "lora": layers * 2 * (8 * hidden + hidden * 8),  # r=8 A and B on q_proj and v_proj
        "prompt_tuning": 10 * hidden,  # 10 virtual tokens
    }
    if method in expected_trainable:
        assert described["trainable_parameters"] == expected_trainable[method]


def test_model_json_is_what_describe_model_says(tiny_run):
    # prepare_run wrote model.json for the tiny config's own method (sft)
    written = json.loads((tiny_run / "model.json").read_text())
    assert written == describe_model(tiny_cfg("sft"), tiny_run / "models" / "base")
    assert written["parameters"] == written["trainable_parameters"] == expected_tiny_llama(tiny_run / "models" / "base")


def test_weights_are_not_read(tiny_run, tmp_path):
    from safetensors import SafetensorError

    from fedllm.train.model import load_causal_lm

    intact = tiny_run / "models" / "base"
    broken = tmp_path / "base"
    shutil.copytree(intact, broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header_end = 8 + header_len
    # header intact; tensor data garbage and a quarter of it missing
    garbage = bytes(range(256)) * ((len(data) - header_end) // 256 // 4 * 3)
    weights.write_bytes(data[:header_end] + garbage)

    with pytest.raises(SafetensorError, match="file not fully covered"):
        load_causal_lm(broken)  # the file no longer loads ...
    for method in ("sft", "lora", "prompt_tuning"):
        cfg = tiny_cfg(method)
        assert describe_model(cfg, broken) == describe_model(cfg, intact)  # ... and its counts are unchanged
