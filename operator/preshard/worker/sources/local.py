"""Local directories and mounted PVCs: headers parsed from the files, tensors read by
offset (``os.pread`` into one buffer per tensor; nothing memory-mapped, nothing copied).

The same checks as ``storage.fetch_source`` (``storage.local_source_dir``): a ``pvc://``
path must stay inside its volume's mount and no file may be a symbolic link out of the
directory; it must be a model directory (``storage.check_model_dir``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from preshard.core.errors import InvalidSource
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


class LocalSource:
    """A model directory on a local or mounted file system."""

    def __init__(self, path: Path, uri: str) -> None:
        self.uri = uri
        self.path = path
        names = sorted(p.name for p in path.iterdir() if p.is_file())
        index = (path / INDEX_NAME).read_bytes() if INDEX_NAME in names else None

        def headers(name: str) -> Any:
            size = (path / name).stat().st_size
            with open(path / name, "rb") as f:
                n = header_length(f.read(8), name, size)
                return parse_header(f.read(n), name, size)

        self._where, self._order = index_tensors(
            uri, ((name, headers(name)) for name in weight_files(names, index))
        )
        self._fds: dict[str, int] = {}

    def prepare(self, work_dir: Path) -> Path:
        return self.path  # read in place, never modified

    def tensors(self) -> list[TensorInfo]:
        return list(self._order)

    # ``read(name, into=buf)`` reads into a caller's buffer (the writer's reused ones)
    reads_into = True

    def read(self, name: str, into: Any = None) -> Any:
        """The tensor's values; with ``into`` (a writable buffer of exactly its bytes),
        read into that buffer instead of a new one (no allocation, no zero-fill)."""
        info, begin, end = self._where[name]
        fd = self._fds.get(info.file)
        if fd is None:
            fd = os.open(self.path / info.file, os.O_RDONLY)
            self._fds[info.file] = fd
        buf = bytearray(end - begin) if into is None else into
        view, done = memoryview(buf), 0
        while done < len(buf):
            n = os.preadv(fd, [view[done:]], begin + done)
            if n <= 0:
                raise InvalidSource(
                    f"source {self.uri}: {info.file} ended inside tensor {name}",
                )
            done += n
        return to_tensor(buf, info)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


@register_source("file", "pvc")
def open_local(u: StorageURI, uri: str, *, pin: str | None = None, **_: Any) -> LocalSource:
    from preshard.worker.store import source_files as storage

    path = storage.local_source_dir(u, uri)  # the one reader of local sources' checks
    storage.check_model_dir(path, uri)
    if pin is not None:  # the content the preflight pinned (sha256 of every file)
        storage.check_pin(uri, storage.local_entries(path), pin)
    return LocalSource(path.resolve(), uri)
