"""Server-side persistence of the global model, every round.

fedllm's server holds one copy of the global model (fedllm.federation.memory): this
persistor builds no model. Round 0's weights are read from the file ``fedllm prepare``
wrote beside the base model (``RunDir.initial_weights``: the exchanged weights, in the
exchange dtype), with plain reads into the tensors the controller then sends, aggregates
into and hands back here. After each aggregation it writes ``<checkpoint_dir>/round-<k>/``
(``fedllm.rundir``) from those same tensors: the exchanged weights as safetensors (written
from the tensors' own memory, no serialized copy), a small ``meta.json`` (round, bytes, time)
and a ``MANIFEST.json`` (files, sizes, sha256, round, config hash), then uploads the folder
to the run's store when one is given (``fedllm.artifacts``). NVFlare's own workspace
checkpoint (``FL_global_model.pt``) is not written: the rounds are the checkpoints. It also
keeps the best global model by the sites' validation loss, and on a resumed job starts from
a persisted round's weights, checked against its manifest. Each round's ``global_model``
event carries the process's peak resident memory during that round (``server_peak_rss``).
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
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey, make_model_learnable
from nvflare.app_common.abstract.model_persistor import ModelPersistor
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType

from fedllm import events
from fedllm.errors import FedllmError
from fedllm.federation.memory import (
    collect_garbage_every,
    current_rss,
    peak_rss_since_reset,
    return_large_frees_to_the_os,
)
from fedllm.rundir import ROUND_META, ROUND_SERVER_OPTIMIZER, ROUND_WEIGHTS, round_key, round_name
from fedllm.tensors import read_safetensors, tensor_bytes

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


class RoundCheckpointPersistor(ModelPersistor):
    """Loads the federation's global model from a file and keeps every round's.

    Args:
        initial_weights: the round-0 weights, a safetensors file of the exchanged weights
            (``RunDir.initial_weights``, written by ``fedllm prepare``).
        checkpoint_dir: where ``round-<k>/`` folders go (the run dir's
            ``federation/rounds``).
        events_file: the server's structured event log.
        store: the run's store URI (``s3://bucket/prefix`` or a path); every round
            is uploaded to ``<store>/federation/rounds/round-<k>/``. "" for none.
        config_hash: the experiment config's fingerprint, recorded in every manifest.
        resume_round: start from round ``resume_round``'s persisted global model
            (fetched from the store when given, verified by its manifest); 0 starts
            from ``initial_weights``.

    Constructor arguments are kept as same-named attributes: NVFlare's Job API
    re-creates the component from them.
    """

    def __init__(self, initial_weights: str, checkpoint_dir: str, events_file: str = "", store: str = "",
                 config_hash: str = "", resume_round: int = 0):
        super().__init__()
        from nvflare.app_opt.pt.decomposers import TensorDecomposer
        from nvflare.fuel.utils import fobs

        fobs.register(TensorDecomposer)  # the global model travels as torch tensors
        self.initial_weights = initial_weights
        self.checkpoint_dir = checkpoint_dir
        self.events_file = events_file
        self.store = store
        self.config_hash = config_hash
        self.resume_round = resume_round
        # resident memory when the current round's peak measurement began (None: the job's start)
        self._rss_before_round = None

    def load_model(self, fl_ctx: FLContext) -> ModelLearnable:
        from fedllm.federation.sending import bound_the_send_cache, receive_updates_a_few_at_a_time

        # In the process that sends the global model and receives the updates: what is in
        # flight to and from the sites is bounded, not grown with their number
        # (fedllm.federation.sending); in a server job's own process, per-tensor buffers go
        # back to the OS when freed and garbage is collected every 2 s (fedllm.federation.memory).
        # Not in the simulator, whose server shares the process of the driver, which also trains.
        bound_the_send_cache()
        receive_updates_a_few_at_a_time()
        if _in_server_job_process():
            return_large_frees_to_the_os()
            collect_garbage_every()
        meta = {}
        if not self.resume_round:
            path = Path(self.initial_weights)
            if not path.is_file():
                raise FedllmError(
                    f"{path}: the federation's round-0 weights are missing; `fedllm prepare` writes them beside the base model"
                )
            weights = read_safetensors(str(path))
        else:
            from fedllm.artifacts import fetch_round

            fetch_round(Path(self.checkpoint_dir), self.store or None, self.resume_round)
            weights = read_safetensors(str(round_dir(self.checkpoint_dir, self.resume_round) / ROUND_WEIGHTS))
            server_optimizer = load_server_optimizer(self.checkpoint_dir, self.resume_round)
            if server_optimizer is not None:
                # for FedOpt's controller, which takes it out of the meta before round 1 is sent
                meta[SERVER_OPTIMIZER_STATE] = server_optimizer
        events.emit("job_start", file=self.events_file or None, site="server", round=self.resume_round)
        return make_model_learnable(weights, meta)

    def get_model_inventory(self, fl_ctx: FLContext) -> dict:
        return {}  # the rounds are under the run dir, not in NVFlare's inventory

    def handle_event(self, event: str, fl_ctx: FLContext):
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
        # The round's peak (aggregation, this save and upload included), then the next round's
        # measurement starts from what the process holds now (the global model, once).
        peak, per_round = peak_rss_since_reset()
        memory = {}
        if peak is not None:
            memory = {"server_peak_rss": peak, "server_peak_rss_scope": "round" if per_round else "job",
                      "server_rss_before_round": self._rss_before_round}
            self._rss_before_round = current_rss() if per_round else None
        events.emit("global_model", file=self.events_file or None, site="server", round=completed, bytes=nbytes,
                    **taken, **memory)


def _in_server_job_process() -> bool:
    """Whether this is an NVFlare server job's own process (POC, production), as NVFlare
    launches it: ``python -m nvflare.private.fed.app.server.runner_process``."""
    import sys

    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", "") == "nvflare.private.fed.app.server.runner_process"
