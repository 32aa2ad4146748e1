"""Each saved tensor's values, built from the rank's trace writes and the source.

Every saved tensor is built as the model held it after ``load_weights``: every ``copy``
write is ``Tensor.copy_`` of the source region into the destination region (the same
dtype conversion), every ``fill`` is ``fill_``; a tensor the loaders never write (vLLM's
attention scale buffers) takes the value the model initialized it with, from the trace's
``initialized`` map or from vLLM's own defaults (``INITIALIZED_DEFAULTS``); anything
else not covered is refused, never guessed (``uncovered`` counts what no write covers,
for the writer and the planner's completeness check alike).

Tensor-parallel ranks read the same source tensors at the same step, so the
``SourceCache`` (byte-bounded, at least what one step needs: ``step_bytes``) makes the
source read about once rather than TP times.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from preshard.core.errors import UnsupportedDtype, UnsupportedModel
from preshard.core.sharding import numel
from preshard.worker.shardlayout import PartLayout, RankPlan, Saved

if TYPE_CHECKING:
    import torch

    from preshard.worker.sources import TensorSource

# Tensors vLLM's models create with a value and no weight loader writes (attention
# scale buffers: vllm/model_executor/layers/attention/attention.py registers them as
# torch.tensor(1.0, dtype=float32)). Matched on the last component of the key.
INITIALIZED_DEFAULTS = {"_k_scale": 1.0, "_v_scale": 1.0, "_q_scale": 1.0, "_prob_scale": 1.0}
# The source cache: at least what one step needs (every source tensor one saved tensor
# is copied from: the tensor-parallel ranks use them at the same step), and this much
# more for neighbours (a source shared by consecutive saved tensors).
DEFAULT_CACHE_BYTES = 64 * 2**20


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    dt = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise UnsupportedDtype(f"unknown dtype {name}")
    return dt


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
