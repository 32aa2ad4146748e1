"""Plan every rank's tensors from vLLM's own weight loaders, without an engine.

For each rank (``rank = pp_rank * tp + tp_rank``) the planner builds vLLM's model class
for that rank on the meta device (``runtime``), runs vLLM's ``DefaultModelLoader.
load_weights`` over shape-only (meta) checkpoint tensors in the order the source yields
them, under ``preshard.worker.engine.load_trace.LoadTracer``, and returns the very trace
document the engine's ``preshard_raw`` loader writes for that rank
(``vllm_raw_loader.save_raw_state``): ``writes``, ``sources``, ``skippedSources``,
``aliases``, ``rank``, ``tpRank``, ``ppRank``, ``tensorParallelSize``,
``pipelineParallelSize`` and ``saved`` (the state dict after vLLM's
``_filter_subtensors`` de-duplication, in state-dict order: the order of the rank
files).

A plan is only as good as its writes: any ``derived`` write (a loader computed values
instead of copying them) or any saved element no write covers, other than a tensor the
model initialises itself, makes the planner refuse (``PlannerUnsupported``), naming the
parameter and the architecture.
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preshard.core.errors import PlannerUnsupported, PreshardError
from preshard.worker.sources import TensorInfo

# safetensors dtype -> torch dtype name
_TORCH_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "F8_E8M0": "float8_e8m0fnu",
}


@dataclass
class PlanTiming:
    """Seconds spent per rank (build, load) and in the one-time vLLM setup."""

    setup: float = 0.0
    ranks: list[tuple[float, float]] = field(default_factory=list)


def meta_tensor(info: TensorInfo) -> Any:
    import torch

    name = _TORCH_DTYPES.get(info.dtype)
    if name is None or not hasattr(torch, name):
        raise PlannerUnsupported(f"checkpoint tensor {info.name} has dtype {info.dtype}")
    return torch.empty(info.shape, dtype=getattr(torch, name), device="meta")


def plan_ranks(
    model_dir: Path,
    tensors: list[TensorInfo],
    *,
    tp: int,
    pp: int,
    dtype: str = "auto",
    quantization: str | None = None,
    timing: PlanTiming | None = None,
) -> list[dict[str, Any]]:
    """Every rank's trace document, rank 0 first (see the module docstring). Raises
    ``PlannerUnsupported`` when a loader computes a value or leaves an element unset."""
    from preshard.worker.planner import runtime

    runtime.quiet_vllm()
    with runtime.inspect_in_process():
        return _plan_all(model_dir, tensors, tp, pp, dtype, quantization, timing)


def _plan_all(
    model_dir: Path,
    tensors: list[TensorInfo],
    tp: int,
    pp: int,
    dtype: str,
    quantization: str | None,
    timing: PlanTiming | None,
) -> list[dict[str, Any]]:
    from preshard.worker.planner import neutral, runtime

    t0 = time.monotonic()
    try:
        vllm_config = runtime.planning_config(
            Path(model_dir), tp=tp, pp=pp, dtype=dtype, quantization=quantization
        )
    except (ValueError, TypeError, NotImplementedError) as exc:
        raise PlannerUnsupported(f"vLLM cannot configure this model: {_first_error(exc)}") from None
    arch = architecture(vllm_config)
    runtime.parallel_state(vllm_config)
    if timing is not None:
        timing.setup = time.monotonic() - t0
    out = []
    with neutral.kernels_neutral():
        for pp_rank in range(pp):
            for tp_rank in range(tp):
                with runtime.as_rank(tp, pp, tp_rank, pp_rank):
                    doc = _plan_rank(vllm_config, tensors, arch, timing)
                doc.update(
                    {
                        "rank": pp_rank * tp + tp_rank,
                        "tpRank": tp_rank,
                        "ppRank": pp_rank,
                        "tensorParallelSize": tp,
                        "pipelineParallelSize": pp,
                    }
                )
                out.append(_ordered(doc))
    return out


def _first_error(exc: Exception) -> str:
    """One line for a pydantic validation error (vLLM's config), the text otherwise."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        with contextlib.suppress(Exception):
            return str(errors()[0].get("msg", exc)).removeprefix("Value error, ")
    return str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__


def architecture(vllm_config: Any) -> str:
    archs = getattr(vllm_config.model_config, "architectures", None) or ["?"]
    return str(archs[0])


_KEY_ORDER = (
    "writes",
    "sources",
    "skippedSources",
    "aliases",
    "rank",
    "tpRank",
    "ppRank",
    "tensorParallelSize",
    "pipelineParallelSize",
    "saved",
)


def _ordered(doc: dict[str, Any]) -> dict[str, Any]:
    out = {k: doc[k] for k in _KEY_ORDER}
    if "initialized" in doc:  # only the planner knows these (the engine reads its memory)
        out["initialized"] = doc["initialized"]
    return out


def _plan_rank(
    vllm_config: Any, tensors: list[TensorInfo], arch: str, timing: PlanTiming | None
) -> dict[str, Any]:
    from vllm.config import set_current_vllm_config
    from vllm.utils.torch_utils import set_default_torch_dtype

    from preshard.worker.engine.load_trace import LoadTracer
    from preshard.worker.planner import runtime
    from preshard.worker.planner.initial import InitRecorder

    t0 = time.monotonic()
    init = InitRecorder()
    try:
        with init:
            model = runtime.build_model(vllm_config)
    except PreshardError:
        raise
    except Exception as exc:
        raise PlannerUnsupported(
            f"vLLM cannot build {arch} on the meta device: {type(exc).__name__}: {exc}"
        ) from None
    t1 = time.monotonic()
    params = dict(model.state_dict(keep_vars=True))
    tracer = LoadTracer(params)
    loader = _loader(vllm_config.load_config, tensors, tracer)
    model_config = vllm_config.model_config
    try:
        with (
            set_current_vllm_config(vllm_config),
            set_default_torch_dtype(model_config.dtype),
            tracer,
        ):
            loader.load_weights(model, model_config)
    except PreshardError:
        raise
    except Exception as exc:
        raise PlannerUnsupported(
            f"{arch}'s weight loaders do not run on shape-only tensors: "
            f"{type(exc).__name__}: {str(exc)[:300]}"
        ) from None
    trace = tracer.finish(dict(model.state_dict(keep_vars=True)))
    saved = filter_subtensors(dict(model.state_dict()))
    doc = trace.to_json()
    doc["saved"] = {
        k: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        for k, t in saved.items()
    }
    # what the model initialised the tensors no loader writes with (the writer needs
    # the value: on the meta device there is none to read)
    initialized = {
        k: v
        for k, t in saved.items()
        if not doc["writes"].get(k) and (v := init.value(t)) is not None
    }
    if initialized:
        doc["initialized"] = initialized
    check_complete(doc, arch)
    if timing is not None:
        timing.ranks.append((t1 - t0, time.monotonic() - t1))
    return doc


def _loader(load_config: Any, tensors: list[TensorInfo], tracer: Any) -> Any:
    """vLLM's DefaultModelLoader whose weights are the meta tensors of ``tensors``."""
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    class _MetaLoader(DefaultModelLoader):  # type: ignore[misc]
        def get_all_weights(  # type: ignore[override]
            self, model_config: Any, model: Any
        ) -> Iterator[tuple[str, Any]]:
            for info in tensors:
                t = meta_tensor(info)
                tracer.source(info.name, t)
                yield info.name, t

    return _MetaLoader(load_config)


def check_complete(doc: dict[str, Any], arch: str) -> None:
    """Refuse a rank whose plan is not exact: a ``derived`` write, or a saved tensor
    whose writes leave some element unset (a tensor with no write at all is the
    model's own initialisation, e.g. attention scales not in the checkpoint, as the
    engine saves it)."""
    from preshard.worker.shardbuild import uncovered

    for key, info in doc["saved"].items():
        writes = doc["writes"].get(key, [])
        for w in writes:
            if w["op"] == "derived":
                srcs = ", ".join(w.get("sources", [])[:3]) or "no checkpoint tensor"
                raise PlannerUnsupported(
                    f"{arch}: the weight loader of {key} computes its values (from {srcs}) "
                    "instead of copying them; convert with --engine vllm"
                )
        if not writes:
            continue
        n = 1
        for d in info["shape"]:
            n *= int(d)
        # (from the writes' runs of elements: no mask of every element, which cost
        # more than the rest of planning a rank)
        missing = uncovered(writes, n)
        if missing:
            raise PlannerUnsupported(
                f"{arch}: the weight loaders leave {missing} of {n} elements of {key} "
                "unset on rank files the planner would write; convert with --engine vllm"
            )


def filter_subtensors(tensors: dict[str, Any]) -> dict[str, Any]:
    """vLLM's ``ShardedStateLoader._filter_subtensors`` (which tensors the rank files
    hold) computed from storage identities and offsets instead of data pointers, so that
    it gives the same answer on the meta device, where every pointer is 0."""
    from preshard.worker.engine.load_trace import storage_key

    groups: dict[Any, list[tuple[str, Any]]] = collections.defaultdict(list)
    for key, tensor in tensors.items():
        if tensor.numel():
            groups[storage_key(tensor)].append((key, tensor))

    def span(t: Any) -> tuple[int, int]:
        size = t.element_size()
        start = int(t.storage_offset()) * size
        last = int(t.storage_offset()) + sum(
            (n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True)
        )
        return start, last * size + size

    result: dict[str, Any] = {}
    for group in groups.values():
        for k, t in group:
            a, b = span(t)
            for k2, t2 in group:
                if not t2.is_contiguous():
                    continue
                a2, b2 = span(t2)
                if a < a2 or b2 < b:
                    continue
                if a2 < a or b < b2 or not t.is_contiguous():
                    break
                if k2 < k:
                    break
            else:
                result[k] = t
    return result
