"""``preshard fetch``: download a published checkpoint (or one rank's, or one node's,
files) and check every file's sha256 against its manifest; with the pin and the serving
TP/PP it is also the serving gate, run before anything is downloaded. Integrity is
checked by preshard itself, never delegated to the object store."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from preshard.core import gate
from preshard.core.errors import UsageError
from preshard.core.quantity import format_bytes
from preshard.worker.commands.published import (
    download_checkpoint,
    load_manifest,
    published_client,
    s3_uri,
    serving_vllm,
)
from preshard.worker.commands.runner import Done
from preshard.worker.progress import Reporter

log = logging.getLogger(__name__)


def fetch(args: argparse.Namespace) -> int:
    u = s3_uri(args.source)
    client, settings = published_client(args)
    manifest, body = load_manifest(client, u)
    # The serving gate, before anything is downloaded or the destination is touched.
    if args.manifest_sha256 is not None:
        gate.check_pin(body, args.manifest_sha256, str(u))
    if args.tensor_parallel_size is not None:
        gate.check_parallelism(
            manifest, args.tensor_parallel_size, args.pipeline_parallel_size or 1
        )
        gate.check_loadable(manifest, serving_vllm(args, manifest), gate.LOAD_FORMAT_LOCAL)
    elif args.pipeline_parallel_size is not None:
        raise UsageError("--pipeline-parallel-size needs --tensor-parallel-size")
    files = list(manifest.files)
    if args.rank is not None and args.nodes is not None:
        raise UsageError("--rank and --node-rank/--nodes are exclusive")
    if args.rank is not None:
        if not 0 <= args.rank < manifest.world_size:
            raise UsageError(
                f"--rank {args.rank} is outside 0..{manifest.world_size - 1} for this checkpoint",
            )
        files = manifest.rank_files(args.rank) + manifest.other_files()
    elif args.nodes is not None or args.node_rank is not None:
        if args.nodes is None or args.node_rank is None:
            raise UsageError("--node-rank and --nodes go together")
        ranks = gate.node_ranks(manifest, args.nodes, args.node_rank)
        files = gate.files_for_ranks(manifest, ranks)
        print(
            f"node {args.node_rank} of {args.nodes}: ranks {ranks[0]}..{ranks[-1]} of "
            f"{manifest.world_size} (TP {manifest.tensor_parallel_size} x PP "
            f"{manifest.pipeline_parallel_size})"
        )
    dest = Path(args.dest)
    total = sum(f.size for f in files)
    transferred = download_checkpoint(
        client, u, body, files, dest, settings.concurrency, Reporter(mode=args.progress)
    )
    pinned = ", manifest matches the pin" if args.manifest_sha256 else ""
    print(
        f"fetched {len(files)} files ({format_bytes(total)}; {len(transferred)} downloaded, "
        f"{len(files) - len(transferred)} already present) from {u} to {dest}, all "
        f"sha256-verified{pinned}"
    )
    return 0


def main(args: argparse.Namespace) -> Done:
    return Done(fetch(args))
