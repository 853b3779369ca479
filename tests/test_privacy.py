"""Privacy filters on what a site sends (``federation.privacy``): NVFlare's ExcludeVars and
PercentilePrivacy, and DP-FedAvg's clipped, noised update with an ε from Opacus' RDP accountant."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnableKey, make_model_learnable
from nvflare.app_common.app_constant import AppConstants

from conftest import TINY_CONFIG, TINY_RUN
from fedllm import events
from fedllm.config import load_config
from fedllm.errors import FedllmError
from fedllm.federation.privacy import (
    ExcludeVarsPattern,
    GaussianUpdate,
    KeepExcludedGlobal,
    RememberReceived,
    UpdatePercentilePrivacy,
    clip_and_noise,
    epsilon_after,
)


def site_context(site: str = "site-1") -> FLContext:
    fl_ctx = FLContext()
    fl_ctx.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=False)
    return fl_ctx


def site_round(fl_ctx: FLContext, received: dict, sent: dict, round_number: int = 0) -> dict:
    """What a site's filters make of ``sent`` in a task that brought ``received``."""
    task = DXO(DataKind.WEIGHTS, data=dict(received)).to_shareable()
    task.set_header(AppConstants.CURRENT_ROUND, round_number)
    RememberReceived().process(task, fl_ctx)
    return DXO(DataKind.WEIGHTS, data=dict(sent)).to_shareable()


def test_clipping_scales_the_update_to_clip_norm_exactly():
    torch.manual_seed(0)
    received = {"a": torch.randn(300, 20, dtype=torch.float64), "b": torch.randn(7, dtype=torch.float64)}
    sent = {k: v + torch.randn_like(v) for k, v in received.items()}
    norm = math.sqrt(sum(float(((sent[k] - received[k]) ** 2).sum()) for k in sent))
    out, reported = clip_and_noise(sent, received, clip_norm=0.25, noise_multiplier=0.0)
    assert reported == pytest.approx(norm, rel=1e-12)
    clipped = {k: out[k] - received[k] for k in sent}
    assert math.sqrt(sum(float((d ** 2).sum()) for d in clipped.values())) == pytest.approx(0.25, rel=1e-12)
    for k in sent:  # same direction, scaled by C/‖Δ‖
        torch.testing.assert_close(clipped[k], (sent[k] - received[k]) * (0.25 / norm), rtol=1e-12, atol=1e-15)


def test_noise_std_is_noise_multiplier_times_clip_norm():
    received = {"w": torch.zeros(1000, 1000)}
    sent = {"w": torch.full((1000, 1000), 1e-6)}  # ‖Δ‖ = 1e-3 ≤ C: not clipped
    out, norm = clip_and_noise(sent, received, clip_norm=2.0, noise_multiplier=0.3,
                               generator=torch.Generator().manual_seed(1))
    assert norm == pytest.approx(1e-3, rel=1e-6)
    noise = (out["w"] - sent["w"]).double()
    assert noise.std().item() == pytest.approx(0.6, rel=0.01) and abs(noise.mean().item()) < 3 * 0.6 / 1000
    again, _ = clip_and_noise(sent, received, 2.0, 0.3, torch.Generator().manual_seed(1))
    assert torch.equal(again["w"], out["w"])  # seeded: reproducible


def test_without_noise_or_clipping_the_sent_tensors_are_untouched(tmp_path):
    received = {"w": torch.randn(8, 8, dtype=torch.bfloat16), "b": torch.randn(8)}
    sent = {k: v + 1 for k, v in received.items()}
    fl_ctx = site_context()
    result = site_round(fl_ctx, received, sent)
    GaussianUpdate(clip_norm=math.inf, noise_multiplier=0.0, run_dir=str(tmp_path)).process(result, fl_ctx)
    after = from_shareable(result).data
    assert all(after[k] is sent[k] for k in sent)  # the very tensors: bit for bit FedAvg
    (event,) = [e for e in events.read_events(tmp_path / "events" / "site-site-1.jsonl") if e["event"] == "privacy"]
    assert event["round"] == 0 and "epsilon" not in event and "clip_norm" not in event and event["noise_multiplier"] == 0


def test_site_filter_sends_global_plus_noisy_clipped_update_and_reports_epsilon(tmp_path):
    received = {"w": torch.zeros(400, 250)}
    sent = {"w": torch.ones(400, 250)}  # ‖Δ‖ = 316.2
    fl_ctx = site_context("site-2")
    result = site_round(fl_ctx, received, sent, round_number=2)
    GaussianUpdate(clip_norm=1.0, noise_multiplier=0.5, delta=1e-6, seed=7, run_dir=str(tmp_path)).process(result, fl_ctx)
    out = from_shareable(result).data["w"]
    assert out.dtype == torch.float32
    noise = out.double() - 1.0 / math.sqrt(100_000)  # the clipped Δ: every coordinate C/‖Δ‖·1
    assert noise.std().item() == pytest.approx(0.5, rel=0.02)
    (event,) = events.read_events(tmp_path / "events" / "site-site-2.jsonl")
    assert event["update_norm"] == pytest.approx(math.sqrt(100_000), rel=1e-6)
    assert event["epsilon"] == pytest.approx(epsilon_after(3, 0.5, 1e-6), rel=1e-6)  # rounds 0, 1, 2
    assert (event["site"], event["round"], event["delta"], event["clip_norm"]) == ("site-2", 2, 1e-6, 1.0)


@pytest.mark.parametrize("sigma, rounds, delta", [(1.0, 3, 1e-5), (0.8, 10, 1e-6), (4.0, 1, 1e-5)])
def test_epsilon_is_opacus_rdp_accountant_with_sample_rate_one(sigma, rounds, delta):
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    for _ in range(rounds):
        accountant.step(noise_multiplier=sigma, sample_rate=1.0)
    assert epsilon_after(rounds, sigma, delta) == pytest.approx(accountant.get_epsilon(delta=delta), rel=1e-12)
    assert epsilon_after(rounds, 0.0, delta) is None  # no noise, no guarantee


def test_excluded_weights_never_leave_the_site_and_keep_the_global_value():
    received = {"layers.0.mlp.w": torch.zeros(3), "layers.0.attn.w": torch.zeros(3)}
    sent = {k: v + 1 for k, v in received.items()}
    result = DXO(DataKind.WEIGHTS, data=dict(sent)).to_shareable()
    result = ExcludeVarsPattern(r"\.mlp\.").process(result, site_context())
    assert set(from_shareable(result).data) == {"layers.0.attn.w"}
    server = FLContext()
    server.set_prop(AppConstants.GLOBAL_MODEL, make_model_learnable(received, {}), private=True, sticky=False)
    result = KeepExcludedGlobal(exclude_vars=r"\.mlp\.").process(result, server)
    data = from_shareable(result).data
    assert data["layers.0.mlp.w"] is received["layers.0.mlp.w"] and torch.equal(data["layers.0.attn.w"], sent["layers.0.attn.w"])


def test_percentile_privacy_filters_the_update_difference():
    received = {"w": torch.full((100,), 5.0)}
    sent = {"w": received["w"] + torch.linspace(0.001, 0.1, 100)}
    fl_ctx = site_context()
    result = site_round(fl_ctx, received, sent)
    UpdatePercentilePrivacy(percentile=50, gamma=0.05).process(result, fl_ctx)
    diff = from_shareable(result).data["w"] - received["w"]
    assert (diff[:49] == 0).all()  # below the median |Δ|: not sent
    assert diff.max().item() == pytest.approx(0.05, abs=1e-6)  # clipped to gamma
    assert diff[50:].min().item() > 0.049


@pytest.mark.parametrize("override, field", [
    ("federation.privacy.dp.clip_norm=0", "federation.privacy.dp.clip_norm"),
    ("federation.privacy.dp.clip_norm=.inf", "federation.privacy.dp.clip_norm"),  # noise_multiplier 1 needs a finite C
    ("federation.privacy.dp.noise_multiplier=-1", "federation.privacy.dp.noise_multiplier"),
    ("federation.privacy.dp.delta=1", "federation.privacy.dp.delta"),
    ("federation.privacy.percentile.gamma=0", "federation.privacy.percentile.gamma"),
    ("federation.privacy.percentile.percentile=101", "federation.privacy.percentile.percentile"),
    ("federation.privacy.exclude_vars=[]", "federation.privacy.exclude_vars"),
    ("federation.privacy.exclude_vars=(", "federation.privacy.exclude_vars"),
    ("federation.privacy.dp.sigma=1", "federation.privacy.dp.sigma"),
])
def test_config_errors_name_the_field(override, field):
    with pytest.raises(FedllmError, match=f"'{field}'"):
        load_config(TINY_CONFIG, [override])


def test_config_accepts_dp_without_noise_or_clipping():
    cfg = load_config(TINY_CONFIG, ["federation.privacy.dp.noise_multiplier=0", "federation.privacy.dp.clip_norm=.inf"])
    assert cfg.federation.privacy.dp.clip_norm == math.inf and cfg.federation.privacy.dp.delta == 1e-5


class CaptureResults(Filter):
    """Server input filter (test only): saves every site's update of a one-round job as the
    server received it (``<site>.safetensors``), and the global model the round was sent from
    (``global.safetensors``), under ``folder``."""

    def __init__(self, folder: str = ""):
        super().__init__()
        self.folder = folder

    def process(self, shareable, fl_ctx):
        from safetensors.torch import save_file

        dxo = from_shareable(shareable)
        site = fl_ctx.get_peer_context().get_identity_name()
        tensors = {k: torch.as_tensor(v).contiguous() for k, v in dxo.data.items()}
        save_file(tensors, os.path.join(self.folder, f"{site}.safetensors"))
        glob = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)[ModelLearnableKey.WEIGHTS]
        save_file({k: torch.as_tensor(v).contiguous() for k, v in glob.items()},
                  os.path.join(self.folder, "global.safetensors"))
        # Everything else the message holds (headers, meta, metrics): its strings, numbers and
        # the shapes of its arrays, to look for anything of the site's data in it.
        with open(os.path.join(self.folder, f"{site}.message.json"), "w") as f:
            json.dump(_inventory(dict(shareable)), f)
        return shareable


def _inventory(value, path: str = "") -> dict:
    """``{"strings": [...], "int_runs": longest list of integers, "arrays": {path: shape}}`` of
    a message, walked through dicts, lists, tuples and objects' __dict__."""
    found = {"strings": [], "int_runs": 0, "arrays": {}}

    def walk(v, where, depth=0):
        if depth > 12:
            return
        if isinstance(v, (str, bytes)):
            found["strings"].append(v if isinstance(v, str) else v.decode("utf-8", "replace"))
        elif hasattr(v, "shape") and hasattr(v, "dtype"):
            found["arrays"][where] = list(v.shape)
        elif isinstance(v, dict):
            for k, item in v.items():
                walk(k, where, depth + 1)
                walk(item, f"{where}/{k}", depth + 1)
        elif isinstance(v, (list, tuple, set)):
            items = list(v)
            if items and all(isinstance(i, int) and not isinstance(i, bool) for i in items):
                found["int_runs"] = max(found["int_runs"], len(items))
            for i, item in enumerate(items):
                walk(item, f"{where}[{i}]", depth + 1)
        elif hasattr(v, "__dict__") and not callable(v):
            walk(vars(v), where, depth + 1)

    walk(value, path)
    return found


@pytest.mark.slow  # three one-round federations of 2 sites: about 1.5 minutes on 2 shared cores
def test_privacy_filters_in_a_federation(tmp_path, shared_data, monkeypatch):
    """(a) dp with noise_multiplier 0, clip_norm inf is plain FedAvg bit for bit; (b) excluded
    weights never reach the server; (c) with noise, what a site sent differs from what it
    trained by its clipped update's scale and noise of std noise_multiplier·clip_norm."""
    from safetensors.torch import load_file

    from fedllm.federation import federate as federate_module
    from fedllm.federation.persistor import load_round
    from fedllm.run import prepare_run, run_federation

    tests_dir = os.path.dirname(__file__)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")])))
    build = federate_module.build_recipe

    def build_with_capture(cfg, run_dir, *args, **kwargs):
        recipe = build(cfg, run_dir, *args, **kwargs)
        folder = os.path.join(str(run_dir), "captured")
        os.makedirs(folder, exist_ok=True)
        recipe.add_server_input_filter(CaptureResults(folder), tasks=["train"])  # after fedllm's own
        return recipe

    monkeypatch.setattr(federate_module, "build_recipe", build_with_capture)
    sigma, clip, excluded = 1.0, 1e-3, r"\.mlp\.down_proj\."
    runs = {
        "plain": [],
        "dp0": ["federation.privacy.dp.noise_multiplier=0", "federation.privacy.dp.clip_norm=.inf"],
        "noisy": [f"federation.privacy.dp.noise_multiplier={sigma}", f"federation.privacy.dp.clip_norm={clip}",
                  f"federation.privacy.exclude_vars={excluded}"],
    }
    out, summaries = {}, {}
    for name, privacy in runs.items():
        cfg = load_config(TINY_CONFIG, TINY_RUN + ["method.name=sft", "federation.rounds=1", *privacy])
        cfg.data.sources = cfg.data.sources[:2]  # two sites
        run = prepare_run(cfg, tmp_path / name)
        summaries[name] = run_federation(run)
        out[name] = run
    sites = sorted(p.stem for p in (out["noisy"] / "captured").glob("*.safetensors") if p.stem != "global")
    assert len(sites) == 2

    # (a) the DP path without noise or clipping is FedAvg, bit for bit
    plain, dp0 = load_round(out["plain"] / "federation" / "rounds", 1), load_round(out["dp0"] / "federation" / "rounds", 1)
    assert set(plain) == set(dp0) and all(torch.equal(plain[k], dp0[k]) for k in plain)
    assert "privacy" not in summaries["plain"] and summaries["dp0"]["privacy"]["epsilon"] is None

    # (b) the excluded weights: the server got only its own global value back, never the sites'
    glob = load_file(str(out["noisy"] / "captured" / "global.safetensors"))
    names = [k for k in glob if ".mlp.down_proj." in k]
    assert names
    noisy_round = load_round(out["noisy"] / "federation" / "rounds", 1)
    for k in names:
        assert torch.equal(noisy_round[k], glob[k]) and not torch.equal(dp0[k], glob[k])
        for site in sites:
            assert torch.equal(load_file(str(out["noisy"] / "captured" / f"{site}.safetensors"))[k], glob[k])

    # (c) sent − trained is the clipping plus noise of std sigma·C (the dp0 run sent what its sites
    # trained, untouched: the same training, same seeds)
    privacy_events = {e["site"]: e for s in sites for e in events.read_events(out["noisy"] / "events" / f"site-{s}.jsonl")
                      if e["event"] == "privacy"}
    for site in sites:
        trained = load_file(str(out["dp0"] / "captured" / f"{site}.safetensors"))
        sent = load_file(str(out["noisy"] / "captured" / f"{site}.safetensors"))
        kept = [k for k in glob if k not in names]
        delta = {k: trained[k].double() - glob[k].double() for k in kept}
        norm = math.sqrt(sum(float((d ** 2).sum()) for d in delta.values()))
        assert privacy_events[site]["update_norm"] == pytest.approx(norm, rel=1e-4)
        scale = min(1.0, clip / norm)
        noise = torch.cat([(sent[k].double() - glob[k].double() - scale * delta[k]).flatten() for k in kept])
        assert noise.std().item() == pytest.approx(sigma * clip, rel=0.03), site
        assert abs(noise.mean().item()) < 5 * sigma * clip / math.sqrt(noise.numel())
        assert privacy_events[site]["epsilon"] == pytest.approx(epsilon_after(1, sigma, 1e-5), rel=1e-6)
    # Nothing raw leaves a site: what the server received holds the exchanged weights (the
    # model's own names and shapes, no batch-shaped tensor such as per-example gradients) and
    # small headers and metrics; no text of the site's training rows, no run of token ids; and
    # nothing the server persisted or logged holds that text either.
    from fedllm.data import load_partitions

    for site in sites:
        inventory = json.loads((out["plain"] / "captured" / f"{site}.message.json").read_text())
        weights = {path.rsplit("/", 1)[-1]: shape for path, shape in inventory["arrays"].items()}
        assert weights == {k: list(v.shape) for k, v in glob.items()}, site
        assert inventory["int_runs"] <= 8, "a list of integers in the message: token ids?"
        message = "\n".join(inventory["strings"])
        rows = load_partitions(out["plain"] / "data").train(site)
        snippets = [text[:40] for ex in rows for text in (ex.instruction, ex.input, ex.output) if len(text) >= 40]
        assert len(snippets) > 20
        persisted = "\n".join(p.read_text(errors="replace") for p in (out["plain"] / "events").glob("server*.jsonl")) + \
            "\n".join(p.read_text(errors="replace") for p in (out["plain"] / "federation" / "workspace").rglob("*")
                      if p.is_file() and p.suffix in (".txt", ".json", ".log") and "/server/" in str(p))
        leaked = [t for t in snippets if t in message or t in persisted]
        assert not leaked, f"training text of {site} reached the server: {leaked[:3]}"

    record = summaries["noisy"]["privacy"]
    assert record["accountant"] == "opacus RDP" and record["sample_rate"] == 1.0 and record["rounds"] == 1
    assert record["epsilon"] == pytest.approx(epsilon_after(1, sigma, 1e-5)) and record["delta"] == 1e-5
    assert record["exclude_vars"] == excluded and "add/remove" in record["adjacency"]


def test_the_non_private_variant_shows_what_privacy_costs():
    from fedllm.report.run_summary import display_name
    from fedllm.run import variant_settings

    cfg = load_config(TINY_CONFIG, ["federation.privacy.dp.noise_multiplier=1", "baselines.non_private=true"])
    assert variant_settings(cfg) == ["fedavg:non_private"]
    with pytest.raises(FedllmError, match="'baselines.non_private': needs a privacy filter"):
        load_config(TINY_CONFIG, ["baselines.non_private=true"])
    # the report names both: the private federation with its ε, the variant without filters
    assert display_name("fedavg", {"algorithm": {"name": "fedavg"}, "privacy": {"mechanism": "gaussian", "epsilon": 4.2123}}) \
        == "FedAvg (DP ε=4.21)"
    assert display_name("fedavg:non_private", {"algorithm": {"name": "fedavg"}}) == "FedAvg (non private)"
