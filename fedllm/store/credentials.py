"""Where an S3 store finds its endpoint, keys and TLS settings, and how to keep keys out of text.

Two sources, in the form every S3 tool and a Kubernetes Secret use:

- environment: ``AWS_ENDPOINT_URL_S3`` (or ``AWS_ENDPOINT_URL``), ``AWS_ACCESS_KEY_ID``,
  ``AWS_SECRET_ACCESS_KEY``, optional ``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``
  (default ``us-east-1``), ``AWS_CA_BUNDLE``;
- a folder named by ``FEDLLM_S3_CREDENTIALS_DIR`` holding one file per variable
  (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, optional ``AWS_ENDPOINT_URL``, ...),
  which is what a Secret mounted as a volume looks like. A value found in that folder wins
  over the environment, because pointing at the folder is the more specific request.

Every key value read here is remembered so that :func:`redact` can remove it from any
text before it is logged or written.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from fedllm.errors import FedllmError

CREDENTIALS_DIR_ENV = "FEDLLM_S3_CREDENTIALS_DIR"
DEFAULT_REGION = "us-east-1"
AWS_HOST = "s3.amazonaws.com"

# Variables a credentials folder may hold; any other file in it is ignored.
_DIR_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "AWS_CA_BUNDLE",
)
_SECRET_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")

# Shorter values are not redacted: replacing every "ab" in a text would garble it, and no
# real key is that short.
_MIN_REDACT_LEN = 4
_REDACTED = "***"

_known_secrets: set[str] = set()
_known_lock = threading.Lock()

# Signed-request fragments that carry a key even when the key itself is unknown here.
_SIGNATURE_PATTERNS = (
    re.compile(r"(Credential=)[^/,\s&]+"),
    re.compile(r"(X-Amz-Credential=)[^&\s%]+"),
    re.compile(r"(Signature=)[0-9a-fA-F]+"),
    re.compile(r"(X-Amz-Signature=)[0-9a-fA-F]+"),
    re.compile(r"(X-Amz-Security-Token=)[^&\s]+"),
)


@dataclass(frozen=True)
class S3Settings:
    """Connection settings for one S3 endpoint; ``repr`` never shows a key."""

    endpoint: str  # host[:port], no scheme
    secure: bool
    region: str
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    ca_bundle: str | None = None

    @property
    def endpoint_url(self) -> str:
        return ("https://" if self.secure else "http://") + self.endpoint


def _read_credentials_dir(folder: str) -> dict[str, str]:
    path = Path(folder)
    if not path.is_dir():
        raise FedllmError(
            f"{CREDENTIALS_DIR_ENV}={folder}: not a directory; expected a folder with files "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (a mounted Kubernetes Secret)"
        )
    values = {}
    for name in _DIR_VARIABLES:
        file = path / name
        if file.is_file():
            # Secrets written with `echo` carry a trailing newline; keys never contain whitespace.
            value = file.read_text(encoding="utf-8").strip()
            if value:
                values[name] = value
    return values


def _lookup() -> dict[str, str]:
    """All S3 variables in effect: the credentials folder over the environment."""
    values = {name: os.environ[name] for name in _DIR_VARIABLES if os.environ.get(name)}
    folder = os.environ.get(CREDENTIALS_DIR_ENV)
    if folder:
        values.update(_read_credentials_dir(folder))
    return values


def _remember(*secrets: str | None) -> None:
    with _known_lock:
        _known_secrets.update(s for s in secrets if s and len(s) >= _MIN_REDACT_LEN)


def _parse_endpoint(url: str, source: str) -> tuple[str, bool]:
    # The scheme decides TLS, so it is required rather than guessed from a bare host.
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FedllmError(
            f"{source}={url}: expected an endpoint URL such as http://minio:9000 or "
            "https://s3.example.org"
        )
    if parts.path not in ("", "/"):
        raise FedllmError(
            f"{source}={url}: an endpoint URL has no path; put the bucket in the s3:// URI instead"
        )
    return parts.netloc, parts.scheme == "https"


def load_settings() -> S3Settings:
    """Read the S3 settings now in effect (environment and credentials folder).

    Raises FedllmError when only one of the two keys is set, or the endpoint URL is not an
    http(s) URL. With no keys at all the store makes anonymous requests.
    """
    values = _lookup()
    access_key = values.get("AWS_ACCESS_KEY_ID")
    secret_key = values.get("AWS_SECRET_ACCESS_KEY")
    session_token = values.get("AWS_SESSION_TOKEN")
    _remember(access_key, secret_key, session_token)
    if bool(access_key) != bool(secret_key):
        missing = "AWS_SECRET_ACCESS_KEY" if access_key else "AWS_ACCESS_KEY_ID"
        raise FedllmError(
            f"S3 credentials: {missing} is not set; set both AWS_ACCESS_KEY_ID and "
            f"AWS_SECRET_ACCESS_KEY in the environment or as files in {CREDENTIALS_DIR_ENV}"
        )
    source = "AWS_ENDPOINT_URL_S3" if values.get("AWS_ENDPOINT_URL_S3") else "AWS_ENDPOINT_URL"
    url = values.get(source)
    if url:
        endpoint, secure = _parse_endpoint(url, source)
    else:
        endpoint, secure = AWS_HOST, True
    ca_bundle = values.get("AWS_CA_BUNDLE")
    if ca_bundle and not Path(ca_bundle).is_file():
        raise FedllmError(f"AWS_CA_BUNDLE={ca_bundle}: no such file; expected a PEM file of CA certificates")
    return S3Settings(
        endpoint=endpoint,
        secure=secure,
        region=values.get("AWS_DEFAULT_REGION") or DEFAULT_REGION,
        access_key=access_key,
        secret_key=secret_key,
        session_token=session_token,
        ca_bundle=ca_bundle,
    )


def redact(text: str) -> str:
    """``text`` with every known S3 key value replaced by ``***``.

    Known values are those in the environment and credentials folder now, plus every key any
    store in this process has loaded. SigV4 credential scopes and signatures are masked too.
    Call it on anything headed for a log, report or exception message.
    """
    try:
        values = _lookup()
    except FedllmError:
        values = {name: os.environ[name] for name in _SECRET_VARIABLES if os.environ.get(name)}
    _remember(*(values.get(name) for name in _SECRET_VARIABLES))
    with _known_lock:
        # Longest first, so a key that contains another key is removed whole.
        secrets = sorted(_known_secrets, key=len, reverse=True)
    for secret in secrets:
        text = text.replace(secret, _REDACTED)
    for pattern in _SIGNATURE_PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + _REDACTED, text)
    return text
