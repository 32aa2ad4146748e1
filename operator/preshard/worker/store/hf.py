"""``hf://`` sources through huggingface_hub: the download of one resolved commit's
top-level files (``fetch_hf``, with progress from the bytes growing on disk), which
files a model needs (``hf_wanted``), and the one translation of huggingface_hub's
failures into preshard's (``hf_error``)."""

from __future__ import annotations

import fnmatch
import logging
import os
import sys
import threading
from pathlib import Path

from preshard.core.errors import (
    AccessDenied,
    InternalError,
    PreshardError,
    SourceNotFound,
    StorageUnavailable,
)
from preshard.core.uris import StorageURI
from preshard.worker.progress import Reporter
from preshard.worker.store import s3
from preshard.worker.store.source_files import check_model_dir, claim_dest, source_changed

log = logging.getLogger(__name__)

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


def fetch_hf(
    u: StorageURI, uri: str, dest: Path, reporter: Reporter | None, pin: str | None = None
) -> Path:
    try:
        from huggingface_hub import HfApi, snapshot_download
    except ImportError as exc:  # pragma: no cover - dependency of the package
        raise InternalError(f"hf:// sources need huggingface_hub ({exc})") from None
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
            raise StorageUnavailable(f"the Hugging Face Hub returned no commit for {uri}")
        if pin is not None and info.sha != pin:
            raise source_changed(uri, pin)
        claim_dest(dest, f"hf {u.authority}@{info.sha}")
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
        return AccessDenied(msg)
    if isinstance(exc, RevisionNotFoundError):
        return SourceNotFound(
            f"source {uri}: revision {revision!r} does not exist",
        )
    if isinstance(exc, RepositoryNotFoundError):
        hint = "the account of HF_TOKEN cannot see it" if has_token else "is private: set HF_TOKEN"
        return SourceNotFound(f"source {uri} does not exist (or {hint})")
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
        return AccessDenied(
            f"the Hugging Face Hub {who} for {uri} (HTTP {status})",
        )
    if isinstance(exc, (HfHubHTTPError, *_transport_errors())):
        return StorageUnavailable(
            s3.scrub(
                f"cannot download {uri} from the Hugging Face Hub at {constants.ENDPOINT}: "
                f"{_hf_cause(exc)}"
            ),
        )
    return None
