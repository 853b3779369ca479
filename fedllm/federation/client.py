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
import warnings
import zlib

import nvflare.client.lightning as flare
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.abstract.fl_model import MetaKey

from fedllm import events
from fedllm.config import load_config
from fedllm.data import load_partitions
from fedllm.federation.algorithms import fedprox_mu
from fedllm.rundir import RunDir
from fedllm.tensors import tensor_bytes
from fedllm.tracking import stream_site_metrics
from fedllm.train.model import load_tokenizer
from fedllm.train.dataset import collate
from fedllm.train.proximal import ProximalTerm
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


class RoundStart(pl.Callback):
    """Makes a site's round a function of (global model, seed, site, round) only.

    FedAvg restarts the local optimizer every round (``flare.patch(...,
    restore_state=False)``), the LR schedule stands where the round starts
    (``round * steps_per_round``), the data order is seeded by (seed, site,
    round) (see :class:`RoundOrder`) and so is torch's RNG (dropout). So a site process that starts
    at round k — after a crash, ``fedllm federate --resume`` — trains exactly as
    the one that ran rounds 0..k-1 would have.
    """

    def __init__(self, seed: int, site: str, steps_per_round: int):
        self.seed, self.site, self.steps_per_round = seed, site, steps_per_round

    def on_train_start(self, trainer, pl_module):
        torch.manual_seed(round_seed(self.seed, self.site, pl_module.current_round))
        first_step = int(pl_module.current_round or 0) * self.steps_per_round
        for config in trainer.lr_scheduler_configs:
            # A fresh LambdaLR sits at step 0; put it where this round starts.
            config.scheduler.last_epoch = first_step - 1
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "step() before optimizer.step()": intended
                config.scheduler.step()


def round_seed(seed: int, site: str, round_number) -> int:
    return zlib.crc32(f"{seed}/{site}/{round_number}".encode())


class RoundOrder(torch.utils.data.Sampler):
    """The order of a site's training rows: the k-th pass over them in round r is
    a permutation seeded by (seed, site, r, k), whatever the process has done
    before. (A DataLoader's own generator is also drawn from each time an
    iterator is made, which Lightning does a different number of times in a
    process's first ``fit``; this sampler is advanced only by passes it yields.)
    """

    def __init__(self, num_rows: int, seed: int, site: str, round_of):
        self.num_rows, self.seed, self.site, self.round_of = num_rows, seed, site, round_of
        self._round, self._passes = None, 0

    def __len__(self) -> int:
        return self.num_rows

    def __iter__(self):
        current = self.round_of()
        if current != self._round:
            self._round, self._passes = current, 0
        generator = torch.Generator()
        generator.manual_seed(round_seed(self.seed, self.site, current) + self._passes)
        self._passes += 1
        yield from torch.randperm(self.num_rows, generator=generator).tolist()


class RoundDataModule(SiteDataModule):
    """A site's data, shuffled by :class:`RoundOrder`."""

    def __init__(self, *args, site: str, round_of, **kwargs):
        super().__init__(*args, seed_key=site, **kwargs)
        self.order = RoundOrder(len(self.train_set), self.cfg.seed, site, round_of)

    def train_dataloader(self):
        t = self.cfg.training
        return DataLoader(self.train_set, batch_size=t.micro_batch_size, sampler=self.order,
                          collate_fn=collate(self.tokenizer.pad_token_id), num_workers=0)


def start_at_round(trainer, round_number: int, steps_per_round: int) -> None:
    """Set the trainer's step count to where ``round_number`` starts: a site
    process started by a resumed job reports the same steps as an unbroken one."""
    # Lightning keeps the count in its loop progress (what a checkpoint restores).
    progress = trainer.fit_loop.epoch_loop.automatic_optimization.optim_progress
    progress.optimizer.step.total.completed = round_number * steps_per_round
    progress.optimizer.step.total.ready = round_number * steps_per_round


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-dir", required=True, help="the run directory fedllm prepared (config, data, base model)")
    # NVFlare appends the job's copy of this script to the launch command; the site runs
    # the installed module instead (fedllm.federation.tuning.site_process_settings).
    parser.add_argument("job_copy", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    run_dir = RunDir(args.run_dir)

    cfg = load_config(run_dir.config)
    set_threads(cfg)
    flare.init()
    stream_site_metrics(cfg.tracking)  # tracking: this site's metrics to the server's receivers
    site = flare.get_site_name()
    partitions = load_partitions(run_dir.data)
    base_dir = str(run_dir.base_model)
    tokenizer = load_tokenizer(base_dir)
    # The module is built below; the data asks it for the round only while training.
    data = RoundDataModule(cfg, tokenizer, partitions.train(site), partitions.val(site), site=site,
                           round_of=lambda: module.current_round)

    per_round = steps_per_round(cfg, data.num_train_examples)
    module = build_module(cfg, base_dir, total_steps=cfg.federation.rounds * per_round)
    module.site_name = site
    module.events_file = str(run_dir.site_events(site))
    mu = fedprox_mu(cfg.federation)
    if mu > 0:  # FedProx; with mu = 0 nothing is added and the site trains as under FedAvg
        module.proximal = ProximalTerm(mu)
    weight = {"samples": float(data.num_train_examples), "uniform": 1.0, "steps": None}[cfg.federation.weighting]

    trainer = make_trainer(cfg, max_steps=per_round)
    trainer.callbacks.append(RoundReporter(weight))
    trainer.callbacks.append(RoundStart(cfg.seed, site, per_round))
    # fedllm moves the step budget itself (below): NVFlare's own fit-loop update
    # adds the trainer's *estimated* total steps, which over-trains later rounds.
    # No RestoreState: each round's optimizer starts fresh (see RoundStart).
    flare.patch(trainer, restore_state=False, update_fit_loop=False)
    events.emit("site_start", file=module.events_file, site=site, train_examples=data.num_train_examples,
                steps_per_round=per_round, exchanged_parameters=module.num_exchanged_parameters)

    while flare.is_running():
        input_model: FLModel = flare.receive()
        if input_model is None:
            break
        module.current_round = input_model.current_round
        if trainer.global_step != (input_model.current_round or 0) * per_round:
            start_at_round(trainer, input_model.current_round or 0, per_round)
        trainer.validate(module, datamodule=data, verbose=False)
        trainer.fit_loop.epoch_loop.max_steps = trainer.global_step + per_round
        trainer.fit(module, datamodule=data)

    events.emit("site_end", file=module.events_file, site=site, step=trainer.global_step)


if __name__ == "__main__":
    main()
