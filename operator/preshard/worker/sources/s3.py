"""``s3://`` sources: headers and tensors by ranged GETs, never a whole weight file.

The client, its retries (botocore's standard mode, ``AWS_MAX_ATTEMPTS``) and the
credentials are ``preshard.worker.store.s3``'s, with the source's own settings
(``s3.source_settings``: ``PRESHARD_SOURCE_*`` when set, else the output's), exactly as
``storage.fetch_source`` uses them. Listing is paginated and top-level only; object names
are checked as the download checks them.

* headers: one ranged GET of the first 64 KiB of each weight file (the 8-byte length and,
  for almost every file, the whole header), a second one for the rest of a longer header;
* a tensor: ranged GETs of its bytes into one buffer, in pieces of ``PIECE`` bytes read
  concurrently (``concurrency``) for a large tensor; a body cut short is read again
  (botocore retries a request, not a body that breaks while it is read);
* ``prepare``: the non-weight top-level files (config, tokenizer, ...) into the work dir.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import botocore.exceptions

from preshard.core.contract import OTHER_WEIGHT_SUFFIXES, SAFETENSORS_SUFFIX
from preshard.core.errors import InvalidSource, PreshardError
from preshard.core.uris import StorageURI
from preshard.worker.sources import TensorInfo, register_source
from preshard.worker.sources.header import (
    INDEX_NAME,
    header_length,
    index_tensors,
    parse_header,
    to_tensor,
    weight_files,
)
from preshard.worker.store import s3

log = logging.getLogger(__name__)

FIRST_READ = 64 * 2**10
PIECE = 32 * 2**20
META_DIR = "source-meta"
MAX_META_FILE = 512 * 2**20  # a tokenizer is tens of MB; anything near this is no model file
_BODY_ATTEMPTS = 4
_CHUNK = 2**20
_BODY_ERRORS = (
    botocore.exceptions.ResponseStreamingError,
    botocore.exceptions.IncompleteReadError,
    botocore.exceptions.ReadTimeoutError,
    ConnectionError,
)


class S3Source:
    def __init__(
        self, u: StorageURI, uri: str, client: Any, concurrency: int, pin: str | None = None
    ) -> None:
        self.uri, self._u, self._client = uri, u, client
        # With a pin (the preflight's digest over names, sizes and ETags), every object is
        # read at exactly the ETag that was pinned: If-Match, and the answer's ETag checked
        # too (some servers ignore If-Match), so a swapped object is SourceChanged.
        self._pin = pin
        self._etags: dict[str, str] = {}
        self._concurrency = max(1, concurrency)
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        from preshard.worker.store import source_files as storage

        files = storage.list_source_files(client, u, uri)
        if pin is not None:
            entries = s3.with_translation(lambda: storage.s3_entries(client, u), uri)
            storage.check_pin(uri, entries, pin)
            self._etags = {u.key(name): etag for name, _, etag in entries}
        if "config.json" not in files:
            raise InvalidSource(
                f"source {uri} has no config.json: not a Hugging Face-format model directory",
            )
        self._files = files
        index = self._get_small(INDEX_NAME) if INDEX_NAME in files else None
        weights = weight_files(sorted(files), index)
        if not weights:
            raise InvalidSource(f"source {uri} has no *.safetensors weights")
        self._where, self._order = index_tensors(
            uri, ((name, self._header(name, files[name])) for name in weights)
        )

    # -------------------------------------------------------------------------- reading

    def _range(self, key: str, begin: int, end: int, into: memoryview | None = None) -> bytes:
        """Bytes ``begin..end-1`` of ``key`` (into ``into`` when given)."""
        want = end - begin
        for attempt in range(1, _BODY_ATTEMPTS + 1):
            try:
                etag = self._etags.get(key)
                pinned = {"IfMatch": f'"{etag}"'} if etag else {}
                resp = self._client.get_object(
                    Bucket=self._u.bucket, Key=key, Range=f"bytes={begin}-{end - 1}", **pinned
                )
                if self._pin is not None and str(resp.get("ETag", "")).strip('"') != etag:
                    from preshard.worker.store import source_files as storage

                    raise storage.source_changed(self.uri, self._pin)
                body = resp["Body"]
                if into is None:
                    data = body.read()
                    if len(data) != want:
                        raise botocore.exceptions.IncompleteReadError(
                            actual_bytes=len(data), expected_bytes=want
                        )
                    return bytes(data)
                got = 0  # straight into the tensor's buffer, 1 MiB at a time
                while got < want:
                    chunk = body.read(min(_CHUNK, want - got))
                    if not chunk:
                        raise botocore.exceptions.IncompleteReadError(
                            actual_bytes=got, expected_bytes=want
                        )
                    into[got : got + len(chunk)] = chunk
                    got += len(chunk)
                return b""
            except _BODY_ERRORS as exc:
                if attempt == _BODY_ATTEMPTS:
                    raise s3.translate(exc, self.uri, "read the source") from None
                log.info("reading %s again (%s)", key, type(exc).__name__)
            except PreshardError:
                raise
            except Exception as exc:
                raise s3.translate(exc, self.uri, "read the source") from None
        raise AssertionError("unreachable")

    def _get_small(self, name: str) -> bytes:
        return self._range(self._u.key(name), 0, self._files[name]) if self._files[name] else b""

    def _header(self, name: str, size: int) -> list[tuple[TensorInfo, int, int]]:
        key = self._u.key(name)
        head = self._range(key, 0, min(size, 8 + FIRST_READ))
        n = header_length(head[:8], name, size)
        data = head[8 : 8 + n]
        if len(data) < n:
            data += self._range(key, 8 + len(data), 8 + n)
        return parse_header(data, name, size)

    def prepare(self, work_dir: Path) -> Path:
        dest = work_dir / META_DIR
        dest.mkdir(parents=True, exist_ok=True)
        for name, size in sorted(self._files.items()):
            if name.endswith((SAFETENSORS_SUFFIX, *OTHER_WEIGHT_SUFFIXES)):
                continue
            if size > MAX_META_FILE:
                raise InvalidSource(
                    f"source {self.uri}: {name} is {size} bytes, too large for a non-weight file",
                )
            (dest / name).write_bytes(self._get_small(name))
        return dest

    def tensors(self) -> list[TensorInfo]:
        return list(self._order)

    # ``read(name, into=buf)`` reads into a caller's buffer (the writer's reused ones)
    reads_into = True

    def read(self, name: str, into: Any = None) -> Any:
        info, begin, end = self._where[name]
        key = self._u.key(info.file)
        buf = bytearray(end - begin) if into is None else into
        view = memoryview(buf)
        pieces = [(a, min(a + PIECE, len(buf))) for a in range(0, len(buf), PIECE)]
        if len(pieces) <= 1 or self._concurrency == 1:
            for a, b in pieces:
                self._range(key, begin + a, begin + b, view[a:b])
        else:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self._concurrency, "s3-source")
            futures = [
                self._pool.submit(self._range, key, begin + a, begin + b, view[a:b])
                for a, b in pieces
            ]
            for f in futures:
                f.result()
        return to_tensor(buf, info)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


@register_source("s3")
def open_s3(
    u: StorageURI,
    uri: str,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    concurrency: int = 16,
    pin: str | None = None,
    **_: Any,
) -> S3Source:
    settings = s3.source_settings(endpoint_url, region, concurrency)
    return S3Source(u, uri, s3.make_client(settings), settings.concurrency, pin)
