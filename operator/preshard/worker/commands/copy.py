"""``preshard copy``: server-side copy of a published checkpoint to another prefix
(CopyObject; UploadPartCopy for large objects) under the publication rules, verified,
with a new manifest last."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from preshard.core.contract import PUBLICATION_RECORD_NAME as JOURNAL_NAME
from preshard.core.contract import utc_timestamp
from preshard.core.errors import (
    CopyNotSupported,
    OutputChanged,
    PreshardError,
    UsageError,
    VerificationFailed,
)
from preshard.core.manifest import (
    MANIFEST_NAME,
    artifact_status,
)
from preshard.core.uris import StorageURI
from preshard.worker.commands.runner import Done
from preshard.worker.commands.steps import (
    check_against_source,
    manifest_at,
    read_expected,
    s3_prefix,
    step_client,
    succeeded,
)
from preshard.worker.store import records, s3
from preshard.worker.store.transfer import with_retries
from preshard.worker.verify.objects import verify_objects

log = logging.getLogger(__name__)

# The operator runs it as a Job and reads its outcome from the termination message.
WRITES_RESULT = True


COPY_MULTIPART_THRESHOLD = 5 * 2**30  # S3's CopyObject limit


COPY_PART_SIZE = 512 * 2**20


def _copy_object(
    client: Any, src: StorageURI, dst: StorageURI, key: str, size: int, threshold: int, part: int
) -> None:
    source = {"Bucket": src.bucket, "Key": src.key(key)}
    if size <= threshold:
        with_retries(
            lambda: client.copy_object(
                Bucket=dst.bucket, Key=dst.key(key), CopySource=source, MetadataDirective="COPY"
            ),
            f"copy {key}",
        )
        return
    up = client.create_multipart_upload(Bucket=dst.bucket, Key=dst.key(key))
    upload_id = up["UploadId"]
    try:
        parts = []
        for n, start in enumerate(range(0, size, part), start=1):
            end = min(size, start + part) - 1

            def part_copy(n: int = n, start: int = start, end: int = end) -> Any:
                return client.upload_part_copy(
                    Bucket=dst.bucket,
                    Key=dst.key(key),
                    UploadId=upload_id,
                    PartNumber=n,
                    CopySource=source,
                    CopySourceRange=f"bytes={start}-{end}",
                )

            resp = with_retries(part_copy, f"copy {key} part {n}")
            etag = (resp.get("CopyPartResult") or {}).get("ETag")
            if not etag:
                raise CopyNotSupported(
                    f"the S3 server does not support UploadPartCopy (needed for {key}, "
                    f"{size} bytes)",
                )
            parts.append({"PartNumber": n, "ETag": etag})
        client.complete_multipart_upload(
            Bucket=dst.bucket,
            Key=dst.key(key),
            UploadId=upload_id,
            MultipartUpload={"Parts": parts},
        )
    except BaseException:
        try:
            client.abort_multipart_upload(Bucket=dst.bucket, Key=dst.key(key), UploadId=upload_id)
        except Exception as exc:  # best effort: the purge aborts leftovers too
            log.warning("could not abort the multipart copy of %s: %s", key, exc)
        raise


def copy(args: argparse.Namespace) -> dict[str, Any]:
    """Copy a Ready checkpoint to ``--to`` under the publication rules
    (:mod:`preshard.worker.store.records`): refuse another owner's manifest or unfinished
    publication at, below or above the destination; write this owner's publication record
    first (every key the copy may leave behind); check the copy against the manifest and
    against this resource's own source (``--against``) BEFORE the manifest; delete only
    keys this owner wrote (never a listing of the prefix); the manifest last."""
    src = s3_prefix(args.source, "--from")
    dst = s3_prefix(args.dest, "--to")
    if src.bucket == dst.bucket and (
        src.prefix.startswith(dst.prefix) or dst.prefix.startswith(src.prefix)
    ):
        raise UsageError("--from and --to overlap")
    client = step_client(args)
    # the source stays its owner's: any owner, the identity and bytes must match
    man, body, _ = read_expected(
        client, src, None, args.expect_identity, args.expect_manifest_sha256, check_owner=False
    )
    dst_uri = str(dst)
    s3.check_bucket(client, dst.bucket, dst_uri)
    if manifest_at(client, dst.bucket, dst.key(MANIFEST_NAME), dst_uri) is not None:
        raise OutputChanged(
            f"{dst_uri} already holds a manifest; not copied",
        )
    journal = records.read_journal(client, dst.bucket, dst.key(JOURNAL_NAME), dst_uri)
    records.check_own(journal, args.owner, dst_uri, "copy to")
    listing = s3.with_translation(
        lambda: s3.list_objects(client, dst.bucket, dst.prefix), dst_uri, "list"
    )
    records.check_neighbours(client, dst, listing, args.owner, "copy to")
    previous = set(journal.keys) if isinstance(journal, records.Journal) else set()
    new_keys = {f.key for f in man.files}
    # the record first: whatever this copy leaves behind is recorded as this owner's
    records.put_journal(client, dst, records.Journal(args.owner, frozenset(previous | new_keys)))
    threshold = int(args.multipart_threshold)
    part = max(5 * 2**20, int(args.part_size))

    def one(f: Any) -> None:
        s3.with_translation(
            lambda: _copy_object(client, src, dst, f.key, f.size, threshold, part),
            f"{src} -> {dst_uri}",
            "copy",
        )

    with ThreadPoolExecutor(max_workers=max(1, min(args.concurrency, 8))) as pool:
        list(pool.map(one, man.files))
    problems = verify_objects(client, dst, man, args.concurrency)
    if problems:
        raise VerificationFailed(
            f"{len(problems)} copied objects in {dst_uri} do not match the source manifest "
            f"(first: {problems[0]})",
        )
    try:
        checked = check_against_source(client, dst, man, args)
    except PreshardError:
        # not this resource's content: remove what this copy wrote (its record lists it)
        mine = sorted(dst.key(k) for k in previous | new_keys)
        records.delete_keys(client, dst.bucket, mine, dst_uri)
        records.delete_one(client, dst, JOURNAL_NAME, "delete journal")
        raise
    # stale objects of this owner's earlier, incomplete copy (its record): nothing else
    stale = sorted(dst.key(k) for k in previous - new_keys if dst.key(k) in listing)
    records.delete_keys(client, dst.bucket, stale, dst_uri)
    origin = {"uri": str(src), "manifestSha256": hashlib.sha256(body).hexdigest()}
    new = dataclasses.replace(
        man, owner=args.owner, created_at=utc_timestamp(), extra={**man.extra, "copiedFrom": origin}
    )
    text = new.to_json()
    records.put_manifest(client, dst, text, conditional=True, expect_body=None)
    records.delete_one(client, dst, JOURNAL_NAME, "delete journal")
    print(f"copied {len(man.files)} objects from {src} to {dst_uri}, verified", file=sys.stderr)
    out = artifact_status(new, dst_uri, text) | {"origin": origin}
    if checked is not None:
        out["checkedAgainstSource"] = True
    return out


def main(args: argparse.Namespace) -> Done:
    return succeeded(copy(args))
