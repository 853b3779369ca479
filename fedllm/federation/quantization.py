"""Smaller messages: NVFlare's quantization filters on both directions of a FedAvg job.

``federation.quantization`` picks the format weights travel in (``fp16``, ``blockwise8``,
``float4``, ``normfloat4``). As in NVFlare's examples (``examples/advanced/llm_hf``), four
filters go on the job:

    server  --global model-->  quantize (server output)  ...  dequantize (site input)
    site    --its update---->  quantize (site output)    ...  dequantize (server input)

so the server aggregates, and every site trains, in the weights' own precision; only the
wire carries the compressed form. The 8- and 4-bit formats are bitsandbytes' (``blockwise8``:
one byte per weight plus one fp32 scale per 4096 weights; ``float4``/``normfloat4``: half a
byte plus one scale per 64), which the message carries in its DXO meta (``quant_state``).

NVFlare's ``ModelQuantizer``/``ModelDequantizer`` move every tensor to CUDA for the
bitsandbytes modes, and their 4-bit path returns 1-D weights as ``[1, n]``. fedllm's
subclasses keep NVFlare's message layout (values in the DXO, ``quant_state`` and
``source_datatype`` in its meta) and NVFlare's code for ``fp16``, and run the bitsandbytes
calls on the GPU when there is one, else on the CPU (bitsandbytes >= 0.46 has CPU kernels),
restoring every weight's own shape, so a CPU site and a GPU server understand each other.
"""

from __future__ import annotations

import numpy as np
import torch
from nvflare.apis.fl_context import FLContext
from nvflare.app_opt.pt.quantization.dequantizer import ModelDequantizer
from nvflare.app_opt.pt.quantization.quantizer import ModelQuantizer

from fedllm.errors import FedllmError
from fedllm.tensors import tensor_bytes

# fedllm's config value -> NVFlare's quantization_type
MODES = {"fp16": "float16", "blockwise8": "blockwise8", "float4": "float4", "normfloat4": "normfloat4"}
_BITS = {"float16": 16, "blockwise8": 8, "float4": 4, "normfloat4": 4}
_SOURCE_BITS = {"float32": 32, "float16": 16, "bfloat16": 16}


def check_mode(mode: str) -> str:
    """NVFlare's name for the quantization ``mode``; an error naming the config field otherwise."""
    if mode not in MODES:
        raise FedllmError(
            f"config field 'federation.quantization': {mode!r} is not a quantization; expected one of {sorted(MODES)}"
        )
    return MODES[mode]


def add_quantization(recipe, mode: str) -> None:
    """Quantize the weights a FedAvg ``recipe`` sends, both ways, in ``mode``; in place.

    ``mode`` is one of ``fp16``, ``blockwise8``, ``float4``, ``normfloat4``
    (``federation.quantization``). Tensors whose dtype is already as narrow as the mode
    (e.g. bf16 weights under ``fp16``) travel unchanged. Raises FedllmError for another mode.
    """
    kind = check_mode(mode)
    recipe.add_server_output_filter(WeightQuantizer(kind), tasks=["train"])
    recipe.add_server_input_filter(WeightDequantizer(), tasks=["train"])
    recipe.add_client_input_filter(WeightDequantizer(), tasks=["train"])
    recipe.add_client_output_filter(WeightQuantizer(kind), tasks=["train"])


def quantize_weights(weights: dict, mode: str) -> tuple[dict, dict, dict]:
    """``(payload, quant_state, source_dtypes)`` of ``weights`` in ``mode``, as the filter sends them.

    The message's size is ``message_bytes(payload, quant_state)``. ``weights`` is not
    changed. Used by ``bench/b2_bytes.py`` to measure what a round puts on the wire.
    """
    if mode not in MODES:
        raise FedllmError(f"quantize_weights mode={mode!r}: expected one of {sorted(MODES)}")
    return WeightQuantizer(MODES[mode]).quantization(dict(weights), FLContext())


def dequantize_weights(payload: dict, quant_state: dict, source_dtypes: dict, mode: str) -> dict:
    """The weights a receiving filter rebuilds from ``quantize_weights``' output."""
    return WeightDequantizer().dequantization(dict(payload), quant_state, MODES[mode], source_dtypes, FLContext())


def message_bytes(payload: dict, quant_state: dict) -> int:
    """Bytes of tensors in a quantized message: the values plus the scales and code books."""
    return tensor_bytes(payload) + sum(tensor_bytes(state or {}) for state in quant_state.values())


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _skips(quantization_type: str, source_dtype: str) -> bool:
    """NVFlare leaves a tensor as it is when the mode is not narrower than its dtype."""
    return _BITS[quantization_type] >= _SOURCE_BITS[source_dtype]


class WeightQuantizer(ModelQuantizer):
    """NVFlare's ``ModelQuantizer``; its bitsandbytes modes also run without a GPU."""

    def quantization(self, params: dict, fl_ctx: FLContext):
        if self.quantization_type not in ("blockwise8", "float4", "normfloat4"):
            return super().quantization(params, fl_ctx)
        from bitsandbytes.functional import quantize_4bit, quantize_blockwise

        quant_state, source_dtypes = {}, {}
        for name in list(params):
            values = params[name]
            as_numpy = isinstance(values, np.ndarray)
            tensor = torch.as_tensor(values).to(_device())
            source = str(tensor.dtype).split(".")[1]
            if source not in _SOURCE_BITS:
                raise FedllmError(f"quantization: weight {name!r} has dtype {source}; expected float32, float16 or bfloat16")
            source_dtypes[name], quant_state[name] = source, {}
            if _skips(self.quantization_type, source):
                continue
            if self.quantization_type == "blockwise8":
                quantized, state = quantize_blockwise(tensor.contiguous())
                quant_state[name] = {"absmax": state.absmax.cpu(), "code": state.code.cpu()}
            else:
                quantized, state = quantize_4bit(tensor.contiguous(), quant_type="fp4" if self.quantization_type == "float4" else "nf4")
                quant_state[name] = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in state.as_dict().items()}
            quantized = quantized.cpu()
            if as_numpy:
                quantized = quantized.numpy()
                quant_state[name] = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in quant_state[name].items()}
            params[name] = quantized
        return params, quant_state, source_dtypes


class WeightDequantizer(ModelDequantizer):
    """NVFlare's ``ModelDequantizer``; its bitsandbytes modes also run without a GPU."""

    def dequantization(self, params: dict, quant_state: dict, quantization_type: str, source_datatype: dict, fl_ctx: FLContext):
        if quantization_type not in ("blockwise8", "float4", "normfloat4"):
            return super().dequantization(params, quant_state, quantization_type, source_datatype, fl_ctx)
        from bitsandbytes.functional import QuantState, dequantize_4bit, dequantize_blockwise

        for name in list(params):
            source = source_datatype[name]
            if source == "bool" or _skips(quantization_type, source):
                continue
            values = params[name]
            as_numpy = isinstance(values, np.ndarray)
            quantized = torch.as_tensor(values).to(_device())
            state = {
                k: torch.as_tensor(v).to(_device()) if isinstance(v, (np.ndarray, torch.Tensor)) else v
                for k, v in quant_state[name].items()
            }
            if quantization_type == "blockwise8":
                restored = dequantize_blockwise(quantized, absmax=state["absmax"], code=state["code"])
            else:
                restored = dequantize_4bit(
                    quantized,
                    QuantState(
                        quant_type=state["quant_type"],
                        absmax=state["absmax"],
                        blocksize=state["blocksize"],
                        code=state["quant_map"],
                        dtype=getattr(torch, state["dtype"]),
                        shape=torch.Size(state["shape"]),
                    ),
                    quant_type="fp4" if quantization_type == "float4" else "nf4",
                )
                # bitsandbytes hands a 1-D weight back as [1, n]
                restored = restored.reshape(tuple(state["shape"]))
            restored = restored.to(getattr(torch, source)).cpu()
            params[name] = restored.numpy() if as_numpy else restored
        return params
