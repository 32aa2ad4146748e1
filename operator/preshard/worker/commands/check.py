"""``preshard check``: the serving gate before vLLM streams a checkpoint
(``runai_streamer_sharded``): the manifest's pin, the parallelism, the state format for
the serving vLLM, and every listed object present with its size (HEAD only)."""

from __future__ import annotations

import argparse
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from preshard.core import gate
from preshard.core.errors import ObjectsMismatch, PreshardError, StreamerListingMismatch
from preshard.core.quantity import format_bytes
from preshard.core.uris import StorageURI
from preshard.worker.commands.published import load_manifest, published_client, s3_uri, serving_vllm
from preshard.worker.commands.runner import Done
from preshard.worker.store import s3
from preshard.worker.store.transfer import with_retries

log = logging.getLogger(__name__)


def _head_size(client: Any, u: StorageURI, key: str) -> int | None:
    def once() -> int | None:
        try:
            resp = client.head_object(Bucket=u.bucket, Key=u.key(key))
        except s3.ClientError as exc:
            if s3.is_not_found(exc):
                return None
            raise
        return int(resp["ContentLength"])

    result: int | None = with_retries(once, f"HEAD {key}")
    return result


def check(args: argparse.Namespace) -> int:
    """The streaming path's gate: pin, parallelism, state format/vLLM version, and every
    listed object present with its size (HEAD only; nothing is downloaded)."""
    u = s3_uri(args.source)
    client, settings = published_client(args)
    manifest, body = load_manifest(client, u)
    gate.check_pin(body, args.manifest_sha256, str(u))
    gate.check_parallelism(manifest, args.tensor_parallel_size, args.pipeline_parallel_size)
    serving = serving_vllm(args, manifest)
    gate.check_loadable(manifest, serving, args.load_format)
    try:
        with ThreadPoolExecutor(max_workers=min(settings.concurrency, 16)) as pool:
            sizes = dict(
                zip(
                    [f.key for f in manifest.files],
                    pool.map(lambda f: _head_size(client, u, f.key), manifest.files),
                    strict=True,
                )
            )
    except PreshardError:
        raise
    except Exception as exc:
        raise s3.translate(exc, str(u), "check") from None
    problems = gate.object_problems(list(manifest.files), sizes)
    if problems:
        shown = "; ".join(problems[:5]) + (
            f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        )
        raise ObjectsMismatch(
            f"{len(problems)} of {len(manifest.files)} objects in {u} do not match the "
            f"manifest ({shown}): the checkpoint is incomplete or was changed; do not serve "
            "it (preshard verify shows every file)",
        )
    if args.load_format == gate.LOAD_FORMAT_STREAM:
        # One ListObjectsV2 call, exactly as vLLM's S3 glob makes it.
        page = s3.with_translation(
            lambda: client.list_objects_v2(Bucket=u.bucket, Prefix=u.prefix), str(u), "list"
        )
        keys = [o["Key"].removeprefix(u.prefix) for o in page.get("Contents") or []]
        listing = gate.streamer_listing_problems(manifest, keys)
        if listing:
            raise StreamerListingMismatch(
                f"vLLM would not stream {u} as published: {'; '.join(listing)}",
            )
    print(
        f"checkpoint {u} ok for vLLM {serving.version} with {args.load_format}: manifest "
        f"matches the pin, TP {manifest.tensor_parallel_size} x PP "
        f"{manifest.pipeline_parallel_size}, stateFormat {manifest.state_format}, "
        f"{len(manifest.files)} objects present ({format_bytes(manifest.total_bytes)}, sizes "
        "checked, contents not read)"
    )
    return 0


def main(args: argparse.Namespace) -> Done:
    return Done(check(args))
