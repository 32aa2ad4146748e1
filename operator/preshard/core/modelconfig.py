"""The model's config.json as the operator reads it (pure): the fields it uses, typed and
bounded (tenant input: a pod of the tenant's namespace reported them), and what the
checkpoint's quantization means for a conversion on vLLM's CPU backend. The memory
estimate (:mod:`preshard.core.estimate`) counts with these fields."""

from __future__ import annotations

import math
from typing import Any

# The config.json numbers the operator reads from the preflight's findings (tenant input:
# a pod of the tenant's namespace wrote them), each with its largest sane value. Far
# above any real model, low enough that nothing downstream overflows a float or loops
# over a range for long (core.plan's divisor list, the estimate's products).
CONFIG_NUMBER_BOUNDS: dict[str, int] = {
    "hidden_size": 2**24,
    "num_hidden_layers": 2**16,
    "intermediate_size": 2**26,
    "num_attention_heads": 2**16,
    "num_key_value_heads": 2**16,
    "head_dim": 2**20,
    "vocab_size": 2**26,
    "max_position_embeddings": 2**34,
    "num_local_experts": 2**16,
    "num_experts": 2**16,
    "num_experts_per_tok": 2**16,
    "moe_intermediate_size": 2**26,
}
_CONFIG_STRINGS = ("model_type", "torch_dtype")
MAX_CONFIG_STRING = 64


class InvalidModelConfig(ValueError):
    """A config.json number the operator reads is not a non-negative integer within
    CONFIG_NUMBER_BOUNDS (reason InvalidModelConfig)."""


def model_config(raw: Any) -> tuple[dict[str, Any], str | None]:
    """The config.json fields the operator uses, typed and bounded, from the preflight's
    findings: (fields, problem). Numbers must be non-negative integers within
    CONFIG_NUMBER_BOUNDS (an integral float such as 4096.0 counts); a number that is not
    one is the problem (InvalidModelConfig, naming the field) and is left out. Strings,
    booleans and the architectures list are optional: a value of another type or size
    is ignored. Everything else is dropped. Never raises."""
    if not isinstance(raw, dict):
        return {}, None
    out: dict[str, Any] = {}
    problems: list[str] = []
    for name, bound in CONFIG_NUMBER_BOUNDS.items():
        if name not in raw or raw[name] is None:
            continue
        v = raw[name]
        if isinstance(v, float) and math.isfinite(v) and v.is_integer() and 0 <= v <= bound:
            v = int(v)
        if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= bound:
            out[name] = v
        else:
            if isinstance(v, int | float | bool) and len(repr(v)) <= 24:
                what = repr(v)
            elif isinstance(v, int):
                what = f"an integer of {len(str(abs(v)))} digits"
            else:
                what = f"a {type(v).__name__}"
            problems.append(f"{name} is {what}, not an integer from 0 to {bound}")
    for name in _CONFIG_STRINGS:
        v = raw.get(name)
        if isinstance(v, str) and len(v) <= MAX_CONFIG_STRING:
            out[name] = v
    arch = raw.get("architectures")
    if isinstance(arch, list) and all(isinstance(x, str) for x in arch[:4]):
        out["architectures"] = [x[:MAX_CONFIG_STRING] for x in arch[:4]]
    if isinstance(raw.get("tie_word_embeddings"), bool):
        out["tie_word_embeddings"] = raw["tie_word_embeddings"]
    qc = raw.get("quantization_config")
    if isinstance(qc, dict):
        method = qc.get("quant_method")
        if isinstance(method, str) and len(method) <= MAX_CONFIG_STRING:
            out["quantization_config"] = {"quant_method": method}
    if not problems:
        return out, None
    return out, "the model's config.json: " + "; ".join(problems[:3])


# Pre-quantized checkpoint methods whose raw shards vLLM 0.32's sharded_state loader
# cannot reload on the CPU backend: the conversion saves them right (the engine-free check
# rebuilds every packed tensor bit for bit), but the reload fails with a KeyError on the
# packed zero points (tests/vllm/test_arch_matrix.py, 4-bit GPTQ at TP=2). Refused before
# any engine or Job instead of publishing a checkpoint that cannot be served from.
RAW_RELOAD_UNPROVEN_ON_CPU = frozenset(
    {"gptq", "gptq_marlin", "auto_gptq", "awq", "awq_marlin", "auto_awq"}
)


def prequantized_method(config: dict[str, Any]) -> str | None:
    """The method a pre-quantized checkpoint's config.json declares, lower case."""
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        text = config.get("text_config")
        qc = text.get("quantization_config") if isinstance(text, dict) else None
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    return method.lower() if isinstance(method, str) and method else None


def cpu_raw_reload_refusal(config: dict[str, Any], quantization: str | None) -> str | None:
    """Why a conversion on vLLM's CPU backend is refused for this checkpoint (None: it
    is not): a pre-quantized GPTQ/AWQ checkpoint (or --quantization of that family)."""
    method = (quantization or "").lower() or prequantized_method(config)
    if method not in RAW_RELOAD_UNPROVEN_ON_CPU:
        return None
    return (
        f"the checkpoint is quantized with {method}: vLLM 0.32's sharded_state loader cannot "
        "reload its shards on the CPU backend (a KeyError on the packed zero points), so a "
        "CPU conversion would publish a checkpoint that cannot be served; it is refused "
        "before any engine starts. Use an unquantized checkpoint on CPU, or accelerator: gpu "
        "(GPU reloads of GPTQ/AWQ shards are not proven by preshard's tests)"
    )
