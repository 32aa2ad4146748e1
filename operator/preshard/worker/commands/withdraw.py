"""``preshard withdraw``: delete a gone owner's manifest (conditionally) so a conversion
can replace its checkpoint, as a re-run withdraws its own."""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
from typing import Any

from preshard.core.errors import OutputChanged
from preshard.core.manifest import (
    MANIFEST_NAME,
    Manifest,
    ManifestError,
)
from preshard.worker.commands.runner import Done
from preshard.worker.commands.steps import (
    manifest_at,
    s3_prefix,
    step_client,
    succeeded,
)
from preshard.worker.store import records, s3
from preshard.worker.store.transfer import with_retries

log = logging.getLogger(__name__)

# The operator runs it as a Job and reads its outcome from the termination message.
WRITES_RESULT = True


def withdraw(args: argparse.Namespace) -> dict[str, Any]:
    u = s3_prefix(args.output, "--output")
    client = step_client(args)
    uri = str(u)
    key = u.key(MANIFEST_NAME)
    got = manifest_at(client, u.bucket, key, uri)
    if got is None:
        return {"uri": uri, "withdrawn": False}
    body = got[1]
    if hashlib.sha256(body).hexdigest() != args.expect_manifest_sha256:
        raise OutputChanged(
            f"the manifest of {uri} changed since the preflight; nothing was withdrawn",
        )
    s3.with_translation(
        lambda: with_retries(
            lambda: client.delete_object(Bucket=u.bucket, Key=key), "withdraw manifest"
        ),
        uri,
    )
    # --delete-listed (the operator saw exactly this manifest published by its owner:
    # its ledger): the gone owner's checkpoint is dead without its manifest, remove the
    # objects it listed (only those), so that the conversion replacing it leaves no stale
    # shard of another layout behind. Without it (a manifest nobody can vouch for, which
    # could list anybody's objects): the manifest alone.
    listed: list[str] = []
    if getattr(args, "delete_listed", False):
        try:
            listed = [u.key(f.key) for f in Manifest.from_json(body).files]
        except ManifestError:
            listed = []
    removed = records.delete_keys(client, u.bucket, listed, uri) if listed else 0
    print(
        f"withdrew the manifest of {uri} (owner {args.expect_owner})"
        + (f" and the {removed} objects it listed" if listed else "; no other object touched"),
        file=sys.stderr,
    )
    return {"uri": uri, "withdrawn": True, "removed": removed}


def main(args: argparse.Namespace) -> Done:
    return succeeded(withdraw(args))
