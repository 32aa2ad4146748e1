"""The deletion state machine of a ``deletionPolicy: Delete`` resource (kopf's finalizer
holds it until :func:`delete` returns; each wait raises a retry):

1. a CPU step in progress (``status.decision``): delete its Job (foreground) and wait
   until it is gone; nothing to purge after a preflight, adopt or withdraw, a copy's
   partial objects are purged as a conversion's;
2. the conversion Job: delete it (foreground, so no pod still writes) and wait;
3. decide again whether this resource may purge
   (:func:`preshard.core.deletion.purge_decision_at_deletion`); if not, an Event
   ``PurgeSkipped`` says why and nothing is deleted;
4. run the purge Job (``preshard purge``) until it succeeds (a failed one is replaced).

Status goes through the one status writer (``phase: Deleting``); the resource's cache
is dropped first (it is going).
"""

from __future__ import annotations

from typing import Any

from preshard.core import status as st
from preshard.core.children.purge import build_purge_job
from preshard.core.deletion import purge_decision_at_deletion, running_step, step_wrote_output
from preshard.core.errors import SpecError
from preshard.core.jobstate import job_outcome
from preshard.core.naming import job_name
from preshard.core.spec import parse_spec
from preshard.service import errors, events
from preshard.service.context import Service
from preshard.service.reconcile import claim

RETAIN_HINT = (
    "To keep the data and remove the resource anyway: kubectl patch sckpt NAME "
    """--type=merge -p '{"spec":{"deletionPolicy":"Retain"}}'"""
)


def delete(svc: Service, body: dict[str, Any], outputs_index: Any) -> None:
    meta = body["metadata"]
    ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
    api = svc.api
    status = svc.status.known(body)
    svc.status.forget(uid)
    try:
        spec = parse_spec(dict(body.get("spec") or {}))
    except SpecError:
        return  # nothing was ever created for an invalid spec
    if spec.deletion_policy == "Retain":
        return  # the Job and ConfigMap are garbage-collected through ownerReferences
    me = claim(svc, body, status)
    decision = purge_decision_at_deletion(
        ns, spec, status, me, outputs_index.get(me.store, []) if me else [], svc.config
    )
    with errors.retried(count=False):
        step = running_step(status)
        if step is not None:
            # a CPU step is running: stop it first (a copy may still write)
            step_name, step_job = step
            sj = api.get_job(ns, step_job)
            if sj is not None:
                if not sj["metadata"].get("deletionTimestamp"):
                    api.delete_job(ns, step_job, "Foreground")
                raise errors.retry_later(f"waiting for Job {step_job} to stop", delay=2)
            if not step_wrote_output(step_name):
                return  # preflight, adopt and withdraw wrote nothing of ours at the prefix
        # 1. stop the conversion (foreground: wait until its pods are gone)
        conversion = job_name(name, spec.conversion_hash())
        job = api.get_job(ns, conversion)
        if job is not None:
            if not job["metadata"].get("deletionTimestamp"):
                api.delete_job(ns, conversion, "Foreground")
                events.post(
                    body,
                    "Normal",
                    "Deleting",
                    f"stopping conversion Job {conversion} before deleting {spec.output.uri}",
                )
            svc.status.mark_deleting(body, status)
            raise errors.retry_later(f"waiting for Job {conversion} to stop", delay=2)
        if not decision.purge:
            events.post(
                body,
                "Normal",
                "PurgeSkipped",
                f"kept {spec.output.uri}, nothing deleted: {decision.why}",
            )
            return
        # 2. purge what this owner published with a Job (the operator's converter image,
        # the checkpoint's credentials)
        pjob, created = api.create_or_get_job(build_purge_job(name, ns, uid, spec, svc.config))
        if created:
            events.post(
                body, "Normal", "Purging", f"deleting {spec.output.uri} (deletionPolicy: Delete)"
            )
            svc.status.mark_deleting(body, status)
        outcome = job_outcome(pjob)
        if outcome.phase == st.SUCCEEDED:
            events.post(body, "Normal", "Purged", f"deleted {spec.output.uri}")
            return
        if outcome.phase == st.FAILED:
            events.post(
                body,
                "Warning",
                "PurgeFailed",
                f"deleting {spec.output.uri} failed ({outcome.reason}); retrying. {RETAIN_HINT}",
            )
            api.delete_job(ns, pjob["metadata"]["name"], "Background")
            raise errors.retry_later("purge failed; retrying", delay=30)
        raise errors.retry_later(f"waiting for purge Job {pjob['metadata']['name']}", delay=3)
