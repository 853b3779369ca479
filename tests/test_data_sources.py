"""load_source: local paths, the hub through `datasets`, s3:// through the store;
seeded max_records subsets; errors that name the config field."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedllm.config import config_from_dict
from fedllm.data.sources import load_source
from fedllm.errors import FedllmError
from s3server import BUCKET, s3_server  # noqa: F401  (a real S3 server: rclone serve s3)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"public data not at {DATA}")
REPO = Path(__file__).resolve().parents[1]


def _cfg(sources, seed=1234, data_dir=None):
    return config_from_dict({"seed": seed, "data_dir": data_dir, "data": {"sources": sources}})


def _line(example) -> int:
    return int(example.origin.rsplit(":", 1)[1])


@needs_data
def test_relative_path_resolves_against_data_dir_and_source_is_set():
    cfg = _cfg([{"name": "fpb", "format": "financial_phrasebank", "path": "financial_phrasebank/Sentences_AllAgree.txt"}],
               data_dir=str(DATA))
    examples = load_source(cfg.data.sources[0], cfg)
    assert len(examples) == 2264
    assert {ex.source for ex in examples} == {"fpb"}


@needs_data
def test_max_records_is_a_seeded_random_subset_in_file_order():
    src = {"name": "fpb", "format": "financial_phrasebank", "path": str(DATA / "financial_phrasebank/Sentences_AllAgree.txt"),
           "max_records": 200}
    cfg = _cfg([src])
    first = load_source(cfg.data.sources[0], cfg)
    again = load_source(cfg.data.sources[0], _cfg([src]))
    other_seed = load_source(cfg.data.sources[0], _cfg([src], seed=99))
    renamed = _cfg([{**src, "name": "fpb2"}])
    other_name = load_source(renamed.data.sources[0], renamed)

    lines = [_line(ex) for ex in first]
    assert len(first) == 200 and len(set(lines)) == 200
    assert lines == sorted(lines)                 # original order kept
    assert lines != list(range(1, 201))           # not the first N
    assert max(lines) > 2000                      # spread over the file
    assert [ex.to_dict() for ex in again] == [ex.to_dict() for ex in first]
    assert [_line(ex) for ex in other_seed] != lines
    assert [_line(ex) for ex in other_name] != lines


def test_path_not_found_names_field_and_resolved_path(tmp_path):
    (tmp_path / "ok.jsonl").write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    cfg = _cfg([{"name": "ok", "path": "ok.jsonl"}, {"name": "missing", "path": "nope/data.jsonl"}], data_dir=str(tmp_path))
    assert len(load_source(cfg.data.sources[0], cfg)) == 1
    with pytest.raises(FedllmError) as err:
        load_source(cfg.data.sources[1], cfg)
    message = str(err.value)
    assert "config field 'data.sources[1].path'" in message
    assert str(tmp_path / "nope" / "data.jsonl") in message


def test_unknown_format_and_bad_field_mapping_name_the_source_field(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    # the format registry is the schema: an unknown format stops the config at load time
    with pytest.raises(FedllmError, match=r"'data.sources\[0\].format': unknown format 'alpacca'; allowed values: dolly, "):
        _cfg([{"name": "a", "path": str(tmp_path / "a.jsonl"), "format": "alpacca"}])
    cfg = _cfg([{"name": "a", "path": str(tmp_path / "a.jsonl")},
                {"name": "b", "path": str(tmp_path / "a.jsonl"), "fields": {"prompt": "instruction"}}])
    cfg.data.sources[0].format = "alpacca"  # a config changed after it was loaded still gets the error
    with pytest.raises(FedllmError, match=r"'data.sources\[0\].format': unknown format 'alpacca'; allowed values: dolly, "):
        load_source(cfg.data.sources[0], cfg)
    with pytest.raises(FedllmError, match=r"'data.sources\[1\].fields': unknown key 'prompt'; allowed keys: instruction, "):
        load_source(cfg.data.sources[1], cfg)
    cfg.data.sources[1].format = "dolly"
    with pytest.raises(FedllmError, match=r"'data.sources\[1\].fields': only format generic takes a field mapping"):
        load_source(cfg.data.sources[1], cfg)


def test_unsupported_uri_scheme(tmp_path):
    cfg = _cfg([{"name": "a", "path": "gs://bucket/data.jsonl"}])
    with pytest.raises(FedllmError, match=r"'data.sources\[0\].path': unsupported URI .*accepted: a local path"):
        load_source(cfg.data.sources[0], cfg)


def test_file_uri_reads_local_file(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    cfg = _cfg([{"name": "a", "path": path.as_uri()}])
    (ex,) = load_source(cfg.data.sources[0], cfg)
    assert ex.origin == f"{path}:1"


def test_hub_dataset_read_through_datasets_with_class_labels(tmp_path, monkeypatch):
    """hf://<id>:<split> goes through datasets.load_dataset; a local dataset folder
    is a valid id offline. Class-label ints come back as label names."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")  # keep ~/.cache clean

    table = datasets.Dataset.from_dict(
        {"sentence": ["Sales rose .", "Loss widened .", "Plant opens ."], "label": [2, 0, 1]},
        features=datasets.Features({
            "sentence": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["negative", "neutral", "positive"]),
        }),
    )
    folder = tmp_path / "phrasebank_hub"
    folder.mkdir()
    table.to_parquet(str(folder / "train-00000.parquet"))
    cfg = _cfg([{"name": "hub", "format": "financial_phrasebank", "path": f"hf://{folder}:train"}])
    examples = load_source(cfg.data.sources[0], cfg)
    assert [(ex.instruction, ex.label, ex.output) for ex in examples] == [
        ("Sales rose .", "positive", "positive"),
        ("Loss widened .", "negative", "negative"),
        ("Plant opens .", "neutral", "neutral"),
    ]
    assert examples[1].origin == f"hf://{folder}:train#1" and examples[0].source == "hub"


def test_hub_dataset_offline_is_a_clear_error():
    # a fresh interpreter, so HF_HUB_OFFLINE is read at import as a site without internet would
    code = (
        "from fedllm.config import config_from_dict\n"
        "from fedllm.data.sources import load_source\n"
        "from fedllm.errors import FedllmError\n"
        "cfg = config_from_dict({'data': {'sources': [{'name': 'alpaca', 'path': 'hf://tatsu-lab/alpaca'}]}})\n"
        "try:\n"
        "    load_source(cfg.data.sources[0], cfg)\n"
        "except FedllmError as e:\n"
        "    print(e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "config field 'data.sources[0].path': cannot load hub dataset 'tatsu-lab/alpaca' split 'train'" in out.stdout
    assert "give a local path or s3:// URI" in out.stdout


def test_s3_sources_name_the_uri(s3_server, tmp_path):
    """A folder bundled with a manifest, and a single object, read from a real S3 server."""
    from fedllm.store import bundle

    folder = tmp_path / "dolly"
    folder.mkdir()
    (folder / "part-0.json").write_text(json.dumps([
        {"instruction": "a", "context": "", "response": "b", "category": "open_qa"},
        {"instruction": "c", "context": "d", "response": "e", "category": "closed_qa"},
    ]))
    (folder / "part-1.json").write_text(json.dumps([{"instruction": "f", "context": "", "response": "g"}]))
    bundle(folder, f"s3://{BUCKET}/data/dolly")
    phrases = tmp_path / "Sentences.txt"
    phrases.write_bytes("Profit rose .@positive\nCaf\xe9 sales fell .@negative\n".encode("iso-8859-1"))
    bundle(phrases, f"s3://{BUCKET}/data/fpb")

    folder_uri, file_uri = f"s3://{BUCKET}/data/dolly", f"s3://{BUCKET}/data/fpb/Sentences.txt"
    cfg = _cfg([{"name": "dolly", "format": "dolly", "path": folder_uri},
                {"name": "fpb", "format": "financial_phrasebank", "path": file_uri}])
    dolly = load_source(cfg.data.sources[0], cfg)
    assert [(ex.instruction, ex.label, ex.source) for ex in dolly] == [
        ("a", "open_qa", "dolly"), ("c", "closed_qa", "dolly"), ("f", None, "dolly")]
    assert [ex.origin for ex in dolly] == [
        f"{folder_uri}/part-0.json:#0", f"{folder_uri}/part-0.json:#1", f"{folder_uri}/part-1.json:#0"]
    fpb = load_source(cfg.data.sources[1], cfg)
    assert [(ex.instruction, ex.label, ex.origin) for ex in fpb] == [
        ("Profit rose .", "positive", f"{file_uri}:1"), ("Caf\xe9 sales fell .", "negative", f"{file_uri}:2")]

    # a bad record is reported at its URI, not at a temporary download
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "rows.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    bundle(bad, f"s3://{BUCKET}/data/bad")
    cfg = _cfg([{"name": "bad", "path": f"s3://{BUCKET}/data/bad"}])
    with pytest.raises(FedllmError, match=rf"^s3://{BUCKET}/data/bad/rows.jsonl:2: invalid JSON"):
        load_source(cfg.data.sources[0], cfg)
