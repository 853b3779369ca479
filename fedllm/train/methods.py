"""Fine-tuning methods: one registry, one entry point (as peft's own mapping).

Each method names its peft config class and fedllm's defaults; the YAML's
``method.params`` are peft's own field names and override the defaults. Adding a
method touches this file only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from fedllm.errors import FedllmError


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    peft_config: Optional[Callable[[], type]] = None  # lazy: importing peft is slow
    defaults: dict = field(default_factory=dict)

    @property
    def is_peft(self) -> bool:
        return self.peft_config is not None

    @property
    def is_prompt_learning(self) -> bool:
        return self.name in ("ptuning", "prompt_tuning")

    @property
    def starts_as_base(self) -> bool:
        """Whether the model before its first step computes exactly what the base model
        does: full weights as loaded, LoRA's B = 0, IA3's scales = 1. Prompt learning
        prepends freshly initialised virtual tokens, so it does not."""
        return not self.is_prompt_learning


def _lora():
    from peft import LoraConfig

    return LoraConfig


def _ia3():
    from peft import IA3Config

    return IA3Config


def _ptuning():
    from peft import PromptEncoderConfig

    return PromptEncoderConfig


def _prompt_tuning():
    from peft import PromptTuningConfig

    return PromptTuningConfig


METHODS: dict[str, Method] = {
    "sft": Method("sft", "full supervised fine-tuning: every weight trains and travels"),
    "lora": Method(
        "lora",
        "LoRA: low-rank adapters on the attention projections",
        _lora,
        # No target_modules: peft picks the model family's attention projections (q_proj and
        # v_proj for llama, c_attn for GPT-2), as the LoRA paper and NeMo's default
        # (attention_qkv) do. It keeps a round's message under 1% of the model (bench/ B2);
        # "all-linear" is one line of config away and roughly triples the bytes.
        {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
    ),
    "ptuning": Method(
        "ptuning",
        "p-tuning: virtual tokens produced by a small prompt encoder (MLP)",
        _ptuning,
        {"num_virtual_tokens": 10, "encoder_hidden_size": 128},
    ),
    "prompt_tuning": Method(
        "prompt_tuning",
        "prompt tuning: learned virtual-token embeddings",
        _prompt_tuning,
        {"num_virtual_tokens": 10},
    ),
    "ia3": Method("ia3", "IA3: learned rescaling of attention and feed-forward activations", _ia3, {}),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise FedllmError(f"config field 'method.name': {name!r} is not allowed; allowed values: {', '.join(METHODS)}")
    return METHODS[name]


def peft_config_for(method_name: str, params: dict[str, Any]):
    """The peft config object for a method, or None for full SFT.

    Unknown parameter names raise an error naming ``method.params.<name>`` and the
    fields the peft config accepts.
    """
    method = get_method(method_name)
    if not method.is_peft:
        if params:
            raise FedllmError("config field 'method.params': sft takes no parameters")
        return None
    from peft import TaskType

    cls = method.peft_config()
    allowed = {f.name for f in dataclasses.fields(cls)}
    for key in params:
        if key not in allowed:
            raise FedllmError(
                f"config field 'method.params.{key}': not a parameter of {cls.__name__}; "
                f"allowed: {', '.join(sorted(a for a in allowed if not a.startswith('_')))}"
            )
    kwargs = {**method.defaults, **params, "task_type": TaskType.CAUSAL_LM}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise FedllmError(f"config field 'method.params': invalid {cls.__name__}: {e}") from None


def apply_method(model, method_name: str, params: dict[str, Any]):
    """Wrap a base causal LM for the method; returns the model to train.

    SFT returns the model unchanged (all parameters trainable). PEFT methods
    freeze the base and return a ``PeftModel`` whose trainable parameters are
    exactly what a site exchanges with the server.
    """
    cfg = peft_config_for(method_name, params)
    if cfg is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import get_peft_model

    try:
        return get_peft_model(model, cfg)
    except ValueError as e:  # e.g. target modules not found in this architecture
        raise FedllmError(f"config field 'method.params': {method_name} cannot be applied to this model: {e}") from None


@dataclass(frozen=True)
class ParameterCount:
    """A model's size as model.json states it."""

    base: int  # the base model's own parameters; a PEFT adapter is not among them
    trainable: int  # what trains and travels: every weight for SFT, the adapter / prompt for PEFT


def count_parameters(model, method_name: str) -> ParameterCount:
    """The size of a model :func:`apply_method` returned, on any device (meta included).

    A weight shared by two modules (tied input and output embeddings) counts once.
    """
    total = trainable = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    # PEFT froze the whole base and added the adapter; SFT trains the base itself.
    base = total - trainable if get_method(method_name).is_peft else total
    return ParameterCount(base=base, trainable=trainable)
