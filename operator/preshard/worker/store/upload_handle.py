"""The files a publication uploads (``local_files``, ``LocalFile``) and the handle of an
upload running in its own thread (``UploadHandle``: progress that a reporter can take
over, wait, stop), for :mod:`preshard.worker.store.publication`."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from preshard.core.contract import MANIFEST_NAME
from preshard.core.contract import PUBLICATION_RECORD_NAME as JOURNAL_NAME
from preshard.core.errors import InvalidSource
from preshard.worker.progress import Reporter
from preshard.worker.store.transfer import HASH_CHUNK, UploadAborted, Uploader, lower_priority

log = logging.getLogger(__name__)


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
                raise InvalidSource(
                    f"{rel.as_posix()} in {local_dir} is a symbolic link to a path outside "
                    "the directory (or a dangling one): preshard never publishes what a link "
                    "out of the directory points at",
                )
        if not p.is_file():
            continue
        if rel.as_posix() in (MANIFEST_NAME, JOURNAL_NAME) or p.name.endswith(".part"):
            continue
        out.append(p)
    return out


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
    the :class:`~preshard.worker.store.transfer.Uploader`'s thread pool)."""

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
                raise UploadAborted("the upload was aborted")
            h.update(chunk)
            fo.write(chunk)
    return h.hexdigest()
