"""Which quantization methods are online, and what a conversion does with them (pure).

vLLM 0.32's online shorthands (``vllm/config/quantization.py``, ``_ONLINE_SHORTHANDS``)
quantize an unquantized checkpoint while it loads: the FP8/MXFP8 linear methods create
their weights on the meta device and quantize each layer during ``load_weights``
(``model_loader/reload/layerwise.py``) as soon as its weights are complete. A raw save
after ``load_weights`` would capture those processed, kernel-specific tensors, so for an
online method the conversion never quantizes: the raw per-rank files hold the weights
before quantization (exactly what the same conversion without the method writes), the
manifest and the serving arguments carry the method, and serving quantizes on its own
hardware. Both the engine path (``worker.conversion``) and the engine-free planner path
plan/convert with ``raw_plan_quantization(q)``.

``mxfp8`` and ``mxfp4`` are also checkpoint methods: vLLM treats ``--quantization
mxfp8`` as online only when the checkpoint declares no quantization
(``_DEFERRED_ONLINE_SHORTHANDS``); ``online_method`` takes the checkpoint's method into
account the same way.
"""

from __future__ import annotations

from preshard.core.errors import PreshardError, UnsupportedQuantization

# vLLM 0.32's _ONLINE_SHORTHANDS that preshard accepts (core.plan.QUANTIZATIONS); a unit
# test compares this set with the installed vLLM's table.
ONLINE_METHODS = frozenset(
    {
        "fp8_per_tensor",
        "fp8_per_channel",
        "fp8_per_block",
        "mxfp8",
        "mxfp4",
        "int8_per_channel_weight_only",
    }
)
# Shorthands that are checkpoint methods too: online only over an unquantized checkpoint.
DEFERRED_ONLINE_METHODS = frozenset({"mxfp8", "mxfp4"})
# Online shorthands with only a MoE part (no ``linear`` spec): dense linear layers stay
# unquantized, only MoE experts are quantized.
MOE_ONLY_ONLINE_METHODS = frozenset({"int8_per_channel_weight_only"})


def online_method(quantization: str | None, checkpoint_method: str | None = None) -> bool:
    """Whether ``quantization`` quantizes while the checkpoint loads (vLLM's online
    shorthands), so that the raw files must be converted without it.
    ``checkpoint_method``: the method the source's config.json declares, if any."""
    if not quantization or quantization not in ONLINE_METHODS:
        return False
    return not (quantization in DEFERRED_ONLINE_METHODS and checkpoint_method)


def raw_plan_quantization(
    quantization: str | None, checkpoint_method: str | None = None
) -> str | None:
    """The quantization the raw per-rank files are converted (or planned) with: None for
    an online method (the weights before quantization), else the method itself."""
    return None if online_method(quantization, checkpoint_method) else quantization


def online_note(quantization: str, *, moe: bool | None) -> str:
    """What the result and the verification summary say about an online method."""
    note = (
        f"{quantization} is an online method: the rank files hold the weights before "
        "quantization (what the same conversion without it writes); serving quantizes them "
        "on its own hardware"
    )
    if quantization in MOE_ONLY_ONLINE_METHODS and moe is False:
        note += (
            f"; vLLM 0.32's {quantization} quantizes only MoE experts, so on this dense "
            "model every linear layer stays unquantized when served"
        )
    return note


# Error texts from a quantization kernel that no retry can change: the operation is not
# built for this device ("expected at most 0 argument(s)": a _C op registered without a
# kernel for this backend), the hardware lacks an instruction set, or vLLM says so.
_PERMANENT_KERNEL_MARKERS = (
    "expected at most 0 argument(s)",
    "not supported",
    "requires amx",
    "requires native amx",
    "failed to find a kernel",
    "no kernel",
    "backend supports the deployment configuration",
    "could not run",
    "not implemented for",
)


def permanent_kernel_error(message: str) -> bool:
    """Whether an engine error's message is a quantization kernel's permanent refusal."""
    text = message.lower()
    return any(marker in text for marker in _PERMANENT_KERNEL_MARKERS)


def kernel_refusal(quantization: str | None, kernels: dict[str, str | None] | None) -> str | None:
    """The preflight probe's reason why ``quantization`` has no kernel on the node type
    that converts (None: it has one, or the probe did not cover it)."""
    if not quantization or not kernels:
        return None
    reason = kernels.get(quantization)
    return reason if isinstance(reason, str) and reason else None


def unsupported_quantization(quantization: str | None, exc: Exception) -> PreshardError | None:
    """``exc`` (e.g. the planner's refusal) as the permanent ``UnsupportedQuantization``
    it is when a quantization kernel refused (``permanent_kernel_error``), with that
    kernel's own message; None when it is something else."""
    message = getattr(exc, "message", None) or str(exc)
    if not quantization or not permanent_kernel_error(message):
        return None
    return UnsupportedQuantization(
        f"quantization {quantization!r} has no kernel on this machine, and the conversion "
        f"needs it to load the checkpoint: {message}",
    )
