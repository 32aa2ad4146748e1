"""Kernel selection made neutral, in ONE place, for the planner.

Only parameter creation and the weight loaders decide what a rank file holds; which
kernel would run a layer does not (``process_weights_after_loading``, where kernels
repack weights, is never called by the planner). Some quantization methods choose their
kernel inside ``create_weights`` (block FP8, GPTQ/AWQ through the mixed-precision
kernels) and refuse when the CPU lacks what the kernel needs (vLLM's CPU block-FP8
kernels require AMX). While planning, vLLM's two linear-kernel choosers (``PATCHES``)
return ``PlanningKernel``, a stand-in that accepts any configuration and can never run,
on every machine alike, so a plan does not depend on the planning machine's CPU.

Patched: ``vllm.model_executor.kernels.linear.choose_scaled_mm_linear_kernel`` and
``choose_mp_linear_kernel``, in that module and in every loaded vLLM module that
imported them by name.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

KERNELS_MODULE = "vllm.model_executor.kernels.linear"
PATCHES = ("choose_scaled_mm_linear_kernel", "choose_mp_linear_kernel")


class PlanningKernel:
    """A linear kernel that accepts every layer and runs none (planning only)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.config = args[0] if args else kwargs.get("config")

    @classmethod
    def is_supported(cls, *args: Any, **kwargs: Any) -> tuple[bool, str | None]:
        return True, None

    @classmethod
    def can_implement(cls, *args: Any, **kwargs: Any) -> tuple[bool, str | None]:
        return True, None

    @classmethod
    def get_min_capability(cls) -> int:
        return 0

    def process_weights_after_loading(self, layer: Any) -> None:
        raise RuntimeError("the planner never processes weights")

    def apply_weights(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the planner never runs a layer")


def _choose(*args: Any, **kwargs: Any) -> type[PlanningKernel]:
    return PlanningKernel


@contextlib.contextmanager
def kernels_neutral() -> Iterator[None]:
    """Within: vLLM's linear-kernel choosers return ``PlanningKernel``."""
    import importlib

    kernels = importlib.import_module(KERNELS_MODULE)
    originals = {name: getattr(kernels, name) for name in PATCHES}
    patched: list[tuple[Any, str, Any]] = []
    try:
        for mod in list(sys.modules.values()):
            if not getattr(mod, "__name__", "").startswith("vllm"):
                continue
            for name, fn in originals.items():
                if getattr(mod, name, None) is fn:
                    patched.append((mod, name, fn))
                    setattr(mod, name, _choose)
        yield
    finally:
        for mod, name, fn in patched:
            setattr(mod, name, fn)
