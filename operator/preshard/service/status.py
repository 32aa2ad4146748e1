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
        """Patch what changed from ``old``; post an Event when Ready's reason or the
        phase changed (and ``job_created``, the message of the Job's creation, in the
        same Event)."""
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
        for ev in st.status_events(old, new, job_created):
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
