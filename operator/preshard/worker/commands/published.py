"""What the commands that read a published checkpoint share (fetch, check, verify,
purge): its s3:// prefix, the client, the manifest (bounded, ManifestNotFound when there
is none) and what the serving gate needs to know about the vLLM that will serve
(``preshard.core.gate`` holds the gate's rules)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from preshard.core import gate
from preshard.core.errors import InvalidManifest, InvalidURI, ManifestNotFound
from preshard.core.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    Manifest,
    ManifestError,
)
from preshard.core.uris import StorageURI, parse_uri
from preshard.worker.engine.installed import installed_vllm
from preshard.worker.progress import Reporter
from preshard.worker.store import records, s3
from preshard.worker.store.download import Downloader, DownloadItem

log = logging.getLogger(__name__)


def s3_uri(uri: str) -> StorageURI:
    u = parse_uri(uri)
    if u.scheme != "s3":
        raise InvalidURI(f"{uri} is not an s3:// prefix")
    return u


def load_manifest(client: Any, u: StorageURI) -> tuple[Manifest, bytes]:
    uri = str(u)
    try:
        body = records.read_bounded(client, u.bucket, u.key(MANIFEST_NAME), MAX_MANIFEST_BYTES)
    except ManifestError as exc:
        raise InvalidManifest(f"{uri}{MANIFEST_NAME} is invalid: {exc}") from None
    except s3.ClientError as exc:
        if s3.is_not_found(exc):
            raise ManifestNotFound(
                f"{uri} has no {MANIFEST_NAME}: it is not a published checkpoint (or its upload has not finished)",
            ) from None
        raise s3.translate(exc, uri, "read") from None
    except Exception as exc:
        raise s3.translate(exc, uri, "read") from None
    try:
        return Manifest.from_json(body), body
    except ManifestError as exc:
        raise InvalidManifest(f"{uri}{MANIFEST_NAME} is invalid: {exc}") from None


def published_client(args: argparse.Namespace) -> tuple[Any, s3.S3Settings]:
    settings = s3.output_settings(args.endpoint_url, args.region, args.concurrency)
    return s3.make_client(settings), settings


def detect_platform() -> tuple[str | None, str | None]:
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
    platform, device = detect_platform()
    return gate.ServingVllm(version=version, platform=platform, device=device)


def download_checkpoint(
    client: Any,
    u: StorageURI,
    body: bytes,
    files: list[Any],
    dest: Path,
    concurrency: int,
    reporter: Reporter,
) -> list[Any]:
    """Download ``files`` of the checkpoint at ``u`` into ``dest`` (each sha256-checked
    against the manifest, what is already there and right is kept), then its manifest
    ``body``, last: a fetched directory is complete only once its manifest is there.
    Returns what was transferred."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / MANIFEST_NAME).unlink(missing_ok=True)
    reporter.stage("Downloading", sum(f.size for f in files))
    items = [DownloadItem(u.key(f.key), dest / f.key, f.size, f.sha256) for f in files]
    transferred: list[Any] = Downloader(
        client, u.bucket, concurrency=concurrency, reporter=reporter, uri=str(u)
    ).download(items)
    reporter.done()
    tmp = dest / (MANIFEST_NAME + ".part")
    tmp.write_bytes(body)
    os.replace(tmp, dest / MANIFEST_NAME)
    return transferred
