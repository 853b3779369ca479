"""A store in an S3 bucket (MinIO on the cluster), through the ``minio`` client.

Atomic writes come from S3 itself: an object appears under its key only when a single PUT
or a whole multipart upload completes; the client aborts a multipart upload that fails.
Transient failures (connection refused or reset, timeouts, HTTP 5xx, SlowDown) are retried
with exponential backoff; anything else fails at once. Errors name the URI and the last
error, never a key.

Tuning, from the environment (read when the store is opened):

- ``FEDLLM_S3_RETRIES``: tries per operation, default 5;
- ``FEDLLM_S3_RETRY_DELAY_S``: first backoff in seconds, doubled per try (capped at 30 s),
  default 0.5;
- ``FEDLLM_S3_PART_SIZE_MB``: multipart part size, at least 5, default 16 — objects larger
  than one part are sent as a multipart upload;
- ``FEDLLM_S3_TIMEOUT_S``: socket read timeout, default 120.
"""

from __future__ import annotations

import http.client
import io
import logging
import os
import re
import shutil
import time
from pathlib import Path

import certifi
import urllib3
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError

from fedllm.errors import FedllmError
from fedllm.files import write_atomic
from fedllm.store.base import LOCAL_FILE_MODE, ObjectNotFound, Store, check_key, join_key
from fedllm.store.credentials import S3Settings, load_settings, redact

log = logging.getLogger("fedllm.store")

_MIB = 1 << 20
_MAX_BACKOFF_S = 30.0
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_TRANSIENT_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "XMinioServerNotInitialized",
}
_NOT_FOUND_CODES = {"NoSuchKey", "NoSuchBucket", "ResourceNotFound"}
_CREDENTIAL_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"}
_XML_CODE = re.compile(r"<Code>([^<]+)</Code>")
_XML_MESSAGE = re.compile(r"<Message>([^<]*)</Message>")


def _env_number(name: str, default: float, minimum: float, cast=int):
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = cast(raw)
    except ValueError:
        value = None
    if value is None or value < minimum:
        kind = "an integer" if cast is int else "a number"
        raise FedllmError(f"{name}={raw!r}: expected {kind} >= {minimum}")
    return value


def _status_and_code(error: BaseException) -> tuple[int, str | None]:
    """HTTP status and S3 error code of a failed request (0, None when no answer came)."""
    if isinstance(error, S3Error):
        return getattr(error.response, "status", 0) or 0, error.code
    if isinstance(error, ServerError):
        return error.status_code, None
    if isinstance(error, InvalidResponseError):
        # Some servers (rclone) send their XML errors as text/xml, which the client does not
        # parse; a proxy in front of MinIO answers 502/503 with an HTML page.
        body = getattr(error, "_body", None) or ""
        code = _XML_CODE.search(body)
        return getattr(error, "_code", 0) or 0, code.group(1) if code else None
    return 0, None


def _describe(error: BaseException) -> str:
    """A one-line account of ``error`` with no key in it."""
    status, code = _status_and_code(error)
    if code:
        message = getattr(error, "message", None) or _XML_MESSAGE.search(getattr(error, "_body", None) or "")
        message = message.group(1) if isinstance(message, re.Match) else message
        text = f"{code} (HTTP {status}): {message}" if status else f"{code}: {message}"
    else:
        text = f"{type(error).__name__}: {error}"
    return redact(" ".join(text.split()))


def _is_transient(error: BaseException) -> bool:
    status, code = _status_and_code(error)
    if status or code:
        return code in _TRANSIENT_CODES or status >= 500
    if isinstance(error, urllib3.exceptions.SSLError):
        return False  # a certificate problem does not heal by waiting
    return isinstance(
        error,
        (urllib3.exceptions.HTTPError, http.client.HTTPException, ConnectionError, TimeoutError),
    )


class BucketNotFound(ObjectNotFound):
    """The bucket of the URI does not exist (yet)."""


class S3Store(Store):
    """Objects under ``s3://bucket/prefix``; a missing bucket is created by the first write."""

    def __init__(self, bucket: str, prefix: str = "", settings: S3Settings | None = None):
        self.bucket = bucket
        self.prefix = check_key(prefix, folder=True)
        self.root_uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        if not _BUCKET_NAME.match(bucket) or ".." in bucket:
            raise FedllmError(
                f"{self.root_uri}: bucket name {bucket!r} is not valid; expected 3-63 characters "
                "of lowercase letters, digits, '.' and '-', starting and ending with a letter or digit"
            )
        self.settings = settings or load_settings()
        self.retries = _env_number("FEDLLM_S3_RETRIES", 5, 1)
        self.retry_delay_s = _env_number("FEDLLM_S3_RETRY_DELAY_S", 0.5, 0.0, float)
        self.part_size = _env_number("FEDLLM_S3_PART_SIZE_MB", 16, 5) * _MIB
        timeout_s = _env_number("FEDLLM_S3_TIMEOUT_S", 120.0, 1.0, float)
        s = self.settings
        # Our own retry loop is the only one: urllib3's would multiply with it and hide how
        # many tries were made.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=min(10.0, timeout_s), read=timeout_s),
            maxsize=10,
            retries=False,
            cert_reqs="CERT_REQUIRED",
            ca_certs=s.ca_bundle or os.environ.get("SSL_CERT_FILE") or certifi.where(),
        )
        self._client = Minio(
            s.endpoint,
            access_key=s.access_key,
            secret_key=s.secret_key,
            session_token=s.session_token,
            secure=s.secure,
            region=s.region,
            http_client=http,
        )

    def __repr__(self) -> str:
        return f"S3Store({self.root_uri!r}, endpoint={self.settings.endpoint_url!r})"

    def _object_name(self, key: str) -> str:
        return join_key(self.prefix, check_key(key))

    def uri_of(self, key: str) -> str:
        key = check_key(key, folder=True)
        return f"s3://{self.bucket}/{join_key(self.prefix, key)}" if key else self.root_uri

    # -- the retry loop -----------------------------------------------------------------

    def _call(self, action: str, uri: str, attempt_fn):
        """Run ``attempt_fn()`` with retries on transient errors; FedllmError otherwise."""
        last: BaseException | None = None
        for attempt in range(1, self.retries + 1):
            try:
                return attempt_fn()
            except Exception as e:  # noqa: BLE001 - sorted into transient / not found / fatal below
                if isinstance(e, FedllmError):
                    raise
                status, code = _status_and_code(e)
                if code == "NoSuchBucket":
                    raise BucketNotFound(f"{uri}: no such bucket {self.bucket!r}") from None
                if code in _NOT_FOUND_CODES or (status == 404 and code is None):
                    raise ObjectNotFound(f"{uri}: no such object ({code or 'HTTP 404'})") from None
                if code in _CREDENTIAL_CODES or (status == 403 and code is None):
                    raise FedllmError(
                        f"S3 {action} {uri}: {_describe(e)} at {self.settings.endpoint_url}; check "
                        "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (environment or "
                        "FEDLLM_S3_CREDENTIALS_DIR) and the bucket policy"
                    ) from None
                if isinstance(e, urllib3.exceptions.SSLError):
                    raise FedllmError(
                        f"S3 {action} {uri}: TLS failed at {self.settings.endpoint_url}: {_describe(e)}; "
                        "set AWS_CA_BUNDLE to the PEM file of the CA that signed the endpoint"
                    ) from None
                if not _is_transient(e):
                    raise FedllmError(f"S3 {action} {uri}: {_describe(e)}") from None
                last = e
                if attempt < self.retries:
                    delay = min(self.retry_delay_s * 2 ** (attempt - 1), _MAX_BACKOFF_S)
                    log.warning(
                        "S3 %s %s: try %d of %d failed (%s); retrying in %.2fs",
                        action, uri, attempt, self.retries, _describe(e), delay,
                    )
                    time.sleep(delay)
        # `from None`: the chained original could carry request details into a traceback.
        raise FedllmError(
            f"S3 {action} {uri}: failed after {self.retries} tries at "
            f"{self.settings.endpoint_url}: {_describe(last)}"
        ) from None

    def _create_bucket(self) -> None:
        def attempt():
            try:
                self._client.make_bucket(self.bucket)
            except S3Error as e:
                # Another site may have created it at the same moment.
                if e.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

        self._call("create bucket", f"s3://{self.bucket}", attempt)

    # -- objects ------------------------------------------------------------------------

    def _put_stream(self, key: str, open_stream, length: int) -> None:
        name = self._object_name(key)

        def attempt():
            # A fresh stream per try: a failed try may have consumed part of the last one.
            with open_stream() as stream:
                self._client.put_object(self.bucket, name, stream, length, part_size=self.part_size)

        try:
            self._call("put", self.uri_of(key), attempt)
        except BucketNotFound:
            # Made on first use rather than checked before every write: checking needs the
            # ListBucket permission, which a site that only writes checkpoints may lack.
            self._create_bucket()
            self._call("put", self.uri_of(key), attempt)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._put_stream(key, lambda: io.BytesIO(data), len(data))

    def put_file(self, local_path: str | os.PathLike, key: str) -> None:
        local_path = Path(local_path)
        if not local_path.is_file():
            raise FedllmError(f"{local_path}: no such file to upload to {self.uri_of(key)}")
        self._put_stream(key, lambda: open(local_path, "rb"), local_path.stat().st_size)

    def get_bytes(self, key: str) -> bytes:
        name = self._object_name(key)

        def attempt():
            response = self._client.get_object(self.bucket, name)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        return self._call("get", self.uri_of(key), attempt)

    def get_file(self, key: str, local_path: str | os.PathLike) -> Path:
        name = self._object_name(key)
        local_path = Path(local_path)

        def attempt():
            response = self._client.get_object(self.bucket, name)
            try:
                write_atomic(local_path, lambda f: shutil.copyfileobj(response, f, _MIB), mode=LOCAL_FILE_MODE)
            finally:
                response.close()
                response.release_conn()

        self._call("get", self.uri_of(key), attempt)
        return local_path

    def exists(self, key: str) -> bool:
        name = self._object_name(key)
        try:
            self._call("stat", self.uri_of(key), lambda: self._client.stat_object(self.bucket, name))
        except ObjectNotFound:
            return False
        return True

    def list(self, prefix: str = "") -> list[str]:
        if prefix and (prefix.startswith("/") or ".." in prefix.split("/")):
            check_key(prefix)  # raises with the accepted form
        root = self.prefix + "/" if self.prefix else ""

        def attempt():
            objects = self._client.list_objects(self.bucket, prefix=root + prefix, recursive=True)
            return sorted(o.object_name[len(root):] for o in objects if not o.is_dir)

        try:
            return self._call("list", self.uri_of(prefix.rstrip("/")), attempt)
        except ObjectNotFound:  # no bucket yet: nothing stored
            return []

    def delete(self, key: str) -> None:
        name = self._object_name(key)
        try:
            self._call("delete", self.uri_of(key), lambda: self._client.remove_object(self.bucket, name))
        except ObjectNotFound:
            pass
