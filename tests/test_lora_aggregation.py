"""RunningWeightedAverage(lora_aggregation="product_svd"): the global adapter is the best
rank-r approximation of the sites' mean update mean(B_i·A_i), whatever path the updates take."""

import itertools
import json

import numpy as np
import pytest
import torch
from nvflare.apis.fl_constant import FLMetaKey
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from offloaded_updates import as_offloaded

from conftest import TINY_CONFIG, REPO, TINY_RUN
from fedllm.errors import FedllmError
from fedllm.federation.aggregation import RunningWeightedAverage

PREFIX = "model.base_model.model.model.layers.0.self_attn"
MODULES = {"q_proj": (24, 16), "v_proj": (8, 16)}  # out, in
RANK = 4
STEPS = {"site-a": 3.0, "site-b": 5.0, "site-c": 11.0}


def _keys(module):
    return f"{PREFIX}.{module}.lora_A.default.weight", f"{PREFIX}.{module}.lora_B.default.weight"


def _updates(seed=0, shared_a=False):
    """Three sites' LoRA factors (fp32 torch) plus one non-LoRA parameter."""
    gen = torch.Generator().manual_seed(seed)
    common = {m: torch.randn(RANK, fan_in, generator=gen) for m, (_, fan_in) in MODULES.items()}
    updates = {}
    for site in STEPS:
        params = {}
        for module, (fan_out, fan_in) in MODULES.items():
            a_key, b_key = _keys(module)
            params[a_key] = common[module].clone() if shared_a else torch.randn(RANK, fan_in, generator=gen)
            params[b_key] = torch.randn(fan_out, RANK, generator=gen)
        params["model.base_model.model.lm_head.bias"] = torch.randn(16, generator=gen)
        updates[site] = params
    return updates


def _result(site, params):
    return FLModel(params=params, params_type=ParamsType.FULL,
                   meta={"client_name": site, FLMetaKey.NUM_STEPS_CURRENT_ROUND: STEPS[site]})


def _aggregate(updates, order=None, mode="product_svd", wrap=None):
    aggregator = RunningWeightedAverage(lora_aggregation=mode)
    for site in order or list(updates):
        params = wrap(site, updates[site]) if wrap else {k: v.clone() for k, v in updates[site].items()}
        aggregator.accept_model(_result(site, params))
    return aggregator.aggregate_model()


def _weighted_mean(updates, fn):
    total = sum(STEPS.values())
    return sum(STEPS[s] * fn(p) for s, p in updates.items()) / total


def _mean_product(updates, module):
    a_key, b_key = _keys(module)
    return _weighted_mean(updates, lambda p: p[b_key].double() @ p[a_key].double()).numpy()


def test_product_svd_is_the_best_rank_r_approximation_of_the_mean_update():
    updates = _updates()
    result = _aggregate(updates)
    factor2 = svd2 = norm2 = 0.0
    for module in MODULES:
        a_key, b_key = _keys(module)
        new_a, new_b = result.params[a_key], result.params[b_key]
        assert new_a.dtype == torch.float32 and new_a.shape == updates["site-a"][a_key].shape
        assert new_b.dtype == torch.float32 and new_b.shape == updates["site-a"][b_key].shape

        mean = _mean_product(updates, module)
        u, s, vt = np.linalg.svd(mean)
        best = (u[:, :RANK] * s[:RANK]) @ vt[:RANK]  # Eckart–Young: the best rank-r approximation
        got = new_b.double().numpy() @ new_a.double().numpy()
        np.testing.assert_allclose(got, best, atol=1e-5)
        mean_a = _weighted_mean(updates, lambda p: p[a_key].double()).numpy()
        # A keeps the averaged A's scale: orthogonal rows of its RMS row norm c; B = U·S/c
        c2 = np.sum(mean_a ** 2) / RANK
        np.testing.assert_allclose(new_a.double() @ new_a.double().T, c2 * np.eye(RANK), atol=1e-4)
        np.testing.assert_allclose(new_b.double().T @ new_b.double(), np.diag(s[:RANK] ** 2 / c2), rtol=1e-4, atol=1e-6)

        mean_b = _weighted_mean(updates, lambda p: p[b_key].double()).numpy()
        factor2 += np.sum((mean_b @ mean_a - mean) ** 2)
        svd2 += np.sum(s[RANK:] ** 2)
        norm2 += np.sum(mean ** 2)

    diagnostic = result.meta["lora_aggregation"]
    assert diagnostic["method"] == "product_svd" and diagnostic["modules"] == 2
    assert diagnostic["factor_error"] == pytest.approx(np.sqrt(factor2 / norm2), rel=1e-9)
    assert diagnostic["svd_error"] == pytest.approx(np.sqrt(svd2 / norm2), rel=1e-9)
    assert 0 < diagnostic["svd_error"] < 1 and diagnostic["factor_error"] > 0
    json.dumps(diagnostic)  # plain numbers: it travels in meta and into an event line


def test_with_a_shared_a_the_mean_update_is_kept_exactly():
    # Every B_i·A has rank <= r, and so has their mean: nothing to truncate.
    updates = _updates(seed=1, shared_a=True)
    result = _aggregate(updates)
    for module in MODULES:
        a_key, b_key = _keys(module)
        got = result.params[b_key].double().numpy() @ result.params[a_key].double().numpy()
        np.testing.assert_allclose(got, _mean_product(updates, module), atol=1e-6, rtol=0)
    assert result.meta["lora_aggregation"]["svd_error"] < 1e-7
    # with one A, mean(B)·A is the mean product too: plain averaging was already exact
    assert result.meta["lora_aggregation"]["factor_error"] < 1e-7


def test_the_result_does_not_depend_on_the_order_sites_report_in():
    updates = _updates(seed=2)
    results = [_aggregate(updates, order=list(order)) for order in itertools.permutations(STEPS)]
    first = results[0]
    for other in results[1:]:
        assert list(other.params) == list(first.params)
        for name in first.params:
            assert torch.equal(other.params[name], first.params[name]), name
        # the diagnostic is a float64 ratio: equal up to float64 rounding of the running sum
        for key in ("factor_error", "svd_error"):
            assert other.meta["lora_aggregation"][key] == pytest.approx(first.meta["lora_aggregation"][key], rel=1e-12)


def test_disk_offloaded_updates_give_the_in_memory_result(tmp_path):
    updates = _updates(seed=3)
    in_memory = _aggregate(updates)
    offloaded = []
    for order in (["site-c", "site-a", "site-b"], ["site-b", "site-c", "site-a"]):
        folder = tmp_path / "-".join(order)
        folder.mkdir()
        offloaded.append(_aggregate(updates, order=order, wrap=lambda site, params: as_offloaded(folder, site, params)))
    assert list(offloaded[0].params) == list(in_memory.params)
    for name, value in in_memory.params.items():
        assert torch.equal(offloaded[0].params[name], offloaded[1].params[name]), name  # bit for bit
        torch.testing.assert_close(offloaded[0].params[name], value, rtol=0, atol=1e-6)
    for key in ("factor_error", "svd_error"):
        assert offloaded[0].meta["lora_aggregation"][key] == pytest.approx(in_memory.meta["lora_aggregation"][key], rel=1e-9)


def test_factors_mode_averages_a_and_b_as_before():
    updates = _updates(seed=4)
    for result in (_aggregate(updates, mode="factors"), _aggregate(updates, mode="factors", order=["site-c", "site-b", "site-a"])):
        assert "lora_aggregation" not in result.meta
        for name in updates["site-a"]:
            expected = _weighted_mean(updates, lambda p: p[name].double()).float()
            torch.testing.assert_close(result.params[name], expected, rtol=0, atol=1e-6)
    assert RunningWeightedAverage().lora_aggregation == "factors"


def test_non_lora_parameters_are_still_averaged():
    updates = _updates(seed=5)
    name = "model.base_model.model.lm_head.bias"
    product = _aggregate(updates).params[name]
    assert torch.equal(product, _aggregate(updates, mode="factors").params[name])
    torch.testing.assert_close(product, _weighted_mean(updates, lambda p: p[name].double()).float(), rtol=0, atol=1e-6)


def test_numpy_factors_come_back_as_numpy_in_the_sent_dtype():
    rng = np.random.default_rng(6)
    a_key, b_key = _keys("q_proj")
    aggregator = RunningWeightedAverage(lora_aggregation="product_svd")
    for site in STEPS:
        params = {a_key: rng.normal(size=(RANK, 16)).astype(np.float32), b_key: rng.normal(size=(24, RANK)).astype(np.float32)}
        aggregator.accept_model(_result(site, params))
    result = aggregator.aggregate_model()
    assert isinstance(result.params[a_key], np.ndarray) and result.params[a_key].dtype == np.float32
    assert result.params[b_key].shape == (24, RANK)


def test_embedding_adapters_are_paired_by_peft_names():
    gen = torch.Generator().manual_seed(7)
    a_key, b_key = "model.base_model.model.embed_tokens.lora_embedding_A.default", "model.base_model.model.embed_tokens.lora_embedding_B.default"
    updates = {site: {a_key: torch.randn(RANK, 40, generator=gen), b_key: torch.randn(12, RANK, generator=gen)} for site in STEPS}
    result = _aggregate(updates)
    mean = _weighted_mean(updates, lambda p: p[b_key].double() @ p[a_key].double()).numpy()
    u, s, vt = np.linalg.svd(mean)
    got = result.params[b_key].double().numpy() @ result.params[a_key].double().numpy()
    np.testing.assert_allclose(got, (u[:, :RANK] * s[:RANK]) @ vt[:RANK], atol=1e-5)
    assert result.meta["lora_aggregation"]["modules"] == 1


def test_unpaired_keys_and_bad_settings_are_rejected():
    a_key, b_key = _keys("q_proj")
    aggregator = RunningWeightedAverage(lora_aggregation="product_svd")
    with pytest.raises(FedllmError, match=f"site 'site-a' sent '{b_key}' without '{a_key}'"):
        aggregator.accept_model(_result("site-a", {b_key: torch.zeros(24, RANK)}))
    with pytest.raises(FedllmError, match=f"sent '{a_key}' without '{b_key}'"):
        aggregator.accept_model(_result("site-a", {a_key: torch.zeros(RANK, 16)}))
    with pytest.raises(FedllmError, match=r"lora_aggregation='svd': expected one of factors, product_svd"):
        RunningWeightedAverage(lora_aggregation="svd")
    diff = FLModel(params={a_key: torch.zeros(RANK, 16), b_key: torch.zeros(24, RANK)}, params_type=ParamsType.DIFF,
                   meta={"client_name": "site-b"})
    with pytest.raises(FedllmError, match="site 'site-b' sent params_type=DIFF"):
        RunningWeightedAverage(lora_aggregation="product_svd").accept_model(diff)
    # 'factors' does not care how LoRA keys are paired
    RunningWeightedAverage().accept_model(_result("site-a", {b_key: torch.zeros(24, RANK)}))


def test_two_round_lora_federation_with_product_svd(tmp_path):
    from fedllm.config import load_config
    from fedllm.federation.persistor import load_round
    from fedllm.run import prepare_run, run_federation

    two_sites = ("data.sources=[{name: dolly, format: dolly, path: dolly_15k, max_records: 80}, "
                 "{name: medical, format: medical_meadow, path: medical_meadow/medical_meadow_small.json, max_records: 80}]")
    overrides = [two_sites, "method.name=lora", "federation.rounds=2", "federation.lora_aggregation=product_svd"]
    cfg = load_config(TINY_CONFIG, TINY_RUN + overrides)
    run = prepare_run(cfg, tmp_path / "run")
    result = run_federation(run)

    weights = load_round(run / "federation" / "rounds", 2)
    a_keys = [k for k in weights if ".lora_A." in k]
    assert a_keys
    for a_key in a_keys:
        a, b = weights[a_key].double(), weights[a_key.replace(".lora_A.", ".lora_B.")].double()
        rank = a.shape[0]
        assert torch.linalg.matrix_rank(b @ a) <= rank
        # the SVD's factors: A's rows orthogonal and of one norm, B's columns orthogonal,
        # not what averaging A and B gives
        gram = a @ a.T
        torch.testing.assert_close(gram, gram[0, 0] * torch.eye(rank, dtype=gram.dtype), rtol=1e-4, atol=1e-6)
        b_gram = b.T @ b
        torch.testing.assert_close(b_gram, torch.diag(torch.diagonal(b_gram)), rtol=0, atol=1e-6)

    diagnostics = result["lora_aggregation"]
    assert [d["round"] for d in diagnostics] == [1, 2]
    for d in diagnostics:
        assert 0 <= d["svd_error"] < 1 and d["factor_error"] >= 0
