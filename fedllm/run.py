"""The whole experiment, top to bottom: the steps every face of fedllm calls.

    prepare_run      config → run dir: resolved config, partitions, base model
    run_federation   FedAvg in NVFlare's simulator            → settings/fedavg.json
    run_baseline     one site alone, or centralized             → settings/<setting>.json
    score_base       the untouched base model                   → settings/base.json
    evaluate_setting zero-shot lm-eval of one setting's model     → evals/<setting>.json
    write_summary    settings/*.json → summary.json (written last, atomically)
    run_experiment   all of the above, then the report, in order (``fedllm run``)

A run dir without summary.json is incomplete: summary.json is removed when a
run starts and written only when every setting has finished.

With a store (``store=`` / ``--store URI`` / ``$FEDLLM_STORE``) each step also
publishes what it wrote there (``fedllm.artifacts.publish``); with ``resume``
a step whose result is already in the run dir is not run again, and the
federation continues from its last persisted round.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

from fedllm import events
from fedllm.artifacts import publish, store_uri_of
from fedllm.config import ExperimentConfig, dump_config, load_config
from fedllm.errors import FedllmError
from fedllm.files import write_json_atomic

SUMMARY = "summary.json"


def setting_file(run_dir: Path, setting: str) -> Path:
    return Path(run_dir) / "settings" / (setting.replace(":", "-") + ".json")


def describe_model(cfg: ExperimentConfig, base_dir: Path) -> dict:
    """model.json: where the base model came from and its size; no weight is read."""
    from fedllm.train.model import count_model_parameters

    count = count_model_parameters(base_dir, cfg.method.name, cfg.method.params)
    if cfg.model.source == "tiny":
        t = cfg.model.tiny
        text = (
            f"tiny {t.architecture}, {t.num_layers} layers x {t.hidden_size} hidden, random init, "
            f"tokenizer trained on this run's data"
        )
    else:
        from fedllm.train.gguf import is_gguf_source

        text = cfg.model.source + (" (GGUF, dequantized to fp32)" if is_gguf_source(cfg.model.source) else "")
    return {
        "source": cfg.model.source,
        "description": text,
        # The base model's own parameters: a PEFT method's adapter is counted as trainable only.
        "parameters": count.base,
        "trainable_parameters": count.trainable,
    }


def prepare_run(cfg: ExperimentConfig, run_dir: str | os.PathLike, store: Optional[str] = None) -> Path:
    """Make the run dir every later step reads: config.yaml, data/, models/base.

    The base model of a ``tiny`` config is built here, its tokenizer trained on
    the run's own training text.
    """
    from fedllm.data import format_example, prepare_partitions
    from fedllm.train.model import prepare_base_model

    run = Path(run_dir).resolve()
    run.mkdir(parents=True, exist_ok=True)
    # Whatever an earlier run left is no longer complete: these mark completion.
    for marker in (run / SUMMARY, run / "data" / "partition.json", run / "model.json"):
        marker.unlink(missing_ok=True)
    dump_config(cfg, run / "config.yaml")
    parts = prepare_partitions(cfg, run / "data")
    texts = None
    if cfg.model.source == "tiny":
        texts = ["".join(format_example(e, cfg.data.template)) for e in parts.pooled_train()]
    prepare_base_model(cfg.model, run / "models" / "base", texts, seed=cfg.seed)
    write_json_atomic(run / "model.json", describe_model(cfg, run / "models" / "base"))
    events.emit("prepared", site="driver", sites=len(parts.sites), run_dir=str(run))
    publish(run, store_uri_of(store), "prepared")
    return run


def is_prepared(cfg: ExperimentConfig, run_dir: str | os.PathLike) -> bool:
    """Whether ``run_dir`` was prepared from this very config (what ``--resume`` reuses).

    A prepared run dir holding another config is an error: resuming it would mix
    two experiments.
    """
    run = Path(run_dir).resolve()
    if not (run / "model.json").is_file() or not (run / "data" / "partition.json").is_file():
        return False
    held = load_config(run / "config.yaml").fingerprint()
    if held != cfg.fingerprint():
        raise FedllmError(
            f"{run / 'config.yaml'}: this run dir was prepared from another config (sha256 {held[:12]}); "
            "--resume needs the same config and --set overrides, or a new --out dir"
        )
    return True


def load_run(run_dir: str | os.PathLike) -> tuple[Path, ExperimentConfig]:
    run = Path(run_dir).resolve()
    if not (run / "config.yaml").is_file() or not (run / "data" / "partition.json").is_file():
        raise FedllmError(f"{run}: not a prepared run dir (run `fedllm partition CONFIG --out {run}` first)")
    return run, load_config(run / "config.yaml")


def run_federation(run_dir: str | os.PathLike, resume: bool = False, store: Optional[str] = None,
                   setting: str = "fedavg") -> dict:
    """FedAvg (see fedllm.federation.federate); ``resume`` continues from the last
    persisted round, or returns the finished result if there is one.

    ``setting`` ``fedavg:<aggregation>`` runs one of ``baselines.lora_aggregations``:
    the same federation with that LoRA aggregation, in a run dir of its own under
    ``variants/`` (its data and base model linked from this run's), so its rounds,
    events and models never mix with the main federation's.
    """
    from fedllm.federation.federate import federate

    run, cfg = load_run(run_dir)
    store = store_uri_of(store)
    if resume and setting_file(run, setting).is_file():
        return json.loads(setting_file(run, setting).read_text())
    if setting == "fedavg":
        result = federate(cfg, run, resume=resume, store=store)
    else:
        variant_dir, variant_cfg = prepare_variant(run, cfg, setting)
        result = federate(variant_cfg, variant_dir, resume=resume)
        result["variant"] = variant_cfg.federation.lora_aggregation
        if "task" in result:  # its predictions file, as seen from this run dir
            result["task"]["predictions"] = str((variant_dir / result["task"]["predictions"]).relative_to(run))
    write_json_atomic(setting_file(run, setting), result)
    publish(run, store, setting if setting == "fedavg" else f"setting:{setting}")
    return result


def variant_settings(cfg: ExperimentConfig) -> list[str]:
    """The FedAvg settings run beside ``fedavg``: ``fedavg:<aggregation>`` for each of
    ``baselines.lora_aggregations`` other than the federation's own."""
    return [f"fedavg:{a}" for a in cfg.baselines.lora_aggregations if a != cfg.federation.lora_aggregation]


def prepare_variant(run: Path, cfg: ExperimentConfig, setting: str) -> tuple[Path, ExperimentConfig]:
    """The run dir of a ``fedavg:<aggregation>`` setting, made on first use: this run's
    config with that aggregation, its data and base model linked (no bytes copied)."""
    import copy

    from fedllm.train.model import link_or_copy_dir

    if setting not in variant_settings(cfg):
        raise FedllmError(f"unknown setting {setting!r}; the config's variants: {', '.join(variant_settings(cfg)) or 'none'}")
    variant_cfg = copy.deepcopy(cfg)
    variant_cfg.federation.lora_aggregation = setting.split(":", 1)[1]
    variant_cfg.name = f"{cfg.name}-{variant_cfg.federation.lora_aggregation}"
    variant_dir = run / "variants" / setting.replace(":", "-")
    if not (variant_dir / "model.json").is_file() or load_config(variant_dir / "config.yaml").fingerprint() != variant_cfg.fingerprint():
        variant_dir.mkdir(parents=True, exist_ok=True)
        dump_config(variant_cfg, variant_dir / "config.yaml")
        link_or_copy_dir(run / "data", variant_dir / "data")
        link_or_copy_dir(run / "models" / "base", variant_dir / "models" / "base")
        write_json_atomic(variant_dir / "model.json", json.loads((run / "model.json").read_text()))
    return variant_dir, variant_cfg


def run_baseline(run_dir: str | os.PathLike, setting: str, progress: bool = False, store: Optional[str] = None) -> dict:
    """``site:<name>`` trains on that site's data alone; ``centralized`` on every
    site's pooled training data. Both get the budget one site gets over all
    FedAvg rounds and are scored on the combined validation set."""
    from fedllm.data import load_partitions
    from fedllm.evaluate.task_metric import make_scorer, record_task
    from fedllm.train.model import load_tokenizer
    from fedllm.train.site import train_alone

    run, cfg = load_run(run_dir)
    if setting.startswith("fedavg:"):  # a federated variant: what the pipeline's train step also runs
        return run_federation(run, setting=setting, store=store)
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
        # "baseline-": a federation site named site-1 logs to events/site-site-1.jsonl, the
        # same name the baseline site:site-1 would get; each keeps its own file.
        events_file=str(run / "events" / f"baseline-{setting.replace(':', '-')}.jsonl"),
        progress=progress,
        scorer=make_scorer(cfg, parts, load_tokenizer(run / "models" / "base")),
        # Every baseline starts from the base model, scored on the same rows by score_base.
        base_val_loss=json.loads(setting_file(run, "base").read_text())["val_loss"] if setting_file(run, "base").is_file() else None,
    )
    scores = result.pop("task_scores", None)
    if scores:
        result["task"] = record_task(cfg, run, setting, scores["curve"], scores["final"])
    result["kind"] = "centralized" if setting == "centralized" else "site"
    if setting.startswith("site:"):
        result["site"] = setting[5:]
    write_json_atomic(setting_file(run, setting), result)
    publish(run, store_uri_of(store), f"setting:{setting}")
    return result


def score_base(run_dir: str | os.PathLike, store: Optional[str] = None) -> dict:
    """The base model before any training, on the combined validation set."""
    from fedllm.data import load_partitions
    from fedllm.evaluate.task_metric import make_scorer, record_task
    from fedllm.train.model import load_tokenizer
    from fedllm.train.module import CausalLMModule
    from fedllm.train.site import autocast_dtype, evaluate_loss, set_threads

    run, cfg = load_run(run_dir)
    set_threads(cfg)
    base = run / "models" / "base"
    module = CausalLMModule(str(base), "sft")
    module.site_name = "base"
    tokenizer, parts = load_tokenizer(base), load_partitions(run / "data")
    loss = evaluate_loss(cfg, module, tokenizer, parts.combined_val())
    result = {"kind": "base", "model_dir": str(base), "adapter_dir": None, "val_loss": loss}
    scorer = make_scorer(cfg, parts, tokenizer)
    if scorer is not None:
        final = scorer.score(module.model, autocast_dtype=autocast_dtype(cfg))
        curve = [{"round": 0, "step": 0, "accuracy": final["accuracy"], "macro_f1": final["macro_f1"]}]
        result["task"] = record_task(cfg, run, "base", curve, final)
    write_json_atomic(setting_file(run, "base"), result)
    publish(run, store_uri_of(store), "base")
    return result


def eval_file(run_dir: Path, setting: str) -> Path:
    return Path(run_dir) / "evals" / (setting.replace(":", "-") + ".json")


def evaluate_setting(run_dir: str | os.PathLike, setting: str, store: Optional[str] = None) -> dict:
    """Zero-shot HellaSwag/PIQA/WinoGrande of one finished setting's model.

    Task rows come from ``evaluation.task_data_dir``, else ``$FEDLLM_EVAL_DATA_DIR``,
    else the config's data dir (a local folder or an s3:// prefix).
    """
    from fedllm.evaluate import batch_size_from_text, evaluate_model

    run, cfg = load_run(run_dir)
    path = setting_file(run, setting)
    if not path.is_file():
        raise FedllmError(f"{path}: setting {setting!r} has not finished; nothing to evaluate")
    entry = json.loads(path.read_text())
    e = cfg.evaluation
    task_data = e.task_data_dir or os.environ.get("FEDLLM_EVAL_DATA_DIR") or cfg.resolve_data_path(".")
    model_dir = Path(entry["model_dir"])
    adapter = entry.get("adapter_dir")
    result = evaluate_model(
        model_dir if model_dir.is_absolute() else run / model_dir,
        adapter_path=(Path(adapter) if Path(adapter).is_absolute() else run / adapter) if adapter else None,
        tasks=e.tasks,
        limit=e.limit,
        batch_size=batch_size_from_text(e.batch_size),
        task_data=task_data,
        output=eval_file(run, setting),
    )
    events.emit("evaluated", site=setting, mean=result["metrics"]["mean"]["value"], seconds=result["seconds"])
    publish(run, store_uri_of(store), "evals")
    return result


def settings_of(run: Path, cfg: ExperimentConfig) -> list[str]:
    from fedllm.data import load_partitions

    names = ["base", "fedavg", *variant_settings(cfg)]
    if cfg.baselines.site_alone:
        names += [f"site:{s}" for s in load_partitions(run / "data").sites]
    if cfg.baselines.centralized:
        names.append("centralized")
    return names


def write_summary(run_dir: str | os.PathLike, store: Optional[str] = None) -> dict:
    """Collect settings/*.json into summary.json; fails naming a missing setting."""
    from fedllm.data import load_partitions

    run, cfg = load_run(run_dir)
    settings = {}
    for name in settings_of(run, cfg):
        path = setting_file(run, name)
        if not path.is_file():
            raise FedllmError(f"{path}: setting {name!r} has not finished; summary.json not written")
        settings[name] = _relative_paths(json.loads(path.read_text()), run)
        if cfg.evaluation.enabled:
            evaluated = eval_file(run, name)
            if not evaluated.is_file():
                raise FedllmError(f"{evaluated}: setting {name!r} has not been evaluated; summary.json not written")
            settings[name]["eval"] = json.loads(evaluated.read_text())["metrics"]
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
    from fedllm.evaluate.bootstrap import compare_settings

    summary["comparisons"] = compare_settings(run, settings)  # FedAvg vs each baseline, paired bootstrap
    write_json_atomic(run / SUMMARY, summary)
    publish(run, store_uri_of(store), "summary")
    return summary


def _relative_paths(entry: dict, run: Path) -> dict:
    for key in ("model_dir", "adapter_dir"):
        value = entry.get(key)
        if value and Path(value).is_absolute() and Path(value).is_relative_to(run):
            entry[key] = str(Path(value).relative_to(run))
    return entry


def run_experiment(cfg: ExperimentConfig, run_dir: str | os.PathLike, progress: bool = True,
                   store: Optional[str] = None, resume: bool = False) -> dict:
    """``fedllm run``: prepare, federate, baselines, (evaluate, report), summary.

    ``resume``: reuse a run dir prepared from the same config, skip every setting
    (and evaluation) whose settings/*.json (evals/*.json) exists — they are written
    atomically, last — and continue the federation from its last persisted round.
    """
    started = time.perf_counter()
    store = store_uri_of(store)
    if resume and is_prepared(cfg, run_dir):
        run = Path(run_dir).resolve()
        (run / SUMMARY).unlink(missing_ok=True)
    else:
        run = prepare_run(cfg, run_dir, store=store)
    if not (resume and setting_file(run, "base").is_file()):
        score_base(run, store=store)
    run_federation(run, resume=resume, store=store)
    for name in variant_settings(cfg):
        run_federation(run, resume=resume, store=store, setting=name)
    for name in settings_of(run, cfg):
        if name.startswith("site:") or name == "centralized":
            if not (resume and setting_file(run, name).is_file()):
                run_baseline(run, name, progress=progress, store=store)
    if cfg.evaluation.enabled:
        for name in settings_of(run, cfg):
            if not (resume and eval_file(run, name).is_file()):
                evaluate_setting(run, name, store=store)
    summary = write_summary(run, store=store)
    from fedllm.report import write_report

    write_report(run)
    publish(run, store, "report")
    events.emit("run_end", site="driver", seconds=round(time.perf_counter() - started, 1), run_dir=str(run))
    return summary
