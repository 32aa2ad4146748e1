"""What the planner needs from a local checkpoint, and whether it can plan a model.

``local_tensors`` lists a local checkpoint's tensors (shapes and dtypes from the
safetensors headers, no data read) in the order vLLM 0.32's ``DefaultModelLoader``
yields them: the ``*.safetensors`` files (only those ``model.safetensors.index.json``
names, when there is one) in the natural order of their names
(``weight_utils._natural_sort_key``), each file's tensors in ``safe_open().keys()``
order (sorted by name). The order matters: a fused parameter's writes are recorded in it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from preshard.core.errors import InvalidSource
from preshard.worker.sources import TensorInfo

INDEX_NAME = "model.safetensors.index.json"


def _natural_key(name: str) -> list[Any]:
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name)]


def local_tensors(model_dir: Path) -> list[TensorInfo]:
    from safetensors import safe_open

    model_dir = Path(model_dir)
    files = [p.name for p in model_dir.glob("*.safetensors") if p.is_file()]
    index = model_dir / INDEX_NAME
    if index.is_file():
        try:
            listed = {str(v) for v in json.loads(index.read_text())["weight_map"].values()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidSource(f"{INDEX_NAME} is not a valid index: {exc}") from None
        files = [f for f in files if f in listed]
    out = []
    for name in sorted(files, key=_natural_key):
        with safe_open(str(model_dir / name), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118
                sl = f.get_slice(key)
                out.append(TensorInfo(key, str(sl.get_dtype()), tuple(sl.get_shape()), name))
    return out


def vllm_missing() -> str | None:
    """Why vLLM cannot be used here, or None."""
    import importlib.util

    try:
        if importlib.util.find_spec("vllm") is None:
            return "vLLM is not installed"
    except (ImportError, ValueError) as exc:
        return f"vLLM is not importable: {exc}"
    return None


def supports(
    model_dir: Path,
    tensors: list[TensorInfo],
    *,
    tp: int,
    pp: int = 1,
    dtype: str = "auto",
    quantization: str | None = None,
) -> str | None:
    """None when the planner gives this model's exact rank files at TP x PP, else the
    reason it does not (for ``--engine auto``). It plans every rank (seconds for most
    models after vLLM's import): the plan itself is the only sure answer."""
    from preshard.worker.planner.plan import PlannerUnsupported, plan_ranks

    missing = vllm_missing()
    if missing:
        return missing
    try:
        plan_ranks(model_dir, tensors, tp=tp, pp=pp, dtype=dtype, quantization=quantization)
    except PlannerUnsupported as exc:
        return exc.message
    return None
