"""``preshard adopt``: verify every object of a published checkpoint (size and sha256
against its manifest, and with --against every tensor against the requester's own
source), then rewrite the manifest's owner, last and conditionally."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import Any

from preshard.core.errors import VerificationFailed
from preshard.core.manifest import (
    artifact_status,
)
from preshard.worker.commands.runner import Done
from preshard.worker.commands.steps import (
    check_against_source,
    read_expected,
    s3_prefix,
    step_client,
    succeeded,
)
from preshard.worker.store import records
from preshard.worker.verify.objects import verify_objects

log = logging.getLogger(__name__)

# The operator runs it as a Job and reads its outcome from the termination message.
WRITES_RESULT = True


def adopt(args: argparse.Namespace) -> dict[str, Any]:
    u = s3_prefix(args.output, "--output")
    client = step_client(args)
    uri = str(u)
    man, body, etag = read_expected(
        client, u, args.expect_owner, args.expect_identity, args.expect_manifest_sha256
    )
    problems = verify_objects(client, u, man, args.concurrency)
    if problems:
        raise VerificationFailed(
            f"{len(problems)} of {len(man.files)} objects in {uri} do not match the manifest "
            f"(first: {problems[0]}); not adopted",
        )
    # the bytes must also be what THIS resource's source converts to (a checkpoint
    # published from other content under this identity is never taken over)
    check_against_source(client, u, man, args)
    new = dataclasses.replace(man, owner=args.owner)
    text = new.to_json()
    if new.owner != man.owner:
        records.put_manifest(client, u, text, conditional=True, expect_body=body, expect_etag=etag)
    else:
        text = body.decode()
    print(
        f"adopted {uri}: {len(man.files)} objects verified, owner {man.owner} -> {args.owner}",
        file=sys.stderr,
    )
    return artifact_status(new, uri, text)


def main(args: argparse.Namespace) -> Done:
    return succeeded(adopt(args))
