"""A published checkpoint's objects, read whole or by range (the re-shard source's I/O).

A ``RangeReader`` is one checkpoint prefix or directory: :class:`LocalReader` (a local
directory or a mounted PVC: ``pread``, no symlinks or paths outside the root) and
:class:`S3Reader` (GetObject with Range; once an object is hashed, every later range is
pinned to it by its ETag). :func:`reader_for` picks one for a URI, :func:`is_checkpoint`
detects a published checkpoint (it holds a ``preshard-manifest.json``). What the reader
returns is checked by :class:`preshard.worker.sources.checkpoint.CheckpointSource`
against the manifest; a read that cannot be trusted is ``VerificationFailed``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Protocol

from preshard.core.contract import MANIFEST_NAME
from preshard.core.errors import ReshardNotPossible, VerificationFailed
from preshard.core.uris import StorageURI, parse_uri

_HASH_CHUNK = 8 * 2**20


class RangeReader(Protocol):
    """The objects of one checkpoint prefix or directory, read whole or by range."""

    label: str

    def read_all(self, key: str, limit: int) -> bytes | None:
        """The whole object (None: it does not exist); at most ``limit`` bytes."""
        ...

    def sha256(self, key: str) -> tuple[int, str]:
        """(size, sha256 hex) of the object, streamed; pins it for later ranges."""
        ...

    def read_range(self, key: str, start: int, length: int) -> bytes | bytearray: ...

    def close(self) -> None: ...


class LocalReader:
    """A local (or mounted PVC) checkpoint directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.label = str(self.root)
        self._fds: dict[str, int] = {}

    def _path(self, key: str) -> Path:
        p = self.root / key
        if p.is_symlink() or not p.resolve().is_relative_to(self.root.resolve()):
            raise VerificationFailed(f"{key}: not a regular file inside {self.label}")
        return p

    def read_all(self, key: str, limit: int) -> bytes | None:
        p = self._path(key)
        if not p.is_file():
            return None
        with p.open("rb") as fh:
            data = fh.read(limit + 1)
        if len(data) > limit:
            raise VerificationFailed(f"{key} is larger than {limit} bytes")
        return data

    def _fd(self, key: str) -> int:
        if key not in self._fds:
            try:
                self._fds[key] = os.open(self._path(key), os.O_RDONLY)
            except FileNotFoundError:
                raise VerificationFailed(f"{key}: listed in the manifest but missing") from None
        return self._fds[key]

    def sha256(self, key: str) -> tuple[int, str]:
        fd, h, size = self._fd(key), hashlib.sha256(), 0
        while chunk := os.pread(fd, _HASH_CHUNK, size):
            h.update(chunk)
            size += len(chunk)
        return size, h.hexdigest()

    def read_range(self, key: str, start: int, length: int) -> bytearray:
        buf = bytearray(length)  # read in place: no second copy of a large span
        if os.preadv(self._fd(key), [buf], start) != length:
            raise VerificationFailed(f"{key}: short read at byte {start}")
        return buf

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class S3Reader:
    """An ``s3://`` checkpoint prefix: GetObject with Range, pinned by ETag once hashed."""

    def __init__(self, uri: StorageURI, client: Any) -> None:
        self.uri, self.client = uri, client
        self.label = str(uri)
        self._etags: dict[str, str] = {}

    def _get(self, key: str, **kwargs: Any) -> Any:
        from preshard.worker.store import s3

        try:
            return self.client.get_object(Bucket=self.uri.bucket, Key=self.uri.key(key), **kwargs)
        except Exception as exc:
            if s3.is_not_found(exc):
                return None
            if s3.error_code(exc) in ("PreconditionFailed", "412"):
                raise VerificationFailed(
                    f"{key} changed while it was read (its ETag no longer matches)"
                ) from None
            raise s3.translate(exc, self.uri.child(key), "read the checkpoint") from None

    def read_all(self, key: str, limit: int) -> bytes | None:
        resp = self._get(key)
        if resp is None:
            return None
        data = bytes(resp["Body"].read(limit + 1))
        if len(data) > limit:
            raise VerificationFailed(f"{key} is larger than {limit} bytes")
        return data

    def sha256(self, key: str) -> tuple[int, str]:
        resp = self._get(key)
        if resp is None:
            raise VerificationFailed(f"{key}: listed in the manifest but missing")
        h, size = hashlib.sha256(), 0
        while chunk := resp["Body"].read(_HASH_CHUNK):
            h.update(chunk)
            size += len(chunk)
        self._etags[key] = str(resp.get("ETag") or "")
        return size, h.hexdigest()

    def read_range(self, key: str, start: int, length: int) -> bytes:
        etag = self._etags.get(key)
        pin = {"IfMatch": etag} if etag else {}
        resp = self._get(key, Range=f"bytes={start}-{start + length - 1}", **pin)
        # servers that ignore If-Match (rclone) still name the object they answered from
        if resp is not None and etag and resp.get("ETag") and resp["ETag"] != etag:
            raise VerificationFailed(
                f"{key} changed while it was read (its ETag no longer matches)"
            )
        data = bytes(resp["Body"].read()) if resp is not None else b""
        if len(data) != length:
            raise VerificationFailed(f"{key}: a range of {length} bytes returned {len(data)}")
        return data

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------ opening


def reader_for(uri: str, *, endpoint_url: str | None = None, region: str | None = None) -> Any:
    """The reader of a checkpoint URI (local directory, ``pvc://`` mount or ``s3://``)."""
    u = parse_uri(uri, allow_local=True)
    if u.scheme == "file":
        return LocalReader(Path(u.path))
    if u.scheme == "pvc":
        from preshard.worker.store.source_files import pvc_mount_root

        return LocalReader(pvc_mount_root() / u.authority / u.path)
    if u.scheme == "s3":
        from preshard.worker.store import s3

        return S3Reader(u, s3.make_client(s3.source_settings(endpoint_url, region)))
    raise ReshardNotPossible(f"{uri}: a published checkpoint is an s3:// prefix or a directory")


def is_checkpoint(reader: RangeReader) -> bool:
    """Detection: the prefix or directory holds a ``preshard-manifest.json``."""
    from preshard.core.manifest import MAX_MANIFEST_BYTES

    try:
        return reader.read_all(MANIFEST_NAME, MAX_MANIFEST_BYTES) is not None
    except VerificationFailed:
        return False
