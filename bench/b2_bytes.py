"""B2 — bytes a site sends per round: SFT, LoRA, prompt tuning; fp32 and NVFlare's quantizations.

What travels per round per site (and back from the server) is the module's exchanged weights:
``CausalLMModule.state_dict()`` — every weight for SFT, the trainable adapter / prompt weights
for PEFT (fedllm's defaults: LoRA r=8 on the attention projections peft picks for the
model family, 10 virtual tokens; for GPT-2 medium, E2's LoRA: r=32 on the fused QKV). With
``federation.quantization`` the message is what fedllm's quantization filter produces from
those weights (``fedllm.federation.quantization.quantize_weights``, the same code the job's
filters run): the quantized values plus the scales and code books carried in the message.
Each size below is computed from the real tensors, never from a formula.

Models: the benchmarks' tiny llama (from a real prepared run), and, unless ``--quick``, a
randomly initialised llama of ~350M parameters (hidden 1024, 24 layers, vocab 32000:
GPT-2-medium scale, the issue's GPU size) and GPT-2 medium itself (355M, E2's stand-in),
with the LoRA settings of ``configs/e2_lora_phrasebank_alpha1.yaml``.

    .venv/bin/python bench/b2_bytes.py [--quick]

Prints a table and writes ``bench/results/b2.json``. Ratios are to the fp32 full model.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import bench_config, device_name, print_table, write_result  # noqa: E402

METHODS = ("sft", "lora", "prompt_tuning")
QUANTIZATIONS = ("fp32", "fp16", "blockwise8", "float4", "normfloat4")
# ~350M parameters, llama layout (the 355M GPU size); random init is enough for bytes.
LARGE = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 24, "num_attention_heads": 16,
         "num_key_value_heads": 16, "vocab_size": 32000, "tie_word_embeddings": True}


E2_CONFIG = REPO / "configs" / "e2_lora_phrasebank_alpha1.yaml"


def exchanged_weights(base_model, method: str, params: dict) -> dict:
    """The weights a site sends for ``method``: trainable parameters, as the module's state_dict holds them."""
    from fedllm.train.methods import apply_method

    model = apply_method(base_model, method, params)
    weights = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if method == "lora":
        # peft injects LoRA layers into the base in place: take them out for the next method
        model.unload()
    return weights


def message_sizes(weights: dict) -> dict:
    from fedllm.federation.quantization import message_bytes, quantize_weights

    sizes = {"fp32": sum(int(t.numel()) * 4 for t in weights.values())}
    for mode in QUANTIZATIONS[1:]:
        payload, state, _ = quantize_weights(weights, mode)
        sizes[mode] = message_bytes(payload, state)
    return sizes


def measure_model(label: str, model, lora_params: dict | None = None) -> dict:
    """Message sizes of every method on ``model``; LoRA with ``lora_params`` (default: fedllm's)."""
    from fedllm.config import MethodConfig

    full = sum(int(p.numel()) for p in model.parameters())
    result = {"parameters": full, "full_fp32_bytes": full * 4, "methods": {}}
    for method in METHODS:
        started = time.perf_counter()
        params = dict(MethodConfig(name=method).params)
        if method == "lora" and lora_params is not None:
            params = lora_params
        weights = exchanged_weights(model, method, params)
        sizes = message_sizes(weights)
        result["methods"][method] = {
            "params": params,
            "exchanged_parameters": sum(int(t.numel()) for t in weights.values()),
            "bytes": sizes,
            "over_fp32_full": {k: v / result["full_fp32_bytes"] for k, v in sizes.items()},
        }
        print(f"[b2] {label} {method}: {sizes['fp32'] / 2**20:.2f} MiB fp32 ({time.perf_counter() - started:.1f} s)", flush=True)
    sft = result["methods"]["sft"]["bytes"]
    result["lora_over_sft"] = result["methods"]["lora"]["bytes"]["fp32"] / sft["fp32"]
    result["prompt_tuning_over_sft"] = result["methods"]["prompt_tuning"]["bytes"]["fp32"] / sft["fp32"]
    result["q8_over_fp32"] = sft["blockwise8"] / sft["fp32"]
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model only")
    args = parser.parse_args(argv)

    import torch

    from fedllm.run import prepare_run
    from fedllm.train.model import load_causal_lm

    torch.manual_seed(0)
    models = {}
    workdir = Path(tempfile.mkdtemp(prefix="bench-b2-"))
    try:
        cfg = bench_config(["federation.rounds=1"])
        run = prepare_run(cfg, workdir / "run")
        models["tiny"] = measure_model("tiny", load_causal_lm(run / "models" / "base"))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if not args.quick:
        from transformers import AutoModelForCausalLM, LlamaConfig

        large = AutoModelForCausalLM.from_config(LlamaConfig(**LARGE))
        models["llama-350m"] = measure_model("llama-350m", large)
        del large

        from transformers import GPT2Config, GPT2LMHeadModel

        from fedllm.config import load_config

        e2 = load_config(E2_CONFIG)
        gpt2_medium = GPT2LMHeadModel(GPT2Config(n_embd=1024, n_layer=24, n_head=16))  # gpt2-medium's shape
        models["gpt2-medium (E2)"] = measure_model("gpt2-medium (E2)", gpt2_medium, dict(e2.method.params))
        del gpt2_medium

    rows = []
    for label, r in models.items():
        for method, m in r["methods"].items():
            rows.append([label, method, m["exchanged_parameters"], m["bytes"]["fp32"] / 2**20,
                         *[m["over_fp32_full"][q] for q in QUANTIZATIONS]])
    print_table(["model", "method", "exchanged params", "fp32 MiB", *[f"{q} / fp32 full" for q in QUANTIZATIONS]], rows)
    headline = models.get("llama-350m", models["tiny"])
    payload = {
        "benchmark": "b2",
        "device": device_name(),
        "headline_model": "llama-350m" if "llama-350m" in models else "tiny",
        "lora_over_sft": headline["lora_over_sft"],
        "prompt_tuning_over_sft": headline["prompt_tuning_over_sft"],
        "q8_over_fp32": headline["q8_over_fp32"],
        "lora_over_sft_by_model": {label: r["lora_over_sft"] for label, r in models.items()},
        "models": models,
    }
    print(f"[b2] wrote {write_result('b2', payload)}")
    return payload


if __name__ == "__main__":
    main()
