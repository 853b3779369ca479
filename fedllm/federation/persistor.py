"""Server-side persistence of the global model, every round.

NVFlare's PTFileModelPersistor keeps only the latest global model inside the
server's job workspace. fedllm also needs every round's global weights under
the run dir (the FedAvg validation curve, resume, export), so this persistor
writes ``<checkpoint_dir>/round-<k>/`` (``fedllm.rundir``) after each aggregation:
the exchanged weights as safetensors, a small ``meta.json`` (round, bytes, time) and a
``MANIFEST.json`` (files, sizes, sha256, round, config hash), then uploads the
folder to the run's store when one is given (``fedllm.artifacts``). It also
keeps the best global model by the sites' validation loss, and on a resumed
job starts from a persisted round's weights, checked against its manifest.
With ``federation.lora_aggregation=product_svd`` each round also gets a
``lora_aggregation`` event (round, factor_error, svd_error) from the aggregator's meta.
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
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor

from fedllm import events
from fedllm.rundir import ROUND_META, ROUND_SERVER_OPTIMIZER, ROUND_WEIGHTS, round_key, round_name
from fedllm.tensors import tensor_bytes

#: the global model's meta key under which FedOpt's controller (fedllm.federation.fedopt) hands
#: its optimizer's state to this persistor with a round's weights, and gets it back when a job
#: resumes from that round; persisted as the round's ``server_optimizer.safetensors``
SERVER_OPTIMIZER_STATE = "fedllm_server_optimizer_state"


def round_dir(checkpoint_dir: str | os.PathLike, round_number: int) -> Path:
    return Path(checkpoint_dir) / round_name(round_number)


def save_round(checkpoint_dir: str | os.PathLike, round_number: int, weights: dict, meta: dict,
               server_optimizer: dict | None = None) -> Path:
    """Write one round's exchanged weights atomically (temp dir + rename), with a
    MANIFEST.json whose meta is ``meta``; ``server_optimizer``: FedOpt's optimizer state
    (name → tensor), written beside them and covered by the same manifest."""
    from safetensors.torch import save_file

    from fedllm.artifacts import write_local_manifest

    final = round_dir(checkpoint_dir, round_number)
    tmp = final.with_name(final.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v if isinstance(v, torch.Tensor) else torch.as_tensor(v)).contiguous().cpu() for k, v in weights.items()}
    save_file(tensors, str(tmp / ROUND_WEIGHTS))
    if server_optimizer is not None:
        save_file({k: v.contiguous().cpu() for k, v in server_optimizer.items()}, str(tmp / ROUND_SERVER_OPTIMIZER))
    (tmp / ROUND_META).write_text(json.dumps(meta, indent=2))
    write_local_manifest(tmp, meta)
    if final.exists():
        import shutil

        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def load_round(checkpoint_dir: str | os.PathLike, round_number: int) -> dict:
    from safetensors.torch import load_file

    return load_file(str(round_dir(checkpoint_dir, round_number) / ROUND_WEIGHTS))


def load_server_optimizer(checkpoint_dir: str | os.PathLike, round_number: int) -> dict | None:
    """FedOpt's optimizer state persisted with round ``round_number``; None when the round has none."""
    from safetensors.torch import load_file

    path = round_dir(checkpoint_dir, round_number) / ROUND_SERVER_OPTIMIZER
    return load_file(str(path)) if path.is_file() else None


class RoundCheckpointPersistor(PTFileModelPersistor):
    """PTFileModelPersistor that also keeps every round's global model.

    Args:
        model: ``{"path": "fedllm.train.module.CausalLMModule", "args": {...}}`` —
            the server rebuilds the initial global model from it.
        checkpoint_dir: where ``round-<k>/`` folders go (the run dir's
            ``federation/rounds``).
        events_file: the server's structured event log.
        store: the run's store URI (``s3://bucket/prefix`` or a path); every round
            is uploaded to ``<store>/federation/rounds/round-<k>/``. "" for none.
        config_hash: the experiment config's fingerprint, recorded in every manifest.
        resume_round: start from round ``resume_round``'s persisted global model
            (fetched from the store when given, verified by its manifest); 0 starts
            from the base model.

    Constructor arguments are kept as same-named attributes: NVFlare's Job API
    re-creates the component from them.
    """

    def __init__(self, model: dict, checkpoint_dir: str, events_file: str = "", store: str = "",
                 config_hash: str = "", resume_round: int = 0):
        super().__init__(model=model, allow_numpy_conversion=False)
        self.checkpoint_dir = checkpoint_dir
        self.events_file = events_file
        self.store = store
        self.config_hash = config_hash
        self.resume_round = resume_round

    def load_model(self, fl_ctx: FLContext) -> ModelLearnable:
        if not self.resume_round:
            learnable = super().load_model(fl_ctx)
        else:
            from nvflare.app_opt.pt.model_persistence_format_manager import PTModelPersistenceFormatManager

            from fedllm.artifacts import fetch_round

            fetch_round(Path(self.checkpoint_dir), self.store or None, self.resume_round)
            self.persistence_manager = PTModelPersistenceFormatManager(
                load_round(self.checkpoint_dir, self.resume_round), allow_numpy_conversion=False
            )
            learnable = self.persistence_manager.to_model_learnable(self.exclude_vars)
            server_optimizer = load_server_optimizer(self.checkpoint_dir, self.resume_round)
            if server_optimizer is not None:
                # for FedOpt's controller, which takes it out of the meta before round 1 is sent
                learnable[ModelLearnableKey.META] = {**(learnable.get(ModelLearnableKey.META) or {}),
                                                     SERVER_OPTIMIZER_STATE: server_optimizer}
        events.emit("job_start", file=self.events_file or None, site="server", round=self.resume_round)
        return learnable

    def handle_event(self, event: str, fl_ctx: FLContext):
        super().handle_event(event, fl_ctx)
        if event == AppEventType.AFTER_AGGREGATION:
            self._record_best(fl_ctx)

    def _record_best(self, fl_ctx: FLContext) -> None:
        # The sites validate the global model they receive before training, so the
        # aggregated val_loss of round r (0-based) scores the model persisted as
        # round-r; round 0's is the base model, not a federation output.
        from fedllm.artifacts import record_best

        result = fl_ctx.get_prop(AppConstants.AGGREGATION_RESULT)
        current = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        metrics = getattr(result, "metrics", None) or {}
        if not current or "val_loss" not in metrics:
            return
        if record_best(self.store or None, Path(self.checkpoint_dir), int(current), float(metrics["val_loss"]), self.config_hash):
            events.emit("best_model", file=self.events_file or None, site="server", round=int(current),
                        val_loss=float(metrics["val_loss"]))

    def save_model(self, ml: ModelLearnable, fl_ctx: FLContext):
        # FedOpt's optimizer state goes to the round's folder, not into NVFlare's own checkpoint.
        server_optimizer = (ml.get(ModelLearnableKey.META) or {}).pop(SERVER_OPTIMIZER_STATE, None)
        super().save_model(ml, fl_ctx)
        current = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        completed = int(current) + 1 if current is not None else 0
        weights = ml[ModelLearnableKey.WEIGHTS]
        nbytes = tensor_bytes(weights)
        meta = {"round": completed, "bytes": nbytes, "saved_at": time.time(), "config_hash": self.config_hash}
        folder = save_round(self.checkpoint_dir, completed, weights, meta, server_optimizer=server_optimizer)
        if self.store:
            from fedllm.store import open_store

            open_store(self.store).put_dir(folder, round_key(completed), meta=meta)
        # The aggregator's LoRA diagnostic rides in the aggregated model's meta, which
        # NVFlare's FedAvg hands to the persistor with the weights.
        lora = (ml.get(ModelLearnableKey.META) or {}).get("lora_aggregation")
        if isinstance(lora, dict):
            events.emit("lora_aggregation", file=self.events_file or None, site="server", round=completed,
                        method=lora.get("method"), modules=lora.get("modules"),
                        factor_error=lora.get("factor_error"), svd_error=lora.get("svd_error"))
        # Who made this round (fedllm.federation.participation, .aggregation): the sites
        # aggregated, those whose update was rejected and those lost, with why.
        taken = {key: value for key, value in (ml.get(ModelLearnableKey.META) or {}).items()
                 if key in ("aggregated_sites", "rejected_sites", "lost_sites")}
        events.emit("global_model", file=self.events_file or None, site="server", round=completed, bytes=nbytes,
                    **taken)
