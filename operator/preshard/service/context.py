"""The service's dependencies, one object per operator: the configuration, the
Kubernetes API helpers, the status writer. The operator's startup handler puts it in
kopf's ``memo`` (``memo.service``); tests build their own with fakes."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from preshard.core.config import OperatorConfig
from preshard.core.progress import ProgressRecord, Result
from preshard.service.status import StatusWriter


class KubeCalls(Protocol):
    """The Kubernetes calls the service makes (:class:`preshard.k8s.api.KubeApi`)."""

    def secret_exists(self, namespace: str, name: str) -> bool: ...
    def create_or_get_job(self, manifest: dict[str, Any]) -> tuple[dict[str, Any], bool]: ...
    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def delete_job(self, namespace: str, name: str, propagation: str = ...) -> bool: ...
    def newest_pod(self, namespace: str, job_name: str) -> dict[str, Any] | None: ...
    def termination_result(self, pod: dict[str, Any] | None) -> Result | None: ...
    def pod_progress(self, namespace: str, pod_name: str) -> ProgressRecord | None: ...
    def patch_checkpoint_status(self, namespace: str, name: str, patch: dict[str, Any]) -> bool: ...
    def get_checkpoint(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def apply_configmap(self, manifest: dict[str, Any], owner_uid: str) -> bool: ...


def _positive(env: Mapping[str, str], key: str, default: float) -> float:
    raw = (env.get(key) or "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{key}={raw!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{key}={raw!r} must be a finite number > 0")
    return value


@dataclass(frozen=True)
class Options:
    """Operator switches not (yet) in :class:`OperatorConfig`: ``PRESHARD_PREFLIGHT``
    (1, the default: preflight, adopt, copy before converting; 0: convert at once) and
    ``PRESHARD_RETRY_SECONDS`` (how often resources that wait are re-checked)."""

    preflight: bool = True
    retry_seconds: float = 10.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Options:
        return cls(
            preflight=(env.get("PRESHARD_PREFLIGHT") or "1").strip() != "0",
            retry_seconds=_positive(env, "PRESHARD_RETRY_SECONDS", 10.0),
        )


class _NoApi:
    """The API of a Service built without one (pure uses such as the indexes)."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"no Kubernetes API in this Service (called {name})")


@dataclass
class Service:
    """What every service function gets: ``config`` (the operator's configuration),
    ``api`` (the Kubernetes calls), ``options`` and ``status`` (the one status writer,
    with its per-resource cache and locks)."""

    config: OperatorConfig = field(default_factory=OperatorConfig)
    api: KubeCalls = field(default_factory=_NoApi)  # type: ignore[assignment]
    options: Options = field(default_factory=Options)
    status: StatusWriter = field(init=False)

    def __post_init__(self) -> None:
        self.status = StatusWriter(self.api)

    @property
    def preflight(self) -> bool:
        return self.options.preflight
