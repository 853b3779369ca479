"""RunningWeightedAverage gives the same numbers as a direct weighted mean, and frees updates."""

import numpy as np
import pytest
import torch
from nvflare.apis.fl_constant import FLMetaKey
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from offloaded_updates import as_offloaded

from fedllm.errors import FedllmError
from fedllm.federation.aggregation import RunningWeightedAverage


def _site_result(site, params, steps, metrics=None):
    return FLModel(
        params=params,
        params_type=ParamsType.FULL,
        metrics=metrics,
        meta={"client_name": site, FLMetaKey.NUM_STEPS_CURRENT_ROUND: steps},
    )


def test_numpy_weights_match_a_direct_weighted_mean():
    rng = np.random.default_rng(7)
    updates = {f"site-{i}": {"w": rng.normal(size=(5, 3)).astype(np.float32), "b": rng.normal(size=3)} for i in (1, 2, 3)}
    steps = {"site-1": 10, "site-2": 30, "site-3": 60}
    expected = {
        name: sum(steps[s] * updates[s][name].astype(np.float64) for s in updates) / sum(steps.values())
        for name in ("w", "b")
    }
    aggregator = RunningWeightedAverage(site_weights={"site-3": 1.0})
    for site, params in updates.items():
        aggregator.accept_model(_site_result(site, {k: v.copy() for k, v in params.items()}, steps[site]))
    result = aggregator.aggregate_model()

    assert result.params["w"].dtype == np.float32 and result.params["b"].dtype == np.float64
    np.testing.assert_allclose(result.params["w"], expected["w"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(result.params["b"], expected["b"], rtol=1e-12)
    assert result.meta["nr_aggregated"] == 3
    assert result.params_type == ParamsType.FULL


def test_torch_weights_site_weights_and_metrics():
    torch.manual_seed(0)
    a = {"layer.weight": torch.randn(4, 4), "steps": torch.tensor(10)}
    b = {"layer.weight": torch.randn(4, 4), "steps": torch.tensor(21)}
    # site-2 counts twice (site_weights) and trained 3 steps vs 1: weights 1 and 6
    expected = (1 * a["layer.weight"] + 6 * b["layer.weight"]) / 7
    aggregator = RunningWeightedAverage(site_weights={"site-2": 2.0})
    aggregator.accept_model(_site_result("site-1", {k: v.clone() for k, v in a.items()}, 1, {"loss": 1.0, "note": "x"}))
    aggregator.accept_model(_site_result("site-2", {k: v.clone() for k, v in b.items()}, 3, {"loss": 3.0}))
    result = aggregator.aggregate_model()

    torch.testing.assert_close(result.params["layer.weight"], expected)
    # integer parameters: weighted mean rounded back to the sent dtype, (10 + 6*21) / 7 = 19.43
    assert result.params["steps"].dtype == torch.int64 and int(result.params["steps"]) == 19
    assert result.metrics == pytest.approx({"loss": (1 * 1.0 + 6 * 3.0) / 7})


def test_each_update_is_emptied_while_it_is_added_and_state_resets():
    aggregator = RunningWeightedAverage()
    site_params = {"w": np.ones(3, dtype=np.float32), "v": np.zeros(2, dtype=np.float32)}
    aggregator.accept_model(_site_result("site-1", site_params, 1))
    assert site_params == {}  # the site's tensors are no longer held by its result
    first = aggregator.aggregate_model()
    np.testing.assert_array_equal(first.params["w"], np.ones(3))
    with pytest.raises(FedllmError, match="no site results"):
        aggregator.aggregate_model()


def test_a_site_missing_a_parameter_is_left_out_of_the_round():
    # Without begin_round the first accepted site's parameters are the model's
    # (tests/test_update_validation.py: every kind of rejected update).
    aggregator = RunningWeightedAverage()
    aggregator.accept_model(_site_result("site-1", {"w": np.array([2.0]), "only1": np.array([5.0])}, 1))
    assert aggregator.accept_model(_site_result("site-2", {"w": np.array([4.0])}, 1)) is False
    result = aggregator.aggregate_model()
    assert result.params["w"].tolist() == [2.0] and result.params["only1"].tolist() == [5.0]
    assert result.meta["rejected_sites"] == {"site-2": "parameter 'only1' is missing"}


def test_bad_input_names_the_site_and_what_is_accepted():
    aggregator = RunningWeightedAverage()
    aggregator.accept_model(_site_result("site-1", {"w": np.zeros((2, 2))}, 1))
    assert aggregator.accept_model(_site_result("site-2", {"w": np.zeros(3)}, 1)) is False
    assert aggregator._rejected == {"site-2": "parameter 'w' has shape (3,), the model's is (2, 2)"}
    with pytest.raises(FedllmError, match="site 'site-3'.*expected a number >= 0"):
        aggregator.accept_model(_site_result("site-3", {"w": np.zeros((2, 2))}, -1))
    with pytest.raises(FedllmError, match=r"site_weights\['site-1'\]"):
        RunningWeightedAverage(site_weights={"site-1": "heavy"})


def test_the_global_model_does_not_depend_on_the_order_sites_report_in():
    # A resumed federation must repeat an unbroken one: sites' results arrive in any order.
    import itertools

    gen = torch.Generator().manual_seed(3)
    updates = {f"site-{i}": torch.randn(4096, generator=gen) * 10 ** i for i in (1, 2, 3)}
    weights = {"site-1": 137.0, "site-2": 411.0, "site-3": 53.0}
    results = []
    for order in itertools.permutations(updates):
        aggregator = RunningWeightedAverage()
        for site in order:
            aggregator.accept_model(_site_result(site, {"w": updates[site].clone()}, weights[site]))
        results.append(aggregator.aggregate_model().params["w"])
    assert all(r.dtype == torch.float32 for r in results)
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_disk_offloaded_updates_are_summed_in_site_order_at_the_end(tmp_path):
    generator = torch.Generator().manual_seed(3)
    updates = {site: {"w": torch.randn(64, 32, generator=generator), "b": torch.randn(32, generator=generator)}
               for site in ("c-site", "a-site", "b-site")}
    steps = {"a-site": 7, "b-site": 11, "c-site": 13}
    expected = {name: sum(steps[s] * updates[s][name].double() for s in updates) / sum(steps.values()) for name in ("w", "b")}

    results = []
    for order in (["c-site", "a-site", "b-site"], ["b-site", "c-site", "a-site"]):
        aggregator = RunningWeightedAverage()
        folder = tmp_path / "-".join(order)
        folder.mkdir()
        for site in order:
            result = _site_result(site, as_offloaded(folder, site, updates[site]), steps[site])
            aggregator.accept_model(result)
            assert result.params == {}  # the references moved into the aggregator
            assert not aggregator._sums  # nothing read from disk before the round ends
        results.append(aggregator.aggregate_model())

    first, second = (r.params for r in results)
    assert list(first) == ["w", "b"] and first["w"].dtype == torch.float32
    for name in ("w", "b"):
        assert torch.equal(first[name], second[name])  # bit for bit, whatever the arrival order
        assert torch.allclose(first[name].double(), expected[name], rtol=0, atol=1e-6)
    assert results[0].meta["aggregated_sites"] == ["c-site", "a-site", "b-site"]


# -- the mean written into the global model (one model on the server) -------------------------

def _global_and_updates(seed: int = 5):
    generator = torch.Generator().manual_seed(seed)
    global_model = {"w": torch.randn(64, 32, generator=generator), "b": torch.randn(32, generator=generator),
                    "count": torch.tensor([3, 8], dtype=torch.int64),
                    "half": torch.randn(16, generator=generator).to(torch.bfloat16)}
    updates = {site: {"w": global_model["w"] + torch.randn(64, 32, generator=generator),
                      "b": global_model["b"] + torch.randn(32, generator=generator),
                      "count": torch.tensor([k, 2 * k + 1], dtype=torch.int64),
                      "half": (global_model["half"].float() + torch.randn(16, generator=generator)).to(torch.bfloat16)}
               for k, site in enumerate(("c-site", "a-site", "b-site"), start=1)}
    return global_model, updates


@pytest.mark.parametrize("offloaded", [True, False], ids=["offloaded", "in-memory"])
def test_the_mean_goes_into_the_global_models_own_tensors_bit_for_bit_as_a_separate_result(tmp_path, offloaded):
    """into_global: the result's tensors are the global model's (no second model on the server),
    holding exactly what the separate result holds: order-independent float64 means, integers
    rounded, bf16 kept bf16."""
    global_model, updates = _global_and_updates()
    steps = {"a-site": 7, "b-site": 11, "c-site": 13}

    def aggregate(into_global: bool, order: list[str], folder):
        model = {name: value.clone() for name, value in global_model.items()}
        aggregator = RunningWeightedAverage()
        aggregator.begin_round(model, 1, into_global=into_global)
        folder.mkdir()
        for site in order:
            params = {name: value.clone() for name, value in updates[site].items()}
            aggregator.accept_model(_site_result(site, as_offloaded(folder, site, params) if offloaded else params, steps[site]))
        return model, aggregator.aggregate_model()

    _, separate = aggregate(False, ["a-site", "b-site", "c-site"], tmp_path / "separate")
    for i, order in enumerate((["c-site", "a-site", "b-site"], ["b-site", "c-site", "a-site"])):
        model, result = aggregate(True, order, tmp_path / f"into-{i}")
        assert result.params_type == ParamsType.FULL
        for name, value in result.params.items():
            assert value is model[name], name  # the global model's own tensor, overwritten
            assert value.dtype == global_model[name].dtype, name
            assert torch.equal(value, separate.params[name]), name
    assert model["count"].tolist() == [round((7 * 2 + 11 * 3 + 13 * 1) / 31), round((7 * 5 + 11 * 7 + 13 * 3) / 31)]


def test_a_diff_mean_is_added_to_the_global_model_and_a_rejected_round_leaves_it_untouched():
    global_model, _ = _global_and_updates()
    model = {name: value.clone() for name, value in global_model.items() if name in ("w", "b")}
    aggregator = RunningWeightedAverage()
    aggregator.begin_round(model, 1, into_global=True)
    delta = {"w": torch.full((64, 32), 0.5), "b": torch.full((32,), -1.0)}
    diff = FLModel(params=dict(delta), params_type=ParamsType.DIFF, meta={"client_name": "a-site"})
    aggregator.accept_model(diff)
    result = aggregator.aggregate_model()
    assert result.params_type == ParamsType.FULL and result.params["w"] is model["w"]
    assert torch.equal(model["w"], global_model["w"] + 0.5) and torch.equal(model["b"], global_model["b"] - 1.0)

    # a NaN update is refused before anything is written: the global model is as it was
    before = {name: value.clone() for name, value in model.items()}
    aggregator.begin_round(model, 2, into_global=True)
    bad = {"w": torch.full((64, 32), float("nan")), "b": torch.zeros(32)}
    assert aggregator.accept_model(_site_result("b-site", bad, 1)) is False
    with pytest.raises(FedllmError, match="no site results"):
        aggregator.aggregate_model()
    assert all(torch.equal(model[name], before[name]) for name in model)
