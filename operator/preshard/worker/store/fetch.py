"""Fetching sources: ``fetch_source`` brings a model to local disk (an ``s3://`` prefix
through the :class:`~preshard.worker.store.download.Downloader`, an ``hf://`` repository
through huggingface_hub, at one resolved commit: :mod:`.hf`) or uses a ``file://`` or
``pvc://`` directory in place, after the checks of :mod:`.source_files`.

Publishing is :mod:`preshard.worker.store.publication`'s; the records at a prefix
(manifest, publication record) and the ownership rules are
:mod:`preshard.worker.store.records`'.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from preshard.core.errors import InvalidSource
from preshard.core.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest, ManifestError
from preshard.core.uris import StorageURI, parse_uri
from preshard.worker.progress import Reporter
from preshard.worker.store import s3
from preshard.worker.store.download import Downloader, DownloadItem
from preshard.worker.store.hf import fetch_hf
from preshard.worker.store.records import read_bounded
from preshard.worker.store.source_files import (
    SKIPPED_SUFFIXES,
    WEIGHT_SUFFIXES,
    check_model_dir,
    check_pin,
    claim_dest,
    list_source_files,
    local_entries,
    local_source_dir,
    s3_entries,
)

log = logging.getLogger(__name__)


def fetch_source(
    uri: str,
    dest: Path,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    concurrency: int = 16,
    reporter: Reporter | None = None,
    pin: str | None = None,
) -> Path:
    """Return a local directory holding the model at ``uri``. ``pin``: the content the
    preflight saw (a files digest; the commit for hf://): a source that differs fails
    with SourceChanged (permanent), and hf:// downloads exactly that commit."""
    u = parse_uri(uri, allow_local=True)
    if u.scheme in ("file", "pvc"):
        path = local_source_dir(u, uri)
        check_model_dir(path, uri)
        if pin is not None:
            check_pin(uri, local_entries(path), pin)
        return path
    if u.scheme == "hf":
        return fetch_hf(u, uri, dest, reporter, pin)
    return _fetch_s3(u, uri, dest, endpoint_url, region, concurrency, reporter, pin)


def _fetch_s3(
    u: StorageURI,
    uri: str,
    dest: Path,
    endpoint_url: str | None,
    region: str | None,
    concurrency: int,
    reporter: Reporter | None,
    pin: str | None = None,
) -> Path:
    settings = s3.source_settings(endpoint_url, region, concurrency)
    client = s3.make_client(settings)

    def pinned() -> None:
        if pin is not None:
            check_pin(uri, s3.with_translation(lambda: s3_entries(client, u), uri), pin)

    pinned()  # before anything is downloaded
    files = list_source_files(client, u, uri)
    if not any(name.endswith(WEIGHT_SUFFIXES) for name in files):
        raise InvalidSource(f"source {uri} has no *.safetensors weights")
    wanted = {n: s for n, s in files.items() if not n.endswith(SKIPPED_SUFFIXES)}
    # the same URI with the same object sizes may resume; anything else starts afresh
    claim_dest(dest, f"{uri} " + json.dumps(sorted(wanted.items())))
    dest.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str] = {}
    if MANIFEST_NAME in files:  # a preshard checkpoint as source: verify hashes too
        try:
            body = read_bounded(client, u.bucket, u.key(MANIFEST_NAME), MAX_MANIFEST_BYTES)
            man = Manifest.from_json(body)
            expected = {f.key: f.sha256 for f in man.files}
        except ManifestError:
            expected = {}
        except Exception as exc:
            raise s3.translate(exc, uri, "read the manifest of") from None
    items = [
        DownloadItem(u.key(n), dest / n, s, expected.get(n)) for n, s in sorted(wanted.items())
    ]
    if reporter is not None:
        reporter.stage("Downloading", sum(i.size for i in items))
    Downloader(
        client, u.bucket, concurrency=settings.concurrency, reporter=reporter, uri=uri
    ).download(items)
    if reporter is not None:
        reporter.done()
    pinned()  # and after: an object replaced while it was downloaded changed its ETag
    check_model_dir(dest, uri)
    return dest
