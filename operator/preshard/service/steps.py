"""The steps before a conversion: preflight -> adopt | copy | (withdraw ->) convert |
refuse. The next step is :func:`preshard.core.steps.next_step`'s, the Jobs come from
:mod:`preshard.core.children.steps`, the status from :mod:`preshard.core.stepstatus`.

Every step is a small CPU-only Job in the resource's namespace with the resource's own
credentials Secrets (the operator reads no Secret data and no object store). Its
result is the pod's termination message; Job events of these Jobs re-run the reconcile
(:func:`preshard.service.reconcile.step_job_event`). The CRD field ``status.decision``
holds the step record (the step in progress), so a restarted operator resumes it.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from preshard.core import status as st
from preshard.core import stepstatus as ss
from preshard.core.children.credentials import output_endpoint, source_endpoint
from preshard.core.children.pod import accelerator
from preshard.core.children.pod import engine as effective_engine
from preshard.core.children.steps import (
    build_adopt_job,
    build_copy_job,
    build_preflight_job,
    build_withdraw_job,
)
from preshard.core.identity import SourcePin, conversion_identity
from preshard.core.jobstate import job_outcome
from preshard.core.naming import serving_configmap_name
from preshard.core.preflight import Preflight, PreflightError, parse_preflight
from preshard.core.progress import INVALID_RESULT
from preshard.core.serving import trusted_artifact
from preshard.core.spec import CheckpointSpec
from preshard.core.steps import (
    REFUSALS,
    NextStep,
    ReadyCheckpoint,
    memory_estimate_status,
    next_step,
)
from preshard.k8s.errors import KubeForbidden
from preshard.service import events, ledger
from preshard.service.context import Service
from preshard.service.jobs import ensure_job, find_job, job_result
from preshard.service.serving import apply_serving
from preshard.service.status import now

log = logging.getLogger(__name__)

# Reasons after which a step is retried from a new preflight (the prefix changed under
# us), at most this many times.
RESTART_REASONS = frozenset({"OutputChanged"})
MAX_ROUNDS = 3

# What :func:`prepare` decided: (go, identity, source digest, pending). ``go``: create the
# conversion Job now, pinned to that identity and content; ``pending``: the status to
# write with the conversion Job's (the decision to convert: one status write, not two;
# a restart before it re-decides from the finished preflight Job, to the same result).
Prepared = tuple[bool, str | None, str | None, dict[str, Any] | None]
STOP: Prepared = (False, None, None, None)  # handled (status written), nothing more now


def _alive(svc: Service, owner: str) -> bool:
    parts = owner.split("/")
    if len(parts) != 3 or not all(parts):
        return True  # never provably gone (core.steps keeps such owners anyway)
    try:
        obj = svc.api.get_checkpoint(parts[0], parts[1])
    except KubeForbidden:  # a namespace this operator may not read: never provably gone
        return True
    return obj is not None and (obj.get("metadata") or {}).get("uid") == parts[2]


def prepare(
    svc: Service,
    body: dict[str, Any],
    spec: CheckpointSpec,
    old: dict[str, Any],
    index: Any,
    *,
    jobs: Any = None,
) -> Prepared:
    """Run the steps before a conversion (:data:`Prepared`: go on to the conversion Job,
    pinned to the source content the preflight saw, or :data:`STOP`).

    ``jobs``: the operator's Jobs index (service.jobs): a step's Job is read there and
    never created twice; None asks the API."""
    if ss.is_done(old):
        gen = body["metadata"].get("generation")
        if old.get("observedGeneration") != gen:
            svc.status.write_known(body, ss.regenerate(old, gen, now()))
        return STOP
    record = dict(old.get("decision") or {})
    step = record.get("step")
    if step == "Convert":
        return True, old.get("identity"), record.get("sourceDigest"), None
    ns = body["metadata"]["namespace"]
    if step in ("Adopt", "Copy", "Withdraw") and record.get("jobName"):
        job = find_job(svc, jobs, ns, str(record["jobName"]))
        if job is not None:
            return _follow(svc, body, spec, old, record, job, index, jobs=jobs)
    return _preflight(svc, body, spec, old, record, index, jobs=jobs)


def _base(record: dict[str, Any]) -> dict[str, Any]:
    keep = ("startedAt", "noAdopt", "noCopy", "round", "sourceDigest")
    out = {k: record[k] for k in keep if record.get(k)}
    out.setdefault("startedAt", now())
    return out


def _preflight(
    svc: Service,
    body: dict[str, Any],
    spec: CheckpointSpec,
    old: dict[str, Any],
    record: dict[str, Any],
    index: Any,
    *,
    jobs: Any = None,
) -> Prepared:
    meta = body["metadata"]
    ns, name, uid, gen = meta["namespace"], meta["name"], meta["uid"], meta.get("generation")
    base = _base(record)
    wanted = build_preflight_job(
        name, ns, uid, spec, svc.config, attempt=int(base.get("round") or 0)
    )
    jname = wanted["metadata"]["name"]
    job, created = ensure_job(svc, jobs, wanted)
    outcome = job_outcome(job)
    if outcome.phase in (st.PENDING, st.RUNNING):
        d = {**base, "step": "Preflight", "jobName": jname}
        msg = (
            f"preflight Job {jname} checks the source and the output prefix "
            "(CPU only, no accelerator)"
        )
        new = ss.status_for_step(old, step_record=d, message=msg, generation=gen, now=now())
        svc.status.write_known(
            body, new, f"created preflight Job {jname} (CPU only)" if created else None
        )
        return STOP
    result = job_result(svc, job)
    if outcome.phase == st.FAILED:
        reason = result.reason if result and result.reason else (outcome.reason or "JobFailed")
        message = (result.message if result and result.message else outcome.message) or ""
        _fail(svc, body, old, reason, f"preflight Job {jname} failed: {message}", gen)
        return STOP
    if result is not None and result.reason == INVALID_RESULT:  # malformed findings
        _fail(svc, body, old, INVALID_RESULT, f"preflight Job {jname}: {result.message}", gen)
        return STOP
    try:
        pre = parse_preflight(result.artifact if result else None)
    except PreflightError as exc:
        _fail(svc, body, old, "PreflightFailed", f"preflight Job {jname}: {exc}", gen)
        return STOP
    pre = _with_proof(svc, ns, pre)
    trusted = svc.config.copy_sources_for(ns)
    args: dict[str, Any] = {
        "output_endpoint": output_endpoint(spec, svc.config),
        "source_endpoint": source_endpoint(spec, svc.config),
        "copy_from_namespaces": trusted,
        "adopt_allowed": not base.get("noAdopt"),
        "copy_allowed": not base.get("noCopy"),
        "accelerator": accelerator(spec, svc.config),
        "engine": effective_engine(spec, svc.config),
    }
    identity = conversion_identity(
        spec,
        pre.source,
        pre.vllm_version,
        namespace=ns,
        source_endpoint=args["source_endpoint"],
        engine=args["engine"],
    )
    living = frozenset(o for o in pre.owners() if _alive(svc, o))
    # only the Ready checkpoints a Copy may come from: this namespace's, and those of the
    # namespaces the admin's copy policy trusts (nothing else enters the choice)
    ready = [
        r
        for r in (index or {}).get(identity, [])
        if isinstance(r, ReadyCheckpoint)
        and (r.namespace == ns or "*" in trusted or r.namespace in trusted)
    ]
    choice = next_step(spec, f"{ns}/{name}/{uid}", pre, living, ready, **args)
    estimate = memory_estimate_status(spec, pre, accelerator(spec, svc.config))
    if estimate is not None:
        old = {**old, "memoryEstimate": estimate}
    return _act(svc, body, spec, old, base, choice, index, pre.source, jobs=jobs)


def _with_proof(svc: Service, ns: str, pre: Preflight) -> Preflight:
    """The preflight with ``manifest.proven`` set from the operator's own ledger (never
    from what the pod reported): the operator saw exactly this manifest published by its
    owner, a resource of this namespace or of one the copy policy trusts."""
    man = pre.manifest
    if man is None or not man.owner:
        return pre
    owner_ns = man.owner.split("/", 1)[0]
    trusted = svc.config.copy_sources_for(ns)
    if owner_ns != ns and "*" not in trusted and owner_ns not in trusted:
        return pre
    proven = ledger.published_by(svc, man.sha256) == man.owner
    return dataclasses.replace(pre, manifest=dataclasses.replace(man, proven=proven))


def _fail(
    svc: Service,
    body: dict[str, Any],
    old: dict[str, Any],
    reason: str,
    message: str,
    gen: int | None,
) -> None:
    new = st.status_for_error(
        old,
        reason=reason if st.is_reason(reason) else "PreflightFailed",
        message=message,
        generation=gen,
        now=now(),
        spec_valid=True,
        phase=st.FAILED,
    )
    new.pop("decision", None)  # refused or failed: this resource does not claim the prefix
    svc.status.write_known(body, new)


def _act(
    svc: Service,
    body: dict[str, Any],
    spec: CheckpointSpec,
    old: dict[str, Any],
    base: dict[str, Any],
    d: NextStep,
    index: Any,
    source: SourcePin,
    *,
    jobs: Any = None,
) -> Prepared:
    meta = body["metadata"]
    ns, name, uid, gen = meta["namespace"], meta["name"], meta["uid"], meta.get("generation")
    if d.step in REFUSALS or d.step == "CannotConvert":
        # a refusal (core.steps.conversion_refusal included) lands here as Ready=False
        old = {**old, "identity": d.identity} if d.identity else old
        _fail(svc, body, old, d.reason, d.message, gen)
        return STOP
    # the conversion reads exactly the content the preflight pinned (convert
    # --source-digest: SourceChanged otherwise); the adopt/copy check reads it too
    base = {**base, "sourceDigest": source.digest}
    if d.step == "Convert" and not d.withdraw:
        # written with the conversion Job's status (one write: service.reconcile.sync)
        new = {**old, "identity": d.identity, "decision": {**base, "step": "Convert"}}
        return True, d.identity, source.digest, new
    if d.step == "Adopt":
        assert d.identity and d.expect_manifest_sha256
        job = build_adopt_job(
            name, ns, uid, spec, svc.config,
            identity=d.identity,
            expect_owner=d.expect_owner,
            expect_manifest_sha256=d.expect_manifest_sha256,
            source_digest=source.digest,
        )  # fmt: skip
        step: dict[str, Any] = {"step": "Adopt"}
    elif d.step == "Copy":
        assert d.identity and d.copy_from
        job = build_copy_job(
            name, ns, uid, spec, svc.config,
            identity=d.identity,
            source_uri=d.copy_from.uri,
            source_manifest_sha256=d.copy_from.manifest_sha256,
            source_digest=source.digest,
        )  # fmt: skip
        step = {"step": "Copy"}
        if d.copy_from.namespace == ns:  # another tenant's prefix is not shown before
            step["from"] = d.copy_from.uri  # the copy proved access to it
    else:  # Convert over a gone owner's checkpoint: withdraw its manifest first
        assert d.expect_manifest_sha256
        job = build_withdraw_job(
            name, ns, uid, spec, svc.config,
            expect_owner=d.expect_owner,
            expect_manifest_sha256=d.expect_manifest_sha256,
            delete_listed=d.withdraw_listed,
        )  # fmt: skip
        step = {"step": "Withdraw"}
    created_job, created = ensure_job(svc, jobs, job)
    record = {**base, **step, "jobName": job["metadata"]["name"]}
    old2 = {**old, "identity": d.identity}
    return _follow(
        svc, body, spec, old2, record, created_job, index,
        created=created, why=d.message, jobs=jobs,
    )  # fmt: skip


_STEP_MESSAGES = {
    "Adopt": "adopt Job {job} verifies every object of {out} against its manifest (no "
    "accelerator), then takes the checkpoint over",
    "Copy": "copy Job {job} copies a Ready checkpoint with this identity{src} to {out} "
    "server-side with this resource's credentials",
    "Withdraw": "withdraw Job {job} withdraws the manifest of a deleted resource's "
    "checkpoint at {out} before converting",
}


def _follow(
    svc: Service,
    body: dict[str, Any],
    spec: CheckpointSpec,
    old: dict[str, Any],
    record: dict[str, Any],
    job: dict[str, Any],
    index: Any,
    *,
    created: bool = False,
    why: str | None = None,
    jobs: Any = None,
) -> Prepared:
    meta = body["metadata"]
    ns, name, uid, gen = meta["namespace"], meta["name"], meta["uid"], meta.get("generation")
    step = str(record["step"])
    jname = job["metadata"]["name"]
    out = str(spec.output.parsed)
    identity = old.get("identity")
    outcome = job_outcome(job)
    if outcome.phase in (st.PENDING, st.RUNNING):
        src = f" ({record['from']})" if record.get("from") else ""
        msg = _STEP_MESSAGES[step].format(job=jname, out=out, src=src)
        new = ss.status_for_step(old, step_record=record, message=msg, generation=gen, now=now())
        svc.status.write_known(
            body, new, f"created {step.lower()} Job {jname}: {why}" if created else None
        )
        return STOP
    result = job_result(svc, job)
    ok = outcome.phase == st.SUCCEEDED and result is not None and result.result == "Succeeded"
    if ok and step == "Withdraw":
        new = {**old, "decision": {**_base(record), "step": "Convert"}}
        return True, identity, record.get("sourceDigest"), new
    if ok and result is not None and result.artifact:
        artifact = dict(result.artifact)
        origin = artifact.pop("origin", None) if step == "Copy" else None
        # the locations come from the spec, not from what the pod wrote
        artifact = trusted_artifact(artifact, spec)
        serving = apply_serving(svc, name, ns, uid, spec, artifact)
        if serving is None:
            log.warning(
                "%s/%s: ConfigMap %s belongs to something else; not written",
                ns,
                name,
                serving_configmap_name(name),
            )
        new = ss.status_for_adopted_or_copied(
            old,
            result=ss.ADOPTED if step == "Adopt" else ss.COPIED,
            artifact=artifact,
            serving=serving,
            identity=str(identity),
            origin=origin if isinstance(origin, dict) else None,
            started=record.get("startedAt"),
            generation=gen,
            now=now(),
        )
        svc.status.write_known(body, new)
        ledger.record(svc, artifact.get("manifestSha256"), f"{ns}/{name}/{uid}")
        return STOP
    # failed (or succeeded without a result)
    reason = (result.reason if result and result.reason else None) or outcome.reason or "JobFailed"
    message = (result.message if result and result.message else None) or outcome.message or ""
    base = _base(record)
    if reason in RESTART_REASONS and int(base.get("round") or 0) + 1 < MAX_ROUNDS:
        base["round"] = int(base.get("round") or 0) + 1
        events.post(
            body,
            "Normal",
            "OutputChanged",
            f"the output prefix changed during the {step.lower()} step; checking again",
        )
        return _preflight(svc, body, spec, {**old, "decision": base}, base, index, jobs=jobs)
    if step == "Withdraw":
        _fail(svc, body, old, reason, f"withdraw Job {jname} failed: {message}", gen)
        return STOP
    flag = "noAdopt" if step == "Adopt" else "noCopy"
    base[flag] = True
    # A copy's message may name a prefix of another tenant: only the reason is told.
    detail = f"{reason}: {message}" if step == "Adopt" else reason
    events.post(
        body,
        "Warning",
        f"{step}Failed",
        f"{step.lower()} Job {jname} failed ({detail}); converting instead",
    )
    return _preflight(svc, body, spec, {**old, "decision": base}, base, index, jobs=jobs)


def after_sync(
    body: dict[str, Any], old: dict[str, Any], new: dict[str, Any], svc: Service | None = None
) -> dict[str, Any]:
    """A conversion's status: record the Converted step (``status.path``) when it becomes Ready (its Ready
    Event, posted by the status writer, says how long it took)."""
    marked = ss.mark_converted(old, new, now())
    if marked is not new and old.get("path") != ss.CONVERTED and svc is not None:
        meta = body.get("metadata") or {}
        owner = f"{meta.get('namespace')}/{meta.get('name')}/{meta.get('uid')}"
        ledger.record(svc, (marked.get("artifact") or {}).get("manifestSha256"), owner)
    return marked
