"""kopf handlers of the steps before a conversion (preflight, adopt, copy, withdraw):
the index of Ready checkpoints by identity and their Jobs' events. The flow is
:mod:`preshard.service.steps`."""

from __future__ import annotations

from typing import Any

import kopf

from preshard import GROUP, PLURAL, VERSION
from preshard.core.children.steps import STEP_COMPONENTS
from preshard.core.naming import LABEL_CHECKPOINT, LABEL_COMPONENT
from preshard.core.steps import ready_checkpoint
from preshard.handlers.checkpoint import service
from preshard.service import reconcile


def identities(
    name: str,
    namespace: str,
    spec: dict[str, Any],
    meta: dict[str, Any],
    status: dict[str, Any],
    memo: Any,
    **_: Any,
) -> Any:
    """identity -> ReadyCheckpoint of every Ready checkpoint that records one."""
    default_endpoint = service(memo).config.default_s3_endpoint
    entry = ready_checkpoint(namespace, name, spec, meta, status, default_endpoint)
    return None if entry is None else dict([entry])


def _step_component(value: str | None, **_: Any) -> bool:
    return value in STEP_COMPONENTS


def on_step_job_event(
    event: dict[str, Any],
    outputs: kopf.Index[Any, Any],
    identities: kopf.Index[str, Any],
    checkpoints: kopf.Index[tuple[str, str], Any],
    jobs: kopf.Index[tuple[str, str], Any],
    memo: Any,
    **_: Any,
) -> None:
    reconcile.step_job_event(service(memo), event, outputs, identities, checkpoints, jobs)


def register(registry: kopf.OperatorRegistry) -> None:
    kopf.index(GROUP, VERSION, PLURAL, registry=registry)(identities)
    kopf.on.event(
        "batch",
        "v1",
        "jobs",
        labels={LABEL_COMPONENT: _step_component, LABEL_CHECKPOINT: kopf.PRESENT},
        registry=registry,
    )(on_step_job_event)
