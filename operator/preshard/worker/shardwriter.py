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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import string
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from preshard.core.errors import (
    InternalError,
    InvalidSpec,
    PlanningFailed,
    UnsupportedDtype,
    UnsupportedModel,
    VerificationFailed,
)
from preshard.core.sharding import numel

if TYPE_CHECKING:
    import torch

    from preshard.worker.sources import TensorSource

log = logging.getLogger("preshard.shardwriter")

# safetensors' dtype order (its Rust ``Dtype`` enum); the header lists the tensors by
# this order, largest first, then by name.
ST_DTYPE_ORDER = (
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0",
    "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64",
)  # fmt: skip
_TORCH_TO_ST = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "float8_e5m2": "F8_E5M2",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e8m0fnu": "F8_E8M0",
    "int16": "I16",
    "uint16": "U16",
    "float16": "F16",
    "bfloat16": "BF16",
    "int32": "I32",
    "uint32": "U32",
    "float32": "F32",
    "float64": "F64",
    "int64": "I64",
    "uint64": "U64",
}
ST_TO_TORCH = {v: k for k, v in _TORCH_TO_ST.items()}
# Tensors vLLM's models create with a value and no weight loader writes (attention
# scale buffers: vllm/model_executor/layers/attention/attention.py registers them as
# torch.tensor(1.0, dtype=float32)). Matched on the last component of the key.
INITIALIZED_DEFAULTS = {"_k_scale": 1.0, "_v_scale": 1.0, "_q_scale": 1.0, "_prob_scale": 1.0}
# The source cache: at least what one step needs (every source tensor one saved tensor
# is copied from: the tensor-parallel ranks use them at the same step), and this much
# more for neighbours (a source shared by consecutive saved tensors).
DEFAULT_CACHE_BYTES = 64 * 2**20
_WRITE_CHUNK = 16 * 2**20
_DEPTH = 2  # tensors written, checked and hashed while the next is built


def st_dtype(torch_name: str) -> str:
    try:
        return _TORCH_TO_ST[torch_name.removeprefix("torch.")]
    except KeyError:
        raise UnsupportedDtype(
            f"dtype {torch_name} has no safetensors equivalent",
        ) from None


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    dt = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise UnsupportedDtype(f"unknown dtype {name}")
    return dt


# --------------------------------------------------------------------- file layout (pure)


@dataclass(frozen=True)
class Saved:
    key: str
    shape: tuple[int, ...]
    dtype: str  # torch name, as the trace records it

    @property
    def nbytes(self) -> int:
        from preshard.worker.sources import DTYPE_SIZES

        return numel(self.shape) * DTYPE_SIZES[st_dtype(self.dtype)]


@dataclass(frozen=True)
class PartLayout:
    """One rank file: its name, its header bytes and its tensors in data order."""

    name: str
    header: bytes  # the 8-byte length, the JSON and its padding
    tensors: tuple[Saved, ...]

    @property
    def size(self) -> int:
        return len(self.header) + sum(t.nbytes for t in self.tensors)


def split_parts(saved: list[Saved], max_size: int | None) -> list[list[Saved]]:
    """``ShardedStateLoader.save_model``'s split, including its empty first part when
    the first tensor alone exceeds ``max_size``."""
    parts: list[list[Saved]] = []
    part: list[Saved] = []
    total = 0
    for t in saved:
        if max_size is not None and total + t.nbytes > max_size:
            parts.append(part)
            part, total = [], 0
        part.append(t)
        total += t.nbytes
    if part:
        parts.append(part)
    return parts


def header_bytes(tensors: list[Saved]) -> tuple[bytes, tuple[Saved, ...]]:
    """The safetensors header ``safetensors.torch.save_file`` writes for these tensors
    (no metadata) and the tensors in the order their data follows it."""
    order = sorted(tensors, key=lambda t: (-ST_DTYPE_ORDER.index(st_dtype(t.dtype)), t.key))
    entries: dict[str, Any] = {}
    offset = 0
    for t in order:
        end = offset + t.nbytes
        entries[t.key] = {
            "dtype": st_dtype(t.dtype),
            "shape": list(t.shape),
            "data_offsets": [offset, end],
        }
        offset = end
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, tuple(order)


def render_name(
    pattern: str | None, *, tp_rank: int, pp_rank: int, tp_size: int, pp_size: int, part: int
) -> str:
    """``ShardedStateLoader._render_default_pattern`` for one rank."""
    from preshard.core.contract import shard_pattern

    pattern = pattern or shard_pattern(pp_size)
    fields = {f for _, f, _, _ in string.Formatter().parse(pattern) if f is not None}
    unsupported = fields - {"pp_rank", "tp_rank", "rank", "part"}
    has_tp = "tp_rank" in fields or "rank" in fields
    if (
        unsupported
        or (pp_size > 1 and "pp_rank" not in fields)
        or (pp_size == 1 and "pp_rank" in fields)
        or (tp_size > 1 and not has_tp)
    ):
        raise InvalidSpec(
            f"file name pattern {pattern!r} does not fit TP {tp_size} x PP {pp_size}",
        )
    if pp_size > 1:
        return pattern.format(pp_rank=pp_rank, tp_rank=tp_rank, rank=tp_rank, part=part)
    return pattern.format(tp_rank=tp_rank, rank=tp_rank, part=part)


@dataclass
class RankPlan:
    """One rank's trace, parsed: what its files hold and how each tensor is written."""

    rank: int
    tp_rank: int
    pp_rank: int
    tp_size: int
    pp_size: int
    saved: list[Saved]
    writes: dict[str, list[dict[str, Any]]]
    initialized: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_trace(cls, trace: dict[str, Any]) -> RankPlan:
        try:
            return cls(
                rank=int(trace["rank"]),
                tp_rank=int(trace["tpRank"]),
                pp_rank=int(trace["ppRank"]),
                tp_size=int(trace["tensorParallelSize"]),
                pp_size=int(trace["pipelineParallelSize"]),
                saved=[
                    Saved(k, tuple(int(n) for n in v["shape"]), str(v["dtype"]))
                    for k, v in trace["saved"].items()
                ],
                writes=dict(trace.get("writes") or {}),
                initialized=dict(trace.get("initialized") or {}),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise PlanningFailed(
                f"malformed rank trace: {type(exc).__name__}: {exc}",
            ) from None

    def layout(self, pattern: str | None, max_size: int | None) -> list[PartLayout]:
        out = []
        for i, part in enumerate(split_parts(self.saved, max_size)):
            header, order = header_bytes(part)
            name = render_name(
                pattern,
                tp_rank=self.tp_rank,
                pp_rank=self.pp_rank,
                tp_size=self.tp_size,
                pp_size=self.pp_size,
                part=i,
            )
            out.append(PartLayout(name, header, order))
        return out


# ---------------------------------------------------------------------------- building


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


class SourceCache:
    """Source tensors (flattened) kept while ranks in lockstep still need them, bounded by
    bytes (the tensor being used always stays). With ``recycle`` (the writer's default
    builder, which keeps no reference to a source tensor past the saved tensor it
    builds) and a source that reads into a caller's buffer (``reads_into``), a tensor
    is read into the buffer of an evicted one of the same size (no new allocation, no
    page faults); the buffers kept count in the limit."""

    def __init__(
        self, source: TensorSource, limit: int = DEFAULT_CACHE_BYTES, *, recycle: bool = False
    ) -> None:
        self.source = source
        self.limit = limit
        self._items: OrderedDict[str, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()
        self._spare: list[torch.Tensor] = []  # buffers of evicted tensors
        self._bytes = 0  # cached tensors (their buffers) and spare buffers
        self.reads = 0
        self.bytes_read = 0
        self._recycle = recycle and bool(getattr(source, "reads_into", False))
        self._infos: dict[str, Any] = {}

    def get(self, name: str) -> torch.Tensor:
        item = self._items.get(name)
        if item is not None:
            self._items.move_to_end(name)
            return item[0]
        base = None
        if self._recycle:
            if not self._infos:
                self._infos = {i.name: i for i in self.source.tensors()}
            info = self._infos.get(name)
            if info is not None and info.nbytes:
                base = self._buffer(info.nbytes)
                view = base[: info.nbytes].numpy().data
                t = self.source.read(name, into=view).reshape(-1)  # type: ignore[call-arg]
        if base is None:
            t = self.source.read(name).reshape(-1)
        size = t.numel() * t.element_size()
        self.reads += 1
        self.bytes_read += size
        self._items[name] = (t, base)
        self._bytes += size if base is None else base.numel()
        while self._bytes > self.limit and len(self._items) > 1:
            self._evict()
        while self._bytes > self.limit and self._spare:
            self._bytes -= self._spare.pop().numel()
        return t

    def _evict(self) -> None:
        _, (old, old_base) = self._items.popitem(last=False)
        if old_base is None:
            self._bytes -= old.numel() * old.element_size()
        else:
            self._spare.append(old_base)

    def _buffer(self, nbytes: int) -> torch.Tensor:
        """A buffer of exactly ``nbytes`` (a model's layers repeat their shapes, so an
        evicted tensor's buffer fits a later one): a spare of that size, else room is
        made (spares that do not fit dropped, then the least recently used tensors
        evicted) while the cache and this read exceed the limit, and a new one made."""
        import torch

        while True:
            for i, b in enumerate(self._spare):
                if b.numel() == nbytes:
                    self._bytes -= nbytes
                    return self._spare.pop(i)
            if self._bytes + nbytes <= self.limit:
                break
            if self._spare:
                self._bytes -= self._spare.pop(0).numel()
            elif self._items:
                self._evict()
            else:
                break
        return torch.empty(nbytes, dtype=torch.uint8)


def build_tensor(
    plan: RankPlan, saved: Saved, cache: SourceCache, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The saved tensor's values as the model held them after ``load_weights`` (flat);
    built in ``out`` (a uint8 buffer of at least its bytes) when given."""
    import torch

    dtype = _torch_dtype(saved.dtype)
    size = numel(saved.shape)
    # (uninitialized: every element is written below, or the tensor is refused)
    if out is not None and size:
        flat = out[: saved.nbytes].view(dtype)
    else:
        flat = torch.empty(size, dtype=dtype)
    writes = plan.writes.get(saved.key) or []
    if not writes:
        value = plan.initialized.get(saved.key)
        if value is None:
            value = INITIALIZED_DEFAULTS.get(saved.key.rpartition(".")[2])
        if value is None:
            raise UnsupportedModel(
                f"rank {plan.rank}: {saved.key} is written by no weight loader and its "
                "initial value is unknown; it cannot be produced without an engine "
                "(--engine vllm)",
            )
        flat.fill_(value)
        return flat
    runs: list[tuple[int, int]] | None = []
    for w in writes:
        d_off, d_strides, shape = w["dst"]
        dst = torch.as_strided(flat, shape, d_strides, d_off)
        if w["op"] == "copy":
            src_flat = cache.get(w["source"])
            s_off, s_strides, s_shape = w["src"]
            dst.copy_(torch.as_strided(src_flat, s_shape, s_strides, s_off))
        elif w["op"] == "fill":
            dst.fill_(w["value"])
        elif w["op"] == "derived" and "values" in w:
            dst.copy_(torch.tensor(w["values"], dtype=dtype).reshape(shape))
        else:
            raise UnsupportedModel(
                f"rank {plan.rank}: vLLM's weight loader computes {saved.key} from "
                f"{', '.join(w.get('sources') or ()) or 'the checkpoint'} (not a copy): it "
                "cannot be streamed without an engine (--engine vllm)",
            )
        run = _dense_run(d_off, d_strides, shape)
        if run is None or runs is None:
            runs = None
        else:
            runs.append(run)
    missing = _uncovered(plan, saved, size, runs)
    if missing:
        raise UnsupportedModel(
            f"rank {plan.rank}: {missing} of {size} elements of {saved.key} are "
            "written by no weight loader; they cannot be produced without an engine",
        )
    return flat


def _dense_run(offset: int, strides: list[int], shape: list[int]) -> tuple[int, int] | None:
    """``(start, end)`` when the region is one consecutive run of elements, else None."""
    n, expect = 1, 1
    for size, stride in zip(reversed(shape), reversed(strides), strict=True):
        if size > 1 and stride != expect:
            return None
        expect *= size
        n *= size
    return (int(offset), int(offset) + n)


def _uncovered(plan: RankPlan, saved: Saved, size: int, runs: list[tuple[int, int]] | None) -> int:
    """How many elements no write covers: from the runs when every write is one run of
    elements (the usual case: rows, fused row blocks, whole tensors), else from a mask."""
    if runs is not None:
        return _uncovered_runs(runs, size)
    return _uncovered_mask(plan.writes.get(saved.key) or (), size)


def uncovered(writes: list[dict[str, Any]], size: int) -> int:
    """How many of a tensor's ``size`` elements none of ``writes`` (trace writes, their
    ``dst`` regions) covers; the planner's completeness check and the writer's. From
    the regions' runs when each is one consecutive run (no mask), else from a mask."""
    runs = []
    for w in writes:
        run = _dense_run(*w["dst"])
        if run is None:
            return _uncovered_mask(writes, size)
        runs.append(run)
    return _uncovered_runs(runs, size)


def _uncovered_runs(runs: list[tuple[int, int]], size: int) -> int:
    covered, reach = 0, 0
    for a, b in sorted(runs):
        a, b = max(a, reach, 0), min(b, size)
        if b > a:
            covered += b - a
            reach = b
    return size - covered


def _uncovered_mask(writes: Any, size: int) -> int:
    import torch

    mask = torch.zeros(size, dtype=torch.bool)
    for w in writes:
        d_off, d_strides, shape = w["dst"]
        torch.as_strided(mask, shape, d_strides, d_off).fill_(True)
    return int((~mask).sum())


# ----------------------------------------------------------------------------- writing


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


def step_bytes(ranks: list[tuple[RankPlan, list[PartLayout]]], source: TensorSource) -> int:
    """The most source bytes one saved tensor is copied from (what the cache must hold
    for the ranks of one step to share their reads)."""
    sizes = {t.name: t.nbytes for t in source.tensors()}
    most = 0
    for plan, _ in ranks:
        for saved in plan.saved:
            names = {w["source"] for w in plan.writes.get(saved.key) or () if w.get("op") == "copy"}
            most = max(most, sum(sizes.get(n, 0) for n in names))
    return most


def plan_files(
    traces: list[dict[str, Any]], *, pattern: str | None = None, max_size: int | None = None
) -> list[tuple[RankPlan, list[PartLayout]]]:
    """Every rank's plan and file layouts (names, headers, sizes), before any data."""
    plans = sorted((RankPlan.from_trace(t) for t in traces), key=lambda p: p.rank)
    return [(p, p.layout(pattern, max_size)) for p in plans]


def total_bytes(files: list[tuple[RankPlan, list[PartLayout]]]) -> int:
    return sum(layout.size for _, layouts in files for layout in layouts)


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


def load_traces(directory: Path) -> list[dict[str, Any]]:
    """The ``preshard-trace-rank-*.json`` documents in ``directory``."""
    out = []
    for p in sorted(directory.glob("preshard-trace-rank-*.json")):
        out.append(json.loads(p.read_text()))
    return out
