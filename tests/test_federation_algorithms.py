"""FedAvg, FedProx and FedOpt (``federation.algorithm``).

- FedOpt's server step (fedllm's ``ServerOptimizer``, NVFlare's FedOpt update) equals SGD with
  momentum and Adam computed by hand over two rounds on a three-tensor model, and a
  controller restarted from round 1's persisted weights and optimizer state continues exactly;
- FedProx's term is mu/2·Σ‖w − w_global‖² over the trainable weights, with gradient mu·(w − w_global);
- in the simulator, with LoRA: FedProx at mu = 0 is FedAvg; FedProx at mu > 0 and FedOpt
  complete, exchanging the same adapter bytes per round as FedAvg; FedOpt's round 2 is
  FedAvg's mean minus the momentum of round 1, and the summary records which algorithm ran.

The same two algorithms on the localhost production federation: test_federation_mtls.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY_CONFIG, TINY_RUN
from fedllm.config import load_config
from fedllm.errors import FedllmError
from fedllm.federation.fedopt import ServerOptimizer
from fedllm.federation.persistor import load_round, load_server_optimizer, save_round
from fedllm.train.proximal import ProximalTerm

# -- FedOpt's server step, by hand -------------------------------------------------------

NAMES = ("model.layer.lora_A.default.weight", "model.layer.lora_B.default.weight", "model.head.bias")


def tiny_weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = ((2, 3), (3, 2), (3,))
    return {name: torch.randn(shape, generator=g) for name, shape in zip(NAMES, shapes)}


def controller(optimizer: str, **args) -> ServerOptimizer:
    return ServerOptimizer(optimizer_args={"path": f"torch.optim.{optimizer}", "args": args}, num_clients=2, num_rounds=2)


def two_rounds(ctl: ServerOptimizer, w0: dict, means: list[dict]) -> list[dict]:
    ctl.start_optimizer(w0)
    w1 = ctl.server_step(w0, means[0])
    return [w1, ctl.server_step(w1, means[1])]


def test_fedopt_sgd_momentum_step_equals_the_hand_computation():
    lr, momentum = 0.7, 0.6
    w0, means = tiny_weights(0), [tiny_weights(1), tiny_weights(2)]
    w1, w2 = two_rounds(controller("SGD", lr=lr, momentum=momentum), w0, means)
    for name in NAMES:
        g1 = w0[name] - means[0][name]  # pseudo-gradient: global − the sites' mean
        m1 = g1  # torch's SGD: the first buffer is the gradient itself
        expected1 = w0[name] - lr * m1
        g2 = expected1 - means[1][name]
        m2 = momentum * m1 + g2
        expected2 = expected1 - lr * m2
        assert torch.allclose(w1[name], expected1, rtol=0, atol=1e-6), name
        assert torch.allclose(w2[name], expected2, rtol=0, atol=1e-6), name
        assert w2[name].dtype == w0[name].dtype


def test_fedopt_sgd_at_lr_1_without_momentum_is_fedavg():
    w0, means = tiny_weights(0), [tiny_weights(1), tiny_weights(2)]
    w1, w2 = two_rounds(controller("SGD", lr=1.0, momentum=0.0), w0, means)
    for name in NAMES:
        assert torch.allclose(w1[name], means[0][name], rtol=0, atol=1e-6)
        assert torch.allclose(w2[name], means[1][name], rtol=0, atol=1e-6)


def test_fedopt_adam_step_equals_the_hand_computation():
    lr, (b1, b2), eps = 0.05, (0.9, 0.99), 1e-3
    w0, means = tiny_weights(0), [tiny_weights(1), tiny_weights(2)]
    w1, w2 = two_rounds(controller("Adam", lr=lr, betas=[b1, b2], eps=eps), w0, means)
    for name in NAMES:
        w, m, v = w0[name].double(), 0.0, 0.0
        for t, (mean, got) in enumerate(zip(means, (w1, w2)), start=1):
            g = w - mean[name].double()
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            w = w - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
            assert torch.allclose(got[name].double(), w, rtol=0, atol=1e-6), (name, t)


@pytest.mark.parametrize("optimizer, args", [("SGD", {"lr": 0.7, "momentum": 0.6}),
                                             ("Adam", {"lr": 0.05, "betas": [0.9, 0.99], "eps": 1e-3})])
def test_fedopt_resumes_from_the_persisted_round_exactly(tmp_path, optimizer, args):
    """Round 1's weights and optimizer state, written and read back as a round folder, give
    a fresh controller (a resumed job) round 2 bit for bit."""
    w0, means = tiny_weights(0), [tiny_weights(1), tiny_weights(2)]
    unbroken = controller(optimizer, **args)
    w1, w2 = two_rounds(unbroken, w0, means)
    fresh = controller(optimizer, **args)
    fresh.start_optimizer(w0)
    state = (fresh.server_step(w0, means[0]), fresh.optimizer_state())
    assert state[1], "the optimizer kept no state to persist"
    save_round(tmp_path, 1, state[0], {"round": 1}, server_optimizer=state[1])

    resumed = controller(optimizer, **args)
    resumed.start_optimizer(load_round(tmp_path, 1), load_server_optimizer(tmp_path, 1))
    again = resumed.server_step(load_round(tmp_path, 1), means[1])
    for name in NAMES:
        assert torch.equal(again[name], w2[name]), name
    # without the state, the momentum is lost: round 2 differs
    forgetful = controller(optimizer, **args)
    forgetful.start_optimizer(w1)
    assert any(not torch.equal(forgetful.server_step(w1, means[1])[n], w2[n]) for n in NAMES)


def test_a_resumed_fedopt_job_gets_the_optimizer_state_from_the_persistor_and_never_sends_it(tmp_path):
    """The job's own path: the controller hands the persistor round 1's weights with the
    optimizer state in the saved model's meta only; a job resumed from round 1 gets both
    back from ``RoundCheckpointPersistor`` and takes the state out before the model goes to
    the sites; its round 2 is the unbroken job's, bit for bit."""
    from nvflare.apis.fl_context import FLContext
    from nvflare.app_common.abstract.fl_model import FLModel

    from fedllm.federation.persistor import SERVER_OPTIMIZER_STATE, RoundCheckpointPersistor

    w0, means = tiny_weights(0), [tiny_weights(1), tiny_weights(2)]
    sgd = {"lr": 0.7, "momentum": 0.6}
    _, w2 = two_rounds(controller("SGD", **sgd), w0, means)

    job = controller("SGD", **sgd)
    job.start_optimizer(w0)
    handed = {}
    job.persistor = type("Persistor", (), {"save": lambda _, ml, ctx: handed.update(ml)})()
    job.fl_ctx = FLContext()
    round1 = FLModel(params=job.server_step(w0, means[0]), meta={"nr_aggregated": 2})
    job.save_model(round1)
    assert round1.meta == {"nr_aggregated": 2}  # what the sites receive next round
    state = handed["meta"].pop(SERVER_OPTIMIZER_STATE)  # as RoundCheckpointPersistor.save_model does
    save_round(tmp_path, 1, handed["weights"], {"round": 1}, server_optimizer=state)

    persistor = RoundCheckpointPersistor(initial_weights="", checkpoint_dir=str(tmp_path), resume_round=1)
    resumed = controller("SGD", **sgd)
    resumed.start_round = 1
    resumed.persistor = type("Persistor", (), {"load": lambda _, ctx: persistor.load_model(ctx)})()
    resumed.fl_ctx = FLContext()
    model = resumed.load_model()
    assert SERVER_OPTIMIZER_STATE not in model.meta  # the sites never receive it
    again = resumed.server_step(model.params, means[1])
    for name in NAMES:
        assert torch.equal(again[name], w2[name]), name

    # a round without the state (persisted by a FedAvg job) is refused, naming the file
    save_round(tmp_path, 1, handed["weights"], {"round": 1})
    with pytest.raises(FedllmError, match=r"round 1 has no server optimizer state \(server_optimizer.safetensors\)"):
        resumed.load_model()


# -- FedProx's term ----------------------------------------------------------------------

def test_fedprox_term_is_half_mu_times_the_squared_distance_over_trainable_weights():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    model[0].weight.requires_grad_(False)  # frozen (a PEFT base): neither copied nor counted
    term = ProximalTerm(mu=0.3)
    term.start_round(model)
    assert [name for name, _ in term.reference] == ["0.bias", "1.weight", "1.bias"]
    assert float(term(model).detach()) == 0.0  # at the global weights

    global_ = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    value = term(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    now = {n: p.detach() for n, p in model.named_parameters()}
    by_hand = 0.3 / 2 * sum(float(((now[n] - global_[n]) ** 2).sum()) for n in trainable)
    assert float(value.detach()) == pytest.approx(by_hand, rel=1e-6)
    value.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, 0.3 * (p.detach() - global_[name]), atol=1e-6), name
        else:
            assert p.grad is None


def test_fedprox_term_needs_a_positive_mu_and_the_round_start():
    with pytest.raises(ValueError, match="mu = 0 is FedAvg"):
        ProximalTerm(mu=0.0)
    with pytest.raises(RuntimeError, match="start_round"):
        ProximalTerm(mu=0.1)(torch.nn.Linear(2, 2))


# -- config and report -------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    (["federation.algorithm=scaffold"], "config field 'federation.algorithm': 'scaffold' is not allowed; allowed values: fedavg, fedprox, fedopt"),
    (["federation.algorithm=fedprox", "federation.fedprox.mu=-0.1"], "config field 'federation.fedprox.mu': must be a finite number ≥ 0"),
    (["federation.algorithm=fedopt", "federation.fedopt.optimizer=rmsprop"], "config field 'federation.fedopt.optimizer': 'rmsprop' is not allowed; allowed values: sgd, adam"),
    (["federation.algorithm=fedopt", "federation.fedopt.lr=0"], "config field 'federation.fedopt.lr': must be > 0"),
    (["federation.algorithm=fedopt", "federation.fedopt.momentum=1"], "config field 'federation.fedopt.momentum': must be in [0, 1)"),
    (["federation.algorithm=fedopt", "federation.fedopt.optimizer=adam", "federation.fedopt.betas=[0.9]"], "config field 'federation.fedopt.betas'"),
])
def test_bad_algorithm_settings_name_the_field(override, message):
    with pytest.raises(FedllmError) as e:
        load_config(TINY_CONFIG, override)
    assert message in str(e.value)


def test_algorithm_settings_change_the_fingerprint():
    fedavg = load_config(TINY_CONFIG)
    assert fedavg.fingerprint() != load_config(TINY_CONFIG, ["federation.algorithm=fedprox"]).fingerprint()
    fedprox = load_config(TINY_CONFIG, ["federation.algorithm=fedprox"])
    assert fedprox.fingerprint() != load_config(TINY_CONFIG, ["federation.algorithm=fedprox", "federation.fedprox.mu=0.1"]).fingerprint()
    fedopt = load_config(TINY_CONFIG, ["federation.algorithm=fedopt"])
    assert fedopt.fingerprint() != load_config(TINY_CONFIG, ["federation.algorithm=fedopt", "federation.fedopt.lr=0.5"]).fingerprint()


def test_the_report_names_the_algorithm_that_ran():
    from fedllm.report.header import header_section
    from fedllm.report.run_summary import display_name

    fedprox = {"kind": "federated", "algorithm": {"name": "fedprox", "mu": 0.01}}
    fedopt = {"kind": "federated", "algorithm": {"name": "fedopt", "optimizer": "sgd", "lr": 1.0, "momentum": 0.6}}
    adam = {"algorithm": {"name": "fedopt", "optimizer": "adam", "lr": 0.01, "betas": [0.9, 0.99], "eps": 1e-8}}
    assert display_name("fedavg", fedprox) == "FedProx (μ=0.01)"
    assert display_name("fedavg", fedopt) == "FedOpt (SGD, lr 1, momentum 0.6)"
    assert display_name("fedavg", adam) == "FedOpt (Adam, lr 0.01, betas 0.9/0.99)"
    assert display_name("fedavg:product_svd", fedprox) == "FedProx (μ=0.01, product SVD)"
    assert display_name("fedavg", {"algorithm": {"name": "fedavg"}}) == display_name("fedavg") == "FedAvg"
    facts = dict(header_section({"name": "r", "settings": {"fedavg": fedprox}}, "summary.json").blocks[0].items)
    assert facts["Algorithm"] == "FedProx (μ=0.01)"


# -- the simulator, with LoRA --------------------------------------------------------------

TWO_SITES = ("data.sources=[{name: dolly, format: dolly, path: dolly_15k, max_records: 80}, "
             "{name: medical, format: medical_meadow, path: medical_meadow/medical_meadow_small.json, max_records: 80}]")
LORA = TINY_RUN + [TWO_SITES, "method.name=lora", "federation.rounds=2"]
MOMENTUM = 0.6
# FedAvg's run lists FedProx (mu > 0) and FedOpt as side-by-side settings (baselines.algorithms:
# fedavg:fedprox, fedavg:fedopt, in variant run dirs over the same data and base model);
# FedProx at mu = 0 is a run of its own, its data and base model linked from FedAvg's.
SIDE_BY_SIDE = ["baselines.algorithms=[fedprox, fedopt]", "federation.fedprox.mu=0.5",
                "federation.fedopt.lr=1", f"federation.fedopt.momentum={MOMENTUM}"]
MU_0 = ["federation.algorithm=fedprox", "federation.fedprox.mu=0"]


@pytest.fixture(scope="module")
def federations(tmp_path_factory, shared_data):
    """Each algorithm's 2-round LoRA federation over the same two sites: (run dir, summary entry)."""
    import shutil

    from fedllm.config import dump_config
    from fedllm.rundir import RunDir
    from fedllm.run import prepare, run_federation
    from fedllm.train.model import link_or_copy_dir

    run = prepare(load_config(TINY_CONFIG, LORA + SIDE_BY_SIDE), tmp_path_factory.mktemp("fedavg") / "run")
    runs = {"fedavg": (run.root, run_federation(run))}
    for name in ("fedprox", "fedopt"):
        runs[name] = (run.dir.variant(f"fedavg:{name}").root, run_federation(run, setting=f"fedavg:{name}"))
    layout = RunDir(tmp_path_factory.mktemp("fedprox-mu0") / "run")
    layout.root.mkdir(parents=True)
    dump_config(load_config(TINY_CONFIG, LORA + MU_0), layout.config)
    link_or_copy_dir(run.dir.data, layout.data)
    link_or_copy_dir(run.dir.base_model, layout.base_model)
    shutil.copyfile(run.dir.model_info, layout.model_info)
    runs["fedprox-mu0"] = (layout.root, run_federation(layout.root))
    return runs


def test_side_by_side_algorithms_are_variant_settings_named_by_their_algorithm(tmp_path):
    from fedllm.report.run_summary import display_name
    from fedllm.run import variant_settings

    cfg = load_config(TINY_CONFIG, LORA + SIDE_BY_SIDE + ["baselines.lora_aggregations=[product_svd]"])
    assert variant_settings(cfg) == ["fedavg:product_svd", "fedavg:fedprox", "fedavg:fedopt"]
    assert variant_settings(load_config(TINY_CONFIG, MU_0 + ["baselines.algorithms=[fedprox, fedavg]"])) == ["fedavg:fedavg"]
    assert display_name("fedavg:fedprox", {"algorithm": {"name": "fedprox", "mu": 0.5}}) == "FedProx (μ=0.5)"
    with pytest.raises(FedllmError, match=r"config field 'baselines.algorithms\[1\]': 'scaffold' is not allowed; "
                                          r"allowed values: fedavg, fedprox, fedopt"):
        load_config(TINY_CONFIG, ["baselines.algorithms=[fedprox, scaffold]"])


def rounds_of(run) -> list[dict]:
    return [load_round(run / "federation" / "rounds", r) for r in (1, 2)]


def site_losses(run) -> dict:
    losses = {}
    for path in sorted((run / "events").glob("site-*.jsonl")):
        for line in path.read_text().splitlines():
            e = json.loads(line)
            if e["event"] in ("validate", "round_end"):
                losses[(path.name, e["event"], e["round"])] = e["loss"]
    return losses


@pytest.mark.slow  # four federations in all: minutes on 2 shared cores
def test_fedprox_at_mu_0_is_fedavg(federations):
    (avg_run, avg), (prox_run, prox) = federations["fedavg"], federations["fedprox-mu0"]
    assert prox["algorithm"] == {"name": "fedprox", "mu": 0.0} and avg["algorithm"] == {"name": "fedavg"}
    assert site_losses(prox_run) == site_losses(avg_run)  # every site, every round, as under FedAvg
    for a, p in zip(rounds_of(avg_run), rounds_of(prox_run)):
        for name in a:  # up to the aggregator's arrival-order ulp (test_resume_federation.py)
            assert torch.allclose(a[name], p[name], rtol=0, atol=1e-6), name
    assert prox["bytes_per_round"] == avg["bytes_per_round"]


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["fedprox", "fedopt"])
def test_fedprox_and_fedopt_complete_exchanging_only_the_adapter(federations, algorithm):
    (avg_run, avg), (run, result) = federations["fedavg"], federations[algorithm]
    assert [r["round"] for r in result["rounds"]] == [1, 2]
    assert result["val_loss"] > 0 and (run / result["adapter_dir"] / "adapter_config.json").is_file()
    model = json.loads((run / "model.json").read_text())
    assert result["bytes_per_round"] == avg["bytes_per_round"]  # the same adapter travels, each round
    assert all(r["sent"] == r["received"] == model["trainable_parameters"] * 4
               for per_round in result["bytes_per_round"].values() for r in per_round)
    w2, avg_w2 = rounds_of(run)[1], rounds_of(avg_run)[1]
    assert any(not torch.allclose(w2[n], avg_w2[n], atol=1e-4) for n in w2), "the algorithm changed nothing"
    assert (run / "federation" / "rounds" / "round-002" / "server_optimizer.safetensors").is_file() == (algorithm == "fedopt")


@pytest.mark.slow
def test_fedopt_round_2_is_the_mean_minus_round_1s_momentum(federations):
    """SGD at lr 1: round 1's global model is the sites' mean, as FedAvg's; round 2's is
    the sites' mean − momentum·(w0 − w1), w0 being the initial adapter."""
    from fedllm.train.site import build_module

    (avg_run, _), (opt_run, result) = federations["fedavg"], federations["fedopt"]
    assert result["algorithm"] == {"name": "fedopt", "optimizer": "sgd", "lr": 1.0, "momentum": MOMENTUM}
    cfg = load_config(opt_run / "config.yaml")
    w0 = build_module(cfg, str(opt_run / "models" / "base"), total_steps=1).state_dict()
    (avg1, avg2), (opt1, opt2) = rounds_of(avg_run), rounds_of(opt_run)
    for name in opt1:
        assert torch.allclose(opt1[name], avg1[name], rtol=0, atol=1e-5), name
    momentum = torch.cat([(MOMENTUM * (w0[n] - avg1[n])).flatten() for n in opt2])
    error = torch.cat([(opt2[n] - (avg2[n] - MOMENTUM * (w0[n] - avg1[n]))).flatten() for n in opt2])
    assert momentum.norm() > 1e-3  # the momentum term is there to see
    assert error.norm() < 1e-2 * momentum.norm()
