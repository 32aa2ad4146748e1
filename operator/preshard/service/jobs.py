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

from preshard.core.naming import MANAGED_BY
from preshard.service.context import Service

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
_META_KEYS = ("name", "namespace", "uid", "labels", "annotations", "ownerReferences")
_CONTAINER_KEYS = ("name", "image", "command", "args")


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
