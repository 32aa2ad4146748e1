"""Which pods speak for a Job (pure): the one rule the operator applies before it reads a
termination message (a step's or a conversion's result) or a progress line.

A pod is the Job's own when

* its **controller** ownerReference (``controller: true``; at most one per object) is
  the Job: ``kind: Job``, ``apiVersion: batch/v1``, the Job's name and **uid** (a Job
  re-created under the same name has another uid), and it is in the Job's namespace;
* it runs the Job's container: a container of the template's name with the template's
  image, command and arguments (the Job controller copies the template into every pod).

Labels alone (``job-name``, ``controller-uid``) prove nothing: whoever may create pods in
the namespace sets any label. The ownerReference is checked because the Job controller
sets it on every pod it creates; the container check because an ownerReference is
settable too by whoever can read the Job's uid: such a pod must then run the operator's
own worker image with the operator's own arguments, i.e. report what that worker finds.
docs/security.md ("Job results") states what a tenant's pod can and cannot influence.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def _controller_ref(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    controllers = [r for r in refs if isinstance(r, Mapping) and r.get("controller") is True]
    return controllers[0] if len(controllers) == 1 else None


def job_container(job: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The container the Job's pods run (its template's first container)."""
    spec = ((job.get("spec") or {}).get("template") or {}).get("spec") or {}
    containers = spec.get("containers") or []
    first = containers[0] if containers else None
    return first if isinstance(first, Mapping) else None


def owned_by_job(pod: Mapping[str, Any], job: Mapping[str, Any]) -> bool:
    """Whether ``pod`` is one of ``job``'s own pods (see the module docstring)."""
    pmeta = pod.get("metadata") or {}
    jmeta = job.get("metadata") or {}
    uid = jmeta.get("uid")
    if not uid or not jmeta.get("name") or pmeta.get("namespace") != jmeta.get("namespace"):
        return False
    ref = _controller_ref(pod)
    if ref is None or not (
        ref.get("kind") == "Job"
        and ref.get("apiVersion") == "batch/v1"
        and ref.get("uid") == uid
        and ref.get("name") == jmeta.get("name")
    ):
        return False
    want = job_container(job)
    if want is None:
        return False
    for c in (pod.get("spec") or {}).get("containers") or []:
        if isinstance(c, Mapping) and c.get("name") == want.get("name"):
            return all(
                (c.get(k) or None) == (want.get(k) or None) for k in ("image", "command", "args")
            )
    return False


def newest_owned_pod(
    pods: Iterable[Mapping[str, Any]], job: Mapping[str, Any]
) -> dict[str, Any] | None:
    """The newest of ``job``'s own pods among ``pods`` (by creationTimestamp, then name);
    every other pod, whatever its labels, is ignored."""
    own = [dict(p) for p in pods if isinstance(p, Mapping) and owned_by_job(p, job)]
    if not own:
        return None
    own.sort(
        key=lambda p: (
            str(p["metadata"].get("creationTimestamp") or ""),
            str(p["metadata"].get("name") or ""),
        )
    )
    return own[-1]


def result_container_statuses(
    pod: Mapping[str, Any], job: Mapping[str, Any]
) -> list[Mapping[str, Any]]:
    """The status of the Job's container in its pod (the only one whose termination
    message is read)."""
    want = job_container(job)
    name = want.get("name") if want is not None else None
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return [cs for cs in statuses if isinstance(cs, Mapping) and cs.get("name") == name]
