"""Trace what vLLM's weight loaders write into each parameter (torch only, no vLLM).

The sharding metadata of a raw checkpoint is not written from a table of architectures:
it is recorded from the loaders' own calls. While a model's ``load_weights`` runs, a
``TorchFunctionMode`` sees every tensor operation in Python. Each write into a parameter
(``copy_``, ``fill_``, ``zero_``, ``__setitem__``) is resolved to

* the **destination**: the parameter whose storage the written view belongs to, as a
  strided region of that parameter (element offset, strides and shape); and
* the **source**: the checkpoint tensor whose storage the copied view belongs to, as a
  strided region of that tensor (or a constant, for fills).

Both regions are plain ``torch.as_strided`` arguments over the flattened tensors, so
any view a loader makes (``narrow``, ``chunk``, ``select``, ``t()``, ``view``, ``expand``)
is represented exactly, fused parameters (qkv, gate_up, w13) become several writes from
several checkpoint tensors, and vocabulary padding appears as a fill. A verifier
replays each write from the rank file and the source checkpoint and compares the values
bit for bit (``preshard.worker.verify.against``).

A write whose source is not a view of a checkpoint tensor (the loader computed it, e.g.
dequantized or permuted with a copy) is recorded as ``derived`` with the checkpoint
tensors it was computed from when they can be told, so a verifier can say what it could
not check instead of passing it silently.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

# Ops that return a new tensor holding the same values as their (single) input, in
# the input's logical order: a tensor made by one of these from a checkpoint view is
# still that view's values (``to`` may change the dtype: the verifier converts the
# source the same way before comparing).
_VALUE_PRESERVING = {
    "contiguous",
    "clone",
    "to",
    "float",
    "half",
    "bfloat16",
    "double",
    "type",
    "cpu",
    "cuda",
    "reshape",
    "flatten",
}
_FILL_OPS = {"fill_", "zero_"}


@dataclass
class Region:
    """``torch.as_strided(flat, shape, strides, offset)`` over a contiguous tensor."""

    offset: int
    strides: tuple[int, ...]
    shape: tuple[int, ...]

    def to_json(self) -> list[Any]:
        return [self.offset, list(self.strides), list(self.shape)]


@dataclass
class _SourceRef:
    name: str
    # the source tensor's element offset into its storage (the region's origin)
    base_offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    itemsize: int
    # for a value-preserving copy of a checkpoint view: that view, in checkpoint
    # coordinates (element i of this tensor is element i of ``via``)
    via: Region | None = None


@dataclass
class Write:
    op: str  # "copy" | "fill" | "derived"
    dst: Region
    source: str | None = None
    src: Region | None = None
    value: float | int | bool | None = None
    sources: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"op": self.op, "dst": self.dst.to_json()}
        if self.op == "copy":
            assert self.src is not None
            out["source"] = self.source
            out["src"] = self.src.to_json()
        elif self.op == "fill":
            out["value"] = self.value
        else:
            out["sources"] = list(self.sources)
        return out


@dataclass
class _Param:
    name: str
    tensor_offset: int  # element offset of the parameter in its storage
    shape: tuple[int, ...]
    numel: int
    itemsize: int


@dataclass
class Trace:
    """What one rank's loaders wrote."""

    writes: dict[str, list[Write]] = field(default_factory=dict)
    # checkpoint tensors the model was given: name -> (shape, dtype)
    sources: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)
    read: set[str] = field(default_factory=set)
    aliases: dict[str, str] = field(default_factory=dict)  # param -> source it IS

    def to_json(self) -> dict[str, Any]:
        return {
            "writes": {k: [w.to_json() for w in v] for k, v in sorted(self.writes.items())},
            "sources": {k: {"shape": list(s), "dtype": d} for k, (s, d) in self.sources.items()},
            "skippedSources": sorted(set(self.sources) - self.read),
            "aliases": dict(sorted(self.aliases.items())),
        }


def _ints(values: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return storage_key(t)


def storage_key(t: torch.Tensor) -> tuple[str, int]:
    """Which storage ``t`` is a view of: its device and data pointer; on the meta device
    (the engine-free planner), where every data pointer is 0, the storage's own identity
    (the address of its ``StorageImpl``, shared by every view and Parameter of it)."""
    storage = t.untyped_storage()
    if t.device.type == "meta":
        return ("meta", int(storage._cdata))
    return (str(t.device), storage.data_ptr())


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(strides))


class LoadTracer(TorchFunctionMode):
    """Record the writes into ``params`` (name -> tensor, e.g. ``model.state_dict()``)
    made while the tracer is active. Register each checkpoint tensor with
    :meth:`source` as the weights iterator yields it."""

    def __init__(self, params: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.trace = Trace()
        self._params: dict[tuple[str, int], list[_Param]] = {}
        for name, t in params.items():
            if not isinstance(t, torch.Tensor) or t.numel() == 0:
                continue
            if not t.is_contiguous():
                continue  # vLLM parameters are contiguous; never guess for others
            self._params.setdefault(_storage_key(t), []).append(
                _Param(name, int(t.storage_offset()), _ints(t.shape), t.numel(), t.element_size())
            )
        self._sources: dict[tuple[str, int], _SourceRef] = {}
        # tensors computed (not viewed) from checkpoint tensors: storage -> source names
        self._derived: dict[tuple[str, int], tuple[str, ...]] = {}

    # ------------------------------------------------------------------ registration

    def source(self, name: str, tensor: torch.Tensor) -> None:
        """A checkpoint tensor the weights iterator is about to hand to the model."""
        if not isinstance(tensor, torch.Tensor):
            return
        self.trace.sources[name] = (_ints(tensor.shape), str(tensor.dtype).removeprefix("torch."))
        if tensor.numel() == 0:
            return
        key = _storage_key(tensor)
        self._sources[key] = _SourceRef(
            name,
            int(tensor.storage_offset()),
            _ints(tensor.shape),
            _ints(tensor.stride()),
            tensor.element_size(),
        )
        self._derived.pop(key, None)
        # Forget the entry when the tensor (and every view, which keeps it alive) is gone,
        # so that memory reused by a later tensor is never taken for this source.
        with contextlib.suppress(TypeError):
            weakref.finalize(tensor, self._forget, key, name)

    def _forget(self, key: tuple[str, int], name: str) -> None:
        ref = self._sources.get(key)
        if ref is not None and ref.name == name:
            del self._sources[key]

    # ---------------------------------------------------------------------- resolving

    def _dst(self, t: torch.Tensor) -> list[tuple[_Param, Region]]:
        out = []
        for p in self._params.get(_storage_key(t), ()):
            offset = int(t.storage_offset()) - p.tensor_offset
            region = Region(offset, _ints(t.stride()), _ints(t.shape))
            if _inside(region, p.numel):
                out.append((p, region))
        return out

    def _src(self, t: torch.Tensor) -> tuple[_SourceRef, Region] | None:
        ref = self._sources.get(_storage_key(t))
        if ref is None or t.element_size() != ref.itemsize:
            return None
        if ref.strides != _contiguous_strides(ref.shape):
            return None  # a non-contiguous checkpoint tensor: regions would be ambiguous
        region = Region(
            int(t.storage_offset()) - ref.base_offset, _ints(t.stride()), _ints(t.shape)
        )
        numel = 1
        for n in ref.shape:
            numel *= n
        if not _inside(region, numel):
            return None
        if ref.via is not None:
            composed = compose(region, ref.via)
            return (ref, composed) if composed is not None else None
        return ref, region

    def _origins(self, t: torch.Tensor) -> tuple[str, ...]:
        key = _storage_key(t)
        if key in self._sources:
            return (self._sources[key].name,)
        return self._derived.get(key, ())

    # ------------------------------------------------------------------------ recording

    def _record_copy(self, dst: torch.Tensor, src: Any) -> None:
        targets = self._dst(dst)
        if not targets:
            return
        if not isinstance(src, torch.Tensor):
            for p, region in targets:
                self._add(p, Write("fill", region, value=_scalar(src)))
            return
        shape = _ints(dst.shape)
        if _ints(src.shape) != shape:
            with contextlib.suppress(RuntimeError):
                src = src.expand(shape)
        resolved = self._src(src) if _ints(src.shape) == shape else None
        for p, region in targets:
            if resolved is not None:
                ref, sregion = resolved
                self.trace.read.add(ref.name)
                self._add(p, Write("copy", region, source=ref.name, src=sregion))
            elif src.numel() == 1 and not self._origins(src) and src.device.type != "meta":
                self._add(p, Write("fill", region, value=_scalar(src)))
            else:
                origins = self._origins(src)
                self.trace.read.update(origins)
                self._add(p, Write("derived", region, sources=origins))

    def _add(self, p: _Param, w: Write) -> None:
        self.trace.writes.setdefault(p.name, []).append(w)

    def _note_derived(self, func_name: str, args: tuple[Any, ...], result: Any) -> None:
        """A new tensor computed from checkpoint tensors: remember where it came from;
        a value-preserving copy of a checkpoint view becomes a source region itself."""
        if not isinstance(result, torch.Tensor) or result.numel() == 0:
            return
        inputs = [a for a in args if isinstance(a, torch.Tensor)]
        if not inputs:
            return
        rkey = _storage_key(result)
        if any(_storage_key(a) == rkey for a in inputs):
            return  # a view (or in place): the storage already tells
        origins: list[str] = []
        for a in inputs:
            for o in self._origins(a):
                if o not in origins:
                    origins.append(o)
        if not origins:
            return
        if (
            func_name in _VALUE_PRESERVING
            and len(inputs) == 1
            and result.is_contiguous()
            and result.numel() == inputs[0].numel()
        ):
            resolved = self._src(inputs[0])
            if resolved is not None:
                ref, region = resolved
                # Element i of the new tensor is element i of that checkpoint region (in
                # the region's logical order; the shape may differ, e.g. reshape).
                via = Region(region.offset, region.strides, region.shape)
                if _ints(result.shape) != region.shape:
                    via = _reshaped(region, _ints(result.shape)) or via
                    if via.shape != _ints(result.shape):
                        self._derived[rkey] = tuple(origins)
                        return
                self._sources[rkey] = _SourceRef(
                    ref.name,
                    int(result.storage_offset()),
                    _ints(result.shape),
                    _ints(result.stride()),
                    result.element_size(),
                    via=via,
                )
                with contextlib.suppress(TypeError):
                    weakref.finalize(result, self._forget, rkey, ref.name)
                return
        self._derived[rkey] = tuple(origins)

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "copy_" and len(args) >= 2 and isinstance(args[0], torch.Tensor):
            self._record_copy(args[0], args[1])
        elif name in _FILL_OPS and args and isinstance(args[0], torch.Tensor):
            value = args[1] if name == "fill_" and len(args) > 1 else 0
            self._record_copy(args[0], value)
        elif (
            name == "__setitem__"
            and len(args) >= 3
            and isinstance(args[0], torch.Tensor)
            and self._dst(args[0])
        ):
            with contextlib.suppress(Exception):
                self._record_copy(args[0][args[1]], args[2])
        result = func(*args, **kwargs)
        if name not in ("copy_", "__setitem__") and name not in _FILL_OPS:
            with contextlib.suppress(Exception):
                self._note_derived(name, args, result)
        return result

    # ------------------------------------------------------------------------ finishing

    def finish(self, params: dict[str, torch.Tensor]) -> Trace:
        """Close the trace: a parameter that IS a checkpoint tensor (a loader replaced
        ``param.data``) is recorded as a whole copy; writes through a value-preserving
        copy are rewritten to the checkpoint tensor's own region."""
        for name, t in params.items():
            if not isinstance(t, torch.Tensor) or t.numel() == 0:
                continue
            resolved = self._src(t)
            if resolved is not None and name not in self.trace.writes:
                ref, region = resolved
                self.trace.aliases[name] = ref.name
                self.trace.read.add(ref.name)
                self.trace.writes[name] = [
                    Write(
                        "copy",
                        Region(0, _contiguous_strides(_ints(t.shape)), _ints(t.shape)),
                        source=ref.name,
                        src=region,
                    )
                ]
        return self.trace


def _box(region: Region, shape: tuple[int, ...]) -> list[int] | None:
    """Per-dimension start indices when ``region`` is a box (same dimensions, unit steps)
    of a contiguous tensor of ``shape``; None otherwise."""
    if len(region.shape) != len(shape):
        return None
    strides = _contiguous_strides(shape)
    for n, s, full in zip(region.shape, region.strides, strides, strict=True):
        if n > 1 and s != full:
            return None
    starts, rest = [], region.offset
    for n, full, stride in zip(region.shape, shape, strides, strict=True):
        start, rest = divmod(rest, stride)
        if start + n > full:
            return None
        starts.append(start)
    return starts if rest == 0 else None


def compose(outer: Region, via: Region) -> Region | None:
    """``outer`` is a region of a contiguous tensor whose elements are, in order, those of
    the region ``via`` of a checkpoint tensor; the same elements as a region of the
    checkpoint tensor, or None when they do not form one."""
    starts = _box(outer, via.shape)
    if starts is None:
        return None
    offset = via.offset + sum(a * s for a, s in zip(starts, via.strides, strict=True))
    return Region(offset, via.strides, outer.shape)


def _reshaped(region: Region, shape: tuple[int, ...]) -> Region | None:
    """``region`` seen with another shape (as ``reshape`` would), when its elements are
    one consecutive run of storage; None otherwise."""
    dense = _contiguous_strides(region.shape)
    for n, s, c in zip(region.shape, region.strides, dense, strict=True):
        if n > 1 and s != c:
            return None
    return Region(region.offset, _contiguous_strides(shape), shape)


def _inside(region: Region, numel: int) -> bool:
    if any(n == 0 for n in region.shape):
        return True
    if region.offset < 0 or any(s < 0 for s in region.strides):
        return False
    last = region.offset + sum(
        (n - 1) * s for n, s in zip(region.shape, region.strides, strict=True)
    )
    return last < numel


def _scalar(value: Any) -> float | int | bool:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, bool | int | float):
        return value
    return float(value)
