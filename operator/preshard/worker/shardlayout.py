"""Each rank's files, planned before any data (pure: no I/O, no torch).

From the per-rank trace documents (what the engine's ``preshard_raw`` loader writes as
``preshard-trace-rank-{rank}.json``, or what ``preshard.worker.planner`` plans without an
engine), the files ``preshard.worker.shardwriter`` writes, laid out exactly as vLLM's
``ShardedStateLoader.save_model`` lays them out over the same raw state:

* the same tensors (``saved``, in the state dict's order, already de-duplicated by
  vLLM's ``_filter_subtensors``), split into parts exactly as ``save_model`` splits them
  by ``max_size`` (a tensor larger than ``max_size`` at the start gives an empty part 0,
  as vLLM's loop does), named from the same pattern;
* the same safetensors header ``safetensors`` itself writes (tensors ordered by dtype,
  largest first in safetensors' dtype order, then by name; compact JSON; padded with
  spaces to a multiple of 8), followed by the data in header order.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preshard.core.errors import InvalidSpec, PlanningFailed, UnsupportedDtype
from preshard.core.sharding import numel
from preshard.worker.sources.header import TORCH_TO_ST

# safetensors' dtype order (its Rust ``Dtype`` enum); the header lists the tensors by
# this order, largest first, then by name.
ST_DTYPE_ORDER = (
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0",
    "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64",
)  # fmt: skip


def st_dtype(torch_name: str) -> str:
    try:
        return TORCH_TO_ST[torch_name.removeprefix("torch.")]
    except KeyError:
        raise UnsupportedDtype(
            f"dtype {torch_name} has no safetensors equivalent",
        ) from None


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


def plan_files(
    traces: list[dict[str, Any]], *, pattern: str | None = None, max_size: int | None = None
) -> list[tuple[RankPlan, list[PartLayout]]]:
    """Every rank's plan and file layouts (names, headers, sizes), before any data."""
    plans = sorted((RankPlan.from_trace(t) for t in traces), key=lambda p: p.rank)
    return [(p, p.layout(pattern, max_size)) for p in plans]


def total_bytes(files: list[tuple[RankPlan, list[PartLayout]]]) -> int:
    return sum(layout.size for _, layouts in files for layout in layouts)


def load_traces(directory: Path) -> list[dict[str, Any]]:
    """The ``preshard-trace-rank-*.json`` documents in ``directory``."""
    out = []
    for p in sorted(directory.glob("preshard-trace-rank-*.json")):
        out.append(json.loads(p.read_text()))
    return out
