"""preshard.core.status: conditions and status derived from Job conditions, the termination
message and progress (never from pod counts)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from preshard.core.jobstate import (
    POD_WAITING_REASONS,
    JobOutcome,
    PodProblem,
    job_outcome,
    pod_problem,
)
from preshard.core.progress import ProgressRecord, Result
from preshard.core.status import (
    CONDITION_ORDER,
    MAX_MESSAGE,
    Event,
    derive_status,
    get_condition,
    needs_polling,
    set_condition,
    status_events,
    status_for_conflict,
    status_for_error,
    status_for_spec_error,
    status_patch,
)

T0 = "2025-01-01T00:00:00Z"
T1 = "2025-01-01T00:01:00Z"
T2 = "2025-01-01T00:02:00Z"
JOB = "llama-0123456789"


def job(
    *conditions: dict[str, Any],
    start: str | None = None,
    completion: str | None = None,
    **status: Any,
) -> dict[str, Any]:
    st: dict[str, Any] = dict(status)
    if conditions:
        st["conditions"] = list(conditions)
    if start:
        st["startTime"] = start
    if completion:
        st["completionTime"] = completion
    return {"metadata": {"name": JOB}, "status": st}


def cond(type_: str, status: str = "True", **kw: Any) -> dict[str, Any]:
    return {"type": type_, "status": status, **kw}


def types(conditions: list[dict[str, Any]]) -> list[str]:
    return [c["type"] for c in conditions]


# ------------------------------------------------------------------ set_condition


def test_set_condition_new() -> None:
    out = set_condition(None, "Ready", "False", "JobPending", "waiting", 3, T0)
    assert out == [
        {
            "type": "Ready",
            "status": "False",
            "reason": "JobPending",
            "message": "waiting",
            "lastTransitionTime": T0,
            "observedGeneration": 3,
        }
    ]


def test_set_condition_keeps_transition_time_when_status_is_unchanged() -> None:
    first = set_condition([], "Ready", "False", "JobPending", "waiting", 1, T0)
    again = set_condition(first, "Ready", "False", "Converting", "running", 2, T1)
    assert again == [
        {
            "type": "Ready",
            "status": "False",
            "reason": "Converting",
            "message": "running",
            "lastTransitionTime": T0,
            "observedGeneration": 2,
        }
    ]


def test_set_condition_new_transition_time_when_status_changes() -> None:
    first = set_condition([], "Ready", "False", "Converting", "running", 1, T0)
    done = set_condition(first, "Ready", "True", "Published", "ok", 1, T1)
    assert done[0]["lastTransitionTime"] == T1
    back = set_condition(done, "Ready", "False", "Converting", "again", 1, T2)
    assert back[0]["lastTransitionTime"] == T2


def test_set_condition_repairs_a_missing_transition_time() -> None:
    old = [{"type": "Ready", "status": "False", "reason": "X", "message": ""}]
    assert set_condition(old, "Ready", "False", "X", "", 1, T1)[0]["lastTransitionTime"] == T1


def test_set_condition_without_generation_drops_observed_generation() -> None:
    first = set_condition([], "Ready", "False", "X", "m", 5, T0)
    out = set_condition(first, "Ready", "False", "X", "m", None, T1)
    assert "observedGeneration" not in out[0]


def test_set_condition_order_and_isolation() -> None:
    conds: list[dict[str, Any]] = []
    for t in ("Published", "Custom", "Converting", "Alpha", "Ready", "JobCreated", "SpecValid"):
        conds = set_condition(conds, t, "True", "Ok", "m", 1, T0)
    assert types(conds) == [*CONDITION_ORDER, "Alpha", "Custom"]
    assert CONDITION_ORDER == ("Ready", "SpecValid", "JobCreated", "Converting", "Published")
    snapshot = copy.deepcopy(conds)
    changed = set_condition(conds, "Ready", "False", "Nope", "m", 2, T1)
    assert conds == snapshot  # the input is never mutated
    assert changed[0]["status"] == "False"
    assert changed[1:] == snapshot[1:]


def test_set_condition_truncates_long_messages() -> None:
    out = set_condition([], "Ready", "False", "X", "y" * 5000, 1, T0)
    assert out[0]["message"] == "y" * MAX_MESSAGE
    assert MAX_MESSAGE == 1024


@pytest.mark.parametrize("status", ["true", "Yes", "", "TRUE"])
def test_set_condition_rejects_bad_status(status: str) -> None:
    with pytest.raises(ValueError) as exc:
        set_condition([], "Ready", status, "X", "m", 1, T0)
    assert str(exc.value) == f"condition status {status!r} must be True, False or Unknown"


@pytest.mark.parametrize(
    "reason", ["jobPending", "Job Pending", "Job-Pending", "", "1Reason", "Job_Failed"]
)
def test_set_condition_rejects_non_pascal_reasons(reason: str) -> None:
    with pytest.raises(ValueError) as exc:
        set_condition([], "Ready", "False", reason, "m", 1, T0)
    assert str(exc.value) == f"condition reason {reason!r} is not PascalCase"


def test_get_condition() -> None:
    st = {"conditions": set_condition([], "Ready", "True", "Published", "m", 1, T0)}
    c = get_condition(st, "Ready")
    assert c is not None and c["reason"] == "Published"
    c["reason"] = "Changed"  # a copy
    assert st["conditions"][0]["reason"] == "Published"
    assert get_condition(st, "Converting") is None
    assert get_condition(None, "Ready") is None
    assert get_condition({"conditions": None}, "Ready") is None


# -------------------------------------------------------------------- job_outcome


def test_job_outcome_missing_job() -> None:
    assert job_outcome(None) == JobOutcome(
        "Pending", "JobNotFound", "the conversion Job does not exist"
    )


def test_job_outcome_pending() -> None:
    expected = JobOutcome(
        "Pending",
        "JobPending",
        "waiting for the conversion pod to start (GPU capacity, image pull)",
    )
    assert job_outcome({}) == expected
    assert job_outcome(job()) == expected
    assert job_outcome({"status": None}) == expected


def test_job_outcome_running() -> None:
    assert job_outcome(job(start=T0)) == JobOutcome("Running", "JobRunning", None, T0)
    assert job_outcome(job(active=1)) == JobOutcome("Running", "JobRunning", None, None)


@pytest.mark.parametrize("type_", ["Complete", "SuccessCriteriaMet"])
def test_job_outcome_succeeded(type_: str) -> None:
    j = job(cond(type_, lastTransitionTime=T2), start=T0, completion=T1)
    assert job_outcome(j) == JobOutcome(
        "Succeeded", "Completed", "the conversion Job completed", T0, T1
    )
    # Without completionTime, the condition's transition time.
    j = job(cond(type_, lastTransitionTime=T2, message="done"), start=T0)
    assert job_outcome(j) == JobOutcome("Succeeded", "Completed", "done", T0, T2)


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("BackoffLimitExceeded", "BackoffLimitExceeded"),
        ("DeadlineExceeded", "DeadlineExceeded"),
        ("PodFailurePolicy", "PodFailurePolicy"),
        (None, "JobFailed"),
        ("", "JobFailed"),
        ("not pascal", "JobFailed"),
    ],
)
@pytest.mark.parametrize("type_", ["Failed", "FailureTarget"])
def test_job_outcome_failed(type_: str, reason: str | None, expected: str) -> None:
    c = cond(type_, lastTransitionTime=T2)
    if reason is not None:
        c["reason"] = reason
    out = job_outcome(job(c, start=T0))
    assert out == JobOutcome("Failed", expected, "the conversion Job failed", T0, T2)


def test_job_outcome_ignores_conditions_that_are_not_true() -> None:
    j = job(cond("Complete", "False"), cond("Failed", "Unknown"), start=T0)
    assert job_outcome(j).phase == "Running"


def test_job_outcome_success_wins_over_failure_target() -> None:
    j = job(cond("FailureTarget", reason="PodFailurePolicy"), cond("Complete"), start=T0)
    assert job_outcome(j).phase == "Succeeded"


@pytest.mark.parametrize(
    ("status", "phase"),
    [
        ({"succeeded": 1}, "Pending"),  # pods succeeded, but no Complete condition yet
        ({"succeeded": 1, "startTime": T0}, "Running"),
        ({"failed": 3, "startTime": T0}, "Running"),  # pods failed, Job not Failed yet
        ({"failed": 3, "active": 0, "ready": 0}, "Pending"),
    ],
)
def test_job_outcome_never_uses_pod_counts(status: dict[str, Any], phase: str) -> None:
    assert job_outcome({"status": status}).phase == phase


# ------------------------------------------------------------------- derive_status


ARTIFACT = {
    "uri": "s3://out/llama/",
    "manifestUri": "s3://out/llama/preshard-manifest.json",
    "files": 5,
    "totalBytes": 3 * 2**30,
    "manifestSha256": "e" * 64,
    "vllmVersion": "0.32.0",
}
SERVING = {
    "loadFormat": "runai_streamer_sharded",
    "args": ["--model", "s3://out/llama/"],
    "env": [],
    "configMapName": "llama-serving",
}


def _c(
    type_: str, status: str, reason: str, message: str, time: str = T0, gen: int = 1
) -> dict[str, Any]:
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": time,
        "observedGeneration": gen,
    }


SPEC_VALID = _c("SpecValid", "True", "SpecValid", "the spec is valid")
JOB_CREATED = _c("JobCreated", "True", "JobCreated", f"conversion Job {JOB} exists")


def derive(current: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "generation": 1,
        "job_name": JOB,
        "job": None,
        "result": None,
        "progress": None,
        "now": T0,
    }
    args.update(kw)
    return derive_status(current, **args)


def test_derive_pending_without_job() -> None:
    msg = f"conversion Job {JOB}: the conversion Job does not exist"
    assert derive() == {
        "observedGeneration": 1,
        "jobName": JOB,
        "phase": "Pending",
        "conditions": [
            _c("Ready", "False", "JobNotFound", msg),
            SPEC_VALID,
            _c("Converting", "False", "JobNotFound", msg),
        ],
    }


def test_derive_pending_job() -> None:
    msg = (
        f"conversion Job {JOB}: waiting for the conversion pod to start (GPU capacity, image pull)"
    )
    assert derive(job=job()) == {
        "observedGeneration": 1,
        "jobName": JOB,
        "phase": "Pending",
        "conditions": [
            _c("Ready", "False", "JobPending", msg),
            SPEC_VALID,
            JOB_CREATED,
            _c("Converting", "False", "JobPending", msg),
        ],
    }


def test_derive_running_with_progress() -> None:
    prog = ProgressRecord("Uploading", 512 * 2**20, 2 * 2**30, 99.0)
    msg = f"conversion Job {JOB} is running (Uploading: 512.0 MiB of 2.0 GiB)"
    assert derive(job=job(start=T0, active=1), progress=prog) == {
        "observedGeneration": 1,
        "jobName": JOB,
        "startTime": T0,
        "phase": "Running",
        "progress": {"stage": "Uploading", "bytesDone": 512 * 2**20, "bytesTotal": 2 * 2**30},
        "conditions": [
            _c("Ready", "False", "Converting", msg),
            SPEC_VALID,
            JOB_CREATED,
            _c("Converting", "True", "Uploading", msg),
        ],
    }


def test_derive_running_without_progress_or_total() -> None:
    st = derive(job=job(start=T0))
    assert get_condition(st, "Converting") == _c(
        "Converting", "True", "Starting", f"conversion Job {JOB} is running (Starting)"
    )
    assert "progress" not in st
    st = derive(job=job(start=T0), progress=ProgressRecord("Converting", 0, 0))
    assert get_condition(st, "Ready")["message"] == f"conversion Job {JOB} is running (Converting)"  # type: ignore[index]


def test_derive_succeeded_and_served() -> None:
    res = Result("Succeeded", artifact=ARTIFACT)
    j = job(cond("Complete"), start=T0, completion=T1)
    msg = "checkpoint published at s3://out/llama/ (5 files, 3.0 GiB)"
    st = derive(
        job=j,
        result=res,
        progress=ProgressRecord("Uploading", 1, 2),
        serving=SERVING,
        now=T2,
    )
    assert st == {
        "observedGeneration": 1,
        "jobName": JOB,
        "startTime": T0,
        "completionTime": T1,
        "phase": "Succeeded",
        "artifact": ARTIFACT,
        "serving": SERVING,
        "progress": {"stage": "Published", "bytesDone": 3 * 2**30, "bytesTotal": 3 * 2**30},
        "conditions": [
            _c("Ready", "True", "Published", msg + "; serve with ConfigMap llama-serving", T2),
            _c("SpecValid", "True", "SpecValid", "the spec is valid", T2),
            _c("JobCreated", "True", "JobCreated", f"conversion Job {JOB} exists", T2),
            _c("Converting", "False", "Completed", "conversion finished", T2),
            _c("Published", "True", "Published", msg, T2),
        ],
    }


def test_derive_succeeded_waiting_for_the_configmap() -> None:
    j = job(cond("Complete"), start=T0)
    st = derive(job=j, result=Result("Succeeded", artifact=ARTIFACT), now=T1)
    assert st["phase"] == "Succeeded"
    assert st["completionTime"] == T1  # neither completionTime nor transition time: now
    assert "serving" not in st
    ready = get_condition(st, "Ready")
    assert ready is not None
    assert (ready["status"], ready["reason"]) == ("False", "ServingConfigPending")
    assert ready["message"].endswith("; writing the serving ConfigMap")


@pytest.mark.parametrize(
    "result",
    [None, Result("Failed", reason="X", message="y"), Result("Succeeded", artifact=None)],
)
def test_derive_complete_job_without_a_result_is_failed(result: Result | None) -> None:
    st = derive(job=job(cond("Complete"), start=T0, completion=T1), result=result)
    msg = (
        f"the conversion Job {JOB} completed but its result (termination message) is missing; "
        "check the manifest with `preshard verify` and re-create the resource if needed"
    )
    assert st["phase"] == "Failed"
    assert "artifact" not in st
    assert get_condition(st, "Published") == _c("Published", "Unknown", "ResultMissing", msg)
    assert get_condition(st, "Ready") == _c("Ready", "False", "ResultMissing", msg)


def test_derive_failed_with_the_worker_reason() -> None:
    j = job(
        cond("Failed", reason="PodFailurePolicy", message="exit code 3", lastTransitionTime=T1),
        start=T0,
    )
    res = Result("Failed", reason="SourceNotFound", message="s3://src/m/ does not exist")
    st = derive(job=j, result=res, now=T2)
    msg = f"s3://src/m/ does not exist (Job {JOB}, PodFailurePolicy)"
    assert st == {
        "observedGeneration": 1,
        "jobName": JOB,
        "startTime": T0,
        "completionTime": T1,
        "phase": "Failed",
        "conditions": [
            _c("Ready", "False", "SourceNotFound", msg, T2),
            _c("SpecValid", "True", "SpecValid", "the spec is valid", T2),
            JOB_CREATED | {"lastTransitionTime": T2},
            _c("Converting", "False", "SourceNotFound", msg, T2),
            _c("Published", "False", "SourceNotFound", "nothing was published", T2),
        ],
    }


def test_derive_failed_from_the_job_alone() -> None:
    j = job(
        cond(
            "Failed",
            reason="BackoffLimitExceeded",
            message="Job has reached the specified backoff limit",
        )
    )
    st = derive(job=j)
    ready = get_condition(st, "Ready")
    assert ready is not None
    assert ready["reason"] == "BackoffLimitExceeded"
    assert ready["message"] == f"Job has reached the specified backoff limit (Job {JOB})"
    assert st["completionTime"] == T0


def test_derive_failed_deadline() -> None:
    j = job(cond("Failed", reason="DeadlineExceeded"), start=T0)
    st = derive(job=j)
    assert get_condition(st, "Ready")["reason"] == "DeadlineExceeded"  # type: ignore[index]
    assert get_condition(st, "Ready")["message"] == f"the conversion Job failed (Job {JOB})"  # type: ignore[index]


def test_derive_failed_worker_reason_must_be_pascal_case() -> None:
    j = job(cond("Failed", reason="PodFailurePolicy"))
    res = Result("Failed", reason="source not found!", message="boom")
    ready = get_condition(derive(job=j, result=res), "Ready")
    assert ready is not None
    assert ready["reason"] == "ConversionFailed"
    assert ready["message"] == f"boom (Job {JOB}, PodFailurePolicy)"


def test_derive_failed_with_a_success_result_uses_the_job_reason() -> None:
    j = job(cond("Failed", reason="DeadlineExceeded"))
    st = derive(job=j, result=Result("Succeeded", artifact=ARTIFACT))
    assert st["phase"] == "Failed"
    assert "artifact" not in st
    assert get_condition(st, "Ready")["reason"] == "DeadlineExceeded"  # type: ignore[index]


def test_derive_keeps_transition_times_and_bumps_generation() -> None:
    first = derive(job=job(start=T0), progress=ProgressRecord("Downloading", 1, 10), now=T0)
    second = derive(
        first,
        generation=2,
        job=job(start=T0),
        progress=ProgressRecord("Converting"),
        now=T1,
    )
    for c in second["conditions"]:
        assert c["lastTransitionTime"] == T0, c  # no status changed
        assert c["observedGeneration"] == 2, c
    assert second["observedGeneration"] == 2
    assert get_condition(second, "Converting")["reason"] == "Converting"  # type: ignore[index]
    third = derive(
        second,
        generation=2,
        job=job(cond("Complete"), start=T0),
        result=Result("Succeeded", artifact=ARTIFACT),
        serving=SERVING,
        now=T2,
    )
    times = {c["type"]: c["lastTransitionTime"] for c in third["conditions"]}
    assert times == {
        "Ready": T2,  # False -> True
        "SpecValid": T0,
        "JobCreated": T0,
        "Converting": T2,  # True -> False
        "Published": T2,  # new
    }


def test_derive_does_not_mutate_the_current_status_and_keeps_other_fields() -> None:
    current = {"conditions": [], "someField": {"a": 1}}
    snapshot = copy.deepcopy(current)
    st = derive(current, job=job(start=T0))
    assert current == snapshot
    assert st["someField"] == {"a": 1}


# ----------------------------------------------------------------- error statuses


def test_status_for_spec_error() -> None:
    assert status_for_spec_error(None, "InvalidURI", "bad uri", 4, T0) == {
        "phase": "Failed",
        "observedGeneration": 4,
        "conditions": [
            _c("Ready", "False", "InvalidURI", "bad uri", gen=4),
            _c("SpecValid", "False", "InvalidURI", "bad uri", gen=4),
        ],
    }


def test_status_for_error_with_valid_spec() -> None:
    st = status_for_error(
        None,
        reason="CredentialsSecretNotFound",
        message="create it",
        generation=2,
        now=T0,
        spec_valid=True,
        phase="Pending",
    )
    assert st == {
        "phase": "Pending",
        "observedGeneration": 2,
        "conditions": [
            _c("Ready", "False", "CredentialsSecretNotFound", "create it", gen=2),
            _c("SpecValid", "True", "SpecValid", "the spec is valid", gen=2),
        ],
    }


def test_status_for_error_rejects_non_pascal_reasons() -> None:
    with pytest.raises(ValueError, match="is not PascalCase"):
        status_for_error(None, reason="bad reason", message="m", generation=1, now=T0)


def test_status_for_conflict() -> None:
    msg = "output s3://out/m/ overlaps an output prefix already used by another resource"
    assert status_for_conflict({"jobName": "x"}, msg, 1, T0) == {
        "jobName": "x",
        "phase": "Pending",
        "observedGeneration": 1,
        "conditions": [
            _c("Ready", "False", "OutputConflict", msg),
            _c("SpecValid", "True", "SpecValid", "the spec is valid"),
        ],
    }


def test_error_status_keeps_transition_time_of_an_unchanged_condition() -> None:
    first = status_for_spec_error(None, "InvalidSpec", "a", 1, T0)
    second = status_for_spec_error(first, "InvalidURI", "b", 2, T1)
    assert [c["lastTransitionTime"] for c in second["conditions"]] == [T0, T0]
    assert [c["observedGeneration"] for c in second["conditions"]] == [2, 2]


# ------------------------------------------------------------------- status_patch


def test_status_patch() -> None:
    old = {"phase": "Running", "jobName": "j", "progress": {"stage": "Converting"}}
    new = {"phase": "Succeeded", "jobName": "j", "artifact": {"uri": "s3://o/p/"}}
    assert status_patch(old, new) == {
        "phase": "Succeeded",
        "artifact": {"uri": "s3://o/p/"},
        "progress": None,
    }
    assert status_patch(None, {"phase": "Pending"}) == {"phase": "Pending"}
    assert status_patch(new, copy.deepcopy(new)) == {}


# -------------------------------------------------------------------- pod_problem

POD = "llama-0123456789-x7k2p"
GPU_MSG = (
    "0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are "
    "available: 3 No preemption victims found for incoming pod."
)


def pod(phase: str = "Pending", conditions: Any = (), **statuses: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": POD},
        "status": {"phase": phase, "conditions": list(conditions), **statuses},
    }


def waiting(reason: str, message: str | None = None, name: str = "convert") -> dict[str, Any]:
    w: dict[str, Any] = {"reason": reason}
    if message is not None:
        w["message"] = message
    return {"name": name, "ready": False, "restartCount": 0, "state": {"waiting": w}}


def test_pod_problem_unschedulable_quotes_the_scheduler() -> None:
    p = pod(
        conditions=[
            cond("PodScheduled", "False", reason="Unschedulable", message=GPU_MSG),
        ]
    )
    problem = pod_problem(p)
    assert problem is not None
    assert (problem.reason, problem.detail) == ("Unschedulable", "Unschedulable")
    assert problem.message.startswith(
        f"conversion pod {POD} cannot be scheduled: 0/3 nodes are available: "
        "3 Insufficient nvidia.com/gpu."
    )
    assert "No preemption victims found for incoming pod;" in problem.message
    assert "add GPU nodes" in problem.message


def test_pod_problem_unschedulable_without_a_message() -> None:
    p = pod(conditions=[cond("PodScheduled", "False", reason="Unschedulable")])
    assert "cannot be scheduled: no node fits the pod;" in pod_problem(p).message  # type: ignore[union-attr]


@pytest.mark.parametrize("reason", sorted(POD_WAITING_REASONS))
def test_pod_problem_waiting_container(reason: str) -> None:
    p = pod(
        conditions=[cond("PodScheduled", "True")],
        containerStatuses=[waiting(reason, 'secret "s3" not found')],
    )
    problem = pod_problem(p)
    assert problem is not None
    assert (problem.reason, problem.detail) == ("PodWaiting", reason)
    assert problem.message.startswith(
        f'conversion pod {POD} cannot start: {reason}: secret "s3" not found; '
    )


def test_pod_problem_messages_say_what_to_do() -> None:
    cfg = pod_problem(
        pod(
            containerStatuses=[
                waiting("CreateContainerConfigError", 'secret "s3" not found'),
            ]
        )
    )
    assert cfg == PodProblem(
        "PodWaiting",
        "CreateContainerConfigError",
        f'conversion pod {POD} cannot start: CreateContainerConfigError: secret "s3" not '
        "found; create or fix the Secret/ConfigMap (or key) it names",
    )
    pull = pod_problem(pod(containerStatuses=[waiting("ImagePullBackOff")]))
    assert pull is not None
    assert pull.message.startswith(f"conversion pod {POD} cannot start: ImagePullBackOff; ")
    assert "converter image" in pull.message and "imagePullSecrets" in pull.message


def test_pod_problem_init_containers_count_too() -> None:
    p = pod(
        initContainerStatuses=[waiting("ErrImagePull", "not found", name="init")],
        containerStatuses=[waiting("PodInitializing")],
    )
    assert pod_problem(p).detail == "ErrImagePull"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "p",
    [
        None,
        {"metadata": {"name": POD}},  # no status yet
        pod(),  # not scheduled yet: the scheduler has not decided
        pod(conditions=[cond("PodScheduled", "True")]),
        pod(conditions=[cond("PodScheduled", "False", reason="SchedulingGated")]),
        pod(containerStatuses=[waiting("ContainerCreating")]),  # normal start
        pod(containerStatuses=[waiting("PodInitializing")]),
        pod("Running", containerStatuses=[{"name": "convert", "state": {"running": {}}}]),
        # the pod already ran: its termination message and the Job tell the rest
        pod("Failed", containerStatuses=[waiting("ImagePullBackOff")]),
        pod("Succeeded", conditions=[cond("PodScheduled", "False", reason="Unschedulable")]),
    ],
)
def test_pod_problem_none(p: dict[str, Any] | None) -> None:
    assert pod_problem(p) is None


def test_derive_pod_problem_is_pending_not_converting() -> None:
    problem = PodProblem("PodWaiting", "CreateContainerConfigError", "pod cannot start: x")
    st = derive(job=job(start=T0, active=1), pod=problem)
    assert st["phase"] == "Pending"
    assert st["startTime"] == T0
    assert st["conditions"] == [
        _c("Ready", "False", "PodWaiting", "pod cannot start: x"),
        SPEC_VALID,
        JOB_CREATED,
        _c("Converting", "False", "CreateContainerConfigError", "pod cannot start: x"),
    ]
    # once the pod runs, Converting again (transition times move: status changed)
    running = derive(st, job=job(start=T0, active=1), now=T1)
    assert running["phase"] == "Running"
    assert get_condition(running, "Converting")["lastTransitionTime"] == T1  # type: ignore[index]
    assert get_condition(running, "Ready")["lastTransitionTime"] == T0  # type: ignore[index]


def test_derive_a_finished_job_wins_over_a_pod_problem() -> None:
    problem = PodProblem("Unschedulable", "Unschedulable", "cannot be scheduled")
    failed = derive(job=job(cond("Failed", reason="DeadlineExceeded"), start=T0), pod=problem)
    assert failed["phase"] == "Failed"
    assert get_condition(failed, "Ready")["reason"] == "DeadlineExceeded"  # type: ignore[index]


# ------------------------------------------------------------------ needs_polling


def _ready(reason: str, phase: str, job_name: str | None = JOB) -> dict[str, Any]:
    st: dict[str, Any] = {"phase": phase, "conditions": [_c("Ready", "False", reason, "m")]}
    if job_name:
        st["jobName"] = job_name
    return st


@pytest.mark.parametrize(
    ("status", "polled"),
    [
        (None, False),
        ({}, False),
        (_ready("Converting", "Running"), True),
        (_ready("Converting", "Running", job_name=None), False),
        (_ready("Unschedulable", "Pending"), True),
        (_ready("PodWaiting", "Pending"), True),
        # the Job itself changes when it starts: no polling (saves requests)
        (_ready("JobPending", "Pending"), False),
        (_ready("CredentialsSecretNotFound", "Pending"), False),  # the retry timer's
        (_ready("Published", "Succeeded"), False),
        (_ready("SourceNotFound", "Failed"), False),
    ],
)
def test_needs_polling(status: dict[str, Any] | None, polled: bool) -> None:
    assert needs_polling(status) is polled


# ------------------------------------------------------------------ status_events

PENDING_ST = _ready("JobPending", "Pending")
RUNNING_ST = _ready("Converting", "Running")


def test_status_events_on_a_change_of_reason_or_phase_only() -> None:
    assert status_events(None, PENDING_ST) == [Event("Normal", "JobPending", "m")]
    assert status_events(PENDING_ST, copy.deepcopy(PENDING_ST)) == []
    assert status_events(PENDING_ST, RUNNING_ST) == [Event("Normal", "Converting", "m")]
    failed = _ready("SourceNotFound", "Failed")
    assert status_events(RUNNING_ST, failed) == [Event("Warning", "SourceNotFound", "m")]
    published = {"phase": "Succeeded", "conditions": [_c("Ready", "True", "Published", "ok")]}
    assert status_events(RUNNING_ST, published) == [Event("Normal", "Published", "ok")]


def test_status_events_a_stuck_pod_is_a_warning() -> None:
    for reason in ("Unschedulable", "PodWaiting"):
        assert status_events(RUNNING_ST, _ready(reason, "Pending")) == [
            Event("Warning", reason, "m")
        ]


def test_status_events_fold_the_job_creation_into_one_event() -> None:
    created = "created conversion Job j (8 GPUs)"
    assert status_events({}, PENDING_ST, created) == [
        Event("Normal", "JobCreated", f"{created}; JobPending: m")
    ]
    # nothing changed (the Job event wrote it first): the creation still has its Event
    assert status_events(PENDING_ST, PENDING_ST, created) == [
        Event("Normal", "JobCreated", created)
    ]
    # a Warning is not hidden in a Normal event
    stuck = _ready("PodWaiting", "Pending")
    assert status_events({}, stuck, created) == [
        Event("Normal", "JobCreated", created),
        Event("Warning", "PodWaiting", "m"),
    ]
