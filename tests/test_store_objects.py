"""A store by URI — local folder and a real S3 server — does what a checkpoint writer needs:
objects round-trip, folders carry a manifest, and a damaged object is caught on read."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from s3server import BACKENDS, BUCKET, start_s3_server

from fedllm.errors import FedllmError
from fedllm.store import MANIFEST_NAME, LocalStore, ObjectNotFound, S3Store, open_store


@pytest.fixture(params=["local", *BACKENDS])
def store(request, tmp_path, monkeypatch):
    """(store, server or None): a LocalStore under tmp_path, or an S3Store on a live server."""
    if request.param == "local":
        yield open_store(str(tmp_path / "store")), None
        return
    server = start_s3_server(request.param, tmp_path, monkeypatch)
    try:
        yield open_store(f"s3://{BUCKET}/runs/exp1"), server
    finally:
        server.kill()


def _checkpoint_dir(root: Path) -> Path:
    """A folder shaped like a saved round: weights, config, a nested tokenizer folder."""
    root.mkdir(parents=True)
    (root / "adapter_model.safetensors").write_bytes(os.urandom(70_000))
    (root / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    return root


def test_objects_round_trip(store, tmp_path):
    store, _ = store
    assert store.list() == []
    store.put_bytes("rounds/1/metrics.json", b'{"loss": 2.5}')
    store.put_bytes("rounds/10/metrics.json", b'{"loss": 1.5}')
    store.put_bytes("rounds/2/metrics.json", b"")  # an empty object is an object too
    weights = tmp_path / "weights.bin"
    weights.write_bytes(os.urandom(300_000))
    store.put_file(weights, "rounds/1/weights.bin")

    assert store.get_bytes("rounds/1/metrics.json") == b'{"loss": 2.5}'
    assert store.get_bytes("rounds/2/metrics.json") == b""
    back = store.get_file("rounds/1/weights.bin", tmp_path / "down" / "w.bin")
    assert back.read_bytes() == weights.read_bytes()
    assert store.exists("rounds/1/weights.bin") and not store.exists("rounds/1/nothing")
    # Prefixes are string prefixes, as in S3: "rounds/1" also matches "rounds/10/...".
    assert store.list("rounds/1") == ["rounds/1/metrics.json", "rounds/1/weights.bin", "rounds/10/metrics.json"]
    assert store.list("rounds/1/") == ["rounds/1/metrics.json", "rounds/1/weights.bin"]
    assert len(store.list()) == 4

    store.put_bytes("rounds/1/metrics.json", b'{"loss": 2.0}')  # overwrite
    assert store.get_bytes("rounds/1/metrics.json") == b'{"loss": 2.0}'
    store.delete("rounds/1/metrics.json")
    store.delete("rounds/1/metrics.json")  # deleting a missing key is fine
    assert not store.exists("rounds/1/metrics.json")
    with pytest.raises(ObjectNotFound, match=r"rounds/1/metrics\.json: no such object"):
        store.get_bytes("rounds/1/metrics.json")
    assert store.uri_of("rounds/1/weights.bin").endswith("/rounds/1/weights.bin")
    assert store.uri_of("rounds/1/weights.bin").startswith(
        "s3://fedllm-test/runs/exp1/" if isinstance(store, S3Store) else "file:///"
    )


def test_put_dir_writes_manifest_last_and_get_dir_checks_it(store, tmp_path):
    store, _ = store
    src = _checkpoint_dir(tmp_path / "round-3")
    manifest = store.put_dir(src, "checkpoints/round-3", meta={"round": 3, "config_hash": "ab12"})

    assert set(manifest["files"]) == {"adapter_model.safetensors", "adapter_config.json", "tokenizer/tokenizer.json"}
    assert manifest["files"]["adapter_model.safetensors"]["size"] == 70_000
    assert manifest["total_bytes"] == sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    assert manifest["meta"] == {"round": 3, "config_hash": "ab12"}
    assert store.read_manifest("checkpoints/round-3") == manifest
    assert f"checkpoints/round-3/{MANIFEST_NAME}" in store.list("checkpoints/round-3/")

    out = store.get_dir("checkpoints/round-3", tmp_path / "restored")
    for rel in manifest["files"]:
        assert (out / rel).read_bytes() == (src / rel).read_bytes()
    assert not any(p.name.endswith(".fedllm-partial") for p in out.rglob("*"))

    with pytest.raises(ObjectNotFound, match=r"checkpoints/round-4/MANIFEST\.json: no manifest"):
        store.get_dir("checkpoints/round-4", tmp_path / "nothing")


def test_a_flipped_byte_in_a_stored_object_is_caught_on_read(store, tmp_path):
    store, server = store
    src = _checkpoint_dir(tmp_path / "round-1")
    store.put_dir(src, "checkpoints/round-1")
    if server is None:
        damaged = store.root / "checkpoints/round-1/adapter_model.safetensors"
        data = bytearray(damaged.read_bytes())
        data[1234] ^= 0xFF
        damaged.write_bytes(bytes(data))
    else:
        server.corrupt(BUCKET, "runs/exp1/checkpoints/round-1/adapter_model.safetensors", offset=1234)

    dest = tmp_path / "restored"
    with pytest.raises(FedllmError) as err:
        store.get_dir("checkpoints/round-1", dest)
    message = str(err.value)
    assert "checkpoints/round-1/adapter_model.safetensors" in message
    assert "corrupted: sha256 mismatch" in message
    assert not (dest / "adapter_model.safetensors").exists()  # nothing half-trusted left behind
    assert not any(p.name.endswith(".fedllm-partial") for p in dest.rglob("*"))
    # Without verification the bytes come back as stored, damage included.
    store.get_dir("checkpoints/round-1", tmp_path / "unchecked", verify=False)
    assert (tmp_path / "unchecked" / "adapter_model.safetensors").read_bytes() != (
        src / "adapter_model.safetensors"
    ).read_bytes()


def test_rewriting_a_folder_hides_the_old_manifest_and_writes_the_new_one_last(store, tmp_path):
    store, _ = store
    src = _checkpoint_dir(tmp_path / "a")
    store.put_dir(src, "latest", meta={"round": 1})
    writes = []
    put_file, put_bytes = store.put_file, store.put_bytes

    def recording_put_file(local_path, key):
        # While the new files go up, no manifest (old or new) may be readable.
        writes.append((key, store.exists(f"latest/{MANIFEST_NAME}")))
        put_file(local_path, key)

    def recording_put_bytes(key, data):
        writes.append((key, store.exists(f"latest/{MANIFEST_NAME}")))
        put_bytes(key, data)

    store.put_file, store.put_bytes = recording_put_file, recording_put_bytes
    manifest = store.put_dir(src, "latest", meta={"round": 2})
    assert writes == [
        ("latest/adapter_config.json", False),
        ("latest/adapter_model.safetensors", False),
        ("latest/tokenizer/tokenizer.json", False),
        (f"latest/{MANIFEST_NAME}", False),
    ]
    assert store.read_manifest("latest")["meta"] == {"round": 2} == manifest["meta"]


@pytest.mark.parametrize("bad_key", ["", "/abs", "a/../b", "a//b", "./a", "a\\b"])
def test_keys_outside_the_root_are_refused(store, bad_key):
    store, _ = store
    with pytest.raises(FedllmError, match="relative to the store root"):
        store.put_bytes(bad_key, b"x")


def test_local_writes_leave_no_temp_files_and_store_uri_forms(tmp_path):
    root = tmp_path / "ckpt"
    by_path, by_uri = open_store(str(root)), open_store(root.as_uri())
    assert isinstance(by_path, LocalStore) and by_path.root == by_uri.root == root.resolve()
    by_path.put_bytes("a/b.bin", b"12345")
    assert sorted(p.name for p in (root / "a").iterdir()) == ["b.bin"]
    by_path.delete("a/b.bin")
    assert not (root / "a").exists()  # emptied folders go, as in an object store
    assert repr(by_path) == f"LocalStore({root.resolve().as_uri()!r})"


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("gs://bucket/x", "unsupported URI scheme 'gs'"),
        ("s3://ab/x", "bucket name 'ab' is not valid"),
        ("s3://Bucket/x", "bucket name 'Bucket' is not valid"),
        ("file://otherhost/x", "name this machine only"),
    ],
)
def test_unsupported_uris_say_what_is_accepted(uri, expected, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(FedllmError, match=expected):
        open_store(uri)
