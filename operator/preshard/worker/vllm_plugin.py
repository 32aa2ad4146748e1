"""vLLM general plugin: keep unquantized Linear weights on vLLM's CPU backend.

Why: on the CPU platform vLLM's ``UnquantizedLinearMethod.process_weights_after_loading``
calls ``dispatch_cpu_unquantized_gemm(layer, remove_weight=True)``, which hands the
weight to a prepacked GEMM kernel and replaces ``layer.weight`` with an empty tensor.
``save_sharded_state`` then writes shards without any linear weight (the save
"succeeds"; the reload fails on missing keys). The conversion engine must keep them.

vLLM calls every ``vllm.general_plugins`` entry point in each of its processes (the
front end, the engine core and every worker), which is the only way to reach the worker
processes; a patch in the parent process would not. The entry point is declared in
pyproject.toml. ``register`` does nothing unless BOTH hold:

* vLLM's current platform is CPU, and
* ``PRESHARD_KEEP_CPU_WEIGHTS=1`` (the conversion worker sets it for its own engines;
  a vLLM server that merely has preshard installed is never affected).

The patch is narrow: only the CPU branch of ``UnquantizedLinearMethod.
process_weights_after_loading`` changes, from ``remove_weight=True`` to
``remove_weight=False``. The cost is that each linear weight is held twice (plain and
prepacked) while the conversion engine runs.
"""

from __future__ import annotations

import logging
import os
from typing import Any

ENV = "PRESHARD_KEEP_CPU_WEIGHTS"
_MARK = "_preshard_keeps_cpu_weights"

# Under the "vllm" logger hierarchy so vLLM's own handler prints it in its processes.
log = logging.getLogger("vllm.preshard_plugin")


def enabled_by_env() -> bool:
    return os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes")


def register() -> None:
    """The ``vllm.general_plugins`` entry point (may be called more than once)."""
    if not enabled_by_env():
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    patch_unquantized_linear()


def patch_unquantized_linear() -> bool:
    """Apply the patch; True if it was applied now, False if it already was."""
    from vllm.model_executor.layers import linear
    from vllm.model_executor.layers import utils as layer_utils

    method_cls: Any = linear.UnquantizedLinearMethod
    if getattr(method_cls, _MARK, False):
        return False
    original = method_cls.process_weights_after_loading
    dispatch = layer_utils.dispatch_cpu_unquantized_gemm

    def process_weights_after_loading(self: Any, layer: Any) -> None:
        # Same as vLLM's CPU branch, except that the plain weight stays in place.
        if getattr(layer, "_cpu_skip_gemm_dispatch", False):
            original(self, layer)
            return
        dispatch(layer, remove_weight=False)

    process_weights_after_loading.__wrapped__ = original  # type: ignore[attr-defined]
    method_cls.process_weights_after_loading = process_weights_after_loading
    setattr(method_cls, _MARK, True)
    log.info(
        "preshard: vLLM CPU backend keeps unquantized Linear weights "
        "(pid %d; needed by save_sharded_state)",
        os.getpid(),
    )
    return True
