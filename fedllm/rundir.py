"""A run folder's layout, spelled once, and the settings a run compares.

Every step of fedllm reads and writes one run folder; its paths are named here
and nowhere else, so the CLI, the Kubeflow components, the federation's server
and sites, the store mirror and the report agree by construction::

    config.yaml  model.json  summary.json      the resolved config, the base model's facts, the result
    data/                                      partitions (data/partition.json marks them complete)
    models/base/  models/<setting>/            the base model, every setting's exported model
    settings/<setting>.json                    one finished setting's result (written last, atomically)
    evals/<setting>.json                       its zero-shot lm-eval result
    tasks/<setting>.json                       its per-row task predictions
    events/server.jsonl  events/site-<s>.jsonl the federation's event logs
    events/baseline-<setting>.jsonl            a baseline's event log
    federation/rounds/round-XXX/               every round's global model: exchanged.safetensors, meta.json, MANIFEST.json
    federation/best.json  federation/workspace/  federation/job/
    variants/<setting>/                        a federated variant (``fedavg:<aggregation>``): a run folder of its own
    report/                                    index.html, report.md, figures
    tracking/tensorboard/<setting>/  tracking/<setting>.mlflow.json   TensorBoard files, MLflow run ids

A setting's file name is its name with ``:`` turned into ``-`` (``site:clinic`` →
``site-clinic``); the same relative names are the store's keys.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fedllm.errors import FedllmError

CONFIG = "config.yaml"
MODEL_INFO = "model.json"
SUMMARY = "summary.json"
DATA = "data"
PARTITION_MARKER = "partition.json"  # written last by fedllm.data.prepare
PARTITION_SUMMARY_JSON = "partition_summary.json"
PARTITION_SUMMARY_PNG = "partition_summary.png"
MODELS = "models"
SETTINGS = "settings"
EVALS = "evals"
TASKS = "tasks"
EVENTS = "events"
REPORT = "report"
TRACKING = "tracking"
VARIANTS = "variants"
FEDERATION = "federation"
ROUNDS = f"{FEDERATION}/rounds"
BEST = f"{FEDERATION}/best"
WORKSPACE = f"{FEDERATION}/workspace"
ROUND_WEIGHTS = "exchanged.safetensors"
# the federation's round-0 weights, beside the base model (RunDir.initial_weights)
INITIAL_WEIGHTS = "fedllm-round-0.safetensors"
ROUND_META = "meta.json"
ROUND_SERVER_OPTIMIZER = "server_optimizer.safetensors"  # FedOpt: the server optimizer's state after the round
TOP_FILES = (CONFIG, MODEL_INFO, SUMMARY)


def round_name(round_number: int) -> str:
    return f"round-{round_number:03d}"


def round_number_of(name: str) -> int | None:
    """``round-007`` → 7; anything else → None."""
    digits = name[len("round-"):]
    return int(digits) if name.startswith("round-") and digits.isdigit() else None


def round_key(round_number: int) -> str:
    """A round's folder relative to the run folder, which is also its key in the store."""
    return f"{ROUNDS}/{round_name(round_number)}"


@dataclass(frozen=True)
class Setting:
    """One thing a run trains and compares: ``base`` (the untouched model),
    ``site:<name>`` (one site alone), ``centralized`` (every site's data pooled),
    ``fedavg`` (the federation) or ``fedavg:<aggregation>`` (the federation with
    another LoRA aggregation, in a variant run folder)."""

    kind: str
    name: str = ""

    KINDS = ("base", "site", "centralized", "fedavg")

    @classmethod
    def parse(cls, text: "str | Setting") -> "Setting":
        if isinstance(text, Setting):
            return text
        kind, sep, name = str(text).partition(":")
        if kind not in cls.KINDS or (sep and not name) or (kind in ("base", "centralized") and sep) or (kind == "site" and not name):
            raise FedllmError(
                f"setting {text!r}: expected base, centralized, fedavg, fedavg:<aggregation> or site:<name>"
            )
        return cls(kind, name)

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}" if self.name else self.kind

    @property
    def slug(self) -> str:
        """The setting as a file or folder name."""
        return f"{self.kind}-{self.name}" if self.name else self.kind

    @property
    def is_variant(self) -> bool:
        """A ``fedavg:<aggregation>`` setting: a federation in a run folder of its own."""
        return self.kind == "fedavg" and bool(self.name)

    @property
    def is_baseline(self) -> bool:
        """Trained without federation: one site alone or centralized."""
        return self.kind in ("site", "centralized")


class RunDir:
    """The paths of one run folder (nothing is read or created here)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    def __fspath__(self) -> str:
        return str(self.root)

    # -- top-level files -------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def model_info(self) -> Path:
        return self.root / MODEL_INFO

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY

    # -- data and models --------------------------------------------------------------
    @property
    def data(self) -> Path:
        return self.root / DATA

    @property
    def partition_marker(self) -> Path:
        return self.data / PARTITION_MARKER

    @property
    def base_model(self) -> Path:
        return self.root / MODELS / "base"

    @property
    def initial_weights(self) -> Path:
        """The federation's round-0 weights (the exchanged ones, in the exchange dtype),
        written by ``prepare`` beside the base model so the server never builds a model."""
        return self.base_model / INITIAL_WEIGHTS

    def model(self, setting: str | Setting) -> Path:
        """Where a setting's trained model is exported."""
        return self.root / MODELS / Setting.parse(setting).slug

    # -- per-setting results ---------------------------------------------------------
    def setting_file(self, setting: str | Setting) -> Path:
        return self.root / SETTINGS / f"{Setting.parse(setting).slug}.json"

    def eval_file(self, setting: str | Setting) -> Path:
        return self.root / EVALS / f"{Setting.parse(setting).slug}.json"

    def task_file(self, setting: str | Setting) -> Path:
        return self.root / TASKS / f"{Setting.parse(setting).slug}.json"

    # -- event logs --------------------------------------------------------------------
    @property
    def events(self) -> Path:
        return self.root / EVENTS

    @property
    def server_events(self) -> Path:
        return self.events / "server.jsonl"

    def site_events(self, site: str) -> Path:
        """A federation site's event log."""
        return self.events / f"site-{site}.jsonl"

    def baseline_events(self, setting: str | Setting) -> Path:
        # "baseline-": the federation's site-1 logs to site-site-1.jsonl, the name the
        # baseline site:site-1 would otherwise get; each keeps its own file.
        return self.events / f"baseline-{Setting.parse(setting).slug}.jsonl"

    # -- the federation --------------------------------------------------------------
    @property
    def rounds(self) -> Path:
        return self.root / ROUNDS

    def round(self, round_number: int) -> Path:
        return self.rounds / round_name(round_number)

    def round_weights(self, round_number: int) -> Path:
        return self.round(round_number) / ROUND_WEIGHTS

    @property
    def best_record(self) -> Path:
        return self.root / FEDERATION / "best.json"

    @property
    def workspace(self) -> Path:
        """NVFlare's simulator workspace (job copies, logs): nothing downstream reads it."""
        return self.root / WORKSPACE

    @property
    def exported_jobs(self) -> Path:
        """Where a job submitted to a running federation is exported before submission."""
        return self.root / FEDERATION / "job"

    def variant(self, setting: str | Setting) -> "RunDir":
        """The run folder of a ``fedavg:<aggregation>`` setting."""
        s = Setting.parse(setting)
        if not s.is_variant:
            raise FedllmError(f"setting {str(s)!r} has no variant run folder; only fedavg:<aggregation> settings do")
        return RunDir(self.root / VARIANTS / s.slug)

    # -- experiment tracking -----------------------------------------------------------
    def tensorboard(self, setting: str | Setting) -> Path:
        """A setting's TensorBoard folder: one sub-folder per site (or ``global``)."""
        return self.root / TRACKING / "tensorboard" / Setting.parse(setting).slug

    def mlflow_run_file(self, setting: str | Setting) -> Path:
        """The id of a setting's MLflow run, for the steps that log to it later."""
        return self.root / TRACKING / f"{Setting.parse(setting).slug}.mlflow.json"

    # -- the report ---------------------------------------------------------------------
    @property
    def report(self) -> Path:
        return self.root / REPORT

    # -- what each step leaves (published to the store under the same names) ----------
    def relative(self, path: str | os.PathLike) -> str:
        return Path(path).relative_to(self.root).as_posix()

    def step_folders(self, step: str) -> list[str]:
        """The folders (relative to the root) step ``step`` writes: ``prepared``, ``base``,
        ``fedavg``, ``setting:<setting>``, ``evals``, ``summary`` or ``report``."""
        if step == "prepared":
            return [DATA, self.relative(self.base_model)]
        if step == "base":
            return [SETTINGS, TASKS, TRACKING]
        if step == "evals":
            return [EVALS]
        if step == "summary":
            return [SETTINGS, EVALS, EVENTS, TASKS, TRACKING]
        if step == "report":
            return [REPORT]
        if step == "fedavg" or step.startswith("setting:"):
            setting = Setting.parse(step[len("setting:"):] if step.startswith("setting:") else step)
            where = self.variant(setting) if setting.is_variant else self
            model = where.model("fedavg") if setting.is_variant else self.model(setting)
            return [SETTINGS] + [self.relative(p) for p in (model, where.events, where.root / TASKS, where.root / TRACKING)]
        raise FedllmError(
            f"publish: unknown step {step!r}; expected prepared, base, fedavg, setting:<name>, evals, summary or report"
        )
