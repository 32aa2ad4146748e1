"""What a model initialises its tensors WITH, when no weight loader writes them.

Some saved tensors are never written by a loader: the model created them with a value
(vLLM's FP8 attention scales ``k_scale``/``v_scale``/``q_scale``/``prob_scale`` are
``KVCacheScaleParameter()``, i.e. ``torch.tensor(-1.0)``; a quantization method's
defaults made with ``torch.ones``/``zeros``/``full``). On the meta device their values
are unknown, so while the planner builds a rank's model this mode records, per storage,
the constant a factory call or an in-place fill gave it. A tensor made by ``empty`` (or
partly filled) has no recorded value, and the writer refuses it rather than guess.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from preshard.worker.engine.load_trace import storage_key

_CONSTANT = {"zeros": 0, "zeros_like": 0, "ones": 1, "ones_like": 1}
_FULL = {"full", "full_like"}


def _scalar(value: Any) -> float | int | bool | None:
    if isinstance(value, bool | int | float):
        return value
    return None


class InitRecorder(TorchFunctionMode):
    """Record the constant each new storage was created or wholly filled with."""

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[Any, float | int | bool] = {}
        self._keep: list[torch.Tensor] = []  # keeps recorded storages (and their keys) alive

    def _set(self, t: Any, value: float | int | bool | None) -> None:
        if not isinstance(t, torch.Tensor):
            return
        key = storage_key(t)
        whole = t.numel() * t.element_size() == t.untyped_storage().nbytes()
        if value is None or not whole:
            self.values.pop(key, None)
            return
        self.values[key] = value
        self._keep.append(t)

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        result = func(*args, **kwargs)
        if name == "tensor" and args:
            self._set(result, _scalar(args[0]))
        elif name in _CONSTANT:
            self._set(result, _CONSTANT[name])
        elif name in _FULL and len(args) >= 2:
            self._set(result, _scalar(args[1]))
        elif name == "fill_" and len(args) >= 2:
            self._set(args[0], _scalar(args[1]))
        elif name == "zero_" and args:
            self._set(args[0], 0)
        return result

    def value(self, t: torch.Tensor) -> float | int | bool | None:
        """The constant ``t``'s storage holds, when the model made it so."""
        return self.values.get(storage_key(t))
