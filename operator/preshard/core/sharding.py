"""Per-parameter sharding metadata of a raw checkpoint (``preshard-sharding.json``).

The rank files of a raw checkpoint hold, for every rank, the parameters exactly as
vLLM's weight loaders filled them. This file says, for every saved tensor of every rank,
where each of its elements came from, as recorded from the loaders' own calls
(``preshard.worker.engine.load_trace``), in the spirit of vLLM's RFC on exposing per-parameter
sharding as DTensor metadata (``Shard(dim)``/``Replicate`` placements on the tp/pp mesh):

* ``writes``: the exact record. Each write is ``copy`` (a strided region of one
  checkpoint tensor copied into a strided region of the saved tensor, with dtype
  conversion as ``Tensor.copy_`` does it), ``fill`` (a constant: vocabulary padding) or
  ``derived`` (computed by the loader from the named checkpoint tensors; cannot be
  checked without an engine). A region is ``[offset, strides, shape]``: the arguments
  of ``torch.as_strided`` over the flattened tensor.
* ``placement``: the same copies summarised for people and tools: for each checkpoint
  tensor a saved tensor takes data from, ``Replicate`` or ``Shard(dim)`` with the
  offset and length of the slice, and where that slice sits in the saved tensor
  (fused parameters such as qkv, gate_up or the experts' w13 list several checkpoint
  tensors; KV heads replicated when TP exceeds their number show the same slice on
  several ranks).

Pure logic: building the document from the ranks' traces, parsing it strictly with
bounds, and the geometry helpers the verifier uses.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

SHARDING_FORMAT = "preshard.io/sharding-metadata"
SHARDING_FORMAT_VERSION = 1
# Bounds for a document read from storage (a 400B MoE model at TP=16 stays far below).
MAX_DOCUMENT_BYTES = 512 * 2**20
MAX_DIMS = 8


class ShardingError(ValueError):
    """The sharding metadata is malformed or inconsistent; ``field`` names the part of
    the document that is wrong (``ranks[0].tensors[w].writes[1].dst``)."""

    def __init__(self, message: str, *, field: str = "") -> None:
        super().__init__(message)
        self.field = field


# ----------------------------------------------------------------------------- geometry


def contiguous_strides(shape: tuple[int, ...] | list[int]) -> tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(tuple(shape)):
        strides.append(acc)
        acc *= max(int(n), 1)
    return tuple(reversed(strides))


def numel(shape: tuple[int, ...] | list[int]) -> int:
    out = 1
    for n in shape:
        out *= int(n)
    return out


def as_box(
    offset: int,
    strides: tuple[int, ...] | list[int],
    shape: tuple[int, ...] | list[int],
    base_shape: tuple[int, ...] | list[int],
) -> list[tuple[int, int]] | None:
    """``[(start, length), ...]`` per dimension of ``base_shape`` when the strided region
    is a box of a contiguous tensor of that shape (same dimensions, unit steps), else
    None."""
    shape, strides, base_shape = tuple(shape), tuple(strides), tuple(base_shape)
    if len(shape) != len(base_shape) or len(strides) != len(shape):
        return None
    full = contiguous_strides(base_shape)
    for n, s, f in zip(shape, strides, full, strict=True):
        if n > 1 and s != f:
            return None
    box, rest = [], int(offset)
    for n, b, f in zip(shape, base_shape, full, strict=True):
        start, rest = divmod(rest, f)
        if start + n > b:
            return None
        box.append((start, int(n)))
    return box if rest == 0 else None


def region_last(offset: int, strides: list[int], shape: list[int]) -> int:
    return offset + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))


def unravel(index: int, shape: tuple[int, ...] | list[int]) -> list[int]:
    out = []
    for n in reversed(tuple(shape)):
        index, r = divmod(index, max(int(n), 1))
        out.append(r)
    return list(reversed(out))


# --------------------------------------------------------------------------- placement


def placement_of(
    write: dict[str, Any], dst_shape: list[int], src_shape: list[int]
) -> dict[str, Any] | None:
    """The placement summary of one ``copy`` write, or None when its regions are not
    boxes (the exact ``writes`` still describe it)."""
    src_off, src_strides, src_region = write["src"]
    dst_off, dst_strides, dst_region = write["dst"]
    sbox = as_box(src_off, src_strides, src_region, src_shape)
    dbox = as_box(dst_off, dst_strides, dst_region, dst_shape)
    if sbox is None or dbox is None:
        return None
    sharded = [d for d, (start, n) in enumerate(sbox) if (start, n) != (0, src_shape[d])]
    if not sharded:
        kind = "Replicate"
    elif len(sharded) == 1:
        kind = f"Shard({sharded[0]})"
    else:
        kind = "Shard(" + ",".join(str(d) for d in sharded) + ")"
    out: dict[str, Any] = {"source": write["source"], "placement": kind}
    if sharded:
        out["slices"] = {str(d): [sbox[d][0], sbox[d][1]] for d in sharded}
    out["at"] = [[a, n] for a, n in dbox]
    return out


# ------------------------------------------------------------------------------- build


def build_document(traces: list[dict[str, Any]]) -> dict[str, Any]:
    """The checkpoint's sharding metadata from every rank's trace (as written by the
    ``preshard_raw`` loader); ShardingError when the ranks disagree or one is missing."""
    if not traces:
        raise ShardingError("no rank traces")
    tp = traces[0]["tensorParallelSize"]
    pp = traces[0]["pipelineParallelSize"]
    by_rank = {t["rank"]: t for t in traces}
    if sorted(by_rank) != list(range(tp * pp)) or len(traces) != tp * pp:
        raise ShardingError(f"traces for ranks {sorted(by_rank)} do not match TP {tp} x PP {pp}")
    sources: dict[str, dict[str, Any]] = {}
    read: set[str] = set()
    ranks = []
    for r in range(tp * pp):
        t = by_rank[r]
        if (t["tensorParallelSize"], t["pipelineParallelSize"]) != (tp, pp):
            raise ShardingError(f"rank {r} was saved at another parallel size")
        for name, info in t["sources"].items():
            old = sources.setdefault(name, info)
            if old != info:
                raise ShardingError(f"ranks disagree about the source tensor {name}")
        tensors = {}
        for key, info in sorted(t["saved"].items()):
            writes = t["writes"].get(key, [])
            entry: dict[str, Any] = {"shape": info["shape"], "dtype": info["dtype"]}
            entry["writes"] = writes
            initial = (t.get("initialized") or {}).get(key)
            if not writes and initial is not None:
                # no loader writes it: the value the model created it with (planner)
                entry["initial"] = initial
            placements = []
            for w in writes:
                if w["op"] == "copy":
                    read.add(w["source"])
                    src_shape = sources.get(w["source"], {}).get("shape")
                    p = placement_of(w, info["shape"], src_shape) if src_shape else None
                    placements.append(p or {"source": w["source"], "placement": "Strided"})
                elif w["op"] == "fill":
                    d_off, d_strides, d_shape = w["dst"]
                    dbox = as_box(d_off, d_strides, d_shape, info["shape"])
                    placements.append(
                        {"fill": w["value"], "at": [[a, n] for a, n in dbox] if dbox else None}
                    )
                else:
                    read.update(w.get("sources", []))
                    placements.append({"derived": w.get("sources", [])})
            entry["placement"] = placements
            tensors[key] = entry
        ranks.append({"rank": r, "tpRank": t["tpRank"], "ppRank": t["ppRank"], "tensors": tensors})
    return {
        "format": SHARDING_FORMAT,
        "formatVersion": SHARDING_FORMAT_VERSION,
        "stateFormat": "raw",
        "tensorParallelSize": tp,
        "pipelineParallelSize": pp,
        "sources": dict(sorted(sources.items())),
        "skippedSources": sorted(set(sources) - read),
        "ranks": ranks,
    }


# ------------------------------------------------------------------------------- parse


@dataclass(frozen=True)
class Sharding:
    tensor_parallel_size: int
    pipeline_parallel_size: int
    sources: dict[str, dict[str, Any]]
    skipped_sources: tuple[str, ...]
    # rank -> key -> {"shape", "dtype", "writes", "placement"}
    ranks: dict[int, dict[str, dict[str, Any]]]

    def writes_by_source(self) -> dict[str, list[tuple[int, str, dict[str, Any]]]]:
        """source tensor -> [(rank, saved key, copy write), ...]"""
        out: dict[str, list[tuple[int, str, dict[str, Any]]]] = {}
        for rank, tensors in sorted(self.ranks.items()):
            for key, entry in tensors.items():
                for w in entry["writes"]:
                    if w["op"] == "copy":
                        out.setdefault(w["source"], []).append((rank, key, w))
        return out


# Largest finite value of the float dtypes a fill may target; the integer dtypes' ranges.
_FLOAT_MAX = {
    "float64": 1.7976931348623157e308,
    "float32": 3.4028234663852886e38,
    "bfloat16": 3.3895313892515355e38,
    "float16": 65504.0,
    "float8_e4m3fn": 448.0,
    "float8_e4m3fnuz": 240.0,
    "float8_e5m2": 57344.0,
    "float8_e5m2fnuz": 57344.0,
}
_INT_RANGE = {
    "int8": (-(2**7), 2**7 - 1),
    "uint8": (0, 2**8 - 1),
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint64": (0, 2**64 - 1),
    "bool": (0, 1),
}
_DTYPE_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
MAX_NAME = 1024  # characters of a tensor name
MAX_WRITES = 10_000_000  # writes in one document
MAX_INDEX = 2**62  # any offset, stride or dimension (torch indexes with int64)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _short(text: str) -> str:
    return text if len(text) <= 120 else text[:117] + "..."


def _bad(field: str, problem: str) -> ShardingError:
    return ShardingError(f"{field}: {problem}", field=field)


def _name(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_NAME:
        raise _bad(field, f"a tensor name must be a string of 1 to {MAX_NAME} characters")
    return value


def _dtype(value: Any, field: str) -> str:
    if not isinstance(value, str) or not _DTYPE_RE.fullmatch(value):
        raise _bad(field, "a dtype must be a torch dtype name such as 'bfloat16'")
    return value


def _shape(value: Any, field: str) -> list[int]:
    if (
        not isinstance(value, list)
        or len(value) > MAX_DIMS
        or not all(_is_int(x) and 0 <= x < MAX_INDEX for x in value)
    ):
        raise _bad(field, f"bad shape (at most {MAX_DIMS} non-negative integers)")
    return value


def _region(value: Any, field: str) -> list[Any]:
    """``[offset, strides, shape]`` of plain non-negative integers (no bounds yet)."""
    if (
        not isinstance(value, list)
        or len(value) != 3
        or not _is_int(value[0])
        or not isinstance(value[1], list)
        or not isinstance(value[2], list)
        or len(value[1]) != len(value[2])
        or len(value[2]) > MAX_DIMS
        or not all(_is_int(x) and 0 <= x < MAX_INDEX for x in value[1] + value[2])
        or not 0 <= value[0] < MAX_INDEX
    ):
        raise _bad(
            field,
            f"a region must be [offset, strides, shape] of non-negative integers "
            f"(at most {MAX_DIMS} dimensions)",
        )
    return value


def check_region(
    region: list[Any], size: int, field: str, what: str, *, overlapping: bool = False
) -> None:
    """Every element of a region lies inside a tensor of ``size`` elements: the offset
    and the last element (``offset + sum((n-1)*stride)``) below ``size`` (so is every
    stride of a dimension longer than 1; the stride of a dimension of length 1 is never
    used, and parsing bounds it below 2**62).
    Unless ``overlapping`` (a source region may broadcast one element, stride 0), two
    elements of the region never share a location, so the region holds at most ``size``
    elements: the verifier's buffers stay as small as the tensors themselves."""
    offset, strides, shape = region
    if numel(shape) == 0:
        return
    if offset >= size or region_last(offset, strides, shape) >= size:
        raise _bad(field, f"{what} (tensor of {size} elements)")
    if overlapping:
        return
    extent = 0  # the last element reached by the dimensions taken so far
    for s, n in sorted((s, n) for s, n in zip(strides, shape, strict=True) if n > 1):
        if s <= extent:
            raise _bad(field, "the region writes an element twice (zero or overlapping strides)")
        extent += (n - 1) * s


def check_fill(value: Any, dtype: str, field: str) -> None:
    """A fill value is a number or bool the tensor's dtype can hold exactly or, for a
    float dtype, a finite value within its range."""
    if isinstance(value, bool):
        return
    if _is_int(value):
        lo, hi = _INT_RANGE.get(dtype, (-(2**63), 2**63 - 1))
        if dtype in _FLOAT_MAX:
            lo, hi = -_FLOAT_MAX[dtype], _FLOAT_MAX[dtype]  # type: ignore[assignment]
        if not lo <= value <= hi:
            raise _bad(field, f"fill value {_short(str(value))} does not fit {dtype}")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _bad(field, "a fill value must be finite")
        if dtype in _INT_RANGE:
            raise _bad(field, f"fill value {value!r} is not an integer ({dtype} tensor)")
        if abs(value) > _FLOAT_MAX.get(dtype, _FLOAT_MAX["float64"]):
            raise _bad(field, f"fill value {value!r} does not fit {dtype}")
        return
    raise _bad(field, "a fill value must be a number or a bool")


def _no_constant(name: str) -> Any:
    raise ShardingError(f"sharding metadata holds {name}: not allowed", field="(document)")


def parse_document(text: str | bytes) -> Sharding:
    """Strict parse with bounds, before anything is allocated from it: typed values,
    every region inside its tensor (and every write region free of overlaps), fill
    values the tensor's dtype can hold, at most MAX_WRITES writes. ShardingError names
    the field that is wrong (``ranks[0].tensors[w].writes[1].dst``)."""
    if len(text) > MAX_DOCUMENT_BYTES:
        raise ShardingError(
            f"sharding metadata is larger than {MAX_DOCUMENT_BYTES} bytes", field="(document)"
        )
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except ShardingError:
        raise
    except (ValueError, RecursionError) as exc:
        raise ShardingError(
            f"sharding metadata is not valid JSON: {str(exc)[:200]}", field="(document)"
        ) from None
    if not isinstance(data, dict) or data.get("format") != SHARDING_FORMAT:
        raise _bad("format", "not preshard sharding metadata")
    if data.get("formatVersion") != SHARDING_FORMAT_VERSION:
        raise _bad(
            "formatVersion",
            f"unsupported sharding metadata formatVersion {str(data.get('formatVersion'))[:20]}",
        )
    tp: Any = data.get("tensorParallelSize")
    pp: Any = data.get("pipelineParallelSize")
    if not (_is_int(tp) and _is_int(pp) and 1 <= tp <= 1024 and 1 <= pp <= 1024):
        raise _bad("tensorParallelSize", "sharding metadata has bad parallel sizes")
    sources: Any = data.get("sources")
    if not isinstance(sources, dict):
        raise _bad("sources", "sharding metadata has no sources")
    for name, info in sources.items():
        field = f"sources[{_short(name)}]"
        _name(name, field)
        if not isinstance(info, dict):
            raise _bad(field, "bad entry")
        _shape(info.get("shape"), field + ".shape")
        _dtype(info.get("dtype"), field + ".dtype")
    raw_ranks = data.get("ranks")
    if not isinstance(raw_ranks, list) or len(raw_ranks) != tp * pp:
        raise _bad("ranks", f"sharding metadata must list {tp * pp} ranks")
    ranks: dict[int, dict[str, dict[str, Any]]] = {}
    writes_seen = 0
    for i, entry in enumerate(raw_ranks):
        r: Any = entry.get("rank") if isinstance(entry, dict) else None
        if not _is_int(r) or not 0 <= r < tp * pp or r in ranks:
            raise _bad(f"ranks[{i}].rank", "sharding metadata has a bad or repeated rank")
        tensors: Any = entry.get("tensors")
        if not isinstance(tensors, dict):
            raise _bad(f"ranks[{i}].tensors", f"rank {r}: no tensors")
        for key, t in tensors.items():
            tfield = f"ranks[{i}].tensors[{_short(key)}]"
            where = f"rank {r} tensor {_short(key)}"
            _name(key, tfield)
            if not isinstance(t, dict) or not isinstance(t.get("writes"), list):
                raise _bad(tfield, f"{where}: bad entry")
            size = numel(_shape(t.get("shape"), tfield + ".shape"))
            dtype = _dtype(t.get("dtype"), tfield + ".dtype")
            if "initial" in t:
                if t["writes"]:
                    raise _bad(tfield + ".initial", f"{where}: an initial value besides writes")
                check_fill(t["initial"], dtype, tfield + ".initial")
            writes_seen += len(t["writes"])
            if writes_seen > MAX_WRITES:
                raise _bad(tfield + ".writes", f"more than {MAX_WRITES} writes in the document")
            for j, w in enumerate(t["writes"]):
                wfield = f"{tfield}.writes[{j}]"
                if not isinstance(w, dict) or w.get("op") not in ("copy", "fill", "derived"):
                    raise _bad(wfield + ".op", f"{where}: bad write")
                dst = _region(w.get("dst"), wfield + ".dst")
                check_region(
                    dst, size, wfield + ".dst", f"{where}: a write lies outside the tensor"
                )
                if w["op"] == "fill":
                    check_fill(w.get("value"), dtype, wfield + ".value")
                elif w["op"] == "derived":
                    names = w.get("sources", [])
                    if not isinstance(names, list) or len(names) > 4096:
                        raise _bad(wfield + ".sources", "must be a list of tensor names")
                    for k, n in enumerate(names):
                        _name(n, f"{wfield}.sources[{k}]")
                else:
                    src_name = _name(w.get("source"), wfield + ".source")
                    if src_name not in sources:
                        raise _bad(wfield + ".source", f"{where}: copies from an unlisted source")
                    src = _region(w.get("src"), wfield + ".src")
                    if src[2] != dst[2]:
                        raise _bad(
                            wfield + ".src", f"{where}: source and destination shapes differ"
                        )
                    check_region(
                        src,
                        numel(sources[src_name]["shape"]),
                        wfield + ".src",
                        f"{where}: a copy reads outside {_short(src_name)}",
                        overlapping=True,
                    )
        ranks[r] = tensors
    skipped = data.get("skippedSources", [])
    if not isinstance(skipped, list):
        raise _bad("skippedSources", "skippedSources must be a list")
    for k, n in enumerate(skipped):
        _name(n, f"skippedSources[{k}]")
    return Sharding(tp, pp, sources, tuple(skipped), ranks)
