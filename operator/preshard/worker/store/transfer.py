"""Parallel, resumable, integrity-checked S3 transfers: what uploads and downloads share
(retries, sha256 of a file, part sizing, the :class:`Transfer` base), and the uploads.

Every part of every file goes into one shared thread pool (no nested waiting, so no
deadlock and full parallelism across small and large files). Uploads send Content-MD5
per part (servers that check it reject corrupted parts) and record the file's sha256 in
the object metadata ``x-amz-meta-sha256``, which is what resumption compares; a file
whose sha256 is not known yet is hashed in a small side pool just before its parts are
queued, so hashing overlaps the transfer of the files before it. Each part is read once
into a reused per-thread buffer that feeds both its MD5 and the request body.

Downloads are :mod:`preshard.worker.store.download`'s; the background upload, the ownership
rules and the manifest are ``preshard.worker.store.publication.Publication``'s.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import botocore.exceptions

from preshard.core.errors import InjectedCrash, LocalFileChanged, PreshardError, UploadAborted
from preshard.worker.progress import Reporter
from preshard.worker.store.s3 import error_code, translate

log = logging.getLogger(__name__)

MiB = 2**20
DEFAULT_PART_SIZE = 32 * MiB
MIN_PART_SIZE = 5 * MiB  # S3's minimum for all parts but the last
MAX_PARTS = 10_000
HASH_CHUNK = 4 * MiB
RETRYABLE_CODES = {
    "SlowDown",
    "InternalError",
    "ServiceUnavailable",
    "RequestTimeout",
    "500",
    "502",
    "503",
    "504",
    "BadDigest",
    "RequestTimeTooSkewed",
    "Throttling",
}
PART_ATTEMPTS = 6


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def part_size_for(size: int, preferred: int = DEFAULT_PART_SIZE) -> int:
    """A part size >= preferred that keeps the part count within S3's 10,000 limit."""
    ps = max(preferred, MIN_PART_SIZE)
    while size > ps * MAX_PARTS:
        ps *= 2
    return ps


def lower_priority(nice: int) -> None:
    """Add ``nice`` to the calling THREAD's niceness (Linux schedules threads, so only
    this thread yields; 0: nothing). Best effort: never raises. An unprivileged process
    cannot raise it back, so it is for threads that end with their work."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError as exc:  # pragma: no cover - a kernel or sandbox without it
        log.debug("cannot lower the priority of %s: %s", threading.current_thread().name, exc)


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, PreshardError):
        return not exc.permanent
    if isinstance(exc, botocore.exceptions.ClientError):
        code = error_code(exc)
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return code in RETRYABLE_CODES or (isinstance(status, int) and status >= 500)
    return isinstance(
        exc,
        botocore.exceptions.ConnectionError
        | botocore.exceptions.HTTPClientError
        | botocore.exceptions.ReadTimeoutError
        | botocore.exceptions.IncompleteReadError
        | botocore.exceptions.ResponseStreamingError
        | ConnectionError
        | TimeoutError,
    )


def with_retries(
    fn: Callable[[], Any],
    what: str,
    attempts: int = PART_ATTEMPTS,
    stop: threading.Event | None = None,
) -> Any:
    """Retry transient failures (5xx, SlowDown, resets) with jittered exponential backoff,
    on top of botocore's own retries. Once ``stop`` is set, no further attempt is made
    (the last failure is raised)."""
    delay = 0.2
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt == attempts or not _retryable(exc) or (stop is not None and stop.is_set()):
                raise
            log.info(
                "retrying %s after %s (attempt %d/%d)",
                what,
                error_code(exc) or type(exc).__name__,
                attempt,
                attempts,
            )
            pause = delay * (0.5 + random.random())  # noqa: S311 - jitter, not crypto
            if stop is not None:
                if stop.wait(pause):
                    raise
            else:
                time.sleep(pause)
            delay = min(delay * 2, 10.0)
    raise AssertionError("unreachable")  # pragma: no cover


@dataclass(frozen=True)
class UploadItem:
    path: Path
    key: str
    size: int
    sha256: str | None = None  # None: hashed by the Uploader just before its upload


def failed_before_cancel(exc: BaseException) -> bool:
    """Whether a failure seen after an abort is a failure of its own (not a transient
    error whose retry the abort stopped)."""
    return not _retryable(exc)


def wait_all(futures: list[Future[Any]]) -> None:
    """Wait for every future; raise the first failure (after cancelling the rest)."""
    done, pending = wait(futures, return_when=FIRST_EXCEPTION)
    for f in done:
        exc = f.exception()
        if exc is not None:
            for p in pending:
                p.cancel()
            wait(pending)
            raise exc


class Transfer:
    """Shared settings of an upload or download batch against one bucket."""

    def __init__(
        self,
        client: Any,
        bucket: str,
        *,
        concurrency: int = 16,
        part_size: int = DEFAULT_PART_SIZE,
        reporter: Reporter | None = None,
        uri: str = "",
    ) -> None:
        self.client = client
        self.bucket = bucket
        self.concurrency = max(1, concurrency)
        self.part_size = part_size
        self.reporter = reporter
        self.uri = uri or f"s3://{bucket}/"
        self._buffers = threading.local()

    def _advance(self, n: int) -> None:
        if self.reporter is not None:
            self.reporter.advance(n)

    def _buffer(self, size: int) -> memoryview:
        """This thread's reusable buffer of at least ``size`` bytes (no allocation and no
        page faults per part)."""
        buf: bytearray | None = getattr(self._buffers, "buf", None)
        if buf is None or len(buf) < size:
            buf = bytearray(size)
            self._buffers.buf = buf
        return memoryview(buf)[:size]


@dataclass
class _Multipart:
    """A multipart upload in flight: completed by whichever task stores its last part."""

    item: UploadItem
    upload_id: str
    etags: list[Any]
    remaining: int
    completed: bool = False


def _read_exact(path: Path, offset: int, buf: memoryview) -> None:
    """Fill ``buf`` from ``path`` at ``offset`` (readinto: no intermediate bytes)."""
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        got = 0
        while got < len(buf):
            n = f.readinto(buf[got:])
            if not n:
                raise LocalFileChanged(
                    f"{path} changed while uploading (shorter than when it was listed)",
                )
            got += n


def _md5_b64(data: memoryview | bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()  # noqa: S324 - Content-MD5 is MD5


class Uploader(Transfer):
    def __init__(self, client: Any, bucket: str, **kw: Any) -> None:
        super().__init__(client, bucket, **kw)
        # Test hook: raise after this many parts (simulates a crash mid-upload).
        self.fail_after_parts: int | None = None
        # Set to stop: queued parts fail with UploadAborted, unfinished uploads are aborted.
        self.cancel = threading.Event()
        # Resumption: called with a hashed item; True skips it (already in place).
        self.skip: Callable[[UploadItem], bool] | None = None
        # What this uploader did: the items (sha256 filled in), and the keys it completed.
        self.results: list[UploadItem] = []
        self.uploaded_keys: list[str] = []
        self.hash_concurrency = 2
        # Niceness added to every thread of this upload (see lower_priority): a
        # background upload yields the CPU to the verification engine.
        self.nice = 0
        self._parts_done = 0
        self._lock = threading.Lock()

    def _init_thread(self) -> None:
        lower_priority(self.nice)

    def _count_part(self) -> None:
        if self.cancel.is_set():
            raise UploadAborted("the upload was aborted")
        with self._lock:
            self._parts_done += 1
            if self.fail_after_parts is not None and self._parts_done > self.fail_after_parts:
                raise InjectedCrash("injected crash (test hook)")

    def upload(self, items: list[UploadItem]) -> list[UploadItem]:
        """Upload all items in parallel; return them with their sha256. Raises the first
        failure (translated).

        Each multipart upload is completed as soon as its own last part is stored, so a
        crash or failure mid-batch leaves every finished file complete (and skipped by
        the next, resumed run); only unfinished uploads are aborted.
        """
        uploads: list[_Multipart] = []
        # Small files first (one request each), then the multipart ones, each in order.
        items = [i for i in items if i.size <= self.part_size] + [
            i for i in items if i.size > self.part_size
        ]
        try:
            with (
                ThreadPoolExecutor(
                    max_workers=self.concurrency,
                    thread_name_prefix="s3-up",
                    initializer=self._init_thread,
                ) as pool,
                ThreadPoolExecutor(
                    max_workers=max(1, self.hash_concurrency),
                    thread_name_prefix="s3-hash",
                    initializer=self._init_thread,
                ) as hashers,
            ):
                futures: list[Future[Any]] = []
                failed = threading.Event()

                def note(f: Future[Any]) -> None:
                    if f.exception() is not None:
                        failed.set()

                def submit(fn: Callable[[], Any]) -> None:
                    f = pool.submit(fn)
                    f.add_done_callback(note)
                    futures.append(f)

                # Files without a sha256 are hashed ahead, in order, while earlier ones upload.
                hashes = {
                    n: hashers.submit(sha256_file, i.path)
                    for n, i in enumerate(items)
                    if i.sha256 is None
                }
                try:
                    for n, item in enumerate(items):
                        if n in hashes:
                            item = replace(item, sha256=self._result(hashes[n], failed))
                        if failed.is_set() or self.cancel.is_set():
                            break
                        self.results.append(item)
                        if self.skip is not None and self.skip(item):
                            self._advance(item.size)
                            continue
                        if item.size <= self.part_size:
                            submit(partial(self._put_small, item))
                            continue
                        ps = part_size_for(item.size, self.part_size)
                        upload_id = with_retries(
                            partial(self._create_multipart, item), f"create multipart {item.key}"
                        )
                        nparts = (item.size + ps - 1) // ps
                        mp = _Multipart(item, upload_id, [None] * nparts, nparts)
                        uploads.append(mp)
                        for k in range(nparts):
                            submit(partial(self._put_part, mp, ps, k))
                    if self.cancel.is_set():
                        raise UploadAborted("the upload was aborted")
                    wait_all(futures)
                except BaseException:
                    for h in hashes.values():
                        h.cancel()
                    self.cancel.set()  # queued parts stop instead of uploading
                    wait(futures)
                    for mp in uploads:
                        if not mp.completed:
                            self._abort(mp.item.key, mp.upload_id)
                    raise
        except PreshardError:
            raise
        except Exception as exc:
            if self.cancel.is_set() and not failed_before_cancel(exc):
                raise UploadAborted("the upload was aborted") from None
            raise translate(exc, self.uri, "upload to") from None
        return list(self.results)

    def _result(self, fut: Future[str], failed: threading.Event) -> str:
        """A hash, without waiting for it forever when the batch failed or was aborted."""
        while True:
            try:
                return fut.result(timeout=0.2)
            except FuturesTimeout:
                if failed.is_set() or self.cancel.is_set():
                    raise UploadAborted("the upload was aborted") from None

    def _complete(self, mp: _Multipart) -> None:
        parts = [{"PartNumber": n + 1, "ETag": e} for n, e in enumerate(mp.etags)]
        with_retries(
            partial(
                self.client.complete_multipart_upload,
                Bucket=self.bucket,
                Key=mp.item.key,
                UploadId=mp.upload_id,
                MultipartUpload={"Parts": parts},
            ),
            f"complete {mp.item.key}",
        )
        mp.completed = True
        with self._lock:
            self.uploaded_keys.append(mp.item.key)

    def _create_multipart(self, item: UploadItem) -> str:
        resp = self.client.create_multipart_upload(
            Bucket=self.bucket, Key=item.key, Metadata={"sha256": str(item.sha256)}
        )
        return str(resp["UploadId"])

    def _abort(self, key: str, upload_id: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except Exception as exc:  # best effort; purge also aborts leftovers
            log.debug("abort multipart %s failed: %s", key, exc)

    def _body(self, path: Path, offset: int, size: int) -> tuple[bytes | bytearray, str]:
        """The bytes of one part (read once, into this thread's buffer) and their MD5.
        botocore takes bytes or a bytearray as a body (not a memoryview): a full-size
        part is sent from the reused buffer itself, a shorter one as a copy."""
        view = self._buffer(size)
        _read_exact(path, offset, view)
        md5 = _md5_b64(view)
        buf = view.obj
        assert isinstance(buf, bytearray)
        return (buf if len(buf) == size else view.tobytes()), md5

    def _put_small(self, item: UploadItem) -> None:
        self._count_part()
        if item.path.stat().st_size != item.size:
            raise LocalFileChanged(f"{item.path} changed while uploading")
        data, md5 = self._body(item.path, 0, item.size)
        with_retries(
            lambda: self.client.put_object(
                Bucket=self.bucket,
                Key=item.key,
                Body=data,
                ContentMD5=md5,
                Metadata={"sha256": str(item.sha256)},
            ),
            f"put {item.key}",
            stop=self.cancel,
        )
        with self._lock:
            self.uploaded_keys.append(item.key)
        self._advance(item.size)

    def _put_part(self, mp: _Multipart, part_size: int, n: int) -> None:
        item = mp.item
        self._count_part()
        length = min(part_size, item.size - n * part_size)
        data, md5 = self._body(item.path, n * part_size, length)
        resp = with_retries(
            lambda: self.client.upload_part(
                Bucket=self.bucket,
                Key=item.key,
                UploadId=mp.upload_id,
                PartNumber=n + 1,
                Body=data,
                ContentMD5=md5,
            ),
            f"part {n + 1} of {item.key}",
            stop=self.cancel,
        )
        mp.etags[n] = resp["ETag"]
        self._advance(length)
        with self._lock:
            mp.remaining -= 1
            last = mp.remaining == 0
        if last:
            self._complete(mp)


def remote_sha256(client: Any, bucket: str, key: str) -> tuple[int, str | None] | None:
    """(size, recorded sha256) of an object, or None when it does not exist."""
    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except botocore.exceptions.ClientError as exc:
        if error_code(exc) in ("404", "NoSuchKey", "NotFound"):
            return None
        raise
    meta = {k.lower(): v for k, v in (head.get("Metadata") or {}).items()}
    return int(head["ContentLength"]), meta.get("sha256")
