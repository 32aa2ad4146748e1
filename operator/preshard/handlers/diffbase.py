"""kopf's diff-base ("what was handled last") read from the status the operator writes,
instead of an annotation kopf patches after every handled change.

kopf compares a resource with its last handled state to tell a creation, a resumption
and a spec update apart, and by default stores that state after each handling cycle: a
merge patch of the resource (``last-handled-configuration`` and its ``kopf-managed``
marker) for every resource it creates. The operator's status already says which
generation it handled: every status it writes carries ``observedGeneration``, written
by the handler that handled that generation (service.status). So:

* no status with ``observedGeneration``: never handled, a creation;
* ``observedGeneration`` equal to ``metadata.generation``: the current state is the
  handled one (nothing changed; on a restart: a resumption);
* another generation: the spec changed since (an update of ``spec``).

Storing is a no-op: the handler's own status write is the record. A handler that fails
before writing any status is retried by kopf (its progress annotations) as before.
"""

from __future__ import annotations

from typing import Any

import kopf


class ObservedGenerationDiffBase(kopf.DiffBaseStorage):  # type: ignore[misc]
    def fetch(self, *, body: kopf.Body) -> Any:
        status = body.get("status") or {}
        observed = status.get("observedGeneration") if isinstance(status, dict) else None
        if observed is None:
            return None
        essence = dict(self.build(body=body))
        if observed != (body.get("metadata") or {}).get("generation"):
            # the spec changed since it was handled (what it was is not kept: the
            # handlers reconcile the whole spec, not a diff)
            essence["spec"] = {"observedGeneration": observed}
        return essence

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: Any) -> None:
        return None


class UnmarkedProgressStorage(kopf.AnnotationsProgressStorage):  # type: ignore[misc]
    """kopf's progress annotations (a handler's retries) without the ``kopf-managed``
    marker kopf adds with them: a handler that succeeds at once leaves no progress, but
    the marker alone made a patch per created resource. The marker lets other
    kopf-based operators' diff-bases skip these annotations; this operator's diff-base
    does not read annotations (:class:`ObservedGenerationDiffBase`)."""

    def _store_marker(self, prefix: str, patch: kopf.Patch, body: kopf.Body) -> None:
        return None
