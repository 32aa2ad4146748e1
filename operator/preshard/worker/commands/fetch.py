"""``preshard fetch``, ``preshard check``, ``preshard verify`` and ``preshard purge``:
reading, gating and removing published checkpoints. Integrity is checked by preshard
itself (sha256 against the manifest), never delegated to the object store; the serving
gate's rules are in ``preshard.core.gate``."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import botocore.exceptions

from preshard.core import gate
from preshard.core.contract import EXIT_FAILED, EXIT_OK, JOURNAL_NAME
from preshard.core.errors import PreshardError
from preshard.core.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest, ManifestError
from preshard.core.quantity import format_bytes
from preshard.core.uris import StorageURI, parse_uri
from preshard.worker.engine.installed import installed_vllm
from preshard.worker.progress import Reporter
from preshard.worker.store import records, s3
from preshard.worker.store.download import Downloader, DownloadItem
from preshard.worker.store.transfer import with_retries

log = logging.getLogger(__name__)


def _s3_uri(uri: str) -> StorageURI:
    u = parse_uri(uri)
    if u.scheme != "s3":
        raise PreshardError(f"{uri} is not an s3:// prefix", reason="InvalidURI", permanent=True)
    return u


def load_manifest(client: Any, u: StorageURI) -> tuple[Manifest, bytes]:
    uri = str(u)
    try:
        body = records.read_bounded(client, u.bucket, u.key(MANIFEST_NAME), MAX_MANIFEST_BYTES)
    except ManifestError as exc:
        raise PreshardError(
            f"{uri}{MANIFEST_NAME} is invalid: {exc}", reason="InvalidManifest", permanent=True
        ) from None
    except botocore.exceptions.ClientError as exc:
        if s3.is_not_found(exc):
            raise PreshardError(
                f"{uri} has no {MANIFEST_NAME}: it is not a published checkpoint (or its upload has not finished)",
                reason="ManifestNotFound",
                permanent=True,
            ) from None
        raise s3.translate(exc, uri, "read") from None
    except Exception as exc:
        raise s3.translate(exc, uri, "read") from None
    try:
        return Manifest.from_json(body), body
    except ManifestError as exc:
        raise PreshardError(
            f"{uri}{MANIFEST_NAME} is invalid: {exc}", reason="InvalidManifest", permanent=True
        ) from None


def run(args: argparse.Namespace) -> int:
    if args.command == "fetch":
        return fetch(args)
    if args.command == "check":
        return check(args)
    if args.command == "verify":
        return verify(args)
    if args.command == "purge":
        return purge(args)
    raise PreshardError(f"unknown command {args.command}", reason="Usage")  # pragma: no cover


def _client(args: argparse.Namespace) -> tuple[Any, s3.S3Settings]:
    settings = s3.output_settings(args.endpoint_url, args.region, args.concurrency)
    return s3.make_client(settings), settings


# ------------------------------------------------------------------------------- fetch


def fetch(args: argparse.Namespace) -> int:
    u = _s3_uri(args.source)
    client, settings = _client(args)
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
        raise PreshardError(
            "--pipeline-parallel-size needs --tensor-parallel-size", reason="Usage", permanent=True
        )
    files = list(manifest.files)
    if args.rank is not None and args.nodes is not None:
        raise PreshardError(
            "--rank and --node-rank/--nodes are exclusive", reason="Usage", permanent=True
        )
    if args.rank is not None:
        if not 0 <= args.rank < manifest.world_size:
            raise PreshardError(
                f"--rank {args.rank} is outside 0..{manifest.world_size - 1} for this checkpoint",
                reason="Usage",
                permanent=True,
            )
        files = manifest.rank_files(args.rank) + manifest.other_files()
    elif args.nodes is not None or args.node_rank is not None:
        if args.nodes is None or args.node_rank is None:
            raise PreshardError(
                "--node-rank and --nodes go together", reason="Usage", permanent=True
            )
        ranks = gate.node_ranks(manifest, args.nodes, args.node_rank)
        files = gate.files_for_ranks(manifest, ranks)
        print(
            f"node {args.node_rank} of {args.nodes}: ranks {ranks[0]}..{ranks[-1]} of "
            f"{manifest.world_size} (TP {manifest.tensor_parallel_size} x PP "
            f"{manifest.pipeline_parallel_size})"
        )
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    # A fetched directory is complete only once its manifest is there: withdraw it first.
    (dest / MANIFEST_NAME).unlink(missing_ok=True)
    reporter = Reporter(mode=args.progress)
    total = sum(f.size for f in files)
    reporter.stage("Downloading", total)
    items = [DownloadItem(u.key(f.key), dest / f.key, f.size, f.sha256) for f in files]
    transferred = Downloader(
        client, u.bucket, concurrency=settings.concurrency, reporter=reporter, uri=str(u)
    ).download(items)
    reporter.done()
    tmp = dest / (MANIFEST_NAME + ".part")
    tmp.write_bytes(body)
    os.replace(tmp, dest / MANIFEST_NAME)
    pinned = ", manifest matches the pin" if args.manifest_sha256 else ""
    print(
        f"fetched {len(files)} files ({format_bytes(total)}; {len(transferred)} downloaded, "
        f"{len(files) - len(transferred)} already present) from {u} to {dest}, all "
        f"sha256-verified{pinned}"
    )
    return 0


# ------------------------------------------------------------------------------- check


def _detect_platform() -> tuple[str | None, str | None]:
    """(platform, device name) as vLLM sees them (imports vLLM and torch)."""
    try:
        from vllm.platforms import current_platform

        platform = str(current_platform.device_type or "") or None
        device: str | None = None
        if not current_platform.is_cpu():
            device = str(current_platform.get_device_name()) or None
        return platform, device
    except Exception as exc:  # no usable vLLM or device here
        log.info("cannot determine the vLLM platform: %s", exc)
        return None, None


def serving_vllm(args: argparse.Namespace, manifest: Manifest) -> gate.ServingVllm:
    """What the gate needs to know about the vLLM that will serve."""
    if args.serving_vllm_version:
        return gate.ServingVllm(version=args.serving_vllm_version)
    version, _ = installed_vllm()
    if version is None or not gate.needs_platform(manifest):
        return gate.ServingVllm(version=version)
    platform, device = _detect_platform()
    return gate.ServingVllm(version=version, platform=platform, device=device)


def _head_size(client: Any, u: StorageURI, key: str) -> int | None:
    def once() -> int | None:
        try:
            resp = client.head_object(Bucket=u.bucket, Key=u.key(key))
        except botocore.exceptions.ClientError as exc:
            if s3.is_not_found(exc):
                return None
            raise
        return int(resp["ContentLength"])

    result: int | None = with_retries(once, f"HEAD {key}")
    return result


def check(args: argparse.Namespace) -> int:
    """The streaming path's gate: pin, parallelism, state format/vLLM version, and every
    listed object present with its size (HEAD only; nothing is downloaded)."""
    u = _s3_uri(args.source)
    client, settings = _client(args)
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
        raise PreshardError(
            f"{len(problems)} of {len(manifest.files)} objects in {u} do not match the "
            f"manifest ({shown}): the checkpoint is incomplete or was changed; do not serve "
            "it (preshard verify shows every file)",
            reason="ObjectsMismatch",
            permanent=True,
        )
    if args.load_format == gate.LOAD_FORMAT_STREAM:
        # One ListObjectsV2 call, exactly as vLLM's S3 glob makes it.
        page = s3.with_translation(
            lambda: client.list_objects_v2(Bucket=u.bucket, Prefix=u.prefix), str(u), "list"
        )
        keys = [o["Key"].removeprefix(u.prefix) for o in page.get("Contents") or []]
        listing = gate.streamer_listing_problems(manifest, keys)
        if listing:
            raise PreshardError(
                f"vLLM would not stream {u} as published: {'; '.join(listing)}",
                reason="StreamerListingMismatch",
                permanent=True,
            )
    print(
        f"checkpoint {u} ok for vLLM {serving.version} with {args.load_format}: manifest "
        f"matches the pin, TP {manifest.tensor_parallel_size} x PP "
        f"{manifest.pipeline_parallel_size}, stateFormat {manifest.state_format}, "
        f"{len(manifest.files)} objects present ({format_bytes(manifest.total_bytes)}, sizes "
        "checked, contents not read)"
    )
    return 0


# ------------------------------------------------------------------------------ verify


@dataclass
class FileCheck:
    key: str
    size: int
    ok: bool
    problem: str = ""


def check_object(client: Any, u: StorageURI, key: str, size: int, sha: str) -> FileCheck:
    def run_once() -> FileCheck:
        try:
            resp = client.get_object(Bucket=u.bucket, Key=u.key(key))
        except botocore.exceptions.ClientError as exc:
            if s3.is_not_found(exc):
                return FileCheck(key, size, False, "missing")
            raise
        h = hashlib.sha256()
        n = 0
        for chunk in resp["Body"].iter_chunks(chunk_size=2**20):
            h.update(chunk)
            n += len(chunk)
        if n != size:
            return FileCheck(key, size, False, f"size {n} != manifest {size}")
        if h.hexdigest() != sha:
            return FileCheck(key, size, False, "sha256 mismatch (object changed or corrupted)")
        return FileCheck(key, size, True)

    result: FileCheck = with_retries(run_once, f"verify {key}")
    return result


def verify(args: argparse.Namespace) -> int:
    if getattr(args, "against", None):
        from preshard.worker import verify_against

        return verify_against.run_cli(args)
    u = _s3_uri(args.uri)
    client, settings = _client(args)
    manifest, body = load_manifest(client, u)
    try:
        with ThreadPoolExecutor(max_workers=min(settings.concurrency, 8)) as pool:
            checks = list(
                pool.map(lambda f: check_object(client, u, f.key, f.size, f.sha256), manifest.files)
            )
    except PreshardError:
        raise
    except Exception as exc:
        raise s3.translate(exc, str(u), "verify") from None
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


# ------------------------------------------------------------------------------- purge


def purge_prefix(client: Any, u: StorageURI, owner: str | None) -> int:
    """Delete what ``owner``'s checkpoint at ``u`` consists of: the manifest first, then
    every object it lists (and those an unfinished publication of the owner recorded in
    its journal), then their unfinished multipart uploads. Nothing else under the prefix
    is touched. Refuses (permanent, nothing deleted) when the manifest names another
    owner (or cannot be read) or another owner's checkpoint lies below the prefix.
    Idempotent: a prefix with nothing of the owner's left succeeds with 0 deleted."""
    uri = str(u)
    if not u.prefix:
        raise PreshardError(
            f"refusing to purge a bucket root ({uri})", reason="Usage", permanent=True
        )
    existing = records.read_manifest(client, u.bucket, u.key(MANIFEST_NAME), uri)
    journal = records.read_journal(client, u.bucket, u.key(JOURNAL_NAME), uri)
    for record in (existing, journal):
        if isinstance(record, records.Unreadable):
            records.check_own(record, owner, uri, "purge")
        if record is not None and owner is not None and record.owner != owner:  # type: ignore[union-attr]
            raise PreshardError(
                f"refusing to purge {uri}: its manifest does not name owner {owner} (it is "
                "another owner's checkpoint, or was published without an owner)",
                reason="OutputOwnedByOther",
                permanent=True,
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
                except botocore.exceptions.ClientError as exc:
                    # already completed or aborted (some servers list stale uploads): gone
                    # is what we want
                    if s3.error_code(exc) != "NoSuchUpload":
                        raise
    except botocore.exceptions.ClientError as exc:
        # NotImplemented: the store has no listing; NoSuchUpload: rclone's answer when
        # there are no unfinished uploads. Neither leaves anything to abort.
        if s3.error_code(exc) not in ("NotImplemented", "501", "NoSuchUpload"):
            raise
    return aborted


def purge(args: argparse.Namespace) -> int:
    u = _s3_uri(args.output)
    client, _ = _client(args)
    s3.check_bucket(client, u.bucket, str(u))
    deleted = purge_prefix(client, u, args.owner)
    print(
        f"purged {u}: {deleted} objects deleted (manifest first; only objects the owner's "
        "manifest listed)"
    )
    return 0
