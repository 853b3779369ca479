"""The reference every benchmark compares with: a plain PyTorch + Hugging Face training loop.

No Lightning, no NVFlare: the run's base model (``models/base``) with the run's method
applied by peft, the site's training rows tokenized by fedllm's dataset code (so both sides
see the same tokens), ``model(**batch).loss`` (Hugging Face's own shifted cross-entropy),
AdamW with the run's settings, gradient clipping, ``steps`` optimizer steps.

Timing matches what a fedllm site reports per round (``train_seconds`` in its ``round_end``
event): from the start of a batch's forward pass to the end of its optimizer step; loading
the next batch is outside it. ``wall_seconds`` is the whole loop, data loading included.
One untimed forward/backward pass warms the process up first, as a site's validation does.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from fedllm.config import ExperimentConfig


def plain_train(cfg: ExperimentConfig, run_dir: str | Path, site: str, steps: int, precision: str | None = None) -> dict:
    """Train ``steps`` steps on ``site``'s training rows; return tokens, seconds and tokens/s.

    ``precision``: ``None`` trains in the precision a fedllm site trains in on this machine
    (``fedllm.train.site.effective_precision``: the config's on a GPU; on a CPU bf16 only
    where the CPU has it, else fp32). ``"bf16-mixed"`` runs the forward pass (and the loss)
    under ``torch.autocast(device, dtype=torch.bfloat16)`` with fp32 weights, gradients and
    optimizer, the backward pass outside it: what Lightning's ``bf16-mixed`` does, on a GPU
    and on a CPU alike.
    """
    from fedllm.data import load_partitions
    from fedllm.train.dataset import PackedExamples, TokenizedExamples, make_loader
    from fedllm.train.methods import apply_method
    from fedllm.train.model import load_causal_lm, load_tokenizer
    from fedllm.train.module import DTYPES
    from fedllm.train.site import PRECISION_DTYPE, effective_precision, set_threads

    t = cfg.training
    set_threads(cfg)
    torch.manual_seed(cfg.seed)
    run_dir = Path(run_dir)
    base = run_dir / "models" / "base"
    tokenizer = load_tokenizer(base)
    rows = load_partitions(run_dir / "data").train(site)
    data = TokenizedExamples(rows, tokenizer, cfg.data.template, t.max_seq_length, t.answer_only_loss)
    if t.pack_sequences:
        data = PackedExamples(data, t.max_seq_length)
    loader = make_loader(data, t.micro_batch_size, tokenizer.pad_token_id, shuffle=True, seed=cfg.seed)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = apply_method(load_causal_lm(base, dtype=DTYPES[PRECISION_DTYPE[t.precision]]), cfg.method.name, dict(cfg.method.params))
    model.to(device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay)
    precision = precision or effective_precision(cfg)
    if precision == "16-mixed":
        raise ValueError("plain_train: 16-mixed needs a gradient scaler, which this loop does not have")

    def forward_loss(batch):
        if precision == "bf16-mixed":
            with torch.autocast(device, dtype=torch.bfloat16):
                return model(**batch).loss
        return model(**batch).loss

    # One untimed forward/backward first (gradients dropped, weights untouched): a fedllm
    # site validates the received model before it trains, so its first timed step runs
    # warm; without this the plain loop alone would pay the process's one-time costs.
    warm = {k: v.to(device) for k, v in next(iter(loader)).items()}
    forward_loss(warm).backward()
    optimizer.zero_grad(set_to_none=True)

    tokens, train_seconds, done = 0, 0.0, 0
    started = time.perf_counter()
    while done < steps:
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            step_started = time.perf_counter()
            loss = forward_loss(batch)
            loss.backward()
            if t.grad_clip:
                torch.nn.utils.clip_grad_norm_(trainable, t.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            train_seconds += time.perf_counter() - step_started
            tokens += int(batch["attention_mask"].sum())
            done += 1
            if done == steps:
                break
    wall_seconds = time.perf_counter() - started
    return {
        "steps": done,
        "tokens": tokens,
        "train_seconds": train_seconds,
        "wall_seconds": wall_seconds,
        "tokens_per_s": tokens / train_seconds,
        "wall_tokens_per_s": tokens / wall_seconds,
        "final_loss": float(loss.detach()),
        "precision": precision,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in trainable),
    }
