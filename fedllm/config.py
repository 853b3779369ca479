"""One experiment config, validated at load time.

The same YAML file drives the laptop run, the Kubeflow pipeline and the cluster
federation. Every field is a typed dataclass attribute; loading walks the YAML
against those types and fails on the first problem with a message naming the
field (``training.lr``) and what would be accepted.

    cfg = load_config("configs/demo.yaml", overrides=["federation.rounds=5"])
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from fedllm.errors import FedllmError


@dataclass
class TinyModelSpec:
    """A small randomly initialised causal LM, built from a config in seconds.

    The tokenizer is a byte-level BPE trained on the run's own training data.
    """

    architecture: Literal["llama", "gpt2"] = "llama"
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    vocab_size: int = 2048
    max_position_embeddings: int = 512


@dataclass
class ModelConfig:
    """Where the base model comes from.

    ``source`` is ``tiny`` (build ``tiny`` below), a Hugging Face hub id
    (``EleutherAI/gpt-neo-1.3B``), a local directory in HF format, or an
    ``s3://`` URI of such a directory.
    """

    source: str = "tiny"
    tiny: TinyModelSpec = field(default_factory=TinyModelSpec)
    revision: Optional[str] = None


@dataclass
class MethodConfig:
    """The fine-tuning method and its peft parameters.

    ``name`` is a key of the method registry (``fedllm.train.methods.METHODS``).
    ``params`` are passed to the method's peft config (LoraConfig, IA3Config,
    PromptEncoderConfig, PromptTuningConfig); ``sft`` takes none.
    """

    name: str = "lora"
    params: dict = field(default_factory=dict)


@dataclass
class SourceConfig:
    """One data source: a named set of records in a known format.

    ``path`` is a local file or folder (relative paths resolve against
    ``data_dir``), an ``s3://`` URI, or ``hf://<dataset id>[:split]`` for the hub.
    ``fields`` maps the generic format's prompt/response/label names. ``format`` is a
    key of the format registry (``fedllm.data.formats.FORMATS``).
    """

    name: str = ""
    format: str = "generic"
    path: str = ""
    fields: dict = field(default_factory=dict)
    max_records: Optional[int] = None
    site: Optional[str] = None
    hub: Optional[str] = None  # hf://<dataset id>[:split], used when ``path`` is not found locally


@dataclass
class PartitionConfig:
    """How records become sites.

    ``by_source``: one site per source (the source's ``site`` or its name).
    ``iid``: pool every source, shuffle, deal evenly to ``num_sites``.
    ``dirichlet``: per label, site shares drawn from Dir(alpha); redrawn until
    every site holds at least ``min_site_records``.
    ``strategy`` is a key of the partitioner registry (``fedllm.data.partition.PARTITIONERS``).
    """

    strategy: str = "by_source"
    num_sites: Optional[int] = None
    alpha: float = 1.0
    label_field: str = "label"
    min_site_records: int = 10


@dataclass
class SplitConfig:
    """Per-site train/val/test fractions (the seed's 80/10/10)."""

    train: float = 0.8
    val: float = 0.1
    test: float = 0.1


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    template: str = "alpaca"
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    max_val_records_per_site: Optional[int] = None


@dataclass
class TrainingConfig:
    """One site's local training, per round.

    ``steps_per_round`` optimizer steps, or ``epochs_per_round`` passes when
    steps are not given (capped by ``max_steps_per_round``).
    """

    steps_per_round: Optional[int] = 20
    epochs_per_round: Optional[float] = None
    max_steps_per_round: Optional[int] = None
    micro_batch_size: int = 4
    grad_accumulation: int = 1
    lr: float = 5e-4
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    min_lr: float = 0.0
    weight_decay: float = 0.01
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    grad_clip: float = 1.0
    max_seq_length: int = 256
    precision: Literal["32-true", "bf16-mixed", "bf16-true", "16-mixed"] = "32-true"
    val_batch_size: int = 8
    val_check_steps: int = 10
    answer_only_loss: bool = True
    pack_sequences: bool = False
    compile: bool = False
    fused_optimizer: bool = False
    num_threads: Optional[int] = None
    # What builds and shards a site's model: ``hf`` (transformers + peft, Lightning) or ``nemo``
    # (NVIDIA NeMo AutoModel: its model code, LoRA/DoRA, FSDP2; fedllm.train.nemo). Same data,
    # loss, schedule and exchanged weights either way.
    backend: Literal["hf", "nemo"] = "hf"
    # Processes one site trains with, its model sharded over them by FSDP2 (nemo backend;
    # gloo on CPU, NCCL on GPU, one per GPU). Rank 0 talks to NVFlare.
    processes_per_site: int = 1


@dataclass
class FedProxConfig:
    """FedProx's proximal term (``federation.algorithm: fedprox``): each site adds
    mu/2·‖w − w_global‖² to its training loss, over the weights it exchanges, against the
    global weights it received that round. ``mu`` = 0 trains exactly as FedAvg."""

    mu: float = 0.01


@dataclass
class FedOptConfig:
    """FedOpt's server optimizer (``federation.algorithm: fedopt``): each round the server
    takes (global − the sites' weighted mean) as a gradient and steps ``optimizer`` on the
    global weights. ``sgd``: ``lr`` and ``momentum`` (lr 1, momentum 0 is FedAvg);
    ``adam``: ``lr``, ``betas`` and ``eps`` (Reddi et al.'s τ)."""

    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 1.0
    momentum: float = 0.6
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    eps: float = 1e-8


@dataclass
class PercentilePrivacyConfig:
    """NVFlare's ``PercentilePrivacy`` on a site's update (``federation.privacy.percentile``):
    coordinates of the update difference below the ``percentile``-th percentile of |difference|
    (0-100) are zeroed, the rest clipped to ±``gamma`` (> 0)."""

    percentile: int = 10
    gamma: float = 0.01


@dataclass
class DPConfig:
    """DP-FedAvg at each site (``federation.privacy.dp``, fedllm.federation.privacy): the update
    difference is clipped to L2 norm ``clip_norm`` (> 0; ``.inf``: no clipping, only with
    ``noise_multiplier`` 0) and N(0, (noise_multiplier·clip_norm)²) added per coordinate; ε is
    reported at ``delta`` (0 < δ < 1). ``seed`` null (default): the noise comes from the
    operating system's entropy; a number makes it reproducible from (seed, site, round), and
    then whoever knows the seed can remove it (for tests and benchmarks only)."""

    noise_multiplier: float = 1.0
    clip_norm: float = 1.0
    delta: float = 1e-5
    seed: Optional[int] = None


@dataclass
class PrivacyConfig:
    """Filters on what a site sends, applied at the site (fedllm.federation.privacy), in this
    order: ``exclude_vars`` (NVFlare's ``ExcludeVars``: weight names, or one regular expression,
    that never leave the site), ``percentile`` (NVFlare's ``PercentilePrivacy``) and ``dp``
    (clipped, noised updates with an ε). Each is off when null."""

    exclude_vars: Optional[Union[list[str], str]] = None
    percentile: Optional[PercentilePrivacyConfig] = None
    dp: Optional[DPConfig] = None

    @property
    def enabled(self) -> bool:
        """Whether any filter is on."""
        return any(f is not None for f in (self.exclude_vars, self.percentile, self.dp))


@dataclass
class FederationConfig:
    """The NVFlare federation: ``algorithm`` over ``rounds`` rounds.

    ``algorithm`` is a key of the algorithm registry (``fedllm.federation.algorithms.ALGORITHMS``):
    ``fedavg``, ``fedprox`` (parameters in ``fedprox``) or ``fedopt`` (parameters in ``fedopt``).
    ``weighting``: each site's update is weighted by its training samples, its
    optimizer steps, or uniformly. ``quantization`` compresses messages with
    NVFlare's quantization filters, one of ``fedllm.federation.quantization.MODES``.
    """

    algorithm: str = "fedavg"
    fedprox: FedProxConfig = field(default_factory=FedProxConfig)
    fedopt: FedOptConfig = field(default_factory=FedOptConfig)
    rounds: int = 3
    # Sites a round needs (default: all). With fewer, a round completes without a lost site
    # or a rejected update (fedllm.federation.participation): after the minimum reported it
    # waits ``wait_after_min_clients`` seconds for the rest (None: derived from the rounds so
    # far); a round lasts at most ``round_timeout`` seconds (None: derived from the model's
    # bytes at ``min_bandwidth_mb_s`` and the slowest round so far).
    min_clients: Optional[int] = None
    wait_after_min_clients: Optional[float] = None
    round_timeout: Optional[float] = None
    min_bandwidth_mb_s: float = 1.0
    # NVFlare's transfer timeouts in seconds, by NVFlare's key (fedllm.federation.transfer.TIMEOUTS):
    # each one given here replaces the one derived from the model's bytes at ``min_bandwidth_mb_s``.
    transfer_timeouts: dict[str, float] = field(default_factory=dict)
    weighting: Literal["samples", "steps", "uniform"] = "samples"
    quantization: Optional[str] = None
    threads: Optional[int] = None
    # How the server combines the sites' LoRA adapters: ``factors`` averages A and B
    # separately (plain FedAvg); ``product_svd`` averages the sites' updates B·A exactly
    # and factors the mean back into rank-r A and B by SVD (fedllm.federation.aggregation).
    lora_aggregation: Literal["factors", "product_svd"] = "factors"
    # The server rejects, for the round, a site's update whose L2 norm of its difference to the
    # global model is above this (None: no bound); NaN/Inf and a wrong name, shape or dtype
    # are always rejected (fedllm.federation.aggregation).
    max_update_norm: Optional[float] = None
    # What a site's update goes through before it leaves the site (fedllm.federation.privacy).
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    # The dtype weights travel and are kept in on the server: None = the dtype they train in
    # (float32, bfloat16 with ``training.precision: bf16-true``). ``bfloat16``/``float16`` halve
    # the bytes and the server's memory; with float32 training each round then rounds the
    # global model to it. The server's mean is still summed in float64, one tensor at a time.
    exchange_dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None


@dataclass
class BaselinesConfig:
    """The settings trained beside the federation, on the same budget.

    ``lora_aggregations``: more FedAvg settings, one per LoRA aggregation listed (other
    than ``federation.lora_aggregation``), run side by side as ``fedavg:<aggregation>``.
    ``algorithms``: more federated settings, one per algorithm listed (other than
    ``federation.algorithm``, with its ``federation.<algorithm>`` parameters), run side by
    side on the same sites as ``fedavg:<algorithm>``: FedAvg and FedProx in one table.
    """

    site_alone: bool = True
    centralized: bool = True
    lora_aggregations: list[str] = field(default_factory=list)
    algorithms: list[str] = field(default_factory=list)
    # With ``federation.privacy`` on: the same federation without any privacy filter, beside
    # it as ``fedavg:non_private``, so the report shows what the privacy costs.
    non_private: bool = False


@dataclass
class TaskMetricConfig:
    """The fine-tuning task's own metric, scored on every setting's model.

    ``label_choice``: for each row of the pooled ``split`` of every site, the answer
    among ``choices`` (default: the distinct answers of the training data, e.g.
    PhraseBank's negative / neutral / positive) with the highest log-likelihood after
    the row's prompt; reported as accuracy and macro-F1 over the choices, after every
    round (FedAvg) or its step-budget equivalent (each site alone, centralized).
    """

    metric: Optional[Literal["label_choice"]] = None
    split: Literal["test", "val"] = "test"
    choices: Optional[list[str]] = None
    batch_size: int = 32


@dataclass
class EvaluationConfig:
    """Zero-shot lm-eval benchmark of every setting (see fedllm.evaluate), and the
    task's own metric (``task``)."""

    enabled: bool = True
    tasks: list[str] = field(default_factory=lambda: ["hellaswag", "piqa", "winogrande"])
    limit: Optional[int] = None
    batch_size: str = "auto"
    task_data_dir: Optional[str] = None
    task: TaskMetricConfig = field(default_factory=TaskMetricConfig)


@dataclass
class MLflowTracking:
    """An MLflow tracking server: ``uri`` (``http://host:5000``, or any URI MLflow takes),
    and the experiment the run's MLflow runs go to (default: the config's ``name``)."""

    uri: str = ""
    experiment: Optional[str] = None


@dataclass
class TrackingConfig:
    """Metrics streamed while the run trains (see fedllm.tracking): per site and for the
    global model, for the federation (through NVFlare's analytics receivers) and every
    baseline. ``tensorboard``: event files under ``<run>/tracking/tensorboard``.
    ``mlflow``: one MLflow run per setting, the config as its parameters. Off by default;
    either needs ``pip install 'fedllm[tracking]'``. Not part of the config's fingerprint:
    tracking does not change what is trained."""

    tensorboard: bool = False
    mlflow: Optional[MLflowTracking] = None

    @property
    def enabled(self) -> bool:
        return self.tensorboard or self.mlflow is not None


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 1234
    output_dir: str = "runs/experiment"
    data_dir: Optional[str] = None
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    # -- derived values a caller may rely on ---------------------------------
    def resolve_data_path(self, path: str) -> str:
        """A source path as a loader reads it: URIs and absolute paths as given,
        relative paths against the config's ``data_dir``, or ``$FEDLLM_DATA_DIR``
        when the config names none."""
        if "://" in path or os.path.isabs(path):
            return path
        base = self.data_dir or os.environ.get("FEDLLM_DATA_DIR")
        return str(Path(base) / path) if base else path

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """sha256 of the canonical config, recorded beside every checkpoint (``tracking``
        left out: where metrics go changes no result, and a run may be resumed with it)."""
        tree = self.to_dict()
        tree.pop("tracking")
        canonical = json.dumps(tree, sort_keys=True, default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()


# --------------------------------------------------------------------------
# loading and validation
# --------------------------------------------------------------------------


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_describe(a) for a in args) + " or null"
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if origin is dict or tp is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping with fields " + ", ".join(f.name for f in dataclasses.fields(tp))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except FedllmError as e:
                errors.append(e)
        if len(errors) == 1 and isinstance(value, dict):
            raise errors[0]  # an optional section: its own error names the field inside it
        raise FedllmError(f"config field '{where}': expected {_describe(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise FedllmError(
                f"config field '{where}': {value!r} is not allowed; "
                f"allowed values: {', '.join(str(a) for a in typing.get_args(tp))}"
            )
        return value
    if origin is list:
        if not isinstance(value, list):
            raise FedllmError(f"config field '{where}': expected {_describe(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise FedllmError(f"config field '{where}': expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise FedllmError(f"config field '{where}': expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise FedllmError(f"config field '{where}': expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads "5e-6" as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise FedllmError(f"config field '{where}': expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise FedllmError(f"config field '{where}': expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise FedllmError(f"config field '{where or '<top>'}': expected {_describe(cls)}, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise FedllmError(
            f"config field '{prefix}{unknown[0]}' is unknown; "
            f"allowed fields{' of ' + where if where else ''}: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{where}.{name}" if where else name)
    return cls(**kwargs)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        if isinstance(node, list):
            node = node[int(part)]
            continue
        node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise FedllmError(f"--set {dotted}: '{part}' is not a section")
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` strings; values are parsed as YAML (numbers, lists...)."""
    for item in overrides or []:
        if "=" not in item:
            raise FedllmError(f"--set {item!r}: expected key=value, e.g. federation.rounds=5")
        key, raw = item.split("=", 1)
        _set_path(tree, key.strip(), yaml.safe_load(raw) if raw != "" else "")
    return tree


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Checks that span several fields, and the names that registries own; each error
    names the field."""
    check_registered_names(cfg)
    if cfg.method.name == "sft" and cfg.method.params:
        raise FedllmError("config field 'method.params': sft takes no parameters")
    if not cfg.data.sources:
        raise FedllmError("config field 'data.sources': at least one source is required")
    seen = set()
    for i, src in enumerate(cfg.data.sources):
        if not src.name:
            raise FedllmError(f"config field 'data.sources[{i}].name': a name is required")
        if not src.path:
            raise FedllmError(f"config field 'data.sources[{i}].path': a path or URI is required")
        if src.name in seen:
            raise FedllmError(f"config field 'data.sources[{i}].name': duplicate source name {src.name!r}")
        seen.add(src.name)
    part = cfg.data.partition
    if part.strategy == "dirichlet" and part.alpha <= 0:
        raise FedllmError(f"config field 'data.partition.alpha': must be > 0 for dirichlet, got {part.alpha}")
    if part.strategy in ("iid", "dirichlet") and (part.num_sites is None or part.num_sites < 1):
        raise FedllmError(f"config field 'data.partition.num_sites': a positive integer is required for {part.strategy}")
    s = cfg.data.split
    if min(s.train, s.val, s.test) < 0 or abs(s.train + s.val + s.test - 1.0) > 1e-6 or s.train <= 0 or s.val <= 0:
        raise FedllmError(
            f"config field 'data.split': train/val/test must be ≥ 0 and sum to 1 with train, val > 0; "
            f"got {s.train}/{s.val}/{s.test}"
        )
    t = cfg.training
    if t.steps_per_round is None and t.epochs_per_round is None:
        raise FedllmError("config field 'training.steps_per_round': give steps_per_round or epochs_per_round")
    for name in ("micro_batch_size", "grad_accumulation", "max_seq_length", "val_batch_size"):
        if getattr(t, name) < 1:
            raise FedllmError(f"config field 'training.{name}': must be ≥ 1, got {getattr(t, name)}")
    if t.steps_per_round is not None and t.steps_per_round < 1:
        raise FedllmError(f"config field 'training.steps_per_round': must be ≥ 1, got {t.steps_per_round}")
    if t.lr <= 0:
        raise FedllmError(f"config field 'training.lr': must be > 0, got {t.lr}")
    if t.processes_per_site < 1:
        raise FedllmError(f"config field 'training.processes_per_site': must be ≥ 1, got {t.processes_per_site}")
    if t.processes_per_site > 1 and cfg.federation.algorithm == "fedprox":
        raise FedllmError("config field 'training.processes_per_site': FedProx's proximal term is computed in one "
                          "process; train FedProx sites with processes_per_site: 1")
    if t.processes_per_site > 1 and t.backend != "nemo":
        raise FedllmError("config field 'training.processes_per_site': a site trains in several processes with "
                          f"training.backend: nemo (FSDP2); the {t.backend} backend trains a site in one")
    if t.backend == "nemo":
        from fedllm.train.nemo import check_nemo_method  # imports no NeMo

        check_nemo_method(cfg.method.name, cfg.method.params)
    if len(t.adam_betas) != 2:
        raise FedllmError(f"config field 'training.adam_betas': expected two numbers, got {t.adam_betas}")
    for i, aggregation in enumerate(cfg.baselines.lora_aggregations):
        allowed = typing.get_args(typing.get_type_hints(FederationConfig)["lora_aggregation"])
        if aggregation not in allowed:
            raise FedllmError(
                f"config field 'baselines.lora_aggregations[{i}]': {aggregation!r} is not allowed; "
                f"allowed values: {', '.join(allowed)}"
            )
        if cfg.method.name != "lora":
            raise FedllmError(f"config field 'baselines.lora_aggregations': needs method.name lora, got {cfg.method.name!r}")
    if cfg.federation.rounds < 1:
        raise FedllmError(f"config field 'federation.rounds': must be ≥ 1, got {cfg.federation.rounds}")
    fed = cfg.federation
    if fed.min_clients is not None and fed.min_clients < 1:
        raise FedllmError(f"config field 'federation.min_clients': must be ≥ 1, got {fed.min_clients}")
    for name in ("wait_after_min_clients", "round_timeout"):
        if getattr(fed, name) is not None and getattr(fed, name) <= 0:
            raise FedllmError(f"config field 'federation.{name}': must be > 0 seconds (or null: derived), got {getattr(fed, name)}")
    if fed.min_bandwidth_mb_s <= 0:
        raise FedllmError(f"config field 'federation.min_bandwidth_mb_s': must be > 0, got {fed.min_bandwidth_mb_s}")
    from fedllm.federation.transfer import check_transfer_timeouts  # imports no NVFlare

    check_transfer_timeouts(fed.transfer_timeouts)
    if fed.max_update_norm is not None and not 0 < fed.max_update_norm < float("inf"):
        raise FedllmError(
            f"config field 'federation.max_update_norm': must be a number > 0 (or null: no bound), got {fed.max_update_norm}"
        )
    if cfg.tracking.enabled:
        from fedllm.tracking import check_tracking  # imports neither MLflow nor TensorBoard

        check_tracking(cfg.tracking)
    return cfg


def check_registered_names(cfg: ExperimentConfig) -> None:
    """Method, federated algorithm, partition strategy, prompt template, record formats and quantization are checked against
    the registries that implement them, so adding one touches its own module only.
    Imported here, not at the top: those modules import this one."""
    from fedllm.data.formats import get_format
    from fedllm.data.partition import get_partitioner
    from fedllm.data.prompts import get_template
    from fedllm.federation.algorithms import check_algorithm, get_algorithm
    from fedllm.train.methods import get_method

    get_method(cfg.method.name)
    check_algorithm(cfg.federation)
    for i, name in enumerate(cfg.baselines.algorithms):
        get_algorithm(name, f"baselines.algorithms[{i}]")
    get_partitioner(cfg.data.partition.strategy)
    get_template(cfg.data.template)
    for i, src in enumerate(cfg.data.sources):
        get_format(src.format, f"data.sources[{i}].format")
    if cfg.federation.quantization is not None:
        # only a run that quantizes pays for importing NVFlare's quantizers here
        from fedllm.federation.quantization import check_mode

        check_mode(cfg.federation.quantization)
    privacy = cfg.federation.privacy
    if cfg.baselines.non_private and not privacy.enabled:
        raise FedllmError("config field 'baselines.non_private': needs a privacy filter in federation.privacy "
                          "(without one, fedavg is already non-private)")
    if privacy.enabled:
        # only a run with privacy filters pays for importing them (NVFlare's) here
        from fedllm.federation.privacy import check_privacy

        check_privacy(privacy)


def config_from_dict(tree: dict, source: str = "<config>") -> ExperimentConfig:
    return validate(_build(ExperimentConfig, tree, ""))


def load_config(path: str | os.PathLike, overrides: Optional[list[str]] = None) -> ExperimentConfig:
    """Read, override and validate an experiment config.

    Raises FedllmError naming the file (and line, for YAML syntax errors) or the
    offending field.
    """
    path = Path(path)
    if not path.is_file():
        raise FedllmError(f"{path}: config file not found")
    from fedllm.files import read_yaml

    tree = read_yaml(path) or {}
    if not isinstance(tree, dict):
        raise FedllmError(f"{path}: expected a mapping at the top level")
    apply_overrides(tree, overrides or [])
    try:
        cfg = config_from_dict(tree, str(path))
    except FedllmError as e:
        raise FedllmError(f"{path}: {e}") from None
    if cfg.data_dir and "://" not in cfg.data_dir:
        # Relative to where the user ran the command, fixed now: the resolved
        # config.yaml a run dir keeps is read later from other working dirs.
        cfg.data_dir = os.path.abspath(cfg.data_dir)
    return cfg


def dump_config(cfg: ExperimentConfig, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
