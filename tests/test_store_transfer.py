"""`fedllm bundle` and loading by URI, as an air-gapped site does it: a model folder, a data set
and a single file go up to S3 with a manifest, and come back checked."""

from __future__ import annotations

import json
import shutil

import pytest
from s3server import BUCKET, s3_server  # noqa: F401 (fixture)

from fedllm.config import TinyModelSpec
from fedllm.errors import FedllmError
from fedllm.store import MANIFEST_NAME, ObjectNotFound, bundle, fetch_dir, fetch_path, open_store

from conftest import SHARED_DATA as DATA  # the checkout's ../shared/data
PIQA = DATA / "piqa"
DOLLY_TEST = DATA / "dolly_15k" / "global_test.json"


def _phrasebank_sentences(n: int) -> list[str]:
    lines = (DATA / "financial_phrasebank" / "Sentences_AllAgree.txt").read_text(encoding="latin-1").splitlines()
    return [line.rsplit("@", 1)[0] for line in lines[:n]]


def test_bundle_a_tiny_model_and_load_it_from_s3(s3_server, tmp_path):
    import torch

    from fedllm.train.model import build_tiny_model, load_causal_lm, load_tokenizer

    spec = TinyModelSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, vocab_size=300)
    model_dir = build_tiny_model(spec, _phrasebank_sentences(400), tmp_path / "tiny")
    uri = f"s3://{BUCKET}/models/tiny-llama"

    manifest = bundle(model_dir, uri, meta={"architecture": "llama"})
    local_names = sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file())
    assert sorted(manifest["files"]) == local_names and "model.safetensors" in manifest["files"]
    assert manifest["meta"] == {"bundled_from": "tiny", "kind": "dir", "architecture": "llama"}
    stored = sorted(o.object_name for o in s3_server.client().list_objects(BUCKET, "models/tiny-llama/", recursive=True))
    assert stored == sorted([f"models/tiny-llama/{n}" for n in local_names] + [f"models/tiny-llama/{MANIFEST_NAME}"])

    fetched = fetch_path(uri, tmp_path / "cache" / "tiny-llama")
    assert fetched == tmp_path / "cache" / "tiny-llama"
    original, loaded = load_causal_lm(model_dir), load_causal_lm(fetched)
    for name, tensor in original.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    text = "Operating profit rose to EUR 13.1 mn"
    assert load_tokenizer(fetched)(text)["input_ids"] == load_tokenizer(model_dir)(text)["input_ids"]


def test_fetch_a_data_set_prefix_and_a_single_file_from_it(s3_server, tmp_path):
    uri = f"s3://{BUCKET}/data/piqa"
    manifest = bundle(PIQA, uri)
    assert manifest["total_bytes"] == sum(p.stat().st_size for p in PIQA.iterdir())

    folder = fetch_dir(uri, tmp_path / "piqa")
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in PIQA.iterdir())
    assert (folder / "valid.jsonl").read_bytes() == (PIQA / "valid.jsonl").read_bytes()

    one = fetch_path(f"{uri}/valid-labels.lst", tmp_path / "one")
    assert one == tmp_path / "one" / "valid-labels.lst"
    assert one.read_bytes() == (PIQA / "valid-labels.lst").read_bytes()

    # Fetching again finds the files in place and does not download them again.
    before = (folder / "valid.jsonl").stat().st_mtime_ns
    fetch_dir(uri, tmp_path / "piqa")
    assert (folder / "valid.jsonl").stat().st_mtime_ns == before


def test_a_single_file_is_checked_against_its_folders_manifest(s3_server, tmp_path):
    uri = f"s3://{BUCKET}/eval/dolly"
    manifest = bundle(DOLLY_TEST, uri, meta={"split": "test"})
    assert list(manifest["files"]) == ["global_test.json"] and manifest["meta"]["kind"] == "file"
    records = json.loads(fetch_path(f"{uri}/global_test.json", tmp_path / "ok").read_text())
    assert records == json.loads(DOLLY_TEST.read_text())

    s3_server.corrupt(BUCKET, "eval/dolly/global_test.json", offset=10)
    with pytest.raises(FedllmError, match=r"eval/dolly/global_test\.json: file global_test\.json: corrupted: sha256 mismatch"):
        fetch_path(f"{uri}/global_test.json", tmp_path / "bad")
    assert not (tmp_path / "bad" / "global_test.json").exists()


def test_a_prefix_without_manifest_is_fetched_whole(s3_server, tmp_path):
    store = open_store(f"s3://{BUCKET}")
    store.put_bytes("loose/a.txt", b"a")
    store.put_bytes("loose/sub/b.txt", b"bb")
    store.put_bytes("loosely-related.txt", b"not under loose/")
    out = fetch_path(f"s3://{BUCKET}/loose", tmp_path / "loose")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == ["a.txt", "sub/b.txt"]
    assert (out / "sub" / "b.txt").read_bytes() == b"bb"

    with pytest.raises(ObjectNotFound, match=rf"s3://{BUCKET}/nothing/here: no object and no folder"):
        fetch_path(f"s3://{BUCKET}/nothing/here", tmp_path / "nothing")


def test_local_paths_are_used_as_they_are(tmp_path):
    assert fetch_path(str(PIQA), tmp_path / "unused") == PIQA
    assert fetch_path(PIQA.as_uri(), tmp_path / "unused") == PIQA
    assert fetch_dir(str(PIQA), tmp_path / "unused") == PIQA
    assert not (tmp_path / "unused").exists()
    with pytest.raises(FedllmError, match="no such file or directory"):
        fetch_path(str(tmp_path / "missing"), tmp_path / "unused")
    with pytest.raises(FedllmError, match="no such directory"):
        fetch_dir(str(DOLLY_TEST), tmp_path / "unused")


def test_bundle_to_a_local_store_and_back(tmp_path):
    copy = tmp_path / "piqa-src"
    shutil.copytree(PIQA, copy)
    (copy / MANIFEST_NAME).write_text("{}")  # a stale manifest from an earlier fetch is replaced
    manifest = bundle(copy, (tmp_path / "bundles" / "piqa").as_uri())
    assert MANIFEST_NAME not in manifest["files"]
    store = open_store(str(tmp_path / "bundles"))
    assert store.read_manifest("piqa") == manifest
    out = store.get_dir("piqa", tmp_path / "restored")
    assert (out / "valid.jsonl").read_bytes() == (PIQA / "valid.jsonl").read_bytes()

    with pytest.raises(FedllmError, match="no such file or directory to bundle"):
        bundle(tmp_path / "nope", str(tmp_path / "bundles" / "nope"))
