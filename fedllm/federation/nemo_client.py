"""The NVFlare client script of a site with ``training.backend: nemo``, on NVFlare's Client API.

The hf backend's site (fedllm.federation.client) on Lightning's Client API; this one on the
plain one (``flare.receive()`` / ``flare.send()``), since NeMo AutoModel has no Lightning
trainer. Each round it does what that site does, with the same events and results: load the
global weights, validate them on the site's validation split (the metrics the server weighs
and keeps), train ``steps_per_round`` steps from a fresh optimizer, the LR schedule where the
round starts and the data order seeded by (seed, site, round), and send the exchanged weights
by their hf names with the site's FedAvg weight.

With ``training.processes_per_site`` N > 1 NVFlare launches it under ``torchrun`` with N
processes sharing the site's model (FSDP2): rank 0 talks to NVFlare and writes the events, and
every process trains its share of each batch.

    python -m fedllm.federation.nemo_client --run-dir RUN_DIR
"""

from __future__ import annotations

import argparse
import time

import torch

from fedllm import events
from fedllm.config import load_config
from fedllm.data import load_partitions
from fedllm.federation.algorithms import fedprox_mu
from fedllm.federation.client import RoundDataModule, round_seed
from fedllm.rundir import RunDir
from fedllm.tensors import tensor_bytes
from fedllm.train.model import load_tokenizer
from fedllm.train.proximal import ProximalTerm
from fedllm.train.nemo import NemoSiteModel, NemoTrainer, SiteProcesses, endless
from fedllm.train.site import set_threads, steps_per_round


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-dir", required=True, help="the run directory fedllm prepared (config, data, base model)")
    parser.add_argument("job_copy", nargs="?", help=argparse.SUPPRESS)  # see fedllm.federation.client
    args = parser.parse_args(argv)
    run_dir = RunDir(args.run_dir)
    cfg = load_config(run_dir.config)
    set_threads(cfg)
    processes = SiteProcesses.from_env()
    if processes.sharded:  # the site's share of the cores, split among its processes
        torch.set_num_threads(max(1, torch.get_num_threads() // processes.world_size))
    processes.start()
    flare = None
    if processes.is_main:
        import nvflare.client as flare
        from nvflare.app_common.abstract.fl_model import MetaKey

        from fedllm.tracking import stream_site_metrics

        flare.init()
        stream_site_metrics(cfg.tracking)
    site = processes.share(flare.get_site_name() if flare else None)

    partitions = load_partitions(run_dir.data)
    base_dir = str(run_dir.base_model)
    tokenizer = load_tokenizer(base_dir)
    current = {"round": None}
    data = RoundDataModule(cfg, tokenizer, partitions.train(site), partitions.val(site), site=site,
                           round_of=lambda: current["round"])
    per_round = steps_per_round(cfg, data.num_train_examples)
    site_model = NemoSiteModel(cfg, base_dir, processes)
    events_file = str(run_dir.site_events(site))
    trainer = NemoTrainer(cfg, site_model, cfg.federation.rounds * per_round, site, events_file)
    mu = fedprox_mu(cfg.federation)
    if mu > 0:  # FedProx; with mu = 0 nothing is added and the site trains as under FedAvg
        trainer.proximal = ProximalTerm(mu)
    weight = {"samples": float(data.num_train_examples), "uniform": 1.0, "steps": float(per_round)}[cfg.federation.weighting]
    if processes.is_main:
        events.emit("site_start", file=events_file, site=site, train_examples=data.num_train_examples,
                    steps_per_round=per_round, exchanged_parameters=site_model.num_exchanged_parameters,
                    backend="nemo", processes=processes.world_size)

    while True:
        received = None
        if processes.is_main:
            received = flare.receive() if flare.is_running() else None
        round_number = processes.share(None if received is None else int(received.current_round or 0))
        if round_number is None:
            break
        current["round"] = trainer.current_round = round_number
        site_model.load_exchanged(received.params if processes.is_main else None)
        val_loss, val_tokens = trainer.validate(data.val_dataloader())

        wall0, secs0, toks0 = time.perf_counter(), trainer.train_seconds, trainer.train_tokens
        trainer.global_step = round_number * per_round  # a resumed job's site reports the same steps
        trainer.restart_optimizer()
        torch.manual_seed(round_seed(cfg.seed, site, round_number))
        if trainer.proximal is not None:
            trainer.proximal.start_round(site_model.model)
        trainer.train(endless(data.train_dataloader()), per_round)
        sent = site_model.exchanged_state_dict()
        if processes.is_main:
            train_seconds, tokens = trainer.train_seconds - secs0, trainer.train_tokens - toks0
            events.emit("round_end", file=events_file, site=site, round=round_number, step=trainer.global_step,
                        steps=per_round, loss=trainer.last_train_loss,
                        tokens_per_s=tokens / train_seconds if train_seconds > 0 else None,
                        train_seconds=train_seconds, tokens=tokens, wall_seconds=time.perf_counter() - wall0,
                        bytes_sent=tensor_bytes(sent), bytes_received=tensor_bytes(received.params))
            flare.send(flare.FLModel(params=sent, params_type=flare.ParamsType.FULL,
                                     metrics={"val_loss": val_loss, "val_tokens": float(val_tokens)},
                                     meta={MetaKey.NUM_STEPS_CURRENT_ROUND: weight}))

    if processes.is_main:
        events.emit("site_end", file=events_file, site=site, step=trainer.global_step)
    processes.stop()


if __name__ == "__main__":
    main()
