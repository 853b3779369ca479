"""When the S3 server goes away mid-upload: retries, then one clear error, and never a partial
object under the final key; once the server is back, the same upload completes."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import traceback
from pathlib import Path

import pytest
from s3server import BUCKET, s3_server, start_s3_server  # noqa: F401 (s3_server is a fixture)

from fedllm.errors import FedllmError
from fedllm.store import S3Store, open_store

MIB = 1 << 20
KEY = "checkpoints/round-7/model.safetensors"
OBJECT = f"runs/{KEY}"


def _big_file(path: Path, mib: int) -> Path:
    # Four 5 MiB parts at FEDLLM_S3_PART_SIZE_MB=5: a real multipart upload.
    path.write_bytes(os.urandom(mib * MIB))
    return path


def _wait_for_upload_in_flight(server, timeout_s: float = 20.0) -> Path:
    """The temporary file rclone streams a multipart upload into, once it holds data."""
    bucket_dir = server.data_dir / BUCKET
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for path in bucket_dir.rglob(".rclone_temp_*"):
            try:
                if path.stat().st_size > 0:
                    return path
            except FileNotFoundError:
                pass
        time.sleep(0.02)
    raise AssertionError(f"no upload in flight after {timeout_s}s: {server.log_tail()}")


def _secrets_of(server) -> list[str]:
    return [server.secret_key, server.access_key]


@pytest.fixture
def rclone_server(tmp_path, monkeypatch):
    # Only rclone can be throttled (--bwlimit) to hold an upload open long enough to kill
    # the server in the middle of it; MinIO swallows 16 MiB on localhost in a blink.
    server = start_s3_server("rclone", tmp_path, monkeypatch)
    try:
        yield server
    finally:
        server.kill()


def test_server_stopping_mid_upload_gives_a_clear_error_and_no_partial_object(
    rclone_server, tmp_path, monkeypatch, caplog
):
    server = rclone_server
    monkeypatch.setenv("FEDLLM_S3_PART_SIZE_MB", "5")
    monkeypatch.setenv("FEDLLM_S3_RETRIES", "3")
    src = _big_file(tmp_path / "model.safetensors", 16)
    store = open_store(f"s3://{BUCKET}/runs")
    store.put_bytes("checkpoints/round-7/config.json", b"{}")  # bucket exists, server is warm
    server.kill()
    server.start(bwlimit="2M")

    outcome: dict = {}

    def upload():
        started = time.monotonic()
        try:
            store.put_file(src, KEY)
        except FedllmError as e:
            outcome["error"] = e
        outcome["seconds"] = time.monotonic() - started

    caplog.set_level(logging.WARNING, logger="fedllm.store")
    worker = threading.Thread(target=upload)
    worker.start()
    _wait_for_upload_in_flight(server)
    server.kill()
    worker.join(timeout=60)
    assert not worker.is_alive()

    error = outcome.get("error")
    assert error is not None, "the upload cannot have succeeded with the server gone"
    message = str(error)
    assert message.startswith(f"S3 put s3://{BUCKET}/runs/{KEY}: failed after 3 tries at {server.endpoint_url}")
    assert "Connection refused" in message or "NewConnectionError" in message
    assert "\n" not in message
    # 2 retries were logged, with the URI, and waited 0.05 s then 0.1 s.
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 2 and all(f"s3://{BUCKET}/runs/{KEY}" in r for r in retries)
    assert "try 1 of 3" in retries[0] and "try 2 of 3" in retries[1]
    # Credentials appear nowhere: message, the whole traceback, the log.
    text = message + "".join(traceback.format_exception(error)) + caplog.text
    for secret in _secrets_of(server):
        assert secret not in text

    # Nothing under the final key, on disk or through S3 once the server is back.
    assert not server.object_file(BUCKET, OBJECT).exists()
    server.start()
    assert not store.exists(KEY)
    assert KEY not in store.list("checkpoints/")
    assert store.list("checkpoints/") == ["checkpoints/round-7/config.json"]

    # The rerun of the same upload, same dir and port, completes whole.
    store.put_file(src, KEY)
    assert store.exists(KEY)
    stored = server.object_file(BUCKET, OBJECT).read_bytes()
    assert hashlib.sha256(stored).hexdigest() == hashlib.sha256(src.read_bytes()).hexdigest()


def test_a_server_back_within_the_retries_lets_the_upload_finish(rclone_server, tmp_path, monkeypatch):
    server = rclone_server
    monkeypatch.setenv("FEDLLM_S3_PART_SIZE_MB", "5")
    monkeypatch.setenv("FEDLLM_S3_RETRIES", "8")
    monkeypatch.setenv("FEDLLM_S3_RETRY_DELAY_S", "0.2")  # waits 0.2, 0.4, 0.8, 1.6, ... s
    src = _big_file(tmp_path / "model.safetensors", 12)
    store = open_store(f"s3://{BUCKET}/runs")
    store.put_bytes("warm", b"")
    server.kill()
    server.start(bwlimit="2M")

    def outage():
        _wait_for_upload_in_flight(server)
        server.kill()
        time.sleep(1.0)
        server.start()  # unthrottled: the retried upload goes through at once

    outage_thread = threading.Thread(target=outage)
    outage_thread.start()
    store.put_file(src, KEY)  # must not raise: a retry after the restart completes it
    outage_thread.join(timeout=30)
    assert store.get_bytes(KEY) == src.read_bytes()


def test_a_server_that_is_down_at_the_start_is_retried_until_it_answers(s3_server, monkeypatch):
    monkeypatch.setenv("FEDLLM_S3_RETRIES", "8")
    monkeypatch.setenv("FEDLLM_S3_RETRY_DELAY_S", "0.2")
    store = open_store(f"s3://{BUCKET}/runs")
    s3_server.kill()
    restart = threading.Timer(0.8, s3_server.start)
    restart.start()
    store.put_bytes("round-1/metrics.json", b'{"loss": 1.0}')
    restart.join()
    assert store.get_bytes("round-1/metrics.json") == b'{"loss": 1.0}'


def test_retries_are_bounded_and_configurable(s3_server, monkeypatch):
    monkeypatch.setenv("FEDLLM_S3_RETRIES", "2")
    store = open_store(f"s3://{BUCKET}/runs")
    s3_server.kill()
    started = time.monotonic()
    with pytest.raises(FedllmError, match=r"S3 get s3://fedllm-test/runs/x: failed after 2 tries"):
        store.get_bytes("x")
    assert time.monotonic() - started < 5

    monkeypatch.setenv("FEDLLM_S3_RETRIES", "zero")
    with pytest.raises(FedllmError, match=r"FEDLLM_S3_RETRIES='zero': expected an integer >= 1"):
        S3Store(BUCKET)
