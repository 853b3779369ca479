"""The experiment config: every error names the field and what is allowed."""

import pytest

from conftest import TINY_CONFIG, REPO
from fedllm.config import load_config
from fedllm.errors import FedllmError


def test_shipped_configs_load():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.data.sources, path


def test_overrides_set_nested_fields_and_list_items():
    cfg = load_config(TINY_CONFIG, ["federation.rounds=7", "training.lr=1e-5", "data.sources.1.max_records=9", "method.name=lora"])
    assert cfg.federation.rounds == 7
    assert cfg.training.lr == pytest.approx(1e-5)
    assert cfg.data.sources[1].max_records == 9
    assert cfg.method.name == "lora"


@pytest.mark.parametrize(
    "override, message",
    [
        (["method.name=adapterz"], "config field 'method.name': 'adapterz' is not allowed; allowed values: sft, lora, ptuning, prompt_tuning, ia3"),
        (["data.partition.strategy=dirichlet", "data.partition.num_sites=3", "data.partition.alpha=0"], "config field 'data.partition.alpha': must be > 0"),
        (["training.lrr=1"], "config field 'training.lrr' is unknown"),
        (["federation.rounds=many"], "config field 'federation.rounds': expected an integer, got 'many'"),
        (["federation.weighting=tokens"], "allowed values: samples, steps, uniform"),
        (["training.precision=fp8"], "config field 'training.precision'"),
        (["data.split.train=0.5"], "config field 'data.split'"),
    ],
)
def test_invalid_fields_are_named(override, message):
    with pytest.raises(FedllmError) as e:
        load_config(TINY_CONFIG, override)
    assert message in str(e.value)
    assert str(TINY_CONFIG) in str(e.value)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nseed: 1\nmodel: {source: tiny\n")
    with pytest.raises(FedllmError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(bad)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(FedllmError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_peft_parameter_typo_is_named():
    from fedllm.train.methods import peft_config_for

    with pytest.raises(FedllmError, match=r"method.params.rank': not a parameter of LoraConfig"):
        peft_config_for("lora", {"rank": 8})


def test_fingerprint_changes_with_any_field():
    a = load_config(TINY_CONFIG)
    b = load_config(TINY_CONFIG, ["seed=1"])
    assert a.fingerprint() != b.fingerprint()
    assert a.fingerprint() == load_config(TINY_CONFIG).fingerprint()
