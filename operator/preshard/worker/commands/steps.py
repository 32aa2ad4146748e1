"""What the step commands share (preflight, adopt, copy, withdraw: the CPU-only Jobs
that run before, or instead of, a conversion; their results go to the termination
message): the client, the s3:// prefixes, the manifest they expect, and the check of a
checkpoint against the requester's own source.

Conditional writes: a manifest is replaced with ``If-Match: <ETag read>`` (S3, moto
and MinIO reject a changed object with 412), and because some servers ignore the header
(``rclone serve s3`` does), the manifest is also re-read and compared right before the
write (``store.records.put_manifest``). Residual race on servers that ignore If-Match: a
writer that replaces the manifest between that re-read and our PUT (milliseconds) is
overwritten; both writers must then be preshard resources racing for one prefix, which
the operator's claim index already serialises within a cluster."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from preshard.core.errors import (
    IdentityMismatch,
    InvalidManifest,
    OutputChanged,
    UsageError,
)
from preshard.core.manifest import (
    MANIFEST_NAME,
    Manifest,
)
from preshard.core.progress import Result
from preshard.core.uris import StorageURI, parse_uri
from preshard.worker.commands.runner import Done
from preshard.worker.store import records, s3
from preshard.worker.store.download import Downloader, DownloadItem

log = logging.getLogger(__name__)


def step_client(args: argparse.Namespace) -> Any:
    return s3.make_client(s3.output_settings(args.endpoint_url, args.region, args.concurrency))


def s3_prefix(uri: str, what: str) -> StorageURI:
    u = parse_uri(uri)
    if u.scheme != "s3":
        raise UsageError(f"{what} {uri} is not an s3:// prefix")
    return u


# The one manifest reader (bounded, retried): records'.
manifest_at = records.read_manifest_tagged


def read_expected(
    client: Any,
    u: StorageURI,
    expect_owner: str | None,
    expect_identity: str | None,
    expect_sha: str | None,
    *,
    check_owner: bool = True,
) -> tuple[Manifest, bytes, str | None]:
    uri = str(u)
    got = manifest_at(client, u.bucket, u.key(MANIFEST_NAME), uri)
    if got is None:
        raise OutputChanged(f"{uri} has no {MANIFEST_NAME} any more")
    man, body, etag = got
    if man is None:
        raise InvalidManifest(
            f"{uri}{MANIFEST_NAME} is not a valid manifest",
        )
    sha = hashlib.sha256(body).hexdigest()
    if expect_sha and sha != expect_sha:
        raise OutputChanged(
            f"the manifest of {uri} changed since the preflight",
        )
    if check_owner and (man.owner or None) != (expect_owner or None):
        raise OutputChanged(
            f"the manifest of {uri} names another owner than expected",
        )
    if expect_identity is not None and man.identity != expect_identity:
        raise IdentityMismatch(
            f"the checkpoint at {uri} has identity {man.identity}, not {expect_identity}",
        )
    return man, body, etag


def check_against_source(
    client: Any, u: StorageURI, man: Manifest, args: argparse.Namespace
) -> dict[str, Any] | None:
    """The checkpoint at ``u`` (its manifest's objects, sha256-checked on the way down)
    against the REQUESTER's own source (``--against``, read with this pod's source
    credentials, exactly the ``--source-digest`` content): every tensor of every rank
    rebuilt from that source bit for bit (``verify --against``, no engine). Raises
    VerificationFailed (permanent) on the first difference; None without --against."""
    against = getattr(args, "against", None)
    if not against:
        return None
    from preshard.worker.store import fetch
    from preshard.worker.verify.against import verify_against

    work = Path(os.environ.get("PRESHARD_WORK_DIR") or "/tmp") / "check"
    shutil.rmtree(work, ignore_errors=True)
    ckpt = work / "checkpoint"
    ckpt.mkdir(parents=True)
    items = [DownloadItem(u.key(f.key), ckpt / f.key, f.size, f.sha256) for f in man.files]
    s3.with_translation(
        lambda: Downloader(
            client, u.bucket, concurrency=max(1, args.concurrency), uri=str(u)
        ).download(items),
        str(u),
        "download",
    )
    (ckpt / MANIFEST_NAME).write_text(man.to_json())
    try:
        source_dir = fetch.fetch_source(
            against,
            work / "source",
            endpoint_url=getattr(args, "source_endpoint_url", None),
            concurrency=max(1, args.concurrency),
            pin=getattr(args, "source_digest", None),
        )
        report = verify_against(Path(source_dir), ckpt)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"checked against this resource's own source: {report.describe()}", file=sys.stderr)
    summary: dict[str, Any] = report.summary()
    return summary


def succeeded(artifact: dict[str, Any]) -> Done:
    """A step command's success: its artifact on stdout and in the result."""
    print(json.dumps(artifact, indent=2, sort_keys=True))
    return Done(result=Result(result="Succeeded", artifact=artifact))
