"""The ``nemo`` training backend: a site's model built and sharded by NVIDIA NeMo AutoModel.

``training.backend: nemo`` swaps what builds a site's model, not what the site trains on or
what it exchanges. NeMo AutoModel (``NeMoAutoModelForCausalLM.from_pretrained``) builds the
base model with its own model code, applies its LoRA/DoRA (``method.name: lora``, with
``method.params.use_dora``) or trains every weight (``sft``), and, when a site runs
``training.processes_per_site`` > 1 processes, shards it with its FSDP2 (gloo on CPU, NCCL on
GPU). The site's data, prompt template, answer-only loss (:func:`fedllm.train.module.token_loss`),
optimizer, LR schedule, gradient clipping and step budget are the hf backend's, so the two
backends differ only in the model code and its sharding.

fedllm drives the steps itself rather than through NeMo's ``TrainFinetuneRecipeForNextTokenPrediction``:
that recipe owns its data loading, checkpointing and step scheduler for one uninterrupted run,
where a federated site trains a few steps per round from weights it receives.

What travels is the hf backend's contract, name for name (:class:`ExchangeNames`): the server,
its round-0 weights, aggregation, checkpoints and exported adapters are the same whichever
backend a site trains with.

NeMo AutoModel 0.7.0 calls CUDA-only functions where it only needs a device;
:func:`apply_cpu_guards` replaces them on a machine without CUDA, for that version only.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from fedllm import events
from fedllm.config import ExperimentConfig
from fedllm.errors import FedllmError

#: the NeMo AutoModel release the CPU guards (and the name mapping) were written against
NEMO_AUTOMODEL_VERSION = "0.7.0"
#: fedllm methods NeMo AutoModel implements (its PEFT is LoRA and DoRA only)
NEMO_METHODS = ("sft", "lora")
#: fedllm's LoRA parameters and NeMo's PeftConfig fields they become
LORA_PARAMS = {"r": "dim", "lora_alpha": "alpha", "lora_dropout": "dropout", "use_dora": "use_dora"}


def check_nemo_method(method_name: str, params: dict) -> None:
    """Refuse what NeMo AutoModel cannot train, naming the field and the hf backend."""
    if method_name not in NEMO_METHODS:
        raise FedllmError(
            f"config field 'method.name': {method_name!r} is not available with training.backend: nemo "
            f"(NeMo AutoModel trains {' and '.join(NEMO_METHODS)}, LoRA with use_dora for DoRA); "
            f"use training.backend: hf for {method_name}")
    if method_name == "lora":
        unknown = sorted(set(params) - set(LORA_PARAMS) - {"target_modules"})
        if unknown:
            raise FedllmError(
                f"config field 'method.params': {', '.join(unknown)} not available with training.backend: nemo "
                f"(NeMo AutoModel's LoRA takes {', '.join(sorted([*LORA_PARAMS, 'target_modules']))}); "
                "use training.backend: hf")


# -- CPU guards -------------------------------------------------------------------------------
_GUARDED = False


def apply_cpu_guards(installed: Optional[str] = None) -> None:
    """Let NeMo AutoModel build and train models on a machine without CUDA.

    0.7.0 asks ``torch.cuda.current_device()`` for an index to build a ``cuda`` device object
    with, calls ``torch.cuda.reset_peak_memory_stats()``, and hands ``apply_model_infrastructure``
    that ``cuda`` device to place the model on. Without CUDA: the index is 0, resetting the
    (absent) peak is a no-op, and the model is placed on the CPU. With CUDA nothing changes.
    Written for one version: another one raises, naming both, so the guards are revisited.
    ``installed``: the nemo-automodel version to check (default: the installed distribution's;
    not ``nemo_automodel.__version__``, which appends the git commit of the working directory).
    """
    global _GUARDED
    if _GUARDED or torch.cuda.is_available():
        return
    import importlib.metadata

    import nemo_automodel._transformers.auto_model as auto_model

    version = installed or importlib.metadata.version("nemo-automodel")
    if version != NEMO_AUTOMODEL_VERSION:
        raise RuntimeError(f"nemo-automodel {version}: fedllm.train.nemo's CPU guards were written for "
                           f"{NEMO_AUTOMODEL_VERSION}; check its CUDA-only calls again and update them")
    place_model = auto_model.apply_model_infrastructure

    @functools.wraps(place_model)
    def place_model_on_the_cpu(*args, **kwargs):
        kwargs["device"] = torch.device("cpu")
        return place_model(*args, **kwargs)

    torch.cuda.current_device = lambda: 0
    torch.cuda.reset_peak_memory_stats = lambda *args, **kwargs: None
    auto_model.apply_model_infrastructure = place_model_on_the_cpu
    _GUARDED = True


# -- processes of one site ----------------------------------------------------------------------
@dataclass(frozen=True)
class SiteProcesses:
    """This process's place among a site's ``training.processes_per_site`` processes (torchrun's
    ``RANK``/``WORLD_SIZE``); rank 0 talks to NVFlare and writes events."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> "SiteProcesses":
        return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))

    @property
    def sharded(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def start(self) -> None:
        """Join the site's process group (gloo on CPU, NCCL on GPU)."""
        if self.sharded and not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            torch.distributed.init_process_group(backend)

    def stop(self) -> None:
        if self.sharded and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def rows(self, batch: dict) -> dict:
        """This process's rows of a batch every process drew alike. A process left without a row
        gets the first one with no labelled token: it still runs the collective forward and backward."""
        if not self.sharded:
            return batch
        mine = {k: v[self.rank::self.world_size] for k, v in batch.items()}
        if mine["input_ids"].shape[0] == 0:
            mine = {k: v[:1] for k, v in batch.items()}
            mine["labels"] = torch.full_like(mine["labels"], -100)
        return mine

    def total(self, value: float) -> float:
        """The sum of ``value`` over the site's processes."""
        if not self.sharded:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t.item())

    def share(self, obj):
        """Rank 0's ``obj``, on every process."""
        if not self.sharded:
            return obj
        box = [obj if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


# -- the names that travel ------------------------------------------------------------------------
class ExchangeNames:
    """NeMo parameter names ↔ the hf backend's exchanged names (the round-0 weights' names).

    hf: ``CausalLMModule`` holds the model as ``model``; peft wraps it as ``base_model.model``
    and names its adapters ``lora_A.default.weight``, ``lora_magnitude_vector.default.weight``.
    NeMo keeps the HF module tree and names them ``lora_A.weight``, ``lora_magnitude``.
    """

    def __init__(self, peft: bool):
        self.peft = peft

    def to_exchanged(self, nemo_name: str) -> str:
        if not self.peft:
            return "model." + nemo_name
        module, _, leaf = nemo_name.rpartition(".")
        if leaf == "lora_magnitude":
            return f"model.base_model.model.{module}.lora_magnitude_vector.default.weight"
        owner, _, adapter = module.rpartition(".")
        if adapter in ("lora_A", "lora_B"):
            return f"model.base_model.model.{owner}.{adapter}.default.{leaf}"
        return "model.base_model.model." + nemo_name


def exchanged_names_of(initial_weights: str | os.PathLike) -> list[str]:
    """The exchanged names, in order, from the round-0 weights file's header (no tensor read)."""
    from fedllm.tensors import safetensors_header

    path = Path(initial_weights)
    if not path.is_file():
        raise FedllmError(f"{path}: the round-0 weights are missing; `fedllm partition` writes them")
    return list(safetensors_header(str(path))[0])


# -- the model ----------------------------------------------------------------------------------
class NemoSiteModel:
    """A site's model built by NeMo AutoModel, and the weights it exchanges by their hf names."""

    def __init__(self, cfg: ExperimentConfig, base_model_dir: str | os.PathLike, processes: SiteProcesses = SiteProcesses()):
        apply_cpu_guards()
        from nemo_automodel import NeMoAutoModelForCausalLM

        from fedllm.train.module import DTYPES
        from fedllm.train.site import PRECISION_DTYPE

        method = cfg.method.name
        check_nemo_method(method, cfg.method.params)
        self.processes = processes
        dtype = DTYPES[PRECISION_DTYPE[cfg.training.precision]]  # the weights', as the hf backend loads them
        self.exchange_dtype = DTYPES.get(cfg.federation.exchange_dtype or "")
        kwargs = {}
        if processes.sharded:
            from nemo_automodel.components.distributed.config import DistributedSetup, FSDP2Config
            from torch.distributed.fsdp import MixedPrecisionPolicy

            from fedllm.train.site import effective_precision

            # NeMo's FSDP2 computes in bf16 unless told otherwise; the site's precision decides, as
            # in one process (bf16-mixed: bf16 compute, fp32 weights and gradient reduction).
            compute = torch.bfloat16 if effective_precision(cfg).startswith("bf16") else dtype
            policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
            kwargs["distributed_setup"] = DistributedSetup.build(FSDP2Config(mp_policy=policy),
                                                                 world_size=processes.world_size)
        on_gpu = torch.cuda.is_available()
        torch.manual_seed(cfg.seed)  # NeMo's adapter init; sites then load the global adapters anyway
        self.model = NeMoAutoModelForCausalLM.from_pretrained(
            str(base_model_dir),
            peft_config=self._peft_config(cfg, base_model_dir) if method == "lora" else None,
            dtype=dtype,
            # Liger's kernels and NeMo's SDPA patching are GPU kernels
            use_liger_kernel=on_gpu, use_sdpa_patching=on_gpu,
            **kwargs,
        )
        self._parameters = [p for p in self.model.parameters() if p.requires_grad]
        names = ExchangeNames(peft=method != "sft")
        contract = exchanged_names_of(Path(base_model_dir) / _initial_weights_name())
        trainable = {n: names.to_exchanged(n) for n, p in self.model.named_parameters() if p.requires_grad}
        by_exchanged = {v: k for k, v in trainable.items()}
        missing = [n for n in contract if n not in by_exchanged]
        exchanged = set(contract)
        extra = [n for n, e in trainable.items() if e not in exchanged and not self._tied(n)]
        if missing or extra:
            raise FedllmError(
                f"training.backend nemo: NeMo AutoModel's {method} model does not train what the federation "
                f"exchanges: missing {missing[:3]}, not exchanged {extra[:3]} ({len(missing)}/{len(extra)})")
        self.exchanged = OrderedDict((name, by_exchanged[name]) for name in contract)  # hf name -> NeMo name

    def _tied(self, nemo_name: str) -> bool:
        config = getattr(self.model, "config", None)
        return nemo_name.endswith("lm_head.weight") and bool(getattr(config, "tie_word_embeddings", False))

    @staticmethod
    def _peft_config(cfg: ExperimentConfig, base_model_dir) -> "object":
        from nemo_automodel.components._peft.lora import PeftConfig

        from fedllm.train.methods import get_method

        params = {**get_method("lora").defaults, **cfg.method.params}
        targets = params.get("target_modules") or default_lora_targets(base_model_dir)
        if isinstance(targets, str):
            targets = [targets]
        return PeftConfig(target_modules=[f"*.{t}" for t in targets],
                          **{LORA_PARAMS[k]: v for k, v in params.items() if k in LORA_PARAMS})

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        """The trained parameters, as sharded by FSDP (taken once, when built: after a forward
        without gradients FSDP may leave the gathered, temporary ones registered in their place)."""
        return self._parameters

    @property
    def num_exchanged_parameters(self) -> int:
        named = dict(self.model.named_parameters())
        return sum(math.prod(named[n].shape) for n in self.exchanged.values())  # a shard's (DTensor's) shape is the whole one

    def exchanged_state_dict(self) -> "OrderedDict[str, torch.Tensor]":
        """The exchanged weights by their hf names, whole (gathered from every process when
        sharded; on rank 0 only), on the CPU, in the exchange dtype."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.processes.is_main:
            return OrderedDict()
        out = OrderedDict()
        for name, nemo_name in self.exchanged.items():
            value = state[nemo_name].detach()
            if self.exchange_dtype is not None and value.is_floating_point():
                value = value.to(self.exchange_dtype)
            out[name] = value.contiguous()
        return out

    def load_exchanged(self, state: Optional[dict]) -> None:
        """Load the exchanged weights (by hf names; rank 0's ``state`` goes to every process)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if self.processes.is_main:
            missing = [n for n in self.exchanged if n not in state]
            unexpected = [n for n in state if n not in self.exchanged]
            if missing or unexpected:
                raise FedllmError(f"exchanged weights do not match this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
            dtypes = {n: p.dtype for n, p in self.model.named_parameters()}
            nemo_state = {self.exchanged[n]: v.to(dtypes[self.exchanged[n]]) for n, v in state.items()}
        else:
            nemo_state = {}
        set_model_state_dict(self.model, nemo_state, options=StateDictOptions(
            full_state_dict=True, strict=False, broadcast_from_rank0=self.processes.sharded))


def _initial_weights_name() -> str:
    from fedllm.rundir import INITIAL_WEIGHTS

    return INITIAL_WEIGHTS


def default_lora_targets(base_model_dir) -> list[str]:
    """The modules peft adapts by default for this model family (what the hf backend adapts)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    model_type = json.loads((Path(base_model_dir) / "config.json").read_text()).get("model_type")
    targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    if not targets:
        raise FedllmError(f"config field 'method.params.target_modules': peft has no default LoRA modules for "
                          f"model type {model_type!r}; name them")
    return list(targets)


# -- the steps ----------------------------------------------------------------------------------
class NemoTrainer:
    """fedllm's training loop around a :class:`NemoSiteModel`: the hf backend's AdamW, LR
    schedule, gradient accumulation and clipping, answer-only loss and precision."""

    def __init__(self, cfg: ExperimentConfig, site_model: NemoSiteModel, total_steps: int,
                 site_name: Optional[str], events_file: Optional[str]):
        from fedllm.train.module import lr_factor
        from fedllm.train.site import effective_precision, train_args

        self.cfg, self.site_model, self.processes = cfg, site_model, site_model.processes
        self.site_name, self.events_file = site_name, events_file
        args = train_args(cfg, total_steps)
        self.optimizer = torch.optim.AdamW(site_model.parameters, lr=args["lr"], betas=tuple(args["adam_betas"]),
                                           weight_decay=args["weight_decay"])
        self.schedule = lr_factor(args)
        self.base_lr = args["lr"]
        self.log_every = int(args.get("log_every", 10))
        precision = effective_precision(cfg)
        self.autocast = torch.bfloat16 if precision == "bf16-mixed" else torch.float16 if precision == "16-mixed" else None
        self.global_step = 0
        self.current_round: Optional[int] = None
        self.train_tokens, self.train_seconds = 0, 0.0
        self.last_train_loss: Optional[float] = None
        # FedProx (set by the client script): mu/2·‖w − w_global‖² joins the loss, as on the hf backend.
        self.proximal = None

    def restart_optimizer(self) -> None:
        """A fresh optimizer (FedAvg restarts it every round, as the hf backend's sites do): no
        moments, no step count."""
        self.optimizer.state.clear()

    def _emit(self, event: str, **fields) -> None:
        if self.processes.is_main:
            events.emit(event, file=self.events_file, site=self.site_name, round=self.current_round, **fields)

    def _context(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=self.autocast)

    def _to_device(self, batch: dict) -> dict:
        device = next(iter(self.site_model.parameters)).device
        return {k: v.to(device) for k, v in batch.items()}

    def loss_terms(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        from fedllm.train.module import token_loss

        with self._context():
            return token_loss(self.site_model.model, self._to_device(self.processes.rows(batch)),
                              whole_forward=self.processes.sharded)

    def train(self, batches: Iterator[dict], steps: int) -> None:
        """``steps`` optimizer steps from ``batches`` (every process draws the same batches)."""
        model, t = self.site_model.model, self.cfg.training
        model.train()
        for _ in range(steps):
            started = time.perf_counter()
            for group in self.optimizer.param_groups:
                group["lr"] = self.base_lr * self.schedule(self.global_step)
            micro = [next(batches) for _ in range(t.grad_accumulation)]
            loss_sum_total, tokens = 0.0, 0
            for batch in micro:
                loss_sum, count = self.loss_terms(batch)
                labelled = self.processes.total(int(count))
                # The mean over the labelled tokens of the whole batch, on every process alike: FSDP
                # averages gradients over processes, hence × world size.
                scale = self.processes.world_size / max(labelled, 1) / t.grad_accumulation
                loss = loss_sum * scale
                if self.proximal is not None:
                    loss = loss + self.proximal(model) / t.grad_accumulation
                loss.backward()
                loss_sum_total += self.processes.total(float(loss_sum.detach())) / max(labelled, 1) / t.grad_accumulation
                tokens += int(self.processes.total(int(batch["attention_mask"].sum())) / self.processes.world_size)
            if t.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.site_model.parameters, t.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.train_seconds += time.perf_counter() - started
            self.train_tokens += tokens
            self.global_step += 1
            self.last_train_loss = loss_sum_total
            if self.global_step % self.log_every == 0:
                self._emit("train", step=self.global_step, loss=loss_sum_total, tokens_per_s=self.tokens_per_second,
                           lr=self.optimizer.param_groups[0]["lr"])

    @property
    def tokens_per_second(self) -> Optional[float]:
        return self.train_tokens / self.train_seconds if self.train_seconds > 0 else None

    @torch.no_grad()
    def validate(self, batches) -> tuple[float, int]:
        """Token-mean loss over ``batches`` and the labelled tokens (a ``validate`` event)."""
        self.site_model.model.eval()
        loss_sum, count = 0.0, 0
        for batch in batches:
            s, c = self.loss_terms(batch)
            loss_sum += float(s)
            count += int(c)
        loss_sum, count = self.processes.total(loss_sum), int(self.processes.total(count))
        loss = loss_sum / max(count, 1)
        self._emit("validate", step=self.global_step, loss=loss, tokens=count)
        return loss, count


def endless(loader) -> Iterator[dict]:
    """Batches from ``loader`` pass after pass (each pass asks its sampler for a new order)."""
    while True:
        yield from loader


def export_as_hf(cfg: ExperimentConfig, base_model_dir: str, weights: dict, out_dir: str | os.PathLike, tokenizer):
    """Write the trained weights the way the hf backend exports (an HF model dir for SFT, a
    peft adapter dir for LoRA): the hf module loads them by their exchanged names. Returns
    what ``CausalLMModule.export`` returns, and that module."""
    from fedllm.train.site import build_module

    module = build_module(cfg, base_model_dir, total_steps=1, compile=False)
    module.load_state_dict(weights)
    return module.export(str(out_dir), tokenizer=tokenizer), module


def train_alone(cfg: ExperimentConfig, base_model_dir: str, setting: str, train: Sequence, combined_val: Sequence,
                out_dir: str | os.PathLike, rounds_budget: int, events_file: Optional[str] = None,
                scorer=None, base_val_loss: Optional[float] = None) -> dict:
    """A site alone or centralized with the nemo backend: the hf backend's ``train_alone``
    contract (budget, validation cadence on the combined set, summary entry, exported model),
    starting from the federation's round-0 weights. ``scorer``: the task metric of the exported
    model, once, after the last step (the hf backend also scores every round's worth of steps)."""
    from fedllm.train.methods import get_method
    from fedllm.train.model import load_tokenizer
    from fedllm.tensors import read_safetensors
    from fedllm.train.site import SiteDataModule, autocast_dtype, set_threads, steps_per_round

    set_threads(cfg)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(base_model_dir)
    data = SiteDataModule(cfg, tokenizer, train, combined_val, seed_key=setting)
    total = rounds_budget * steps_per_round(cfg, data.num_train_examples)
    site_model = NemoSiteModel(cfg, base_model_dir)
    site_model.load_exchanged(read_safetensors(str(Path(base_model_dir) / _initial_weights_name())))
    trainer = NemoTrainer(cfg, site_model, total, setting, events_file)
    events.emit("setting_start", file=events_file, site=setting, steps=total, train_examples=len(train))
    started = time.perf_counter()
    curve: list[list[float]] = []
    if base_val_loss is not None and get_method(cfg.method.name).starts_as_base:
        curve.append([0, base_val_loss])
    else:
        curve.append([0, trainer.validate(data.val_dataloader())[0]])
    batches = endless(data.train_dataloader())
    every = max(cfg.training.val_check_steps, 1)
    while trainer.global_step < total:
        trainer.train(batches, min(every, total - trainer.global_step))
        curve.append([trainer.global_step, trainer.validate(data.val_dataloader())[0]])
    seconds = time.perf_counter() - started
    exported, module = export_as_hf(cfg, base_model_dir, site_model.exchanged_state_dict(), out_dir, tokenizer)
    result = {
        "val_loss": curve[-1][1],
        "val_loss_curve": curve,
        "train_tokens_per_s": trainer.tokens_per_second,
        "train_seconds": trainer.train_seconds,
        "seconds": seconds,
        "steps": trainer.global_step,
        "train_examples": len(train),
        "backend": "nemo",
        **exported,
    }
    if scorer is not None:
        final = scorer.score(module.model, autocast_dtype=autocast_dtype(cfg))
        point = {"round": rounds_budget, "step": trainer.global_step, "accuracy": final["accuracy"], "macro_f1": final["macro_f1"]}
        result["task_scores"] = {"curve": [point], "final": final}
        events.emit("task_metric", file=events_file, site=setting, step=trainer.global_step,
                    accuracy=final["accuracy"], macro_f1=final["macro_f1"])
    events.emit("setting_end", file=events_file, site=setting, step=trainer.global_step, loss=result["val_loss"],
                tokens_per_s=result["train_tokens_per_s"])
    return result
