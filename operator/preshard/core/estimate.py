"""Preflight estimate of the memory a conversion pod needs, from the model's config.json.

Pure functions (no I/O): the worker calls :func:`estimate_memory` right after it has
read config.json and compares the result with the pod's cgroup memory limit
(:func:`memory_shortfall`); the operator's preflight step (:mod:`preshard.core.steps`)
calls the same functions with the config.json it read, before any accelerator is
requested, and writes :meth:`MemoryEstimate.to_status` into ``status.memoryEstimate``.

The formula (docs/cpu-conversion.md shows it with measured figures)::

    P        parameters counted from config.json (embeddings, attention, MLP or experts,
             norms, lm_head unless tied; KV heads replicated when TP > KV heads)
    W        P_linear x b_linear + P_other x b_dtype      (bytes of one copy of the model;
             b_linear = bits/8 + scale bytes for a quantized checkpoint, else b_dtype)
    S        W / (TP x PP)                                (one rank's shard)
    B        max(TP x PP x min(maxFileSize, S), U)        (each rank serialises one file
                                                           part in memory while saving;
                                                           the verification engine runs
                                                           while the upload holds U)
    U        16 x 32Mi                                    (the upload's part buffers:
                                                           default concurrency x part size)
    cpu:  total = 1.1 x (W + B + TP x PP x (KV + E_rank) + E_frontend)
    gpu:  total = 1.1 x (B + TP x PP x E_rank_gpu + E_frontend)   (host memory; the
                                                           weights and KV cache are on GPUs)
    none: total = 1.1 x (3 x T + TP x PP x R + U + E_free)  (no engine: ``--engine none``)
    T        the largest source tensor (config.json: embeddings, lm_head, the largest
             Linear weight, fused qkv/gate_up counted as one)
    R        64Mi: one rank's open file part in the streaming writer
    E_free   2Gi: the process (Python, torch, vLLM's model classes on the meta device,
             the ranks' traces and the sharding metadata)

Without an engine nothing holds the model: the planner builds one rank's model at a
time on the meta device (no weights), and the writer reads each source tensor (or the
slice a rank needs) once, converts it to the saved dtype (a second copy) and streams
it into the ranks' files, part by part, uploading parts as they complete. The third T
covers a re-shard source (``worker.sources.checkpoint``): the rebuilt tensor, its
coverage mask (one byte per element) and one saved span read back.

The raw shards are saved (``preshard_raw`` loader, vLLM's ``ShardedStateLoader``) from the
loaded parameters one file part at a time, before ``process_weights_after_loading``; on
CPU that processing then prepacks each Linear layer for oneDNN and drops the plain
weight, one layer at a time (a transient the margin covers), so the weights are held
once. ``KV`` is the KV cache the CPU backend reserves per rank (``VLLM_CPU_KVCACHE_SPACE``,
:func:`kv_cache_gib`); ``E`` are the engine process overheads measured with vLLM 0.32
(constants below). The conversion engine and the verification engine never run at the
same time; the upload starts after the conversion engine is gone and overlaps the
verification engine, which holds no save buffers: so the larger of the two buffer sets
counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from preshard.core.quantity import parse_bytes

GiB = 2**30
MiB = 2**20

# Engine overheads (resident memory of processes apart from the weights), vLLM 0.32.
# CPU: measured on the tiny models here (docs/cpu-conversion.md), rounded up.
# Measured at TP=2 (docs/cpu-conversion.md): a worker process 1.43 GiB with its 1 GiB KV
# cache, the front end (preshard, the engine's process, EngineCore) 0.97 GiB together.
CPU_RANK_OVERHEAD = 3 * GiB // 2  # one vLLM CPU worker process (torch, oneDNN, vLLM)
FRONTEND_OVERHEAD = 3 * GiB // 2  # the preshard worker + vLLM's engine processes
# GPU: a CUDA context and vLLM's GPU worker on the host (not measured here: no GPU).
GPU_RANK_OVERHEAD = 4 * GiB
# The upload's part buffers (worker.store.transfer: concurrency 16 x 32 MiB parts), alive while
# the verification engine runs.
UPLOAD_BUFFERS = 16 * 32 * MiB
SAFETY_DIVISOR = 10  # a 10 % margin on top (allocator fragmentation, page cache, Python)
# The verification prompts need little KV cache: 8 sequences of at most 512 tokens
# (the CPU defaults of preshard.worker.engine.cpu).
KV_MAX_MODEL_LEN = 512
KV_MAX_NUM_SEQS = 8
MIN_KV_CACHE_GIB = 1

DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2}
# Checkpoint formats whose linear weights are stored in one byte (scales are negligible).
ONE_BYTE_METHODS = frozenset({"fp8", "fbgemm_fp8", "experts_int8", "int8", "w8a8"})

# "none": the engine-free path (``--engine none``: no engine, no accelerator).
ACCELERATORS = ("gpu", "cpu", "none")
# Engine-free (accelerator "none"): copies of the largest source tensor alive at once (as
# read and converted to the saved dtype; a re-shard source's rebuilt tensor, coverage mask
# and saved span), one open file part per rank, the process itself.
ENGINE_FREE_TENSOR_COPIES = 3
ENGINE_FREE_RANK_BUFFER = 64 * MiB
ENGINE_FREE_OVERHEAD = 2 * GiB


class EstimateUnavailable(ValueError):
    """config.json lacks what the estimate needs (an architecture it cannot count)."""


@dataclass(frozen=True)
class MemoryEstimate:
    """The memory a conversion pod needs (bytes) and how it was computed."""

    total_bytes: int
    parameters: int
    bytes_per_parameter: float
    per_rank_shard_bytes: int
    accelerator: str
    world_size: int
    breakdown: dict[str, int] = field(default_factory=dict)
    formula: str = ""

    def to_status(self) -> dict[str, Any]:
        """``status.memoryEstimate`` (the CRD's schema)."""
        return {
            "bytes": self.total_bytes,
            "quantity": format_gib(self.total_bytes),
            "accelerator": self.accelerator,
            "parameters": self.parameters,
            "perRankShardBytes": self.per_rank_shard_bytes,
            "breakdown": dict(self.breakdown),
            "formula": self.formula,
        }


def format_gib(n: int) -> str:
    """A Kubernetes quantity rounded up to a tenth of a GiB ("37.5Gi"), or Mi below 1 GiB."""
    if n < GiB:
        return f"{math.ceil(n / MiB)}Mi"
    tenths = math.ceil(n * 10 / GiB)
    return f"{tenths // 10}Gi" if tenths % 10 == 0 else f"{tenths / 10:.1f}Gi"


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    text = config.get("text_config")
    return text if isinstance(text, dict) else config


def _int(cfg: dict[str, Any], *names: str, default: int | None = None) -> int | None:
    for n in names:
        v = cfg.get(n)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return default


@dataclass(frozen=True)
class ParameterCount:
    linear: int  # weights of Linear layers (attention, MLP, experts): what quantization shrinks
    other: int  # embeddings, lm_head, norms, biases (kept in the model dtype)
    replicated_kv: int  # extra K/V weights when TP > KV heads (replicated per rank)

    @property
    def total(self) -> int:
        return self.linear + self.other


def count_parameters(config: dict[str, Any], tensor_parallel_size: int = 1) -> ParameterCount:
    """Parameters of a decoder-only transformer from its config.json.

    Dense (Llama, Mistral, Qwen2/3, Phi3) and MoE (Mixtral, Qwen-MoE, DeepSeek-style
    first_k_dense_replace and shared experts). Raises EstimateUnavailable when a field it
    needs is missing.
    """
    cfg = _text_config(config)
    hidden = _int(cfg, "hidden_size", "n_embd", "d_model")
    layers = _int(cfg, "num_hidden_layers", "n_layer", "num_layers")
    heads = _int(cfg, "num_attention_heads", "n_head")
    vocab = _int(cfg, "vocab_size")
    if hidden is None or layers is None or heads is None or vocab is None:
        missing = [
            n
            for n, v in (
                ("hidden_size", hidden),
                ("num_hidden_layers", layers),
                ("num_attention_heads", heads),
                ("vocab_size", vocab),
            )
            if v is None
        ]
        raise EstimateUnavailable(f"config.json has no {', '.join(missing)}")
    kv = _int(cfg, "num_key_value_heads", default=heads)
    assert kv is not None
    head_dim = _int(cfg, "head_dim", default=hidden // heads)
    assert head_dim is not None
    inter = _int(cfg, "intermediate_size", "n_inner", default=4 * hidden)
    assert inter is not None

    q = hidden * heads * head_dim
    k_v = 2 * hidden * kv * head_dim
    o = heads * head_dim * hidden
    attn = q + k_v + o
    model_type = str(cfg.get("model_type") or config.get("model_type") or "")
    bias = 0
    if cfg.get("attention_bias") is True or model_type in ("qwen2", "qwen2_moe"):
        bias += (heads + 2 * kv) * head_dim
    if model_type.startswith("qwen3"):
        bias += 2 * head_dim  # q_norm and k_norm

    experts = _int(cfg, "num_local_experts", "num_experts", "n_routed_experts", default=0)
    assert experts is not None
    dense_mlp = 3 * hidden * inter  # gate, up, down
    if experts:
        moe_inter = _int(cfg, "moe_intermediate_size", default=inter)
        assert moe_inter is not None
        shared = 3 * hidden * (_int(cfg, "shared_expert_intermediate_size", default=0) or 0)
        shared += 3 * hidden * moe_inter * (_int(cfg, "n_shared_experts", default=0) or 0)
        moe_mlp = experts * 3 * hidden * moe_inter + shared
        router = hidden * experts
        dense_layers = min(layers, _int(cfg, "first_k_dense_replace", default=0) or 0)
        linear = layers * attn + dense_layers * dense_mlp + (layers - dense_layers) * moe_mlp
        other = (layers - dense_layers) * router
    else:
        linear = layers * (attn + dense_mlp)
        other = 0
    norms = layers * 2 * hidden + hidden
    embed = vocab * hidden
    # A missing tie_word_embeddings counts a separate lm_head (the larger estimate).
    lm_head = 0 if cfg.get("tie_word_embeddings", config.get("tie_word_embeddings")) else embed
    other += layers * bias + norms + embed + lm_head
    tp = max(1, tensor_parallel_size)
    replicated = layers * 2 * hidden * head_dim * (tp - kv) if kv < tp else 0
    return ParameterCount(linear=linear, other=other, replicated_kv=replicated)


def dtype_bytes(config: dict[str, Any], dtype: str) -> int:
    """Bytes per element of the model dtype: ``dtype`` unless "auto", else config.json's."""
    if dtype != "auto":
        name = dtype
    else:
        cfg = _text_config(config)
        name = str(
            cfg.get("torch_dtype")
            or cfg.get("dtype")
            or config.get("torch_dtype")
            or config.get("dtype")
            or "bfloat16"
        )
    # vLLM loads float32 checkpoints as bfloat16 on CPU and float16/bfloat16 on GPUs only
    # when asked; counting 4 bytes for float32 is the safe side.
    return DTYPE_BYTES.get(name.removeprefix("torch."), 2)


def linear_bytes_per_parameter(config: dict[str, Any], model_bytes: int) -> float:
    """Bytes per Linear weight as stored in the checkpoint (quantization_config)."""
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        return float(model_bytes)
    bits = qc.get("bits") or qc.get("w_bit")
    if not isinstance(bits, int):
        # compressed-tensors: config_groups.*.weights.num_bits
        groups = qc.get("config_groups")
        if isinstance(groups, dict):
            for g in groups.values():
                w = g.get("weights") if isinstance(g, dict) else None
                if isinstance(w, dict) and isinstance(w.get("num_bits"), int):
                    bits = w["num_bits"]
                    break
    method = str(qc.get("quant_method") or "").lower()
    if isinstance(bits, int) and 0 < bits < 16:
        group = qc.get("group_size") or qc.get("q_group_size") or 128
        group = group if isinstance(group, int) and group > 0 else 0
        # one 16-bit scale (and a packed zero point) per group
        return bits / 8 + (2.5 / group if group else 0.0)
    if method in ONE_BYTE_METHODS:
        return 1.0
    return float(model_bytes)


def kv_cache_gib(
    config: dict[str, Any],
    tensor_parallel_size: int,
    pipeline_parallel_size: int,
    dtype: str = "auto",
) -> int:
    """``VLLM_CPU_KVCACHE_SPACE`` (GiB per rank) the verification prompts need: K and V of
    the rank's layers and KV heads for KV_MAX_NUM_SEQS x KV_MAX_MODEL_LEN tokens, rounded
    up to whole GiB, at least MIN_KV_CACHE_GIB."""
    try:
        cfg = _text_config(config)
        layers = _int(cfg, "num_hidden_layers", default=1) or 1
        heads = _int(cfg, "num_attention_heads", default=1) or 1
        kv = _int(cfg, "num_key_value_heads", default=heads) or heads
        hidden = _int(cfg, "hidden_size", default=heads * 128) or heads * 128
        head_dim = _int(cfg, "head_dim", default=hidden // heads) or 128
    except (TypeError, ValueError):
        return MIN_KV_CACHE_GIB
    per_rank_layers = math.ceil(layers / max(1, pipeline_parallel_size))
    per_rank_kv = max(1, math.ceil(kv / max(1, tensor_parallel_size)))
    need = (
        2
        * per_rank_layers
        * per_rank_kv
        * head_dim
        * dtype_bytes(config, dtype)
        * KV_MAX_MODEL_LEN
        * KV_MAX_NUM_SEQS
    )
    return max(MIN_KV_CACHE_GIB, math.ceil(need / GiB))


def largest_tensor_bytes(config: dict[str, Any], dtype: str = "auto") -> int:
    """Bytes of the largest checkpoint tensor, from config.json: the embeddings (or an
    untied lm_head) in the model dtype, or the largest Linear weight in the checkpoint's
    format (an HF-fused gate_up or qkv counted whole). Raises EstimateUnavailable."""
    cfg = _text_config(config)
    count_parameters(config)  # the same required fields, the same error
    hidden = _int(cfg, "hidden_size", "n_embd", "d_model") or 0
    heads = _int(cfg, "num_attention_heads", "n_head") or 1
    vocab = _int(cfg, "vocab_size") or 0
    kv = _int(cfg, "num_key_value_heads", default=heads) or heads
    head_dim = _int(cfg, "head_dim", default=hidden // heads) or 1
    inter = _int(cfg, "intermediate_size", "n_inner", default=4 * hidden) or 0
    moe_inter = _int(cfg, "moe_intermediate_size", default=0) or 0
    shared_inter = _int(cfg, "shared_expert_intermediate_size", default=0) or 0
    b_model = dtype_bytes(config, dtype)
    b_linear = linear_bytes_per_parameter(config, b_model)
    linear = max(
        2 * inter * hidden,  # gate_up (fused in some checkpoints)
        2 * max(moe_inter, shared_inter) * hidden,
        (heads + 2 * kv) * head_dim * hidden,  # qkv (fused in some checkpoints)
    )
    return max(vocab * hidden * b_model, math.ceil(linear * b_linear))


def estimate_memory(
    config: dict[str, Any],
    *,
    tensor_parallel_size: int,
    pipeline_parallel_size: int = 1,
    dtype: str = "auto",
    quantization: str | None = None,
    max_file_size: int = 5 * GiB,
    accelerator: str = "gpu",
) -> MemoryEstimate:
    """The pod memory a conversion needs (see the module docstring for the formula).

    ``quantization`` is the spec's method: an online method (e.g. fp8 on a bf16
    checkpoint) quantizes in process_weights_after_loading, after the weights were loaded
    in the model dtype, so only a quantized checkpoint's own quantization_config shrinks
    the estimate. Raises EstimateUnavailable for a config.json it cannot count and
    ValueError for bad arguments.
    """
    if accelerator not in ACCELERATORS:
        raise ValueError(f"accelerator must be one of {ACCELERATORS}, not {accelerator!r}")
    tp, pp = tensor_parallel_size, pipeline_parallel_size
    if tp < 1 or pp < 1:
        raise ValueError("tensor_parallel_size and pipeline_parallel_size must be >= 1")
    if max_file_size < 1:
        raise ValueError("max_file_size must be positive")
    del quantization  # documented above: the load happens in the checkpoint's format
    world = tp * pp
    count = count_parameters(config, tp)
    b_model = dtype_bytes(config, dtype)
    b_linear = linear_bytes_per_parameter(config, b_model)
    weights = math.ceil(count.linear * b_linear + (count.other + count.replicated_kv) * b_model)
    shard = math.ceil(weights / world)
    buffers = max(world * min(max_file_size, shard), UPLOAD_BUFFERS)
    params = count.total
    bpp = round(weights / params, 4) if params else 0.0
    if accelerator == "cpu":
        kv = kv_cache_gib(config, tp, pp, dtype) * GiB
        breakdown = {
            "weights": weights,
            "saveBuffers": buffers,
            "kvCache": world * kv,
            "engineOverhead": world * CPU_RANK_OVERHEAD + FRONTEND_OVERHEAD,
        }
        formula = (
            "1.1 x (weights W + buffers max(TPxPP x min(maxFileSize, W/(TPxPP)), upload 512Mi) + "
            "TPxPP x (KV cache VLLM_CPU_KVCACHE_SPACE + 1.5Gi per rank) + 1.5Gi frontend); "
            f"W = {params} parameters x {bpp} bytes"
        )
    elif accelerator == "gpu":
        breakdown = {
            "saveBuffers": buffers,
            "engineOverhead": world * GPU_RANK_OVERHEAD + FRONTEND_OVERHEAD,
        }
        formula = (
            "host memory: 1.1 x (buffers max(TPxPP x min(maxFileSize, W/(TPxPP)), upload 512Mi) + "
            "TPxPP x 4Gi per rank + 1.5Gi frontend); the weights (W/(TPxPP) per GPU) and the "
            f"KV cache are in GPU memory; W = {params} parameters x {bpp} bytes"
        )
    else:  # "none"
        largest = largest_tensor_bytes(config, dtype)
        breakdown = {
            "largestTensor": ENGINE_FREE_TENSOR_COPIES * largest,
            "writeBuffers": world * ENGINE_FREE_RANK_BUFFER,
            "uploadBuffers": UPLOAD_BUFFERS,
            "processOverhead": ENGINE_FREE_OVERHEAD,
        }
        formula = (
            "no engine: 1.1 x (3 x the largest source tensor T + TPxPP x 64Mi write buffers + "
            f"upload 512Mi + 2Gi process); T = {format_gib(largest)}, independent of the "
            f"model's size (W = {params} parameters x {bpp} bytes is streamed, never held)"
        )
    subtotal = sum(breakdown.values())
    breakdown["margin"] = -(-subtotal // SAFETY_DIVISOR)  # 10 %, rounded up
    return MemoryEstimate(
        total_bytes=subtotal + breakdown["margin"],
        parameters=params,
        bytes_per_parameter=bpp,
        per_rank_shard_bytes=shard,
        accelerator=accelerator,
        world_size=world,
        breakdown=breakdown,
        formula=formula,
    )


def memory_shortfall(memory_limit_bytes: int | None, estimate: MemoryEstimate) -> str | None:
    """A message when the pod's memory limit is below the estimate (None: it fits or the
    pod has no limit). It names both numbers and what to do."""
    if memory_limit_bytes is None or memory_limit_bytes >= estimate.total_bytes:
        return None
    need = format_gib(estimate.total_bytes)
    have = format_gib(memory_limit_bytes)
    weights = format_gib(estimate.breakdown.get("weights", 0))
    if estimate.accelerator == "cpu":
        where = f"{estimate.world_size} CPU ranks hold the model's {weights} of weights in the pod"
    elif estimate.accelerator == "none":
        where = "no engine: about twice the largest source tensor plus buffers"
    else:
        where = f"host memory of {estimate.world_size} GPU ranks"
    return (
        f"the conversion needs about {need} of memory ({estimate.total_bytes} bytes: {where}) "
        f"but the pod's memory limit is {have} ({memory_limit_bytes} bytes); set "
        f"spec.converter.resources.limits.memory (and requests.memory) to at least {need}, "
        "or lower output.maxFileSize to shrink the save buffers"
    )


def spec_memory_limit(resources: dict[str, Any] | None) -> int | None:
    """The memory limit a conversion container gets from ``spec.converter.resources``
    (limits.memory; None without one: the pod may use what the node has)."""
    value = ((resources or {}).get("limits") or {}).get("memory")
    return parse_bytes(str(value)) if value is not None else None


def preflight(
    config: dict[str, Any],
    *,
    tensor_parallel_size: int,
    pipeline_parallel_size: int,
    dtype: str,
    quantization: str | None,
    max_file_size: int,
    accelerator: str,
    resources: dict[str, Any] | None,
) -> tuple[MemoryEstimate | None, str | None]:
    """What the operator's preflight does with config.json before the conversion Job:
    the estimate for ``status.memoryEstimate`` (None when config.json cannot be counted)
    and the InsufficientMemory message when spec.converter.resources' memory limit is
    below it (None: it fits, or no limit is set)."""
    try:
        est = estimate_memory(
            config,
            tensor_parallel_size=tensor_parallel_size,
            pipeline_parallel_size=pipeline_parallel_size,
            dtype=dtype,
            quantization=quantization,
            max_file_size=max_file_size,
            accelerator=accelerator,
        )
    except EstimateUnavailable:
        return None, None
    return est, memory_shortfall(spec_memory_limit(resources), est)
