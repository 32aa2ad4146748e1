"""Where a Job and its pod stand (pure): the phase from the Job's conditions (never from
pod counts) and what keeps a pod from starting (the scheduler's and the kubelet's
reasons). :mod:`preshard.core.status` turns both into ``.status``; the phases and the
PascalCase reason rule are the status's too."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

PENDING, RUNNING, SUCCEEDED, FAILED, DELETING = (
    "Pending",
    "Running",
    "Succeeded",
    "Failed",
    "Deleting",
)
REASON_RE = re.compile(r"^[A-Z][A-Za-z0-9]*$")


def is_reason(value: str) -> bool:
    """A Kubernetes condition reason: PascalCase letters and digits."""
    return bool(REASON_RE.match(value))


# Ready reasons of a conversion pod that exists but cannot start by itself, and the
# kubelet's waiting reasons that mean so (the container stays waiting until someone fixes
# the image, the Secret/ConfigMap it references, or the node).
UNSCHEDULABLE, POD_WAITING = "Unschedulable", "PodWaiting"
POD_BLOCKED_REASONS = frozenset({UNSCHEDULABLE, POD_WAITING})
POD_WAITING_REASONS = frozenset(
    {
        "CreateContainerConfigError",
        "CreateContainerError",
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "ErrImageNeverPull",
    }
)
_IMAGE_HINT = (
    "check the converter image (spec.converter.image or the operator's default) and the "
    "registry credentials (imagePullSecrets of the Job's ServiceAccount)"
)
_WAITING_HINTS = {
    "CreateContainerConfigError": "create or fix the Secret/ConfigMap (or key) it names",
    "CreateContainerError": "see `kubectl describe pod` and the converter settings in spec.converter",
    "ErrImagePull": _IMAGE_HINT,
    "ImagePullBackOff": _IMAGE_HINT,
    "InvalidImageName": _IMAGE_HINT,
    "ErrImageNeverPull": _IMAGE_HINT,
}


def _job_condition(job: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_ and c.get("status") == "True":
            return dict(c)
    return None


@dataclass(frozen=True)
class JobOutcome:
    phase: str  # Pending | Running | Succeeded | Failed
    reason: str | None = None
    message: str | None = None
    start_time: str | None = None
    completion_time: str | None = None


def job_outcome(job: dict[str, Any] | None) -> JobOutcome:
    """Where a Job stands, from its conditions (Complete/SuccessCriteriaMet,
    Failed/FailureTarget) and start/completion times only."""
    if job is None:
        return JobOutcome(PENDING, "JobNotFound", "the conversion Job does not exist")
    st = job.get("status") or {}
    start = st.get("startTime")
    for type_ in ("Complete", "SuccessCriteriaMet"):
        c = _job_condition(job, type_)
        if c is not None:
            return JobOutcome(
                SUCCEEDED,
                "Completed",
                c.get("message") or "the conversion Job completed",
                start,
                st.get("completionTime") or c.get("lastTransitionTime"),
            )
    for type_ in ("Failed", "FailureTarget"):
        c = _job_condition(job, type_)
        if c is not None:
            reason = c.get("reason") or "JobFailed"
            if not REASON_RE.match(reason):
                reason = "JobFailed"
            return JobOutcome(
                FAILED,
                reason,
                c.get("message") or "the conversion Job failed",
                start,
                c.get("lastTransitionTime"),
            )
    if start or st.get("active"):
        return JobOutcome(RUNNING, "JobRunning", None, start)
    return JobOutcome(
        PENDING,
        "JobPending",
        "waiting for the conversion pod to start (GPU capacity, image pull)",
        start,
    )


@dataclass(frozen=True)
class PodProblem:
    """Why the conversion pod cannot start: ``reason`` is Ready's (Unschedulable or
    PodWaiting), ``detail`` the scheduler's or kubelet's own reason (Converting's)."""

    reason: str
    detail: str
    message: str


def pod_problem(pod: dict[str, Any] | None) -> PodProblem | None:
    """What keeps the pod from starting, from what the scheduler (PodScheduled=False,
    reason Unschedulable) and the kubelet (a container waiting with a reason in
    POD_WAITING_REASONS) recorded; None if nothing does (or the pod already ran)."""
    if pod is None:
        return None
    name = (pod.get("metadata") or {}).get("name") or "?"
    status = pod.get("status") or {}
    if status.get("phase") in ("Succeeded", "Failed"):
        return None
    for c in status.get("conditions") or []:
        if (
            c.get("type") == "PodScheduled"
            and c.get("status") == "False"
            and c.get("reason") == UNSCHEDULABLE
        ):
            why = str(c.get("message") or "no node fits the pod").strip().rstrip(".")
            return PodProblem(
                UNSCHEDULABLE,
                UNSCHEDULABLE,
                f"conversion pod {name} cannot be scheduled: {why}; it starts once a node fits "
                "(add GPU nodes or free GPUs, or adjust spec.converter resources, nodeSelector "
                "or tolerations)",
            )
    for key in ("initContainerStatuses", "containerStatuses"):
        for cs in status.get(key) or []:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            reason = waiting.get("reason")
            if reason in POD_WAITING_REASONS:
                why = str(waiting.get("message") or "").strip()
                return PodProblem(
                    POD_WAITING,
                    reason,
                    f"conversion pod {name} cannot start: {reason}"
                    + (f": {why}" if why else "")
                    + f"; {_WAITING_HINTS[reason]}",
                )
    return None
