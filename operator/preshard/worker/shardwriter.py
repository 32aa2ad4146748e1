"""The streaming shard writer: each rank's files from the per-rank traces and a source.

Given the per-rank trace documents (what the engine's ``preshard_raw`` loader writes as
``preshard-trace-rank-{rank}.json``, or what ``preshard.worker.planner`` plans without an
engine) and a ``TensorSource``, write every rank's safetensors files **byte-identical**
to vLLM's ``ShardedStateLoader.save_model`` over the same raw state:

* the same tensors (``saved``, in the state dict's order, already de-duplicated by
  vLLM's ``_filter_subtensors``), split into parts exactly as ``save_model`` splits them
  by ``max_size`` (a tensor larger than ``max_size`` at the start gives an empty part 0,
  as vLLM's loop does), named from the same pattern;
* the same safetensors bytes: the header ``safetensors`` itself writes (tensors ordered
  by dtype, largest first in safetensors' dtype order, then by name; compact JSON;
  padded with spaces to a multiple of 8) followed by the data in header order;
* the same values: each saved tensor is built as the model held it after
  ``load_weights``: every ``copy`` write is ``Tensor.copy_`` of the source region into the
  destination region (the same dtype conversion), every ``fill`` is ``fill_``; a tensor
  the loaders never write (vLLM's attention scale buffers) takes the value the model
  initialized it with, from the trace's ``initialized`` map or from vLLM's own defaults
  (``INITIALIZED_DEFAULTS``); anything else not covered is refused, never guessed.

Ranks run in lockstep (tensor i of every rank before tensor i+1): tensor-parallel ranks
read the same source tensors at the same step, so a small byte-bounded cache makes the
source read about once rather than TP times. Each file is written in order (its
header is known before its data: shapes and dtypes are in the trace): each saved tensor
is built into a reused buffer, then a write thread writes it (``pwrite``) and reads it
back from the file, comparing it with what was built (a write that does not land as
built is refused), while a hash thread per rank (two at most) takes its sha256; the
main thread builds the next tensor meanwhile. ``on_file`` is called as soon as a file
is complete (the conversion uploads it and deletes it). Memory: the source cache
(``cache_bytes``, at least what one saved tensor is copied from) plus three buffers of
the largest saved tensor (one being built, two being written and hashed), independent
of the model's size.

The files' layout (names, headers, tensor order) is ``preshard.worker.shardlayout``'s;
building each tensor's values (and the source cache) is ``preshard.worker.shardbuild``'s.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from preshard.core.errors import InternalError, VerificationFailed
from preshard.worker.shardbuild import DEFAULT_CACHE_BYTES, SourceCache, build_tensor, step_bytes
from preshard.worker.shardlayout import PartLayout, RankPlan, Saved, plan_files

if TYPE_CHECKING:
    import torch

    from preshard.worker.sources import TensorSource

log = logging.getLogger("preshard.shardwriter")

_WRITE_CHUNK = 16 * 2**20
_DEPTH = 2  # tensors written, checked and hashed while the next is built


class Buffers:
    """Reused byte buffers (uint8 tensors) for the saved tensors being built and
    written. A fresh large allocation costs a page fault per 4 KiB page: on this kind
    of machine that made building a tensor into new memory 3-4x slower than into
    memory already touched. ``take(n)`` gives the smallest free buffer of at least
    ``n`` bytes, else a new one; at most ``most`` buffers exist at once (a free one that
    is too small is dropped before a new one is made), so the memory is at most
    ``most`` x the largest tensor, as without reuse."""

    def __init__(self, most: int) -> None:
        self._free: list[torch.Tensor] = []  # sorted by size
        self._count = 0
        self._most = most
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        import torch

        with self._lock:
            for i, b in enumerate(self._free):
                if b.numel() >= nbytes:
                    return self._free.pop(i)
            if self._free and self._count >= self._most:
                self._free.pop()  # the largest of those too small
                self._count -= 1
            self._count += 1
        return torch.empty(max(nbytes, 1), dtype=torch.uint8)

    def give(self, buf: torch.Tensor) -> None:
        with self._lock:
            self._free.append(buf)
            self._free.sort(key=lambda b: b.numel())


@dataclass(frozen=True)
class WrittenFile:
    name: str
    path: Path
    size: int
    sha256: str
    rank: int
    # where each tensor's bytes were written: name -> (begin, end) in the file (the
    # file's own header must lead every name to exactly this span)
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)


# ``os.pwrite``, through a name the corrupted-write test can replace
_pwrite = os.pwrite


def _libc_memcmp() -> Any:
    import ctypes

    try:
        fn = ctypes.CDLL(None).memcmp  # a CDLL call releases the GIL
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
    fn.restype = ctypes.c_int
    return fn


_memcmp = _libc_memcmp()


def same_bytes(a: memoryview, b: memoryview) -> bool:
    """``a`` and ``b`` hold the same bytes (memcmp: a memoryview's own ``==`` compares
    element by element, 30x slower)."""
    import numpy as np

    if len(a) != len(b):
        return False
    if _memcmp is None or not len(a):
        return bytes(a) == bytes(b)
    x, y = np.frombuffer(a, dtype=np.uint8), np.frombuffer(b, dtype=np.uint8)
    return int(_memcmp(x.ctypes.data, y.ctypes.data, len(a))) == 0


class _IO:
    """Background threads while the main thread builds the next tensor: one writes each
    buffer and reads it back (the check that the file holds the bytes built), others
    hash (sha256, the slowest step): one hash thread per rank up to two (and the
    cores), each file always on the same one (a file is hashed in order), so the ranks'
    files are hashed in parallel. All of it releases the GIL. At most ``depth``
    buffers in flight; a buffer goes back to ``buffers`` once written, checked and
    hashed."""

    def __init__(self, buffers: Buffers | None = None, depth: int = 2, lanes: int = 1) -> None:
        self._write = ThreadPoolExecutor(1, thread_name_prefix="shard-write")
        self._hashers = [
            ThreadPoolExecutor(1, thread_name_prefix=f"shard-hash-{i}")
            for i in range(max(1, lanes))
        ]
        self._pending: deque[tuple[Future[None], Future[None], tuple[Any, Any]]] = deque()
        self._depth = depth
        self._buffers = buffers
        self._check = threading.local()

    def readback(self, nbytes: int) -> bytearray:
        """The write thread's read-back buffer (one, reused)."""
        buf: bytearray | None = getattr(self._check, "buf", None)
        if buf is None or len(buf) < nbytes:
            buf = self._check.buf = bytearray(max(nbytes, _WRITE_CHUNK))
        return buf

    def submit(
        self,
        write: Callable[[], None],
        digest: Callable[[], None],
        keep: tuple[Any, Any],
        lane: int = 0,
    ) -> None:
        while len(self._pending) >= self._depth:
            self._pop()
        hasher = self._hashers[lane % len(self._hashers)]
        self._pending.append((self._write.submit(write), hasher.submit(digest), keep))

    def _pop(self) -> None:
        w, h, (_, give) = self._pending.popleft()
        try:
            w.result()
        finally:
            h.result()
        self.give(give)

    def give(self, buf: Any) -> None:
        if self._buffers is not None and buf is not None:
            self._buffers.give(buf)

    def drain(self) -> None:
        while self._pending:
            self._pop()

    def close(self) -> None:
        try:
            self.drain()
        finally:
            self._write.shutdown(wait=True)
            for h in self._hashers:
                h.shutdown(wait=True)


class _FileWriter:
    """One rank file: every buffer is written at its offset (``pwrite``), read back and
    compared with what was built (a write that does not land as built, one byte
    differing, is refused: VerificationFailed), and hashed in file order."""

    def __init__(self, path: Path, layout: PartLayout, rank: int, io: _IO) -> None:
        self.path, self.layout, self.rank, self.io = path, layout, rank, io
        self.tmp = path.with_name(path.name + ".partial")
        self._fd: int | None = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self._h = hashlib.sha256()
        self._n = 0
        self.spans: dict[str, tuple[int, int]] = {}
        self._put(memoryview(layout.header))

    def _put(
        self, mv: memoryview, hold: Any = None, give: Any = None, key: str | None = None
    ) -> None:
        """``mv`` next in the file; ``hold`` stays alive until it is out, ``give`` (a
        reused buffer) then goes back to the pool."""
        offset = self._n
        self._n += len(mv)
        if key is not None:
            self.spans[key] = (offset, self._n)
        fd, name = self._fd, self.path.name

        def write() -> None:
            assert fd is not None
            for i in range(0, len(mv), _WRITE_CHUNK):
                chunk = mv[i : i + _WRITE_CHUNK]
                done = 0
                while done < len(chunk):
                    done += _pwrite(fd, chunk[done:], offset + i + done)
                back = memoryview(self.io.readback(len(chunk)))[: len(chunk)]
                got = os.preadv(fd, [back], offset + i)
                if got != len(chunk) or not same_bytes(back, chunk):
                    raise VerificationFailed(
                        f"{name}: the bytes read back at offset {offset + i} are not "
                        f"those written{f' for {key}' if key else ''}",
                    )

        def digest() -> None:
            for i in range(0, len(mv), _WRITE_CHUNK):
                self._h.update(mv[i : i + _WRITE_CHUNK])

        self.io.submit(write, digest, (hold, give), lane=self.rank)

    def put_tensor(self, key: str, t: torch.Tensor, give: Any = None) -> None:
        """``t``'s bytes next in the file; ``give`` (the reused buffer ``t`` was built
        in) goes back to the pool once they are out."""
        import torch

        if t.numel():
            t = t.contiguous()
            self._put(t.view(torch.uint8).numpy().data, t, give, key)
        else:
            self.spans[key] = (self._n, self._n)
            self.io.give(give)

    def finish(self) -> WrittenFile:
        self.io.drain()
        fd, self._fd = self._fd, None
        assert fd is not None
        size = os.fstat(fd).st_size
        os.close(fd)
        if self._n != self.layout.size or size != self.layout.size:
            raise InternalError(
                f"{self.path.name}: wrote {self._n} bytes ({size} on disk), "
                f"expected {self.layout.size}",
            )
        os.replace(self.tmp, self.path)
        return WrittenFile(
            self.path.name, self.path, self._n, self._h.hexdigest(), self.rank, dict(self.spans)
        )

    def abort(self) -> None:
        with contextlib.suppress(BaseException):
            self.io.drain()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.tmp.unlink(missing_ok=True)


def _steps(plan: RankPlan, layouts: list[PartLayout]) -> Iterator[tuple[int, Saved | None]]:
    """(part index, tensor) in file order; (i, None) closes part i."""
    for i, layout in enumerate(layouts):
        for t in layout.tensors:
            yield i, t
        yield i, None


@dataclass
class WriteReport:
    files: list[WrittenFile] = field(default_factory=list)
    source_reads: int = 0
    source_bytes_read: int = 0
    bytes_written: int = 0


def write_shards(
    traces: list[dict[str, Any]],
    source: TensorSource,
    out_dir: Path,
    *,
    pattern: str | None = None,
    max_size: int | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    on_file: Callable[[WrittenFile], None] | None = None,
    on_bytes: Callable[[int], None] | None = None,
    builder: Callable[[RankPlan, Saved, SourceCache], torch.Tensor] | None = None,
) -> WriteReport:
    """Write every rank's files into ``out_dir``; ``on_file`` gets each file as soon as
    it is complete (in the order files complete), ``on_bytes`` the bytes written;
    ``builder`` builds each saved tensor (default ``build_tensor``; the pre-quantized FP8
    files: ``fp8shards.Fp8Builder``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ranks = plan_files(traces, pattern=pattern, max_size=max_size)
    cache = SourceCache(
        source, max(cache_bytes, step_bytes(ranks, source)), recycle=builder is None
    )
    report = WriteReport()
    open_files: dict[int, _FileWriter] = {}
    # the default builder builds into reused buffers: one being built, ``depth`` out
    # two hash threads at most: as many buffers in flight as hash threads, so the memory
    # stays (depth + 1) x the largest saved tensor, the 3 x that core.estimate counts
    lanes = min(len(ranks), os.cpu_count() or 1, _DEPTH)
    depth = _DEPTH
    buffers = Buffers(most=depth + 1) if builder is None else None
    io = _IO(buffers, depth=depth, lanes=lanes)
    iters = [(plan, layouts, _steps(plan, layouts)) for plan, layouts in ranks]
    try:
        while iters:
            alive = []
            for plan, layouts, it in iters:
                step = next(it, None)
                if step is None:
                    continue
                alive.append((plan, layouts, it))
                part, saved = step
                fw = open_files.get(plan.rank)
                if fw is None:
                    fw = _FileWriter(out_dir / layouts[part].name, layouts[part], plan.rank, io)
                    open_files[plan.rank] = fw
                if saved is None:
                    done = fw.finish()  # (on failure it is aborted below with the others)
                    del open_files[plan.rank]
                    report.files.append(done)
                    report.bytes_written += done.size
                    if on_file is not None:
                        on_file(done)
                    continue
                if buffers is None:
                    assert builder is not None
                    t, buf = builder(plan, saved, cache), None
                else:
                    buf = buffers.take(saved.nbytes)
                    t = build_tensor(plan, saved, cache, out=buf)
                fw.put_tensor(saved.key, t, buf)
                if on_bytes is not None:
                    on_bytes(saved.nbytes)
                del t
            iters = alive
    except BaseException:
        for fw in open_files.values():
            fw.abort()
        raise
    finally:
        with contextlib.suppress(BaseException):  # each file's finish drained its writes
            io.close()
    report.source_reads, report.source_bytes_read = cache.reads, cache.bytes_read
    log.info(
        "wrote %d files (%d bytes) for %d ranks; read %d source tensors (%d bytes)",
        len(report.files),
        report.bytes_written,
        len(ranks),
        cache.reads,
        cache.bytes_read,
    )
    return report
