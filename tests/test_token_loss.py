"""The loss and the task metric project only the positions they score; the numbers are
the full forward's, for every method and for both tiny architectures."""

import pytest
import torch

from fedllm.train.methods import apply_method
from fedllm.train.module import decoder_and_head, token_loss


def tiny_model(architecture: str):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    torch.manual_seed(0)
    if architecture == "llama":
        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=2, vocab_size=97, max_position_embeddings=64)
    else:
        config = GPT2Config(n_embd=32, n_inner=64, n_layer=2, n_head=2, vocab_size=97, n_positions=64,
                            bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return AutoModelForCausalLM.from_config(config)


def full_forward_loss(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, -batch["input_ids"].shape[1]:, :]
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
        ignore_index=-100, reduction="sum")


def batch_of_two():
    input_ids = torch.randint(1, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    attention = torch.ones_like(input_ids)
    attention[1, 9:] = 0  # right padding
    labels = torch.full_like(input_ids, -100)
    labels[0, 7:12] = input_ids[0, 7:12]  # answer-only: the last tokens of each row
    labels[1, 6:9] = input_ids[1, 6:9]
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["sft", "lora", "ia3", "prompt_tuning"])
def test_token_loss_equals_the_full_forward(architecture, method):
    model = apply_method(tiny_model(architecture), method, {})
    batch = batch_of_two()
    loss, count = token_loss(model, batch)
    assert count == 8
    assert (decoder_and_head(model) is None) == (method == "prompt_tuning")
    torch.testing.assert_close(loss, full_forward_loss(model, batch), rtol=1e-5, atol=1e-5)
    loss.backward()  # gradients reach what trains
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
