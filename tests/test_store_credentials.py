"""Where a store finds its S3 endpoint and keys (environment, a mounted Secret folder), TLS with
a private CA, and that no key ever shows in a message, repr, log or written file."""

from __future__ import annotations

import logging
import traceback

import pytest
from s3server import BUCKET, make_self_signed_certificate, s3_server, start_s3_server  # noqa: F401 (fixture)

from fedllm.errors import FedllmError
from fedllm.store import load_settings, open_store, redact
from fedllm.store.credentials import CREDENTIALS_DIR_ENV


def _everything_said(error: BaseException, caplog) -> str:
    return str(error) + "".join(traceback.format_exception(error)) + caplog.text


def test_keys_and_endpoint_from_the_environment(s3_server, tmp_path):
    settings = load_settings()
    assert settings.endpoint == f"127.0.0.1:{s3_server.port}" and not settings.secure
    assert settings.region == "us-east-1"
    store = open_store(f"s3://{BUCKET}/env")
    store.put_bytes("hello.txt", b"from env")
    assert s3_server.client().get_object(BUCKET, "env/hello.txt").read() == b"from env"
    text = repr(store) + repr(settings) + str(vars(settings).get("endpoint"))
    assert repr(store) == f"S3Store('s3://{BUCKET}/env', endpoint='{s3_server.endpoint_url}')"
    for secret in (s3_server.access_key, s3_server.secret_key):
        assert secret not in text


def test_service_specific_endpoint_wins_over_the_global_one(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint_url)
    open_store(f"s3://{BUCKET}/x").put_bytes("k", b"v")
    assert s3_server.client().stat_object(BUCKET, "x/k").size == 1


def test_keys_and_endpoint_from_a_mounted_secret_folder(s3_server, tmp_path, monkeypatch):
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir()
    # Files as `kubectl create secret generic --from-literal` mounts them; `echo` adds newlines.
    (secret_dir / "AWS_ACCESS_KEY_ID").write_text(s3_server.access_key + "\n")
    (secret_dir / "AWS_SECRET_ACCESS_KEY").write_text(s3_server.secret_key + "\n")
    (secret_dir / "AWS_ENDPOINT_URL").write_text(s3_server.endpoint_url)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "a-stale-secret-from-another-tool")  # the folder wins
    monkeypatch.setenv(CREDENTIALS_DIR_ENV, str(secret_dir))

    store = open_store(f"s3://{BUCKET}/secret-dir")
    store.put_bytes("a.txt", b"from files")
    assert store.get_bytes("a.txt") == b"from files"
    assert s3_server.client().get_object(BUCKET, "secret-dir/a.txt").read() == b"from files"


def test_a_wrong_secret_fails_at_once_naming_the_uri_and_never_the_keys(s3_server, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    wrong_secret = "wrong-" + s3_server.secret_key[::-1]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
    store = open_store(f"s3://{BUCKET}/denied")
    with pytest.raises(FedllmError) as err:
        store.put_bytes("a.txt", b"x")
    message = str(err.value)
    assert message.startswith(f"S3 create bucket s3://{BUCKET}: ") or message.startswith(f"S3 put s3://{BUCKET}/denied/a.txt: ")
    assert "SignatureDoesNotMatch" in message or "AccessDenied" in message or "InvalidAccessKeyId" in message
    assert "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY" in message
    assert "failed after" not in message  # a refused key is not retried
    said = _everything_said(err.value, caplog) + repr(store)
    for secret in (wrong_secret, s3_server.access_key, s3_server.secret_key):
        assert secret not in said


def test_a_persistent_outage_names_uri_and_error_but_no_key(s3_server, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("FEDLLM_S3_RETRIES", "2")
    store = open_store(f"s3://{BUCKET}/gone")
    s3_server.kill()
    with pytest.raises(FedllmError) as err:
        store.get_file("model.bin", "unused")
    assert str(err.value).startswith(f"S3 get s3://{BUCKET}/gone/model.bin: failed after 2 tries at {s3_server.endpoint_url}")
    said = _everything_said(err.value, caplog)
    for secret in (s3_server.access_key, s3_server.secret_key):
        assert secret not in said


def test_tls_with_a_private_ca_bundle(tmp_path, monkeypatch, caplog):
    cert, key = make_self_signed_certificate(tmp_path / "tls")
    server = start_s3_server("rclone", tmp_path, monkeypatch, tls=(cert, key))
    try:
        assert server.endpoint_url.startswith("https://")
        monkeypatch.setenv("AWS_CA_BUNDLE", str(cert))
        store = open_store(f"s3://{BUCKET}/tls")
        assert load_settings().secure
        store.put_bytes("a.txt", b"over tls")
        assert store.get_bytes("a.txt") == b"over tls"

        # Without the CA the certificate is refused at once, with the fix in the message.
        monkeypatch.delenv("AWS_CA_BUNDLE")
        with pytest.raises(FedllmError, match=r"TLS failed at https://127\.0\.0\.1:\d+: .*set AWS_CA_BUNDLE") as err:
            open_store(f"s3://{BUCKET}/tls").get_bytes("a.txt")
        assert server.secret_key not in _everything_said(err.value, caplog)
    finally:
        server.kill()


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"AWS_ACCESS_KEY_ID": "onlythekey"}, "AWS_SECRET_ACCESS_KEY is not set"),
        ({"AWS_SECRET_ACCESS_KEY": "onlythesecret"}, "AWS_ACCESS_KEY_ID is not set"),
        ({"AWS_ENDPOINT_URL": "minio:9000"}, r"AWS_ENDPOINT_URL=minio:9000: expected an endpoint URL such as http://minio:9000"),
        ({"AWS_ENDPOINT_URL_S3": "http://minio:9000/bucket"}, "an endpoint URL has no path"),
        ({"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_CA_BUNDLE": "/no/such/ca.pem"}, "AWS_CA_BUNDLE=/no/such/ca.pem: no such file"),
        ({CREDENTIALS_DIR_ENV: "/no/such/secret"}, f"{CREDENTIALS_DIR_ENV}=/no/such/secret: not a directory"),
    ],
)
def test_incomplete_settings_name_the_variable(env, expected, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                 "AWS_CA_BUNDLE", CREDENTIALS_DIR_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(FedllmError, match=expected):
        open_store("s3://fedllm-test/x")


def test_defaults_without_an_endpoint_are_aws(monkeypatch):
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", CREDENTIALS_DIR_ENV):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings()
    assert (settings.endpoint, settings.secure, settings.region) == ("s3.amazonaws.com", True, "us-east-1")


def test_redact_removes_keys_from_env_folder_and_signed_requests(tmp_path, monkeypatch):
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir()
    (secret_dir / "AWS_SECRET_ACCESS_KEY").write_text("folder-secret-value-123\n")
    (secret_dir / "AWS_ACCESS_KEY_ID").write_text("FOLDERKEYID")
    monkeypatch.setenv(CREDENTIALS_DIR_ENV, str(secret_dir))
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-xyz-789")
    text = (
        "secret=folder-secret-value-123 key=FOLDERKEYID token=session-token-xyz-789\n"
        "Authorization: AWS4-HMAC-SHA256 Credential=OTHERKEY/20261123/us-east-1/s3/aws4_request, "
        "SignedHeaders=host, Signature=0123abcdef\n"
        "https://h/b/o?X-Amz-Credential=OTHERKEY%2F2026&X-Amz-Signature=abcdef01&x=1"
    )
    out = redact(text)
    for leaked in ("folder-secret-value-123", "FOLDERKEYID", "session-token-xyz-789", "OTHERKEY", "0123abcdef", "abcdef01"):
        assert leaked not in out
    assert out.startswith("secret=*** key=*** token=***\n")
    assert "Credential=***" in out and "Signature=***" in out and "&x=1" in out
    assert redact("nothing to hide in round 3") == "nothing to hide in round 3"
