"""kopf handlers for ShardedCheckpoint: parse -> build -> I/O -> status.

* create / resume / spec update -> :func:`reconcile` (validate; the operator's pod policy,
  preshard.core.policy; the output claim, preshard.core.claims; then the Secrets'
  existence, metadata only; create-or-get the conversion Job, write status);
* a timer retries resources that wait for something (a missing Secret, an output prefix
  owned by another resource) and polls the progress of running conversions;
* Job events -> :func:`_sync` derives status from the Job's conditions, the newest pod's
  termination message, its progress lines and what keeps it from starting (scheduler,
  kubelet);
* delete -> only ``deletionPolicy: Delete`` has a deletion handler (and so kopf's
  finalizer): it stops the Job, decides again whether this resource may purge
  (claims.purge_decision: it owns the prefix and did not fail before publishing), runs
  the purge Job if so (else an Event PurgeSkipped) and releases the finalizer. ``Retain`` resources go at once (Job and ConfigMap are garbage-collected);
  their DELETED event only drops in-memory state. kopf adds its finalizer also while a
  timer matches a resource (progress polling, retries), whatever the policy.

The operator is the only writer of ``.status``: what it wrote last (kept per uid) is what
the API server has, fresher than kopf's body or a re-read that raced with another
handler's write. Status computations of one resource run one at a time (a lock per uid),
so a Job event and the handler that created the Job never write the same status twice.

Permanent problems never raise out of a handler (no crash loop, no retry storm): they
become a Ready=False condition with a PascalCase reason. Unexpected API errors raise
kopf.TemporaryError and are retried with backoff, for this resource only.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import logging
import os
import threading
from typing import Any

import kopf
import urllib3
from kubernetes.client.exceptions import ApiException

from preshard import GROUP, PLURAL, VERSION, metrics
from preshard.core import status as st
from preshard.core.claims import (
    OutputClaim,
    claim_of,
    conflict_message,
    preceding_claim,
    prefix_allowed,
    purge_decision,
)
from preshard.core.config import OperatorConfig
from preshard.core.errors import SpecError
from preshard.core.jobs import (
    ANNOTATION_CHECKPOINT_NAME,
    ANNOTATION_OWNER_UID,
    LABEL_CHECKPOINT,
    LABEL_COMPONENT,
    accelerator,
    build_conversion_job,
    build_purge_job,
    build_serving_configmap,
    output_endpoint,
    referenced_secrets,
)
from preshard.core.naming import job_name, serving_configmap_name
from preshard.core.pathstatus import STEP_REASONS
from preshard.core.policy import POLICY_VIOLATION, check_policy, policy_message
from preshard.core.serving import serving_info, trusted_artifact
from preshard.core.spec import CheckpointSpec, check_accelerator, parse_spec
from preshard.k8s import api

log = logging.getLogger(__name__)

CONFIG = OperatorConfig()
SERVING_CONFLICT = "ServingConfigMapConflict"
# Ready reasons the retry timer re-checks (a Secret created, a prefix or a ConfigMap name
# released)
WAITING_REASONS = {"CredentialsSecretNotFound", "OutputConflict", SERVING_CONFLICT}
# A CPU step (preflight, adopt, copy, withdraw) advances on its Job's events; the retry
# timer re-checks it too, so a missed event never leaves a resource stuck.
WAITING_REASONS |= set(STEP_REASONS.values())
# refused before a Job was created (check_accelerator): nothing was written to purge
ACCELERATOR_REASONS = ("UnsupportedQuantization", "InsufficientCPU")
# Timer intervals are fixed when kopf registers the handlers (import time).
POLL_SECONDS = float(os.environ.get("PRESHARD_PROGRESS_POLL_SECONDS") or 10)
RETRY_SECONDS = float(os.environ.get("PRESHARD_RETRY_SECONDS") or 10)
# Preflight before converting (adopt, copy, refuse early; handlers.reuse). 0 turns it off:
# the operator then converts at once, as before issue 10 (tests of the conversion path).
PREFLIGHT = (os.environ.get("PRESHARD_PREFLIGHT") or "1").strip() != "0"
# A connection that breaks (reset, refused, timed out) raises urllib3's errors, not
# ApiException: retry soon, not after kopf's 60 s backoff for unexpected exceptions.
TRANSPORT_ERRORS = (urllib3.exceptions.HTTPError, ConnectionError)


def configure(config: OperatorConfig) -> None:
    global CONFIG
    CONFIG = config


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    fmt = "%Y-%m-%dT%H:%M:%SZ"
    try:
        return (dt.datetime.strptime(end, fmt) - dt.datetime.strptime(start, fmt)).total_seconds()
    except ValueError:
        return None


def _ready_reason(status: dict[str, Any] | None) -> str | None:
    cond = st.get_condition(status, st.READY)
    return cond.get("reason") if cond else None


# ------------------------------------------------------------------------ written status

_state_guard = threading.Lock()
_written: dict[str, dict[str, Any]] = {}  # uid -> the status this operator last wrote
_locks: dict[str, threading.Lock] = {}  # uid -> held while computing and writing status


def _resource_lock(uid: str) -> threading.Lock:
    with _state_guard:
        return _locks.setdefault(uid, threading.Lock())


def _known_status(body: dict[str, Any]) -> dict[str, Any]:
    """The status as the API server has it: what we wrote last, else the body's."""
    with _state_guard:
        written = _written.get(body["metadata"]["uid"])
    return copy.deepcopy(written) if written is not None else dict(body.get("status") or {})


def _forget(uid: str) -> None:
    with _state_guard:
        _written.pop(uid, None)
        _locks.pop(uid, None)
    metrics.forget(uid)


def _write_status(
    body: dict[str, Any],
    old: dict[str, Any] | None,
    new: dict[str, Any],
    job_created: str | None = None,
) -> None:
    """Patch what changed; post an Event when Ready's reason or the phase changed (and
    ``job_created``, the message of the Job's creation, in the same Event)."""
    meta = body["metadata"]
    patch = st.status_patch(old, new)
    if patch:
        if not api.patch_checkpoint_status(meta["namespace"], meta["name"], patch):
            return  # deleted meanwhile
        with _state_guard:
            _written[meta["uid"]] = copy.deepcopy(new)
        old_phase = (old or {}).get("phase")
        metrics.observe_phase(
            meta["uid"],
            str(new.get("phase")),
            old_phase,
            _seconds_between(new.get("startTime"), new.get("completionTime")),
        )
    for ev in st.status_events(old, new, job_created):
        kopf.event(body, type=ev.type, reason=ev.reason, message=ev.message)


# ------------------------------------------------------------------------- output index


@kopf.index(GROUP, VERSION, PLURAL)
def outputs(
    name: str,
    namespace: str,
    spec: dict[str, Any],
    meta: dict[str, Any],
    status: dict[str, Any],
    **_: Any,
) -> Any:
    """(endpoint, bucket) -> the OutputClaims on that store (preshard.core.claims: a
    resource that failed without publishing, was refused or waits for its Secret holds
    none)."""
    claim = claim_of(namespace, name, spec, meta, status, CONFIG.default_s3_endpoint)
    # {} (not None: kopf keeps an object's previous entries when the result is None)
    # drops a claim the resource no longer holds, e.g. once it failed without publishing
    return {} if claim is None else {claim.store: claim}


def _claim(body: dict[str, Any], status: dict[str, Any] | None) -> OutputClaim | None:
    meta = body["metadata"]
    return claim_of(
        meta["namespace"],
        meta["name"],
        body.get("spec") or {},
        meta,
        status,
        CONFIG.default_s3_endpoint,
    )


@kopf.index(GROUP, VERSION, PLURAL)
def checkpoints(body: kopf.Body, **_: Any) -> Any:
    """(namespace, name) -> what Job events need of a checkpoint (kept up to date by the
    watch, so a Job event costs no read). Spec and status are the event's own parsed
    objects, not copies (every event brings new ones; readers never modify them)."""
    meta = body.get("metadata") or {}
    slim = {
        "metadata": {
            k: meta.get(k)
            for k in ("name", "namespace", "uid", "generation", "deletionTimestamp")
            if meta.get(k) is not None
        },
        "spec": body.get("spec") or {},
        "status": body.get("status") or {},
    }
    return {(meta.get("namespace"), meta.get("name")): slim}


# ---------------------------------------------------------------------------- reconcile


def _requested(spec: CheckpointSpec) -> str:
    if accelerator(spec, CONFIG) == "cpu":
        return f"{spec.layout.world_size} CPU ranks, no GPU"
    return f"{spec.layout.world_size} GPUs"


def reconcile(body: dict[str, Any], outputs_index: Any, identities_index: Any = None) -> None:
    if body["metadata"].get("deletionTimestamp"):
        return
    with _resource_lock(body["metadata"]["uid"]):
        _reconcile(body, outputs_index, identities_index)


def _reconcile(body: dict[str, Any], outputs_index: Any, identities_index: Any = None) -> None:
    meta = body["metadata"]
    ns, name, uid, gen = meta["namespace"], meta["name"], meta["uid"], meta.get("generation")
    old = _known_status(body)
    try:
        spec = parse_spec(dict(body.get("spec") or {}))
        check_accelerator(spec, accelerator(spec, CONFIG))  # CPU: quantization, cores
    except SpecError as err:
        _write_status(body, old, st.status_for_spec_error(old, err.reason, err.message, gen, now()))
        return
    violations = check_policy(ns, spec, CONFIG)
    if violations:
        _write_status(
            body,
            old,
            st.status_for_error(
                old,
                reason=POLICY_VIOLATION,
                message=policy_message(violations),
                generation=gen,
                now=now(),
            ),
        )
        return
    try:
        me = _claim(body, old)
        # A resource whose conversion failed without publishing holds no claim and only
        # re-reads its Job while that exists; every other one (and one whose failed Job is
        # gone, which would start over) checks the prefix first, before its Secrets: a
        # resource in conflict never gets further, whatever else is missing.
        failed_job = None
        if me is None and old.get("jobName"):
            failed_job = api.get_job(ns, job_name(name, spec.conversion_hash()))
        if failed_job is not None:
            _sync(body, spec, failed_job)
            return
        me = me or _claim(body, {})
        assert me is not None  # the spec parsed, so its output URI did
        owner = preceding_claim(me, outputs_index.get(me.store, []))
        if owner is not None:
            _write_status(
                body, old, st.status_for_conflict(old, conflict_message(me, owner), gen, now())
            )
            return
        if CONFIG.check_secrets:
            missing = [s for s in referenced_secrets(spec, CONFIG) if not api.secret_exists(ns, s)]
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
                _write_status(body, old, new)
                return
        identity = old.get("identity")
        if PREFLIGHT and not old.get("jobName"):
            # preflight -> adopt | copy | refuse | convert (handlers.reuse), before any
            # Job requests an accelerator
            from preshard.handlers.reuse import prepare

            go, identity = prepare(body, spec, old, identities_index)
            if not go:
                return
        manifest = build_conversion_job(name, ns, uid, spec, CONFIG, identity=identity)
        job, created = api.create_or_get_job(manifest)
        job_meta = job.get("metadata") or {}
        owned = any(r.get("uid") == uid for r in job_meta.get("ownerReferences") or []) or (
            (job_meta.get("annotations") or {}).get(ANNOTATION_OWNER_UID) == uid
        )
        if not owned:
            msg = f"a Job named {job_meta.get('name')} exists but does not belong to this ShardedCheckpoint; delete it or rename this resource"
            _write_status(
                body,
                old,
                st.status_for_error(
                    old,
                    reason="JobNameConflict",
                    message=msg,
                    generation=gen,
                    now=now(),
                    spec_valid=True,
                ),
            )
            return
        created_msg = (
            f"created conversion Job {job_meta.get('name')} ({_requested(spec)})"
            if created
            else None
        )
        _sync(body, spec, job, job_created=created_msg)
    except ApiException as exc:
        metrics.RECONCILE_ERRORS.inc()
        raise kopf.TemporaryError(
            f"Kubernetes API error {exc.status} {exc.reason}", delay=10
        ) from None
    except TRANSPORT_ERRORS as exc:
        metrics.RECONCILE_ERRORS.inc()
        raise kopf.TemporaryError(f"Kubernetes API unreachable: {exc!r}", delay=2) from None


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def on_change(
    body: kopf.Body,
    outputs: kopf.Index[str, Any],
    identities: kopf.Index[str, Any] | None = None,
    **_: Any,
) -> None:
    reconcile(dict(body), outputs, identities)


def _waiting(status: dict[str, Any], **_: Any) -> bool:
    return _ready_reason(status) in WAITING_REASONS


@kopf.timer(
    GROUP, VERSION, PLURAL, interval=RETRY_SECONDS, initial_delay=RETRY_SECONDS / 2, when=_waiting
)
def retry_waiting(
    body: kopf.Body,
    outputs: kopf.Index[str, Any],
    identities: kopf.Index[str, Any] | None = None,
    **_: Any,
) -> None:
    """Heal resources waiting for a Secret or for an output prefix to be released."""
    reconcile(dict(body), outputs, identities)


def _polled(status: dict[str, Any], **_: Any) -> bool:
    return st.needs_polling(status)


@kopf.timer(
    GROUP, VERSION, PLURAL, interval=POLL_SECONDS, initial_delay=POLL_SECONDS / 2, when=_polled
)
def poll_progress(body: kopf.Body, **_: Any) -> None:
    """Progress lives in the pod log, and a pod waiting for the scheduler or the kubelet
    changes only itself: neither changes the Job, so poll them."""
    b = dict(body)
    if b["metadata"].get("deletionTimestamp"):
        return
    try:
        spec = parse_spec(dict(b.get("spec") or {}))
        with _resource_lock(b["metadata"]["uid"]):
            job_name_ = _known_status(b).get("jobName")
            job = api.get_job(b["metadata"]["namespace"], str(job_name_)) if job_name_ else None
            if job is not None:
                _sync(b, spec, job)
    except (SpecError, ApiException, *TRANSPORT_ERRORS) as exc:
        log.debug("progress poll of %s failed: %s", b["metadata"]["name"], exc)


# ----------------------------------------------------------------------------- job sync


def _sync(
    body: dict[str, Any],
    spec: CheckpointSpec,
    job: dict[str, Any],
    job_created: str | None = None,
) -> None:
    """Derive and write the status from the Job (callers hold the resource's lock)."""
    meta = body["metadata"]
    ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
    old = _known_status(body)
    jname = job["metadata"]["name"]
    outcome = st.job_outcome(job)
    # A Job that has not started has no pod worth reading (saves a request per resource).
    pod = api.newest_pod(ns, jname) if outcome.phase != st.PENDING else None
    result = api.termination_result(pod)
    # an active Job's pod may wait for the scheduler or the kubelet (no log to read then)
    problem = st.pod_problem(pod) if outcome.phase == st.RUNNING else None
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
        cm = build_serving_configmap(
            name, ns, uid, result.artifact, spec, CONFIG.default_s3_endpoint
        )
        cm_name = serving_configmap_name(name)
        if api.apply_configmap(cm, uid):
            info = serving_info(name, spec, str(spec.output.parsed), output_endpoint(spec, CONFIG))
            serving = info.status(cm_name)
        else:
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
    if PREFLIGHT:
        from preshard.handlers.reuse import after_sync

        new = after_sync(body, old, new)
    _write_status(body, old, new, job_created)


@kopf.on.event(
    "batch", "v1", "jobs", labels={LABEL_COMPONENT: "converter", LABEL_CHECKPOINT: kopf.PRESENT}
)
def on_job_event(
    event: dict[str, Any], checkpoints: kopf.Index[tuple[str, str], Any], **_: Any
) -> None:
    if event.get("type") == "DELETED":
        return
    job = dict(event.get("object") or {})
    meta = job.get("metadata") or {}
    ns = meta.get("namespace")
    # The annotation has the full name; the label is cut for names over 63 characters
    # (Jobs of older operator versions have only the label, and only short names).
    owner = (meta.get("annotations") or {}).get(ANNOTATION_CHECKPOINT_NAME) or (
        meta.get("labels") or {}
    ).get(LABEL_CHECKPOINT)
    if not ns or not owner:
        return
    owner_uid = (meta.get("annotations") or {}).get(ANNOTATION_OWNER_UID)
    # the resource as the watch last saw it (no read per Job event); its status may predate
    # our last write, which _known_status prefers
    body = next(
        (b for b in checkpoints.get((ns, owner), ()) if b["metadata"]["uid"] == owner_uid), None
    )
    if body is None or body["metadata"].get("deletionTimestamp"):
        return  # gone, being deleted, or a Job of an earlier resource with the same name
    try:
        spec = parse_spec(dict(body.get("spec") or {}))
        if job_name(owner, spec.conversion_hash()) != meta.get("name"):
            return
        with _resource_lock(body["metadata"]["uid"]):
            _sync(body, spec, job)
    except SpecError:
        return
    except ApiException as exc:
        metrics.RECONCILE_ERRORS.inc()
        log.warning("could not update %s/%s from its Job: %s %s", ns, owner, exc.status, exc.reason)
    except TRANSPORT_ERRORS as exc:
        metrics.RECONCILE_ERRORS.inc()
        log.warning("could not update %s/%s from its Job: %r", ns, owner, exc)


# ----------------------------------------------------------------------------- deletion


def _purges_output(spec: dict[str, Any], **_: Any) -> bool:
    """Only ``deletionPolicy: Delete`` has work to do on deletion, so only it matches the
    deletion handler and gets kopf's finalizer. kopf evaluates the filter on the current
    body: switching to Delete adds the finalizer, back to Retain removes it (also during a
    stuck purge: the documented way to release the resource and keep the data)."""
    return (spec or {}).get("deletionPolicy") == "Delete"


@kopf.on.event(GROUP, VERSION, PLURAL, when=lambda type, **_: type == "DELETED")
def on_gone(body: kopf.Body, **_: Any) -> None:
    """Every resource, with or without a finalizer (a Retain resource is deleted at once,
    and kopf calls deletion handlers only for resources that carry its finalizer): drop
    its in-memory state and metrics."""
    _forget(str(body.get("metadata", {}).get("uid") or ""))


@kopf.on.delete(GROUP, VERSION, PLURAL, when=_purges_output)
def on_delete(body: kopf.Body, outputs: kopf.Index[Any, Any], **_: Any) -> None:
    b = dict(body)
    meta = b["metadata"]
    ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
    status = _known_status(b)
    _forget(uid)
    try:
        spec = parse_spec(dict(b.get("spec") or {}))
    except SpecError:
        return  # nothing was ever created for an invalid spec
    if spec.deletion_policy == "Retain":
        return  # the Job and ConfigMap are garbage-collected through ownerReferences
    # Decided again now, from what this resource did and holds (never from a reason
    # alone): only the owner of the prefix that did not fail before publishing purges.
    me = _claim(b, status)
    allowed, _prefixes = prefix_allowed(ns, str(spec.output.parsed), CONFIG.output_prefix_policy)
    decision = purge_decision(me, status, outputs.get(me.store, []) if me else [], allowed)
    if decision.purge:
        sa_violations = [
            v
            for v in check_policy(ns, spec, CONFIG)
            if v.field == "spec.converter.serviceAccountName"
        ]
        if sa_violations:
            decision = decision._replace(purge=False, why=sa_violations[0].message)
    step = (status.get("decision") or {}).get("step")
    step_job = (status.get("decision") or {}).get("jobName")
    if step in ("Preflight", "Adopt", "Copy", "Withdraw") and step_job:
        # a CPU step is running: stop it first (a copy may still write)
        try:
            sj = api.get_job(ns, str(step_job))
        except ApiException as exc:
            raise kopf.TemporaryError(f"Kubernetes API error {exc.status}", delay=10) from None
        if sj is not None:
            if not sj["metadata"].get("deletionTimestamp"):
                api.delete_job(ns, str(step_job), "Foreground")
            raise kopf.TemporaryError(f"waiting for Job {step_job} to stop", delay=2)
        if step != "Copy":
            return  # preflight, adopt and withdraw wrote nothing of ours at the prefix
    try:
        # 1. stop the conversion (foreground: wait until its pods are gone)
        conv = job_name(name, spec.conversion_hash())
        job = api.get_job(ns, conv)
        if job is not None:
            if not (job["metadata"].get("deletionTimestamp")):
                api.delete_job(ns, conv, "Foreground")
                kopf.event(
                    b,
                    type="Normal",
                    reason="Deleting",
                    message=f"stopping conversion Job {conv} before deleting {spec.output.uri}",
                )
            api.patch_checkpoint_status(ns, name, {"phase": "Deleting"})
            raise kopf.TemporaryError(f"waiting for Job {conv} to stop", delay=2)
        if not decision.purge:
            kopf.event(
                b,
                type="Normal",
                reason="PurgeSkipped",
                message=f"kept {spec.output.uri}, nothing deleted: {decision.why}",
            )
            return
        # 2. purge what this owner published with a Job (the operator's converter image,
        # the checkpoint's credentials)
        purge = build_purge_job(name, ns, uid, spec, CONFIG)
        pjob, created = api.create_or_get_job(purge)
        if created:
            kopf.event(
                b,
                type="Normal",
                reason="Purging",
                message=f"deleting {spec.output.uri} (deletionPolicy: Delete)",
            )
            api.patch_checkpoint_status(ns, name, {"phase": "Deleting"})
        outcome = st.job_outcome(pjob)
        if outcome.phase == st.SUCCEEDED:
            kopf.event(b, type="Normal", reason="Purged", message=f"deleted {spec.output.uri}")
            return
        if outcome.phase == st.FAILED:
            kopf.event(
                b,
                type="Warning",
                reason="PurgeFailed",
                message=f"deleting {spec.output.uri} failed ({outcome.reason}); retrying. To keep the data and "
                'remove the resource anyway: kubectl patch sckpt NAME --type=merge -p \'{"spec":{"deletionPolicy":"Retain"}}\'',
            )
            api.delete_job(ns, pjob["metadata"]["name"], "Background")
            raise kopf.TemporaryError("purge failed; retrying", delay=30)
        raise kopf.TemporaryError(f"waiting for purge Job {pjob['metadata']['name']}", delay=3)
    except ApiException as exc:
        raise kopf.TemporaryError(
            f"Kubernetes API error {exc.status} {exc.reason}", delay=10
        ) from None
    except TRANSPORT_ERRORS as exc:
        raise kopf.TemporaryError(f"Kubernetes API unreachable: {exc!r}", delay=2) from None


# The steps before a conversion (preflight, adopt, copy, withdraw) register their own
# handlers (an index by identity, their Jobs' events).
from preshard.handlers import reuse as _reuse  # noqa: E402,F401
