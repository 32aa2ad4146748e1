"""Fetching sources: ``fetch_source`` brings a model to local disk (an ``s3://`` prefix
through the :class:`~preshard.worker.download.Downloader`, an ``hf://`` repository through
huggingface_hub, at one resolved commit) or uses a ``file://`` or ``pvc://`` directory in
place, after checking that it is a model directory that reaches nothing outside itself.

Publishing is :mod:`preshard.worker.publication`'s; the records at a prefix (manifest,
publication record) and the ownership rules are :mod:`preshard.worker.records`'.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
import sys
import threading
from pathlib import Path

from preshard.core.contract import (
    JOURNAL_NAME,
    OTHER_WEIGHT_SUFFIXES,
    PVC_MOUNT_ROOT,
    SAFETENSORS_SUFFIX,
)
from preshard.core.errors import PreshardError
from preshard.core.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    Manifest,
    ManifestError,
)
from preshard.core.uris import StorageURI, check_file_name, parse_uri
from preshard.worker import s3
from preshard.worker.download import Downloader, DownloadItem
from preshard.worker.progress import Reporter
from preshard.worker.records import read_bounded

log = logging.getLogger(__name__)

# A source needs safetensors weights; weights in other formats are never downloaded.
WEIGHT_SUFFIXES = (SAFETENSORS_SUFFIX,)
SKIPPED_SUFFIXES = OTHER_WEIGHT_SUFFIXES
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


def check_links(path: Path, uri: str, root: Path | None = None) -> None:
    """Refuse a local source that reaches outside itself through a symbolic link.

    ``root`` (the volume's mount) must contain ``path`` once resolved. Inside ``path``,
    links are resolved and checked (not followed blindly): a link whose target stays in
    the source directory is fine (vLLM and the copy read the target); one that leaves it
    (``NOTICE.txt -> /proc/self/environ``, ``../other``) or dangles is refused, so no file
    outside the source can be read, copied or published.
    """
    real = path.resolve()
    if root is not None and not real.is_relative_to(root.resolve()):
        raise PreshardError(
            f"source {uri} is a symbolic link to a directory outside its volume; preshard "
            "never follows links out of a source",
            reason="InvalidSource",
            permanent=True,
        )
    if not real.is_dir():
        return  # check_model_dir reports it
    for p in sorted(real.iterdir()):
        if not p.is_symlink():
            continue
        try:
            target = p.resolve(strict=True)
        except (OSError, RuntimeError):
            target = None
        if target is None or not target.is_relative_to(real):
            log.warning(
                "refusing source %s: %s is a symbolic link outside the source directory",
                uri,
                p.name,
            )
            raise PreshardError(
                f"source {uri}: {p.name} is a symbolic link to a path outside the source "
                "directory (or a dangling one); preshard never follows links out of a "
                "source: replace it with the file itself",
                reason="InvalidSource",
                permanent=True,
            )


def local_source_dir(u: StorageURI, uri: str) -> Path:
    """The directory of a ``file://`` (local path) or ``pvc://`` source, after
    ``check_links``: refused (InvalidSource) when it, or a link in it, leads outside the
    volume or the directory. Every reader of a local source (convert, verify --against,
    the preflight's digest) goes through this one function."""
    if u.scheme == "file":
        path = Path(u.path).resolve()
        check_links(path, uri)
        return path
    if u.scheme != "pvc":
        raise ValueError(f"not a local source: {u.scheme}")
    path = pvc_mount_root() / u.authority / u.path
    check_links(path, uri, root=pvc_mount_root() / u.authority)
    return path


# ------------------------------------------------------------------ the source's pin
# One digest of a source's content, computed by the preflight (which reports it) and by
# every reader that must read exactly that content (convert, the adopt/copy check):
# core.identity.files_digest over (name, size, ETag) of the top-level objects of an s3://
# prefix, over (name, size, sha256) of the top-level files of a PVC or local directory.


def local_entries(path: Path) -> list[tuple[str, int, str]]:
    """(name, size, sha256) of a directory's top-level files (dotfiles aside)."""
    from preshard.worker.transfer import sha256_file

    return [
        (p.name, p.stat().st_size, sha256_file(p))
        for p in sorted(path.iterdir())
        if p.is_file() and not p.name.startswith(".")
    ]


def s3_entries(client: object, u: StorageURI) -> list[tuple[str, int, str]]:
    """(name, size, ETag) of an s3:// prefix's top-level objects (raises the client's
    errors: the caller translates them)."""
    entries: list[tuple[str, int, str]] = []
    pages = client.get_paginator("list_objects_v2").paginate(  # type: ignore[attr-defined]
        Bucket=u.bucket, Prefix=u.prefix
    )
    for page in pages:
        for obj in page.get("Contents", []) or []:
            name = obj["Key"][len(u.prefix) :]
            if name and "/" not in name:
                entries.append((name, int(obj["Size"]), str(obj.get("ETag", "")).strip('"')))
    return entries


def source_changed(uri: str, pin: str) -> PreshardError:
    return PreshardError(
        f"the source {uri} changed since the operator's preflight pinned it ({pin[:19]}...): "
        "preshard converts (and checks against) exactly the content it pinned; apply the "
        "resource again to convert the new content",
        reason="SourceChanged",
        permanent=True,
    )


def check_pin(uri: str, entries: list[tuple[str, int, str]], pin: str | None) -> None:
    """SourceChanged (permanent) when the source's files do not have the pinned digest."""
    from preshard.core.identity import files_digest

    if pin is not None and files_digest(entries) != pin:
        raise source_changed(uri, pin)


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
        return _fetch_hf(u, uri, dest, reporter, pin)
    return _fetch_s3(u, uri, dest, endpoint_url, region, concurrency, reporter, pin)


def list_source_files(client: object, u: StorageURI, uri: str) -> dict[str, int]:
    """name -> size of the top-level objects of an ``s3://`` source (its publication
    record aside): SourceNotFound for a missing bucket or an empty prefix, InvalidSource
    for a name no model file can have. Every reader of an S3 source lists it here."""
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
    for name in sorted(files):
        why = check_file_name(name)
        if why is not None:
            shown = name if len(name) <= 60 else name[:60] + "..."
            raise PreshardError(
                f"source {uri}: the object {u.prefix}{shown} {why}; it cannot be a model file "
                "(rename or remove it)",
                reason="InvalidSource",
                permanent=True,
            )
    files.pop(JOURNAL_NAME, None)
    if not files:
        raise PreshardError(
            f"source {uri} does not exist or is empty (no objects under the prefix)",
            reason="SourceNotFound",
            permanent=True,
        )
    return files


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


def _fetch_hf(
    u: StorageURI, uri: str, dest: Path, reporter: Reporter | None, pin: str | None = None
) -> Path:
    try:
        from huggingface_hub import HfApi, snapshot_download
    except ImportError as exc:  # pragma: no cover - dependency of the package
        raise PreshardError(
            f"hf:// sources need huggingface_hub ({exc})", reason="InternalError"
        ) from None
    quiet_hf_client()
    token = os.environ.get("HF_TOKEN") or None
    try:
        # Resolve the branch or tag to one commit first: every file then comes from that
        # commit, and a missing repository or revision or an unreachable Hub fails here.
        # (Given a branch, snapshot_download falls back to whatever an earlier run left
        # in dest when it cannot ask the Hub: even another repository's files.)
        # pinned: exactly the commit the preflight resolved, never the branch's tip now
        info = HfApi().model_info(
            u.authority, revision=pin or u.revision, token=token, files_metadata=True
        )
        if not info.sha:
            raise PreshardError(
                f"the Hugging Face Hub returned no commit for {uri}", reason="StorageUnavailable"
            )
        if pin is not None and info.sha != pin:
            raise source_changed(uri, pin)
        _claim_dest(dest, f"hf {u.authority}@{info.sha}")
        wanted = [s for s in info.siblings or [] if hf_wanted(s.rfilename)]
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
        err = hf_error(exc, uri, u.revision, has_token=token is not None)
        if err is None:
            raise
        raise err from None
    if reporter is not None:
        reporter.done()
    out = Path(path)
    check_model_dir(out, uri)
    return out


def hf_wanted(name: str) -> bool:
    return "/" not in name and any(fnmatch.fnmatchcase(name, p) for p in HF_PATTERNS)


def quiet_hf_client() -> None:
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


def hf_error(
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
            s3.scrub(
                f"cannot download {uri} from the Hugging Face Hub at {constants.ENDPOINT}: "
                f"{_hf_cause(exc)}"
            ),
            reason="StorageUnavailable",
        )
    return None
