"""Parallel, resumable, integrity-checked S3 downloads.

Downloads receive each range straight into a reused per-thread buffer (``readinto``: no
bytes object per read), write it into a preallocated ``.part`` file (``os.pwrite``) and
hash it as the bytes arrive (:class:`SequentialHasher`: in order, the contiguous
prefix), check the sha256 against the manifest, and rename it into place atomically, so
a file with its final name is always complete and verified. Retries, part sizing and the
shared :class:`~preshard.worker.store.transfer.Transfer` base are
:mod:`preshard.worker.store.transfer`'s.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import itertools
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import botocore.exceptions

from preshard.core.errors import IntegrityError, PreshardError
from preshard.worker.store.s3 import error_code, translate
from preshard.worker.store.transfer import (
    MiB,
    Transfer,
    part_size_for,
    sha256_file,
    wait_all,
    with_retries,
)

log = logging.getLogger(__name__)

READBACK_CHUNK = 1 * MiB


def _run_all(pool: ThreadPoolExecutor, tasks: Iterable[Callable[[], Any]]) -> list[Any]:
    futures: list[Future[Any]] = [pool.submit(t) for t in tasks]
    wait_all(futures)
    return [f.result() for f in futures]


@dataclass(frozen=True)
class DownloadItem:
    key: str
    dest: Path
    size: int
    sha256: str | None  # None: no expected hash (source without manifest)


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


class Downloader(Transfer):
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
