"""Status for the steps before (or instead of) a conversion: preflight, adopt, copy,
withdraw (pure; see core.steps). The conversion itself keeps core.status.

The CRD's field names stay as stored objects have them: ``status.decision`` records the
step in progress (``{"step": "Preflight"|"Adopt"|
"Copy"|"Withdraw"|"Convert", "jobName": ..., "startedAt": ..., "noAdopt": bool,
"noCopy": bool}``, the step record) so a restarted operator resumes it; ``status.path``
says which step produced the checkpoint (``Adopted``, ``Copied``, ``Converted``) once it is Ready,
``status.durationSeconds`` how long that took from the first reconcile, ``status.identity``
the conversion identity and ``status.origin`` where a copy came from.
"""

from __future__ import annotations

import copy
import datetime as dt
from typing import Any

from preshard.core import status as st
from preshard.core.quantity import format_bytes

ADOPTED, COPIED, CONVERTED = "Adopted", "Copied", "Converted"
STEP_RESULTS = (ADOPTED, COPIED, CONVERTED)  # the values of status.path
STEP_REASONS = {
    "Preflight": "Preflight",
    "Adopt": "Adopting",
    "Copy": "Copying",
    "Withdraw": "Withdrawing",
}
_FMT = "%Y-%m-%dT%H:%M:%SZ"


def seconds_between(start: str | None, end: str | None) -> int | None:
    if not start or not end:
        return None
    try:
        return max(
            0,
            int(
                (
                    dt.datetime.strptime(end, _FMT) - dt.datetime.strptime(start, _FMT)
                ).total_seconds()
            ),
        )
    except ValueError:
        return None


def _spec_valid(
    conds: list[dict[str, Any]], generation: int | None, now: str
) -> list[dict[str, Any]]:
    return st.set_condition(
        conds, st.SPEC_VALID, "True", "SpecValid", "the spec is valid", generation, now
    )


def status_for_step(
    current: dict[str, Any] | None,
    *,
    step_record: dict[str, Any],
    message: str,
    generation: int | None,
    now: str,
    identity: str | None = None,
) -> dict[str, Any]:
    """A step's Job is pending or running: Ready=False with the step's reason."""
    out = copy.deepcopy(current or {})
    reason = STEP_REASONS[step_record["step"]]
    conds = _spec_valid(out.get("conditions") or [], generation, now)
    conds = st.set_condition(conds, st.READY, "False", reason, message, generation, now)
    out["conditions"] = conds
    out["phase"] = st.PENDING if step_record["step"] == "Preflight" else st.RUNNING
    out["observedGeneration"] = generation
    out["decision"] = step_record
    if identity:
        out["identity"] = identity
    return out


def status_for_adopted_or_copied(
    current: dict[str, Any] | None,
    *,
    result: str,
    artifact: dict[str, Any],
    serving: dict[str, Any] | None,
    identity: str,
    origin: dict[str, Any] | None,
    started: str | None,
    generation: int | None,
    now: str,
) -> dict[str, Any]:
    """The checkpoint was adopted or copied: Succeeded, Ready once serving is set."""
    if result not in (ADOPTED, COPIED):
        raise ValueError(f"not an adopt or copy result: {result}")
    out = copy.deepcopy(current or {})
    conds = _spec_valid(out.get("conditions") or [], generation, now)
    took = seconds_between(started, now)
    verb = "adopted" if result == ADOPTED else f"copied from {(origin or {}).get('uri')}"
    total = int(artifact.get("totalBytes", 0))
    msg = (
        f"checkpoint {verb} at {artifact.get('uri')} ({artifact.get('files')} files, "
        f"{format_bytes(total)}, every object verified, no conversion)"
        + (f" in {took} s" if took is not None else "")
    )
    conds = st.set_condition(conds, st.PUBLISHED, "True", result, msg, generation, now)
    if serving is not None:
        conds = st.set_condition(
            conds,
            st.READY,
            "True",
            result,
            msg + f"; serve with ConfigMap {serving.get('configMapName')}",
            generation,
            now,
        )
        out["serving"] = serving
    else:
        conds = st.set_condition(
            conds,
            st.READY,
            "False",
            "ServingConfigPending",
            msg + "; writing the serving ConfigMap",
            generation,
            now,
        )
    out["conditions"] = conds
    out["phase"] = st.SUCCEEDED
    out["observedGeneration"] = generation
    out["artifact"] = {k: v for k, v in artifact.items() if k != "origin"}
    out["progress"] = {"stage": "Published", "bytesDone": total, "bytesTotal": total}
    out["path"] = result
    out["identity"] = identity
    if origin:
        out["origin"] = origin
    if started:
        out["startTime"] = started
    out["completionTime"] = now
    if took is not None:
        out["durationSeconds"] = took
    out.pop("decision", None)
    return out


def mark_converted(old: dict[str, Any] | None, new: dict[str, Any], now: str) -> dict[str, Any]:
    """A conversion that became Ready: record the step (``status.path``) and how long it
    took (from the preflight's start when there was one)."""
    ready = st.get_condition(new, st.READY) or {}
    if ready.get("status") != "True" or new.get("path") == CONVERTED:
        return new
    out = dict(new)
    out["path"] = CONVERTED
    step_record = out.pop("decision", None) or {}
    started = step_record.get("startedAt") or out.get("startTime")
    took = seconds_between(started, out.get("completionTime") or now)
    if took is not None:
        out["durationSeconds"] = took
    return out


def is_done(status: dict[str, Any] | None) -> bool:
    """Adopted or copied and Ready: nothing left to do."""
    ready = st.get_condition(status, st.READY) or {}
    return (status or {}).get("path") in (ADOPTED, COPIED) and ready.get("status") == "True"


def regenerate(current: dict[str, Any], generation: int | None, now: str) -> dict[str, Any]:
    """The same status acknowledged for a new generation (a mutable field such as
    ``verify`` changed on a resource that is already done): observedGeneration moves,
    nothing else (lastTransitionTime stays: no status changes)."""
    out = copy.deepcopy(current)
    conds = out.get("conditions") or []
    for c in list(conds):
        conds = st.set_condition(
            conds,
            str(c["type"]),
            str(c["status"]),
            str(c.get("reason") or "Unknown"),
            str(c.get("message") or ""),
            generation,
            now,
        )
    out["conditions"] = conds
    out["observedGeneration"] = generation
    return out
