"""Per-parameter sharding metadata of a raw checkpoint (``preshard-sharding.json``).

The rank files of a raw checkpoint hold, for every rank, the parameters exactly as
vLLM's weight loaders filled them. This file says, for every saved tensor of every rank,
where each of its elements came from, as recorded from the loaders' own calls
(``preshard.worker.load_trace``), in the spirit of vLLM's RFC on exposing per-parameter
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
from dataclasses import dataclass
from typing import Any

SHARDING_FORMAT = "preshard.io/sharding-metadata"
SHARDING_FORMAT_VERSION = 1
# Bounds for a document read from storage (a 400B MoE model at TP=16 stays far below).
MAX_DOCUMENT_BYTES = 512 * 2**20
MAX_DIMS = 8


class ShardingError(ValueError):
    """The sharding metadata is malformed or inconsistent."""


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


def _region(value: Any, where: str) -> list[Any]:
    if (
        not isinstance(value, list)
        or len(value) != 3
        or not _is_int(value[0])
        or not isinstance(value[1], list)
        or not isinstance(value[2], list)
        or len(value[1]) != len(value[2])
        or len(value[2]) > MAX_DIMS
        or not all(_is_int(x) and x >= 0 for x in value[1] + value[2])
        or value[0] < 0
    ):
        raise ShardingError(f"{where}: a region must be [offset, strides, shape]")
    return value


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _shape(value: Any, where: str) -> list[int]:
    if (
        not isinstance(value, list)
        or len(value) > MAX_DIMS
        or not all(_is_int(x) and x >= 0 for x in value)
    ):
        raise ShardingError(f"{where}: bad shape")
    return value


def parse_document(text: str | bytes) -> Sharding:
    """Strict parse with bounds; every region must lie inside its tensor."""
    if len(text) > MAX_DOCUMENT_BYTES:
        raise ShardingError(f"sharding metadata is larger than {MAX_DOCUMENT_BYTES} bytes")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ShardingError(f"sharding metadata is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(data, dict) or data.get("format") != SHARDING_FORMAT:
        raise ShardingError("not preshard sharding metadata")
    if data.get("formatVersion") != SHARDING_FORMAT_VERSION:
        raise ShardingError(
            f"unsupported sharding metadata formatVersion {str(data.get('formatVersion'))[:20]}"
        )
    tp: Any = data.get("tensorParallelSize")
    pp: Any = data.get("pipelineParallelSize")
    if not (_is_int(tp) and _is_int(pp) and 1 <= tp <= 1024 and 1 <= pp <= 1024):
        raise ShardingError("sharding metadata has bad parallel sizes")
    sources: Any = data.get("sources")
    if not isinstance(sources, dict):
        raise ShardingError("sharding metadata has no sources")
    for name, info in sources.items():
        if not isinstance(info, dict):
            raise ShardingError(f"source {name[:200]}: bad entry")
        _shape(info.get("shape"), f"source {name[:200]}")
    raw_ranks = data.get("ranks")
    if not isinstance(raw_ranks, list) or len(raw_ranks) != tp * pp:
        raise ShardingError(f"sharding metadata must list {tp * pp} ranks")
    ranks: dict[int, dict[str, dict[str, Any]]] = {}
    for entry in raw_ranks:
        r: Any = entry.get("rank") if isinstance(entry, dict) else None
        if not _is_int(r) or not 0 <= r < tp * pp or r in ranks:
            raise ShardingError("sharding metadata has a bad or repeated rank")
        tensors: Any = entry.get("tensors")
        if not isinstance(tensors, dict):
            raise ShardingError(f"rank {r}: no tensors")
        for key, t in tensors.items():
            where = f"rank {r} tensor {key[:200]}"
            if not isinstance(t, dict) or not isinstance(t.get("writes"), list):
                raise ShardingError(f"{where}: bad entry")
            shape = _shape(t.get("shape"), where)
            size = numel(shape)
            for w in t["writes"]:
                if not isinstance(w, dict) or w.get("op") not in ("copy", "fill", "derived"):
                    raise ShardingError(f"{where}: bad write")
                dst = _region(w.get("dst"), where)
                if size and numel(dst[2]) and region_last(*dst) >= size:
                    raise ShardingError(f"{where}: a write lies outside the tensor")
                if w["op"] == "copy":
                    src_name = w.get("source")
                    if src_name not in sources:
                        raise ShardingError(f"{where}: copies from an unlisted source")
                    src = _region(w.get("src"), where)
                    if src[2] != dst[2]:
                        raise ShardingError(f"{where}: source and destination shapes differ")
                    src_size = numel(sources[str(src_name)]["shape"])
                    if src_size and numel(src[2]) and region_last(*src) >= src_size:
                        raise ShardingError(f"{where}: a copy reads outside {str(src_name)[:200]}")
        ranks[r] = tensors
    skipped = data.get("skippedSources", [])
    if not isinstance(skipped, list):
        raise ShardingError("skippedSources must be a list")
    return Sharding(tp, pp, sources, tuple(skipped), ranks)
