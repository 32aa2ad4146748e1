"""Reconcile a ShardedCheckpoint: parse -> build -> I/O -> status.

* create / resume / spec update / retry -> :func:`reconcile` (validate; the operator's
  pod policy, preshard.core.policy; the output claim, preshard.core.claims; then the
  Secrets' existence, metadata only; the steps before a conversion,
  :mod:`preshard.service.steps`; create-or-get the conversion Job, write status);
* Job events (:func:`job_event`, :func:`step_job_event`) and progress polls
  (:func:`poll`) -> :func:`sync` derives status from the Job's conditions, the newest
  pod's termination message, its progress lines and what keeps it from starting
  (scheduler, kubelet).

Permanent problems never raise (no crash loop, no retry storm): they become a
Ready=False condition with a PascalCase reason. Unexpected API errors raise
kopf.TemporaryError (:mod:`preshard.service.errors`) and are retried with backoff, for
this resource only.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from preshard.core import status as st
from preshard.core.children.conversion import build_conversion_job
from preshard.core.children.credentials import referenced_secrets
from preshard.core.children.pod import accelerator
from preshard.core.claims import (
    OutputClaim,
    claim_of,
    conflict_message,
    job_owned_by,
    preceding_claim,
)
from preshard.core.errors import SpecError
from preshard.core.jobstate import job_outcome, pod_problem
from preshard.core.naming import (
    ANNOTATION_CHECKPOINT_NAME,
    ANNOTATION_OWNER_UID,
    LABEL_CHECKPOINT,
    job_name,
    serving_configmap_name,
)
from preshard.core.policy import POLICY_VIOLATION, check_policy, policy_message
from preshard.core.serving import trusted_artifact
from preshard.core.spec import CheckpointSpec, check_accelerator, parse_spec
from preshard.service import errors, steps
from preshard.service.context import Service
from preshard.service.jobs import ensure_job, find_job
from preshard.service.serving import apply_serving
from preshard.service.status import now

log = logging.getLogger(__name__)

SERVING_CONFLICT = "ServingConfigMapConflict"


def claim(svc: Service, body: dict[str, Any], status: dict[str, Any] | None) -> OutputClaim | None:
    """This resource's OutputClaim in the state ``status`` (None: it holds none)."""
    meta = body["metadata"]
    return claim_of(
        meta["namespace"],
        meta["name"],
        body.get("spec") or {},
        meta,
        status,
        svc.config.default_s3_endpoint,
    )


def _requested(svc: Service, spec: CheckpointSpec) -> str:
    acc = accelerator(spec, svc.config)
    if acc == "none":
        return f"no engine, no accelerator: {spec.layout.world_size} ranks planned"
    if acc == "cpu":
        return f"{spec.layout.world_size} CPU ranks, no GPU"
    return f"{spec.layout.world_size} GPUs"


def reconcile(
    svc: Service,
    body: dict[str, Any],
    outputs_index: Any,
    identities_index: Any = None,
    jobs_index: Any = None,
) -> None:
    """``jobs_index``: the operator's Jobs by (namespace, name) (service.jobs); None asks
    the API instead."""
    if body["metadata"].get("deletionTimestamp"):
        return
    with svc.status.lock(body["metadata"]["uid"]):
        _reconcile(svc, body, outputs_index, identities_index, jobs_index)


def _reconcile(
    svc: Service,
    body: dict[str, Any],
    outputs_index: Any,
    identities_index: Any = None,
    jobs_index: Any = None,
) -> None:
    meta = body["metadata"]
    ns, name, uid, gen = meta["namespace"], meta["name"], meta["uid"], meta.get("generation")
    config, api, write = svc.config, svc.api, svc.status.write
    old = svc.status.known(body)
    try:
        spec = parse_spec(dict(body.get("spec") or {}))
        check_accelerator(spec, accelerator(spec, config))  # CPU: quantization, cores
    except SpecError as err:
        write(body, old, st.status_for_spec_error(old, err.reason, err.message, gen, now()))
        return
    violations = check_policy(ns, spec, config)
    if violations:
        new = st.status_for_error(
            old,
            reason=POLICY_VIOLATION,
            message=policy_message(violations),
            generation=gen,
            now=now(),
        )
        write(body, old, new)
        return
    with errors.retried():
        me = claim(svc, body, old)
        # A resource whose conversion failed without publishing holds no claim and only
        # re-reads its Job while that exists; every other one (and one whose failed Job is
        # gone, which would start over) checks the prefix first, before its Secrets: a
        # resource in conflict never gets further, whatever else is missing.
        failed_job = None
        if me is None and old.get("jobName"):
            failed_job = find_job(svc, jobs_index, ns, job_name(name, spec.conversion_hash()))
        if failed_job is not None:
            sync(svc, body, spec, failed_job)
            return
        me = me or claim(svc, body, {})
        assert me is not None  # the spec parsed, so its output URI did
        owner = preceding_claim(me, outputs_index.get(me.store, []), now=now())
        if owner is not None:
            write(body, old, st.status_for_conflict(old, conflict_message(me, owner), gen, now()))
            return
        if config.check_secrets:
            missing = [s for s in referenced_secrets(spec, config) if not api.secret_exists(ns, s)]
            if missing:
                msg = (
                    f"credentials Secret {missing[0]!r} not found in namespace {ns!r}; create it "
                    "with keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (HF_TOKEN for hf:// "
                    "sources)"
                )
                new = st.status_for_error(
                    old,
                    reason="CredentialsSecretNotFound",
                    message=msg,
                    generation=gen,
                    now=now(),
                    spec_valid=True,
                    phase=st.PENDING,
                )
                write(body, old, new)
                return
        identity = old.get("identity")
        source_digest = (old.get("decision") or {}).get("sourceDigest")
        if svc.preflight and not old.get("jobName"):
            # preflight -> adopt | copy | refuse | convert, before any Job requests an
            # accelerator
            go, identity, source_digest = steps.prepare(
                svc, body, spec, old, identities_index, jobs=jobs_index
            )
            if not go:
                return
        wanted = build_conversion_job(
            name,
            ns,
            uid,
            spec,
            config,
            identity=identity,
            source_digest=source_digest,
            memory_estimate=svc.status.known(body).get("memoryEstimate"),
        )
        job, created = ensure_job(svc, jobs_index, wanted)
        if not job_owned_by(job, uid):
            jname = (job.get("metadata") or {}).get("name")
            msg = f"a Job named {jname} exists but does not belong to this ShardedCheckpoint; delete it or rename this resource"
            new = st.status_for_error(
                old,
                reason="JobNameConflict",
                message=msg,
                generation=gen,
                now=now(),
                spec_valid=True,
            )
            write(body, old, new)
            return
        created_msg = (
            f"created conversion Job {job['metadata'].get('name')} ({_requested(svc, spec)})"
            if created
            else None
        )
        sync(svc, body, spec, job, job_created=created_msg)


def poll(svc: Service, body: dict[str, Any], jobs_index: Any = None) -> None:
    """Progress lives in the pod log, and a pod waiting for the scheduler or the kubelet
    changes only itself: neither changes the Job, so the timer polls them (the Job
    itself from the index)."""
    if body["metadata"].get("deletionTimestamp"):
        return
    what = f"poll the progress of {body['metadata']['name']}"
    with errors.logged(what, level=logging.DEBUG, count=False, also=(SpecError,)):
        spec = parse_spec(dict(body.get("spec") or {}))
        with svc.status.lock(body["metadata"]["uid"]):
            jname = svc.status.known(body).get("jobName")
            ns = body["metadata"]["namespace"]
            job = find_job(svc, jobs_index, ns, str(jname)) if jname else None
            if job is not None:
                sync(svc, body, spec, job)


def sync(
    svc: Service,
    body: dict[str, Any],
    spec: CheckpointSpec,
    job: dict[str, Any],
    job_created: str | None = None,
) -> None:
    """Derive and write the status from the Job (callers hold the resource's lock)."""
    meta = body["metadata"]
    ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
    api = svc.api
    old = svc.status.known(body)
    jname = job["metadata"]["name"]
    outcome = job_outcome(job)
    # A Job that has not started has no pod worth reading (saves a request per resource).
    # Only the Job's own pods speak for it (core.jobpods.owned_by_job).
    pod = api.job_pod(job) if outcome.phase != st.PENDING else None
    result = api.termination_result(pod, job)
    # an active Job's pod may wait for the scheduler or the kubelet (no log to read then)
    problem = pod_problem(pod) if outcome.phase == st.RUNNING else None
    progress = None
    if pod is not None and outcome.phase == st.RUNNING and problem is None:
        progress = api.pod_progress(ns, pod["metadata"]["name"])
    serving = None
    serving_error = None
    if result is not None and result.artifact:
        # the locations come from the spec, not from what the pod wrote
        result = dataclasses.replace(result, artifact=trusted_artifact(result.artifact, spec))
    if outcome.phase == st.SUCCEEDED and result is not None and result.artifact:
        assert result.artifact is not None
        serving = apply_serving(svc, name, ns, uid, spec, result.artifact)
        if serving is None:
            cm_name = serving_configmap_name(name)
            serving_error = (
                SERVING_CONFLICT,
                f"a ConfigMap named {cm_name} exists and does not belong to this "
                "ShardedCheckpoint; nothing was written to it: delete or rename it (the "
                "operator retries)",
            )
    new = st.derive_status(
        old,
        generation=meta.get("generation"),
        job_name=jname,
        job=job,
        result=result,
        progress=progress,
        now=now(),
        serving=serving,
        pod=problem,
        serving_error=serving_error,
    )
    if svc.preflight:
        new = steps.after_sync(body, old, new, svc)
    svc.status.write(body, old, new, job_created)


def _owner(meta: dict[str, Any]) -> tuple[str | None, str | None, str | None]:
    """(namespace, name, uid) of the ShardedCheckpoint a Job belongs to. The annotation
    has the full name; the label is cut for names over 63 characters (Jobs of older
    operator versions have only the label, and only short names)."""
    annotations = meta.get("annotations") or {}
    owner = annotations.get(ANNOTATION_CHECKPOINT_NAME) or (meta.get("labels") or {}).get(
        LABEL_CHECKPOINT
    )
    return meta.get("namespace"), owner, annotations.get(ANNOTATION_OWNER_UID)


def job_event(svc: Service, event: dict[str, Any], checkpoints_index: Any) -> None:
    """A conversion Job changed: sync its resource's status (as the watch last saw the
    resource, no read per Job event; its status may predate our last write, which the
    status writer prefers)."""
    if event.get("type") == "DELETED":
        return
    job = dict(event.get("object") or {})
    meta = job.get("metadata") or {}
    ns, owner, owner_uid = _owner(meta)
    if not ns or not owner:
        return
    body = next(
        (b for b in checkpoints_index.get((ns, owner), ()) if b["metadata"]["uid"] == owner_uid),
        None,
    )
    if body is None or body["metadata"].get("deletionTimestamp"):
        return  # gone, being deleted, or a Job of an earlier resource with the same name
    try:
        spec = parse_spec(dict(body.get("spec") or {}))
    except SpecError:
        return  # an invalid spec has no conversion Job
    if job_name(owner, spec.conversion_hash()) != meta.get("name"):
        return
    with (
        errors.logged(f"update {ns}/{owner} from its Job"),
        svc.status.lock(body["metadata"]["uid"]),
    ):
        sync(svc, body, spec, job)


def step_job_event(
    svc: Service,
    event: dict[str, Any],
    outputs_index: Any,
    identities_index: Any,
    checkpoints_index: Any = None,
    jobs_index: Any = None,
) -> None:
    """A preflight/adopt/copy/withdraw Job changed: reconcile its resource (the step's
    result decides what comes next). The resource comes from the checkpoints index (no
    read per Job event; its status may predate our last write, which the status writer
    prefers), the Job from the event and the Jobs index."""
    if event.get("type") == "DELETED":
        return
    meta = (event.get("object") or {}).get("metadata") or {}
    annotations = meta.get("annotations") or {}
    ns = meta.get("namespace")
    owner = annotations.get(ANNOTATION_CHECKPOINT_NAME)
    if not ns or not owner:
        return
    with errors.logged(f"update {ns}/{owner} from its Job", count=False):
        if checkpoints_index is not None:
            body = next(
                (
                    dict(b)
                    for b in checkpoints_index.get((ns, owner), ())
                    if b["metadata"]["uid"] == annotations.get(ANNOTATION_OWNER_UID)
                ),
                None,
            )
        else:
            body = svc.api.get_checkpoint(ns, owner)
        if body is None or (body.get("metadata") or {}).get("uid") != annotations.get(
            ANNOTATION_OWNER_UID
        ):
            return
        reconcile(svc, body, outputs_index, identities_index, jobs_index)
