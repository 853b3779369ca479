"""Privacy filters on what a site sends: applied at the site, before anything leaves it.

``federation.privacy`` puts NVFlare client output filters on the ``train`` task, in this
order (each sees what the one before it made):

1. ``exclude_vars``: NVFlare's ``ExcludeVars``. The named weights (a list of names, or one
   regular expression searched in every name) are removed from the site's update: they
   never leave the site. The server keeps them at the global model's value
   (:class:`KeepExcludedGlobal`, a server input filter that puts the server's own global
   value back under each missing excluded name, so the aggregator sees complete updates
   and the global model's value of those weights does not change).
2. ``percentile``: NVFlare's ``PercentilePrivacy`` (Shokri & Shmatikov) on the site's update
   difference (sent − received global): coordinates whose |difference| is below the
   ``percentile``-th percentile are zeroed, the rest clipped to ±``gamma``; the site sends
   global + that. (NVFlare's filter takes its input as a difference; fedllm's sites send
   full weights, so :class:`UpdatePercentilePrivacy` hands it the difference, without the
   FedAvg weight in its meta, so ``gamma`` bounds the difference itself.)
3. ``dp``: DP-FedAvg's Gaussian mechanism on the site's update (:class:`GaussianUpdate`):
   the difference Δ = sent − received global, over all exchanged tensors together (those
   left after 1 and 2), is clipped to L2 norm ``clip_norm`` C (Δ·min(1, C/‖Δ‖)), Gaussian
   noise N(0, (``noise_multiplier``·C)²) is added to every coordinate, and the site sends
   global + noisy clipped Δ, in the weights' own dtype. With ``noise_multiplier`` 0 and
   ‖Δ‖ ≤ C (always, for C = inf) the sent tensors are returned untouched: bit for bit FedAvg.

The received global weights come from a client input filter (:class:`RememberReceived`)
that keeps a reference (no copy) to the task's incoming tensors — only the exchanged ones,
the adapter for PEFT — in the task's FLContext, which NVFlare's client runner passes through
input filters, training and output filters; it goes with the task's context.

The guarantee (``dp``), stated precisely: per site, with local noise, each site's
sequence of released updates is (ε, δ)-differentially private at the site level — the
neighbouring input is the site's whole contribution added or removed (its clipped update
replaced by a zero update), the sensitivity of one round's release is then C — accounted
with Opacus' RDP accountant for ``rounds`` compositions of the Gaussian mechanism with noise
multiplier σ and sample rate 1 (every site takes part in every round; no amplification
by sampling), converted to ε at ``delta``. Replacing the site's data by other data
(replace adjacency) has sensitivity 2C: the ε of noise multiplier σ/2. It accounts for
nothing else: not the FedAvg weight sent with the update (the site's sample or step count),
not the validation metrics sent with it, not the event logs, not ``exclude_vars`` weights
(they never leave), not what ``percentile`` alone releases (no DP guarantee of its own),
not the server's or other sites' noise (none is added there), and not a receiver that knows
the noise's seed. By default (``dp.seed`` null) each site seeds its noise from the operating
system's entropy every round, so nobody can regenerate it and a rerun draws other noise.
``dp.seed`` makes the noise reproducible (seeded by (seed, site, round)) for tests and
benchmarks: whoever knows that seed (it is in the run's config) can subtract the noise, so
a run with ``dp.seed`` set has no guarantee against the server.

Each site emits a ``privacy`` event per round (site, round, epsilon spent over rounds
0..round, delta, noise_multiplier, clip_norm, update_norm: ‖Δ‖ before clipping;
``epsilon`` is absent when noise_multiplier is 0, ``clip_norm`` when infinite), and the
federation's summary entry records the run's total (:func:`privacy_record`).
"""

from __future__ import annotations

import math
import re
import secrets
import zlib
from typing import Optional, Union

import numpy as np
import torch
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.model import ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.filters import ExcludeVars, PercentilePrivacy

from fedllm import events
from fedllm.errors import FedllmError
from fedllm.rundir import RunDir

#: the task FLContext's key under which RememberReceived keeps the incoming global weights
RECEIVED = "fedllm.privacy.received"
ACCOUNTANT = "opacus RDP"
MECHANISM = "Gaussian (DP-FedAvg: each site clips its update to L2 norm clip_norm and adds N(0, (noise_multiplier·clip_norm)²))"
ADJACENCY = ("site-level add/remove: a site's whole contribution (its clipped update vs. none); per site, local noise; "
             "replacing a site's data is the epsilon of noise_multiplier/2")


def enabled(privacy) -> bool:
    """Whether ``federation.privacy`` asks for any filter."""
    return privacy is not None and privacy.enabled


def check_privacy(privacy) -> None:
    """FedllmError naming the ``federation.privacy`` field that is wrong, and what would be accepted."""
    where = "federation.privacy"
    excluded = privacy.exclude_vars
    if excluded is not None:
        if isinstance(excluded, str):
            if not excluded:
                raise FedllmError(f"config field '{where}.exclude_vars': an empty pattern excludes nothing; "
                                  "give weight names or a regular expression")
            try:
                re.compile(excluded)
            except re.error as e:
                raise FedllmError(f"config field '{where}.exclude_vars': {excluded!r} is not a regular expression ({e})") from None
        elif not excluded or not all(isinstance(n, str) and n for n in excluded):
            raise FedllmError(f"config field '{where}.exclude_vars': expected a non-empty list of weight names "
                              f"or a regular expression, got {excluded!r}")
    if privacy.percentile is not None:
        p = privacy.percentile
        if not 0 <= p.percentile <= 100:
            raise FedllmError(f"config field '{where}.percentile.percentile': must be in [0, 100], got {p.percentile}")
        if not math.isfinite(p.gamma) or p.gamma <= 0:
            raise FedllmError(f"config field '{where}.percentile.gamma': must be a finite number > 0, got {p.gamma}")
    if privacy.dp is not None:
        dp = privacy.dp
        if math.isnan(dp.clip_norm) or dp.clip_norm <= 0:
            raise FedllmError(f"config field '{where}.dp.clip_norm': must be > 0 (inf: no clipping), got {dp.clip_norm}")
        if not math.isfinite(dp.noise_multiplier) or dp.noise_multiplier < 0:
            raise FedllmError(f"config field '{where}.dp.noise_multiplier': must be a finite number ≥ 0, got {dp.noise_multiplier}")
        if dp.noise_multiplier > 0 and math.isinf(dp.clip_norm):
            raise FedllmError(f"config field '{where}.dp.clip_norm': must be finite when noise_multiplier > 0 "
                              f"(the noise's std is noise_multiplier·clip_norm), got {dp.clip_norm}")
        if not 0 < dp.delta < 1:
            raise FedllmError(f"config field '{where}.dp.delta': must be in (0, 1), got {dp.delta}")


def epsilon_after(rounds: int, noise_multiplier: float, delta: float) -> Optional[float]:
    """ε spent after ``rounds`` rounds at ``delta``: Opacus' RDP accountant, one Gaussian
    step per round at sample rate 1. None (no guarantee) when ``noise_multiplier`` is 0."""
    if noise_multiplier <= 0:
        return None
    if rounds <= 0:
        return 0.0
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    # what ``rounds`` calls of accountant.step(noise_multiplier=σ, sample_rate=1.0) record
    accountant.history = [(float(noise_multiplier), 1.0, int(rounds))]
    return float(accountant.get_epsilon(delta=delta))


def privacy_record(cfg) -> Optional[dict]:
    """What summary.json keeps of ``federation.privacy`` (None when no filter is on): the
    filters, and for ``dp`` the mechanism, accountant, sample rate, adjacency, rounds and the
    run's total ε at δ (null ε: noise_multiplier 0, no guarantee; null clip_norm: inf)."""
    privacy = cfg.federation.privacy
    if not enabled(privacy):
        return None
    record = {
        "exclude_vars": privacy.exclude_vars,
        "percentile": ({"percentile": privacy.percentile.percentile, "gamma": privacy.percentile.gamma}
                       if privacy.percentile is not None else None),
        "mechanism": None,
    }
    dp = privacy.dp
    if dp is not None:
        rounds = cfg.federation.rounds
        record.update({
            "mechanism": MECHANISM,
            "accountant": ACCOUNTANT,
            "sample_rate": 1.0,
            "adjacency": ADJACENCY,
            "rounds": rounds,
            "noise_multiplier": dp.noise_multiplier,
            "clip_norm": dp.clip_norm if math.isfinite(dp.clip_norm) else None,
            "epsilon": epsilon_after(rounds, dp.noise_multiplier, dp.delta),
            "delta": dp.delta,
        })
    return record


def add_site_privacy(recipe, cfg, run_dir: str) -> None:
    """The site output filters of ``federation.privacy`` on ``recipe``'s ``train`` task, in place.

    Call before ``add_quantization`` (the update is made private, then compressed) and
    :func:`add_privacy_inputs` after it (the filters compare with the global model as the
    site trained from it, dequantized). ``run_dir``: the run dir whose site event logs
    get the ``privacy`` events.
    """
    privacy = cfg.federation.privacy
    if privacy.exclude_vars is not None:
        excluded = privacy.exclude_vars
        site_filter = ExcludeVars(exclude_vars=list(excluded)) if isinstance(excluded, list) else ExcludeVarsPattern(excluded)
        recipe.add_client_output_filter(site_filter, tasks=["train"])
    if privacy.percentile is not None:
        recipe.add_client_output_filter(
            UpdatePercentilePrivacy(percentile=privacy.percentile.percentile, gamma=privacy.percentile.gamma),
            tasks=["train"])
    if privacy.dp is not None:
        dp = privacy.dp
        recipe.add_client_output_filter(
            GaussianUpdate(clip_norm=dp.clip_norm, noise_multiplier=dp.noise_multiplier, delta=dp.delta,
                           seed=dp.seed, run_dir=str(run_dir)),
            tasks=["train"])


def add_privacy_inputs(recipe, cfg) -> None:
    """The input filters ``add_site_privacy``'s need, after any dequantizer: the sites remember
    the global weights they received; the server puts its global value back under excluded names."""
    privacy = cfg.federation.privacy
    if privacy.percentile is not None or privacy.dp is not None:
        recipe.add_client_input_filter(RememberReceived(), tasks=["train"])
    if privacy.exclude_vars is not None:
        recipe.add_server_input_filter(KeepExcludedGlobal(exclude_vars=privacy.exclude_vars), tasks=["train"])


def noise_seed(seed: int, site: str, round_number) -> int:
    """The seed of a site's noise in a round (distinct from its training seeds)."""
    return zlib.crc32(f"privacy/{seed}/{site}/{round_number}".encode())


def clip_and_noise(sent: dict, received: Optional[dict], clip_norm: float, noise_multiplier: float,
                   generator: Optional[torch.Generator] = None) -> tuple[Optional[dict], float]:
    """``(what the site sends, ‖Δ‖)`` for DP-FedAvg, Δ = ``sent`` − ``received`` (``received``
    None: ``sent`` is Δ itself, a WEIGHT_DIFF update).

    Δ is clipped to L2 norm ``clip_norm`` over all tensors together and N(0,
    (noise_multiplier·clip_norm)²) is added per coordinate, drawn from ``generator`` in the
    tensors' name order; the result is received + that, in each tensor's dtype (and type:
    torch or numpy). None instead of a dict when nothing changes (noise_multiplier 0 and
    ‖Δ‖ ≤ clip_norm): the caller sends ``sent`` untouched. ``sent`` is not modified.
    """
    missing = [name for name in sent if received is not None and name not in received]
    if missing:
        raise FedllmError(f"privacy: the site sends {missing[0]!r}, which the global model it received does not hold; "
                          "cannot compute its update")
    norm2 = 0.0
    for name in sent:  # one tensor's difference at a time: no second copy of the update
        diff = _difference(sent, received, name, torch.float64)
        norm2 += float(torch.sum(diff * diff))
    norm = math.sqrt(norm2)
    if noise_multiplier == 0 and norm <= clip_norm:
        return None, norm
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    std = noise_multiplier * clip_norm
    out = {}
    for name in sorted(sent):
        value = sent[name]
        work = torch.promote_types(_as_tensor(value).dtype, torch.float32)
        diff = _difference(sent, received, name, work) * scale
        if std > 0:
            diff += torch.randn(diff.shape, generator=generator, dtype=work) * std
        if received is not None:
            diff += _as_tensor(received[name]).to(work)
        out[name] = _like(diff, value)
    return {name: out[name] for name in sent}, norm


def _as_tensor(value) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))


def _difference(sent: dict, received: Optional[dict], name: str, dtype) -> torch.Tensor:
    value = _as_tensor(sent[name])
    if not (value.is_floating_point()):
        raise FedllmError(f"privacy: weight {name!r} has dtype {value.dtype}; only floating-point updates can be clipped and noised")
    value = value.to(dtype)
    return value if received is None else value - _as_tensor(received[name]).to(dtype)


def _like(result: torch.Tensor, template):
    """``result`` in ``template``'s dtype and container (torch tensor or numpy array)."""
    if isinstance(template, torch.Tensor):
        return result.to(template.dtype)
    return result.numpy().astype(np.asarray(template).dtype)


def _received(fl_ctx: FLContext, dxo: DXO, who: str) -> Optional[dict]:
    """The global weights this task received (None for a WEIGHT_DIFF update, which is its own difference)."""
    if dxo.data_kind == DataKind.WEIGHT_DIFF:
        return None
    remembered = fl_ctx.get_prop(RECEIVED)
    if remembered is None:
        raise FedllmError(f"privacy: {who} needs the global weights the site received; "
                          "add fedllm.federation.privacy.RememberReceived as a client input filter on the task")
    return remembered["weights"]


class RememberReceived(Filter):
    """Client input filter: keeps the task's incoming global weights (references, not copies)
    and round in the task's FLContext, for :class:`UpdatePercentilePrivacy` and :class:`GaussianUpdate`."""

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        dxo = from_shareable(shareable)
        fl_ctx.set_prop(RECEIVED, {"weights": dict(dxo.data or {}),
                                   "round": shareable.get_header(AppConstants.CURRENT_ROUND)},
                        private=True, sticky=False)
        return shareable


class ExcludeVarsPattern(ExcludeVars):
    """NVFlare's ``ExcludeVars`` with a regular expression that survives the Job API.

    ``ExcludeVars`` compiles a string into the ``exclude_vars`` attribute, which the Job API
    reads back as the constructor's argument (and cannot write a compiled pattern into the
    job's config): this keeps the string there and hands ``ExcludeVars`` the compiled pattern
    while it filters.
    """

    def __init__(self, exclude_vars: str = ""):
        super().__init__(exclude_vars=exclude_vars)
        self._pattern = self.exclude_vars
        self.exclude_vars = exclude_vars

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> Union[None, DXO]:
        source, self.exclude_vars = self.exclude_vars, self._pattern
        try:
            return super().process_dxo(dxo, shareable, fl_ctx)
        finally:
            self.exclude_vars = source


class UpdatePercentilePrivacy(PercentilePrivacy):
    """NVFlare's ``PercentilePrivacy`` applied to the site's update difference (sent − received
    global); the site sends global + the filtered difference, in the weights' dtypes.

    Constructor arguments are kept as same-named attributes: NVFlare's Job API re-creates
    the component from them.
    """

    def __init__(self, percentile: int = 10, gamma: float = 0.01):
        super().__init__(percentile=percentile, gamma=gamma, data_kinds=[DataKind.WEIGHTS, DataKind.WEIGHT_DIFF])

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> Union[None, DXO]:
        received = _received(fl_ctx, dxo, "percentile")
        diff = {name: _difference(dxo.data, received, name, torch.float32).numpy() for name in dxo.data}
        # no meta: NVFlare's filter would divide by the FedAvg weight (fedllm's sample count)
        filtered = super().process_dxo(DXO(DataKind.WEIGHT_DIFF, data=diff), shareable, fl_ctx)
        if filtered is None:
            return None
        out = {}
        for name, value in dxo.data.items():
            result = torch.as_tensor(np.asarray(filtered.data[name], dtype=np.float32))
            if received is not None:
                result = result + _as_tensor(received[name]).to(torch.float32)
            out[name] = _like(result, value)
        dxo.data = out
        return dxo


class GaussianUpdate(Filter):
    """Client output filter: DP-FedAvg's clipped, noised update (:func:`clip_and_noise`), and a
    ``privacy`` event with the ε spent so far (module docstring).

    Args:
        clip_norm: C, the L2 bound of the update (inf: no clipping).
        noise_multiplier: σ; the noise's std is σ·C.
        delta: δ of the reported ε.
        seed: with the site's name and the round, seeds the noise (reproducible, no guarantee
            against whoever knows it); None: the operating system's entropy, every round.
        run_dir: the run dir whose site event log (``events/site-<site>.jsonl``) gets the
            ``privacy`` events ("" for stdout only).

    Constructor arguments are kept as same-named attributes: NVFlare's Job API re-creates
    the component from them.
    """

    def __init__(self, clip_norm: float = 1.0, noise_multiplier: float = 1.0, delta: float = 1e-5,
                 seed: Optional[int] = None, run_dir: str = ""):
        super().__init__()
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.delta = delta
        self.seed = seed
        self.run_dir = run_dir

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return shareable
        dxo = from_shareable(shareable)
        if dxo.data_kind not in (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF):
            raise FedllmError(f"privacy: dp cannot filter a {dxo.data_kind} result; expected weights or a weight difference")
        received = _received(fl_ctx, dxo, "dp")
        remembered = fl_ctx.get_prop(RECEIVED) or {}
        round_number = remembered.get("round", shareable.get_header(AppConstants.CURRENT_ROUND))
        site = fl_ctx.get_identity_name()
        generator = torch.Generator().manual_seed(
            secrets.randbits(63) if self.seed is None else noise_seed(self.seed, site, round_number))
        sent, norm = clip_and_noise(dxo.data, received, float(self.clip_norm), float(self.noise_multiplier), generator)
        if sent is not None:
            dxo.data = sent
            dxo.update_shareable(shareable)
        epsilon = epsilon_after(int(round_number or 0) + 1, float(self.noise_multiplier), float(self.delta))
        events.emit(
            "privacy",
            file=RunDir(self.run_dir).site_events(site) if self.run_dir else None,
            site=site,
            round=round_number,
            epsilon=epsilon,
            delta=self.delta,
            noise_multiplier=self.noise_multiplier,
            clip_norm=self.clip_norm if math.isfinite(self.clip_norm) else None,
            update_norm=norm,
        )
        return shareable


class KeepExcludedGlobal(Filter):
    """Server input filter: every name ``exclude_vars`` matches (ExcludeVars' rule: in the
    list, or the pattern found in it) that a site's update lacks gets the server's current
    global value (``AppConstants.GLOBAL_MODEL``, which the FedAvg controller keeps in its
    context), so the aggregator sees a complete update and those weights keep their global
    value. Nothing of the site's is added.

    Constructor arguments are kept as same-named attributes: NVFlare's Job API re-creates
    the component from them.
    """

    def __init__(self, exclude_vars: Union[list, str, None] = None):
        super().__init__()
        self.exclude_vars = exclude_vars

    def _excluded(self, name: str) -> bool:
        if isinstance(self.exclude_vars, str):
            return re.search(self.exclude_vars, name) is not None
        return name in (self.exclude_vars or [])

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return shareable
        dxo = from_shareable(shareable)
        if dxo.data_kind != DataKind.WEIGHTS:
            return shareable  # a difference's missing names are zero: nothing to add
        model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
        weights = model.get(ModelLearnableKey.WEIGHTS) if model is not None else None
        if not weights:
            self.log_warning(fl_ctx, "privacy: no global model in the server's context; excluded weights left missing")
            return shareable
        missing = [name for name in weights if name not in dxo.data and self._excluded(name)]
        if missing:
            for name in missing:
                dxo.data[name] = weights[name]
            dxo.update_shareable(shareable)
        return shareable
