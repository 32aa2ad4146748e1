"""``preshard purge``: delete a checkpoint the way ``deletionPolicy: Delete`` does: the
manifest first, then only the objects it (and its owner's publication record) lists."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from preshard.core.contract import PUBLICATION_RECORD_NAME as JOURNAL_NAME
from preshard.core.errors import OutputOwnedByOther, UsageError
from preshard.core.manifest import (
    MANIFEST_NAME,
)
from preshard.core.uris import StorageURI
from preshard.worker.commands.published import published_client, s3_uri
from preshard.worker.commands.runner import Done
from preshard.worker.store import records, s3

log = logging.getLogger(__name__)


def purge_prefix(client: Any, u: StorageURI, owner: str | None) -> int:
    """Delete what ``owner``'s checkpoint at ``u`` consists of: the manifest first, then
    every object it lists (and those an unfinished publication of the owner recorded in
    its journal), then their unfinished multipart uploads. Nothing else under the prefix
    is touched. Refuses (permanent, nothing deleted) when the manifest names another
    owner (or cannot be read) or another owner's checkpoint lies below the prefix.
    Idempotent: a prefix with nothing of the owner's left succeeds with 0 deleted."""
    uri = str(u)
    if not u.prefix:
        raise UsageError(f"refusing to purge a bucket root ({uri})")
    existing = records.read_manifest(client, u.bucket, u.key(MANIFEST_NAME), uri)
    journal = records.read_journal(client, u.bucket, u.key(JOURNAL_NAME), uri)
    for record in (existing, journal):
        if isinstance(record, records.Unreadable):
            records.check_own(record, owner, uri, "purge")
        if record is not None and owner is not None and record.owner != owner:  # type: ignore[union-attr]
            raise OutputOwnedByOther(
                f"refusing to purge {uri}: its manifest does not name owner {owner} (it is "
                "another owner's checkpoint, or was published without an owner)",
            )
    listing = s3.with_translation(lambda: s3.list_objects(client, u.bucket, u.prefix), uri, "list")
    records.check_neighbours(client, u, listing, owner, "purge")
    assert not isinstance(existing, records.Unreadable)
    assert not isinstance(journal, records.Unreadable)
    keys: set[str] = set()
    if existing is not None:
        keys |= {f.key for f in existing.files}
    if journal is not None:
        keys |= journal.keys
    if existing is not None:
        # Recorded first, so that a purge interrupted after the manifest is gone still
        # knows (and a re-run deletes) what the checkpoint consisted of.
        records.put_journal(client, u, records.Journal(existing.owner, frozenset(keys)))
        records.delete_one(client, u, MANIFEST_NAME, "delete manifest")
    present = sorted(u.key(k) for k in keys if u.key(k) in listing)
    deleted = records.delete_keys(client, u.bucket, present, uri)
    aborted = s3.with_translation(
        lambda: _abort_uploads(client, u, {u.key(k) for k in keys}), uri, "abort uploads under"
    )
    if existing is not None or journal is not None:
        records.delete_one(client, u, JOURNAL_NAME, "delete journal")
    left = len(set(listing) - set(present) - {u.key(MANIFEST_NAME), u.key(JOURNAL_NAME)})
    log.info(
        "purged %s: %d objects deleted, %d multipart uploads aborted%s",
        uri,
        deleted,
        aborted,
        f"; {left} other object(s) under the prefix left in place (not this checkpoint's)"
        if left
        else "",
    )
    return deleted


def _abort_uploads(client: Any, u: StorageURI, keys: set[str]) -> int:
    """Abort the unfinished multipart uploads of ``keys`` (no others)."""
    aborted = 0
    if not keys:
        return 0
    paginator = client.get_paginator("list_multipart_uploads")
    try:
        for page in paginator.paginate(Bucket=u.bucket, Prefix=u.prefix):
            for up in page.get("Uploads", []) or []:
                if up["Key"] not in keys:
                    continue
                try:
                    client.abort_multipart_upload(
                        Bucket=u.bucket, Key=up["Key"], UploadId=up["UploadId"]
                    )
                    aborted += 1
                except s3.ClientError as exc:
                    # already completed or aborted (some servers list stale uploads): gone
                    # is what we want
                    if s3.error_code(exc) != "NoSuchUpload":
                        raise
    except s3.ClientError as exc:
        # NotImplemented: the store has no listing; NoSuchUpload: rclone's answer when
        # there are no unfinished uploads. Neither leaves anything to abort.
        if s3.error_code(exc) not in ("NotImplemented", "501", "NoSuchUpload"):
            raise
    return aborted


def purge(args: argparse.Namespace) -> int:
    u = s3_uri(args.output)
    client, _ = published_client(args)
    s3.check_bucket(client, u.bucket, str(u))
    deleted = purge_prefix(client, u, args.owner)
    print(
        f"purged {u}: {deleted} objects deleted (manifest first; only objects the owner's "
        "manifest listed)"
    )
    return 0


def main(args: argparse.Namespace) -> Done:
    return Done(purge(args))
