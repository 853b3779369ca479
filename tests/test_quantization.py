"""Quantized messages: NVFlare's quantization filters on both directions of a fedllm job."""

import pytest
import torch

from conftest import TINY_CONFIG, TINY_RUN
from fedllm.config import load_config
from fedllm.errors import FedllmError
from fedllm.federation.persistor import load_round
from fedllm.federation.quantization import add_quantization, dequantize_weights, message_bytes, quantize_weights


@pytest.mark.parametrize(
    "mode, max_ratio, max_error",
    [("fp16", 0.51, 1e-3), ("blockwise8", 0.27, 0.05), ("float4", 0.15, 0.7), ("normfloat4", 0.15, 0.6)],
)
def test_quantized_message_is_smaller_and_restores_the_weights(mode, max_ratio, max_error):
    torch.manual_seed(0)
    weights = {"layer.weight": torch.randn(256, 128), "layer.bias": torch.randn(128)}
    payload, state, dtypes = quantize_weights(weights, mode)
    fp32_bytes = sum(t.nbytes for t in weights.values())
    assert message_bytes(payload, state) <= max_ratio * fp32_bytes
    restored = dequantize_weights(payload, state, dtypes, mode)
    for name, original in weights.items():
        assert restored[name].dtype == torch.float32 and restored[name].shape == original.shape
        error = (restored[name] - original).abs().max().item()
        assert 0 < error <= max_error, (name, error)


def test_weights_already_narrow_travel_unchanged():
    weights = {"w": torch.randn(64, 64, dtype=torch.bfloat16)}
    payload, state, _ = quantize_weights(weights, "fp16")
    assert payload["w"].dtype == torch.bfloat16 and message_bytes(payload, state) == weights["w"].nbytes


def test_unknown_mode_names_the_config_field():
    with pytest.raises(FedllmError, match="federation.quantization"):
        add_quantization(object(), "int3")


@pytest.mark.slow  # two federations: about 2-4 minutes on 2 shared cores
def test_blockwise8_federation_stays_close_to_unquantized(tmp_path, shared_data):
    """Two rounds of tiny SFT FedAvg with and without 8-bit messages: same data, seeds, steps."""
    from fedllm.run import prepare_run, run_federation

    finals = {}
    for mode in ("none", "blockwise8"):
        overrides = TINY_RUN + ["method.name=sft", "federation.rounds=2"]
        if mode != "none":
            overrides.append(f"federation.quantization={mode}")
        run = prepare_run(load_config(TINY_CONFIG, overrides), tmp_path / mode)
        result = run_federation(run)
        assert len(result["time_per_round_s"]) == 2
        finals[mode] = load_round(run / "federation" / "rounds", 2)
        # the global model is persisted in full precision: only the wire carried 8 bits
        assert finals[mode] and all(v.dtype == torch.float32 for v in finals[mode].values())

    plain, quantized = finals["none"], finals["blockwise8"]
    assert set(plain) == set(quantized)
    drift = max((plain[k] - quantized[k]).abs().max().item() for k in plain)
    scale = max(plain[k].abs().max().item() for k in plain)
    # 8-bit blockwise rounding of every message, 2 rounds x 2 directions: small next to the weights
    assert 0 < drift <= 0.05 * scale, (drift, scale)
