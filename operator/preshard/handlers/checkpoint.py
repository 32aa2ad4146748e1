"""kopf handlers for ShardedCheckpoint: decorators, filters and indexes; what happens is
the service's (:mod:`preshard.service`), found in kopf's ``memo`` (``memo.service``, set
by the operator's startup handler).

* create / resume / spec update, and a timer for resources that wait for something (a
  missing Secret, an output prefix owned by another resource; every few minutes, a
  step's Job as a safety net: steps advance on their Jobs' events) ->
  :func:`preshard.service.reconcile.reconcile`;
* indexes: the output claims, the checkpoints (for Job events) and the operator's Jobs
  (read from memory, never polled);
* a timer polls the progress of running conversions (and pods that cannot start);
* conversion Job events -> :func:`preshard.service.reconcile.job_event`;
* delete -> only ``deletionPolicy: Delete`` has a deletion handler (and so kopf's
  finalizer): :func:`preshard.service.deletion.delete`. ``Retain`` resources go at once
  (Job and ConfigMap are garbage-collected); their DELETED event only drops in-memory
  state. kopf adds its finalizer also while a timer matches a resource (progress
  polling, retries), whatever the policy.

Timer intervals are fixed when kopf registers a handler, so :func:`register` applies
the decorators with the operator's configuration (``preshard.runner``).
"""

from __future__ import annotations

from typing import Any, cast

import kopf

from preshard import GROUP, PLURAL, VERSION
from preshard.core import status as st
from preshard.core.claims import claim_of
from preshard.core.naming import LABEL_CHECKPOINT, LABEL_COMPONENT, MANAGED_BY
from preshard.core.stepstatus import STEP_REASONS
from preshard.service import Service, deletion, reconcile
from preshard.service.jobs import MANAGED_BY_LABEL, slim_job
from preshard.service.reconcile import SERVING_CONFLICT

# Ready reasons the retry timer re-checks (a Secret created, a prefix or a ConfigMap name
# released: nothing the operator watches tells it)
WAITING_REASONS = {"CredentialsSecretNotFound", "OutputConflict", SERVING_CONFLICT}
# A CPU step (preflight, adopt, copy, withdraw) advances on its Job's watch events; a
# slow safety timer (PRESHARD_STEP_RETRY_SECONDS, minutes) re-checks it from the Jobs
# index, so a missed event never leaves a resource stuck and a waiting one costs nothing.
STEP_WAITING_REASONS = frozenset(STEP_REASONS.values())


def service(memo: Any) -> Service:
    return cast(Service, memo.service)


# ---------------------------------------------------------------------------- indexes


def outputs(
    name: str,
    namespace: str,
    spec: dict[str, Any],
    meta: dict[str, Any],
    status: dict[str, Any],
    memo: Any,
    **_: Any,
) -> Any:
    """(endpoint, bucket) -> the OutputClaims on that store (preshard.core.claims: a
    resource that failed without publishing, was refused or waits for its Secret holds
    none)."""
    default_endpoint = service(memo).config.default_s3_endpoint
    claim = claim_of(namespace, name, spec, meta, status, default_endpoint)
    # {} (not None: kopf keeps an object's previous entries when the result is None)
    # drops a claim the resource no longer holds, e.g. once it failed without publishing
    return {} if claim is None else {claim.store: claim}


def jobs(body: kopf.Body, **_: Any) -> Any:
    """(namespace, name) -> the Job as the operator reads it (service.jobs.slim_job), for
    every Job labelled managed-by preshard: steps and conversions read their Job here
    instead of GETting it, and never create one that is already there."""
    meta = body.get("metadata") or {}
    return {(meta.get("namespace"), meta.get("name")): slim_job(body)}


_CHECKPOINT_META = (
    "name",
    "namespace",
    "uid",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
)


def checkpoints(body: kopf.Body, **_: Any) -> Any:
    """(namespace, name) -> what Job events need of a checkpoint (kept up to date by the
    watch, so a Job event costs no read). Spec and status are the event's own parsed
    objects, not copies (every event brings new ones; readers never modify them)."""
    meta = body.get("metadata") or {}
    slim = {
        "metadata": {k: meta.get(k) for k in _CHECKPOINT_META if meta.get(k) is not None},
        "spec": body.get("spec") or {},
        "status": body.get("status") or {},
    }
    return {(meta.get("namespace"), meta.get("name")): slim}


# ---------------------------------------------------------------------------- filters


def _ready_reason(status: dict[str, Any]) -> Any:
    cond = st.get_condition(status, st.READY)
    return cond.get("reason") if cond else None


def _waiting(status: dict[str, Any], **_: Any) -> bool:
    return _ready_reason(status) in WAITING_REASONS


def _in_step(status: dict[str, Any], **_: Any) -> bool:
    return _ready_reason(status) in STEP_WAITING_REASONS


def _polled(status: dict[str, Any], **_: Any) -> bool:
    return st.needs_polling(status)


def _purges_output(spec: dict[str, Any], **_: Any) -> bool:
    """Only ``deletionPolicy: Delete`` has work to do on deletion, so only it matches the
    deletion handler and gets kopf's finalizer. kopf evaluates the filter on the current
    body: switching to Delete adds the finalizer, back to Retain removes it (also during a
    stuck purge: the documented way to release the resource and keep the data)."""
    return (spec or {}).get("deletionPolicy") == "Delete"


def _deleted(type: str, **_: Any) -> bool:
    return type == "DELETED"


# --------------------------------------------------------------------------- handlers


def on_change(
    body: kopf.Body,
    outputs: kopf.Index[Any, Any],
    memo: Any,
    identities: kopf.Index[str, Any] | None = None,
    jobs: kopf.Index[tuple[str, str], Any] | None = None,
    **_: Any,
) -> None:
    reconcile.reconcile(service(memo), dict(body), outputs, identities, jobs)


def retry_waiting(
    body: kopf.Body,
    outputs: kopf.Index[Any, Any],
    memo: Any,
    identities: kopf.Index[str, Any] | None = None,
    jobs: kopf.Index[tuple[str, str], Any] | None = None,
    **_: Any,
) -> None:
    """Heal resources waiting for a Secret or for an output prefix to be released."""
    reconcile.reconcile(service(memo), dict(body), outputs, identities, jobs)


def retry_steps(
    body: kopf.Body,
    outputs: kopf.Index[Any, Any],
    memo: Any,
    identities: kopf.Index[str, Any] | None = None,
    jobs: kopf.Index[tuple[str, str], Any] | None = None,
    **_: Any,
) -> None:
    """The safety net of a resource whose step Job has not finished (its Job events move
    it on): the Job is read from the index, never fetched or created again."""
    reconcile.reconcile(service(memo), dict(body), outputs, identities, jobs)


def poll_progress(
    body: kopf.Body, memo: Any, jobs: kopf.Index[tuple[str, str], Any] | None = None, **_: Any
) -> None:
    reconcile.poll(service(memo), dict(body), jobs)


def on_job_event(
    event: dict[str, Any], checkpoints: kopf.Index[tuple[str, str], Any], memo: Any, **_: Any
) -> None:
    reconcile.job_event(service(memo), event, checkpoints)


def on_gone(body: kopf.Body, memo: Any, **_: Any) -> None:
    """Every resource, with or without a finalizer (a Retain resource is deleted at once,
    and kopf calls deletion handlers only for resources that carry its finalizer): drop
    its in-memory state and metrics."""
    service(memo).status.forget(str(body.get("metadata", {}).get("uid") or ""))


def on_delete(body: kopf.Body, outputs: kopf.Index[Any, Any], memo: Any, **_: Any) -> None:
    deletion.delete(service(memo), dict(body), outputs)


def register(
    registry: kopf.OperatorRegistry,
    *,
    poll_seconds: float,
    retry_seconds: float,
    step_retry_seconds: float = 300.0,
) -> None:
    """Register the ShardedCheckpoint handlers (the function names are kopf's handler
    ids, kept in its progress annotations: never rename them)."""
    res = (GROUP, VERSION, PLURAL)
    kopf.index(*res, registry=registry)(outputs)
    kopf.index(*res, registry=registry)(checkpoints)
    kopf.index("batch", "v1", "jobs", labels={MANAGED_BY_LABEL: MANAGED_BY}, registry=registry)(
        jobs
    )
    for on in (kopf.on.resume, kopf.on.create):
        on(*res, registry=registry)(on_change)
    kopf.on.update(*res, field="spec", registry=registry)(on_change)
    kopf.timer(
        *res,
        interval=retry_seconds,
        initial_delay=retry_seconds / 2,
        when=_waiting,
        registry=registry,
    )(retry_waiting)
    kopf.timer(
        *res,
        interval=step_retry_seconds,
        initial_delay=step_retry_seconds,
        when=_in_step,
        registry=registry,
    )(retry_steps)
    kopf.timer(
        *res,
        interval=poll_seconds,
        initial_delay=poll_seconds / 2,
        when=_polled,
        registry=registry,
    )(poll_progress)
    kopf.on.event(
        "batch",
        "v1",
        "jobs",
        labels={LABEL_COMPONENT: "converter", LABEL_CHECKPOINT: kopf.PRESENT},
        registry=registry,
    )(on_job_event)
    kopf.on.event(*res, when=_deleted, registry=registry)(on_gone)
    kopf.on.delete(*res, when=_purges_output, registry=registry)(on_delete)
