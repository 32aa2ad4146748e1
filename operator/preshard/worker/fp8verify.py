"""``verify --against`` for pre-quantized FP8 checkpoints (``preshard.worker.fp8shards``).

The checkpoint is not trusted: the rank files are re-planned from the source at the
manifest's TP x PP, dtype and method (``fp8shards.plan_quantized``: the raw plan and the
FP8-checkpoint plan from vLLM's own weight loaders), the stored
``preshard-sharding.json`` must equal the metadata that plan gives
(``compare_with_plan``), and then EVERY saved tensor of every rank is recomputed from the
source exactly as the conversion computes it (the raw rank slice; for an FP8 weight and
its scale, vLLM's reference quantization) and compared with the file's bytes, bit for
bit. The first difference is named: tensor, rank, file, element and both values. Memory:
one tensor per rank at a time plus the source cache.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from preshard.core.errors import VerificationFailed
from preshard.core.sharding import ShardingError, parse_document, unravel


def replan(source_dir: Path, manifest: Any, scheme: Any) -> list[dict[str, Any]]:
    from preshard.worker import fp8shards
    from preshard.worker.planner.checkpoint import local_tensors
    from preshard.worker.planner.verify import stdout_to_stderr

    with stdout_to_stderr():
        return fp8shards.plan_quantized(
            Path(source_dir),
            local_tensors(Path(source_dir)),
            tp=manifest.tensor_parallel_size,
            pp=manifest.pipeline_parallel_size,
            dtype=manifest.dtype,
            scheme=scheme,
        )


def scheme_of(manifest: Any) -> Any:
    """The FP8 scheme a manifest records (``extra.quantizedAtConversion``), else None."""
    from preshard.worker import fp8shards

    extra = getattr(manifest, "extra", None) or {}
    info = extra.get("quantizedAtConversion") if isinstance(extra, dict) else None
    if not info:
        return None
    method = info.get("method") if isinstance(info, dict) else None
    scheme = fp8shards.SCHEMES.get(str(method))
    if scheme is None:
        raise VerificationFailed(f"the manifest records an unknown FP8 scheme {method!r}")
    return scheme


def verify_quantized(
    source_dir: Path, checkpoint: Path, traces: list[dict[str, Any]]
) -> dict[str, Any]:
    """Raise VerificationFailed naming the first difference; the summary otherwise."""
    import torch

    from preshard.core.sharding import build_document
    from preshard.worker import fp8shards, shardbuild
    from preshard.worker.sources import open_source
    from preshard.worker.verify.against import _Files, compare_with_plan, load_sharding, rank_files

    t0 = time.monotonic()
    stored = load_sharding(checkpoint)
    try:
        planned = parse_document(json.dumps(build_document(fp8shards.sharding_traces(traces))))
    except ShardingError as exc:  # pragma: no cover - the planner's own output
        raise VerificationFailed(f"the re-planned sharding metadata is invalid: {exc}") from None
    compare_with_plan(stored, planned)
    builder = fp8shards.Fp8Builder(traces)
    cache = shardbuild.SourceCache(open_source(str(source_dir)))
    tensors = quantized = 0
    compared = 0
    for rank, plan in sorted(builder.plans.items()):
        files = rank_files(checkpoint, rank, plan.tp_size, plan.pp_size)
        if not files:
            raise VerificationFailed(f"rank {rank} has no shard files in {checkpoint}")
        got = _Files(files)
        want = {s.key for s in plan.saved}
        if set(got.where) != want:
            extra = sorted(set(got.where) - want)[:5]
            missing = sorted(want - set(got.where))[:5]
            raise VerificationFailed(
                f"rank {rank}: the files and the plan disagree (not planned: {extra}; "
                f"not in the files: {missing})"
            )
        for saved in plan.saved:
            expected = builder(plan, saved, cache).reshape(-1)
            actual = got.get(saved.key).reshape(-1)
            if actual.dtype != expected.dtype or actual.numel() != expected.numel():
                raise VerificationFailed(
                    f"{saved.key} on rank {rank} ({got.where[saved.key].name}) is "
                    f"{actual.dtype}[{actual.numel()}], the plan {expected.dtype}"
                    f"[{expected.numel()}]"
                )
            a, b = _bits(actual), _bits(expected)
            if not torch.equal(a, b):
                i = int(torch.nonzero(a != b)[0].item())
                raise VerificationFailed(
                    f"{saved.key} on rank {rank} ({got.where[saved.key].name}): element "
                    f"{unravel(i, list(saved.shape))} is {_fmt(actual[i])}, recomputed from "
                    f"the source {_fmt(expected[i])}"
                )
            tensors += 1
            compared += actual.numel() * actual.element_size()
            if saved.key in builder.quantized[rank] or saved.key in builder.scale_of[rank]:
                quantized += 1
    return {
        "method": "recomputed",
        "scheme": builder.scheme.method,
        "checkedTensors": tensors,
        "quantizedTensors": quantized,
        "bytesCompared": compared,
        "sourceTensorsRead": cache.reads,
        "seconds": round(time.monotonic() - t0, 3),
    }


def _bits(t: Any) -> Any:
    import torch

    return t.view(
        {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    )


def _fmt(x: Any) -> str:
    try:
        return repr(float(x.float().item()))
    except Exception:
        return str(x)
