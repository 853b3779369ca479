"""The partition step end to end: a config becomes a folder of site files that a
later step reads back, byte-identical for the same config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedllm.config import config_from_dict
from fedllm.data import Example, load_partitions, prepare_partitions, read_jsonl, write_jsonl
from fedllm.errors import FedllmError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"public data not at {DATA}")


def _config(partition=None, **data):
    return config_from_dict({
        "name": "prep-test",
        "seed": 7,
        "data_dir": str(DATA),
        "data": {
            "sources": [
                {"name": "phrasebank", "format": "financial_phrasebank",
                 "path": "financial_phrasebank/Sentences_AllAgree.txt", "max_records": 300, "site": "bank"},
                {"name": "dolly", "format": "dolly", "path": "dolly_15k", "max_records": 200, "site": "hospital"},
                {"name": "meadow", "format": "medical_meadow", "path": "medical_meadow/medical_meadow_small.json",
                 "max_records": 100, "site": "hospital"},
            ],
            "partition": partition or {"strategy": "by_source"},
            **data,
        },
    })


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_prepare_writes_sites_and_load_reads_them_back(tmp_path):
    cfg = _config()
    parts = prepare_partitions(cfg, tmp_path / "data")
    assert parts.sites == ["bank", "hospital"]

    files = set(_tree(tmp_path / "data"))
    assert files == {
        "partition.json", "partition_summary.json", "partition_summary.png", "combined_val.jsonl",
        *(f"sites/{site}/{split}.jsonl" for site in ("bank", "hospital") for split in ("train", "val", "test")),
    }
    manifest = json.loads((tmp_path / "data" / "partition.json").read_text())
    assert manifest["config_fingerprint"] == cfg.fingerprint()
    assert manifest["strategy"] == "by_source" and manifest["seed"] == 7
    assert manifest["counts"] == {"bank": {"train": 240, "val": 30, "test": 30},
                                  "hospital": {"train": 240, "val": 30, "test": 30}}
    assert [s["records"] for s in manifest["sources"]] == [300, 200, 100]

    loaded = load_partitions(tmp_path / "data")
    assert loaded.sites == parts.sites and loaded.counts() == manifest["counts"]
    bank_train = loaded.train("bank")
    assert len(bank_train) == 240 and {ex.source for ex in bank_train} == {"phrasebank"}
    assert {ex.source for ex in loaded.train("hospital")} == {"dolly", "meadow"}
    # splits of a site are disjoint and cover it
    hospital = [ex.origin for split in (loaded.train, loaded.val, loaded.test) for ex in split("hospital")]
    assert len(hospital) == len(set(hospital)) == 300
    # every setting is scored on every site's val; the centralized baseline trains on every site's train
    assert [ex.to_dict() for ex in loaded.combined_val()] == [ex.to_dict() for s in loaded.sites for ex in loaded.val(s)]
    assert len(loaded.pooled_train()) == 480
    # summary by label: phrasebank sentiments and Dolly categories; meadow has no label -> by source
    assert loaded.summary["group_by"] == "source"
    assert loaded.summary["sites"]["hospital"]["by_group"] == {"dolly": 200, "meadow": 100, "phrasebank": 0}
    assert loaded.summary["sites"]["bank"]["splits"]["val"]["records"] == 30
    assert (tmp_path / "data" / "partition_summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FedllmError, match=r"no site 'clinic'; sites: bank, hospital"):
        loaded.train("clinic")


def test_same_config_gives_byte_identical_files(tmp_path):
    part = {"strategy": "dirichlet", "num_sites": 3, "alpha": 0.5, "min_site_records": 20}
    first = prepare_partitions(_labeled_config(part), tmp_path / "a")
    prepare_partitions(_labeled_config(part), tmp_path / "b")
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    assert first.summary["group_by"] == "label"
    assert set(first.summary["groups"]) >= {"negative", "neutral", "positive", "open_qa"}
    prepare_partitions(_labeled_config(part, seed=8), tmp_path / "c")
    assert _tree(tmp_path / "c")["sites/site-1/train.jsonl"] != _tree(tmp_path / "a")["sites/site-1/train.jsonl"]


def _labeled_config(partition, seed=7):
    cfg = _config(partition, max_val_records_per_site=5)
    cfg.seed = seed
    cfg.data.sources = cfg.data.sources[:2]  # phrasebank and dolly: every record labelled
    return cfg


def test_val_is_capped_per_site_with_a_seeded_subset(tmp_path):
    parts = prepare_partitions(_labeled_config({"strategy": "iid", "num_sites": 2}), tmp_path / "data")
    assert parts.counts() == {"site-1": {"train": 200, "val": 5, "test": 25},
                              "site-2": {"train": 200, "val": 5, "test": 25}}
    assert len(parts.combined_val()) == 10


def test_reprepare_drops_sites_of_an_older_partition(tmp_path):
    prepare_partitions(_labeled_config({"strategy": "iid", "num_sites": 3}), tmp_path / "data")
    parts = prepare_partitions(_labeled_config({"strategy": "iid", "num_sites": 2}), tmp_path / "data")
    assert sorted(p.name for p in (tmp_path / "data" / "sites").iterdir()) == ["site-1", "site-2"]
    assert load_partitions(tmp_path / "data").sites == parts.sites


def test_folder_without_partition_json_is_incomplete(tmp_path):
    prepare_partitions(_labeled_config({"strategy": "iid", "num_sites": 2}), tmp_path / "data")
    (tmp_path / "data" / "partition.json").unlink()  # as if the step died before its last write
    with pytest.raises(FedllmError, match=rf"^{tmp_path / 'data'}: no partition.json; the partition folder is missing or incomplete"):
        load_partitions(tmp_path / "data")
    with pytest.raises(FedllmError, match=r"no partition.json"):
        load_partitions(tmp_path / "never")


def test_bad_site_name_and_template_fail_before_writing(tmp_path):
    cfg = _config()
    cfg.data.sources[0].site = "../bank"
    with pytest.raises(FedllmError, match=r"'data.sources\[0\].site': site name '../bank' is not allowed"):
        prepare_partitions(cfg, tmp_path / "data")
    with pytest.raises(FedllmError, match=r"'data.template': unknown template 'chatml'"):
        _config(template="chatml")  # the template registry is the schema: refused at load
    cfg = _config()
    cfg.data.template = "chatml"  # changed after loading: prepare still refuses it before writing
    with pytest.raises(FedllmError, match=r"'data.template': unknown template 'chatml'"):
        prepare_partitions(cfg, tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_read_jsonl_round_trip_and_errors(tmp_path):
    examples = [Example(instruction="q", output="a", label="x", source="s", origin="f:1", meta={"k": 1}),
                Example(instruction="ü\nline", output="b")]
    write_jsonl(tmp_path / "ok.jsonl", examples)
    assert read_jsonl(tmp_path / "ok.jsonl") == examples
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(examples[0].to_dict()) + "\n" + '{"instruction": "q", "outptu": "a"}\n')
    with pytest.raises(FedllmError, match=rf"^{bad}:2: not an Example record"):
        read_jsonl(bad)
    bad.write_text("{\n")
    with pytest.raises(FedllmError, match=rf"^{bad}:1: invalid JSON"):
        read_jsonl(bad)
