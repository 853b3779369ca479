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

NVFlare's built-in FedAvg aggregation (``WeightedAggregationHelper``, used when the recipe
gets no ``aggregator``) also sums as results arrive, but keeps each site's whole update
alive until the callback returns. Use this one with the recipe's ``aggregator=`` argument:

    FedAvgRecipe(..., aggregator=RunningWeightedAverage())

A site's weight is its ``NUM_STEPS_CURRENT_ROUND`` (meta key set by the Client API;
1 when absent) times its entry in ``site_weights`` (1 when absent), as in NVFlare's FedAvg.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from nvflare.apis.fl_constant import FLMetaKey
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.aggregators.model_aggregator import ModelAggregator

from fedllm.errors import FedllmError


class RunningWeightedAverage(ModelAggregator):
    """Weighted mean of the sites' parameters, accumulated in place, one site at a time.

    Args:
        site_weights: optional extra weight per site name (e.g. ``{"site-1": 2.0}``); a site
            not listed weighs 1. Multiplied with the site's ``NUM_STEPS_CURRENT_ROUND``.

    Guarantees: ``aggregate_model()`` returns, per parameter name, the weighted mean over the
    sites that sent that parameter, in the dtype the first site sent it in (integer
    parameters are rounded), summed in float64 so the result does not depend on the
    order the sites' results arrive in. Works with numpy arrays and torch tensors. Metrics that are
    numbers are averaged with the same weights. The aggregator is reset after each call.
    """

    def __init__(self, site_weights: Optional[dict] = None):
        super().__init__()
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

    def accept_model(self, model: FLModel) -> bool:
        """Add one site's result to the running sum; empties ``model.params`` while doing so."""
        site = _site_name(model)
        if not model.params:
            raise FedllmError(f"RunningWeightedAverage: result from site {site!r} has no parameters")
        weight = self._site_weight(model, site)
        if self._params_type is None:
            self._params_type = model.params_type
        elif model.params_type != self._params_type:
            raise FedllmError(
                f"RunningWeightedAverage: site {site!r} sent params_type={model.params_type}, "
                f"other sites sent {self._params_type}; all sites must send the same kind"
            )
        params = model.params
        if any(_is_on_disk(value) for value in params.values()):
            # Disk-offloaded update: keep the references, sum at the end in site order.
            if site in self._deferred:
                raise FedllmError(f"RunningWeightedAverage: site {site!r} sent two results in one round")
            self._deferred[site] = (weight, {name: params.pop(name) for name in list(params.keys())})
        else:
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
        return True

    def aggregate_model(self) -> FLModel:
        """The weighted mean of everything accepted since the last call; then reset."""
        if not self._sums and not self._deferred:
            raise FedllmError("RunningWeightedAverage: no site results to aggregate this round")
        params = {}
        # Disk-offloaded updates: one parameter at a time, its sites in name order, so only
        # that parameter's float64 sum exists besides the finished fp32 result.
        for name in self._deferred_names():
            for site in sorted(self._deferred):
                weight, update = self._deferred[site]
                if name in update:
                    self._add(name, update.pop(name), weight)  # the file is read here, once
            params[name] = self._finish(name)
        self._deferred = {}
        for name in list(self._sums.keys()):
            params[name] = self._finish(name)
        metrics = None
        if self._metric_sums and self._metric_weight > 0:
            metrics = {k: v / self._metric_weight for k, v in self._metric_sums.items()}
        result = FLModel(
            params=params,
            params_type=self._params_type,
            metrics=metrics,
            meta={"nr_aggregated": len(self._sites), "aggregated_sites": list(self._sites)},
        )
        self.reset_stats()
        return result

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


def _site_name(model: FLModel) -> str:
    meta = model.meta or {}
    return str(meta.get("client_name") or meta.get(FLMetaKey.SITE_NAME, "") or "unknown site")


def _is_on_disk(value) -> bool:
    """A disk-offloaded tensor: NVFlare's lazy reference, read with ``materialize()``."""
    return callable(getattr(value, "materialize", None))


def _is_torch(value) -> bool:
    return type(value).__module__.startswith("torch")


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
