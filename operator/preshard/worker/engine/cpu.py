"""The settings vLLM's CPU backend needs, from the pod's resources: the threads each rank
binds (``VLLM_CPU_OMP_THREADS_BIND``), the KV cache space (``VLLM_CPU_KVCACHE_SPACE``) and
the memory fraction a rank reserves. ``process`` applies them in the engine's child on
the CPU platform; the planner stands in for the same engine settings."""

from __future__ import annotations

import math
import os
from typing import Any

from preshard.core.estimate import (
    KV_MAX_MODEL_LEN,
    KV_MAX_NUM_SEQS,
    MIN_KV_CACHE_GIB,
    GiB,
    kv_cache_gib,
)
from preshard.worker import resources

# CPU-only settings (vLLM's CPU backend). The verification prompts are short: the
# engine needs room for CPU_MAX_NUM_SEQS sequences of CPU_MAX_MODEL_LEN tokens, which
# is what preshard.core.estimate sizes the KV cache (VLLM_CPU_KVCACHE_SPACE) for.
CPU_MAX_MODEL_LEN = KV_MAX_MODEL_LEN
CPU_MAX_NUM_SEQS = KV_MAX_NUM_SEQS
# --gpu-memory-utilization on CPU is the fraction of the NUMA node's memory a rank
# reserves (vLLM uses it only when VLLM_CPU_KVCACHE_SPACE is unset): each rank gets its
# share of the pod's memory limit (of the node without a limit), within these bounds.
CPU_MEMORY_UTILIZATION_MIN = 0.01
CPU_MEMORY_UTILIZATION_MAX = 0.9
CPU_MEMORY_UTILIZATION_UNKNOWN = 0.2  # no /proc/meminfo: the value measured on a laptop
# VLLM_CPU_KVCACHE_SPACE never takes more than this fraction of the pod's memory limit
# (per rank: limit / world_size x fraction), and never less than 1 GiB.
CPU_KVCACHE_MAX_FRACTION = 0.1


def omp_threads_bind(world_size: int, cpus: list[int] | None = None) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for ``world_size`` CPU ranks: the pod's usable CPUs
    (affinity cut to the cgroup CPU quota, :func:`resources.usable_cpus`) split into
    contiguous groups ("0|1" for two ranks on two CPUs, "0,1|2,3" for two on four); with
    fewer CPUs than ranks, ranks share CPUs round-robin (the operator refuses a Job that
    requests fewer cores than ranks)."""
    if world_size < 1:
        raise ValueError("world_size must be >= 1")
    cpus = sorted(cpus) if cpus is not None else resources.usable_cpus()
    cpus = cpus or [0]
    if len(cpus) < world_size:
        return "|".join(str(cpus[r % len(cpus)]) for r in range(world_size))
    per, extra = divmod(len(cpus), world_size)
    groups, start = [], 0
    for r in range(world_size):
        n = per + (1 if r < extra else 0)
        groups.append(",".join(str(c) for c in cpus[start : start + n]))
        start += n
    return "|".join(groups)


def cpu_kvcache_space(
    world_size: int,
    *,
    config: dict[str, Any] | None = None,
    tensor_parallel_size: int | None = None,
    memory_limit: int | None = None,
) -> int:
    """``VLLM_CPU_KVCACHE_SPACE`` in GiB per rank: what the verification prompts need
    for this model and layout (:func:`preshard.core.estimate.kv_cache_gib`; 1 GiB without
    config.json), at most CPU_KVCACHE_MAX_FRACTION of the rank's share of the pod's
    memory limit, at least 1 GiB."""
    need = MIN_KV_CACHE_GIB
    if config is not None:
        tp = tensor_parallel_size or world_size
        need = kv_cache_gib(config, tp, max(1, world_size // max(1, tp)))
    if memory_limit is not None:
        cap = math.floor(memory_limit / max(1, world_size) * CPU_KVCACHE_MAX_FRACTION / GiB)
        need = min(need, max(MIN_KV_CACHE_GIB, cap))
    return max(MIN_KV_CACHE_GIB, need)


def cpu_memory_utilization(
    world_size: int, *, memory_limit: int | None = None, node_total: int | None = None
) -> float:
    """``gpu_memory_utilization`` for a CPU rank: its share of the pod's memory limit (or
    of the node) as a fraction of the node's memory, within the CPU_MEMORY_* bounds."""
    node = node_total if node_total is not None else resources.node_memory()
    limit = memory_limit if memory_limit is not None else resources.memory_limit()
    if not node:
        return CPU_MEMORY_UTILIZATION_UNKNOWN
    pod = min(limit, node) if limit else node
    share = pod / node / max(1, world_size) * CPU_MEMORY_UTILIZATION_MAX
    return round(min(CPU_MEMORY_UTILIZATION_MAX, max(CPU_MEMORY_UTILIZATION_MIN, share)), 4)


def cpu_env(
    world_size: int,
    environ: dict[str, str] | os._Environ[str],
    *,
    config: dict[str, Any] | None = None,
    tensor_parallel_size: int | None = None,
    cpus: list[int] | None = None,
    memory_limit: int | None = None,
) -> dict[str, str]:
    """Environment defaults for vLLM's CPU backend, derived from the pod's resources
    (usable CPUs, memory limit; read from the cgroup when not given); values the user set
    are kept."""
    limit = memory_limit if memory_limit is not None else resources.memory_limit()
    wanted = {
        "VLLM_CPU_KVCACHE_SPACE": str(
            cpu_kvcache_space(
                world_size,
                config=config,
                tensor_parallel_size=tensor_parallel_size,
                memory_limit=limit,
            )
        ),
        "VLLM_CPU_OMP_THREADS_BIND": omp_threads_bind(world_size, cpus),
    }
    return {k: v for k, v in wanted.items() if not environ.get(k)}
