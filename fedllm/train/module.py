"""The Lightning module every setting trains: a site, the centralized baseline,
and (as an nn.Module holding the global weights) the NVFlare server.

What travels between a site and the server is this module's ``state_dict()``:
it is overridden to hold only the *exchanged* weights — every weight for SFT,
only the trainable adapter / prompt weights for PEFT — so NVFlare's Lightning
API (which sends ``pl_module.state_dict()``) moves adapters only.

The constructor's arguments are stored as same-named attributes: NVFlare's Job
API rebuilds the server's initial model from them.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from typing import Any, Optional

import pytorch_lightning as pl
import torch

from fedllm import events
from fedllm.tensors import tensor_bytes
from fedllm.train.methods import ParameterCount, apply_method, count_parameters, get_method
from fedllm.train.proximal import ProximalTerm
from fedllm.train.model import load_causal_lm

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


#: model families whose causal-LM forward is exactly ``output_layer(decoder(inputs))``: no
#: logit scaling or soft-capping after the head, so the head may run on chosen positions only
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neo", "gpt_neox", "phi3", "starcoder2"})


def decoder_and_head(model):
    """``(decoder, output layer)`` of an HF causal LM (or a peft model wrapping one with
    LoRA / IA3), when its logits are just the output layer applied to the decoder's last
    hidden states; else ``None``.

    The vocabulary projection is a large part of a small model's compute (SmolLM2:
    49k x 576 per position) and answer-only loss scores a few positions per row, so
    callers that need logits at a few positions run the decoder and project only those.
    Prompt-learning adapters prepend virtual tokens inside peft's own forward: ``None``.
    """
    peft_config = getattr(model, "peft_config", None)
    if peft_config and any(getattr(c, "is_prompt_learning", False) for c in peft_config.values()):
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(getattr(base, "config", None), "model_type", None) not in PLAIN_HEAD_MODEL_TYPES:
        return None
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    if decoder is None or head is None or decoder is base:
        return None
    return decoder, head


def token_loss(model, batch: dict, whole_forward: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over the labelled tokens, and their count.

    Where the model allows (:func:`decoder_and_head`) only the labelled positions go
    through the output layer; the result equals the full forward's. Prompt-learning PEFT
    models prepend virtual tokens to the sequence; their logits are dropped so positions
    line up with the real tokens. ``whole_forward``: always through the model's own
    forward (an FSDP-sharded model gathers its root weights there, not in its decoder's).
    """
    input_ids, labels = batch["input_ids"], batch["labels"]
    shift_labels = labels[:, 1:]
    labelled = shift_labels != -100
    split = None if whole_forward else decoder_and_head(model)
    if split is not None:
        decoder, head = split
        hidden = decoder(input_ids=input_ids, attention_mask=batch["attention_mask"]).last_hidden_state
        shift_logits = head(hidden[:, :-1][labelled]).float()
        targets = shift_labels[labelled]
    else:
        out = model(input_ids=input_ids, attention_mask=batch["attention_mask"])
        logits = out.logits
        if logits.shape[1] > input_ids.shape[1]:
            logits = logits[:, -input_ids.shape[1]:]
        shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
        targets = shift_labels.reshape(-1)
    loss_sum = torch.nn.functional.cross_entropy(shift_logits, targets, ignore_index=-100, reduction="sum")
    return loss_sum, labelled.sum()


def lr_factor(train_args: dict):
    """The LR schedule as ``step -> factor`` of the base LR: linear warmup over ``warmup_steps``,
    then constant or cosine down to ``min_lr`` at ``total_steps`` (every backend's schedule)."""
    total = max(int(train_args.get("total_steps", 1)), 1)
    warmup = int(train_args.get("warmup_steps", 0))
    base_lr, min_lr = float(train_args.get("lr", 5e-4)), float(train_args.get("min_lr", 0.0))
    cosine = train_args.get("lr_schedule", "constant") == "cosine"

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if not cosine:
            return 1.0
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return (min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))) / base_lr

    return factor


class CausalLMModule(pl.LightningModule):
    """A base causal LM with the experiment's method applied.

    Args:
        model_dir: HF directory of the run's base model (identical everywhere).
        method: ``sft``, ``lora``, ``ptuning``, ``prompt_tuning`` or ``ia3``.
        method_params: peft parameters (see fedllm.train.methods).
        train_args: optimizer/schedule settings (lr, weight_decay, adam_betas,
            lr_schedule, warmup_steps, min_lr, total_steps, fused_optimizer).
        dtype: weights' dtype when loaded (``float32``, ``bfloat16``).
        exchange_dtype: the dtype ``state_dict()`` hands floating weights over in
            (``federation.exchange_dtype``); None: their own.
    """

    def __init__(
        self,
        model_dir: str,
        method: str = "lora",
        method_params: Optional[dict] = None,
        train_args: Optional[dict] = None,
        dtype: str = "float32",
        exchange_dtype: Optional[str] = None,
    ):
        super().__init__()
        self.model_dir = model_dir
        self.method = method
        self.method_params = dict(method_params or {})
        self.train_args = dict(train_args or {})
        self.dtype_name = dtype
        self.exchange_dtype = exchange_dtype
        torch.manual_seed(int(self.train_args.get("seed", 1234)))  # adapters' init: same on every site
        base = load_causal_lm(model_dir, dtype=DTYPES[dtype])
        self.model = apply_method(base, method, self.method_params)
        self.exchanged_keys = frozenset("model." + n for n, p in self.model.named_parameters() if p.requires_grad)
        # Set by whoever drives training (the NVFlare client script, a baseline):
        self.site_name: Optional[str] = None
        self.current_round: Optional[int] = None
        self.events_file: Optional[str] = None
        self.log_every = int(self.train_args.get("log_every", 10))
        # FedProx (set by the NVFlare client script): mu/2·‖w − w_global‖² joins the loss.
        self.proximal: Optional[ProximalTerm] = None
        self._reset_meters()

    # -- what travels ------------------------------------------------------
    def state_dict(self, *args, **kwargs):
        full = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        sent = DTYPES[self.exchange_dtype] if self.exchange_dtype else None
        return OrderedDict(
            (k, v.to(sent) if sent is not None and v.is_floating_point() else v)
            for k, v in full.items() if k[len(prefix):] in self.exchanged_keys
        )

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        state = OrderedDict((k, v if isinstance(v, torch.Tensor) else torch.as_tensor(v)) for k, v in state_dict.items())
        missing = sorted(self.exchanged_keys - set(state))
        unexpected = sorted(set(state) - self.exchanged_keys)
        if strict and (missing or unexpected):
            raise RuntimeError(
                f"exchanged weights do not match this model: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        super().load_state_dict(state, strict=False, assign=assign)
        self.bytes_received = tensor_bytes(state)
        # Report against the exchanged weights only: the frozen base is never sent.
        return torch.nn.modules.module._IncompatibleKeys(missing, unexpected)

    @property
    def parameter_count(self) -> ParameterCount:
        return count_parameters(self.model, self.method)

    @property
    def num_exchanged_parameters(self) -> int:
        return self.parameter_count.trainable

    # -- training ------------------------------------------------------------
    def _reset_meters(self):
        self.train_tokens = 0
        self.train_seconds = 0.0
        self._batch_started = None
        self._val_sum = 0.0
        self._val_count = 0
        self.bytes_received = 0
        self.last_val_loss: Optional[float] = None
        self.last_val_tokens = 0

    def on_train_start(self):
        # NVFlare's callback has loaded this round's global weights by now (callbacks' hooks
        # run before the module's): they are what the proximal term pulls towards.
        if self.proximal is not None:
            self.proximal.start_round(self.model)

    def training_step(self, batch, batch_idx):
        loss_sum, count = token_loss(self.model, batch)
        loss = loss_sum / count.clamp(min=1)
        self._last_train_loss = loss.detach()  # the task's loss: comparable across algorithms
        if self.proximal is not None:
            loss = loss + self.proximal(self.model)
        return loss

    def on_train_batch_start(self, batch, batch_idx):
        self._batch_started = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self._batch_started is not None:
            self.train_seconds += time.perf_counter() - self._batch_started
        self.train_tokens += int(batch["attention_mask"].sum())
        step = self.trainer.global_step
        if step % self.log_every == 0 and (batch_idx + 1) % max(self.trainer.accumulate_grad_batches, 1) == 0:
            events.emit(
                "train",
                file=self.events_file,
                site=self.site_name,
                round=self.current_round,
                step=step,
                loss=float(self._last_train_loss),
                tokens_per_s=self.tokens_per_second,
                lr=self.trainer.optimizers[0].param_groups[0]["lr"] if self.trainer.optimizers else None,
            )

    @property
    def tokens_per_second(self) -> Optional[float]:
        return self.train_tokens / self.train_seconds if self.train_seconds > 0 else None

    # -- validation: token-weighted mean loss ---------------------------------
    def on_validation_epoch_start(self):
        self._val_sum, self._val_count = 0.0, 0

    def validation_step(self, batch, batch_idx):
        loss_sum, count = token_loss(self.model, batch)
        self._val_sum += float(loss_sum)
        self._val_count += int(count)

    def on_validation_epoch_end(self):
        loss = self._val_sum / max(self._val_count, 1)
        self.last_val_loss, self.last_val_tokens = loss, self._val_count
        # Sent to the server as metrics by NVFlare's Lightning API; the token
        # count lets the driver combine sites' losses into the combined-set loss.
        self.log("val_loss", loss, prog_bar=False, logger=False)
        self.log("val_tokens", float(self._val_count), prog_bar=False, logger=False)
        events.emit(
            "validate",
            file=self.events_file,
            site=self.site_name,
            round=self.current_round,
            step=self.trainer.global_step if self.trainer else None,
            loss=loss,
            tokens=self._val_count,
        )

    # -- optimizer -------------------------------------------------------------
    def configure_optimizers(self):
        a = self.train_args
        params = [p for p in self.model.parameters() if p.requires_grad]
        kwargs: dict[str, Any] = dict(lr=a.get("lr", 5e-4), betas=tuple(a.get("adam_betas", (0.9, 0.98))), weight_decay=a.get("weight_decay", 0.01))
        if a.get("fused_optimizer") and torch.cuda.is_available():
            kwargs["fused"] = True
        optimizer = torch.optim.AdamW(params, **kwargs)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(a))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- export ------------------------------------------------------------------
    def export(self, out_dir: str, tokenizer=None) -> dict:
        """Write a loadable HF directory: full weights for SFT, the adapter for PEFT.

        Returns ``{"model_dir": ..., "adapter_dir": ...}``: for PEFT the model dir
        is the base model and the adapter dir holds ``adapter_config.json`` +
        weights (``PeftModel.from_pretrained(base, adapter_dir)`` loads it).
        """
        if get_method(self.method).is_peft:
            self.model.save_pretrained(out_dir)
            return {"model_dir": self.model_dir, "adapter_dir": str(out_dir)}
        self.model.save_pretrained(out_dir, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
        return {"model_dir": str(out_dir), "adapter_dir": None}
