"""What the conversion pod was given (cgroup memory limit, CPU quota, affinity) and the
memory preflight that runs right after config.json is read, before any engine starts.

The operator cannot read config.json before the pod runs (the preflight Job of issue 10
will); until then the worker compares :func:`preshard.core.estimate.estimate_memory` with
its own cgroup memory limit and fails permanently (InsufficientMemory, exit 3) instead of
being OOM-killed an hour later.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

from preshard.core.errors import InsufficientMemory
from preshard.core.estimate import (
    EstimateUnavailable,
    MemoryEstimate,
    estimate_memory,
    memory_shortfall,
)

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
# cgroup v1 reports "no limit" as a huge page-aligned number
_V1_UNLIMITED = 2**60


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def memory_limit(root: Path = CGROUP_ROOT, environ: Any = None) -> int | None:
    """The pod's memory limit in bytes: the smaller of the cgroup's (v2 memory.max, else
    v1 memory/memory.limit_in_bytes) and ``PRESHARD_MEMORY_LIMIT`` (the Job sets it from
    the container's limits.memory through the Downward API); None when neither says."""
    environ = os.environ if environ is None else environ
    found = [v for v in (_cgroup_memory_limit(root), _env_bytes(environ)) if v is not None]
    return min(found) if found else None


def _env_bytes(environ: Any) -> int | None:
    raw = str(environ.get("PRESHARD_MEMORY_LIMIT") or "").strip()
    return int(raw) if raw.isdigit() and int(raw) > 0 else None


def _cgroup_memory_limit(root: Path) -> int | None:
    v2 = _read(root / "memory.max")
    if v2 is not None:
        return None if v2 == "max" or not v2.isdigit() else int(v2)
    v1 = _read(root / "memory" / "memory.limit_in_bytes")
    if v1 is not None and v1.isdigit():
        value = int(v1)
        return None if value >= _V1_UNLIMITED else value
    return None


def cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """CPU cores of the cgroup quota (v2 cpu.max "quota period", v1 cfs_quota/period);
    None when unlimited or unknown."""
    v2 = _read(root / "cpu.max")
    if v2 is not None:
        parts = v2.split()
        if len(parts) == 2 and parts[0] != "max" and parts[0].isdigit() and parts[1].isdigit():
            return int(parts[0]) / max(1, int(parts[1]))
        return None
    quota = _read(root / "cpu" / "cpu.cfs_quota_us") or _read(
        root / "cpu,cpuacct" / "cpu.cfs_quota_us"
    )
    period = _read(root / "cpu" / "cpu.cfs_period_us") or _read(
        root / "cpu,cpuacct" / "cpu.cfs_period_us"
    )
    if quota and period and quota.lstrip("-").isdigit() and period.isdigit():
        q, p = int(quota), int(period)
        return q / p if q > 0 and p > 0 else None
    return None


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on (affinity, i.e. the cpuset of the pod)."""
    if hasattr(os, "sched_getaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        if cpus:
            return cpus
    return list(range(os.cpu_count() or 1))


def usable_cpus(root: Path = CGROUP_ROOT, cpus: list[int] | None = None) -> list[int]:
    """The CPUs the ranks bind to: the affinity set, cut to the cgroup quota (a pod with
    limits.cpu: 4 on a 64-core node may use 4 cores' worth of time: binding 64 threads
    would only throttle them)."""
    cpus = sorted(cpus) if cpus is not None else allowed_cpus()
    quota = cpu_quota(root)
    if quota is not None:
        cpus = cpus[: max(1, math.floor(quota))]
    return cpus


def node_memory() -> int | None:
    """Total memory of the node (what vLLM's CPU worker measures its fraction against)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def accelerator_from_env(environ: Any = os.environ) -> str:
    """PRESHARD_ACCELERATOR set by the Job (cpu, or none for an engine-free conversion:
    the estimate's engine-free formula); gpu when absent."""
    value = str(environ.get("PRESHARD_ACCELERATOR") or "gpu").strip().lower()
    return value if value in ("gpu", "cpu", "none") else "gpu"


def check_memory(
    config: dict[str, Any],
    *,
    tensor_parallel_size: int,
    pipeline_parallel_size: int,
    dtype: str,
    quantization: str | None,
    max_file_size: int,
    accelerator: str | None = None,
    limit: int | None = None,
    root: Path = CGROUP_ROOT,
) -> MemoryEstimate | None:
    """Estimate the memory the conversion needs and fail (InsufficientMemory, permanent)
    when the pod's memory limit is below it. Returns the estimate (None: config.json
    cannot be counted; logged, never blocking)."""
    acc = accelerator or accelerator_from_env()
    try:
        est = estimate_memory(
            config,
            tensor_parallel_size=tensor_parallel_size,
            pipeline_parallel_size=pipeline_parallel_size,
            dtype=dtype,
            quantization=quantization,
            max_file_size=max_file_size,
            accelerator=acc,
        )
    except EstimateUnavailable as exc:
        log.warning("no memory estimate: %s", exc)
        return None
    have = limit if limit is not None else memory_limit(root)
    log.info(
        "memory estimate (%s): %d bytes; pod memory limit: %s",
        acc,
        est.total_bytes,
        have if have is not None else "none",
    )
    problem = memory_shortfall(have, est)
    if problem:
        raise InsufficientMemory(problem)
    return est
