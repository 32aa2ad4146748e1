"""A publication whose files appear one by one: the engine-free conversion uploads each
rank file as soon as the streaming writer completes it, then deletes it locally.

``StreamingPublication`` is ``publication.Publication`` (the same ownership checks,
publication record, resumable uploads, manifest last, abort) with two differences:

* the files are known before they exist: the writer's layout gives every rank file's
  name and size up front (the headers follow from the traces), so ``begin`` records
  every key this publication may leave behind BEFORE any file is written;
* ``ready(rel, sha256)`` hands over a completed file; the upload thread sends the files
  in the order they become ready (each with the sha256 computed while it was written;
  an object already at the prefix with the same size and sha256 is kept, as on a
  resumed run), and deletes a file once it is stored (``delete_after``), so the work
  dir holds only the files written but not yet uploaded. To a local output on the work
  dir's file system such a file is renamed into place instead of copied. ``wait_room`` lets the writer
  wait while more than ``max_pending`` bytes are waiting (the disk bound).
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path
from typing import Any

from preshard.core.errors import InternalError, NothingToPublish
from preshard.worker.store.publication import LocalFile, Publication, UploadHandle, _copy_hashing
from preshard.worker.store.transfer import UploadAborted, UploadItem, remote_sha256

log = logging.getLogger(__name__)

_STOP = object()


class StreamingPublication(Publication):
    def __init__(
        self,
        local_dir: Path,
        output_uri: str,
        planned: list[tuple[str, int]],
        *,
        delete_after: frozenset[str] = frozenset(),
        max_pending: int | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(local_dir, output_uri, **kw)
        self.planned = list(planned)
        self.delete_after = delete_after
        self.max_pending = max_pending
        self._ready: queue.Queue[Any] = queue.Queue()
        self._shas: dict[str, str] = {}
        self._pending = 0
        self._room = threading.Condition()

    # -- begin: the planned files, not a listing of the directory ----------------------
    def begin(self) -> StreamingPublication:
        if self.state != "new":
            raise RuntimeError(f"begin() on a publication that is {self.state}")
        if not self.planned:
            raise NothingToPublish("nothing to publish")
        self.files = [LocalFile(rel, self.local_dir / rel, size) for rel, size in self.planned]
        self._begin_output()
        return self

    # -- the writer's side -------------------------------------------------------------
    def ready(self, rel: str, sha256: str) -> None:
        """``rel`` is complete on disk with this sha256: upload it."""
        size = next(f.size for f in self.files if f.rel == rel)
        with self._room:
            self._pending += size
        self._ready.put((rel, sha256))

    def wait_room(self) -> None:
        """Block while more than ``max_pending`` bytes wait for the upload; the upload's
        failure is raised here (the writer stops at once instead of filling the disk)."""
        with self._room:
            while True:
                if self.handle is not None and not self.handle.running():
                    break
                if self.max_pending is None or self._pending <= self.max_pending:
                    return
                self._room.wait(0.5)
        # the upload thread ended before the writer finished: only a failure does that
        assert self.handle is not None
        self.handle.wait()
        raise InternalError("the upload ended before every file was written")

    def finish_writing(self) -> None:
        self._ready.put(_STOP)

    def abort(self, *, remove: bool = True) -> str:
        self._ready.put(_STOP)
        return super().abort(remove=remove)

    def _next(self, handle: UploadHandle) -> tuple[str, str] | None:
        while True:
            if handle.cancel.is_set():
                raise UploadAborted("the upload was aborted")
            try:
                item = self._ready.get(timeout=0.5)
            except queue.Empty:
                continue
            return None if item is _STOP else item  # type: ignore[no-any-return]

    def _done(self, f: LocalFile) -> None:
        if f.rel in self.delete_after:
            f.path.unlink(missing_ok=True)
        with self._room:
            self._pending -= f.size
            self._room.notify_all()

    def _collect(self, handle: UploadHandle, send: Any) -> list[tuple[str, int, str]]:
        by_rel = {f.rel: f for f in self.files}
        while (item := self._next(handle)) is not None:
            rel, sha = item
            f = by_rel[rel]
            self._shas[rel] = send(f, sha)
            self._done(f)
        missing = [f.rel for f in self.files if f.rel not in self._shas]
        if missing:
            raise UploadAborted(
                f"the conversion ended before {len(missing)} file(s) were written: {missing[:3]}"
            )
        return [(f.rel, f.size, self._shas[f.rel]) for f in self.files]

    # -- the upload thread -------------------------------------------------------------
    def _upload_s3(self, handle: UploadHandle) -> list[tuple[str, int, str]]:
        out, client, remote = self.out, self._client, self._remote
        assert self._settings is not None
        up = self._uploader(handle)

        def skip(item: UploadItem) -> bool:
            if remote.get(item.key) != item.size:
                return False
            got = remote_sha256(client, out.bucket, item.key)
            if got is None or got[1] != item.sha256:
                return False
            with self._lock:
                self.reused.append(item.key)
            return True

        up.skip = skip

        def send(f: LocalFile, sha: str) -> str:
            # (the sha256 computed while the file was written goes into the object's
            # metadata; each part carries its Content-MD5, which the server checks)
            up.upload([UploadItem(f.path, out.key(f.rel), f.size, sha)])
            return sha

        return self._collect(handle, send)

    def _copy_local(self, handle: UploadHandle) -> list[tuple[str, int, str]]:
        dest = Path(self.out.path)

        def send(f: LocalFile, sha: str) -> str:
            dst = dest / f.rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            with self._lock:
                self._copied.append(dst)
            if f.rel in self.delete_after and _move(f.path, dst):
                # a file deleted after its upload, on the destination's file system: it
                # is renamed into place, not copied and hashed again (the writer checked
                # its bytes as they were written and hashed exactly those)
                handle.progress.advance(f.size)
                return sha
            got = _copy_hashing(f.path, dst, handle.cancel)
            if got != sha:
                raise InternalError(
                    f"{f.rel} changed on disk after it was written (sha256)",
                )
            handle.progress.advance(f.size)
            return got

        return self._collect(handle, send)


def _move(src: Path, dst: Path) -> bool:
    """Rename ``src`` to ``dst`` when both are on one file system (False otherwise,
    nothing changed: the caller copies)."""
    import errno
    import os

    try:
        os.replace(src, dst)
    except OSError as exc:
        if exc.errno in (errno.EXDEV, errno.EPERM, errno.EACCES, errno.ENOTSUP):
            return False
        raise
    return True
