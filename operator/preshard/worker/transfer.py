"""Parallel, resumable, integrity-checked S3 transfers.

Every part of every file goes into one shared thread pool (no nested waiting, so no
deadlock and full parallelism across small and large files). Uploads send Content-MD5
per part (servers that check it reject corrupted parts) and record the file's sha256 in
the object metadata ``x-amz-meta-sha256``, which is what resumption compares; a file
whose sha256 is not known yet is hashed in a small side pool just before its parts are
queued, so hashing overlaps the transfer of the files before it. Each part is read once
into a reused per-thread buffer that feeds both its MD5 and the request body. Downloads
receive each range straight into a reused per-thread buffer (``readinto``: no bytes
object per read), write it into a preallocated ``.part`` file (``os.pwrite``) and hash
it as the bytes arrive (:class:`SequentialHasher`: in order, the contiguous prefix),
check the sha256 against the manifest, and rename it into place atomically, so a file
with its final name is always complete and verified.

The background upload, the ownership rules and the manifest are
``preshard.worker.storage.Publication``'s.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import itertools
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import botocore.exceptions

from preshard.core.errors import PreshardError
from preshard.worker.progress import Reporter
from preshard.worker.s3 import error_code, translate

log = logging.getLogger(__name__)

MiB = 2**20
DEFAULT_PART_SIZE = 32 * MiB
MIN_PART_SIZE = 5 * MiB  # S3's minimum for all parts but the last
MAX_PARTS = 10_000
HASH_CHUNK = 4 * MiB
READBACK_CHUNK = 1 * MiB
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


class UploadCancelled(PreshardError):
    reason = "UploadAborted"
    permanent = True


def failed_before_cancel(exc: BaseException) -> bool:
    """Whether a failure seen after an abort is a failure of its own (not a transient
    error whose retry the abort stopped)."""
    return not _retryable(exc)


def _wait_all(futures: list[Future[Any]]) -> None:
    """Wait for every future; raise the first failure (after cancelling the rest)."""
    done, pending = wait(futures, return_when=FIRST_EXCEPTION)
    for f in done:
        exc = f.exception()
        if exc is not None:
            for p in pending:
                p.cancel()
            wait(pending)
            raise exc


def _run_all(pool: ThreadPoolExecutor, tasks: Iterable[Callable[[], Any]]) -> list[Any]:
    futures: list[Future[Any]] = [pool.submit(t) for t in tasks]
    _wait_all(futures)
    return [f.result() for f in futures]


class _Transfer:
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
                raise PreshardError(
                    f"{path} changed while uploading (shorter than when it was listed)",
                    reason="LocalFileChanged",
                )
            got += n


def _md5_b64(data: memoryview | bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()  # noqa: S324 - Content-MD5 is MD5


class Uploader(_Transfer):
    def __init__(self, client: Any, bucket: str, **kw: Any) -> None:
        super().__init__(client, bucket, **kw)
        # Test hook: raise after this many parts (simulates a crash mid-upload).
        self.fail_after_parts: int | None = None
        # Set to stop: queued parts fail with UploadCancelled, unfinished uploads are aborted.
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
            raise UploadCancelled("the upload was aborted")
        with self._lock:
            self._parts_done += 1
            if self.fail_after_parts is not None and self._parts_done > self.fail_after_parts:
                raise PreshardError(
                    "injected crash (test hook)", reason="InjectedCrash", permanent=True
                )

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
                        raise UploadCancelled("the upload was aborted")
                    _wait_all(futures)
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
                raise UploadCancelled("the upload was aborted") from None
            raise translate(exc, self.uri, "upload to") from None
        return list(self.results)

    def _result(self, fut: Future[str], failed: threading.Event) -> str:
        """A hash, without waiting for it forever when the batch failed or was aborted."""
        while True:
            try:
                return fut.result(timeout=0.2)
            except FuturesTimeout:
                if failed.is_set() or self.cancel.is_set():
                    raise UploadCancelled("the upload was aborted") from None

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
            raise PreshardError(f"{item.path} changed while uploading", reason="LocalFileChanged")
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


@dataclass(frozen=True)
class DownloadItem:
    key: str
    dest: Path
    size: int
    sha256: str | None  # None: no expected hash (source without manifest)


class IntegrityError(PreshardError):
    reason = "IntegrityError"
    permanent = True


class SequentialHasher:
    """sha256 of a file whose byte ranges are written out of order by several threads.

    Writers report each range once its bytes are in the file (:meth:`written`); the
    contiguous prefix from offset 0 is hashed as it grows: a range that continues the
    prefix is hashed from the caller's bytes, ranges beyond a gap are read back from the
    file (page cache) once the gap is filled. One thread hashes at a time; the others
    only record their range and go on transferring.
    """

    def __init__(self, fd: int, size: int) -> None:
        self._fd = fd
        self._size = size
        self._h = hashlib.sha256()
        self._pos = 0  # bytes hashed
        self._ranges: dict[int, int] = {}  # written, not hashed yet: start -> end
        self._lock = threading.Lock()
        self._busy = False
        self._readback: memoryview | None = None
        self.read_back = 0  # bytes hashed from the file (arrived ahead of the hash)

    def written(self, start: int, data: bytes | memoryview) -> None:
        end = start + len(data)
        if end == start:
            return
        with self._lock:
            if self._busy or start != self._pos:
                self._ranges[start] = end
                return
            self._busy = True
        try:
            self._h.update(data)
        except BaseException:
            with self._lock:
                self._busy = False
            raise
        with self._lock:
            self._pos = end
        self._drain()

    def _drain(self) -> None:
        """Hash the recorded ranges that continue the prefix (caller holds ``_busy``)."""
        try:
            while True:
                with self._lock:
                    end = self._ranges.pop(self._pos, None)
                    if end is None:
                        self._busy = False
                        return
                    start = self._pos
                self._hash_from_file(start, end)
                with self._lock:
                    self._pos = end
        except BaseException:
            with self._lock:
                self._busy = False
            raise

    def _hash_from_file(self, start: int, end: int) -> None:
        # One small buffer per file, reused (only the thread holding _busy reads back):
        # no allocation per range, and the bytes are still in the CPU cache when hashed.
        if self._readback is None:
            self._readback = memoryview(bytearray(READBACK_CHUNK))
        buf = self._readback
        self.read_back += end - start
        pos = start
        while pos < end:
            n = os.preadv(self._fd, [buf[: min(len(buf), end - pos)]], pos)
            if n <= 0:
                raise OSError(f"short read while hashing at offset {pos}")
            self._h.update(buf[:n])
            pos += n

    @property
    def hashed(self) -> int:
        return self._pos

    def hexdigest(self) -> str:
        """The file's sha256; every byte must have been reported."""
        with self._lock:
            if self._pos != self._size or self._busy:
                raise RuntimeError(
                    f"hashed {self._pos} of {self._size} bytes (ranges missing: {sorted(self._ranges)[:3]})"
                )
        return self._h.hexdigest()


@dataclass
class _Dest:
    """A download in flight: its ``.part`` file, open for positional writes."""

    item: DownloadItem
    tmp: Path
    fd: int
    hasher: SequentialHasher | None


def _raw_response(body: Any) -> Any | None:
    """The urllib3 response under botocore's StreamingBody when its http.client response
    can receive straight into a buffer (``readinto``: one copy, from the socket into a
    reused buffer, instead of a new bytes object per read, copied again by http.client).
    botocore asks urllib3 for the raw body (no content decoding), so both paths see the
    same bytes. None when these libraries do not have that shape (then the public
    ``read`` path is used)."""
    raw = getattr(body, "_raw_stream", None)
    fp = getattr(raw, "_fp", None)
    if (
        fp is None
        or not callable(getattr(fp, "readinto", None))
        or not callable(getattr(raw, "release_conn", None))
        or getattr(raw, "_fp_bytes_read", None) != 0  # nothing read through urllib3 yet
    ):
        return None
    return raw


class Downloader(_Transfer):
    """Parallel ranged GETs (``part_size`` each) written in place, each file hashed as
    its bytes arrive."""

    chunk_size = 1 * MiB  # bytes per read, into one reused buffer per thread
    zero_copy = True  # receive into that buffer (readinto) where the libraries allow it

    def download(self, items: list[DownloadItem]) -> list[DownloadItem]:
        """Download items not already present and verified; returns the ones transferred."""
        todo = [i for i in items if not self._present(i)]
        if self.reporter is not None:
            skipped = sum(i.size for i in items if i not in todo)
            if skipped:
                self.reporter.advance(skipped)
        dests: list[_Dest] = []
        try:
            with ThreadPoolExecutor(
                max_workers=self.concurrency, thread_name_prefix="s3-down"
            ) as pool:
                _run_all(pool, [partial(self._check_remote, item) for item in todo])
                per_file: list[list[Callable[[], Any]]] = []
                for item in todo:
                    item.dest.parent.mkdir(parents=True, exist_ok=True)
                    tmp = item.dest.with_name(item.dest.name + ".part")
                    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                    dest = _Dest(item, tmp, fd, None)
                    dests.append(dest)
                    os.ftruncate(fd, item.size)  # preallocated: ranges land in place
                    if item.sha256 is not None:
                        dest.hasher = SequentialHasher(fd, item.size)
                    ps = part_size_for(item.size, self.part_size)
                    n = max(1, -(-item.size // ps))
                    per_file.append([partial(self._get_range, dest, k * ps, ps) for k in range(n)])
                # Rank by rank (every file's first range, then every second one...): a range
                # that starts where its file's sha256 has got to is hashed from the receive
                # buffer as it arrives; one that arrives ahead of it is read back from the
                # page cache later. In this order most ranges are of the first kind.
                tasks = [t for rank in itertools.zip_longest(*per_file) for t in rank if t]
                _run_all(pool, tasks)
            # Every file that verifies goes into place, even when another one fails.
            first: BaseException | None = None
            for dest in dests:
                try:
                    self._finish(dest)
                except Exception as exc:
                    first = first or exc
            if first is not None:
                raise first
        except PreshardError:
            raise
        except Exception as exc:
            raise translate(exc, self.uri, "download from") from None
        finally:
            for dest in dests:
                with contextlib.suppress(OSError):
                    os.close(dest.fd)
        return todo

    def _present(self, item: DownloadItem) -> bool:
        if not item.dest.exists() or item.dest.stat().st_size != item.size:
            return False
        if item.sha256 is None:
            return True
        return sha256_file(item.dest) == item.sha256

    def _check_remote(self, item: DownloadItem) -> None:
        """HEAD each object first: a missing or resized object fails here with its name,
        before any byte moves. (It also lets servers that compute an ETag on first
        access, like rclone, do it once instead of once per concurrent range.)"""
        try:
            head = with_retries(
                lambda: self.client.head_object(Bucket=self.bucket, Key=item.key),
                f"head {item.key}",
            )
        except botocore.exceptions.ClientError as exc:
            if error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                raise IntegrityError(f"{item.key}: the object is missing from {self.uri}") from None
            raise
        size = int(head["ContentLength"])
        if size != item.size:
            raise IntegrityError(
                f"{item.key}: the object in {self.uri} has {size} bytes, expected {item.size}; "
                "it was changed or truncated after it was published"
            )

    def _get_range(self, dest: _Dest, start: int, length: int) -> None:
        item = dest.item
        if item.size == 0:
            return
        end = min(start + length, item.size) - 1
        done = start  # bytes before this offset are in the file and reported (kept on retry)

        def fetch() -> None:
            nonlocal done
            resp = self.client.get_object(
                Bucket=self.bucket, Key=item.key, Range=f"bytes={done}-{end}"
            )
            body = resp["Body"]
            want = end + 1 - done
            sent = resp.get("ContentLength")
            if sent is not None and int(sent) > want:
                body.close()
                raise IntegrityError(
                    f"{item.key}: the server answered bytes {done}-{end} with {sent} bytes "
                    "(more than asked for)"
                )
            raw = _raw_response(body) if self.zero_copy else None
            for n in (
                self._receive_into(raw, dest, done, want)
                if raw is not None
                else self._receive(body, dest, done, want)
            ):
                done += n
                self._advance(n)
            if done != end + 1:
                raise botocore.exceptions.IncompleteReadError(
                    actual_bytes=done - start, expected_bytes=end + 1 - start
                )

        try:
            with_retries(fetch, f"range {start}-{end} of {item.key}")
        except PreshardError:
            raise
        except Exception as exc:  # name the object, not only the prefix
            raise translate(exc, f"s3://{self.bucket}/{item.key}", "download") from None

    def _store(self, dest: _Dest, pos: int, data: memoryview | bytes) -> None:
        """Write bytes at their offset, then report them to the file's hasher."""
        view = memoryview(data)
        off = 0
        while off < len(view):
            off += os.pwrite(dest.fd, view[off:], pos + off)
        if dest.hasher is not None:
            dest.hasher.written(pos, view)

    def _receive_into(self, raw: Any, dest: _Dest, pos: int, want: int) -> Iterator[int]:
        """Receive up to ``want`` bytes into this thread's buffer and store them; yields the
        bytes stored per read. The connection goes back to the pool only when the response
        ended exactly (any failure or surplus closes it)."""
        fp = raw._fp  # see _raw_response
        buf = self._buffer(min(self.chunk_size, want))
        left = want
        ok = False
        try:
            while left:
                view = buf[: min(len(buf), left)]
                try:
                    n = fp.readinto(view)
                except (OSError, http.client.HTTPException) as exc:  # the socket, not the disk
                    raise botocore.exceptions.ResponseStreamingError(error=exc) from exc
                if not n:
                    return
                self._store(dest, pos, view[:n])
                pos += n
                left -= n
                yield n
            ok = fp.isclosed()  # http.client closes it once Content-Length bytes came
        finally:
            if ok:
                raw.release_conn()
            else:
                raw.close()

    def _receive(self, body: Any, dest: _Dest, pos: int, want: int) -> Iterator[int]:
        """The public path: botocore's reads (a new bytes object per read)."""
        left = want
        try:
            for chunk in body.iter_chunks(chunk_size=self.chunk_size):
                if len(chunk) > left:
                    raise IntegrityError(
                        f"{dest.item.key}: the server sent more bytes than asked for"
                    )
                self._store(dest, pos, chunk)
                pos += len(chunk)
                left -= len(chunk)
                yield len(chunk)
        finally:
            body.close()

    def _finish(self, dest: _Dest) -> None:
        item = dest.item
        if dest.hasher is not None:
            got = dest.hasher.hexdigest()
            if got != item.sha256:
                dest.tmp.unlink(missing_ok=True)
                raise IntegrityError(
                    f"{item.key}: sha256 mismatch (expected {item.sha256}, got {got}); the object in "
                    f"{self.uri} is corrupted or was changed after publishing"
                )
        os.close(dest.fd)
        dest.fd = -1
        os.replace(dest.tmp, item.dest)
