"""The whole experiment, top to bottom: the steps every face of fedllm calls.

    prepare_run      config → run dir: resolved config, partitions, base model
    run_federation   FedAvg in NVFlare's simulator            → settings/fedavg.json
    run_baseline     one site alone, or centralized             → settings/<setting>.json
    score_base       the untouched base model                   → settings/base.json
    write_summary    settings/*.json → summary.json (written last, atomically)
    run_experiment   all of the above, in order (``fedllm run``)

A run dir without summary.json is incomplete: summary.json is removed when a
run starts and written only when every setting has finished.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

from fedllm import events
from fedllm.config import ExperimentConfig, dump_config, load_config
from fedllm.errors import FedllmError

SUMMARY = "summary.json"


def setting_file(run_dir: Path, setting: str) -> Path:
    return Path(run_dir) / "settings" / (setting.replace(":", "-") + ".json")


def write_json_atomic(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def describe_model(cfg: ExperimentConfig, base_dir: Path) -> dict:
    from fedllm.train.module import CausalLMModule

    probe = CausalLMModule(str(base_dir), cfg.method.name, cfg.method.params)
    if cfg.model.source == "tiny":
        t = cfg.model.tiny
        text = (
            f"tiny {t.architecture}, {t.num_layers} layers x {t.hidden_size} hidden, random init, "
            f"tokenizer trained on this run's data"
        )
    else:
        text = cfg.model.source
    return {
        "source": cfg.model.source,
        "description": text,
        "parameters": probe.num_parameters,
        "trainable_parameters": probe.num_exchanged_parameters,
    }


def prepare_run(cfg: ExperimentConfig, run_dir: str | os.PathLike) -> Path:
    """Make the run dir every later step reads: config.yaml, data/, models/base.

    The base model of a ``tiny`` config is built here, its tokenizer trained on
    the run's own training text.
    """
    from fedllm.data import format_example, prepare_partitions
    from fedllm.train.model import prepare_base_model

    run = Path(run_dir).resolve()
    run.mkdir(parents=True, exist_ok=True)
    (run / SUMMARY).unlink(missing_ok=True)
    dump_config(cfg, run / "config.yaml")
    parts = prepare_partitions(cfg, run / "data")
    texts = None
    if cfg.model.source == "tiny":
        texts = ["".join(format_example(e, cfg.data.template)) for e in parts.pooled_train()]
    prepare_base_model(cfg.model, run / "models" / "base", texts, seed=cfg.seed)
    write_json_atomic(run / "model.json", describe_model(cfg, run / "models" / "base"))
    events.emit("prepared", site="driver", sites=len(parts.sites), run_dir=str(run))
    return run


def load_run(run_dir: str | os.PathLike) -> tuple[Path, ExperimentConfig]:
    run = Path(run_dir).resolve()
    if not (run / "config.yaml").is_file() or not (run / "data" / "partition.json").is_file():
        raise FedllmError(f"{run}: not a prepared run dir (run `fedllm partition CONFIG --out {run}` first)")
    return run, load_config(run / "config.yaml")


def run_federation(run_dir: str | os.PathLike) -> dict:
    from fedllm.federation.federate import federate

    run, cfg = load_run(run_dir)
    result = federate(cfg, run)
    write_json_atomic(setting_file(run, "fedavg"), result)
    return result


def run_baseline(run_dir: str | os.PathLike, setting: str, progress: bool = False) -> dict:
    """``site:<name>`` trains on that site's data alone; ``centralized`` on every
    site's pooled training data. Both get the budget one site gets over all
    FedAvg rounds and are scored on the combined validation set."""
    from fedllm.data import load_partitions
    from fedllm.train.site import train_alone

    run, cfg = load_run(run_dir)
    parts = load_partitions(run / "data")
    if setting == "centralized":
        train = parts.pooled_train()
    elif setting.startswith("site:") and setting[5:] in parts.sites:
        train = parts.train(setting[5:])
    else:
        allowed = ", ".join(["centralized"] + [f"site:{s}" for s in parts.sites])
        raise FedllmError(f"unknown setting {setting!r}; allowed: {allowed}")
    result = train_alone(
        cfg,
        str(run / "models" / "base"),
        setting,
        train,
        parts.combined_val(),
        run / "models" / setting.replace(":", "-"),
        rounds_budget=cfg.federation.rounds,
        events_file=str(run / "events" / f"{setting.replace(':', '-')}.jsonl"),
        progress=progress,
    )
    result["kind"] = "centralized" if setting == "centralized" else "site"
    if setting.startswith("site:"):
        result["site"] = setting[5:]
    write_json_atomic(setting_file(run, setting), result)
    return result


def score_base(run_dir: str | os.PathLike) -> dict:
    """The base model before any training, on the combined validation set."""
    from fedllm.data import load_partitions
    from fedllm.train.model import load_tokenizer
    from fedllm.train.module import CausalLMModule
    from fedllm.train.site import evaluate_loss

    run, cfg = load_run(run_dir)
    base = run / "models" / "base"
    module = CausalLMModule(str(base), "sft")
    module.site_name = "base"
    loss = evaluate_loss(cfg, module, load_tokenizer(base), load_partitions(run / "data").combined_val())
    result = {"kind": "base", "model_dir": str(base), "adapter_dir": None, "val_loss": loss}
    write_json_atomic(setting_file(run, "base"), result)
    return result


def settings_of(run: Path, cfg: ExperimentConfig) -> list[str]:
    from fedllm.data import load_partitions

    names = ["base", "fedavg"]
    if cfg.baselines.site_alone:
        names += [f"site:{s}" for s in load_partitions(run / "data").sites]
    if cfg.baselines.centralized:
        names.append("centralized")
    return names


def write_summary(run_dir: str | os.PathLike) -> dict:
    """Collect settings/*.json into summary.json; fails naming a missing setting."""
    from fedllm.data import load_partitions

    run, cfg = load_run(run_dir)
    settings = {}
    for name in settings_of(run, cfg):
        path = setting_file(run, name)
        if not path.is_file():
            raise FedllmError(f"{path}: setting {name!r} has not finished; summary.json not written")
        settings[name] = _relative_paths(json.loads(path.read_text()), run)
    parts = load_partitions(run / "data")
    summary = {
        "name": cfg.name,
        "config": "config.yaml",
        "config_sha256": cfg.fingerprint(),
        "model": json.loads((run / "model.json").read_text()),
        "method": cfg.method.name,
        "sites": parts.sites,
        "partition": {
            "dir": "data",
            "summary_json": "data/partition_summary.json",
            "chart_png": "data/partition_summary.png",
        },
        "rounds": cfg.federation.rounds,
        "steps_per_round": settings["fedavg"].get("steps_per_round"),
        "settings": settings,
    }
    write_json_atomic(run / SUMMARY, summary)
    return summary


def _relative_paths(entry: dict, run: Path) -> dict:
    for key in ("model_dir", "adapter_dir"):
        value = entry.get(key)
        if value and Path(value).is_absolute() and Path(value).is_relative_to(run):
            entry[key] = str(Path(value).relative_to(run))
    return entry


def run_experiment(cfg: ExperimentConfig, run_dir: str | os.PathLike, progress: bool = True) -> dict:
    """``fedllm run``: prepare, federate, baselines, (evaluate, report), summary."""
    started = time.perf_counter()
    run = prepare_run(cfg, run_dir)
    score_base(run)
    run_federation(run)
    for name in settings_of(run, cfg):
        if name.startswith("site:") or name == "centralized":
            run_baseline(run, name, progress=progress)
    summary = write_summary(run)
    events.emit("run_end", site="driver", seconds=round(time.perf_counter() - started, 1), run_dir=str(run))
    return summary
