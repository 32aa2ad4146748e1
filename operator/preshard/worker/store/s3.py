"""boto3 clients for the worker, and translation of S3 failures into clear errors.

Credentials come only from the environment (standard ``AWS_*`` variables; for a source
in another account the ``PRESHARD_SOURCE_*`` variables, see docs/architecture.md). No
error message or log line ever contains a credential value.
"""

from __future__ import annotations

import copy
import os
import re
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import botocore.exceptions
import botocore.session
from botocore.config import Config

from preshard.core.errors import (
    AccessDenied,
    BucketNotFound,
    InvalidConfig,
    InvalidURI,
    ObjectNotFound,
    PreshardError,
    StorageError,
    StorageUnavailable,
)
from preshard.core.uris import check_endpoint

# The one botocore error the layers above the store catch (a missing object, a refused
# precondition: ``is_not_found``, ``error_code``); only the store imports botocore.
ClientError = botocore.exceptions.ClientError

SOURCE_PREFIX = "PRESHARD_SOURCE_"
# Environment variables whose values are credentials (scrubbed from every message).
SECRET_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    SOURCE_PREFIX + "AWS_ACCESS_KEY_ID",
    SOURCE_PREFIX + "AWS_SECRET_ACCESS_KEY",
    SOURCE_PREFIX + "AWS_SESSION_TOKEN",
    "HF_TOKEN",
)
MAX_MESSAGE = 500
_SCRUB = [
    # user info in URLs: scheme://user:pass@host
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]*@"), r"\1***@"),
    # presigned-URL and header credentials
    (
        re.compile(
            r"(?i)\b(X-Amz-(?:Signature|Credential|Security-Token)|Signature|AWSAccessKeyId|"
            r"Credential|x-amz-security-token|SessionToken|Token)([=:]\s*)[^\s&,;'\"]+"
        ),
        r"\1\2***",
    ),
    (re.compile(r"(?i)(Authorization:?\s*)[^\n]*"), r"\1***"),
    # AWS access key ids (AKIA..., ASIA...)
    (re.compile(r"\b(?:AKIA|ASIA|AIDA|AROA)[A-Z0-9]{12,}\b"), "***"),
]


def scrub(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` without credentials (URL user info, signatures, tokens, access key ids,
    the values of the credential variables in the environment), cut to ``limit``."""
    for value in {os.environ.get(name) for name in SECRET_ENV}:
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    for pattern, repl in _SCRUB:
        text = pattern.sub(repl, text)
    return text if len(text) <= limit else text[:limit] + "..."


def _endpoint_setting(url: str | None, what: str) -> str | None:
    """A validated endpoint (or None): PreshardError (permanent, secret-free) otherwise."""
    if url is None or not url.strip():
        return None
    return check_endpoint(url, what)


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: str | None = None
    region: str | None = None
    concurrency: int = 16
    # Explicit keys (source credentials); None means boto3's default chain (env, IRSA...).
    access_key: str | None = None
    secret_key: str | None = None
    session_token: str | None = None

    def __repr__(self) -> str:  # never show keys
        return f"S3Settings(endpoint_url={self.endpoint_url!r}, region={self.region!r}, concurrency={self.concurrency})"


def output_settings(
    endpoint_url: str | None = None, region: str | None = None, concurrency: int = 16
) -> S3Settings:
    return S3Settings(
        endpoint_url=_endpoint_setting(
            endpoint_url
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
            or None,
            "S3 endpoint",
        ),
        region=region
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
        or None,
        concurrency=max(1, concurrency),
    )


def source_settings(
    endpoint_url: str | None = None, region: str | None = None, concurrency: int = 16
) -> S3Settings:
    """Source credentials: PRESHARD_SOURCE_* when set, else the output's (standard env)."""
    env = os.environ
    _endpoint_setting(env.get(SOURCE_PREFIX + "ENDPOINT_URL"), "source S3 endpoint")
    base = output_settings(
        endpoint_url or env.get(SOURCE_PREFIX + "ENDPOINT_URL"),
        region or env.get(SOURCE_PREFIX + "REGION"),
        concurrency,
    )
    key = env.get(SOURCE_PREFIX + "AWS_ACCESS_KEY_ID")
    secret = env.get(SOURCE_PREFIX + "AWS_SECRET_ACCESS_KEY")
    if key and secret:
        return S3Settings(
            base.endpoint_url,
            base.region,
            base.concurrency,
            key,
            secret,
            env.get(SOURCE_PREFIX + "AWS_SESSION_TOKEN") or None,
        )
    return base


def max_attempts() -> int:
    """botocore's attempts per call: AWS_MAX_ATTEMPTS (the standard AWS setting) or 10."""
    try:
        return max(1, int(os.environ.get("AWS_MAX_ATTEMPTS") or 10))
    except ValueError:
        return 10


_LOADER_LOCK = threading.Lock()
_LOADER: Any = None


def _session() -> botocore.session.Session:
    """A new botocore session (credentials resolved afresh: the environment, a profile,
    a web identity) sharing one data loader per process, so the S3 service model is
    parsed once, not once per client (about 70 ms of CPU each)."""
    global _LOADER
    session = botocore.session.Session()
    with _LOADER_LOCK:
        if _LOADER is None:
            _LOADER = session.get_component("data_loader")
        else:
            session.register_component("data_loader", _LOADER)
    return session


def make_client(settings: S3Settings) -> Any:
    config = Config(
        retries={"mode": "standard", "max_attempts": max_attempts()},
        max_pool_connections=settings.concurrency + 4,
        connect_timeout=10,
        read_timeout=120,
        tcp_keepalive=True,
        s3=({"addressing_style": "path"} if settings.endpoint_url else {})
        # No SigV4 sha256 of every body (botocore's default over plain http; over https
        # with Content-MD5 it skips it already): each part carries Content-MD5, which the
        # server checks, and the file's sha256 is checked end to end on download.
        | {"payload_signing_enabled": False},
        # Checksums: we send Content-MD5 ourselves and verify sha256 end to end.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    try:
        return _session().create_client(
            "s3",
            region_name=settings.region or "us-east-1",
            endpoint_url=settings.endpoint_url,
            aws_access_key_id=settings.access_key,
            aws_secret_access_key=settings.secret_key,
            aws_session_token=settings.session_token,
            config=config,
        )
    except Exception as exc:  # a bad region or endpoint: permanent, scrubbed, no traceback
        raise InvalidConfig(
            scrub(f"cannot create an S3 client: {type(exc).__name__}: {exc}"),
        ) from None


def error_code(exc: BaseException) -> str:
    if isinstance(exc, botocore.exceptions.ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def is_not_found(exc: BaseException) -> bool:
    return error_code(exc) in ("404", "NoSuchKey", "NotFound")


_PERMANENT_ACCESS = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "403",
    "AllAccessDisabled",
}


def _endpoint_of(url: str) -> str:
    """scheme://host:port of a request URL (botocore reports the object's full URL);
    never any user:password part."""
    try:
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return ""
    return f"{parts.scheme}://{parts.hostname}{port}" if parts.hostname else ""


def translate(exc: BaseException, uri: str, action: str) -> PreshardError:
    """A clear, secret-free error for a failed S3 call on ``uri`` (scrubbed: no URL user
    info, key, secret, signature or token, whatever the exception's text held)."""
    err = _translate(exc, uri, action)
    clean = scrub(err.message)
    if clean != err.message:
        scrubbed = copy.copy(err)  # the same class (reason, permanence), a clean message
        scrubbed.message, scrubbed.args = clean, (clean,)
        return scrubbed
    return err


def _translate(exc: BaseException, uri: str, action: str) -> PreshardError:
    if isinstance(exc, PreshardError):
        return exc
    if isinstance(
        exc, botocore.exceptions.NoCredentialsError | botocore.exceptions.PartialCredentialsError
    ):
        return AccessDenied(
            f"cannot {action} {uri}: no S3 credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "or use a service account with an IAM role)",
        )
    if isinstance(
        exc, botocore.exceptions.EndpointConnectionError | botocore.exceptions.ConnectTimeoutError
    ):
        endpoint = _endpoint_of(str(getattr(exc, "kwargs", {}).get("endpoint_url", "")))
        where = f" at {endpoint}" if endpoint else ""
        return StorageUnavailable(
            f"cannot {action} {uri}: the S3 endpoint{where} is unreachable",
        )
    code = error_code(exc)
    if code == "NoSuchBucket":
        return BucketNotFound(
            f"cannot {action} {uri}: the bucket does not exist",
        )
    if code in _PERMANENT_ACCESS:
        return AccessDenied(
            f"cannot {action} {uri}: access denied ({code}); check the credentials in AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY and the bucket policy",
        )
    if code in ("NoSuchKey", "404", "NotFound"):
        return ObjectNotFound(f"cannot {action} {uri}: not found")
    if isinstance(exc, botocore.exceptions.BotoCoreError | botocore.exceptions.ClientError):
        return StorageError(
            f"cannot {action} {uri}: {code or type(exc).__name__}",
        )
    if isinstance(exc, ValueError):  # botocore/urllib3 refusing the request (bad URL...)
        return InvalidURI(
            f"cannot {action} {uri}: the request was refused ({type(exc).__name__}: {exc})",
        )
    return StorageError(
        f"cannot {action} {uri}: {type(exc).__name__}: {exc}",
    )


def check_bucket(client: Any, bucket: str, uri: str) -> None:
    try:
        client.head_bucket(Bucket=bucket)
    except botocore.exceptions.ClientError as exc:
        if error_code(exc) in ("404", "NoSuchBucket", "NotFound"):
            raise BucketNotFound(
                f"cannot use {uri}: the bucket {bucket!r} does not exist",
            ) from None
        raise translate(exc, uri, "access") from None
    except Exception as exc:
        raise translate(exc, uri, "access") from None


def list_objects(client: Any, bucket: str, prefix: str) -> dict[str, int]:
    """key -> size for every object under ``prefix`` (paginated: any number of objects)."""
    out: dict[str, int] = {}
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []) or []:
            out[obj["Key"]] = int(obj["Size"])
    return out


def with_translation(fn: Any, uri: str, action: str = "access") -> Any:
    """Run an S3 call, turning any failure into a clear PreshardError."""
    try:
        return fn()
    except PreshardError:
        raise
    except Exception as exc:
        raise translate(exc, uri, action) from None
