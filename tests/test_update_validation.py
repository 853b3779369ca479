"""A site's malformed or poisoned update is rejected for the round and counts for nothing.

RunningWeightedAverage checks every update whole before adding any of it: NaN, Inf, a
parameter missing or not in the model, a wrong shape or dtype, and (federation.max_update_norm)
an update too far from the global model. The round is then bit for bit the round of the
other sites, and the server's events file says who was left out and why.
"""

import re

import numpy as np
import pytest
import torch
from nvflare.apis.fl_constant import FLMetaKey
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from offloaded_updates import as_offloaded

from conftest import TINY_CONFIG
from fedllm.config import load_config
from fedllm.errors import FedllmError
from fedllm.events import read_events
from fedllm.federation.aggregation import RunningWeightedAverage

BOUND = 10.0
ROUND = 3

# Each fault: what it does to an update (torch tensors), and the reason the server gives.
FAULTS = {
    "nan": (lambda p: p["w"].__setitem__((1, 2), float("nan")), r"parameter 'w' has NaN values"),
    "inf": (lambda p: p["b"].__setitem__(0, float("-inf")), r"parameter 'b' has Inf values"),
    "missing": (lambda p: p.pop("b"), r"parameter 'b' is missing"),
    "unexpected": (lambda p: p.__setitem__("extra", torch.zeros(2)), r"parameter 'extra' is not in the model"),
    "shape": (lambda p: p.__setitem__("w", torch.zeros(3, 4)), r"parameter 'w' has shape \(3, 4\), the model's is \(4, 3\)"),
    "dtype": (lambda p: p.__setitem__("b", p["b"].double()), r"parameter 'b' has dtype float64, the model's is float32"),
    "norm": (lambda p: p["w"].add_(100.0), r"update norm 3\d\d\.\d+ is above federation.max_update_norm=10"),
}


def _global_model() -> dict:
    generator = torch.Generator().manual_seed(0)
    return {"w": torch.randn(4, 3, generator=generator), "b": torch.randn(3, generator=generator),
            "count": torch.tensor(7)}


def _updates(model: dict) -> dict:
    """Three sites' updates near the global model (norm of the difference ~ 0.1)."""
    generator = torch.Generator().manual_seed(1)
    return {site: {name: value + (0.05 * torch.randn(value.shape, generator=generator)).to(value.dtype)
                   if value.is_floating_point() else value.clone() for name, value in model.items()}
            for site in ("site-1", "site-2", "site-3")}


def _site_result(site, params, steps):
    return FLModel(params=params, params_type=ParamsType.FULL, metrics={"loss": float(steps)},
                   meta={"client_name": site, FLMetaKey.NUM_STEPS_CURRENT_ROUND: steps})


def _as_kind(params: dict, kind: str, folder, site: str) -> dict:
    if kind == "numpy":
        return {name: value.numpy().copy() for name, value in params.items()}
    if kind == "offloaded":
        return as_offloaded(folder, site, {name: value.contiguous() for name, value in params.items()})
    return {name: value.clone() for name, value in params.items()}


def _aggregate(kind, updates, global_model, folder, events_file="", begin=True, steps=None):
    """(the round's result, what accept_model answered per site), sites in ``updates``' order."""
    steps = steps or {"site-1": 3, "site-2": 5, "site-3": 7}
    aggregator = RunningWeightedAverage(max_update_norm=BOUND, events_file=events_file)
    if begin:
        aggregator.begin_round(_as_kind(global_model, "numpy" if kind == "numpy" else "torch", None, ""), ROUND)
    folder.mkdir()
    accepted = {site: aggregator.accept_model(_site_result(site, _as_kind(params, kind, folder, site), steps[site]))
                for site, params in updates.items()}
    return aggregator.aggregate_model(), accepted


def _equal(a, b) -> bool:
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else (a.dtype == b.dtype and np.array_equal(a, b))


@pytest.mark.parametrize("kind", ["numpy", "torch", "offloaded"])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_bad_update_is_rejected_and_the_round_is_the_other_sites(tmp_path, kind, fault):
    global_model = _global_model()
    updates = _updates(global_model)
    spoil, reason = FAULTS[fault]
    spoil(updates["site-2"])  # arrives between the two good sites
    events_file = tmp_path / "server.jsonl"

    result, accepted = _aggregate(kind, updates, global_model, tmp_path / "with", str(events_file))
    good_only, _ = _aggregate(kind, {s: updates[s] for s in ("site-1", "site-3")}, global_model, tmp_path / "without")

    assert accepted == {"site-1": True, "site-2": False, "site-3": True}
    assert list(result.params) == list(good_only.params) == ["w", "b", "count"]
    for name in result.params:  # nothing of site-2 entered the sums
        assert _equal(result.params[name], good_only.params[name]), name
    assert result.metrics == good_only.metrics == {"loss": pytest.approx((3 * 3 + 7 * 7) / 10)}
    assert result.meta["aggregated_sites"] == ["site-1", "site-3"]
    assert list(result.meta["rejected_sites"]) == ["site-2"]
    assert re.fullmatch(reason, result.meta["rejected_sites"]["site-2"])
    [event] = read_events(events_file)
    assert (event["event"], event["site"], event["round"], event["rejected_site"]) == ("update_rejected", "server", ROUND, "site-2")
    assert event["reason"] == result.meta["rejected_sites"]["site-2"]


def test_without_begin_round_the_first_accepted_site_is_the_model_and_norms_are_not_bounded(tmp_path):
    global_model = _global_model()
    updates = _updates(global_model)
    updates["site-1"]["w"][0, 0] = float("nan")  # rejected: cannot be the reference
    updates["site-3"]["w"].add_(1000.0)  # no global model, no norm to bound
    result, accepted = _aggregate("torch", updates, global_model, tmp_path / "a", begin=False)
    assert accepted == {"site-1": False, "site-2": True, "site-3": True}
    assert result.meta["rejected_sites"] == {"site-1": "parameter 'w' has NaN values"}

    updates = _updates(global_model)
    updates["site-3"]["b"] = torch.zeros(4)
    result, accepted = _aggregate("torch", updates, global_model, tmp_path / "b", begin=False)
    assert result.meta["rejected_sites"] == {"site-3": "parameter 'b' has shape (4,), the model's is (3,)"}


def test_the_global_model_is_checked_as_it_was_sent():
    # NVFlare's quantization filter replaces the entries of the dict the controller sends
    # (the one begin_round got) by their quantized form while the round runs.
    global_model = _global_model()
    sent = dict(global_model)
    aggregator = RunningWeightedAverage(max_update_norm=BOUND)
    aggregator.begin_round(sent, 0)
    sent.update({name: torch.zeros(value.numel(), dtype=torch.uint8) for name, value in sent.items()})
    for site, params in _updates(global_model).items():
        assert aggregator.accept_model(_site_result(site, params, 1))
    assert aggregator.aggregate_model().meta["rejected_sites"] == {}


def test_a_rejected_lora_site_leaves_no_partial_product(tmp_path):
    rank, a_key, b_key = 2, "q.lora_A.default.weight", "q.lora_B.default.weight"
    generator = torch.Generator().manual_seed(5)
    model = {a_key: torch.randn(rank, 6, generator=generator), b_key: torch.randn(5, rank, generator=generator)}
    sites = {s: {k: v + 0.1 * torch.randn(v.shape, generator=generator) for k, v in model.items()}
             for s in ("site-1", "site-2", "site-3")}
    sites["site-2"][b_key][4, 1] = float("inf")  # its A is fine: its product must not be summed either

    def run(names, offloaded, folder):
        aggregator = RunningWeightedAverage(lora_aggregation="product_svd")
        aggregator.begin_round({k: v.clone() for k, v in model.items()}, 0)
        folder.mkdir()
        for site in names:
            params = as_offloaded(folder, site, sites[site]) if offloaded else {k: v.clone() for k, v in sites[site].items()}
            aggregator.accept_model(_site_result(site, params, 1))
        return aggregator.aggregate_model()

    for offloaded in (False, True):
        tag = "offloaded" if offloaded else "memory"
        result = run(["site-1", "site-2", "site-3"], offloaded, tmp_path / f"{tag}-all")
        expected = run(["site-1", "site-3"], offloaded, tmp_path / f"{tag}-good")
        assert result.meta["rejected_sites"] == {"site-2": f"parameter '{b_key}' has Inf values"}
        assert result.meta["lora_aggregation"] == expected.meta["lora_aggregation"]
        for name in (a_key, b_key):
            assert torch.equal(result.params[name], expected.params[name])


@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_the_global_model_is_never_non_finite():
    # Two finite float64 updates whose weighted sum overflows: the round fails, nothing is saved.
    aggregator = RunningWeightedAverage()
    for site in ("site-1", "site-2"):
        assert aggregator.accept_model(_site_result(site, {"w": np.full(2, 1e308)}, 1))
    with pytest.raises(FedllmError, match=r"aggregated parameter 'w' has Inf values"):
        aggregator.aggregate_model()


def test_a_round_of_rejected_updates_names_them():
    aggregator = RunningWeightedAverage()
    assert aggregator.accept_model(_site_result("site-1", {"w": np.array([np.nan])}, 1)) is False
    with pytest.raises(FedllmError, match=r"no site results to aggregate this round \(rejected: \{'site-1': \"parameter 'w' has NaN"):
        aggregator.aggregate_model()


@pytest.mark.parametrize("setting, bound", [("0", 0), ("-1.5", -1.5), (".inf", float("inf"))])
def test_max_update_norm_must_be_positive(setting, bound):
    with pytest.raises(FedllmError, match=r"config field 'federation.max_update_norm': must be a number > 0"):
        load_config(TINY_CONFIG, [f"federation.max_update_norm={setting}"])
    with pytest.raises(FedllmError, match=r"max_update_norm=.*expected a number > 0, or None"):
        RunningWeightedAverage(max_update_norm=bound)


def test_max_update_norm_and_the_events_file_reach_the_server_aggregator(tmp_path):
    from fedllm.federation.job import build_recipe
    from fedllm.rundir import RunDir

    assert load_config(TINY_CONFIG).federation.max_update_norm is None
    recipe = build_recipe(load_config(TINY_CONFIG, ["federation.max_update_norm=2.5"]), tmp_path, ["site-1", "site-2"])
    assert recipe.aggregator.max_update_norm == 2.5
    assert recipe.aggregator.events_file == str(RunDir(tmp_path).server_events)


# -- a real federation: five sites, three of them sending bad updates ------------------------

FAULTY = {"site-1": "nan", "site-2": "shape", "site-3": "norm"}  # site-4 and site-5 behave
REASONS = {
    "nan": r"parameter '.+' has NaN values",
    "shape": r"parameter '.+' has shape \(\d+, \d+\), the model's is \(\d+, \d+\)",
    "norm": r"update norm [\d.e+]+ is above federation.max_update_norm=100",
}


@pytest.mark.slow  # five site processes: about a minute on 2 shared cores
def test_a_federation_survives_sites_that_send_nan_a_wrong_shape_and_a_huge_update(tmp_path, shared_data):
    from faulty_site import read_sent, wrapper

    from conftest import TINY_RUN
    from fedllm.federation.federate import simulate
    from fedllm.federation.persistor import load_round
    from fedllm.run import prepare_run
    from fedllm.rundir import RunDir

    # min_clients = the two good sites: the round needs both, and every site is sent the
    # round (fedllm.federation.participation), so the three bad ones are rejected, not skipped.
    cfg = load_config(TINY_CONFIG, TINY_RUN + [
        "data.partition.strategy=iid", "data.partition.num_sites=5", "federation.rounds=1",
        "federation.min_clients=2", "federation.max_update_norm=100",
    ])
    run = RunDir(prepare_run(cfg, tmp_path / "run"))
    sites = [f"site-{k}" for k in range(1, 6)]
    simulate(cfg, run.root, sites, site_python=str(wrapper(tmp_path, FAULTY, tmp_path / "sent")))

    sent = read_sent(tmp_path / "sent")
    assert sorted(sent) == sites  # every site trained and sent its update
    server = read_events(run.server_events)
    rejected = {e["rejected_site"]: e for e in server if e["event"] == "update_rejected"}
    assert sorted(rejected) == sorted(FAULTY)
    for site, fault in FAULTY.items():
        assert rejected[site]["round"] == 1 and re.fullmatch(REASONS[fault], rejected[site]["reason"]), rejected[site]
    [saved] = [e for e in server if e["event"] == "global_model"]
    assert saved["round"] == 1 and sorted(saved["aggregated_sites"]) == ["site-4", "site-5"]
    assert saved["rejected_sites"] == {site: rejected[site]["reason"] for site in FAULTY}

    # The round's global model: the two good sites' updates, weighted by their training
    # samples (federation.weighting), as the server weighs them; nothing of the other three.
    good = [sent["site-4"], sent["site-5"]]
    total = sum(weight for _, weight in good)
    global_model = load_round(run.rounds, 1)
    assert global_model.keys() == good[0][0].keys()
    for name, value in global_model.items():
        expected = sum(params[name].double() * weight for params, weight in good) / total
        assert torch.isfinite(value).all(), name
        # float64 sums, one fused multiply-add apart at most, then float32
        assert torch.allclose(value.double(), expected, rtol=0, atol=1e-6), name
