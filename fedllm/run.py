"""The whole experiment, top to bottom: the steps every face of fedllm calls.

    prepare          config → run dir: resolved config, partitions, base model (a Run;
                     prepare_run: the same, returning the folder)
    run_federation   FedAvg in NVFlare's simulator            → settings/fedavg.json
    run_baseline     one site alone, or centralized             → settings/<setting>.json
    score_base       the untouched base model                   → settings/base.json
    evaluate_setting zero-shot lm-eval of one setting's model     → evals/<setting>.json
    write_summary    settings/*.json → summary.json (written last, atomically)
    run_experiment   all of the above, then the report, in order (``fedllm run``)

Each face opens the run once (``prepare`` for a new one, ``open_run`` for a prepared
folder) and hands the :class:`Run` down: its layout (``fedllm.rundir``), its config,
its store and its partitions are resolved once per process. The steps also accept a
path, for the processes that are given only that (a pipeline step, ``fedllm train``).

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
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Optional

from fedllm import events, tracking
from fedllm.artifacts import publish, store_uri_of
from fedllm.config import ExperimentConfig, PrivacyConfig, dump_config, load_config
from fedllm.errors import FedllmError
from fedllm.files import write_json_atomic
from fedllm.rundir import PARTITION_SUMMARY_JSON, PARTITION_SUMMARY_PNG, RunDir, Setting


@dataclass
class Run:
    """A prepared run folder opened once by a face and handed down: its layout,
    its validated config, the store it publishes to (``--store``, else
    ``$FEDLLM_STORE``, resolved here once) and its partitions (read on first use)."""

    dir: RunDir
    cfg: ExperimentConfig
    store: Optional[str] = None

    @property
    def root(self) -> Path:
        return self.dir.root

    @cached_property
    def partitions(self):
        from fedllm.data import load_partitions

        return load_partitions(self.dir.data)

    @property
    def sites(self) -> list[str]:
        return self.partitions.sites

    def publish(self, step: str) -> list[str]:
        return publish(self.dir, self.store, step)

    def result(self, setting: str | Setting) -> Optional[dict]:
        """A finished setting's result, or None."""
        path = self.dir.setting_file(setting)
        return json.loads(path.read_text()) if path.is_file() else None

    def write_result(self, setting: str | Setting, result: dict) -> dict:
        """Check ``result`` against the shape every setting's result has, then write
        settings/<setting>.json atomically (the file marks the setting finished)."""
        path = self.dir.setting_file(setting)
        check_setting_result(result, str(path))
        write_json_atomic(path, result)
        return result


def open_run(run: "str | os.PathLike | Run", store: Optional[str] = None) -> Run:
    """The prepared run folder ``run`` (a path, or a Run already opened: returned as is)."""
    if isinstance(run, Run):
        return run
    layout = RunDir(run)
    if not layout.config.is_file() or not layout.partition_marker.is_file():
        raise FedllmError(f"{layout.root}: not a prepared run dir (run `fedllm partition CONFIG --out {layout.root}` first)")
    return Run(layout, load_config(layout.config), store_uri_of(store))


# kind → keys every result of that kind carries (what the report and evaluation read).
RESULT_KEYS = {
    "base": ("val_loss", "model_dir", "adapter_dir"),
    "site": ("val_loss", "model_dir", "adapter_dir", "site"),
    "centralized": ("val_loss", "model_dir", "adapter_dir"),
    "federated": ("val_loss", "model_dir", "adapter_dir", "val_loss_curve", "rounds", "time_per_round_s"),
}


def check_setting_result(result: dict, where: str) -> None:
    """A setting's result must name its kind and carry that kind's keys, with a
    numeric val_loss and a model dir; FedllmError naming ``where`` and the field."""
    kind = result.get("kind")
    if kind not in RESULT_KEYS:
        raise FedllmError(f"{where}: kind: expected one of {', '.join(RESULT_KEYS)}, got {kind!r}")
    missing = [k for k in RESULT_KEYS[kind] if k not in result]
    if missing:
        raise FedllmError(f"{where}: {missing[0]}: missing from a {kind} result")
    loss = result["val_loss"]
    if isinstance(loss, bool) or not isinstance(loss, (int, float)):  # NaN stays: a diverged run is a result
        raise FedllmError(f"{where}: val_loss: expected a number, got {loss!r}")
    if not isinstance(result["model_dir"], str) or not result["model_dir"]:
        raise FedllmError(f"{where}: model_dir: expected a path, got {result['model_dir']!r}")


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
    return prepare(cfg, run_dir, store).root


def prepare(cfg: ExperimentConfig, run_dir: str | os.PathLike, store: Optional[str] = None) -> Run:
    """:func:`prepare_run`, returning the opened :class:`Run`."""
    from fedllm.data import format_example, prepare_partitions
    from fedllm.train.model import prepare_base_model
    from fedllm.train.site import write_initial_weights

    layout = RunDir(run_dir)
    layout.root.mkdir(parents=True, exist_ok=True)
    # Whatever an earlier run left is no longer complete: these mark completion.
    for marker in (layout.summary, layout.partition_marker, layout.model_info):
        marker.unlink(missing_ok=True)
    dump_config(cfg, layout.config)
    parts = prepare_partitions(cfg, layout.data)
    texts = None
    if cfg.model.source == "tiny":
        texts = ["".join(format_example(e, cfg.data.template)) for e in parts.pooled_train()]
    prepare_base_model(cfg.model, layout.base_model, texts, seed=cfg.seed)
    # Round 0 of the federation, so its server reads weights instead of building a model.
    write_initial_weights(cfg, layout.base_model, layout.initial_weights)
    write_json_atomic(layout.model_info, describe_model(cfg, layout.base_model))
    run = Run(layout, cfg, store_uri_of(store))
    run.__dict__["partitions"] = parts  # cached_property: read once, here
    events.emit("prepared", site="driver", sites=len(parts.sites), run_dir=str(layout.root))
    run.publish("prepared")
    return run


def is_prepared(cfg: ExperimentConfig, run_dir: str | os.PathLike) -> bool:
    """Whether ``run_dir`` was prepared from this very config (what ``--resume`` reuses).

    A prepared run dir holding another config is an error: resuming it would mix
    two experiments.
    """
    layout = RunDir(run_dir)
    if not layout.model_info.is_file() or not layout.partition_marker.is_file():
        return False
    held = load_config(layout.config).fingerprint()
    if held != cfg.fingerprint():
        raise FedllmError(
            f"{layout.config}: this run dir was prepared from another config (sha256 {held[:12]}); "
            "--resume needs the same config and --set overrides, or a new --out dir"
        )
    return True


def run_federation(run_dir: "str | os.PathLike | Run", resume: bool = False, store: Optional[str] = None,
                   setting: str = "fedavg", runner=None) -> dict:
    """FedAvg (see fedllm.federation.federate); ``resume`` continues from the last
    persisted round, or returns the finished result if there is one.

    ``setting`` ``fedavg:<aggregation>`` runs one of ``baselines.lora_aggregations``:
    the same federation with that LoRA aggregation, in a run dir of its own under
    ``variants/`` (its data and base model linked from this run's), so its rounds,
    events and models never mix with the main federation's.

    ``runner``: where the job runs; NVFlare's simulator in this process by default, or
    a running federation (``fedllm.federation.submit.submitter(ADMIN_KIT)``).
    """
    from fedllm.federation.federate import federate

    run = open_run(run_dir, store)
    setting = Setting.parse(setting)
    if setting.kind != "fedavg":
        raise FedllmError(f"setting {str(setting)!r} is not a federation; expected fedavg or fedavg:<aggregation>")
    if resume and (done := run.result(setting)) is not None:
        return done
    if not setting.is_variant:
        result = federate(run.cfg, run.root, sites=run.sites, resume=resume, store=run.store, partitions=run.partitions,
                          runner=runner)
        tracking.log_federation(run.cfg, run.dir, setting, result)
    else:
        variant_dir, variant_cfg = prepare_variant(run, setting)
        result = federate(variant_cfg, variant_dir.root, sites=run.sites, resume=resume, partitions=run.partitions,
                          runner=runner)
        tracking.log_federation(variant_cfg, variant_dir, setting, result)
        result["variant"] = setting.name
        if "task" in result:  # its predictions file, as seen from this run dir
            result["task"]["predictions"] = run.dir.relative(variant_dir.root / result["task"]["predictions"])
    run.write_result(setting, result)
    run.publish("fedavg" if not setting.is_variant else f"setting:{setting}")
    return result


#: the variant that runs the federation without ``federation.privacy`` (``baselines.non_private``)
NON_PRIVATE = "non_private"


def variant_settings(cfg: ExperimentConfig) -> list[str]:
    """The federated settings run beside ``fedavg``: ``fedavg:<aggregation>`` for each of
    ``baselines.lora_aggregations`` other than the federation's own, then ``fedavg:<algorithm>``
    for each of ``baselines.algorithms`` other than ``federation.algorithm``, then
    ``fedavg:non_private`` (``baselines.non_private``: the federation without its privacy filters)."""
    return ([f"fedavg:{a}" for a in cfg.baselines.lora_aggregations if a != cfg.federation.lora_aggregation]
            + [f"fedavg:{a}" for a in cfg.baselines.algorithms if a != cfg.federation.algorithm]
            + ([f"fedavg:{NON_PRIVATE}"] if cfg.baselines.non_private else []))


def prepare_variant(run: Run, setting: Setting) -> tuple[RunDir, ExperimentConfig]:
    """The run dir of a ``fedavg:<aggregation>`` or ``fedavg:<algorithm>`` setting, made on first
    use: this run's config with that LoRA aggregation or federated algorithm, its data and
    base model linked (no bytes copied)."""
    import copy

    from fedllm.train.model import link_or_copy_dir

    if str(setting) not in variant_settings(run.cfg):
        raise FedllmError(f"unknown setting {str(setting)!r}; the config's variants: {', '.join(variant_settings(run.cfg)) or 'none'}")
    variant_cfg = copy.deepcopy(run.cfg)
    if setting.name == NON_PRIVATE:
        variant_cfg.federation.privacy = PrivacyConfig()
        variant_cfg.baselines.non_private = False
    elif setting.name in run.cfg.baselines.algorithms:
        variant_cfg.federation.algorithm = setting.name
    else:
        variant_cfg.federation.lora_aggregation = setting.name
    variant_cfg.name = f"{run.cfg.name}-{setting.name}"
    variant = run.dir.variant(setting)
    if not variant.model_info.is_file() or load_config(variant.config).fingerprint() != variant_cfg.fingerprint():
        variant.root.mkdir(parents=True, exist_ok=True)
        dump_config(variant_cfg, variant.config)
        link_or_copy_dir(run.dir.data, variant.data)
        link_or_copy_dir(run.dir.base_model, variant.base_model)
        write_json_atomic(variant.model_info, json.loads(run.dir.model_info.read_text()))
    return variant, variant_cfg


def run_baseline(run_dir: "str | os.PathLike | Run", setting: str, progress: bool = False, store: Optional[str] = None) -> dict:
    """``site:<name>`` trains on that site's data alone; ``centralized`` on every
    site's pooled training data. Both get the budget one site gets over all
    FedAvg rounds and are scored on the combined validation set."""
    from fedllm.evaluate.task_metric import make_scorer, record_task
    from fedllm.train.model import load_tokenizer
    from fedllm.train.site import train_alone

    run = open_run(run_dir, store)
    parsed = Setting.parse(setting)
    if parsed.kind == "fedavg":  # a federated variant: what the pipeline's train step also runs
        return run_federation(run, setting=setting)
    cfg, parts = run.cfg, run.partitions
    if parsed.kind == "centralized":
        train = parts.pooled_train()
    elif parsed.kind == "site" and parsed.name in parts.sites:
        train = parts.train(parsed.name)
    else:
        allowed = ", ".join(["centralized"] + [f"site:{s}" for s in parts.sites])
        raise FedllmError(f"unknown setting {setting!r}; allowed: {allowed}")
    base = run.result("base")
    with tracking.track_setting(cfg, run.dir, parsed) as tracker:
        result = train_alone(
            cfg,
            str(run.dir.base_model),
            str(parsed),
            train,
            parts.combined_val(),
            run.dir.model(parsed),
            rounds_budget=cfg.federation.rounds,
            events_file=str(run.dir.baseline_events(parsed)),
            progress=progress,
            scorer=make_scorer(cfg, parts, load_tokenizer(run.dir.base_model)),
            # Every baseline starts from the base model, scored on the same rows by score_base.
            base_val_loss=base["val_loss"] if base is not None else None,
        )
        if tracker is not None:
            tracker.log_curve("val_loss", result["val_loss_curve"])
    scores = result.pop("task_scores", None)
    if scores:
        result["task"] = record_task(cfg, run.root, str(parsed), scores["curve"], scores["final"])
    result["kind"] = parsed.kind
    if parsed.kind == "site":
        result["site"] = parsed.name
    run.write_result(parsed, result)
    run.publish(f"setting:{parsed}")
    return result


def score_base(run_dir: "str | os.PathLike | Run", store: Optional[str] = None) -> dict:
    """The base model before any training, on the combined validation set."""
    from fedllm.evaluate.task_metric import make_scorer, record_task
    from fedllm.train.model import load_tokenizer
    from fedllm.train.module import CausalLMModule
    from fedllm.train.site import autocast_dtype, evaluate_loss, set_threads

    run = open_run(run_dir, store)
    cfg = run.cfg
    set_threads(cfg)
    base = run.dir.base_model
    module = CausalLMModule(str(base), "sft")
    module.site_name = "base"
    tokenizer, parts = load_tokenizer(base), run.partitions
    with tracking.track_setting(cfg, run.dir, "base") as tracker:  # its validate event is val_loss at step 0
        loss = evaluate_loss(cfg, module, tokenizer, parts.combined_val())
        result = {"kind": "base", "model_dir": str(base), "adapter_dir": None, "val_loss": loss}
        scorer = make_scorer(cfg, parts, tokenizer)
        if scorer is not None:
            final = scorer.score(module.model, autocast_dtype=autocast_dtype(cfg))
            curve = [{"round": 0, "step": 0, "accuracy": final["accuracy"], "macro_f1": final["macro_f1"]}]
            result["task"] = record_task(cfg, run.root, "base", curve, final)
            if tracker is not None:
                tracker.log({"accuracy": final["accuracy"], "macro_f1": final["macro_f1"]}, 0)
    run.write_result("base", result)
    run.publish("base")
    return result


def evaluate_setting(run_dir: "str | os.PathLike | Run", setting: str, store: Optional[str] = None) -> dict:
    """Zero-shot HellaSwag/PIQA/WinoGrande of one finished setting's model.

    Task rows come from ``evaluation.task_data_dir``, else ``$FEDLLM_EVAL_DATA_DIR``,
    else the config's data dir (a local folder or an s3:// prefix).
    """
    from fedllm.evaluate import batch_size_from_text, evaluate_model

    run = open_run(run_dir, store)
    entry = run.result(setting)
    if entry is None:
        raise FedllmError(f"{run.dir.setting_file(setting)}: setting {setting!r} has not finished; nothing to evaluate")
    e = run.cfg.evaluation
    task_data = e.task_data_dir or os.environ.get("FEDLLM_EVAL_DATA_DIR") or run.cfg.resolve_data_path(".")
    model_dir = Path(entry["model_dir"])
    adapter = entry.get("adapter_dir")
    result = evaluate_model(
        model_dir if model_dir.is_absolute() else run.root / model_dir,
        adapter_path=(Path(adapter) if Path(adapter).is_absolute() else run.root / adapter) if adapter else None,
        tasks=e.tasks,
        limit=e.limit,
        batch_size=batch_size_from_text(e.batch_size),
        task_data=task_data,
        output=run.dir.eval_file(setting),
    )
    events.emit("evaluated", site=setting, mean=result["metrics"]["mean"]["value"], seconds=result["seconds"])
    tracking.log_evaluation(run.cfg, run.dir, setting, result["metrics"])
    run.publish("evals")
    return result


def settings_of(run: "str | os.PathLike | Run", cfg: Optional[ExperimentConfig] = None) -> list[str]:
    """Every setting the run compares, in order: base, fedavg, its variants, each site alone, centralized."""
    run = open_run(run)
    cfg = cfg or run.cfg
    names = ["base", "fedavg", *variant_settings(cfg)]
    if cfg.baselines.site_alone:
        names += [f"site:{s}" for s in run.sites]
    if cfg.baselines.centralized:
        names.append("centralized")
    return names


def write_summary(run_dir: "str | os.PathLike | Run", store: Optional[str] = None) -> dict:
    """Collect settings/*.json into summary.json; fails naming a missing setting."""
    run = open_run(run_dir, store)
    cfg = run.cfg
    settings = {}
    for name in settings_of(run):
        entry = run.result(name)
        if entry is None:
            raise FedllmError(f"{run.dir.setting_file(name)}: setting {name!r} has not finished; summary.json not written")
        settings[name] = _relative_paths(entry, run.root)
        if cfg.evaluation.enabled:
            evaluated = run.dir.eval_file(name)
            if not evaluated.is_file():
                raise FedllmError(f"{evaluated}: setting {name!r} has not been evaluated; summary.json not written")
            settings[name]["eval"] = json.loads(evaluated.read_text())["metrics"]
    data = run.dir.relative(run.dir.data)
    summary = {
        "name": cfg.name,
        "config": run.dir.relative(run.dir.config),
        "config_sha256": cfg.fingerprint(),
        "model": json.loads(run.dir.model_info.read_text()),
        "method": cfg.method.name,
        "sites": run.sites,
        "partition": {
            "dir": data,
            "summary_json": f"{data}/{PARTITION_SUMMARY_JSON}",
            "chart_png": f"{data}/{PARTITION_SUMMARY_PNG}",
        },
        "rounds": cfg.federation.rounds,
        "steps_per_round": settings["fedavg"].get("steps_per_round"),
        "settings": settings,
    }
    from fedllm.evaluate.bootstrap import compare_settings

    summary["comparisons"] = compare_settings(run.root, settings)  # FedAvg vs each baseline, paired bootstrap
    write_json_atomic(run.dir.summary, summary)
    run.publish("summary")
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
    if resume and is_prepared(cfg, run_dir):
        run = open_run(run_dir, store)
        run.dir.summary.unlink(missing_ok=True)
    else:
        run = prepare(cfg, run_dir, store=store)
    if not (resume and run.result("base") is not None):
        score_base(run)
    run_federation(run, resume=resume)
    for name in variant_settings(cfg):
        run_federation(run, resume=resume, setting=name)
    for name in settings_of(run):
        if Setting.parse(name).is_baseline and not (resume and run.result(name) is not None):
            run_baseline(run, name, progress=progress)
    if cfg.evaluation.enabled:
        for name in settings_of(run):
            if not (resume and run.dir.eval_file(name).is_file()):
                evaluate_setting(run, name)
    summary = write_summary(run)
    from fedllm.report import write_report

    write_report(run.root)
    run.publish("report")
    events.emit("run_end", site="driver", seconds=round(time.perf_counter() - started, 1), run_dir=str(run.root))
    return summary
