"""FedAvg aggregation that holds one running sum and frees each site's update as it is added.

The server receives one site's weights at a time. ``RunningWeightedAverage`` adds them,
tensor by tensor, into a single accumulator (``sum += weight * update``) and drops each
tensor of the update from the site's result as soon as it is added, so the memory an update
occupies is released while the rest of it is still being summed. At the end of the round
the accumulator is divided by the total weight in place and handed to the controller.
Memory held across a round: one float64 accumulator (twice the fp32 model), whatever the
number of sites.

With NVFlare's tensor disk offload (``enable_tensor_disk_offload=True`` on the FedAvg
controller, which fedllm ships), an update arrives as references to tensors in files on
disk. Then nothing is summed on arrival: the aggregator keeps the references (bytes each)
and, at the end of the round, sums each parameter over the sites in site-name order, one
tensor at a time. Memory held across a round: the result, once (the fp32 model), whatever
the number of sites; the order the sites reported in cannot change a bit of it.

With ``begin_round(global, round, into_global=True)`` (fedllm's FedAvg controller,
fedllm.federation.participation) there is not even that: each parameter's mean is written
into the global model's own tensor as soon as it is finished, so the server holds one
model plus one parameter's float64 sum, and the result hands back the global model's
tensors. Nothing is written before every update was checked, so a round whose updates are
all rejected leaves the global model as it was.

NVFlare's built-in FedAvg aggregation (``WeightedAggregationHelper``, used when the recipe
gets no ``aggregator``) also sums as results arrive, but keeps each site's whole update
alive until the callback returns. Use this one with the recipe's ``aggregator=`` argument:

    FedAvgRecipe(..., aggregator=RunningWeightedAverage())

A site's weight is its ``NUM_STEPS_CURRENT_ROUND`` (meta key set by the Client API;
1 when absent) times its entry in ``site_weights`` (1 when absent), as in NVFlare's FedAvg.

LoRA adapters (``lora_aggregation="product_svd"``): averaging A and B separately gives
mean(B)·mean(A), which is not the mean of the sites' updates mean(B_i·A_i). With
``product_svd`` the aggregator also sums w_i·B_i·A_i per adapted module in float64 (one
dense out×in matrix per module, whatever the number of sites), and at the end of the round
factors the exact mean back into the adapter's rank by truncated SVD. That costs one dense
float64 matrix and one SVD per adapted module on the server: what the base layer's own
weight would take, in float64.

A site's update is checked whole before any of it is summed (``accept_model`` returns
False and the site counts for nothing that round): every tensor finite, exactly the
global model's parameter names, shapes and dtypes, and, with ``max_update_norm``, the L2
norm of its difference to the global model within the bound. An offloaded update is read
for this one tensor at a time, each dropped once checked; the sum at the end of the round
reads it again. The controller hands the global model over with ``begin_round``.
"""

from __future__ import annotations

import re
from typing import Optional

import numpy as np

from nvflare.apis.fl_constant import FLMetaKey
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.aggregators.model_aggregator import ModelAggregator

from fedllm import events
from fedllm.errors import FedllmError

LORA_AGGREGATIONS = ("factors", "product_svd")

# peft's names: ``<module>.lora_A.<adapter>.weight`` [r, in] with ``<module>.lora_B.<adapter>.weight``
# [out, r] (Linear, GPT-2's Conv1D), and ``<module>.lora_embedding_A.<adapter>`` [r, num_embeddings]
# with ``<module>.lora_embedding_B.<adapter>`` [dim, r] (Embedding).
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<emb>embedding_)?(?P<side>[AB])\.(?P<adapter>[^.]+)(?P<suffix>\.weight)?$")


class RunningWeightedAverage(ModelAggregator):
    """Weighted mean of the sites' parameters, accumulated in place, one site at a time.

    Args:
        site_weights: optional extra weight per site name (e.g. ``{"site-1": 2.0}``); a site
            not listed weighs 1. Multiplied with the site's ``NUM_STEPS_CURRENT_ROUND``.
        lora_aggregation: ``"factors"`` (default) averages LoRA's A and B like any other
            parameter. ``"product_svd"``: per adapted module, the result's B'·A' is the best
            rank-r approximation (r = ``lora_A.shape[0]``) of the weighted mean of the sites'
            products B_i·A_i, computed in float64; A' = c·V_rᵀ (c: the averaged A's RMS row norm), B' = U_r·S_r/c, each
            column of U_r with a positive largest-magnitude entry. Every site must send A and
            B together (2-D, peft's names); the sites must send full weights, not differences.
        max_update_norm: reject an update whose L2 norm of its difference to the round's global
            model (all parameters together, in float64; a ``DIFF`` update's own norm) is above
            this. None: no bound. Needs ``begin_round``.
        events_file: where ``update_rejected`` events go besides stdout (the server's events
            file); "" for stdout only.

    Guarantees: ``aggregate_model()`` returns, per parameter name, the weighted mean over the
    sites that sent that parameter, in the dtype the first site sent it in (integer
    parameters are rounded), summed in float64 so the result does not depend on the
    order the sites' results arrive in. Works with numpy arrays and torch tensors. Metrics that are
    numbers are averaged with the same weights. The aggregator is reset after each call.
    With ``product_svd`` the result's meta also holds ``lora_aggregation``: ``{"method":
    "product_svd", "modules": <adapted modules>, "factor_error": ..., "svd_error": ...}``, where
    ``factor_error`` = ||mean(B)·mean(A) − mean(B·A)|| / ||mean(B·A)|| (what plain factor
    averaging would have got wrong) and ``svd_error`` = ||mean(B·A) − B'·A'|| / ||mean(B·A)||
    (what the rank-r truncation drops), Frobenius norms over all adapted modules together;
    both 0.0 when every product is zero. The SVD factors, like every mean, come out bit for
    bit the same whatever order the sites report in; the two errors only up to float64
    rounding.

    Rejected updates: ``accept_model`` returns False for a site whose update has a NaN or Inf,
    a parameter missing or not in the model, a shape or dtype other than the model's, or a
    norm above ``max_update_norm``; nothing of it (parameters, LoRA products, metrics)
    enters the round, which is then exactly the round of the other sites. The reference is
    the global model given to ``begin_round``; without it, the first accepted site's names,
    shapes and dtypes (and no norm bound). Each rejection emits an ``update_rejected`` event
    (``site="server"``, ``round``: begin_round's, else the update's ``current_round``;
    ``rejected_site``; ``reason``: the first bad parameter and what is wrong with it), and
    the result's meta lists ``rejected_sites``: ``{site: reason}``. ``aggregate_model``
    raises FedllmError rather than return a non-finite tensor.
    """

    def __init__(self, site_weights: Optional[dict] = None, lora_aggregation: str = "factors",
                 max_update_norm: Optional[float] = None, events_file: str = ""):
        super().__init__()
        if max_update_norm is not None and (
            not isinstance(max_update_norm, (int, float)) or isinstance(max_update_norm, bool)
            or not np.isfinite(max_update_norm) or max_update_norm <= 0
        ):
            raise FedllmError(
                f"RunningWeightedAverage max_update_norm={max_update_norm!r}: expected a number > 0, or None"
            )
        # Kept under the arguments' names, like the others below: the Job API re-creates the component.
        self.max_update_norm = None if max_update_norm is None else float(max_update_norm)
        self.events_file = events_file or ""
        # begin_round's global model (its tensors, not copies), their (shape, dtype) and the
        # round; kept across reset_stats, which the controller may call after begin_round.
        self._global: Optional[dict] = None
        self._global_spec: Optional[dict[str, tuple[tuple, str]]] = None
        self._round = None
        self._into_global = False
        if lora_aggregation not in LORA_AGGREGATIONS:
            raise FedllmError(
                f"RunningWeightedAverage lora_aggregation={lora_aggregation!r}: expected one of {', '.join(LORA_AGGREGATIONS)}"
            )
        # Kept under the argument's name: NVFlare's Job API re-creates the component from it.
        self.lora_aggregation = lora_aggregation
        self.site_weights = dict(site_weights or {})
        for site, weight in self.site_weights.items():
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight < 0:
                raise FedllmError(
                    f"RunningWeightedAverage site_weights[{site!r}]={weight!r}: expected a number >= 0"
                )
        self.reset_stats()

    def reset_stats(self) -> None:
        self._deferred: dict[str, tuple[float, dict]] = {}  # site -> (weight, {name: on-disk ref or tensor})
        self._sums: dict = {}
        self._weights: dict[str, float] = {}
        self._dtypes: dict = {}
        self._metric_sums: dict[str, float] = {}
        self._metric_weight = 0.0
        self._params_type = None
        self._sites: list[str] = []
        # product_svd: module -> (lora_A name, lora_B name); name -> its module
        self._pairs: dict[str, tuple[str, str]] = {}
        self._module_of: dict[str, str] = {}
        self._products: dict[str, np.ndarray] = {}  # module -> float64 sum of w_i·B_i·A_i
        self._product_weights: dict[str, float] = {}
        # without begin_round: the first accepted site's name -> (shape, dtype)
        self._first_site_spec: Optional[dict[str, tuple[tuple, str]]] = None
        self._rejected: dict[str, str] = {}  # site -> reason

    def begin_round(self, global_params: dict, round_number: int, into_global: bool = False) -> None:
        """The global model the sites trained from this round: what every update is checked
        against, until ``aggregate_model``. Its tensors are held, not copied, in a dict of
        the aggregator's own: NVFlare's quantization filter replaces the entries of the dict
        it sends, which is the controller's.

        ``into_global``: ``aggregate_model`` writes the round's mean into these very tensors,
        one parameter at a time, and returns them: the server then holds one model, not a
        global model and a result beside it. Only for a controller whose next global model
        is the mean itself (FedAvg; not FedOpt, which steps from the old global model)."""
        self._global = dict(global_params)
        self._global_spec = {name: (tuple(value.shape), _dtype_name(value)) for name, value in self._global.items()}
        self._round = round_number
        self._into_global = bool(into_global)

    def accept_model(self, model: FLModel) -> bool:
        """Add one site's result to the running sum; empties ``model.params`` while doing so.

        False, with nothing of the update added, when the update is rejected (see the class).
        """
        site = _site_name(model)
        if not model.params:
            raise FedllmError(f"RunningWeightedAverage: result from site {site!r} has no parameters")
        weight = self._site_weight(model, site)
        reason, sent = self._check_update(model.params, model.params_type)
        if reason is not None:
            self._reject(site, reason, model)
            return False
        if self._params_type is None:
            self._params_type = model.params_type
        elif model.params_type != self._params_type:
            raise FedllmError(
                f"RunningWeightedAverage: site {site!r} sent params_type={model.params_type}, "
                f"other sites sent {self._params_type}; all sites must send the same kind"
            )
        params = model.params
        pairs = self._register_pairs(site, params, model.params_type) if self.lora_aggregation == "product_svd" else {}
        if any(_is_on_disk(value) for value in params.values()):
            # Disk-offloaded update: keep the references, sum at the end in site order.
            if site in self._deferred:
                raise FedllmError(f"RunningWeightedAverage: site {site!r} sent two results in one round")
            self._deferred[site] = (weight, {name: params.pop(name) for name in list(params.keys())})
        else:
            # Products first, while the site's A and B are both still at hand; the factors
            # themselves are then summed like every other parameter (mean(B)·mean(A) is
            # the diagnostic's reference).
            for module, (a_name, b_name) in pairs.items():
                self._add_product(module, params[a_name], params[b_name], weight)
            # Pop each tensor before adding it: once added, the site's copy is garbage as soon
            # as this loop lets go of it, so the update never lives alongside a full second copy.
            for name in list(params.keys()):
                self._add(name, params.pop(name), weight)
        for key, value in (model.metrics or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._metric_sums[key] = self._metric_sums.get(key, 0.0) + weight * float(value)
        if model.metrics:
            self._metric_weight += weight
        self._sites.append(site)
        if self._global is None and self._first_site_spec is None:
            self._first_site_spec = sent
        return True

    def _check_update(self, params: dict, params_type) -> tuple[Optional[str], dict]:
        """(why ``params`` cannot enter this round, or None; their names -> (shape, dtype)).
        Reads an offloaded tensor one at a time and lets go of it before the next."""
        from nvflare.app_common.abstract.fl_model import ParamsType

        spec = self._global_spec if self._global is not None else self._first_site_spec
        if spec is not None:
            for name in spec:
                if name not in params:
                    return f"parameter {name!r} is missing", {}
            for name in params:
                if name not in spec:
                    return f"parameter {name!r} is not in the model", {}
        bound = self.max_update_norm if self._global is not None else None
        norm2 = 0.0
        sent = {}
        for name, value in params.items():
            if _is_on_disk(value):
                value = value.materialize()  # dropped at the next iteration
            shape, dtype = tuple(value.shape), _dtype_name(value)
            if spec is not None and shape != spec[name][0]:
                return f"parameter {name!r} has shape {shape}, the model's is {spec[name][0]}", {}
            if spec is not None and dtype != spec[name][1]:
                return f"parameter {name!r} has dtype {dtype}, the model's is {spec[name][1]}", {}
            bad = _non_finite(value)
            if bad:
                return f"parameter {name!r} has {bad} values", {}
            if bound is not None:
                update = _float64_numpy(value)
                if params_type != ParamsType.DIFF:
                    update = update - _float64_numpy(self._global[name])
                norm2 += float(np.sum(np.square(update)))
            sent[name] = (shape, dtype)
        if bound is not None and not np.sqrt(norm2) <= bound:
            return f"update norm {np.sqrt(norm2):.6g} is above federation.max_update_norm={bound:g}", {}
        return None, sent

    def _reject(self, site: str, reason: str, model: FLModel) -> None:
        self._rejected[site] = reason
        model.params.clear()  # nothing of it is kept
        events.emit("update_rejected", file=self.events_file or None, site="server",
                    round=self._round if self._round is not None else model.current_round,
                    rejected_site=site, reason=reason)

    def aggregate_model(self) -> FLModel:
        """The weighted mean of everything accepted since the last call; then reset."""
        if not self._sums and not self._deferred:
            rejected = f" (rejected: {self._rejected})" if self._rejected else ""
            raise FedllmError(f"RunningWeightedAverage: no site results to aggregate this round{rejected}")
        params = {}
        # With into_global each finished mean goes into the global model's own tensor at once,
        # so at most one parameter's float64 sum and its cast exist besides the one model.
        keep = self._into_global_writer()
        order = self._deferred_names()
        # Disk-offloaded updates: one parameter at a time, its sites in name order, so only
        # that parameter's float64 sum exists besides the finished fp32 result. A LoRA pair
        # is read together (its product needs both), then finished with the SVD below.
        for name in order:
            module = self._module_of.get(name)
            if module is not None:
                self._add_deferred_pair(module)
                continue
            for site in sorted(self._deferred):
                weight, update = self._deferred[site]
                if name in update:
                    self._add(name, update.pop(name), weight)  # the file is read here, once
            params[name] = keep(name, self._finish(name))
        self._deferred = {}
        order += [name for name in self._sums if name not in params and name not in order]
        for name in list(self._sums.keys()):
            if name not in self._module_of:
                params[name] = keep(name, self._finish(name))
        meta = {"nr_aggregated": len(self._sites), "aggregated_sites": list(self._sites),
                "rejected_sites": dict(self._rejected)}
        if self.lora_aggregation == "product_svd":
            meta["lora_aggregation"] = self._finish_products(params)
            for a_name, b_name in self._pairs.values():
                params[a_name], params[b_name] = keep(a_name, params[a_name]), keep(b_name, params[b_name])
        params = {name: params[name] for name in order}
        for name, value in params.items():
            # Cannot happen after _check_update; the persisted global model must never hold one.
            bad = _non_finite(value)
            if bad:
                raise FedllmError(
                    f"RunningWeightedAverage: the aggregated parameter {name!r} has {bad} values "
                    f"(sites {self._sites}); the round's global model is not saved"
                )
        metrics = None
        if self._metric_sums and self._metric_weight > 0:
            metrics = {k: v / self._metric_weight for k, v in self._metric_sums.items()}
        params_type = self._params_type
        if self._into_global:
            from nvflare.app_common.abstract.fl_model import ParamsType

            params_type = ParamsType.FULL  # a DIFF mean was added to the global model: FULL now
        result = FLModel(params=params, params_type=params_type, metrics=metrics, meta=meta)
        self.reset_stats()
        # the next round's comes with its begin_round
        self._global = self._global_spec = self._round = None
        self._into_global = False
        return result

    def _into_global_writer(self):
        """``keep(name, mean)``: what the result holds for ``name``. With ``into_global``, the
        global model's own tensor, overwritten with the mean (a DIFF mean added to it)."""
        from nvflare.app_common.abstract.fl_model import ParamsType

        if not self._into_global:
            return lambda name, value: value
        diff = self._params_type == ParamsType.DIFF
        kept = self._global

        def keep(name, value):
            target = kept.get(name)
            if target is None:  # a parameter the global model does not have: cannot be, checked on arrival
                return value
            if _is_torch(target):
                import torch

                source = value if _is_torch(value) else torch.from_numpy(np.asarray(value))
                if diff:
                    target.add_(source.to(target.dtype))
                else:
                    target.copy_(source)
            elif diff:
                np.add(target, np.asarray(value, dtype=target.dtype), out=target)
            else:
                np.copyto(target, np.asarray(value), casting="unsafe")
            return target

        return keep

    def _register_pairs(self, site: str, params: dict, params_type) -> dict[str, tuple[str, str]]:
        """This site's LoRA pairs, module -> (A name, B name); every A needs its B and back."""
        from nvflare.app_common.abstract.fl_model import ParamsType

        if params_type == ParamsType.DIFF:
            # The product of two differences is not the difference of the products.
            raise FedllmError(
                f"RunningWeightedAverage lora_aggregation='product_svd': site {site!r} sent params_type=DIFF; "
                "it needs the full LoRA factors"
            )
        pairs: dict[str, tuple[str, str]] = {}
        for name in params:
            match = _LORA_KEY.match(name)
            if match is None:
                continue
            partner = _partner(match)
            if partner not in params:
                raise FedllmError(
                    f"RunningWeightedAverage lora_aggregation='product_svd': site {site!r} sent {name!r} "
                    f"without {partner!r}"
                )
            pairs[_module_key(match)] = (name, partner) if match["side"] == "A" else (partner, name)
        for module, (a_name, b_name) in pairs.items():
            self._pairs.setdefault(module, (a_name, b_name))
            self._module_of[a_name] = self._module_of[b_name] = module
        return pairs

    def _add_product(self, module: str, a, b, weight: float) -> None:
        a_name, b_name = self._pairs[module]
        a64, b64 = _float64_numpy(a), _float64_numpy(b)
        if a64.ndim != 2 or b64.ndim != 2 or b64.shape[1] != a64.shape[0]:
            raise FedllmError(
                f"RunningWeightedAverage lora_aggregation='product_svd': {a_name!r} has shape {tuple(a64.shape)} "
                f"and {b_name!r} {tuple(b64.shape)}; expected [r, in] and [out, r]"
            )
        product = b64 @ a64
        total = self._products.get(module)
        if total is None:
            np.multiply(product, weight, out=product)
            self._products[module] = product
            self._product_weights[module] = weight
            return
        if total.shape != product.shape:
            raise FedllmError(
                f"RunningWeightedAverage: {b_name!r}·{a_name!r} has shape {product.shape} from a site, "
                f"{total.shape} from earlier sites; all sites must send the same model"
            )
        np.multiply(product, weight, out=product)
        np.add(total, product, out=total)
        self._product_weights[module] += weight

    def _add_deferred_pair(self, module: str) -> None:
        """Read one LoRA pair from every offloaded update, sites in name order, and sum it."""
        a_name, b_name = self._pairs[module]
        for site in sorted(self._deferred):
            weight, update = self._deferred[site]
            if a_name not in update:
                continue  # this site did not send the module (or it was read already)
            a, b = update.pop(a_name), update.pop(b_name)
            a = a.materialize() if _is_on_disk(a) else a
            b = b.materialize() if _is_on_disk(b) else b
            self._add_product(module, a, b, weight)
            self._add(a_name, a, weight)
            self._add(b_name, b, weight)

    def _finish_products(self, params: dict) -> dict:
        """Replace each module's averaged A and B in ``params`` by the SVD factors of its
        mean product; return the round's diagnostic."""
        factor_error2 = svd_error2 = norm2 = 0.0
        for module in sorted(self._products):
            a_name, b_name = self._pairs[module]
            weight = self._product_weights[module]
            if weight == 0:
                raise FedllmError(f"RunningWeightedAverage: parameter {a_name!r} got total weight 0 from {self._sites}")
            mean_product = self._products.pop(module)
            np.divide(mean_product, weight, out=mean_product)
            mean_a = _float64_numpy(self._sums.pop(a_name)) / self._weights[a_name]
            mean_b = _float64_numpy(self._sums.pop(b_name)) / self._weights[b_name]
            rank = mean_a.shape[0]
            # A keeps the scale the sites trained it at (its rows' RMS norm): a split that
            # shrinks both factors to sqrt(S) would slow the next round's learning, since
            # each factor's gradient is proportional to the other.
            a_row_norm = float(np.sqrt(np.sum(mean_a * mean_a) / rank))
            new_b, new_a, dropped2 = _truncated_svd_factors(mean_product, rank, a_row_norm)
            norm2 += float(np.sum(mean_product * mean_product))
            factor_error2 += float(np.sum(np.square(mean_b @ mean_a - mean_product)))
            svd_error2 += dropped2
            params[a_name] = _to_sent(new_a, self._dtypes[a_name])
            params[b_name] = _to_sent(new_b, self._dtypes[b_name])
        scale = np.sqrt(norm2)
        return {
            "method": "product_svd",
            "modules": len(self._pairs),
            "factor_error": float(np.sqrt(factor_error2) / scale) if scale > 0 else 0.0,
            "svd_error": float(np.sqrt(svd_error2) / scale) if scale > 0 else 0.0,
        }

    def _deferred_names(self) -> list[str]:
        names: dict[str, None] = {}  # ordered: the first site's parameter order
        for site in sorted(self._deferred):
            names.update(dict.fromkeys(self._deferred[site][1]))
        return list(names)

    def _finish(self, name: str):
        total = self._sums.pop(name)
        weight = self._weights[name]
        if weight == 0:
            raise FedllmError(f"RunningWeightedAverage: parameter {name!r} got total weight 0 from {self._sites}")
        return _finish_mean(total, weight, self._dtypes[name])

    def _site_weight(self, model: FLModel, site: str) -> float:
        steps = (model.meta or {}).get(FLMetaKey.NUM_STEPS_CURRENT_ROUND, 1)
        if steps is None:
            steps = 1
        if not isinstance(steps, (int, float)) or isinstance(steps, bool) or steps < 0:
            raise FedllmError(
                f"RunningWeightedAverage: site {site!r} sent meta {FLMetaKey.NUM_STEPS_CURRENT_ROUND}={steps!r}; "
                "expected a number >= 0"
            )
        return float(steps) * float(self.site_weights.get(site, 1.0))

    def _add(self, name: str, value, weight: float) -> None:
        if _is_on_disk(value):
            value = value.materialize()
        total = self._sums.get(name)
        if total is None:
            self._dtypes[name] = value.dtype
            total = _accumulator(value)
            _scale_(total, weight)
            self._sums[name] = total
            self._weights[name] = weight
            return
        if tuple(value.shape) != tuple(total.shape):
            raise FedllmError(
                f"RunningWeightedAverage: parameter {name!r} has shape {tuple(value.shape)} from a site, "
                f"{tuple(total.shape)} from earlier sites; all sites must send the same model"
            )
        _add_scaled_(total, value, weight)
        self._weights[name] += weight


def _partner(match: re.Match) -> str:
    other = "B" if match["side"] == "A" else "A"
    return f"{match['module']}.lora_{match['emb'] or ''}{other}.{match['adapter']}{match['suffix'] or ''}"


def _module_key(match: re.Match) -> str:
    return f"{match['module']}.lora_{match['emb'] or ''}*.{match['adapter']}"


def _float64_numpy(value) -> np.ndarray:
    if _is_torch(value):
        import torch

        return value.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(value, dtype=np.float64)


def _to_sent(value: np.ndarray, dtype):
    """``value`` as a tensor of the kind and dtype the sites sent."""
    if type(dtype).__module__.startswith("torch"):
        import torch

        return torch.from_numpy(np.ascontiguousarray(value)).to(dtype)
    return value.astype(dtype)


def _truncated_svd_factors(matrix: np.ndarray, rank: int, a_row_norm: float) -> tuple[np.ndarray, np.ndarray, float]:
    """(B', A', ||matrix − B'A'||²): the best rank-``rank`` approximation of ``matrix``.

    A' = c·V_rᵀ [rank, in] (orthogonal rows of norm c = ``a_row_norm``), B' = U_r·S_r / c
    [out, rank]; with c = 0 the split is even (sqrt(S_r) each). Each column of U_r is
    flipped so its largest-magnitude entry (the first, on ties) is positive: LAPACK may
    return either sign, and the global model must not depend on which. Where the matrix
    has fewer than ``rank`` singular values, the extra rows of A' and columns of B' are 0.
    """
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    k = min(rank, s.shape[0])
    u, s_r, vt = u[:, :k], s[:k], vt[:k]
    signs = np.sign(u[np.argmax(np.abs(u), axis=0), np.arange(k)])
    signs[signs == 0] = 1.0
    a_scale = np.full(k, a_row_norm) if a_row_norm > 0 else np.sqrt(s_r)
    b_scale = np.divide(s_r, a_scale, out=np.zeros_like(s_r), where=a_scale > 0)
    new_b = np.zeros((matrix.shape[0], rank))
    new_a = np.zeros((rank, matrix.shape[1]))
    new_b[:, :k] = u * (signs * b_scale)
    new_a[:k] = (signs * a_scale)[:, None] * vt
    return new_b, new_a, float(np.sum(np.square(s[k:])))


def _site_name(model: FLModel) -> str:
    meta = model.meta or {}
    return str(meta.get("client_name") or meta.get(FLMetaKey.SITE_NAME, "") or "unknown site")


def _is_on_disk(value) -> bool:
    """A disk-offloaded tensor: NVFlare's lazy reference, read with ``materialize()``."""
    return callable(getattr(value, "materialize", None))


def _is_torch(value) -> bool:
    return type(value).__module__.startswith("torch")


def _dtype_name(value) -> str:
    """``float32`` for a numpy array and a torch tensor alike."""
    return str(value.dtype).removeprefix("torch.")


def _non_finite(value) -> Optional[str]:
    """"NaN" or "Inf" where ``value`` holds one (NaN first), else None."""
    if _is_torch(value):
        import torch

        if not (value.is_floating_point() or value.is_complex()) or bool(torch.isfinite(value).all()):
            return None
        return "NaN" if bool(torch.isnan(value).any()) else "Inf"
    array = np.asarray(value)
    if array.dtype.kind not in "fc" or bool(np.isfinite(array).all()):
        return None
    return "NaN" if bool(np.isnan(array).any()) else "Inf"


def _accumulator(value):
    """A fresh, writable float64 copy of ``value`` to hold the running sum.

    float64 because sites arrive in whatever order the network delivers them: a
    float32 sum's last bit depends on that order, float64's does not survive the
    rounding back to float32. So a round's global model is the same whichever site
    came first, and a resumed federation repeats an unbroken one exactly.
    """
    if _is_torch(value):
        import torch

        return value.detach().to(dtype=torch.float64, copy=True)
    return np.array(np.asarray(value), dtype=np.float64, copy=True)


def _scale_(total, weight: float) -> None:
    if _is_torch(total):
        total.mul_(weight)
    else:
        np.multiply(total, weight, out=total)


def _add_scaled_(total, value, weight: float) -> None:
    if _is_torch(total):
        total.add_(value.to(total.dtype), alpha=weight)
    else:
        # value * weight allocates one tensor-sized temporary, released at once
        np.add(total, np.asarray(value, dtype=total.dtype) * weight, out=total)


def _finish_mean(total, weight: float, dtype):
    """Divide the running sum by the total weight in place; back to the sent dtype."""
    if _is_torch(total):
        import torch

        total.div_(weight)
        if dtype.is_floating_point or dtype == total.dtype:
            return total if dtype == total.dtype else total.to(dtype)
        return torch.round(total).to(dtype)
    np.divide(total, weight, out=total)
    if np.issubdtype(dtype, np.floating):
        return total if dtype == total.dtype else total.astype(dtype)
    return np.rint(total).astype(dtype)
