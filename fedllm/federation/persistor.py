"""Server-side persistence of the global model, every round.

NVFlare's PTFileModelPersistor keeps only the latest global model inside the
server's job workspace. fedllm also needs every round's global weights under
the run dir (the FedAvg validation curve, resume, export), so this persistor
writes ``<checkpoint_dir>/round-<k>/exchanged.safetensors`` after each
aggregation, with a small ``meta.json`` (round, bytes, time).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor

from fedllm import events


def round_dir(checkpoint_dir: str | os.PathLike, round_number: int) -> Path:
    return Path(checkpoint_dir) / f"round-{round_number:03d}"


def save_round(checkpoint_dir: str | os.PathLike, round_number: int, weights: dict, meta: dict) -> Path:
    """Write one round's exchanged weights atomically (temp dir + rename)."""
    from safetensors.torch import save_file

    final = round_dir(checkpoint_dir, round_number)
    tmp = final.with_name(final.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v if isinstance(v, torch.Tensor) else torch.as_tensor(v)).contiguous().cpu() for k, v in weights.items()}
    save_file(tensors, str(tmp / "exchanged.safetensors"))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    if final.exists():
        import shutil

        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def load_round(checkpoint_dir: str | os.PathLike, round_number: int) -> dict:
    from safetensors.torch import load_file

    return load_file(str(round_dir(checkpoint_dir, round_number) / "exchanged.safetensors"))


class RoundCheckpointPersistor(PTFileModelPersistor):
    """PTFileModelPersistor that also keeps every round's global model.

    Args:
        model: ``{"path": "fedllm.train.module.CausalLMModule", "args": {...}}`` —
            the server rebuilds the initial global model from it.
        checkpoint_dir: where ``round-<k>/`` folders go (the run dir's
            ``federation/rounds``).
        events_file: the server's structured event log.
    """

    def __init__(self, model: dict, checkpoint_dir: str, events_file: str = ""):
        super().__init__(model=model, allow_numpy_conversion=False)
        self.checkpoint_dir = checkpoint_dir
        self.events_file = events_file

    def load_model(self, fl_ctx: FLContext) -> ModelLearnable:
        learnable = super().load_model(fl_ctx)
        events.emit("job_start", file=self.events_file or None, site="server", round=0)
        return learnable

    def save_model(self, ml: ModelLearnable, fl_ctx: FLContext):
        super().save_model(ml, fl_ctx)
        current = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        completed = int(current) + 1 if current is not None else 0
        weights = ml[ModelLearnableKey.WEIGHTS]
        nbytes = sum(int(v.numel() * v.element_size()) if isinstance(v, torch.Tensor) else int(v.nbytes) for v in weights.values())
        save_round(self.checkpoint_dir, completed, weights, {"round": completed, "bytes": nbytes, "saved_at": time.time()})
        events.emit("global_model", file=self.events_file or None, site="server", round=completed, bytes=nbytes)
