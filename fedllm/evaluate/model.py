"""The model lm-eval scores: a full-weight model directory, or a base model plus a PEFT
adapter directory (LoRA, IA3, p-tuning, prompt tuning), loaded by lm-eval's ``hf``
backend (``HFLM(pretrained=..., peft=...)``).

Checks made before anything is loaded, each failing with one line naming the path:
the model directory has a config and weights; the adapter directory has an
``adapter_config.json`` and weights; an adapter whose recorded dimensions (prompt
width, or its base model's config when that directory is at hand) differ from the
model's is for another base model. peft's own size-mismatch and missing-module errors
are rephrased the same way.

Prompt-learning adapters (p-tuning, prompt tuning) prepend ``num_virtual_tokens``
learned embeddings to every input, and peft returns logits for those positions too.
lm-eval's ``_loglikelihood_tokens`` already allows for that: it locates the
continuation from the end of the logits (``inplen + logits.shape[0] - padding_len``),
so only the real continuation tokens are scored (``tests/test_evaluate_adapters.py``
checks this against a forward pass computed by hand). What it does not allow for is
length: a window of ``max_length`` real tokens plus the virtual ones would run past
the model's position table (lm-eval's ``batch_size="auto"`` probe does exactly that),
so :class:`PromptLearningHFLM` shortens lm-eval's window by ``num_virtual_tokens``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from fedllm.errors import FedllmError
from fedllm.hardware import cpu_has_native_bf16
from fedllm.train.model import check_model_dir

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
#: peft types whose adapter is a set of virtual tokens prepended to the input
PROMPT_LEARNING_TYPES = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")
#: model config fields an adapter's weights are shaped by
SHAPE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


def model_shape(model_dir: Path) -> dict:
    """The fields of ``SHAPE_FIELDS`` the model's config sets, under their common names."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir)).get_text_config()
    shape = {name: getattr(config, name, None) for name in SHAPE_FIELDS}
    return {name: value for name, value in shape.items() if value is not None}


def read_adapter_config(adapter_dir: Path) -> dict:
    """The adapter's ``adapter_config.json``, after checking the directory holds an adapter."""
    if not adapter_dir.exists():
        raise FedllmError(f"adapter path {adapter_dir}: does not exist")
    if not adapter_dir.is_dir():
        raise FedllmError(f"adapter path {adapter_dir}: is not a directory")
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise FedllmError(f"adapter path {adapter_dir}: no {ADAPTER_CONFIG} (not a PEFT adapter directory)")
    if not any((adapter_dir / name).is_file() for name in ADAPTER_WEIGHTS):
        raise FedllmError(f"adapter path {adapter_dir}: no weights ({' or '.join(ADAPTER_WEIGHTS)})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise FedllmError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise FedllmError(f"{path}: no 'peft_type' (not a PEFT adapter config)")
    return config


def check_adapter_fits(adapter_dir: Path, adapter: dict, model_dir: Path) -> None:
    """An error if the adapter was made for a base model shaped differently from ``model_dir``."""
    shape = model_shape(model_dir)
    token_dim = adapter.get("token_dim")
    if adapter["peft_type"] in PROMPT_LEARNING_TYPES and token_dim and shape.get("hidden_size") not in (None, token_dim):
        raise FedllmError(
            f"adapter {adapter_dir} is for another base model: its virtual tokens are {token_dim} wide, "
            f"model {model_dir} has hidden_size {shape['hidden_size']}"
        )
    # The base recorded at training time is often a path on another machine; compare
    # shapes only when that directory is here and is not the model itself.
    recorded = adapter.get("base_model_name_or_path")
    if recorded and (Path(recorded) / "config.json").is_file() and Path(recorded).resolve() != model_dir.resolve():
        base_shape = model_shape(Path(recorded))
        differing = [name for name in SHAPE_FIELDS if name in shape and name in base_shape and shape[name] != base_shape[name]]
        if differing:
            name = differing[0]
            raise FedllmError(
                f"adapter {adapter_dir} is for another base model: it was trained on {recorded} ({name} {base_shape[name]}), "
                f"model {model_dir} has {name} {shape[name]}"
            )


def rephrase_peft_error(error: Exception, adapter_dir: Path, model_dir: Path) -> Optional[FedllmError]:
    """A one-line error for peft's load failures that mean "adapter for another model", else None."""
    text = str(error)
    if "size mismatch" in text:
        first = next(line.strip() for line in text.splitlines() if "size mismatch" in line)
        return FedllmError(f"adapter {adapter_dir} is for another base model than {model_dir}: {first}")
    if "not found in the base model" in text:
        return FedllmError(f"adapter {adapter_dir} is for another base model than {model_dir}: {text.splitlines()[0]}")
    return None


def _hflm_classes():
    from lm_eval.models.huggingface import HFLM

    class QuietHFLM(HFLM):
        """lm-eval's ``hf`` model without its progress bars, which it draws whatever
        ``$TQDM_DISABLE`` says: fedllm shows progress itself (fedllm.progress)."""

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=True)

    class PromptLearningHFLM(QuietHFLM):
        """lm-eval's ``hf`` model for a prompt-learning adapter: the token window is
        ``num_virtual_tokens`` shorter, so real plus virtual tokens fit the model."""

        def __init__(self, *args, num_virtual_tokens: int, **kwargs):
            self.num_virtual_tokens = num_virtual_tokens
            super().__init__(*args, **kwargs)

        @property
        def max_length(self) -> int:
            return super().max_length - self.num_virtual_tokens

    return QuietHFLM, PromptLearningHFLM


#: the batch size fedllm scores with on a CPU. lm-eval's ``"auto"`` probe is for GPU memory:
#: on a CPU nothing runs out, so it always settles on its upper bound (64) after five forward
#: passes of 64 copies of the longest request, which on SmolLM2-135M cost as much as scoring
#: all 300 documents of the three tasks; batches of 64 then pad and hold 64 x length x vocab
#: logits. In a forward-pass sweep on SmolLM2-135M (batch 1, 4, 8, 16), 16 read the most
#: tokens/s: 5-7x batch 1 (bench/README.md, "Evaluation").
CPU_BATCH_SIZE = 16
#: dtype names accepted by :func:`load_model_for_eval` (``"auto"``: see :func:`resolve_dtype`)
DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_device(device: Optional[str]) -> str:
    """``device``, or ``cuda`` when available, else ``cpu``."""
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def resolve_batch_size(batch_size, device: str):
    """The batch size lm-eval is handed: ``"auto"`` on a CPU is :data:`CPU_BATCH_SIZE`
    (lm-eval's probe only measures GPU memory); on a GPU, and any integer, as given."""
    if batch_size == "auto" and not str(device).startswith("cuda"):
        return CPU_BATCH_SIZE
    return batch_size


def resolve_dtype(dtype: str, device: str) -> str:
    """The weights' dtype: ``"auto"`` is ``bfloat16`` on a CPU with native bf16
    (:func:`cpu_has_native_bf16`), else the model's own (lm-eval's ``"auto"``); a name as given.

    On SmolLM2-135M, 100 documents each of HellaSwag, PIQA and WinoGrande, bf16 against
    fp32 moves HellaSwag acc by +1 document and WinoGrande acc by -1, the other metrics not
    at all; one standard error is ~5 documents (bench/README.md, "Evaluation").
    """
    if dtype not in DTYPES:
        raise FedllmError(f"evaluation dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if dtype == "auto" and not str(device).startswith("cuda") and cpu_has_native_bf16():
        return "bfloat16"
    return dtype


def hflm_settings(dtype: str) -> dict:
    """The ``HFLM`` arguments for weights of ``dtype``: with 16-bit weights the log-softmax
    over the vocabulary, and so each continuation's summed log-likelihood, is taken in
    fp32 (lm-eval's ``softmax_dtype``) instead of rounding every log-prob to 8 bits."""
    settings = {"dtype": dtype}
    if dtype in ("bfloat16", "float16"):
        settings["softmax_dtype"] = "float32"
    return settings


def load_model_for_eval(
    model_path: str | os.PathLike,
    adapter_path: str | os.PathLike | None = None,
    batch_size="auto",
    device: Optional[str] = None,
    dtype: str = "auto",
):
    """lm-eval's ``hf`` model (an ``HFLM``) for ``model_path`` with ``adapter_path`` applied.

    ``device`` defaults to ``cuda`` when available, else ``cpu``; ``batch_size`` is an
    int or ``"auto"`` (handed to lm-eval as is: it probes the largest batch that fits, up
    to 64; :func:`resolve_batch_size` is what ``evaluate_model`` hands it). ``dtype`` is
    one of :data:`DTYPES`, resolved by :func:`resolve_dtype`; the model's ``dtype``
    attribute says what it got. The same settings given to lm-eval's own
    ``HFLM(pretrained=..., **hflm_settings(dtype))`` give the same scores.
    """
    model_dir = check_model_dir(model_path)
    device = resolve_device(device)
    HFLM, PromptLearningHFLM = _hflm_classes()
    kwargs = dict(pretrained=str(model_dir), device=device, batch_size=batch_size, **hflm_settings(resolve_dtype(dtype, device)))
    if adapter_path is None:
        return HFLM(**kwargs)
    adapter_dir = Path(adapter_path)
    adapter = read_adapter_config(adapter_dir)
    check_adapter_fits(adapter_dir, adapter, model_dir)
    kwargs["peft"] = str(adapter_dir)
    try:
        if adapter["peft_type"] in PROMPT_LEARNING_TYPES:
            return PromptLearningHFLM(num_virtual_tokens=int(adapter["num_virtual_tokens"]), **kwargs)
        return HFLM(**kwargs)
    except (RuntimeError, ValueError, KeyError) as e:
        rephrased = rephrase_peft_error(e, adapter_dir, model_dir)
        if rephrased is None:
            raise
        raise rephrased from None
