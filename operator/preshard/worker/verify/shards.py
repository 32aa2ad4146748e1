"""File-level checks of a directory of vLLM sharded_state files (no tensor is loaded).

vLLM names each rank's files ``model-rank-{rank}-part-{part}.safetensors`` (pipeline
parallel size 1) or ``model-pp-{pp_rank}-tp-{tp_rank}-part-{part}.safetensors`` (pipeline
parallel size > 1). Its loader globs only the files of the loading rank and merely warns
when a saved tensor is smaller than the parameter, so shards of another parallel layout
can load half-filled without an error. These checks, run before the checkpoint is
published, catch that and the other silent failures the engine would not report:

* every rank 0..TP*PP-1 has files, parts are numbered 0..n-1, no file of a rank outside
  the layout (shards of another TP/PP size) and no file of the other naming scheme;
* every file is a well-formed safetensors file whose header accounts for its size;
* no tensor is empty (a dropped weight saved as a 0-element tensor);
* no key appears twice within a rank, and all tensor-parallel ranks of a pipeline stage
  hold the same keys with the same dtypes (a rank that lost a weight stands out).

The semantic check (the reload through ``load_format="sharded_state"`` reports missing
keys, and greedy tokens match the source) is done by the conversion pipeline.

The safetensors header is parsed here directly (8-byte little-endian length, then JSON),
so this module needs neither torch nor the safetensors package.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preshard.core.contract import FILE_PATTERN, PP_FILE_PATTERN, PP_FILE_RE, RANK_FILE_RE
from preshard.core.contract import shard_pattern as shard_pattern
from preshard.core.errors import VerificationFailed

# vLLM's ShardedStateLoader.TP_ONLY_PATTERN / PP_AND_TP_PATTERN (a vLLM test compares).
TP_ONLY_PATTERN = FILE_PATTERN
PP_AND_TP_PATTERN = PP_FILE_PATTERN
TP_ONLY_RE = RANK_FILE_RE
PP_AND_TP_RE = PP_FILE_RE
MAX_HEADER = 100 * 2**20  # safetensors' own limit
_MAX_LISTED = 5


def is_shard_file(name: str) -> bool:
    return bool(TP_ONLY_RE.match(name) or PP_AND_TP_RE.match(name))


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor name -> info from a safetensors file's header; VerificationFailed if the
    file is not a complete, well-formed safetensors file."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise ValueError("shorter than the 8-byte header length")
            (hlen,) = struct.unpack("<Q", raw_len)
            if hlen > MAX_HEADER or 8 + hlen > size:
                raise ValueError(f"header length {hlen} does not fit the file size {size}")
            header = json.loads(f.read(hlen))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        tensors: dict[str, TensorInfo] = {}
        data_len = size - 8 - hlen
        end_max = 0
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            if not isinstance(meta, dict):
                raise ValueError(f"entry {name!r} is not an object")
            start, end = (int(x) for x in meta["data_offsets"])
            if not 0 <= start <= end <= data_len:
                raise ValueError(f"tensor {name!r} lies outside the file's data")
            shape = tuple(int(d) for d in meta["shape"])
            tensors[name] = TensorInfo(dtype=str(meta["dtype"]), shape=shape, nbytes=end - start)
            end_max = max(end_max, end)
        if end_max != data_len:
            raise ValueError(f"data is {data_len} bytes but the tensors use {end_max}")
        return tensors
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise VerificationFailed(f"{path.name} is not a valid safetensors file: {exc}") from None


@dataclass
class ShardReport:
    """What was found; ``files`` maps (pp_rank, tp_rank) to that rank's files in part order."""

    tensor_parallel_size: int
    pipeline_parallel_size: int
    files: dict[tuple[int, int], list[Path]] = field(default_factory=dict)
    tensors: dict[tuple[int, int], dict[str, TensorInfo]] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(p.stat().st_size for ps in self.files.values() for p in ps)

    @property
    def file_count(self) -> int:
        return sum(len(ps) for ps in self.files.values())

    def summary(self) -> str:
        ranks = len(self.files)
        tensors = sum(len(t) for t in self.tensors.values())
        return (
            f"{self.file_count} shard files for {ranks} ranks, {tensors} tensors, "
            f"{self.total_bytes} bytes"
        )


def _glob(pp_size: int) -> str:
    return shard_pattern(pp_size).format(rank="*", pp_rank="*", tp_rank="*", part="*")


def _rank_label(pp: int, tp: int, pp_size: int) -> str:
    return f"pp rank {pp} tp rank {tp}" if pp_size > 1 else f"rank {tp}"


def _listing(items: Iterable[object]) -> str:
    items = sorted(items, key=str)
    shown = ", ".join(str(i) for i in items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


def find_shards(directory: Path) -> dict[tuple[int, int, int], Path]:
    """(pp_rank, tp_rank, part) -> path for every shard file in ``directory``; pp_rank is
    -1 for files named in the TP-only scheme (``model-rank-...``)."""
    found: dict[tuple[int, int, int], Path] = {}
    for p in sorted(directory.iterdir()):
        if not p.is_file():
            continue
        if m := TP_ONLY_RE.match(p.name):
            found[(-1, int(m["rank"]), int(m["part"]))] = p
        elif m := PP_AND_TP_RE.match(p.name):
            found[(int(m["pp"]), int(m["tp"]), int(m["part"]))] = p
    return found


def check_shards(
    directory: str | Path, tensor_parallel_size: int, pipeline_parallel_size: int = 1
) -> ShardReport:
    """Run every file-level check; raise VerificationFailed with the first problem."""
    directory = Path(directory)
    tp_size, pp_size = tensor_parallel_size, pipeline_parallel_size
    world = tp_size * pp_size
    found = find_shards(directory)
    if not found:
        raise VerificationFailed(f"no shard files ({_glob(pp_size)}) in {directory}")
    want_scheme = "pp" if pp_size > 1 else "tp"
    wrong = sorted({p.name for k, p in found.items() if (k[0] >= 0) != (want_scheme == "pp")})
    if wrong:
        raise VerificationFailed(
            f"found shard files of another pipeline-parallel layout ({_listing(wrong)}); "
            f"expected only {shard_pattern(pp_size)} for pipelineParallelSize {pp_size}"
        )

    by_rank: dict[tuple[int, int], dict[int, Path]] = {}
    for (pp, tp, part), path in found.items():
        by_rank.setdefault((max(pp, 0), tp), {})[part] = path
    expected = {(pp, tp) for pp in range(pp_size) for tp in range(tp_size)}
    extra = sorted(set(by_rank) - expected)
    missing = sorted(expected - set(by_rank))
    if extra:
        labels = [_rank_label(pp, tp, pp_size) for pp, tp in extra]
        raise VerificationFailed(
            f"found shard files for {_listing(labels)}, outside the {world} ranks of "
            f"tensorParallelSize {tp_size} x pipelineParallelSize {pp_size}: the directory "
            "holds shards of another parallel size (they would load half-filled)"
        )
    if missing:
        labels = [_rank_label(pp, tp, pp_size) for pp, tp in missing]
        raise VerificationFailed(
            f"no shard files for {_listing(labels)} (expected {world} ranks: "
            f"tensorParallelSize {tp_size} x pipelineParallelSize {pp_size})"
        )

    report = ShardReport(tp_size, pp_size)
    for rank in sorted(by_rank):
        parts = by_rank[rank]
        label = _rank_label(*rank, pp_size)
        if sorted(parts) != list(range(len(parts))):
            raise VerificationFailed(
                f"{label}: part numbers {sorted(parts)} are not 0..{len(parts) - 1} "
                "(a part file is missing)"
            )
        paths = [parts[i] for i in range(len(parts))]
        tensors: dict[str, TensorInfo] = {}
        for path in paths:
            for name, info in read_safetensors_header(path).items():
                if name in tensors:
                    raise VerificationFailed(f"{label}: tensor {name!r} appears in two part files")
                if info.numel == 0:
                    raise VerificationFailed(
                        f"{label}: tensor {name!r} in {path.name} is empty (shape "
                        f"{list(info.shape)}): the engine dropped this weight"
                    )
                tensors[name] = info
        if not tensors:
            raise VerificationFailed(f"{label}: the shard files hold no tensors")
        report.files[rank] = paths
        report.tensors[rank] = tensors

    # Tensor-parallel ranks of one pipeline stage hold the same parameter names.
    for pp in range(pp_size):
        ref_key = (pp, 0)
        ref = report.tensors[ref_key]
        for tp in range(1, tp_size):
            other = report.tensors[(pp, tp)]
            a, b = _rank_label(*ref_key, pp_size), _rank_label(pp, tp, pp_size)
            if lacks := set(ref) - set(other):
                raise VerificationFailed(f"{b} lacks tensors that {a} has: {_listing(lacks)}")
            if lacks := set(other) - set(ref):
                raise VerificationFailed(f"{a} lacks tensors that {b} has: {_listing(lacks)}")
            for name, info in ref.items():
                if other[name].dtype != info.dtype:
                    raise VerificationFailed(
                        f"tensor {name!r} is {info.dtype} on {a} but {other[name].dtype} on {b}"
                    )
    return report


def compare_tokens(
    prompts: list[str], reference: list[list[int]], reloaded: list[list[int]]
) -> None:
    """Raise VerificationFailed naming the first prompt whose greedy tokens differ."""
    if len(reference) != len(reloaded) or len(reference) != len(prompts):
        raise VerificationFailed(
            f"the reloaded model answered {len(reloaded)} of {len(reference)} prompts"
        )
    for prompt, ref, got in zip(prompts, reference, reloaded, strict=True):
        if list(ref) != list(got):
            raise VerificationFailed(
                f"greedy tokens differ for prompt {prompt}: source model {list(ref)}, "
                f"sharded checkpoint {list(got)}"
            )


# The reload's log-probabilities must be within this absolute tolerance of the converting
# engine's, per value, with the same greedy tokens. Two engines over the same weights are
# not bit-identical in general, not even on vLLM's CPU backend: identical on one CPU, they
# differed by 1.1e-5 (one logit's last bf16 bit, through the normaliser) on another, for
# shards proven bit for bit. What catches a wrong bit is the engine-free check; this one
# proves the shards load and compute the model. Whether the outputs were bit-identical is
# recorded as well (``bitIdentical``).
LOGPROB_TOLERANCE = 0.05


def compare_outputs(
    prompts: list[str],
    reference: list[list[int]],
    reloaded: list[list[int]],
    reference_logprobs: Any,
    reloaded_logprobs: Any,
    *,
    tolerance: float = LOGPROB_TOLERANCE,
) -> dict[str, Any]:
    """Greedy tokens must be equal and the top-k log-probabilities at every position
    within ``tolerance``; a token may be in one side's top-k and not the other's only as
    a near-tie at the boundary (its log-probability within ``tolerance`` of the other
    side's lowest). VerificationFailed names the prompt, the position and the values.
    Returns what was compared (for the manifest's verification summary)."""
    compare_tokens(prompts, reference, reloaded)
    if len(reference_logprobs) != len(reloaded_logprobs):
        raise VerificationFailed("the reloaded model returned log-probabilities for other prompts")
    positions = 0
    worst = 0.0
    identical = True
    for prompt, ref_p, got_p in zip(prompts, reference_logprobs, reloaded_logprobs, strict=True):
        if len(ref_p) != len(got_p):
            raise VerificationFailed(
                f"log-probabilities for prompt {prompt}: {len(ref_p)} positions from the source "
                f"model, {len(got_p)} from the sharded checkpoint"
            )
        for pos, (ref_top, got_top) in enumerate(zip(ref_p, got_p, strict=True)):
            positions += 1
            ref, got = dict(ref_top), dict(got_top)
            identical = identical and ref == got
            for tok, lp in ref.items():
                if tok in got:
                    delta = abs(got[tok] - lp)
                    worst = max(worst, delta)
                    if delta > tolerance:
                        raise VerificationFailed(
                            f"log-probability of token {tok} at position {pos} for prompt "
                            f"{prompt}: source model {lp!r}, sharded checkpoint {got[tok]!r} "
                            f"(tolerance {tolerance})"
                        )
            for mine, theirs, who, other in (
                (ref, got, "source model", "sharded checkpoint"),
                (got, ref, "sharded checkpoint", "source model"),
            ):
                floor = min(theirs.values(), default=float("-inf"))
                for tok, lp in mine.items():
                    if tok not in theirs and lp > floor + tolerance:
                        raise VerificationFailed(
                            f"token {tok} is in the {who}'s top-{len(mine)} at position {pos} "
                            f"for prompt {prompt} (log-probability {lp!r}) but not in the "
                            f"{other}'s, whose lowest is {floor!r} (tolerance {tolerance})"
                        )
    return {
        "method": "engine",
        "matched": True,
        "prompts": len(prompts),
        "positions": positions,
        "topK": max((len(p[0]) for p in reference_logprobs if p), default=0),
        "comparison": f"abs<={tolerance}",
        "bitIdentical": identical,
        "maxAbsDifference": worst,
    }
