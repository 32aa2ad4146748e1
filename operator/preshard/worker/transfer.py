"""Parallel, resumable, integrity-checked S3 transfers.

Every part of every file goes into one shared thread pool (no nested waiting, so no
deadlock and full parallelism across small and large files). Uploads send Content-MD5
per part (servers that check it reject corrupted parts) and record the file's sha256 in
the object metadata ``x-amz-meta-sha256``, which is what resumption compares. Downloads
write ranges into a ``.part`` file, check the sha256 against the manifest, and rename it
into place atomically, so a file with its final name is always complete and verified.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
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


def with_retries(fn: Callable[[], Any], what: str, attempts: int = PART_ATTEMPTS) -> Any:
    """Retry transient failures (5xx, SlowDown, resets) with jittered exponential backoff,
    on top of botocore's own retries."""
    delay = 0.2
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt == attempts or not _retryable(exc):
                raise
            log.info(
                "retrying %s after %s (attempt %d/%d)",
                what,
                error_code(exc) or type(exc).__name__,
                attempt,
                attempts,
            )
            time.sleep(delay * (0.5 + random.random()))  # noqa: S311 - jitter, not crypto
            delay = min(delay * 2, 10.0)
    raise AssertionError("unreachable")  # pragma: no cover


@dataclass(frozen=True)
class UploadItem:
    path: Path
    key: str
    size: int
    sha256: str


def _run_all(pool: ThreadPoolExecutor, tasks: Iterable[Callable[[], Any]]) -> list[Any]:
    futures: list[Future[Any]] = [pool.submit(t) for t in tasks]
    done, pending = wait(futures, return_when=FIRST_EXCEPTION)
    for f in done:
        exc = f.exception()
        if exc is not None:
            for p in pending:
                p.cancel()
            wait(pending)
            raise exc
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


@dataclass
class _Multipart:
    """A multipart upload in flight: completed by whichever task stores its last part."""

    item: UploadItem
    upload_id: str
    etags: list[Any]
    remaining: int
    completed: bool = False


class Uploader(_Transfer):
    def __init__(self, client: Any, bucket: str, **kw: Any) -> None:
        super().__init__(client, bucket, **kw)
        # Test hook: raise after this many parts (simulates a crash mid-upload).
        self.fail_after_parts: int | None = None
        self._parts_done = 0
        self._lock = threading.Lock()

    def _advance(self, n: int) -> None:
        if self.reporter is not None:
            self.reporter.advance(n)

    def _count_part(self) -> None:
        with self._lock:
            self._parts_done += 1
            if self.fail_after_parts is not None and self._parts_done > self.fail_after_parts:
                raise PreshardError(
                    "injected crash (test hook)", reason="InjectedCrash", permanent=True
                )

    def upload(self, items: list[UploadItem]) -> None:
        """Upload all items in parallel. Raises the first failure (translated).

        Each multipart upload is completed as soon as its own last part is stored, so a
        crash or failure mid-batch leaves every finished file complete (and skipped by
        the next, resumed run); only unfinished uploads are aborted.
        """
        try:
            with ThreadPoolExecutor(
                max_workers=self.concurrency, thread_name_prefix="s3-up"
            ) as pool:
                small = [i for i in items if i.size <= self.part_size]
                large = [i for i in items if i.size > self.part_size]
                tasks: list[Callable[[], Any]] = [partial(self._put_small, i) for i in small]
                uploads: list[_Multipart] = []
                for item in large:
                    ps = part_size_for(item.size, self.part_size)
                    upload_id = with_retries(
                        partial(self._create_multipart, item), f"create multipart {item.key}"
                    )
                    nparts = (item.size + ps - 1) // ps
                    mp = _Multipart(item, upload_id, [None] * nparts, nparts)
                    uploads.append(mp)
                    for n in range(nparts):
                        tasks.append(partial(self._put_part, mp, ps, n))
                try:
                    _run_all(pool, tasks)
                except BaseException:
                    for mp in uploads:
                        if not mp.completed:
                            self._abort(mp.item.key, mp.upload_id)
                    raise
        except PreshardError:
            raise
        except Exception as exc:
            raise translate(exc, self.uri, "upload to") from None

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

    def _create_multipart(self, item: UploadItem) -> str:
        resp = self.client.create_multipart_upload(
            Bucket=self.bucket, Key=item.key, Metadata={"sha256": item.sha256}
        )
        return str(resp["UploadId"])

    def _abort(self, key: str, upload_id: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except Exception as exc:  # best effort; purge also aborts leftovers
            log.debug("abort multipart %s failed: %s", key, exc)

    def _put_small(self, item: UploadItem) -> None:
        data = item.path.read_bytes()
        if len(data) != item.size:
            raise PreshardError(f"{item.path} changed while uploading", reason="LocalFileChanged")
        md5 = base64.b64encode(hashlib.md5(data).digest()).decode()  # noqa: S324 - Content-MD5 is MD5
        self._count_part()
        with_retries(
            lambda: self.client.put_object(
                Bucket=self.bucket,
                Key=item.key,
                Body=data,
                ContentMD5=md5,
                Metadata={"sha256": item.sha256},
            ),
            f"put {item.key}",
        )
        self._advance(item.size)

    def _put_part(self, mp: _Multipart, part_size: int, n: int) -> None:
        item = mp.item
        with open(item.path, "rb") as f:
            f.seek(n * part_size)
            data = f.read(part_size)
        md5 = base64.b64encode(hashlib.md5(data).digest()).decode()  # noqa: S324
        self._count_part()
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
        )
        mp.etags[n] = resp["ETag"]
        self._advance(len(data))
        with self._lock:
            mp.remaining -= 1
            last = mp.remaining == 0
        if last:
            self._complete(mp)


def read_object(client: Any, bucket: str, key: str, attempts: int = PART_ATTEMPTS) -> bytes:
    """A small object's bytes (a manifest). botocore retries the request itself; this also
    retries a connection that breaks while the body is read, which botocore does not."""
    for attempt in range(1, attempts + 1):
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        try:
            data: bytes = body.read()
            return data
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
    raise AssertionError("unreachable")  # pragma: no cover


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


class Downloader(_Transfer):
    def download(self, items: list[DownloadItem]) -> list[DownloadItem]:
        """Download items not already present and verified; returns the ones transferred."""
        todo = [i for i in items if not self._present(i)]
        if self.reporter is not None:
            skipped = sum(i.size for i in items if i not in todo)
            if skipped:
                self.reporter.advance(skipped)
        try:
            with ThreadPoolExecutor(
                max_workers=self.concurrency, thread_name_prefix="s3-down"
            ) as pool:
                _run_all(pool, [partial(self._check_remote, item) for item in todo])
                tasks: list[Callable[[], Any]] = []
                for item in todo:
                    item.dest.parent.mkdir(parents=True, exist_ok=True)
                    tmp = item.dest.with_name(item.dest.name + ".part")
                    with open(tmp, "wb") as f:
                        f.truncate(item.size)
                    ps = part_size_for(item.size, self.part_size)
                    n = max(1, (item.size + ps - 1) // ps)
                    for k in range(n):
                        tasks.append(partial(self._get_range, item, tmp, k * ps, ps))
                _run_all(pool, tasks)
                # Verify and publish each file (hashing in parallel).
                _run_all(pool, [partial(self._finish, item) for item in todo])
        except PreshardError:
            raise
        except Exception as exc:
            raise translate(exc, self.uri, "download from") from None
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

    def _get_range(self, item: DownloadItem, tmp: Path, start: int, length: int) -> None:
        if item.size == 0:
            return
        end = min(start + length, item.size) - 1

        def fetch() -> None:
            body = self.client.get_object(
                Bucket=self.bucket, Key=item.key, Range=f"bytes={start}-{end}"
            )["Body"]
            fd = os.open(tmp, os.O_WRONLY)
            try:
                pos = start
                for chunk in body.iter_chunks(chunk_size=1 * MiB):
                    os.pwrite(fd, chunk, pos)
                    pos += len(chunk)
                    if self.reporter is not None:
                        self.reporter.advance(len(chunk))
                if pos != end + 1:
                    raise botocore.exceptions.IncompleteReadError(
                        actual_bytes=pos - start, expected_bytes=end + 1 - start
                    )
            finally:
                os.close(fd)

        try:
            with_retries(fetch, f"range {start}-{end} of {item.key}")
        except PreshardError:
            raise
        except Exception as exc:  # name the object, not only the prefix
            raise translate(exc, f"s3://{self.bucket}/{item.key}", "download") from None

    def _finish(self, item: DownloadItem) -> None:
        tmp = item.dest.with_name(item.dest.name + ".part")
        if item.sha256 is not None:
            got = sha256_file(tmp)
            if got != item.sha256:
                tmp.unlink(missing_ok=True)
                raise IntegrityError(
                    f"{item.key}: sha256 mismatch (expected {item.sha256}, got {got}); the object in "
                    f"{self.uri} is corrupted or was changed after publishing"
                )
        os.replace(tmp, item.dest)
