"""The service's dependencies, one object per operator: the configuration, the
Kubernetes API helpers, the status writer. The operator's startup handler puts it in
kopf's ``memo`` (``memo.service``); tests build their own with fakes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from preshard.core.config import OperatorConfig
from preshard.core.progress import ProgressRecord, Result
from preshard.service.status import StatusWriter


class KubeCalls(Protocol):
    """The Kubernetes calls the service makes (:class:`preshard.k8s.api.KubeApi`)."""

    def secret_exists(self, namespace: str, name: str) -> bool: ...
    def create_or_get_job(self, body: dict[str, Any]) -> tuple[dict[str, Any], bool]: ...
    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def delete_job(self, namespace: str, name: str, propagation: str = ...) -> bool: ...
    def job_pod(self, job: dict[str, Any]) -> dict[str, Any] | None: ...
    def termination_result(
        self, pod: dict[str, Any] | None, job: dict[str, Any]
    ) -> Result | None: ...
    def pod_progress(self, namespace: str, pod_name: str) -> ProgressRecord | None: ...
    def patch_checkpoint_status(self, namespace: str, name: str, patch: dict[str, Any]) -> bool: ...
    def get_checkpoint(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def apply_configmap(self, body: dict[str, Any], owner_uid: str) -> bool: ...


class _NoApi:
    """The API of a Service built without one (pure uses such as the indexes)."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"no Kubernetes API in this Service (called {name})")


@dataclass
class Service:
    """What every service function gets: ``config`` (the operator's configuration),
    ``api`` (the Kubernetes calls) and ``status`` (the one status writer, with its
    per-resource cache and locks)."""

    config: OperatorConfig = field(default_factory=OperatorConfig)
    api: KubeCalls = field(default_factory=_NoApi)  # type: ignore[assignment]
    status: StatusWriter = field(init=False)
    # kopf's in-memory index of the Jobs' pods (service.jobs.job_pod; None: list them)
    pods_index: Any = field(default=None, init=False)
    # the operator's ledger ConfigMap as last read or written (service.ledger)
    ledger_cache: dict[str, str] | None = field(default=None, init=False)
    # batches ledger entries (service.ledger.LedgerWriter; None: written at once)
    ledger_writer: Any = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.status = StatusWriter(self.api)

    @property
    def preflight(self) -> bool:
        return self.config.preflight
