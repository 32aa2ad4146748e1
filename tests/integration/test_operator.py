"""The real kopf operator (`preshard operator` subprocess) over HTTP against the Kubernetes
API emulator. Kubernetes' Job controller and kubelet do not run here: the tests play
them by writing Job status, Pods with termination messages and pod log lines, exactly
the records the operator reads on a real cluster."""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from typing import Any

import pytest

from preshard.core.progress import ProgressRecord, Result
from preshard.k8s.rbac import required_rbac

from .conftest import K8s, Operator, wait_for

SECRET_VALUE = "s3cr3t-value-never-shown"
FINALIZER = "preshard.io/finalizer"
ARTIFACT = {
    "uri": "s3://out/llama/tp2/",
    "manifestUri": "s3://out/llama/tp2/preshard-manifest.json",
    "files": 4,
    "totalBytes": 123456,
    "manifestSha256": "ab" * 32,
    "vllmVersion": "0.32.0",
}


def spec(output: str | None = None, tp: int = 2, pp: int = 1, **extra: Any) -> dict[str, Any]:
    # a distinct output per resource unless a test wants a conflict
    output = output or f"s3://out/{uuid.uuid4().hex[:8]}/tp{tp}/"
    s: dict[str, Any] = {
        "source": {"uri": "s3://models/llama/"},
        "tensorParallelSize": tp,
        "pipelineParallelSize": pp,
        "output": {"uri": output, "credentialsSecret": "s3", "endpoint": "http://minio.local:9000"},
    }
    s.update(extra)
    return s


@pytest.fixture
def ns(k8s_api: K8s) -> str:
    name = k8s_api.namespace()
    k8s_api.secret(
        name, "s3", {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": SECRET_VALUE}
    )
    return name


def handled(k8s: K8s, ns: str, name: str) -> bool:
    """kopf stored what it handled (its last patch after the handlers)."""
    meta = (k8s.checkpoint(ns, name) or {}).get("metadata") or {}
    return "preshard.io/last-handled-configuration" in (meta.get("annotations") or {})


def finalizers(k8s: K8s, ns: str, name: str) -> list[str]:
    return list(((k8s.checkpoint(ns, name) or {}).get("metadata") or {}).get("finalizers") or [])


def set_deletion_policy(k8s: K8s, ns: str, name: str, policy: str) -> None:
    k8s.custom.patch_namespaced_custom_object(
        "preshard.io",
        "v1alpha1",
        ns,
        "shardedcheckpoints",
        name,
        {"spec": {"deletionPolicy": policy}},
    )


def active_jobs_gauge(operator: Operator) -> float:
    url = f"http://127.0.0.1:{operator.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    (line,) = [ln for ln in text.splitlines() if ln.startswith("preshard_active_jobs ")]
    return float(line.split()[-1])


def start_job(k8s: K8s, ns: str, job: dict[str, Any]) -> None:
    """Play the Job controller: it counts a pod that exists (even Pending) as active."""
    k8s.set_job_status(
        ns, job["metadata"]["name"], {"startTime": "2026-01-01T00:00:00Z", "active": 1}
    )


def set_pod_status(k8s: K8s, ns: str, pod: str, status: dict[str, Any]) -> None:
    """Play the scheduler and the kubelet."""
    k8s.core.patch_namespaced_pod_status(pod, ns, {"status": status})


def converter_jobs(k8s: K8s, ns: str) -> list[dict[str, Any]]:
    return k8s.jobs(ns, "app.kubernetes.io/component=converter")


def finish_job(k8s: K8s, ns: str, job: dict[str, Any], result: Result, suffix: str = "a") -> None:
    """Play the Job controller: a pod that terminated with ``result``, then Job conditions."""
    pod = k8s.create_pod(ns, job, suffix)
    ok = result.result == "Succeeded"
    k8s.set_pod_terminated(ns, pod, 0 if ok else 3, result.to_message())
    conds = (
        [
            {"type": "SuccessCriteriaMet", "status": "True", "reason": "CompletionsReached"},
            {"type": "Complete", "status": "True", "reason": "CompletionsReached"},
        ]
        if ok
        else [
            {
                "type": "FailureTarget",
                "status": "True",
                "reason": "PodFailurePolicy",
                "message": "Container convert exited with 3",
            },
            {
                "type": "Failed",
                "status": "True",
                "reason": "PodFailurePolicy",
                "message": "Container convert exited with 3",
            },
        ]
    )
    k8s.set_job_status(
        ns,
        job["metadata"]["name"],
        {
            "startTime": "2026-01-01T00:00:00Z",
            "completionTime": "2026-01-01T00:05:00Z",
            "succeeded" if ok else "failed": 1,
            "conditions": conds,
        },
    )


def test_create_makes_one_job_with_gpus_args_and_secret_refs(
    k8s_api: K8s, operator: Operator, ns: str
) -> None:
    k8s_api.create_checkpoint(
        ns, "llama", spec(output="s3://out/llama/tp4/", tp=4, pp=2, quantization="fp8")
    )
    (job,) = k8s_api.wait_jobs(ns)
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert c["resources"]["requests"]["nvidia.com/gpu"] == "8"
    assert c["image"] == "registry.example/preshard-converter:test"
    assert c["command"] == ["preshard"]
    args = c["args"]
    assert args[0] == "convert"
    assert args[args.index("--tensor-parallel-size") + 1] == "4"
    assert args[args.index("--pipeline-parallel-size") + 1] == "2"
    assert args[args.index("--quantization") + 1] == "fp8"
    assert args[args.index("--output") + 1] == "s3://out/llama/tp4/"
    uid = k8s_api.checkpoint(ns, "llama")["metadata"]["uid"]  # type: ignore[index]
    assert args[args.index("--owner") + 1] == f"{ns}/llama/{uid}"
    env = {e["name"]: e for e in c["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "s3",
        "key": "AWS_SECRET_ACCESS_KEY",
    }
    assert env["AWS_ENDPOINT_URL_S3"]["value"] == "http://minio.local:9000"
    assert SECRET_VALUE not in json.dumps(job)
    assert pod["automountServiceAccountToken"] is False
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert job["metadata"]["ownerReferences"][0]["uid"] == uid
    assert job["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [3]
    cond = k8s_api.wait_condition(ns, "llama", "False", "JobPending")
    assert cond["observedGeneration"] == 1
    obj = k8s_api.checkpoint(ns, "llama")
    assert obj["status"]["jobName"] == job["metadata"]["name"]  # type: ignore[index]
    assert obj["status"]["phase"] == "Pending"  # type: ignore[index]
    # one Event for the creation, naming the state it left the resource in
    (created,) = wait_for(lambda: k8s_api.events(ns), what="JobCreated event")
    assert created["reason"] == "JobCreated" and created["type"] == "Normal"
    assert created["message"].startswith(
        f"created conversion Job {job['metadata']['name']} (8 GPUs); JobPending: "
    )
    assert "waiting for the conversion pod to start" in created["message"]
    # deletionPolicy Retain (the default): no finalizer, nothing to do on deletion
    assert FINALIZER not in (obj["metadata"].get("finalizers") or [])  # type: ignore[index]
    assert SECRET_VALUE not in json.dumps(k8s_api.events(ns))


def test_one_at_a_time_each_resource_gets_one_status_write_and_one_event(
    k8s_api: K8s, operator: Operator, ns: str
) -> None:
    # The Job's ADDED event races with the handler that created it: both derive the same
    # status, it must be written once and announced once.
    names = [f"single-{i}" for i in range(5)]
    for name in names:
        k8s_api.create_checkpoint(ns, name, spec())
        k8s_api.wait_condition(ns, name, "False", "JobPending")
        wait_for(lambda n=name: handled(k8s_api, ns, n), what=f"kopf done with {name}")
    versions = {n: k8s_api.checkpoint(ns, n)["metadata"]["resourceVersion"] for n in names}  # type: ignore[index]
    time.sleep(2)  # any late duplicate write or Event would arrive by now
    events = k8s_api.events(ns)
    assert sorted(e["involvedObject"]["name"] for e in events) == names
    assert {e["reason"] for e in events} == {"JobCreated"}
    assert {n: k8s_api.checkpoint(ns, n)["metadata"]["resourceVersion"] for n in names} == versions  # type: ignore[index]


def test_progress_then_complete_gives_ready_artifact_serving_and_configmap(
    k8s_api: K8s, operator: Operator, ns: str
) -> None:
    k8s_api.create_checkpoint(ns, "tiny", spec(output="s3://out/llama/tp2/"))
    (job,) = k8s_api.wait_jobs(ns)
    pod = k8s_api.create_pod(ns, job, "p1")
    k8s_api.set_job_status(
        ns, job["metadata"]["name"], {"startTime": "2026-01-01T00:00:00Z", "active": 1}
    )
    k8s_api.append_log(
        ns,
        pod,
        "loading model...\n"
        + ProgressRecord(
            "Uploading",
            300,
            1000,
            1.0,
            rate=100.0,
            eta=7.0,
            stage_seconds={"Converting": 61.2, "Verifying": 4.0, "Uploading": 3.0},
        ).to_line()
        + "\n",
    )
    k8s_api.wait_condition(ns, "tiny", "False", "Converting")

    def progress() -> dict[str, Any] | None:
        p = ((k8s_api.checkpoint(ns, "tiny") or {}).get("status") or {}).get("progress")
        return p if p and p.get("bytesDone") == 300 else None

    # Rate, ETA and durations reach status (and the CRD's schema keeps them).
    assert wait_for(progress, 20, what="progress from the pod log") == {
        "stage": "Uploading",
        "bytesDone": 300,
        "bytesTotal": 1000,
        "bytesPerSecond": 100,
        "rate": "100 B/s",
        "etaSeconds": 7,
        "eta": "7s",
        "stageSeconds": {"Converting": 61, "Verifying": 4, "Uploading": 3},
    }
    ready = next(
        c
        for c in k8s_api.checkpoint(ns, "tiny")["status"]["conditions"]  # type: ignore[index]
        if c["type"] == "Ready"
    )
    assert "(Uploading: 300 B of 1000 B, 100 B/s, ETA 7s)" in ready["message"]
    assert k8s_api.checkpoint(ns, "tiny")["status"]["phase"] == "Running"  # type: ignore[index]

    verification = {
        "passed": True,
        "summary": "reloaded at TP=2: 3 prompts x 8 tokens equal the source's",
        "checks": [{"name": "reload-tokens", "passed": True, "detail": "3 prompts x 8 tokens"}],
    }
    done = Result(
        "Succeeded",
        artifact=ARTIFACT,
        stages={"Converting": 61.2, "Verifying": 4.0, "Uploading": 9.6},
        verification=verification,
    )
    finish_job(k8s_api, ns, job, done, "p2")
    cond = k8s_api.wait_condition(ns, "tiny", "True", "Published")
    assert "s3://out/llama/tp2/" in cond["message"]
    status = k8s_api.checkpoint(ns, "tiny")["status"]  # type: ignore[index]
    assert status["phase"] == "Succeeded"
    assert status["artifact"] == ARTIFACT
    assert status["progress"] == {
        "stage": "Published",
        "bytesDone": ARTIFACT["totalBytes"],
        "bytesTotal": ARTIFACT["totalBytes"],
        "stageSeconds": {"Converting": 61, "Verifying": 4, "Uploading": 10},
        "verification": verification,
    }
    assert status["completionTime"] == "2026-01-01T00:05:00Z"
    assert status["serving"]["loadFormat"] == "runai_streamer_sharded"
    assert status["serving"]["configMapName"] == "tiny-serving"
    args = status["serving"]["args"]
    assert args[:4] == ["--model", "s3://out/llama/tp2/", "--load-format", "runai_streamer_sharded"]
    assert {"name": "AWS_ENDPOINT_URL", "value": "http://minio.local:9000"} in status["serving"][
        "env"
    ]
    cm = k8s_api.core.read_namespaced_config_map("tiny-serving", ns)
    assert cm.data["MODEL"] == "s3://out/llama/tp2/"
    assert cm.data["TENSOR_PARALLEL_SIZE"] == "2"
    assert cm.data["FETCH_COMMAND"] == (
        "preshard fetch --from s3://out/llama/tp2/ --to /models/tiny --manifest-sha256 "
        + "ab" * 32
        + " --tensor-parallel-size 2 --pipeline-parallel-size 1"
    )
    assert cm.metadata.owner_references[0].name == "tiny"
    assert SECRET_VALUE not in json.dumps(cm.data)
    types = {c["type"]: c for c in status["conditions"]}
    assert types["Published"]["status"] == "True"
    assert all(c["observedGeneration"] == 1 for c in status["conditions"])


@pytest.mark.parametrize(
    "artifact",
    [
        {k: v for k, v in ARTIFACT.items() if k not in ("uri", "manifestUri")},  # KeyError before
        {**ARTIFACT, "uri": "s3://attacker/x/", "manifestUri": "s3://attacker/x/m.json"},
    ],
    ids=["no-uri", "forged-uri"],
)
def test_serving_hand_off_comes_from_the_spec_not_the_termination_message(
    k8s_api: K8s, operator: Operator, ns: str, artifact: dict[str, Any]
) -> None:
    out = f"s3://out/handoff-{ns}/tp2/"  # claims span namespaces: one prefix per case
    k8s_api.create_checkpoint(ns, "handoff", spec(output=out))
    (job,) = k8s_api.wait_jobs(ns)
    finish_job(k8s_api, ns, job, Result("Succeeded", artifact=artifact))
    k8s_api.wait_condition(ns, "handoff", "True", "Published")
    status = k8s_api.checkpoint(ns, "handoff")["status"]  # type: ignore[index]
    assert status["artifact"]["uri"] == out
    assert status["artifact"]["manifestUri"] == out + "preshard-manifest.json"
    assert status["serving"]["args"][:2] == ["--model", out]
    cm = k8s_api.core.read_namespaced_config_map("handoff-serving", ns)
    assert cm.data["MODEL"] == out
    assert "attacker" not in json.dumps(cm.data) + json.dumps(status)


def test_a_serving_configmap_this_resource_does_not_own_is_left_alone(
    k8s_api: K8s, operator: Operator, ns: str
) -> None:
    k8s_api.core.create_namespaced_config_map(
        ns, {"metadata": {"name": "taken-serving"}, "data": {"MODEL": "theirs"}}
    )
    k8s_api.create_checkpoint(ns, "taken", spec(output="s3://out/taken/tp2/"))
    (job,) = k8s_api.wait_jobs(ns)
    finish_job(k8s_api, ns, job, Result("Succeeded", artifact=ARTIFACT))
    cond = k8s_api.wait_condition(ns, "taken", "False", "ServingConfigMapConflict")
    assert "taken-serving" in cond["message"]
    cm = k8s_api.core.read_namespaced_config_map("taken-serving", ns)
    assert cm.data == {"MODEL": "theirs"} and not cm.metadata.owner_references


def test_a_name_longer_than_a_label_value_reaches_ready(
    k8s_api: K8s, operator: Operator, ns: str
) -> None:
    # 63 characters is the label-value limit; the operator finds the owner of a Job by its
    # preshard.io/checkpoint-name annotation, the label holds a cut name and a hash
    name = "llama-3-1-405b-instruct." + "x" * 80
    k8s_api.create_checkpoint(ns, name, spec(output="s3://out/long/tp2/"))
    (job,) = k8s_api.wait_jobs(ns)
    assert job["metadata"]["annotations"]["preshard.io/checkpoint-name"] == name
    assert all(len(v) <= 63 for v in job["metadata"]["labels"].values())
    finish_job(k8s_api, ns, job, Result("Succeeded", artifact=ARTIFACT))
    k8s_api.wait_condition(ns, name, "True", "Published")
    status = k8s_api.checkpoint(ns, name)["status"]  # type: ignore[index]
    cm = k8s_api.core.read_namespaced_config_map(status["serving"]["configMapName"], ns)
    assert all(len(v) <= 63 for v in cm.metadata.labels.values())


def test_failed_job_reports_the_workers_reason(k8s_api: K8s, operator: Operator, ns: str) -> None:
    k8s_api.create_checkpoint(ns, "missing", spec())
    (job,) = k8s_api.wait_jobs(ns)
    msg = "source s3://models/llama/ does not exist or is empty (no objects under the prefix)"
    finish_job(k8s_api, ns, job, Result("Failed", reason="SourceNotFound", message=msg))
    cond = k8s_api.wait_condition(ns, "missing", "False", "SourceNotFound")
    assert "s3://models/llama/" in cond["message"]
    assert k8s_api.checkpoint(ns, "missing")["status"]["phase"] == "Failed"  # type: ignore[index]
    wait_for(
        lambda: any(
            e["reason"] == "SourceNotFound" and e["type"] == "Warning" for e in k8s_api.events(ns)
        ),
        what="Warning event",
    )
    assert len(converter_jobs(k8s_api, ns)) == 1


def test_missing_secret_is_reported_and_heals_without_affecting_others(
    k8s_api: K8s, operator: Operator
) -> None:
    ns = k8s_api.namespace()
    k8s_api.create_checkpoint(ns, "nosecret", spec(output="s3://out/a/"))
    cond = k8s_api.wait_condition(ns, "nosecret", "False", "CredentialsSecretNotFound")
    assert "'s3'" in cond["message"] and ns in cond["message"]
    # another resource with its secret present proceeds normally meanwhile
    other = k8s_api.namespace()
    k8s_api.secret(other, "s3", {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"})
    k8s_api.create_checkpoint(other, "fine", spec(output="s3://out/b/"))
    k8s_api.wait_jobs(other)
    assert converter_jobs(k8s_api, ns) == []
    # creating the Secret heals the first one (periodic re-check)
    k8s_api.secret(ns, "s3", {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"})
    k8s_api.wait_jobs(ns, timeout=30)
    k8s_api.wait_condition(ns, "nosecret", "False", "JobPending")


def test_invalid_spec_that_the_schema_cannot_catch_gives_a_condition(
    k8s_api: K8s, operator: Operator, ns: str
) -> None:
    # maxFileSize below 1Mi passes the schema's pattern but not the operator's check
    k8s_api.create_checkpoint(
        ns,
        "tiny-files",
        spec(output="s3://out/c/") | {"output": {"uri": "s3://out/c/", "maxFileSize": "2k"}},
    )
    cond = k8s_api.wait_condition(ns, "tiny-files", "False", "InvalidSpec")
    assert "maxFileSize" in cond["message"]
    assert converter_jobs(k8s_api, ns) == []
    assert k8s_api.checkpoint(ns, "tiny-files")["status"]["phase"] == "Failed"  # type: ignore[index]


def test_same_output_prefix_conflicts_until_the_owner_is_deleted(
    k8s_api: K8s, operator: Operator, ns: str
) -> None:
    k8s_api.create_checkpoint(ns, "first", spec(output="s3://shared/model/"))
    k8s_api.wait_jobs(ns)
    # "first" claims the prefix once its status names its Job; both resources may share a
    # creationTimestamp (one-second resolution), so the claim, not the timestamp, decides.
    wait_for(lambda: (k8s_api.checkpoint(ns, "first") or {}).get("status", {}).get("jobName"))
    k8s_api.create_checkpoint(
        ns, "second", spec(output="s3://shared/model/tp2/")
    )  # overlapping prefix
    cond = k8s_api.wait_condition(ns, "second", "False", "OutputConflict")
    # the same namespace: the owner may be named (never one of another namespace)
    assert "ShardedCheckpoint first in this namespace" in cond["message"]
    jobs = converter_jobs(k8s_api, ns)
    assert [j["metadata"]["labels"]["preshard.io/checkpoint"] for j in jobs] == ["first"]
    k8s_api.delete_checkpoint(ns, "first")
    wait_for(lambda: k8s_api.checkpoint(ns, "first") is None, what="first deleted")
    wait_for(
        lambda: any(
            j["metadata"]["labels"]["preshard.io/checkpoint"] == "second"
            for j in converter_jobs(k8s_api, ns)
        ),
        30,
        what="second's Job",
    )


def test_operator_restart_adopts_the_job_and_continues(
    k8s_api: K8s, operator: Operator, ns: str
) -> None:
    k8s_api.create_checkpoint(ns, "restart", spec(output="s3://out/restart/"))
    (job,) = k8s_api.wait_jobs(ns)
    operator.stop(kill=True)
    k8s_api.set_job_status(
        ns, job["metadata"]["name"], {"startTime": "2026-01-01T00:00:00Z", "active": 1}
    )
    operator.start()
    k8s_api.wait_condition(ns, "restart", "False", "Converting")
    finish_job(
        k8s_api, ns, job, Result("Succeeded", artifact=ARTIFACT | {"uri": "s3://out/restart/"})
    )
    k8s_api.wait_condition(ns, "restart", "True", "Published")
    assert len(converter_jobs(k8s_api, ns)) == 1


def test_a_pod_that_cannot_start_is_reported_not_converting(
    k8s_api: K8s, operator: Operator, ns: str
) -> None:
    k8s_api.create_checkpoint(ns, "stuck", spec(output="s3://out/stuck/"))
    (job,) = k8s_api.wait_jobs(ns)
    pod = k8s_api.create_pod(ns, job, "p1")
    gpus = (
        "0/4 nodes are available: 4 Insufficient nvidia.com/gpu. preemption: 0/4 nodes are "
        "available: 4 No preemption victims found for incoming pod."
    )
    set_pod_status(
        k8s_api,
        ns,
        pod,
        {
            "phase": "Pending",
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": gpus,
                }
            ],
        },
    )
    start_job(k8s_api, ns, job)  # the Job is active while its pod waits
    cond = k8s_api.wait_condition(ns, "stuck", "False", "Unschedulable")
    assert cond["message"].startswith(
        f"conversion pod {pod} cannot be scheduled: 0/4 nodes are available: 4 Insufficient nvidia.com/gpu."
    )
    status = k8s_api.checkpoint(ns, "stuck")["status"]  # type: ignore[index]
    assert status["phase"] == "Pending"
    assert {c["type"]: c["reason"] for c in status["conditions"]}["Converting"] == "Unschedulable"

    # scheduled, but the kubelet cannot create the container: only the pod changes (not the
    # Job), the operator polls it
    set_pod_status(
        k8s_api,
        ns,
        pod,
        {
            "phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "True"}],
            "containerStatuses": [
                {
                    "name": "convert",
                    "image": "x",
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "state": {
                        "waiting": {
                            "reason": "CreateContainerConfigError",
                            "message": 'secret "s3" not found',
                        }
                    },
                }
            ],
        },
    )
    cond = k8s_api.wait_condition(ns, "stuck", "False", "PodWaiting")
    assert cond["message"].startswith(
        f'conversion pod {pod} cannot start: CreateContainerConfigError: secret "s3" not found; '
    )
    status = k8s_api.checkpoint(ns, "stuck")["status"]  # type: ignore[index]
    assert status["phase"] == "Pending"
    assert {c["type"]: c["reason"] for c in status["conditions"]}[
        "Converting"
    ] == "CreateContainerConfigError"
    warnings = wait_for(
        lambda: (
            {e["reason"] for e in k8s_api.events(ns) if e["type"] == "Warning"}
            >= {"Unschedulable", "PodWaiting"}
        ),
        what="Warning events",
    )
    assert warnings

    # the container runs: Converting, with progress from the log
    set_pod_status(
        k8s_api,
        ns,
        pod,
        {
            "phase": "Running",
            "containerStatuses": [
                {
                    "name": "convert",
                    "image": "x",
                    "imageID": "",
                    "ready": True,
                    "restartCount": 0,
                    "state": {"running": {"startedAt": "2026-01-01T00:01:00Z"}},
                }
            ],
        },
    )
    k8s_api.append_log(ns, pod, ProgressRecord("Downloading", 5, 50, 1.0).to_line() + "\n")
    k8s_api.wait_condition(ns, "stuck", "False", "Converting")
    assert k8s_api.checkpoint(ns, "stuck")["status"]["phase"] == "Running"  # type: ignore[index]
    finish_job(
        k8s_api, ns, job, Result("Succeeded", artifact=ARTIFACT | {"uri": "s3://out/stuck/"}), "p2"
    )
    k8s_api.wait_condition(ns, "stuck", "True", "Published")
    # kopf's timers need its finalizer while they poll a resource, whatever the policy; a
    # finished Retain resource has none
    wait_for(lambda: finalizers(k8s_api, ns, "stuck") == [], what="no finalizer once finished")


def test_only_deletion_policy_delete_has_a_finalizer_and_switching_adds_or_removes_it(
    k8s_api: K8s, operator: Operator, ns: str
) -> None:
    k8s_api.create_checkpoint(ns, "drop", spec(deletionPolicy="Delete"))
    k8s_api.create_checkpoint(ns, "keep", spec(deletionPolicy="Retain"))
    for name in ("drop", "keep"):
        k8s_api.wait_condition(ns, name, "False", "JobPending")
        wait_for(lambda n=name: handled(k8s_api, ns, n), what=f"kopf done with {name}")
    assert finalizers(k8s_api, ns, "drop") == [FINALIZER]
    assert finalizers(k8s_api, ns, "keep") == []
    set_deletion_policy(k8s_api, ns, "keep", "Delete")
    wait_for(lambda: finalizers(k8s_api, ns, "keep") == [FINALIZER], what="finalizer added")
    set_deletion_policy(k8s_api, ns, "keep", "Retain")
    wait_for(lambda: finalizers(k8s_api, ns, "keep") == [], what="finalizer removed")
    set_deletion_policy(k8s_api, ns, "drop", "Retain")
    wait_for(lambda: finalizers(k8s_api, ns, "drop") == [], what="finalizer removed")
    assert len(converter_jobs(k8s_api, ns)) == 2  # a policy change re-creates nothing


def test_retain_set_after_a_failed_purge_releases_the_resource(
    k8s_api: K8s, operator: Operator, ns: str
) -> None:
    k8s_api.create_checkpoint(ns, "purge", spec(deletionPolicy="Delete"))
    k8s_api.wait_jobs(ns)
    wait_for(lambda: finalizers(k8s_api, ns, "purge") == [FINALIZER], what="finalizer")
    k8s_api.delete_checkpoint(ns, "purge")
    (purge,) = k8s_api.wait_jobs(ns, label_selector="app.kubernetes.io/component=purge")
    k8s_api.set_job_status(
        ns,
        purge["metadata"]["name"],
        {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]},
    )
    wait_for(
        lambda: any(e["reason"] == "PurgeFailed" for e in k8s_api.events(ns)),
        what="PurgeFailed event",
    )
    assert k8s_api.checkpoint(ns, "purge") is not None  # the finalizer waits for a purge
    # the way out the PurgeFailed event names: keep the data, release the resource
    set_deletion_policy(k8s_api, ns, "purge", "Retain")
    wait_for(lambda: k8s_api.checkpoint(ns, "purge") is None, 30, what="resource released")


def test_delete_with_retain_keeps_output_and_releases(
    k8s_api: K8s, operator: Operator, ns: str
) -> None:
    k8s_api.create_checkpoint(ns, "keep", spec(output="s3://out/keep/", deletionPolicy="Retain"))
    k8s_api.wait_jobs(ns)
    k8s_api.wait_condition(ns, "keep", "False", "JobPending")
    wait_for(lambda: handled(k8s_api, ns, "keep"), what="kopf done with keep")
    assert finalizers(k8s_api, ns, "keep") == []
    active = active_jobs_gauge(operator)
    k8s_api.delete_checkpoint(ns, "keep")
    # no finalizer: gone at once; the operator forgets it from its DELETED event
    assert k8s_api.checkpoint(ns, "keep") is None
    wait_for(lambda: active_jobs_gauge(operator) == active - 1, what="active Jobs gauge drops")
    wait_for(lambda: k8s_api.checkpoint(ns, "keep") is None, what="resource gone")
    wait_for(
        lambda: converter_jobs(k8s_api, ns) == [],
        what="Job garbage-collected through its ownerReference",
    )
    assert k8s_api.jobs(ns, "app.kubernetes.io/component=purge") == []


def test_delete_with_delete_stops_the_job_and_runs_the_purge_job(
    k8s_api: K8s, operator: Operator, ns: str
) -> None:
    k8s_api.create_checkpoint(ns, "drop", spec(output="s3://out/drop/", deletionPolicy="Delete"))
    k8s_api.wait_jobs(ns)
    k8s_api.delete_checkpoint(ns, "drop")
    (purge,) = k8s_api.wait_jobs(ns, label_selector="app.kubernetes.io/component=purge")
    assert converter_jobs(k8s_api, ns) == []  # stopped before purging
    c = purge["spec"]["template"]["spec"]["containers"][0]
    assert c["args"][:3] == ["purge", "--output", "s3://out/drop/"]
    assert "nvidia.com/gpu" not in json.dumps(c["resources"])
    assert k8s_api.checkpoint(ns, "drop") is not None  # the finalizer waits for the purge
    k8s_api.set_job_status(
        ns, purge["metadata"]["name"], {"conditions": [{"type": "Complete", "status": "True"}]}
    )
    wait_for(
        lambda: k8s_api.checkpoint(ns, "drop") is None, 30, what="resource released after the purge"
    )


def test_metrics_and_rbac(k8s_api: K8s, operator: Operator) -> None:
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{operator.metrics_port}/metrics", timeout=5)
        .read()
        .decode()
    )
    assert "preshard_active_jobs" in text
    assert "preshard_conversion_duration_seconds_bucket" in text
    succeeded = [
        line
        for line in text.splitlines()
        if line.startswith('preshard_conversions_total{result="Succeeded"}')
    ]
    assert succeeded and float(succeeded[0].split()[-1]) >= 1
    # every request the operator made (kopf and the kubernetes client; the tests use their
    # own user agent) is allowed by required_rbac (the metadata-only Secret check is on by
    # default), which the chart's RBAC equals
    allowed = {(res, verb) for r in required_rbac(True) for res in r.resources for verb in r.verbs}
    made = set()
    for agent, counts in k8s_api.stats(by_agent=True).items():
        if agent in ("preshard-tests", "urllib3", "unknown"):
            continue
        for key in counts:
            verb, resource = key.split(" ", 1)
            made.add((resource, verb))
    assert ("jobs", "create") in made and ("shardedcheckpoints/status", "patch") in made
    assert made <= allowed, f"calls not allowed by required_rbac: {made - allowed}"
    assert SECRET_VALUE not in operator.logs()


@pytest.mark.parametrize("forgery", ["label-only", "other-uid"])
def test_a_forged_pod_never_sets_the_artifact_or_the_serving_pin(
    k8s_api: K8s, operator: Operator, ns: str, forgery: str
) -> None:
    """Job results (docs/security.md), the conversion: the genuine pod published
    manifest A; a newer pod a tenant created with the Job's labels (and, in the second
    case, a controller ownerReference to another uid) claims manifest F. status.artifact
    and the serving ConfigMap's pin (MANIFEST_SHA256) are A's."""
    name = f"pin-{forgery}"
    k8s_api.create_checkpoint(ns, name, spec())
    (job,) = k8s_api.wait_jobs(ns, label_selector=f"preshard.io/checkpoint={name}")
    genuine = k8s_api.create_pod(ns, job, "genuine")
    k8s_api.set_pod_terminated(ns, genuine, 0, Result("Succeeded", artifact=ARTIFACT).to_message())
    time.sleep(1.1)  # creationTimestamp has 1 s resolution: the forgery is the newest pod
    forged_sha = "f" * 64
    forged = k8s_api.create_forged_pod(
        ns, job, "zz-forged", owner_uid=None if forgery == "label-only" else "other-uid"
    )
    message = Result("Succeeded", artifact={**ARTIFACT, "manifestSha256": forged_sha})
    k8s_api.set_pod_terminated(ns, forged, 0, message.to_message())
    finish = {
        "startTime": "2026-01-01T00:00:00Z",
        "completionTime": "2026-01-01T00:05:00Z",
        "succeeded": 1,
        "conditions": [
            {"type": "SuccessCriteriaMet", "status": "True", "reason": "CompletionsReached"},
            {"type": "Complete", "status": "True", "reason": "CompletionsReached"},
        ],
    }
    k8s_api.set_job_status(ns, job["metadata"]["name"], finish)
    k8s_api.wait_condition(ns, name, "True", "Published")
    status = (k8s_api.checkpoint(ns, name) or {})["status"]
    assert status["artifact"]["manifestSha256"] == ARTIFACT["manifestSha256"]
    cm = k8s_api.core.read_namespaced_config_map(f"{name}-serving", ns).data
    assert cm["MANIFEST_SHA256"] == ARTIFACT["manifestSha256"]
    assert forged_sha not in json.dumps(status) and forged_sha not in json.dumps(cm)
