"""Fetching sources and publishing checkpoints.

``fetch_source`` brings a model to local disk (or uses a local/PVC directory in place);
``publish`` hashes the converted files, uploads them resumably and writes
``preshard-manifest.json`` LAST, so a prefix with a manifest always describes complete,
verified objects.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import json
import logging
import os
import shutil
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import botocore.exceptions

from preshard.core.errors import PreshardError
from preshard.core.manifest import (
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    artifact_status,
    build_manifest,
)
from preshard.core.uris import StorageURI, parse_output_uri, parse_uri
from preshard.worker import s3
from preshard.worker.progress import Reporter
from preshard.worker.transfer import (
    Downloader,
    DownloadItem,
    Uploader,
    UploadItem,
    read_object,
    sha256_file,
    with_retries,
)

log = logging.getLogger(__name__)

PVC_MOUNT_ROOT = "/mnt/source"
WEIGHT_SUFFIXES = (".safetensors",)
SKIPPED_SUFFIXES = (".bin", ".pt", ".pth", ".msgpack", ".h5", ".onnx", ".gguf")
# Top-level files only (as for s3:// sources): vLLM reads none in subfolders, and repos
# keep whole copies of the weights there (checkpoint-*/, original/).
HF_IGNORE_PATTERNS = ["*/*"]
HF_PATTERNS = [
    "*.safetensors",
    "*.json",
    "*.model",
    "*.txt",
    "*.tiktoken",
    "*.py",
    "tokenizer*",
    "*.jinja",
]


def pvc_mount_root() -> Path:
    return Path(os.environ.get("PRESHARD_PVC_MOUNT_ROOT", PVC_MOUNT_ROOT))


def check_model_dir(path: Path, uri: str) -> None:
    if not path.is_dir():
        raise PreshardError(
            f"source {uri} does not exist (no directory {path})",
            reason="SourceNotFound",
            permanent=True,
        )
    if not (path / "config.json").is_file():
        raise PreshardError(
            f"source {uri} has no config.json: not a Hugging Face-format model directory",
            reason="InvalidSource",
            permanent=True,
        )
    if not any(p.suffix in WEIGHT_SUFFIXES for p in path.iterdir()):
        raise PreshardError(
            f"source {uri} has no *.safetensors weights", reason="InvalidSource", permanent=True
        )


def fetch_source(
    uri: str,
    dest: Path,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    concurrency: int = 16,
    reporter: Reporter | None = None,
) -> Path:
    """Return a local directory holding the model at ``uri``."""
    u = parse_uri(uri, allow_local=True)
    if u.scheme == "file":
        path = Path(u.path).resolve()
        check_model_dir(path, uri)
        return path
    if u.scheme == "pvc":
        path = pvc_mount_root() / u.authority / u.path
        check_model_dir(path, uri)
        return path
    if u.scheme == "hf":
        return _fetch_hf(u, uri, dest, reporter)
    return _fetch_s3(u, uri, dest, endpoint_url, region, concurrency, reporter)


def _fetch_s3(
    u: StorageURI,
    uri: str,
    dest: Path,
    endpoint_url: str | None,
    region: str | None,
    concurrency: int,
    reporter: Reporter | None,
) -> Path:
    settings = s3.source_settings(endpoint_url, region, concurrency)
    client = s3.make_client(settings)
    try:
        objects = s3.list_objects(client, u.bucket, u.prefix)
    except Exception as exc:
        err = s3.translate(exc, uri, "read the source")
        if err.reason == "BucketNotFound":
            err = PreshardError(
                f"source {uri} does not exist (no bucket {u.bucket!r})",
                reason="SourceNotFound",
                permanent=True,
            )
        raise err from None
    files = {
        k[len(u.prefix) :]: size
        for k, size in objects.items()
        if "/" not in k[len(u.prefix) :] and k != u.prefix
    }
    if not files:
        raise PreshardError(
            f"source {uri} does not exist or is empty (no objects under the prefix)",
            reason="SourceNotFound",
            permanent=True,
        )
    if not any(name.endswith(WEIGHT_SUFFIXES) for name in files):
        raise PreshardError(
            f"source {uri} has no *.safetensors weights", reason="InvalidSource", permanent=True
        )
    wanted = {n: s for n, s in files.items() if not n.endswith(SKIPPED_SUFFIXES)}
    # the same URI with the same object sizes may resume; anything else starts afresh
    _claim_dest(dest, f"{uri} " + json.dumps(sorted(wanted.items())))
    dest.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str] = {}
    if MANIFEST_NAME in files:  # a preshard checkpoint as source: verify hashes too
        try:
            man = Manifest.from_json(read_object(client, u.bucket, u.key(MANIFEST_NAME)))
            expected = {f.key: f.sha256 for f in man.files}
        except ManifestError:
            expected = {}
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
    check_model_dir(dest, uri)
    return dest


def _fetch_hf(u: StorageURI, uri: str, dest: Path, reporter: Reporter | None) -> Path:
    try:
        from huggingface_hub import HfApi, snapshot_download
    except ImportError as exc:  # pragma: no cover - dependency of the package
        raise PreshardError(
            f"hf:// sources need huggingface_hub ({exc})", reason="InternalError"
        ) from None
    _quiet_hf_client()
    token = os.environ.get("HF_TOKEN") or None
    try:
        # Resolve the branch or tag to one commit first: every file then comes from that
        # commit, and a missing repository or revision or an unreachable Hub fails here.
        # (Given a branch, snapshot_download falls back to whatever an earlier run left
        # in dest when it cannot ask the Hub: even another repository's files.)
        info = HfApi().model_info(
            u.authority, revision=u.revision, token=token, files_metadata=True
        )
        if not info.sha:
            raise PreshardError(
                f"the Hugging Face Hub returned no commit for {uri}", reason="StorageUnavailable"
            )
        _claim_dest(dest, f"hf {u.authority}@{info.sha}")
        wanted = [s for s in info.siblings or [] if _hf_wanted(s.rfilename)]
        if reporter is not None:
            reporter.stage("Downloading", sum(s.size or 0 for s in wanted))
        with _DirProgress(dest, reporter):
            path = snapshot_download(
                repo_id=u.authority,
                revision=info.sha,
                local_dir=str(dest),
                allow_patterns=HF_PATTERNS,
                ignore_patterns=HF_IGNORE_PATTERNS,
                token=token,
            )
    except PreshardError:
        raise
    except Exception as exc:
        err = _hf_error(exc, uri, u.revision, has_token=token is not None)
        if err is None:
            raise
        raise err from None
    if reporter is not None:
        reporter.done()
    out = Path(path)
    check_model_dir(out, uri)
    return out


def _hf_wanted(name: str) -> bool:
    return "/" not in name and any(fnmatch.fnmatchcase(name, p) for p in HF_PATTERNS)


def _quiet_hf_client() -> None:
    """huggingface_hub's HTTP client logs every request at INFO (signed download URLs
    included) and draws tqdm bars; the Reporter shows the download instead."""
    for name in ("httpx2", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover - older huggingface_hub
        pass


def _claim_dest(dest: Path, identity: str) -> None:
    """Empty ``dest`` unless it holds (part of) this very source, so that neither a resumed
    download nor huggingface_hub's fallbacks can mix in files of another source (a reused
    --work-dir). The marker lives next to dest: a dest that is not empty makes
    snapshot_download return it as is when the Hub fails."""
    marker = dest.parent / f".{dest.name}.preshard-source"
    want = identity.rstrip("\n") + "\n"
    try:
        have = marker.read_text()
    except OSError:
        have = ""
    if have != want and dest.exists():
        log.info("removing %s: it holds files of another source or revision", dest)
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(want)


def resolved_revision(dest: Path) -> str | None:
    """The commit an ``hf://`` source in ``dest`` was downloaded at (its marker), if any."""
    try:
        identity = (dest.parent / f".{dest.name}.preshard-source").read_text().strip()
    except OSError:
        return None
    if not identity.startswith("hf ") or "@" not in identity:
        return None
    return identity.rpartition("@")[2] or None


class _DirProgress:
    """Reports the bytes growing under a directory (snapshot_download's own progress
    reporting is not a stable API)."""

    def __init__(self, root: Path, reporter: Reporter | None, interval: float = 1.0) -> None:
        self.root, self.reporter, self.interval = root, reporter, interval
        self._seen = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _size(self) -> int:
        """Bytes of downloaded files: finished ones, and the partial ``*.incomplete``
        files in huggingface_hub's bookkeeping folder (``.cache/``)."""
        total = 0
        for dirpath, _, names in os.walk(self.root):
            in_cache = ".cache" in Path(dirpath).relative_to(self.root).parts
            for n in names:
                if in_cache and not n.endswith(".incomplete"):
                    continue
                try:
                    total += os.stat(os.path.join(dirpath, n)).st_size
                except OSError:
                    pass
        return total

    def _poll(self) -> None:
        assert self.reporter is not None
        size = self._size()
        if size > self._seen:
            self.reporter.advance(size - self._seen)
            self._seen = size

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._poll()

    def __enter__(self) -> _DirProgress:
        if self.reporter is not None:
            self._thread = threading.Thread(target=self._run, name="hf-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._poll()


def _hf_cause(exc: BaseException) -> str:
    """One line naming what failed underneath huggingface_hub's wrappers."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    seen: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in seen:
        seen.append(e)
        e = e.__cause__ or e.__context__
    for e in seen:
        if isinstance(e, OfflineModeIsEnabled):
            return "HF_HUB_OFFLINE is set"
        if isinstance(e, HfHubHTTPError) and e.response is not None:
            return f"HTTP {e.response.status_code}"
    last = seen[-1]
    text = str(last).strip().splitlines()[0] if str(last).strip() else ""
    return f"{type(last).__name__}: {text[:200]}" if text else type(last).__name__


def _transport_errors() -> tuple[type[BaseException], ...]:
    """OSError (requests-based huggingface_hub, local files) and the request errors of
    the httpx flavour huggingface_hub uses (not OSErrors)."""
    out: list[type[BaseException]] = [OSError]
    for name in ("httpx2", "httpx"):
        mod = sys.modules.get(name)
        cls = getattr(mod, "RequestError", None) if mod is not None else None
        if isinstance(cls, type) and issubclass(cls, BaseException):
            out.append(cls)
    return tuple(out)


def _hub_host(exc: BaseException, endpoint: str) -> bool:
    """True when the failed request went to the Hub endpoint itself."""
    from urllib.parse import urlsplit

    try:
        url = str(exc.response.request.url)  # type: ignore[attr-defined]
    except Exception:  # no request attached: assume the Hub
        return True
    return urlsplit(url).netloc == urlsplit(endpoint).netloc


def _hf_error(
    exc: BaseException, uri: str, revision: str | None, *, has_token: bool
) -> PreshardError | None:
    """The PreshardError for a huggingface_hub failure (None: not a download failure)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, GatedRepoError):
        if has_token:
            msg = (
                f"source {uri} is gated and the account of HF_TOKEN has not been granted "
                "access: request access on the model's page on the Hub"
            )
        else:
            msg = (
                f"source {uri} is gated: set HF_TOKEN (key HF_TOKEN in the source credentials "
                "Secret) for an account with access"
            )
        return PreshardError(msg, reason="AccessDenied", permanent=True)
    if isinstance(exc, RevisionNotFoundError):
        return PreshardError(
            f"source {uri}: revision {revision!r} does not exist",
            reason="SourceNotFound",
            permanent=True,
        )
    if isinstance(exc, RepositoryNotFoundError):
        hint = "the account of HF_TOKEN cannot see it" if has_token else "is private: set HF_TOKEN"
        return PreshardError(
            f"source {uri} does not exist (or {hint})", reason="SourceNotFound", permanent=True
        )
    status = (
        exc.response.status_code
        if isinstance(exc, HfHubHTTPError) and exc.response is not None
        else None
    )
    # The Hub itself refusing the request (not the CDN a download is redirected to, whose
    # 403 means an expired signed URL).
    if status in (401, 403) and _hub_host(exc, constants.ENDPOINT):
        who = (
            "rejected HF_TOKEN (invalid, expired or without read access)"
            if has_token
            else "requires a token: set HF_TOKEN"
        )
        return PreshardError(
            f"the Hugging Face Hub {who} for {uri} (HTTP {status})",
            reason="AccessDenied",
            permanent=True,
        )
    if isinstance(exc, (HfHubHTTPError, *_transport_errors())):
        return PreshardError(
            f"cannot download {uri} from the Hugging Face Hub at {constants.ENDPOINT}: "
            f"{_hf_cause(exc)}",
            reason="StorageUnavailable",
        )
    return None


# ------------------------------------------------------------------------------ publish


def local_files(local_dir: Path) -> list[Path]:
    """Files to publish: everything under local_dir except the manifest, dotfiles and partials."""
    out = []
    for p in sorted(local_dir.rglob("*")):
        rel = p.relative_to(local_dir)
        if not p.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        if rel.as_posix() == MANIFEST_NAME or p.name.endswith(".part"):
            continue
        out.append(p)
    return out


def hash_files(local_dir: Path, concurrency: int = 4) -> list[tuple[str, int, str]]:
    files = local_files(local_dir)
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        shas = list(pool.map(sha256_file, files))
    return [
        (p.relative_to(local_dir).as_posix(), p.stat().st_size, sha)
        for p, sha in zip(files, shas, strict=True)
    ]


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def publish(
    local_dir: Path,
    output_uri: str,
    *,
    manifest_fields: dict[str, Any],
    owner: str | None = None,
    endpoint_url: str | None = None,
    region: str | None = None,
    concurrency: int = 16,
    reporter: Reporter | None = None,
    part_size: int | None = None,
    fail_after_parts: int | None = None,
) -> dict[str, Any]:
    """Upload ``local_dir`` to ``output_uri`` with the manifest last; return status.artifact."""
    files = hash_files(local_dir, concurrency=min(4, max(1, concurrency)))
    if not files:
        raise PreshardError(
            f"nothing to publish in {local_dir}", reason="NothingToPublish", permanent=True
        )
    manifest = build_manifest(files, owner=owner, created_at=_now(), **manifest_fields)
    text = manifest.to_json()
    out = parse_output_uri(output_uri, allow_local=True)
    if out.scheme == "file":
        return _publish_local(local_dir, Path(out.path), manifest, text, reporter)
    settings = s3.output_settings(endpoint_url, region, concurrency)
    client = s3.make_client(settings)
    uri = str(out)
    s3.check_bucket(client, out.bucket, uri)
    manifest_key = out.key(MANIFEST_NAME)
    existing = _read_manifest(client, out.bucket, manifest_key, uri)
    if existing is not None and existing.owner and owner and existing.owner != owner:
        raise PreshardError(
            f"output {uri} already holds a checkpoint published by {existing.owner}; "
            "choose another output prefix (preshard never overwrites another owner's checkpoint)",
            reason="OutputOwnedByOther",
            permanent=True,
        )
    if existing is not None and {(f.key, f.sha256) for f in existing.files} == {
        (k, h) for k, _, h in files
    }:
        log.info("%s already holds this exact checkpoint; re-verifying objects", uri)
    if existing is not None:
        # Re-publishing: withdraw the old manifest first so the prefix never has a manifest
        # that points at objects being replaced.
        with_retries(
            lambda: client.delete_object(Bucket=out.bucket, Key=manifest_key), "delete old manifest"
        )
    try:
        remote = s3.list_objects(client, out.bucket, out.prefix)
    except Exception as exc:
        raise s3.translate(exc, uri, "list") from None
    todo: list[UploadItem] = []
    skipped = 0
    for key, size, sha in files:
        full = out.key(key)
        if remote.get(full) == size:
            head = s3.with_translation(lambda full=full: _remote_sha(client, out.bucket, full), uri)
            if head == sha:
                skipped += size
                continue
        todo.append(UploadItem(local_dir / key, full, size, sha))
    total = sum(i.size for i in todo)
    if reporter is not None:
        reporter.stage("Uploading", total)
    log.info(
        "uploading %d of %d files (%d bytes; %d bytes already present and verified)",
        len(todo),
        len(files),
        total,
        skipped,
    )
    up = Uploader(
        client,
        out.bucket,
        concurrency=settings.concurrency,
        reporter=reporter,
        uri=uri,
        **({"part_size": part_size} if part_size else {}),
    )
    up.fail_after_parts = fail_after_parts
    up.upload(todo)
    # Stale objects from an earlier, different conversion at this prefix.
    listed = {out.key(k) for k, _, _ in files}
    stale = [k for k in remote if k not in listed and k != manifest_key]
    _delete_keys(client, out.bucket, stale, uri)
    # The manifest, last.
    body = text.encode()
    import base64
    import hashlib

    md5 = base64.b64encode(hashlib.md5(body).digest()).decode()  # noqa: S324 - Content-MD5
    s3.with_translation(
        lambda: with_retries(
            lambda: client.put_object(
                Bucket=out.bucket,
                Key=manifest_key,
                Body=body,
                ContentMD5=md5,
                ContentType="application/json",
                Metadata={"sha256": hashlib.sha256(body).hexdigest()},
            ),
            "put manifest",
        ),
        uri,
    )
    if reporter is not None:
        reporter.done()
        reporter.stage("Published", manifest.total_bytes)
        reporter.advance(manifest.total_bytes)
        reporter.done()
    return artifact_status(manifest, uri, text)


def _remote_sha(client: Any, bucket: str, key: str) -> str | None:
    from preshard.worker.transfer import remote_sha256

    got = remote_sha256(client, bucket, key)
    return got[1] if got else None


def _read_manifest(client: Any, bucket: str, key: str, uri: str) -> Manifest | None:
    try:
        body = read_object(client, bucket, key)
    except botocore.exceptions.ClientError as exc:
        if s3.is_not_found(exc):
            return None
        raise s3.translate(exc, uri, "read the manifest of") from None
    except Exception as exc:
        raise s3.translate(exc, uri, "read the manifest of") from None
    try:
        return Manifest.from_json(body)
    except ManifestError as exc:
        log.warning("ignoring an unreadable manifest at %s: %s", uri, exc)
        return None


def _delete_keys(client: Any, bucket: str, keys: list[str], uri: str) -> int:
    deleted = 0
    for i in range(0, len(keys), 1000):
        batch = keys[i : i + 1000]
        resp = s3.with_translation(
            lambda batch=batch: with_retries(
                lambda: client.delete_objects(
                    Bucket=bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
                ),
                "delete objects",
            ),
            uri,
        )
        errors = resp.get("Errors") or []
        if errors:
            raise PreshardError(
                f"could not delete {len(errors)} object(s) under {uri}: {errors[0].get('Code')}",
                reason="StorageError",
            )
        deleted += len(batch)
    return deleted


def _publish_local(
    local_dir: Path, dest: Path, manifest: Manifest, text: str, reporter: Reporter | None
) -> dict[str, Any]:
    dest.mkdir(parents=True, exist_ok=True)
    (dest / MANIFEST_NAME).unlink(missing_ok=True)
    if reporter is not None:
        reporter.stage("Uploading", manifest.total_bytes)
    for f in manifest.files:
        src, dst = local_dir / f.key, dest / f.key
        if src.resolve() != dst.resolve():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        if reporter is not None:
            reporter.advance(f.size)
    tmp = dest / (MANIFEST_NAME + ".part")
    tmp.write_text(text)
    os.replace(tmp, dest / MANIFEST_NAME)
    if reporter is not None:
        reporter.done()
    return artifact_status(manifest, str(dest), text) | {
        "uri": str(dest) + "/",
        "manifestUri": str(dest / MANIFEST_NAME),
    }


def manifest_to_dict(text: str) -> dict[str, Any]:
    return dict(json.loads(text))
