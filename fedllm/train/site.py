"""A site's training, used by every setting.

The NVFlare client script, the site-alone baselines and the centralized
baseline all build their module, data and trainer here, so "each site alone"
and "FedAvg" differ only in whether weights are averaged between rounds.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

import pytorch_lightning as pl
import torch

from fedllm import events
from fedllm.config import ExperimentConfig
from fedllm.data.records import Example
from fedllm.errors import FedllmError
from fedllm.hardware import cpu_has_native_bf16
from fedllm.train.dataset import PackedExamples, TokenizedExamples, make_loader
from fedllm.train.methods import get_method
from fedllm.train.model import load_tokenizer
from fedllm.train.module import CausalLMModule

PRECISION_DTYPE = {"32-true": "float32", "bf16-mixed": "float32", "16-mixed": "float32", "bf16-true": "bfloat16"}
#: variable the simulator sets for its sites: torch threads each site process may use
SITE_THREADS_ENV = "FEDLLM_SITE_THREADS"


def quiet_training_logs() -> None:
    """Silence Lightning's info banners and the known-harmless warnings of training, for
    the rest of the process; called when a module or trainer is built, never on import.

    Lightning's banners ("GPU available", tips) would drown the structured event lines
    that `kubectl logs` shows; its warnings and errors still come through. Calling it
    again changes nothing.
    """
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*(LeafSpec|is_gradient_checkpointing|does not have many workers|limit_val_batches).*")


def effective_precision(cfg: ExperimentConfig) -> str:
    """The Lightning precision this machine trains with: the config's on a GPU; on a
    CPU, bf16 only where the CPU has it, fp16 never (CPU autocast has no fp16 path
    worth taking), fp32 otherwise."""
    precision = cfg.training.precision
    if torch.cuda.is_available() or precision == "32-true":
        return precision
    if precision.startswith("bf16") and cpu_has_native_bf16():
        return precision
    return "32-true"


def autocast_dtype(cfg: ExperimentConfig):
    """The dtype scoring runs under autocast with (None: plain fp32), matching training."""
    precision = effective_precision(cfg)
    if precision.startswith("bf16"):
        return torch.bfloat16
    return torch.float16 if precision == "16-mixed" else None


class SiteDataModule(pl.LightningDataModule):
    """A site's train and validation batches, tokenized once."""

    def __init__(self, cfg: ExperimentConfig, tokenizer, train: Sequence[Example], val: Sequence[Example], seed_key: str = ""):
        super().__init__()
        t = cfg.training
        self.cfg, self.tokenizer = cfg, tokenizer
        self.train_set = TokenizedExamples(train, tokenizer, cfg.data.template, t.max_seq_length, t.answer_only_loss)
        if t.pack_sequences:
            self.train_set = PackedExamples(self.train_set, t.max_seq_length)
        self.val_set = TokenizedExamples(val, tokenizer, cfg.data.template, t.max_seq_length, t.answer_only_loss)
        for name, given, kept in (("training", train, self.train_set), ("validation", val, self.val_set)):
            if given and not len(kept):
                raise FedllmError(
                    f"config field 'training.max_seq_length': {seed_key or 'site'}: all {len(given)} {name} examples "
                    f"lose their whole answer at {t.max_seq_length} tokens (the prompt fills the window); raise it"
                )
        self.seed = cfg.seed + sum(map(ord, seed_key))  # each site shuffles differently, reproducibly
        self.num_train_examples = len(train)

    def train_dataloader(self):
        return make_loader(self.train_set, self.cfg.training.micro_batch_size, self.tokenizer.pad_token_id, shuffle=True, seed=self.seed)

    def val_dataloader(self):
        return make_loader(self.val_set, self.cfg.training.val_batch_size, self.tokenizer.pad_token_id, shuffle=False)


def steps_per_round(cfg: ExperimentConfig, num_train_rows: int) -> int:
    """Optimizer steps a site takes per round: given, or from epochs (capped)."""
    t = cfg.training
    if t.steps_per_round is not None:
        return t.steps_per_round
    batches = math.ceil(num_train_rows / t.micro_batch_size)
    steps = max(1, math.ceil(t.epochs_per_round * batches / t.grad_accumulation))
    return min(steps, t.max_steps_per_round) if t.max_steps_per_round else steps


def train_args(cfg: ExperimentConfig, total_steps: int) -> dict:
    t = cfg.training
    return {
        "lr": t.lr,
        "weight_decay": t.weight_decay,
        "adam_betas": list(t.adam_betas),
        "lr_schedule": t.lr_schedule,
        "warmup_steps": t.warmup_steps,
        "min_lr": t.min_lr,
        "total_steps": total_steps,
        "fused_optimizer": t.fused_optimizer,
        "seed": cfg.seed,
    }


def build_module(cfg: ExperimentConfig, base_model_dir: str, total_steps: int, compile: bool = True) -> CausalLMModule:
    """The module a site trains; ``compile=False`` leaves out ``training.compile`` (for a
    module only read, whose state dict keys must stay the exchanged names)."""
    quiet_training_logs()  # peft warns about gradient checkpointing while it wraps the model
    module = CausalLMModule(
        model_dir=str(base_model_dir),
        method=cfg.method.name,
        method_params=cfg.method.params,
        train_args=train_args(cfg, total_steps),
        dtype=PRECISION_DTYPE[cfg.training.precision],
        exchange_dtype=cfg.federation.exchange_dtype,
    )
    if compile and cfg.training.compile:
        module.model = torch.compile(module.model)
    return module


def write_initial_weights(cfg: ExperimentConfig, base_model_dir: str | os.PathLike, path: str | os.PathLike) -> int:
    """Write the federation's round-0 weights to ``path``: the exchanged weights (an
    adapter's initialisation for PEFT, every weight for full fine-tuning) of the module
    every site builds, in the exchange dtype. The server reads them instead of building a
    model (fedllm.federation.persistor). Returns their bytes."""
    from safetensors.torch import save_file

    from fedllm.tensors import tensor_bytes

    weights = build_module(cfg, str(base_model_dir), total_steps=1, compile=False).state_dict()
    weights = {name: value.contiguous() for name, value in weights.items()}
    tmp = Path(str(path) + ".tmp")
    save_file(weights, str(tmp))
    os.replace(tmp, path)
    return tensor_bytes(weights)


def make_trainer(cfg: ExperimentConfig, max_steps: int, val_every: Optional[int] = None, progress: bool = False) -> pl.Trainer:
    """One trainer recipe for every setting; validation only when asked."""
    quiet_training_logs()
    t = cfg.training
    kwargs = dict(
        max_steps=max_steps,
        max_epochs=-1,
        accelerator="auto",
        devices=1,
        precision=effective_precision(cfg),
        gradient_clip_val=t.grad_clip or None,
        accumulate_grad_batches=t.grad_accumulation,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=False,
    )
    if val_every:
        kwargs.update(val_check_interval=val_every * t.grad_accumulation, check_val_every_n_epoch=None)
    else:
        kwargs.update(limit_val_batches=1.0, check_val_every_n_epoch=None, val_check_interval=10**9)
    return pl.Trainer(**kwargs)


def set_threads(cfg: ExperimentConfig) -> None:
    """torch's intra-op threads: ``training.num_threads``, else what the simulator
    allots each site (``$FEDLLM_SITE_THREADS``: its sites share this machine's cores,
    and processes that each take every core run several times slower together than
    apart), else torch's default (all cores)."""
    threads = cfg.training.num_threads or int(os.environ.get(SITE_THREADS_ENV, "0") or 0)
    if threads:
        torch.set_num_threads(threads)


class TaskCurve(pl.Callback):
    """The task metric of the model being trained every ``steps_per_round`` optimizer
    steps (the points where a FedAvg round would end), and after the last step."""

    def __init__(self, scorer, steps_per_round: int, dtype=None):
        self.scorer, self.steps_per_round, self.dtype = scorer, steps_per_round, dtype
        self.curve: list[dict] = []
        self.last: Optional[dict] = None

    def score(self, pl_module, step: int) -> None:
        if self.curve and self.curve[-1]["step"] == step:
            return
        result = self.scorer.score(pl_module.model, autocast_dtype=self.dtype)
        self.curve.append({"round": math.ceil(step / self.steps_per_round), "step": step,
                           "accuracy": result["accuracy"], "macro_f1": result["macro_f1"]})
        self.last = result
        events.emit("task_metric", file=pl_module.events_file, site=pl_module.site_name, step=step,
                    accuracy=result["accuracy"], macro_f1=result["macro_f1"])

    # Scored as the next batch starts, before the module starts its batch clock: the
    # scoring time does not count as training time (tokens/s stays the training speed).
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        if step and step % self.steps_per_round == 0:
            self.score(pl_module, step)

    def on_train_end(self, trainer, pl_module):
        self.score(pl_module, trainer.global_step)


class CurveRecorder(pl.Callback):
    """(step, loss) after every validation: the setting's validation curve."""

    def __init__(self):
        self.curve: list[list[float]] = []

    def on_validation_end(self, trainer, pl_module):
        if pl_module.last_val_loss is not None:
            step = trainer.global_step
            if self.curve and self.curve[-1][0] == step:
                self.curve[-1] = [step, pl_module.last_val_loss]
            else:
                self.curve.append([step, pl_module.last_val_loss])


def train_alone(
    cfg: ExperimentConfig,
    base_model_dir: str,
    setting: str,
    train: Sequence[Example],
    combined_val: Sequence[Example],
    out_dir: str | os.PathLike,
    rounds_budget: int,
    events_file: Optional[str] = None,
    progress: bool = False,
    scorer=None,
    base_val_loss: Optional[float] = None,
) -> dict:
    """Train one non-federated setting (a site alone, or centralized) with the
    same budget one site gets over all FedAvg rounds; validate on the combined
    validation set every ``training.val_check_steps``; export the final model.

    ``scorer`` (a fedllm.evaluate.task_metric scorer): the task metric after every
    round's worth of steps, as ``result["task_scores"]`` = ``{"curve", "final"}``.
    ``base_val_loss``: the base model's loss on ``combined_val``, when known; a method
    that starts as the base model (``Method.starts_as_base``) then begins its curve with
    it instead of validating the same model again.

    Returns the setting's summary entry (see summary.json in the README).
    """
    if cfg.training.backend == "nemo":
        from fedllm.train import nemo

        return nemo.train_alone(cfg, base_model_dir, setting, train, combined_val, out_dir, rounds_budget,
                                events_file=events_file, scorer=scorer, base_val_loss=base_val_loss)
    set_threads(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    tokenizer = load_tokenizer(base_model_dir)
    data = SiteDataModule(cfg, tokenizer, train, combined_val, seed_key=setting)
    total = rounds_budget * steps_per_round(cfg, data.num_train_examples)
    module = build_module(cfg, base_model_dir, total)
    module.site_name, module.events_file = setting, events_file
    recorder = CurveRecorder()
    trainer = make_trainer(cfg, total, val_every=cfg.training.val_check_steps, progress=progress)
    trainer.callbacks.append(recorder)
    task_curve = None
    if scorer is not None:
        task_curve = TaskCurve(scorer, steps_per_round(cfg, data.num_train_examples), autocast_dtype(cfg))
        trainer.callbacks.append(task_curve)
    events.emit("setting_start", file=events_file, site=setting, steps=total, train_examples=len(train))
    started = time.perf_counter()
    if base_val_loss is not None and get_method(cfg.method.name).starts_as_base:
        recorder.curve.append([0, base_val_loss])
    else:
        trainer.validate(module, datamodule=data, verbose=False)
    trainer.fit(module, datamodule=data)
    if not recorder.curve or recorder.curve[-1][0] != trainer.global_step:
        trainer.validate(module, datamodule=data, verbose=False)
    seconds = time.perf_counter() - started
    exported = module.export(str(out_dir), tokenizer=tokenizer)
    result = {
        "val_loss": recorder.curve[-1][1],
        "val_loss_curve": recorder.curve,
        "train_tokens_per_s": module.tokens_per_second,
        "train_seconds": module.train_seconds,
        "seconds": seconds,
        "steps": trainer.global_step,
        "train_examples": len(train),
        **exported,
    }
    if task_curve is not None:
        result["task_scores"] = {"curve": task_curve.curve, "final": task_curve.last}
    events.emit("setting_end", file=events_file, site=setting, step=trainer.global_step, loss=result["val_loss"], tokens_per_s=result["train_tokens_per_s"])
    return result


def evaluate_loss(cfg: ExperimentConfig, module: CausalLMModule, tokenizer, val: Sequence[Example]) -> float:
    """Token-mean loss of ``module`` on ``val`` (used for the base model and the
    final global model)."""
    data = SiteDataModule(cfg, tokenizer, [], val)
    trainer = make_trainer(cfg, max_steps=1)
    trainer.validate(module, dataloaders=data.val_dataloader(), verbose=False)
    return module.last_val_loss
