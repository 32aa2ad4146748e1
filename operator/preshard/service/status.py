"""The one writer of ``.status`` (and of the Events a status change posts).

The operator is the only writer of ``.status``: what it wrote last (kept per uid) is
what the API server has, fresher than kopf's body or a re-read that raced with another
handler's write. Status computations of one resource run one at a time (a lock per
uid, :meth:`StatusWriter.lock`), so a Job event and the handler that created the Job
never write the same status twice. Every status write of the operator goes through
here: :meth:`StatusWriter.write` (a change, its Event and the phase metrics) and
:meth:`StatusWriter.mark_deleting` (the deletion's phase, no Event of its own).
"""

from __future__ import annotations

import copy
import threading
from typing import Any, Protocol

from preshard import metrics
from preshard.core import status as st
from preshard.core.contract import utc_timestamp
from preshard.core.stepstatus import seconds_between
from preshard.service import events


class _Patcher(Protocol):
    def patch_checkpoint_status(self, namespace: str, name: str, patch: dict[str, Any]) -> bool: ...


def now() -> str:
    return utc_timestamp()


def announced(
    candidates: list[st.Event], new: dict[str, Any], job_created: str | None
) -> list[st.Event]:
    """The Events of a status change worth an API request each: a Job created (with the
    state it left the resource in), every Warning, and Ready (with how long the path took,
    ``status.durationSeconds``). A Normal step in between (JobPending -> Converting, a
    step resumed) is in the status and the Job's own events, not posted again."""
    out = []
    ready = st.get_condition(new, st.READY) or {}
    for ev in candidates:
        if (ev.reason == "JobCreated" and job_created is not None) or ev.type != "Normal":
            out.append(ev)
        elif ready.get("status") == "True" and ev.reason == ready.get("reason"):
            took = new.get("durationSeconds")
            path = str(new.get("path") or "").lower()
            if took is not None and path:
                took_s = f"{path} in {took} s"
                ev = st.Event(
                    ev.type, ev.reason, f"{ev.message} ({took_s})" if ev.message else took_s
                )
            out.append(ev)
    return out


class StatusWriter:
    def __init__(self, api: _Patcher) -> None:
        self._api = api
        self._guard = threading.Lock()
        self._written: dict[str, dict[str, Any]] = {}  # uid -> the status we last wrote
        self._locks: dict[str, threading.Lock] = {}  # uid -> held while computing it

    def lock(self, uid: str) -> threading.Lock:
        """Held while a resource's status is computed and written."""
        with self._guard:
            return self._locks.setdefault(uid, threading.Lock())

    def known(self, body: dict[str, Any]) -> dict[str, Any]:
        """The status as the API server has it: what we wrote last, else the body's."""
        with self._guard:
            written = self._written.get(body["metadata"]["uid"])
        return copy.deepcopy(written) if written is not None else dict(body.get("status") or {})

    def peek(self, body: dict[str, Any]) -> dict[str, Any]:
        """:meth:`known` without the copy, for filters that only read it (never modify
        what it returns)."""
        with self._guard:
            written = self._written.get(body["metadata"]["uid"])
        return written if written is not None else (body.get("status") or {})

    def forget(self, uid: str) -> None:
        """Drop a resource's cache, lock and metrics (it is gone or being deleted)."""
        with self._guard:
            self._written.pop(uid, None)
            self._locks.pop(uid, None)
        metrics.forget(uid)

    def write(
        self,
        body: dict[str, Any],
        old: dict[str, Any] | None,
        new: dict[str, Any],
        job_created: str | None = None,
    ) -> None:
        """Patch what changed from ``old``; post an Event when a Job was created
        (``job_created``, its message, with the state it left the resource in), on a
        Warning and when the resource becomes Ready (:func:`announced`)."""
        meta = body["metadata"]
        patch = st.status_patch(old, new)
        if patch:
            if not self._api.patch_checkpoint_status(meta["namespace"], meta["name"], patch):
                return  # deleted meanwhile
            with self._guard:
                self._written[meta["uid"]] = copy.deepcopy(new)
            metrics.observe_phase(
                meta["uid"],
                str(new.get("phase")),
                (old or {}).get("phase"),
                seconds_between(new.get("startTime"), new.get("completionTime")),
            )
        for ev in announced(st.status_events(old, new, job_created), new, job_created):
            events.post(body, ev.type, ev.reason, ev.message)

    def write_known(
        self, body: dict[str, Any], new: dict[str, Any], job_created: str | None = None
    ) -> None:
        """Write ``new`` against what the API server has (callers whose ``old`` carries
        overlays, such as an identity just computed)."""
        self.write(body, self.known(body), new, job_created)

    def mark_deleting(self, body: dict[str, Any], status: dict[str, Any]) -> None:
        """``phase: Deleting`` while the deletion stops the Job or purges (its own Events
        say what it does; the resource's cache is already dropped)."""
        if status.get("phase") == st.DELETING:
            return
        meta = body["metadata"]
        self._api.patch_checkpoint_status(meta["namespace"], meta["name"], {"phase": st.DELETING})
        status["phase"] = st.DELETING
