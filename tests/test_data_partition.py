"""Partitioners, splits and prompt templates: seeded, skewed as asked, and failing
clearly when the data cannot make the sites asked for."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from fedllm.config import PartitionConfig, SplitConfig, config_from_dict
from fedllm.data import Example, format_example, partition_examples, split_examples
from fedllm.data.sources import load_source
from fedllm.errors import FedllmError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"public data not at {DATA}")


def _examples(n: int, source: str = "s", labels=("a", "b", "c")) -> list[Example]:
    return [
        Example(instruction=f"q{i}", output=f"r{i}", label=labels[i % len(labels)] if labels else None,
                source=source, origin=f"{source}.jsonl:{i + 1}")
        for i in range(n)
    ]


def _ids(sites: dict[str, list[Example]]) -> dict[str, list[str]]:
    return {site: [ex.origin for ex in exs] for site, exs in sites.items()}


def _mean_label_skew(sites: dict[str, list[Example]]) -> float:
    """Mean total-variation distance between each site's label shares and the pool's."""
    pool = [ex for exs in sites.values() for ex in exs]
    overall = Counter(ex.label for ex in pool)
    distances = []
    for exs in sites.values():
        here = Counter(ex.label for ex in exs)
        distances.append(0.5 * sum(abs(here[k] / len(exs) - overall[k] / len(pool)) for k in overall))
    return sum(distances) / len(distances)


@pytest.fixture(scope="module")
def dolly_3000():
    cfg = config_from_dict({"data": {"sources": [
        {"name": "dolly", "format": "dolly", "path": str(DATA / "dolly_15k"), "max_records": 3000}]}})
    return {"dolly": load_source(cfg.data.sources[0], cfg)}


@needs_data
def test_dirichlet_small_alpha_skews_labels_more_than_large_alpha(dolly_3000):
    skew = {}
    for alpha in (1.0, 100.0):
        sites = partition_examples(dolly_3000, PartitionConfig(strategy="dirichlet", num_sites=5, alpha=alpha), seed=1)
        assert list(sites) == [f"site-{k}" for k in range(1, 6)]
        assert sum(len(v) for v in sites.values()) == 3000
        assert len({ex.origin for exs in sites.values() for ex in exs}) == 3000  # each record on one site
        skew[alpha] = _mean_label_skew(sites)
    assert skew[1.0] > 0.2, skew
    assert skew[100.0] < 0.1, skew
    assert skew[1.0] > 3 * skew[100.0], skew


@needs_data
def test_dirichlet_respects_min_site_records(dolly_3000):
    part = PartitionConfig(strategy="dirichlet", num_sites=5, alpha=0.05, min_site_records=150)
    for seed in (1, 2, 3):
        sites = partition_examples(dolly_3000, part, seed)
        assert min(len(v) for v in sites.values()) >= 150


def test_dirichlet_gives_up_after_bounded_draws():
    # one label, 30 records, 3 sites of ≥ 10: only an exactly even draw fits, and
    # alpha=0.01 almost always hands the label to one site
    part = PartitionConfig(strategy="dirichlet", num_sites=3, alpha=0.01, min_site_records=10)
    with pytest.raises(FedllmError, match=r"'data.partition.min_site_records': no Dirichlet draw in \d+ tries"):
        partition_examples({"s": _examples(30, labels=("a",))}, part, seed=0)
    # asking for more than there is fails at once
    with pytest.raises(FedllmError, match=r"3 sites × 11 records needs 33, but there are only 30"):
        partition_examples({"s": _examples(30)}, PartitionConfig(strategy="dirichlet", num_sites=3, min_site_records=11), 0)


def test_dirichlet_needs_a_label_on_every_record():
    unlabeled = _examples(5, source="oasst", labels=None)
    part = PartitionConfig(strategy="dirichlet", num_sites=2, alpha=1.0, min_site_records=1)
    with pytest.raises(FedllmError, match=r"data source 'oasst': record oasst.jsonl:1 has no 'label'"):
        partition_examples({"fpb": _examples(20, "fpb"), "oasst": unlabeled}, part, seed=0)


def test_dirichlet_over_another_field():
    by_source = {"a": _examples(40, "a"), "b": _examples(40, "b")}
    part = PartitionConfig(strategy="dirichlet", num_sites=2, alpha=0.5, label_field="source", min_site_records=5)
    sites = partition_examples(by_source, part, seed=3)
    assert sorted(len(v) for v in sites.values())[0] >= 5


@pytest.mark.parametrize("strategy", ["iid", "dirichlet"])
def test_more_sites_than_records_is_an_error(strategy):
    part = PartitionConfig(strategy=strategy, num_sites=6, min_site_records=1)
    with pytest.raises(FedllmError, match=r"'data.partition.num_sites': 6 sites but only 5 records"):
        partition_examples({"s": _examples(5)}, part, seed=0)


def test_alpha_must_be_positive():
    with pytest.raises(FedllmError, match=r"'data.partition.alpha': must be > 0"):
        partition_examples({"s": _examples(50)}, PartitionConfig(strategy="dirichlet", num_sites=2, alpha=0.0), seed=0)


@pytest.mark.parametrize("strategy", ["iid", "dirichlet"])
def test_same_seed_same_partition_other_seed_other(strategy):
    by_source = {"x": _examples(200, "x"), "y": _examples(100, "y")}
    part = PartitionConfig(strategy=strategy, num_sites=4, alpha=0.5)
    first = _ids(partition_examples(by_source, part, seed=42))
    assert _ids(partition_examples(by_source, part, seed=42)) == first
    assert _ids(partition_examples(by_source, part, seed=43)) != first


def test_iid_deals_evenly_across_sources():
    sites = partition_examples({"x": _examples(50, "x"), "y": _examples(53, "y")},
                               PartitionConfig(strategy="iid", num_sites=4), seed=0)
    assert list(sites) == ["site-1", "site-2", "site-3", "site-4"]
    assert sorted(len(v) for v in sites.values()) == [25, 26, 26, 26]
    # pooled, not one source per site
    assert all({ex.source for ex in exs} == {"x", "y"} for exs in sites.values())


def test_by_source_one_site_per_source_and_shared_sites():
    by_source = {"fpb": _examples(10, "fpb"), "dolly": _examples(7, "dolly"), "meadow": _examples(4, "meadow")}
    sites = partition_examples(by_source, PartitionConfig(), seed=0,
                               site_of={"fpb": "bank", "dolly": "hospital", "meadow": "hospital"})
    assert list(sites) == ["bank", "hospital"]
    assert [ex.source for ex in sites["hospital"]] == ["dolly"] * 7 + ["meadow"] * 4
    plain = partition_examples(by_source, PartitionConfig(), seed=0)
    assert list(plain) == ["fpb", "dolly", "meadow"]


def test_a_site_left_empty_is_an_error():
    with pytest.raises(FedllmError, match=r"site 'empty': the by_source partition left it without records"):
        partition_examples({"full": _examples(3), "empty": []}, PartitionConfig(), seed=0)


def test_unknown_strategy_lists_allowed_values():
    with pytest.raises(FedllmError, match=r"'data.partition.strategy': unknown strategy 'shards'; allowed values: by_source, iid, dirichlet"):
        partition_examples({"s": _examples(3)}, PartitionConfig(strategy="shards"), seed=0)


# -- splits -----------------------------------------------------------------


def test_split_80_10_10_seeded_and_disjoint():
    examples = _examples(101)
    splits = split_examples(examples, SplitConfig(), seed=5, key="site-1")
    assert {k: len(v) for k, v in splits.items()} == {"train": 81, "val": 10, "test": 10}
    origins = [ex.origin for s in ("train", "val", "test") for ex in splits[s]]
    assert sorted(origins) == sorted(ex.origin for ex in examples)
    assert origins != [ex.origin for ex in examples]  # shuffled
    again = split_examples(examples, SplitConfig(), seed=5, key="site-1")
    assert {k: [e.origin for e in v] for k, v in again.items()} == {k: [e.origin for e in v] for k, v in splits.items()}
    other_site = split_examples(examples, SplitConfig(), seed=5, key="site-2")
    assert [e.origin for e in other_site["val"]] != [e.origin for e in splits["val"]]


def test_small_site_gets_one_record_per_split_or_a_clear_error():
    splits = split_examples(_examples(4), SplitConfig(), seed=0, key="tiny")
    assert {k: len(v) for k, v in splits.items()} == {"train": 2, "val": 1, "test": 1}
    with pytest.raises(FedllmError, match=r"site 'tiny': 2 records cannot fill train/val/test 0.8/0.1/0.1"):
        split_examples(_examples(2), SplitConfig(), seed=0, key="tiny")
    no_test = split_examples(_examples(10), SplitConfig(train=0.9, val=0.1, test=0.0), seed=0, key="s")
    assert {k: len(v) for k, v in no_test.items()} == {"train": 9, "val": 1, "test": 0}


# -- prompts ----------------------------------------------------------------


def test_templates_give_prompt_and_response():
    fpb = Example(instruction="Profit rose 5 % .", output="positive", label="positive")
    assert format_example(fpb, "phrasebank") == ("Profit rose 5 % . sentiment:", " positive")

    with_input = Example(instruction="Summarize {this}.", input="Some {context}.", output="Short.")
    prompt, response = format_example(with_input, "alpaca")
    assert prompt.endswith("### Instruction:\nSummarize {this}.\n\n### Input:\nSome {context}.\n\n### Response:\n")
    assert response == "Short."
    prompt, _ = format_example(Example(instruction="Name a color.", output="Red."), "alpaca")
    assert "### Input" not in prompt and prompt.endswith("### Instruction:\nName a color.\n\n### Response:\n")
    assert format_example(with_input, "plain") == ("Summarize {this}.\nSome {context}.\n", "Short.")
    with pytest.raises(FedllmError, match=r"'data.template': unknown template 'chatml'; allowed values: alpaca, plain, phrasebank"):
        format_example(fpb, "chatml")
