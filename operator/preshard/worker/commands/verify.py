"""``preshard verify``: every object of a published checkpoint read back and checked
against its manifest (size, sha256), a summary printed; non-zero on any problem. With
``--against SOURCE``, the engine-free check instead: the checkpoint (downloaded and
sha256-checked, or a local directory) is checked tensor by tensor against the source
(``verify.against``) through the sharding vLLM's weight loaders plan from that source
(``planner.verify.planned_sharding``), never the checkpoint's own word; pre-quantized FP8
shards are recomputed (``fp8verify``)."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from preshard.core.contract import EXIT_FAILED, EXIT_OK
from preshard.core.errors import ManifestNotFound, PreshardError, VerificationFailed
from preshard.core.manifest import MANIFEST_NAME, Manifest, ManifestError
from preshard.core.quantity import format_bytes
from preshard.core.quantization import raw_plan_quantization
from preshard.core.uris import parse_uri
from preshard.worker import fp8verify
from preshard.worker.commands.published import (
    download_checkpoint,
    load_manifest,
    published_client,
    s3_uri,
)
from preshard.worker.commands.runner import Done
from preshard.worker.conversion.common import checkpoint_quantization
from preshard.worker.planner.verify import planned_sharding
from preshard.worker.progress import Reporter
from preshard.worker.store.fetch import fetch_source
from preshard.worker.verify.against import verify_against
from preshard.worker.verify.objects import check_objects


def verify(args: argparse.Namespace) -> int:
    if getattr(args, "against", None):
        return verify_against_source(args)
    u = s3_uri(args.uri)
    client, settings = published_client(args)
    manifest, body = load_manifest(client, u)
    checks = check_objects(client, u, manifest.files, settings.concurrency)
    problems = [c for c in checks if not c.ok]
    if args.json:
        print(
            json.dumps(
                {
                    "uri": str(u),
                    "ok": not problems,
                    "files": len(checks),
                    "totalBytes": manifest.total_bytes,
                    "manifestSha256": hashlib.sha256(body).hexdigest(),
                    "tensorParallelSize": manifest.tensor_parallel_size,
                    "pipelineParallelSize": manifest.pipeline_parallel_size,
                    "vllmVersion": manifest.vllm_version,
                    "problems": [{"key": c.key, "problem": c.problem} for c in problems],
                },
                indent=2,
            )
        )
    else:
        print(f"checkpoint {u}")
        print(
            f"  TP {manifest.tensor_parallel_size} x PP {manifest.pipeline_parallel_size}, "
            f"quantization {manifest.quantization or 'none'}, dtype {manifest.dtype}, vLLM {manifest.vllm_version}"
        )
        for c in checks:
            print(
                f"  {'ok ' if c.ok else 'BAD'} {c.key:<48} {format_bytes(c.size):>10}  {c.problem}"
            )
        verdict = "OK" if not problems else f"{len(problems)} PROBLEM(S)"
        print(f"{len(checks)} files, {format_bytes(manifest.total_bytes)}: {verdict}")
    if problems:
        print(
            f"preshard: error: {len(problems)} of {len(checks)} files in {u} do not match the manifest",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return EXIT_OK


def _local_checkpoint(path: Path) -> Path:
    """A local checkpoint directory: every file the manifest lists, with its sha256."""
    man_path = path / MANIFEST_NAME
    if not man_path.is_file():
        raise ManifestNotFound(
            f"{path} has no {MANIFEST_NAME}: not a published checkpoint",
        )
    try:
        manifest = Manifest.from_json(man_path.read_bytes())
    except ManifestError as exc:
        raise VerificationFailed(f"{MANIFEST_NAME}: {exc}") from None
    for f in manifest.files:
        p = path / f.key
        if not p.is_file() or p.stat().st_size != f.size:
            raise VerificationFailed(f"{f.key}: missing or not {f.size} bytes")
        h = hashlib.sha256()
        with p.open("rb") as fh:
            while chunk := fh.read(8 * 2**20):
                h.update(chunk)
        if h.hexdigest() != f.sha256:
            raise VerificationFailed(f"{f.key}: sha256 does not match the manifest")
    return path


def _declared_quantization(source_dir: Path) -> str | None:
    """The method the source's config.json declares (None: none, or unreadable)."""
    try:
        config = json.loads((Path(source_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return checkpoint_quantization(config) if isinstance(config, dict) else None


def _read_manifest(path: Path) -> Any:
    try:
        return Manifest.from_json((path / MANIFEST_NAME).read_bytes())
    except (OSError, ManifestError) as exc:
        raise VerificationFailed(f"{MANIFEST_NAME}: {exc}") from None


def verify_against_source(args: argparse.Namespace) -> int:
    """``preshard verify --against SOURCE URI``: the engine-free check of a published
    checkpoint (s3:// prefix or local directory) against any source ``convert`` accepts.
    Remote files are downloaded (and sha256-checked) into ``--work-dir``; memory stays
    bounded by the largest tensor. The checkpoint's own ``preshard-sharding.json`` is not
    trusted: the sharding is re-planned from the source at the manifest's TP x PP, dtype
    and quantization with the installed vLLM's weight loaders (``planned_sharding``), the
    stored metadata must equal it, and the planned writes are replayed."""
    work_root = (
        Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="preshard-verify-"))
    )
    work_root.mkdir(parents=True, exist_ok=True)
    try:
        target = parse_uri(args.uri, allow_local=True)
        if target.scheme == "file":
            ckpt = _local_checkpoint(Path(target.path))
        else:
            u = s3_uri(args.uri)
            client, settings = published_client(args)
            published, body = load_manifest(client, u)
            ckpt = work_root / "checkpoint"
            with contextlib.redirect_stdout(sys.stderr):
                download_checkpoint(
                    client,
                    u,
                    body,
                    list(published.files),
                    ckpt,
                    settings.concurrency,
                    Reporter(mode="lines"),
                )
        source_dir = Path(
            fetch_source(
                args.against,
                work_root / "source",
                endpoint_url=getattr(args, "source_endpoint_url", None) or args.endpoint_url,
                region=args.region,
                concurrency=args.concurrency,
            )
        )
        try:
            t0 = time.monotonic()
            manifest = _read_manifest(ckpt)
            scheme = fp8verify.scheme_of(manifest)
            if scheme is not None:  # pre-quantized FP8 shards: recomputed, bit for bit
                summary = fp8verify.verify_quantized(
                    source_dir, ckpt, fp8verify.replan(source_dir, manifest, scheme)
                )
                if args.json:
                    print(
                        json.dumps(
                            {"uri": args.uri, "against": args.against, "ok": True, **summary},
                            indent=2,
                        )
                    )
                else:
                    print(
                        f"checkpoint {args.uri} against {args.against}: OK (FP8 "
                        f"{scheme.name} shards re-planned by vLLM and recomputed)"
                    )
                    print(
                        f"  {summary['checkedTensors']} tensors ({summary['quantizedTensors']}"
                        f" FP8 weights and scales) equal bit for bit in {summary['seconds']} s"
                    )
                return 0
            report = verify_against(
                source_dir,
                ckpt,
                allow_derived=args.allow_derived,
                plan=lambda: planned_sharding(
                    source_dir,
                    tp=manifest.tensor_parallel_size,
                    pp=manifest.pipeline_parallel_size,
                    dtype=manifest.dtype,
                    # an online method's rank files are the unquantized weights
                    quantization=raw_plan_quantization(
                        manifest.quantization, _declared_quantization(source_dir)
                    ),
                ),
            )
            report.seconds = time.monotonic() - t0
        except PreshardError as exc:
            if args.json:  # the report too, then the error (exit 3) as every command
                print(
                    json.dumps(
                        {
                            "uri": args.uri,
                            "against": args.against,
                            "ok": False,
                            "reason": exc.reason,
                            "error": exc.message,
                        },
                        indent=2,
                    )
                )
            raise
    finally:
        if not args.work_dir:
            shutil.rmtree(work_root, ignore_errors=True)
    if args.json:
        print(
            json.dumps(
                {"uri": args.uri, "against": args.against, "ok": True, **report.summary()},
                indent=2,
            )
        )
    else:
        print(f"checkpoint {args.uri} against {args.against}: OK (sharding re-planned by vLLM)")
        print(f"  {report.describe()} in {report.seconds:.1f} s")
    return 0


def main(args: argparse.Namespace) -> Done:
    return Done(verify(args))
