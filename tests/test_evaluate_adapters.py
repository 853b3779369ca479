"""Evaluating a base model plus a PEFT adapter of every method fedllm trains (LoRA, IA3,
p-tuning, prompt tuning): the adapter changes the scores, prompt-learning adapters are
scored on the real tokens only, and an adapter for another base model is refused in
one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedllm.config import TinyModelSpec
from fedllm.errors import FedllmError
from fedllm.evaluate import evaluate_model
from fedllm.evaluate.model import load_model_for_eval
from fedllm.evaluate.run import make_task_manager
from fedllm.evaluate.tasks import piqa, winogrande

from conftest import SHARED_DATA as DATA  # the checkout's ../shared/data
LIMIT = 10
SPEC = TinyModelSpec(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, vocab_size=1024)
NUM_VIRTUAL_TOKENS = 8


def data_texts() -> list[str]:
    texts = [f"{d['goal']} {d['sol1']} {d['sol2']}" for d in piqa.read_docs(DATA)[:600]]
    return texts + [d["sentence"] for d in winogrande.read_docs(DATA)[:600]]


def peft_config(method: str, architecture: str = "llama"):
    from peft import IA3Config, LoraConfig, PromptEncoderConfig, PromptTuningConfig, TaskType

    attention = ["q_proj", "v_proj"] if architecture == "llama" else ["c_attn"]
    return {
        "lora": lambda: LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, target_modules=attention),
        "ia3": lambda: IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "ptuning": lambda: PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=NUM_VIRTUAL_TOKENS, encoder_hidden_size=32),
        "prompt_tuning": lambda: PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=NUM_VIRTUAL_TOKENS),
    }[method]()


def make_adapter(model_dir: Path, method: str, out_dir: Path, architecture: str = "llama") -> Path:
    """A PEFT adapter for ``model_dir``, its trainable weights moved well off their
    initial values (LoRA's B starts at zero and IA3's scales at one: a no-op)."""
    import torch
    from peft import get_peft_model

    from fedllm.train.model import load_causal_lm

    torch.manual_seed(7)
    model = get_peft_model(load_causal_lm(model_dir), peft_config(method, architecture))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.5)
    model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    from fedllm.train.model import build_tiny_model

    return build_tiny_model(SPEC, data_texts(), tmp_path_factory.mktemp("base"))


def per_document_loglikelihoods(model_dir, adapter_dir, tmp_path) -> tuple[list[list[float]], dict]:
    """What ``evaluate_model`` runs (its model loader and tasks), with lm-eval's per-document log."""
    import lm_eval

    # fp32: the hand computation below is fp32 (bf16 weights would differ by more than 1e-4)
    lm = load_model_for_eval(model_dir, adapter_dir, batch_size=4, device="cpu", dtype="float32")
    task_manager, _ = make_task_manager("offline", DATA, ("piqa",), tmp_path, LIMIT)
    results = lm_eval.simple_evaluate(model=lm, tasks=["piqa"], task_manager=task_manager, limit=LIMIT, log_samples=True)
    return [[resp[0] for resp in sample["filtered_resps"]] for sample in results["samples"]["piqa"]], results


@pytest.mark.parametrize("method", ["lora", "ia3", "ptuning", "prompt_tuning"])
def test_every_adapter_method_changes_the_scores_of_the_base_model(base_model, method, tmp_path):
    adapter = make_adapter(base_model, method, tmp_path / method)
    base, _ = per_document_loglikelihoods(base_model, None, tmp_path / "base-tasks")
    adapted, _ = per_document_loglikelihoods(base_model, adapter, tmp_path / "adapted-tasks")
    assert len(base) == len(adapted) == LIMIT
    differences = [abs(a - b) for doc_a, doc_b in zip(adapted, base) for a, b in zip(doc_a, doc_b)]
    assert min(differences) > 1e-3, f"{method}: some choice scored the same with and without the adapter"

    result = evaluate_model(base_model, adapter, tasks=("piqa",), limit=LIMIT, batch_size=4, task_data=DATA, device="cpu")
    assert result["adapter"] == str(adapter) and result["n_docs"] == {"piqa": LIMIT}
    assert set(result["metrics"]) == {"piqa/acc", "piqa/acc_norm", "mean"}


def test_ptuning_loglikelihood_is_computed_on_the_real_tokens_only(base_model, tmp_path):
    """The evaluation's log-likelihood of each PIQA choice equals the sum of log-softmax
    over the continuation tokens of the PEFT model's own forward pass, once the
    virtual-token positions peft puts in front of the logits are dropped."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = make_adapter(base_model, "ptuning", tmp_path / "ptuning")
    reported, results = per_document_loglikelihoods(base_model, adapter, tmp_path / "tasks")

    tokenizer = AutoTokenizer.from_pretrained(str(base_model))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_model)), str(adapter)).eval()
    for sample, scores in list(zip(results["samples"]["piqa"], reported))[:3]:
        for (context, continuation), score in zip(sample["arguments"], scores):
            context_ids = tokenizer(context)["input_ids"]
            whole_ids = tokenizer(context + continuation)["input_ids"]
            assert whole_ids[: len(context_ids)] == context_ids
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([whole_ids])).logits[0]
            assert logits.shape[0] == NUM_VIRTUAL_TOKENS + len(whole_ids)  # peft's virtual positions come first
            real = torch.log_softmax(logits[NUM_VIRTUAL_TOKENS:].float(), dim=-1)
            by_hand = sum(real[i - 1, whole_ids[i]].item() for i in range(len(context_ids), len(whole_ids)))
            assert score == pytest.approx(by_hand, abs=1e-4)
            # Scoring the first positions instead (virtual ones included) gives another number.
            shifted = torch.log_softmax(logits[: len(whole_ids)].float(), dim=-1)
            misaligned = sum(shifted[i - 1, whole_ids[i]].item() for i in range(len(context_ids), len(whole_ids)))
            assert abs(score - misaligned) > 1e-3


def test_ptuning_on_a_model_with_a_position_table_fits_its_window(tmp_path):
    """GPT-2 style models have a fixed position table: lm-eval's own ``hf`` model, asked
    for ``batch_size="auto"``, probes with a full window plus the virtual tokens and
    fails; fedllm's loader shortens the window by the virtual tokens."""
    from lm_eval.models.huggingface import HFLM

    from fedllm.train.model import build_tiny_model

    spec = TinyModelSpec(architecture="gpt2", hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, vocab_size=1024, max_position_embeddings=64)
    model_dir = build_tiny_model(spec, data_texts(), tmp_path / "gpt2")
    adapter = make_adapter(model_dir, "ptuning", tmp_path / "ptuning", architecture="gpt2")

    stock = HFLM(pretrained=str(model_dir), peft=str(adapter), batch_size="auto", max_batch_size=2, device="cpu")
    with pytest.raises(IndexError):
        stock._detect_batch_size()

    ours = load_model_for_eval(model_dir, adapter, batch_size="auto", device="cpu")
    assert ours.max_length == 64 - NUM_VIRTUAL_TOKENS
    # WinoGrande: its continuations are short enough for a 56-token window.
    result = evaluate_model(model_dir, adapter, tasks=("winogrande",), limit=3, batch_size="auto", task_data=DATA, device="cpu")
    assert result["n_docs"] == {"winogrande": 3}


# ---------------------------------------------------------------- adapters for another base model


@pytest.fixture(scope="module")
def other_base(tmp_path_factory):
    """A tiny base model 32 wide (the evaluated one is 64)."""
    from fedllm.train.model import build_tiny_model

    spec = TinyModelSpec(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, vocab_size=1024)
    return build_tiny_model(spec, data_texts(), tmp_path_factory.mktemp("other-base"))


def forget_base(adapter: Path) -> None:
    """Point the adapter's recorded base at a directory that is not here (trained elsewhere)."""
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = "/nowhere/base-model"
    path.write_text(json.dumps(config))


def test_lora_adapter_of_another_base_is_refused_by_its_recorded_base(base_model, other_base, tmp_path):
    adapter = make_adapter(other_base, "lora", tmp_path / "lora")
    with pytest.raises(FedllmError, match=rf"adapter {adapter} is for another base model: it was trained on {other_base} \(hidden_size 32\), model .* has hidden_size 64") as e:
        evaluate_model(base_model, adapter, tasks=("piqa",), limit=2, task_data=DATA, device="cpu")
    assert "\n" not in str(e.value)


def test_lora_adapter_of_another_base_is_refused_by_its_shapes(base_model, other_base, tmp_path):
    adapter = make_adapter(other_base, "lora", tmp_path / "lora")
    forget_base(adapter)
    with pytest.raises(FedllmError, match=r"is for another base model than .*: size mismatch for .*q_proj\.lora_A.*\[4, 32\].*\[4, 64\]") as e:
        load_model_for_eval(base_model, adapter, device="cpu")
    assert "\n" not in str(e.value)


def test_lora_adapter_for_modules_the_model_lacks_is_refused(base_model, tmp_path):
    from fedllm.train.model import build_tiny_model

    gpt2 = build_tiny_model(TinyModelSpec(architecture="gpt2", hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, vocab_size=1024), data_texts(), tmp_path / "gpt2")
    adapter = make_adapter(gpt2, "lora", tmp_path / "lora", architecture="gpt2")
    forget_base(adapter)
    with pytest.raises(FedllmError, match=r"is for another base model than .*: Target modules .*c_attn.* not found in the base model") as e:
        load_model_for_eval(base_model, adapter, device="cpu")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("method", ["ptuning", "prompt_tuning"])
def test_prompt_adapter_of_another_width_is_refused(base_model, other_base, method, tmp_path):
    adapter = make_adapter(other_base, method, tmp_path / method)
    forget_base(adapter)
    with pytest.raises(FedllmError, match=r"is for another base model: its virtual tokens are 32 wide, model .* has hidden_size 64"):
        load_model_for_eval(base_model, adapter, device="cpu")


def test_adapter_directory_without_adapter_is_refused(base_model, tmp_path):
    with pytest.raises(FedllmError, match=r"adapter path .*missing: does not exist"):
        load_model_for_eval(base_model, tmp_path / "missing", device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FedllmError, match=r"adapter path .*empty: no adapter_config\.json \(not a PEFT adapter directory\)"):
        load_model_for_eval(base_model, tmp_path / "empty", device="cpu")
    adapter = make_adapter(base_model, "lora", tmp_path / "lora")
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(FedllmError, match=r"adapter path .*lora: no weights \(adapter_model\.safetensors or adapter_model\.bin\)"):
        load_model_for_eval(base_model, adapter, device="cpu")
