"""The NVFlare client script: one site's federated training, on the Lightning
Client API.

NVFlare runs this file at each site (the simulator, a POC or production site
pod). It reads the site's partition and the run's base model from the run dir,
then loops: receive the global model, validate it on the site's validation
split, train ``steps_per_round`` steps, send the exchanged weights back.

    python client.py --run-dir RUN_DIR
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import nvflare.client.lightning as flare
import pytorch_lightning as pl
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.abstract.fl_model import MetaKey

from fedllm import events
from fedllm.config import load_config
from fedllm.data import load_partitions
from fedllm.train.model import load_tokenizer
from fedllm.train.module import tensor_bytes
from fedllm.train.site import SiteDataModule, build_module, make_trainer, set_threads, steps_per_round


class RoundReporter(pl.Callback):
    """Per round: what the site trained, at what speed, and the bytes exchanged.

    Runs before NVFlare's FLCallback sends the weights (callbacks added first run
    first), so it also sets the FedAvg weight the server will use.
    """

    def __init__(self, weight: float | None):
        self.weight = weight
        self._round_start = None

    def on_train_start(self, trainer, pl_module):
        self._round_start = (time.perf_counter(), pl_module.train_seconds, pl_module.train_tokens, trainer.global_step)

    def on_train_end(self, trainer, pl_module):
        wall0, secs0, toks0, step0 = self._round_start
        train_seconds = pl_module.train_seconds - secs0
        tokens = pl_module.train_tokens - toks0
        if self.weight is not None:
            # FedAvg weighs each update by NUM_STEPS_CURRENT_ROUND; for
            # "samples"/"uniform" weighting we report the weight there.
            pl_module.__fl_meta__ = {MetaKey.NUM_STEPS_CURRENT_ROUND: self.weight}
        events.emit(
            "round_end",
            file=pl_module.events_file,
            site=pl_module.site_name,
            round=pl_module.current_round,
            step=trainer.global_step,
            steps=trainer.global_step - step0,
            loss=float(pl_module._last_train_loss) if hasattr(pl_module, "_last_train_loss") else None,
            tokens_per_s=tokens / train_seconds if train_seconds > 0 else None,
            train_seconds=train_seconds,
            tokens=tokens,
            wall_seconds=time.perf_counter() - wall0,
            bytes_sent=tensor_bytes(pl_module.state_dict()),
            bytes_received=pl_module.bytes_received,
        )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-dir", required=True, help="the run directory fedllm prepared (config, data, base model)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)

    cfg = load_config(run_dir / "config.yaml")
    set_threads(cfg)
    flare.init()
    site = flare.get_site_name()
    partitions = load_partitions(run_dir / "data")
    base_dir = str(run_dir / "models" / "base")
    tokenizer = load_tokenizer(base_dir)
    data = SiteDataModule(cfg, tokenizer, partitions.train(site), partitions.val(site), seed_key=site)

    per_round = steps_per_round(cfg, data.num_train_examples)
    module = build_module(cfg, base_dir, total_steps=cfg.federation.rounds * per_round)
    module.site_name = site
    module.events_file = str(run_dir / "events" / f"site-{site}.jsonl")
    weight = {"samples": float(data.num_train_examples), "uniform": 1.0, "steps": None}[cfg.federation.weighting]

    trainer = make_trainer(cfg, max_steps=per_round)
    trainer.callbacks.append(RoundReporter(weight))
    # fedllm moves the step budget itself (below): NVFlare's own fit-loop update
    # adds the trainer's *estimated* total steps, which over-trains later rounds.
    flare.patch(trainer, update_fit_loop=False)
    events.emit("site_start", file=module.events_file, site=site, train_examples=data.num_train_examples,
                steps_per_round=per_round, exchanged_parameters=module.num_exchanged_parameters)

    while flare.is_running():
        input_model: FLModel = flare.receive()
        if input_model is None:
            break
        module.current_round = input_model.current_round
        trainer.validate(module, datamodule=data, verbose=False)
        trainer.fit_loop.epoch_loop.max_steps = trainer.global_step + per_round
        trainer.fit(module, datamodule=data)

    events.emit("site_end", file=module.events_file, site=site, step=trainer.global_step)


if __name__ == "__main__":
    main()
