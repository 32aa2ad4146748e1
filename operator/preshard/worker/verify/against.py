"""Engine-free verification: rebuild every checkpoint tensor from the rank files.

``verify_against(source_dir, checkpoint_dir)`` replays the sharding metadata
(``preshard.core.sharding``) of a raw checkpoint against the source checkpoint it was
converted from and compares values **bit for bit**:

* every ``copy`` write: the region of the saved tensor equals the region of the source
  tensor, converted to the saved dtype exactly as ``Tensor.copy_`` converts;
* every ``fill``: the region holds the constant;
* every element of every saved tensor is written by some loader call (a tensor with no
  write at all is listed as initialized by the model, e.g. attention scales that are not
  in the checkpoint); two writes into one region must both match, so a region covered
  twice with different values fails;
* every element of every source tensor that the model reads is read by some rank
  (the report lists the source tensors the model skips, such as a tied ``lm_head``);
* the saved files hold exactly the tensors, shapes and dtypes the metadata lists, and
  the source tensors have the shapes and dtypes recorded at conversion time.

Memory stays at about one source tensor, a few saved tensors and one boolean mask:
sources are read one at a time (safetensors memory-maps the files), saved tensors are
read on demand with a small cache, and coverage is tracked per tensor.

``preshard verify --against`` (``commands.verify``) does not take the checkpoint's word for its
sharding: it re-plans it from the source with vLLM's own weight loaders
(``preshard.worker.planner``, no engine), refuses a stored ``preshard-sharding.json``
that differs from the plan (``compare_with_plan``: a source tensor left out, a saved
tensor given fewer writes), then replays the PLANNED writes. Without an importable vLLM
it refuses (``PlannerUnavailable``) rather than trust the file.

A ``derived`` write (the loader computed the values, e.g. a quantization repack inside
a weight loader) cannot be checked without an engine: it is reported, and it fails the
verification unless the caller allows it (the conversion then relies on the engine
check).
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preshard.core.errors import InvalidShardingMetadata, PlanningFailed, VerificationFailed
from preshard.core.manifest import SHARDING_NAME
from preshard.core.sharding import (
    MAX_DOCUMENT_BYTES,
    Sharding,
    ShardingError,
    numel,
    parse_document,
    unravel,
)
from preshard.worker.planner.verify import compare_with_plan, planned_sharding

__all__ = ["compare_with_plan", "planned_sharding", "verify_against"]

log = logging.getLogger("preshard.verify")

_INT_VIEW = {1: "int8", 2: "int16", 4: "int32", 8: "int64"}
_SAVED_CACHE = 4


@dataclass
class VerifyReport:
    source_tensors: int = 0
    checked_tensors: int = 0
    copies: int = 0
    fills: int = 0
    bytes_compared: int = 0
    skipped_sources: list[str] = field(default_factory=list)
    model_initialized: list[str] = field(default_factory=list)
    derived: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # the sharding replayed was re-planned from the source (not the checkpoint's own)
    replanned: bool = False

    def summary(self) -> dict[str, Any]:
        return {
            "method": "engine-free",
            "matched": True,
            "sourceTensors": self.source_tensors,
            "savedTensors": self.checked_tensors,
            "copies": self.copies,
            "fills": self.fills,
            "bytesCompared": self.bytes_compared,
            "skippedSources": self.skipped_sources[:50],
            "modelInitialized": len(self.model_initialized),
            "derived": self.derived[:50],
            "sharding": "re-planned" if self.replanned else "stored",
            "seconds": round(self.seconds, 2),
        }

    def describe(self) -> str:
        text = (
            f"{self.checked_tensors} saved tensors rebuilt from {self.source_tensors} source "
            f"tensors bit for bit ({self.copies} copies, {self.fills} fills, "
            f"{self.bytes_compared / 2**20:.1f} MiB compared)"
        )
        if self.skipped_sources:
            text += f"; the model skips {len(self.skipped_sources)} source tensor(s): " + ", ".join(
                self.skipped_sources[:5]
            )
        if self.model_initialized:
            text += f"; {len(self.model_initialized)} tensor(s) initialized by the model"
        return text


# ------------------------------------------------------------------------------ readers


class _Files:
    """safetensors files of one directory: key -> file, opened lazily (memory-mapped)."""

    def __init__(self, paths: list[Path]) -> None:
        from safetensors import safe_open

        self._safe_open = safe_open
        self.where: dict[str, Path] = {}
        self.meta: dict[str, tuple[list[int], str]] = {}
        for p in sorted(paths):
            with safe_open(str(p), framework="pt") as f:
                for k in f.keys():  # noqa: SIM118
                    if k in self.where:
                        raise VerificationFailed(
                            f"tensor {k} is in both {self.where[k].name} and {p.name}"
                        )
                    self.where[k] = p
                    sl = f.get_slice(k)
                    self.meta[k] = (list(sl.get_shape()), str(sl.get_dtype()))

    def get(self, key: str) -> Any:
        with self._safe_open(str(self.where[key]), framework="pt") as f:
            return f.get_tensor(key)


def _st_dtype(torch_dtype: str) -> str:
    """torch dtype name -> safetensors dtype name (as get_slice().get_dtype() reports)."""
    return {
        "float32": "F32",
        "float16": "F16",
        "bfloat16": "BF16",
        "float64": "F64",
        "int64": "I64",
        "int32": "I32",
        "int16": "I16",
        "int8": "I8",
        "uint8": "U8",
        "bool": "BOOL",
        "float8_e4m3fn": "F8_E4M3",
        "float8_e5m2": "F8_E5M2",
    }.get(torch_dtype, torch_dtype)


def rank_files(checkpoint: Path, rank: int, tp: int, pp: int) -> list[Path]:
    from preshard.core.manifest import parse_shard_filename

    out = []
    for p in checkpoint.iterdir():
        parsed = parse_shard_filename(p.name, tp)
        if parsed is not None and parsed[0] == rank:
            out.append(p)
    return sorted(out)


# ------------------------------------------------------------------------------ compare


def _bits(t: Any) -> Any:
    import torch

    if t.dtype == torch.bool:
        return t.contiguous().view(torch.uint8)
    if t.element_size() not in _INT_VIEW:
        raise VerificationFailed(f"tensors of dtype {t.dtype} cannot be compared bit for bit")
    return t.contiguous().view(getattr(torch, _INT_VIEW[t.element_size()]))


def _first_difference(a: Any, b: Any) -> int:
    import torch

    diff = (_bits(a) != _bits(b)).reshape(-1)
    return int(torch.nonzero(diff)[0].item())


def _element(offset: int, strides: list[int], shape: list[int], i: int) -> int:
    """Flat index in the base tensor of element ``i`` (row-major) of a strided region."""
    idx = unravel(i, shape)
    return offset + sum(a * s for a, s in zip(idx, strides, strict=True))


def _fmt(x: Any) -> str:
    try:
        return repr(x.item())
    except Exception:
        return str(x)


class _Verifier:
    def __init__(self, source_dir: Path, checkpoint: Path, sharding: Sharding) -> None:
        self.sharding = sharding
        self.checkpoint = checkpoint
        src_files = sorted(source_dir.glob("*.safetensors"))
        if not src_files:
            raise VerificationFailed(f"the source {source_dir} has no *.safetensors files")
        self.source = _Files(src_files)
        self.ranks: dict[int, _Files] = {}
        tp, pp = sharding.tensor_parallel_size, sharding.pipeline_parallel_size
        for r in range(tp * pp):
            files = rank_files(checkpoint, r, tp, pp)
            if not files:
                raise VerificationFailed(f"rank {r} has no shard files in {checkpoint}")
            self.ranks[r] = _Files(files)
        self._cache: OrderedDict[tuple[int, str], Any] = OrderedDict()
        self.report = VerifyReport()

    def saved(self, rank: int, key: str) -> Any:
        ck = (rank, key)
        if ck in self._cache:
            self._cache.move_to_end(ck)
            return self._cache[ck]
        t = self.ranks[rank].get(key).reshape(-1)
        self._cache[ck] = t
        while len(self._cache) > _SAVED_CACHE:
            self._cache.popitem(last=False)
        return t

    def where(self, rank: int, key: str) -> str:
        return f"{key} on rank {rank} ({self.ranks[rank].where[key].name})"

    # -- structure -----------------------------------------------------------------

    def check_structure(self) -> None:
        for r, files in self.ranks.items():
            listed = self.sharding.ranks[r]
            extra = sorted(set(files.where) - set(listed))
            missing = sorted(set(listed) - set(files.where))
            if extra or missing:
                raise VerificationFailed(
                    f"rank {r}: the files and the sharding metadata disagree "
                    f"(not in the metadata: {extra[:5]}; not in the files: {missing[:5]})"
                )
            for key, entry in listed.items():
                shape, dtype = files.meta[key]
                if shape != entry["shape"] or dtype != _st_dtype(entry["dtype"]):
                    # Before anything is allocated: the metadata's shapes (which bound
                    # every region and buffer) must be the file headers' own.
                    raise invalid_metadata(
                        ShardingError(
                            f"{self.where(r, key)} is {dtype}{shape} in the file but "
                            f"{entry['dtype']}{entry['shape']} in the sharding metadata",
                            field=f"ranks[rank {r}].tensors[{key[:120]}].shape",
                        )
                    )
        for name, info in self.sharding.sources.items():
            if name not in self.source.meta:
                raise VerificationFailed(
                    f"source tensor {name} (recorded at conversion) is not in the source checkpoint"
                )
            shape, dtype = self.source.meta[name]
            if shape != info["shape"] or dtype != _st_dtype(info["dtype"]):
                raise VerificationFailed(
                    f"source tensor {name} is {dtype}{shape} but was {info['dtype']}{info['shape']} "
                    "at conversion (another source?)"
                )

    # -- values --------------------------------------------------------------------

    def check_sources(self) -> None:
        import torch

        by_source = self.sharding.writes_by_source()
        for name in sorted(self.source.where):
            writes = by_source.get(name)
            if name not in self.sharding.sources:
                continue  # never given to the model (e.g. filtered by vLLM's loader)
            if not writes:
                continue  # listed in skippedSources
            self.report.source_tensors += 1
            src = self.source.get(name)
            flat = src.reshape(-1)
            read = torch.zeros(flat.numel(), dtype=torch.bool)
            for rank, key, w in writes:
                s_off, s_strides, shape = w["src"]
                d_off, d_strides, _ = w["dst"]
                saved = self.saved(rank, key)
                expected = torch.as_strided(flat, shape, s_strides, s_off).to(saved.dtype)
                actual = torch.as_strided(saved, shape, d_strides, d_off)
                if not torch.equal(_bits(expected), _bits(actual)):
                    i = _first_difference(expected, actual)
                    t_idx = unravel(
                        _element(d_off, d_strides, shape, i),
                        self.sharding.ranks[rank][key]["shape"],
                    )
                    s_idx = unravel(_element(s_off, s_strides, shape, i), src.shape)
                    raise VerificationFailed(
                        f"{self.where(rank, key)} differs from source tensor {name}: element "
                        f"{t_idx} is {_fmt(actual.reshape(-1)[i])}, source element {s_idx} is "
                        f"{_fmt(expected.reshape(-1)[i])}"
                    )
                torch.as_strided(read, shape, s_strides, s_off).fill_(True)
                self.report.copies += 1
                self.report.bytes_compared += numel(shape) * saved.element_size()
            if not bool(read.all()):
                i = int(torch.nonzero(~read)[0].item())
                raise VerificationFailed(
                    f"source tensor {name}: element {unravel(i, src.shape)} is loaded by no rank "
                    f"({int((~read).sum())} of {read.numel()} elements are never read)"
                )
            del src, flat, read

    def check_initial(self, rank: int, key: str, entry: dict[str, Any]) -> None:
        """A tensor no loader writes holds the value the model creates it with, when the
        metadata (the planner's) records it as ``initial``."""
        import torch

        if "initial" not in entry:
            return
        saved = self.saved(rank, key).reshape(-1)
        want = torch.full_like(saved, entry["initial"])
        if not torch.equal(_bits(want), _bits(saved)):
            i = _first_difference(want, saved)
            raise VerificationFailed(
                f"{self.where(rank, key)}: element {unravel(i, entry['shape'])} is "
                f"{_fmt(saved[i])}, the model initialises it to {entry['initial']!r}"
            )

    def check_tensors(self, allow_derived: bool) -> None:
        import torch

        for rank in sorted(self.sharding.ranks):
            for key, entry in sorted(self.sharding.ranks[rank].items()):
                writes = entry["writes"]
                size = numel(entry["shape"])
                self.report.checked_tensors += 1
                if not writes:
                    self.report.model_initialized.append(f"{key}@{rank}")
                    self.check_initial(rank, key, entry)
                    continue
                covered = torch.zeros(size, dtype=torch.bool)
                for w in writes:
                    d_off, d_strides, shape = w["dst"]
                    if w["op"] == "fill":
                        saved = self.saved(rank, key)
                        actual = torch.as_strided(saved, shape, d_strides, d_off)
                        want = torch.full(shape, w["value"], dtype=saved.dtype)
                        if not torch.equal(_bits(want), _bits(actual)):
                            i = _first_difference(want, actual)
                            idx = unravel(_element(d_off, d_strides, shape, i), entry["shape"])
                            raise VerificationFailed(
                                f"{self.where(rank, key)}: element {idx} is "
                                f"{_fmt(actual.reshape(-1)[i])}, the loader filled {w['value']!r}"
                            )
                        self.report.fills += 1
                    elif w["op"] == "derived":
                        self.report.derived.append(f"{key}@{rank}")
                    torch.as_strided(covered, shape, d_strides, d_off).fill_(True)
                if not bool(covered.all()):
                    i = int(torch.nonzero(~covered)[0].item())
                    raise VerificationFailed(
                        f"{self.where(rank, key)}: element {unravel(i, entry['shape'])} is written "
                        f"by no weight loader ({int((~covered).sum())} of {size} elements)"
                    )
        if self.report.derived and not allow_derived:
            raise VerificationFailed(
                f"{len(self.report.derived)} tensor(s) were computed by vLLM's weight loaders, "
                f"not copied, and cannot be checked without an engine: "
                f"{', '.join(self.report.derived[:5])} (run the engine verification)"
            )


def load_sharding(checkpoint: Path) -> Sharding:
    path = checkpoint / SHARDING_NAME
    if not path.is_file():
        raise VerificationFailed(
            f"{checkpoint} has no {SHARDING_NAME}: not a raw preshard checkpoint "
            "(formatVersion 1 checkpoints carry no sharding metadata; convert again)"
        )
    if path.stat().st_size > MAX_DOCUMENT_BYTES:  # never read a hostile size whole
        raise invalid_metadata(
            ShardingError(f"larger than {MAX_DOCUMENT_BYTES} bytes", field="(document)")
        )
    try:
        return parse_document(path.read_bytes())
    except ShardingError as exc:
        raise invalid_metadata(exc) from None


def invalid_metadata(exc: ShardingError) -> InvalidShardingMetadata:
    """The permanent error for sharding metadata that is malformed or out of bounds
    (reason InvalidShardingMetadata), naming the field that is wrong."""
    field = f" (field {exc.field})" if exc.field else ""
    problem = str(exc).removeprefix(f"{exc.field}: ") if exc.field else str(exc)
    return InvalidShardingMetadata(
        f"InvalidShardingMetadata: {SHARDING_NAME}{field}: {problem}",
    )


def verify_against(
    source_dir: Path,
    checkpoint: Path,
    *,
    allow_derived: bool = False,
    planned: Sharding | None = None,
    plan: Callable[[], Sharding] | None = None,
) -> VerifyReport:
    """Raise VerificationFailed (permanent) naming the first difference.

    With ``planned`` (the sharding re-planned from the source by vLLM's own loaders,
    ``planned_sharding``), the checkpoint's stored metadata must equal the plan, and the
    planned writes are replayed: the checkpoint is not trusted to describe itself.
    With ``plan`` (a function giving that), the stored metadata, tenant input, is first
    bounded and replayed against the files in bounded memory (hostile fields refused
    before anything costly), and only then must it equal the plan: the same writes, so
    the replay was the plan's; the values of tensors no loader writes are the plan's."""
    t0 = time.monotonic()
    sharding = load_sharding(checkpoint)
    if planned is not None:
        compare_with_plan(sharding, planned)
        sharding = planned
    v = _Verifier(Path(source_dir), Path(checkpoint), sharding)
    v.report.replanned = planned is not None
    v.check_structure()
    v.check_tensors(allow_derived)
    v.check_sources()
    if plan is not None:
        planned = plan()
        compare_with_plan(sharding, planned)
        for rank, tensors in planned.ranks.items():
            for key, entry in tensors.items():
                if not entry["writes"]:
                    v.check_initial(rank, key, entry)
        v.report.replanned = True
    v.report.skipped_sources = list(sharding.skipped_sources)
    v.report.seconds = time.monotonic() - t0
    return v.report


def iter_traces(shards: Path) -> Iterator[Path]:
    yield from sorted(shards.glob("preshard-trace-rank-*.json"))


def write_sharding(shards: Path) -> dict[str, Any]:
    """Merge the ranks' traces into ``preshard-sharding.json`` (removing the traces)."""
    from preshard.core.sharding import build_document

    paths = list(iter_traces(shards))
    try:
        doc = build_document([json.loads(p.read_text()) for p in paths])
    except (ShardingError, KeyError, TypeError, ValueError) as exc:
        raise PlanningFailed(
            f"cannot build the sharding metadata from the ranks' traces: {exc}",
        ) from None
    tmp = shards / (SHARDING_NAME + ".tmp")
    tmp.write_text(json.dumps(doc, separators=(",", ":"), sort_keys=False) + "\n")
    tmp.replace(shards / SHARDING_NAME)
    for p in paths:
        p.unlink()
    return doc
