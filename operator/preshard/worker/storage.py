"""Fetching sources and publishing checkpoints.

``fetch_source`` brings a model to local disk (or uses a local/PVC directory in place);
a :class:`Publication` (``publish`` runs all of it at once) checks who owns the output,
records what it is about to write, uploads the converted files resumably, hashing each
right before it goes, possibly while the conversion still verifies them, and writes
``preshard-manifest.json`` LAST, so a prefix with a manifest always describes complete,
verified objects.
"""

from __future__ import annotations

import base64
import datetime as dt
import fnmatch
import hashlib
import json
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import botocore.exceptions

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
    artifact_status,
    build_manifest,
)
from preshard.core.uris import StorageURI, check_file_name, parse_output_uri, parse_uri
from preshard.worker import s3
from preshard.worker.progress import Reporter
from preshard.worker.transfer import (
    HASH_CHUNK,
    Downloader,
    DownloadItem,
    UploadCancelled,
    Uploader,
    UploadItem,
    lower_priority,
    remote_sha256,
    sha256_file,
    with_retries,
)

log = logging.getLogger(__name__)

# JOURNAL_NAME (core.contract) is written before a publication changes anything at a
# prefix and removed after its manifest: the owner and every key the publication may
# leave behind (the previous manifest's and its own), so that an interrupted run's
# objects are cleaned up by the next one, and nothing else ever is.
JOURNAL_FORMAT = "preshard.io/publish-journal"
MAX_JOURNAL_BYTES = MAX_MANIFEST_BYTES
# Niceness of a background upload's threads (Publication.start(background=True)).
BACKGROUND_NICE = 19
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
        check_links(path, uri)
        check_model_dir(path, uri)
        return path
    if u.scheme == "pvc":
        path = pvc_mount_root() / u.authority / u.path
        check_links(path, uri, root=pvc_mount_root() / u.authority)
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
            s3.scrub(
                f"cannot download {uri} from the Hugging Face Hub at {constants.ENDPOINT}: "
                f"{_hf_cause(exc)}"
            ),
            reason="StorageUnavailable",
        )
    return None


# ------------------------------------------------------------------------------ publish


def local_files(local_dir: Path) -> list[Path]:
    """Files to publish: everything under local_dir except the manifest, dotfiles and
    partials. A symbolic link whose target leaves local_dir is refused (never read)."""
    root = local_dir.resolve()
    out = []
    for p in sorted(local_dir.rglob("*")):
        rel = p.relative_to(local_dir)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.is_symlink():
            try:
                inside = p.resolve(strict=True).is_relative_to(root)
            except (OSError, RuntimeError):
                inside = False
            if not inside:
                raise PreshardError(
                    f"{rel.as_posix()} in {local_dir} is a symbolic link to a path outside "
                    "the directory (or a dangling one): preshard never publishes what a link "
                    "out of the directory points at",
                    reason="InvalidSource",
                    permanent=True,
                )
        if not p.is_file():
            continue
        if rel.as_posix() in (MANIFEST_NAME, JOURNAL_NAME) or p.name.endswith(".part"):
            continue
        out.append(p)
    return out


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------------ ownership


class Unreadable:
    """A manifest or journal that exists but cannot be read (its owner is unknown)."""

    def __init__(self, why: str) -> None:
        self.why = why


@dataclass(frozen=True)
class Journal:
    owner: str | None
    keys: frozenset[str]  # relative to the prefix

    def to_json(self) -> bytes:
        return (
            json.dumps(
                {"format": JOURNAL_FORMAT, "owner": self.owner, "keys": sorted(self.keys)},
                indent=1,
            ).encode()
            + b"\n"
        )

    @classmethod
    def from_json(cls, body: bytes) -> Journal:
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            raise ManifestError("publish journal is not valid JSON") from None
        if not isinstance(data, dict) or data.get("format") != JOURNAL_FORMAT:
            raise ManifestError("not a preshard publish journal")
        owner, keys = data.get("owner"), data.get("keys")
        if owner is not None and not isinstance(owner, str):
            raise ManifestError("publish journal owner is not a string")
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise ManifestError("publish journal keys are not a list of strings")
        return cls(owner, frozenset(keys))


def read_bounded(client: Any, bucket: str, key: str, limit: int) -> bytes:
    """A small object's bytes, reading at most ``limit`` + 1 of them (never a whole large
    object); ManifestError when it is larger. ClientError (404...) propagates.

    A body cut short or damaged on the way (its length, or the sha256 recorded in its
    metadata, does not match) is read again (botocore retries the request itself, not a
    body that breaks while it is read). The one reader of small objects (manifests,
    records, a source's config.json)."""
    return read_bounded_tagged(client, bucket, key, limit)[0]


def read_bounded_tagged(client: Any, bucket: str, key: str, limit: int) -> tuple[bytes, str | None]:
    """:func:`read_bounded`, and the object's ETag (for a conditional write)."""
    attempts = 4
    for attempt in range(1, attempts + 1):
        resp = client.get_object(Bucket=bucket, Key=key)
        body = resp["Body"]
        length = resp.get("ContentLength")
        meta = {k.lower(): v for k, v in (resp.get("Metadata") or {}).items()}
        try:
            if isinstance(length, int) and length > limit:
                raise ManifestError(f"{key} is larger than {limit} bytes")
            # With a known length: read it whole (botocore checks the length); else at
            # most limit + 1 bytes.
            data: bytes = body.read() if isinstance(length, int) else body.read(limit + 1)
            if len(data) > limit:
                raise ManifestError(f"{key} is larger than {limit} bytes")
            want = meta.get("sha256")
            if want and hashlib.sha256(data).hexdigest() != want:
                raise botocore.exceptions.IncompleteReadError(
                    actual_bytes=len(data), expected_bytes=length or len(data)
                )
            etag = resp.get("ETag")
            return data, str(etag) if etag else None
        except (
            botocore.exceptions.ResponseStreamingError,
            botocore.exceptions.IncompleteReadError,
            botocore.exceptions.ReadTimeoutError,
            ConnectionError,
        ) as exc:
            if attempt == attempts:
                raise
            log.info("retrying get %s after %s", key, type(exc).__name__)
            time.sleep(0.2 * attempt)
        finally:
            body.close()
    raise AssertionError("unreachable")  # pragma: no cover


def _get_record(client: Any, bucket: str, key: str, uri: str) -> tuple[bytes, str | None] | None:
    """A manifest's or record's (bytes, ETag), bounded; None when absent; ManifestError
    when too large; any other failure translated."""
    try:
        return read_bounded_tagged(client, bucket, key, MAX_MANIFEST_BYTES)
    except ManifestError:
        raise
    except botocore.exceptions.ClientError as exc:
        if s3.is_not_found(exc):
            return None
        raise s3.translate(exc, uri, "read the manifest of") from None
    except Exception as exc:
        raise s3.translate(exc, uri, "read the manifest of") from None


def _read_record(
    client: Any, bucket: str, key: str, uri: str, parse: Any
) -> Any | Unreadable | None:
    """The parsed manifest/journal at ``key``; None when absent; Unreadable when it
    exists but cannot be parsed (or is too large)."""
    try:
        got = _get_record(client, bucket, key, uri)
        return None if got is None else parse(got[0])
    except ManifestError as exc:
        return Unreadable(str(exc)[:200])


def read_manifest(client: Any, bucket: str, key: str, uri: str) -> Manifest | Unreadable | None:
    result: Manifest | Unreadable | None = _read_record(
        client, bucket, key, uri, Manifest.from_json
    )
    return result


def read_manifest_tagged(
    client: Any, bucket: str, key: str, uri: str
) -> tuple[Manifest | None, bytes, str | None] | None:
    """(the manifest, None when it cannot be parsed or is too large; its bytes; its
    ETag); None when there is none (what adopt, copy and withdraw compare and replace)."""
    body, etag = b"", None
    try:
        got = _get_record(client, bucket, key, uri)
        if got is None:
            return None
        body, etag = got
        return Manifest.from_json(body), body, etag
    except ManifestError as exc:
        log.warning("unreadable manifest %s: %s", key, exc)
        return None, body, etag


def read_journal(client: Any, bucket: str, key: str, uri: str) -> Journal | Unreadable | None:
    result: Journal | Unreadable | None = _read_record(client, bucket, key, uri, Journal.from_json)
    return result


def _same_owner(record: Manifest | Journal | Unreadable, owner: str | None) -> bool:
    """A record at another prefix is ours only when it names exactly our (set) owner."""
    return not isinstance(record, Unreadable) and owner is not None and record.owner == owner


def check_neighbours(
    client: Any, u: StorageURI, listing: dict[str, int], owner: str | None, what: str
) -> None:
    """Refuse (permanent) when a checkpoint (or an unfinished publication) that is not
    ``owner``'s lies below ``u``'s prefix (nested) or above it (``u`` would be inside it).

    The message names the other prefix (in the same bucket, which the caller may use)
    but never the other owner."""
    uri = str(u)
    names = (MANIFEST_NAME, JOURNAL_NAME)
    own = {u.key(n) for n in names}
    for key in sorted(listing):
        if key in own or key.rsplit("/", 1)[-1] not in names:
            continue
        reader = read_manifest if key.endswith(MANIFEST_NAME) else read_journal
        record = reader(client, u.bucket, key, uri)
        if record is not None and not _same_owner(record, owner):
            nested = f"s3://{u.bucket}/{key.rsplit('/', 1)[0]}/"
            raise PreshardError(
                f"refusing to {what} {uri}: another owner's checkpoint lies below it, at "
                f"{nested}; preshard never touches another owner's checkpoint (choose a "
                "prefix that contains no other checkpoint)",
                reason="OutputOwnedByOther",
                permanent=True,
            )
    parts = u.prefix.rstrip("/").split("/")[:-1] if u.prefix else []
    ancestors = [""] + ["/".join(parts[: i + 1]) + "/" for i in range(len(parts))]
    for anc in ancestors:
        for name in names:
            reader = read_manifest if name == MANIFEST_NAME else read_journal
            try:
                record = reader(client, u.bucket, anc + name, uri)
            except PreshardError as exc:
                if exc.reason != "AccessDenied":
                    raise
                # Credentials scoped to a prefix may not read its parents: what they
                # cannot read is not a checkpoint they could be asked to respect.
                log.debug("cannot read %s%s (access denied): not checked", anc, name)
                continue
            if record is not None and not _same_owner(record, owner):
                raise PreshardError(
                    f"refusing to {what} {uri}: it lies inside another owner's checkpoint at "
                    f"s3://{u.bucket}/{anc}; choose a prefix outside it",
                    reason="OutputOwnedByOther",
                    permanent=True,
                )


def _check_own(
    record: Manifest | Journal | Unreadable | None, owner: str | None, uri: str, what: str
) -> None:
    """The manifest/journal at the prefix itself: refuse when another owner's, or when it
    cannot be read (its owner, and what it lists, are unknown)."""
    if record is None:
        return
    if isinstance(record, Unreadable):
        raise PreshardError(
            f"refusing to {what} {uri}: its {MANIFEST_NAME} (or {JOURNAL_NAME}) cannot be "
            f"read ({record.why}), so its owner and objects are unknown; remove it by hand "
            "if it is yours",
            reason="OutputOwnedByOther",
            permanent=True,
        )
    if record.owner is not None and record.owner != owner:
        raise PreshardError(
            f"refusing to {what} {uri}: it holds a checkpoint published by another owner; "
            "choose another output prefix (preshard never overwrites or deletes another "
            "owner's checkpoint)",
            reason="OutputOwnedByOther",
            permanent=True,
        )


def _put_journal(client: Any, u: StorageURI, journal: Journal) -> None:
    body = journal.to_json()
    md5 = base64.b64encode(hashlib.md5(body).digest()).decode()  # noqa: S324 - Content-MD5
    s3.with_translation(
        lambda: with_retries(
            lambda: client.put_object(
                Bucket=u.bucket,
                Key=u.key(JOURNAL_NAME),
                Body=body,
                ContentMD5=md5,
                ContentType="application/json",
                Metadata={"sha256": hashlib.sha256(body).hexdigest()},
            ),
            "put journal",
        ),
        str(u),
    )


def _delete_one(client: Any, u: StorageURI, name: str, what: str) -> None:
    s3.with_translation(
        lambda: with_retries(lambda: client.delete_object(Bucket=u.bucket, Key=u.key(name)), what),
        str(u),
    )


def _put_manifest(client: Any, u: StorageURI, text: str) -> None:
    body = text.encode()
    md5 = base64.b64encode(hashlib.md5(body).digest()).decode()  # noqa: S324 - Content-MD5
    s3.with_translation(
        lambda: with_retries(
            lambda: client.put_object(
                Bucket=u.bucket,
                Key=u.key(MANIFEST_NAME),
                Body=body,
                ContentMD5=md5,
                ContentType="application/json",
                Metadata={"sha256": hashlib.sha256(body).hexdigest()},
            ),
            "put manifest",
        ),
        str(u),
    )


def delete_keys(client: Any, bucket: str, keys: list[str], uri: str) -> int:
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
                f"could not delete {len(errors)} object(s) under {uri}: "
                f"{s3.scrub(str(errors[0].get('Code')), 100)}",
                reason="StorageError",
            )
        deleted += len(batch)
    return deleted


# -------------------------------------------------------------------------- publication


@dataclass(frozen=True)
class LocalFile:
    rel: str  # the key relative to the output prefix
    path: Path
    size: int


class _Progress:
    """Counts a background upload's bytes; forwards them to a Reporter once attached."""

    def __init__(self, total: int) -> None:
        self._lock = threading.Lock()
        self.done = 0
        self.total = total
        self._reporter: Reporter | None = None

    def advance(self, n: int) -> None:
        with self._lock:
            self.done += n
            reporter = self._reporter
        if reporter is not None:
            reporter.advance(n)

    def attach(self, reporter: Reporter, stage: str) -> int:
        with self._lock:
            left = max(0, self.total - self.done)
            reporter.stage(stage, left)
            self._reporter = reporter
        return left


class UploadHandle:
    """The upload of a :class:`Publication`, running in a background thread (which runs
    the :class:`~preshard.worker.transfer.Uploader`'s thread pool)."""

    def __init__(
        self,
        files: list[LocalFile],
        run: Callable[[UploadHandle], list[tuple[str, int, str]]],
        reporter: Reporter | None = None,
        nice: int = 0,
    ) -> None:
        self.files = files
        self.nice = nice
        self.progress = _Progress(sum(f.size for f in files))
        if reporter is not None:  # the whole upload as a stage, from its first byte
            self.progress.attach(reporter, "Uploading")
        self.cancel = threading.Event()
        self.uploader: Uploader | None = None
        self.started = time.monotonic()
        self.finished: float | None = None
        self._result: list[tuple[str, int, str]] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._main, args=(run,), name="s3-upload", daemon=True
        )
        self._thread.start()

    def _main(self, run: Callable[[UploadHandle], list[tuple[str, int, str]]]) -> None:
        lower_priority(self.nice)
        try:
            self._result = run(self)
        except BaseException as exc:
            self._error = exc
        finally:
            self.finished = time.monotonic()

    @property
    def bytes_total(self) -> int:
        return self.progress.total

    @property
    def bytes_done(self) -> int:
        """Bytes uploaded so far (files found already in place count as done)."""
        return self.progress.done

    def attach(self, reporter: Reporter, stage: str = "Uploading") -> int:
        """Report the REST of the upload to ``reporter`` as a new ``stage`` whose total is
        what is left now (so its rate and ETA are the remainder's); returns that."""
        return self.progress.attach(reporter, stage)

    def running(self) -> bool:
        return self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> list[tuple[str, int, str]]:
        """``[(key relative to the prefix, size, sha256)]`` in the files' order, or the
        upload's error."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("the upload is still running")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return list(self._result)

    def stop(self) -> None:
        """Stop sending (queued parts are dropped, unfinished multipart uploads aborted)
        and wait for the threads."""
        self.cancel.set()
        if self.uploader is not None:
            self.uploader.cancel.set()
        self._thread.join()


def _copy_hashing(src: Path, dst: Path, cancel: threading.Event) -> str:
    """Copy ``src`` to ``dst`` reading it once; its sha256."""
    h = hashlib.sha256()
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while chunk := fi.read(HASH_CHUNK):
            if cancel.is_set():
                raise UploadCancelled("the upload was aborted")
            h.update(chunk)
            fo.write(chunk)
    return h.hexdigest()


class Publication:
    """One publication of a local directory at an output prefix, in steps, so that the
    upload can run while the conversion still verifies what it uploads:

    * :meth:`begin`: every ownership check of the prefix (another owner's manifest or
      unfinished publication at it, below it or above it is refused: permanent, nothing
      written), then the publication record ``preshard-publish.json`` (this owner and
      every key this publication may leave behind: its own and those of this owner's
      previous checkpoint) BEFORE any object, then the previous manifest withdrawn;
    * :meth:`start`: the upload, in background threads; each file is hashed right
      before its parts are queued, and an object already there with the same size and
      sha256 is kept (a resumed run sends it no more);
    * :meth:`commit`: wait for the upload, check the prefix again, delete the keys of
      this owner's previous checkpoint that the new one does not list (owner-only: never
      a listing of the prefix), write the manifest LAST (its sha256 in its metadata),
      remove the record;
    * :meth:`abort`: stop the upload (unfinished multipart uploads are aborted) and,
      with ``remove``, delete what this run uploaded that no manifest refers to, and
      rewrite the record to exactly what this owner still has at the prefix.

    :func:`publish` is begin + start + commit. A ``file://`` output copies instead (and
    has no record).
    """

    def __init__(
        self,
        local_dir: Path,
        output_uri: str,
        *,
        owner: str | None = None,
        endpoint_url: str | None = None,
        region: str | None = None,
        concurrency: int = 16,
        part_size: int | None = None,
        fail_after_parts: int | None = None,
    ) -> None:
        self.local_dir = Path(local_dir)
        self.out = parse_output_uri(output_uri, allow_local=True)
        self.uri = str(self.out)
        self.owner = owner
        self.endpoint_url, self.region, self.concurrency = endpoint_url, region, concurrency
        self.part_size, self.fail_after_parts = part_size, fail_after_parts
        self.files: list[LocalFile] = []
        self.handle: UploadHandle | None = None
        self.state = "new"  # begun, started, committed, aborted
        self.removed: list[str] = []  # keys abort deleted
        self.reused: list[str] = []  # keys found in place (not sent again)
        self.note = ""  # abort's sentence for the result message
        self._client: Any = None
        self._settings: s3.S3Settings | None = None
        self._remote: dict[str, int] = {}  # the prefix's listing at begin
        self._previous: set[str] = set()  # keys of this owner's earlier checkpoint/record
        self._journal_keys: frozenset[str] = frozenset()
        self._copied: list[Path] = []  # file:// outputs: what this run wrote
        self._lock = threading.Lock()

    @property
    def local(self) -> bool:
        return self.out.scheme == "file"

    @property
    def journal_keys(self) -> frozenset[str]:
        """The keys the record lists (relative to the prefix)."""
        return self._journal_keys

    # -- begin --------------------------------------------------------------------------
    def begin(self) -> Publication:
        if self.state != "new":
            raise RuntimeError(f"begin() on a publication that is {self.state}")
        paths = local_files(self.local_dir)
        if not paths:
            raise PreshardError(
                f"nothing to publish in {self.local_dir}",
                reason="NothingToPublish",
                permanent=True,
            )
        self.files = [
            LocalFile(p.relative_to(self.local_dir).as_posix(), p, p.stat().st_size) for p in paths
        ]
        if self.local:
            dest = Path(self.out.path)
            dest.mkdir(parents=True, exist_ok=True)
            (dest / MANIFEST_NAME).unlink(missing_ok=True)
        else:
            self._begin_s3()
        self.state = "begun"
        return self

    def _begin_s3(self) -> None:
        out, uri = self.out, self.uri
        self._settings = s3.output_settings(self.endpoint_url, self.region, self.concurrency)
        client = self._client = s3.make_client(self._settings)
        s3.check_bucket(client, out.bucket, uri)
        existing = read_manifest(client, out.bucket, out.key(MANIFEST_NAME), uri)
        journal = read_journal(client, out.bucket, out.key(JOURNAL_NAME), uri)
        _check_own(existing, self.owner, uri, "publish to")
        _check_own(journal, self.owner, uri, "publish to")
        try:
            self._remote = s3.list_objects(client, out.bucket, out.prefix)
        except Exception as exc:
            raise s3.translate(exc, uri, "list") from None
        check_neighbours(client, out, self._remote, self.owner, "publish to")
        assert not isinstance(existing, Unreadable) and not isinstance(journal, Unreadable)
        if existing is not None:
            self._previous |= {f.key for f in existing.files}
        if journal is not None:
            self._previous |= journal.keys
        self._journal_keys = frozenset(self._previous | {f.rel for f in self.files})
        # The record first: from here on, whatever this run or the previous checkpoint
        # leaves behind is recorded as this owner's, for the next run or a purge.
        _put_journal(client, out, Journal(self.owner, self._journal_keys))
        if existing is not None:
            # Re-publishing: withdraw the old manifest first so the prefix never has a
            # manifest that points at objects being replaced.
            log.info("withdrawing the previous manifest of %s (this owner's)", uri)
            _delete_one(client, out, MANIFEST_NAME, "delete old manifest")

    # -- start --------------------------------------------------------------------------
    def start(self, reporter: Reporter | None = None, *, background: bool = False) -> UploadHandle:
        """Start the upload; with ``reporter``, report it as the Uploading stage now
        (else later, from :meth:`UploadHandle.attach`, or not at all). ``background``:
        its threads run at the lowest CPU priority (niceness +19), so that while an
        engine verifies on the same cores (vLLM's CPU backend binds one OpenMP thread to
        each and stalls when one is preempted) the upload only takes idle CPU time."""
        if self.state != "begun":
            raise RuntimeError(f"start() on a publication that is {self.state}")
        run = self._copy_local if self.local else self._upload_s3
        nice = BACKGROUND_NICE if background else 0
        self.handle = UploadHandle(self.files, run, reporter, nice)
        self.state = "started"
        return self.handle

    def _upload_s3(self, handle: UploadHandle) -> list[tuple[str, int, str]]:
        out, client, remote = self.out, self._client, self._remote
        assert self._settings is not None

        def skip(item: UploadItem) -> bool:
            if remote.get(item.key) != item.size:
                return False
            got = remote_sha256(client, out.bucket, item.key)
            if got is None or got[1] != item.sha256:
                return False
            with self._lock:
                self.reused.append(item.key)
            return True

        up = Uploader(
            client,
            out.bucket,
            concurrency=self._settings.concurrency,
            reporter=handle.progress,  # type: ignore[arg-type]
            uri=self.uri,
            **({"part_size": self.part_size} if self.part_size else {}),
        )
        up.cancel = handle.cancel
        up.skip = skip
        up.fail_after_parts = self.fail_after_parts
        up.nice = handle.nice
        handle.uploader = up
        done = {
            i.key: i
            for i in up.upload([UploadItem(f.path, out.key(f.rel), f.size) for f in self.files])
        }
        log.info(
            "uploaded %d of %d files to %s (%d bytes; %d bytes already present and verified)",
            len(self.files) - len(self.reused),
            len(self.files),
            self.uri,
            handle.bytes_total - sum(remote.get(k, 0) for k in self.reused),
            sum(remote.get(k, 0) for k in self.reused),
        )
        return [(f.rel, f.size, str(done[out.key(f.rel)].sha256)) for f in self.files]

    def _copy_local(self, handle: UploadHandle) -> list[tuple[str, int, str]]:
        dest = Path(self.out.path)
        results = []
        for f in self.files:
            if handle.cancel.is_set():
                raise UploadCancelled("the upload was aborted")
            dst = dest / f.rel
            if f.path.resolve() == dst.resolve():
                sha = sha256_file(f.path)
            else:
                dst.parent.mkdir(parents=True, exist_ok=True)
                with self._lock:
                    self._copied.append(dst)
                sha = _copy_hashing(f.path, dst, handle.cancel)
            handle.progress.advance(f.size)
            results.append((f.rel, f.size, sha))
        return results

    # -- commit -------------------------------------------------------------------------
    def commit(
        self, manifest_fields: dict[str, Any], *, reporter: Reporter | None = None
    ) -> dict[str, Any]:
        """Wait for the upload and publish: the manifest last; returns status.artifact."""
        if self.state == "begun":
            self.start()
        if self.state != "started" or self.handle is None:
            raise RuntimeError(f"commit() on a publication that is {self.state}")
        files = self.handle.wait()
        manifest = build_manifest(files, owner=self.owner, created_at=_now(), **manifest_fields)
        text = manifest.to_json()
        if self.local:
            dest = Path(self.out.path)
            tmp = dest / (MANIFEST_NAME + ".part")
            tmp.write_text(text)
            os.replace(tmp, dest / MANIFEST_NAME)
            self.state = "committed"
            if reporter is not None:
                reporter.done()
            return artifact_status(manifest, str(dest), text) | {
                "uri": str(dest) + "/",
                "manifestUri": str(dest / MANIFEST_NAME),
            }
        self._commit_s3(text)
        self.state = "committed"
        if reporter is not None:
            reporter.done()
            reporter.stage("Published", manifest.total_bytes)
            reporter.advance(manifest.total_bytes)
            reporter.done()
        return artifact_status(manifest, self.uri, text)

    def _commit_s3(self, text: str) -> None:
        out, uri, client = self.out, self.uri, self._client
        # The prefix once more, right before the manifest: another owner may have
        # published at, below or above it while this run uploaded.
        now = read_manifest(client, out.bucket, out.key(MANIFEST_NAME), uri)
        _check_own(now, self.owner, uri, "publish to")
        _check_own(
            read_journal(client, out.bucket, out.key(JOURNAL_NAME), uri),
            self.owner,
            uri,
            "publish to",
        )
        try:
            listing = s3.list_objects(client, out.bucket, out.prefix)
        except Exception as exc:
            raise s3.translate(exc, uri, "list") from None
        check_neighbours(client, out, listing, self.owner, "publish to")
        # Stale objects: what this owner's previous checkpoint (or unfinished run) wrote
        # and this one does not list. Nothing else, whatever else the prefix holds.
        new_keys = {f.rel for f in self.files}
        stale = sorted(out.key(k) for k in self._previous - new_keys if out.key(k) in listing)
        if stale:
            log.info("deleting %d object(s) of this owner's previous checkpoint", len(stale))
        delete_keys(client, out.bucket, stale, uri)
        mine = self._previous | new_keys | {MANIFEST_NAME, JOURNAL_NAME}
        others = [k for k in listing if k[len(out.prefix) :] not in mine]
        if others:
            log.warning(
                "%s: %d object(s) under the prefix are not this checkpoint's and were left "
                "in place (readers use only what the manifest lists)",
                uri,
                len(others),
            )
        _put_manifest(client, out, text)  # the manifest, last
        # Complete: the manifest now lists everything of this owner here.
        _delete_one(client, out, JOURNAL_NAME, "delete journal")

    # -- abort --------------------------------------------------------------------------
    def abort(self, *, remove: bool = True) -> str:
        """Stop the upload; with ``remove``, delete what this run uploaded that no
        manifest refers to and rewrite the record to what this owner still has at the
        prefix (deleted when nothing is left). Returns one sentence for the result
        message ("" when nothing had been written). Never raises a storage error: what
        cannot be removed is left unreferenced, and the sentence says so."""
        if self.state in ("new", "committed", "aborted"):
            return self.note
        if self.handle is not None:
            self.handle.stop()
        self.state = "aborted"
        if self.local:
            self.note = self._abort_local(remove)
            return self.note
        up = self.handle.uploader if self.handle is not None else None
        uploaded = sorted(set(up.uploaded_keys)) if up is not None else []
        keep_hint = (
            f"no manifest lists them; {self.uri}{JOURNAL_NAME} does, for the next run to "
            "re-use and for a purge"
        )
        if not remove:
            self.note = (
                f"{len(uploaded)} object(s) uploaded to {self.uri} are left unreferenced "
                f"({keep_hint})"
            )
            log.warning("publication stopped: %s", self.note)
            return self.note
        try:
            self.note = self._remove_uploaded(uploaded)
        except PreshardError as exc:
            self.note = (
                f"{len(uploaded)} object(s) uploaded to {self.uri} could not be removed "
                f"({exc.message}) and are left unreferenced ({keep_hint})"
            )
            log.warning("publication aborted: %s", self.note)
        return self.note

    def _remove_uploaded(self, uploaded: list[str]) -> str:
        out, uri, client = self.out, self.uri, self._client
        current = read_manifest(client, out.bucket, out.key(MANIFEST_NAME), uri)
        if isinstance(current, Unreadable):
            keep = set(uploaded)  # what it lists is unknown: delete nothing
        elif current is not None:
            keep = {out.key(f.key) for f in current.files} & set(uploaded)
        else:
            keep = set()
        doomed = [k for k in uploaded if k not in keep]
        delete_keys(client, out.bucket, doomed, uri)
        self.removed = doomed
        # The record: exactly the keys of this owner still at the prefix (what was there
        # at begin, this owner's earlier checkpoint whose manifest was withdrawn and
        # objects found in place, plus uploads that a manifest now refers to).
        gone = {k[len(out.prefix) :] for k in doomed}
        there = set(self._remote) | set(uploaded)
        # (objects another owner's manifest now refers to are theirs: not recorded)
        left = {k for k in self._journal_keys if out.key(k) in there} - gone
        if isinstance(current, Manifest) and current.owner != self.owner:
            left -= {k[len(out.prefix) :] for k in keep}
        journal = read_journal(client, out.bucket, out.key(JOURNAL_NAME), uri)
        if isinstance(journal, Journal) and journal.owner == self.owner:
            if left:
                _put_journal(client, out, Journal(self.owner, frozenset(left)))
            else:
                _delete_one(client, out, JOURNAL_NAME, "delete journal")
            self._journal_keys = frozenset(left)
        shown = ", ".join(k[len(out.prefix) :] for k in doomed[:5]) + (
            ", ..." if len(doomed) > 5 else ""
        )
        note = f"removed the {len(doomed)} object(s) this run had uploaded to {uri}"
        if doomed:
            note += f" ({shown})"
        if keep:
            note += f"; kept {len(keep)} that another manifest there refers to"
        if left:
            note += (
                f"; {JOURNAL_NAME} lists the {len(left)} object(s) of this owner still "
                "there, for the next run or a purge"
            )
        log.info("publication aborted: %s", note)
        return note

    def _abort_local(self, remove: bool) -> str:
        if not remove:
            return f"{len(self._copied)} file(s) copied to {self.out.path} are left (no manifest)"
        for p in self._copied:
            p.unlink(missing_ok=True)
        note = f"removed the {len(self._copied)} file(s) this run had copied to {self.out.path}"
        log.info("publication aborted: %s", note)
        return note


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
    """Upload ``local_dir`` to ``output_uri`` with the manifest last; return status.artifact
    (:class:`Publication`'s begin, start and commit).

    Ownership: refuses (permanent, nothing written or deleted) when the prefix holds
    another owner's checkpoint, when one lies below it or when the prefix lies inside
    one. The only objects ever deleted are keys that this owner's previous manifest at
    the prefix listed, or that an unfinished publication of this owner (its record)
    was writing: never the result of listing the prefix. A failure leaves what was
    uploaded in place (listed in the record) for the next run to re-use.
    """
    pub = Publication(
        local_dir,
        output_uri,
        owner=owner,
        endpoint_url=endpoint_url,
        region=region,
        concurrency=concurrency,
        part_size=part_size,
        fail_after_parts=fail_after_parts,
    ).begin()
    pub.start(reporter)
    try:
        return pub.commit(manifest_fields, reporter=reporter)
    except BaseException:
        pub.abort(remove=False)
        raise
