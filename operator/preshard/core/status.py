"""Status derivation: from what Kubernetes recorded (Job conditions, the pod's
termination message, the worker's progress lines) to ``.status``.

Conventions: ``Ready`` is the summary condition; every condition carries
observedGeneration; lastTransitionTime changes only when a condition's status changes;
reasons are PascalCase. Success and failure come from the Job's conditions, never from
pod counts.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

# DELETING and is_reason are re-exported (``X as X``): the phases and the reason rule
# are the status's vocabulary too (st.DELETING, st.is_reason).
from preshard.core.jobstate import DELETING as DELETING
from preshard.core.jobstate import (
    FAILED,
    PENDING,
    POD_BLOCKED_REASONS,
    REASON_RE,
    RUNNING,
    SUCCEEDED,
    PodProblem,
    job_outcome,
)
from preshard.core.jobstate import is_reason as is_reason
from preshard.core.progress import (
    INVALID_RESULT,
    ProgressRecord,
    Result,
    status_stage_seconds,
    verification_status,
)
from preshard.core.quantity import format_bytes

READY = "Ready"
SPEC_VALID = "SpecValid"
JOB_CREATED = "JobCreated"
CONVERTING = "Converting"
PUBLISHED = "Published"
CONDITION_ORDER = (READY, SPEC_VALID, JOB_CREATED, CONVERTING, PUBLISHED)

MAX_MESSAGE = 1024


def _check_reason(reason: str) -> str:
    if not REASON_RE.match(reason):
        raise ValueError(f"condition reason {reason!r} is not PascalCase")
    return reason


def set_condition(
    conditions: list[dict[str, Any]] | None,
    type_: str,
    status: str,
    reason: str,
    message: str,
    generation: int | None,
    now: str,
) -> list[dict[str, Any]]:
    """Return a new list with the condition set; lastTransitionTime kept unless status changed."""
    if status not in ("True", "False", "Unknown"):
        raise ValueError(f"condition status {status!r} must be True, False or Unknown")
    _check_reason(reason)
    out = [dict(c) for c in (conditions or []) if c.get("type") != type_]
    old = next((c for c in (conditions or []) if c.get("type") == type_), None)
    cond: dict[str, Any] = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message[:MAX_MESSAGE],
        "lastTransitionTime": old["lastTransitionTime"]
        if old and old.get("status") == status and old.get("lastTransitionTime")
        else now,
    }
    if generation is not None:
        cond["observedGeneration"] = generation
    out.append(cond)
    order = {t: i for i, t in enumerate(CONDITION_ORDER)}
    out.sort(key=lambda c: (order.get(c.get("type", ""), len(order)), c.get("type", "")))
    return out


def get_condition(status: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    for c in (status or {}).get("conditions") or []:
        if c.get("type") == type_:
            return dict(c)
    return None


def needs_polling(status: dict[str, Any] | None) -> bool:
    """Whether a checkpoint can change state while its Job does not change: a running
    worker reports progress in its pod log, and a pod that waits for the scheduler or the
    kubelet changes only itself. A Job that has not started needs no polling: it changes
    (an event) when it starts."""
    status = status or {}
    if not status.get("jobName"):
        return False
    if status.get("phase") == RUNNING:
        return True
    ready = get_condition(status, READY) or {}
    return status.get("phase") == PENDING and ready.get("reason") in POD_BLOCKED_REASONS


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


def status_events(
    old: dict[str, Any] | None, new: dict[str, Any], job_created: str | None = None
) -> list[Event]:
    """The Events for a status change: one when Ready's reason or the phase changes
    (Warning unless it is progress or success). ``job_created`` (the conversion Job was
    just created) is folded into that one as a JobCreated Event naming the new reason,
    unless the new state is a Warning (then both)."""
    old_phase, new_phase = (old or {}).get("phase"), new.get("phase")
    old_ready = get_condition(old, READY) or {}
    ready = get_condition(new, READY) or {}
    changed = old_ready.get("reason") != ready.get("reason") or old_phase != new_phase
    reason = str(ready.get("reason") or new_phase)
    message = str(ready.get("message") or "")
    ok = ready.get("status") == "True" or (
        new_phase in (PENDING, RUNNING) and reason not in POD_BLOCKED_REASONS
    )
    events: list[Event] = []
    if job_created is not None:
        if changed and ok:
            detail = f"{reason}: {message}" if message else reason
            return [Event("Normal", "JobCreated", f"{job_created}; {detail}")]
        events.append(Event("Normal", "JobCreated", job_created))
    if changed:
        events.append(Event("Normal" if ok else "Warning", reason, message))
    return events


def published_progress(
    total: int, result: Result | None, last: dict[str, Any] | None
) -> dict[str, Any]:
    """status.progress of a published checkpoint: all bytes done, the seconds each stage
    took (the result's, else the last progress record's) and the conversion's
    verification summary (what was compared and that it matched), when it sent one."""
    out: dict[str, Any] = {"stage": "Published", "bytesDone": total, "bytesTotal": total}
    stages = status_stage_seconds(
        (result.stages if result is not None else None) or (last or {}).get("stageSeconds")
    )
    if stages:
        out["stageSeconds"] = stages
    verification = verification_status(result.verification if result is not None else None)
    if verification:
        out["verification"] = verification
    return out


def derive_status(
    current: dict[str, Any] | None,
    *,
    generation: int | None,
    job_name: str,
    job: dict[str, Any] | None,
    result: Result | None,
    progress: ProgressRecord | None,
    now: str,
    serving: dict[str, Any] | None = None,
    pod: PodProblem | None = None,
    serving_error: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """The full new status for a checkpoint whose conversion Job is ``job``.

    ``serving_error`` (reason, message): the serving ConfigMap could not be written (one
    of that name exists and belongs to something else); Ready stays False with it.

    ``serving`` is the status.serving object (built by the caller once the ConfigMap
    exists); ``result`` is the newest pod's termination message; ``progress`` the last
    progress record from its log; ``pod`` what keeps that pod from starting
    (:func:`pod_problem`): while the Job has not finished, the checkpoint is Pending with
    that reason, not Converting.
    """
    st = copy.deepcopy(current or {})
    conds = st.get("conditions") or []
    conds = set_condition(
        conds, SPEC_VALID, "True", "SpecValid", "the spec is valid", generation, now
    )
    outcome = job_outcome(job)
    st["observedGeneration"] = generation
    st["jobName"] = job_name
    if outcome.start_time:
        st["startTime"] = outcome.start_time
    if job is not None:
        conds = set_condition(
            conds,
            JOB_CREATED,
            "True",
            "JobCreated",
            f"conversion Job {job_name} exists",
            generation,
            now,
        )
    if progress is not None:
        st["progress"] = progress.to_status()

    if outcome.phase == SUCCEEDED:
        artifact = result.artifact if result is not None and result.result == "Succeeded" else None
        st["completionTime"] = outcome.completion_time or now
        conds = set_condition(
            conds, CONVERTING, "False", "Completed", "conversion finished", generation, now
        )
        if artifact:
            st["phase"] = SUCCEEDED
            st["artifact"] = artifact
            total = int(artifact.get("totalBytes", 0))
            st["progress"] = published_progress(total, result, st.get("progress"))
            msg = f"checkpoint published at {artifact.get('uri')} ({artifact.get('files')} files, {format_bytes(total)})"
            conds = set_condition(conds, PUBLISHED, "True", "Published", msg, generation, now)
            if serving is not None:
                st["serving"] = serving
                conds = set_condition(
                    conds,
                    READY,
                    "True",
                    "Published",
                    msg + f"; serve with ConfigMap {serving.get('configMapName')}",
                    generation,
                    now,
                )
            elif serving_error is not None:
                conds = set_condition(
                    conds,
                    READY,
                    "False",
                    serving_error[0],
                    msg + "; " + serving_error[1],
                    generation,
                    now,
                )
            else:
                conds = set_condition(
                    conds,
                    READY,
                    "False",
                    "ServingConfigPending",
                    msg + "; writing the serving ConfigMap",
                    generation,
                    now,
                )
        elif result is not None and result.reason == INVALID_RESULT:
            # the pod's message is malformed (core.progress.Result.from_message): failed
            st["phase"] = FAILED
            msg = f"{result.message} (Job {job_name}); nothing of it was used"
            conds = set_condition(conds, PUBLISHED, "Unknown", INVALID_RESULT, msg, generation, now)
            conds = set_condition(conds, READY, "False", INVALID_RESULT, msg, generation, now)
        else:
            st["phase"] = FAILED
            msg = (
                f"the conversion Job {job_name} completed but its result (termination message) is missing; "
                "check the manifest with `preshard verify` and re-create the resource if needed"
            )
            conds = set_condition(
                conds, PUBLISHED, "Unknown", "ResultMissing", msg, generation, now
            )
            conds = set_condition(conds, READY, "False", "ResultMissing", msg, generation, now)
    elif outcome.phase == FAILED:
        st["phase"] = FAILED
        st["completionTime"] = outcome.completion_time or now
        if result is not None and result.result == "Failed" and result.reason:
            reason = result.reason if REASON_RE.match(result.reason) else "ConversionFailed"
            message = result.message or outcome.message or "conversion failed"
        else:
            reason = outcome.reason or "JobFailed"
            message = outcome.message or "the conversion Job failed"
        message = (
            f"{message} (Job {job_name}, {outcome.reason})"
            if outcome.reason and outcome.reason != reason
            else f"{message} (Job {job_name})"
        )
        conds = set_condition(conds, CONVERTING, "False", reason, message, generation, now)
        conds = set_condition(
            conds, PUBLISHED, "False", reason, "nothing was published", generation, now
        )
        conds = set_condition(conds, READY, "False", reason, message, generation, now)
    elif pod is not None:
        st["phase"] = PENDING
        conds = set_condition(conds, CONVERTING, "False", pod.detail, pod.message, generation, now)
        conds = set_condition(conds, READY, "False", pod.reason, pod.message, generation, now)
    elif outcome.phase == RUNNING:
        st["phase"] = RUNNING
        stage = progress.stage if progress is not None else "Starting"
        summary = progress.summary() if progress is not None else ""
        detail = f": {summary}" if summary else ""
        msg = f"conversion Job {job_name} is running ({stage}{detail})"
        conds = set_condition(
            conds,
            CONVERTING,
            "True",
            stage if REASON_RE.match(stage) else "Running",
            msg,
            generation,
            now,
        )
        conds = set_condition(conds, READY, "False", "Converting", msg, generation, now)
    else:
        st["phase"] = PENDING
        msg = f"conversion Job {job_name}: {outcome.message}"
        conds = set_condition(
            conds, CONVERTING, "False", outcome.reason or "JobPending", msg, generation, now
        )
        conds = set_condition(
            conds, READY, "False", outcome.reason or "JobPending", msg, generation, now
        )
    st["conditions"] = conds
    return st


def status_for_error(
    current: dict[str, Any] | None,
    *,
    reason: str,
    message: str,
    generation: int | None,
    now: str,
    spec_valid: bool = False,
    phase: str = FAILED,
) -> dict[str, Any]:
    """Status for a resource the operator will not (or not yet) convert."""
    st = copy.deepcopy(current or {})
    conds = st.get("conditions") or []
    if spec_valid:
        conds = set_condition(
            conds, SPEC_VALID, "True", "SpecValid", "the spec is valid", generation, now
        )
    else:
        conds = set_condition(conds, SPEC_VALID, "False", reason, message, generation, now)
    conds = set_condition(conds, READY, "False", reason, message, generation, now)
    st["conditions"] = conds
    st["phase"] = phase
    st["observedGeneration"] = generation
    return st


def status_for_spec_error(
    current: dict[str, Any] | None, reason: str, message: str, generation: int | None, now: str
) -> dict[str, Any]:
    return status_for_error(current, reason=reason, message=message, generation=generation, now=now)


def status_for_conflict(
    current: dict[str, Any] | None, message: str, generation: int | None, now: str
) -> dict[str, Any]:
    """Waiting for an output prefix another resource holds (``message`` from
    preshard.core.claims.conflict_message: it names no other namespace's resource)."""
    msg = message
    return status_for_error(
        current,
        reason="OutputConflict",
        message=msg,
        generation=generation,
        now=now,
        spec_valid=True,
        phase=PENDING,
    )


def status_patch(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """Top-level status fields that changed (a merge patch; removed keys become None)."""
    old = old or {}
    patch = {k: v for k, v in new.items() if old.get(k) != v}
    for k, v in list(patch.items()):
        # A merge patch merges objects: keys an object lost (a finished stage's rate and
        # ETA in status.progress) must be sent as null, or they would stay.
        was = old.get(k)
        if isinstance(v, dict) and isinstance(was, dict):
            gone = {sub: None for sub in was if sub not in v}
            if gone:
                patch[k] = {**v, **gone}
    for k in old:
        if k not in new:
            patch[k] = None
    return patch
