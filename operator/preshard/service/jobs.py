"""How the service finds and creates its Jobs without polling the API server.

The handlers keep a kopf in-memory index of every Job labelled
``app.kubernetes.io/managed-by=preshard`` (``handlers.checkpoint.jobs``, key
(namespace, name), value :func:`slim_job`), filled by the watch the operator holds anyway.
A Job in the index is never fetched and never created again; a Job not in it is created
with create-or-get (the names are deterministic: a 409 means it exists, and it is read
once). Without an index (unit tests, a Service used outside kopf) the API is asked.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from preshard.core import status as st
from preshard.core.jobpods import newest_owned_pod, result_container_statuses
from preshard.core.jobstate import job_outcome
from preshard.core.naming import MANAGED_BY
from preshard.core.progress import Result
from preshard.service.context import Service

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
_META_KEYS = ("name", "namespace", "uid", "labels", "annotations", "ownerReferences")
_CONTAINER_KEYS = ("name", "image", "command", "args")
_POD_META_KEYS = ("name", "namespace", "uid", "creationTimestamp", "ownerReferences")
_POD_STATUS_KEYS = ("phase", "conditions", "containerStatuses", "initContainerStatuses")


def slim_job(body: Mapping[str, Any]) -> dict[str, Any]:
    """What the operator reads of a Job: its identity and owners, its status, and its
    container's name, image, command and arguments (core.jobpods.owned_by_job)."""
    meta = body.get("metadata") or {}
    template = ((body.get("spec") or {}).get("template") or {}).get("spec") or {}
    containers = [
        {k: c.get(k) for k in _CONTAINER_KEYS if c.get(k) is not None}
        for c in (template.get("containers") or [])[:1]
        if isinstance(c, Mapping)
    ]
    return {
        "metadata": {k: meta.get(k) for k in _META_KEYS if meta.get(k) is not None},
        "spec": {"template": {"spec": {"containers": containers}}},
        "status": dict(body.get("status") or {}),
    }


def pod_key(body: Mapping[str, Any]) -> tuple[Any, Any]:
    """(namespace, the Job's name) of a Job's pod: its controller's name, else the label
    the Job controller sets (only narrows: core.jobpods.owned_by_job decides)."""
    meta = body.get("metadata") or {}
    owner = next(
        (
            r.get("name")
            for r in meta.get("ownerReferences") or []
            if isinstance(r, Mapping) and r.get("controller") and r.get("kind") == "Job"
        ),
        None,
    )
    return meta.get("namespace"), owner or (meta.get("labels") or {}).get("job-name")


def slim_pod(body: Mapping[str, Any]) -> dict[str, Any]:
    """What the operator reads of a Job's pod: its owners, its containers (as
    :func:`slim_job`) and its status (termination messages, what keeps it from
    starting)."""
    meta = body.get("metadata") or {}
    status = body.get("status") or {}
    containers = [
        {k: c.get(k) for k in _CONTAINER_KEYS if c.get(k) is not None}
        for c in (body.get("spec") or {}).get("containers") or []
        if isinstance(c, Mapping)
    ]
    return {
        "metadata": {k: meta.get(k) for k in _POD_META_KEYS if meta.get(k) is not None},
        "spec": {"containers": containers},
        "status": {k: status.get(k) for k in _POD_STATUS_KEYS if status.get(k) is not None},
    }


def _has_result(pod: Mapping[str, Any], job: Mapping[str, Any]) -> bool:
    for cs in result_container_statuses(pod, job):
        for state_key in ("state", "lastState"):
            if ((cs.get(state_key) or {}).get("terminated") or {}).get("message"):
                return True
    return False


def job_pod(svc: Service, job: dict[str, Any]) -> dict[str, Any] | None:
    """The newest of the Job's own pods: from the pods index (``svc.pods_index``, kept
    by the watch: no request) when there is one, else listed. Listed too when the index
    has none of the Job's pods (a pod without the template's labels, or its event lags
    the Job's) or, for a finished Job, none terminated with a message yet: a result is
    never missed."""
    index = svc.pods_index
    if index is None:
        return svc.api.job_pod(job)
    meta = job.get("metadata") or {}
    pod = newest_owned_pod(index.get((meta.get("namespace"), meta.get("name")), ()), job)
    finished = job_outcome(job).phase in (st.SUCCEEDED, st.FAILED)
    if pod is None or (finished and not _has_result(pod, job)):
        return svc.api.job_pod(job)
    return pod


def job_result(svc: Service, job: dict[str, Any]) -> Result | None:
    """The Job's result (the termination message of its own newest pod)."""
    return svc.api.termination_result(job_pod(svc, job), job)


def is_managed(labels: Mapping[str, Any] | None) -> bool:
    return (labels or {}).get(MANAGED_BY_LABEL) == MANAGED_BY


def indexed(index: Any, namespace: str, name: str) -> dict[str, Any] | None:
    """The Job from the index (None: not there)."""
    if index is None:
        return None
    for job in index.get((namespace, name), ()):
        return dict(job)
    return None


def find_job(svc: Service, index: Any, namespace: str, name: str) -> dict[str, Any] | None:
    """The Job of that name: from the index when there is one (no request), else a GET."""
    if index is not None:
        return indexed(index, namespace, name)
    return svc.api.get_job(namespace, name)


def ensure_job(svc: Service, index: Any, body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The Job ``body`` describes: the indexed one (never created twice), else
    create-or-get. (job, created)."""
    meta = body["metadata"]
    found = indexed(index, meta["namespace"], meta["name"])
    if found is not None:
        return found, False
    return svc.api.create_or_get_job(body)
