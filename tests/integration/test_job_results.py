"""Job results (docs/security.md) against the real operator (``preshard operator``,
kopf) and the API emulator, with the preflight on: the tests play the Job controller and
the kubelet for the CPU preflight Job (no S3 is needed: the pod's termination message is
the whole interface).

* a pod forged by a tenant who may create pods (the Job's labels only, or an
  ownerReference to another uid) never decides a resource's status;
* a 3.8 KiB termination message of nested JSON, a huge number, an oversized message:
  the resource fails with ``InvalidResult`` (on main: an uncaught exception in the
  handler, the resource stuck in Preflight);
* a resource waiting on a step Job that never finishes costs the API server next to
  nothing (on main the retry timer re-created and re-read the Job every few seconds).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from preshard.core.progress import Result

from .conftest import K8s, Operator, wait_for

STEP_RETRY_SECONDS = 10
WINDOW_SECONDS = 25.0
WAITING = 20
TARGET_PER_RESOURCE_PER_SECOND = 0.01
COMPLETE = [
    {"type": "SuccessCriteriaMet", "status": "True", "reason": "CompletionsReached"},
    {"type": "Complete", "status": "True", "reason": "CompletionsReached"},
]


@pytest.fixture(scope="module")
def operator_pf(k8s_api: K8s, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    """The operator with the steps before a conversion on (the suite's default operator
    runs with PRESHARD_PREFLIGHT=0)."""
    op = Operator(
        k8s_api,
        tmp_path_factory.mktemp("operator-pf"),
        {"PRESHARD_PREFLIGHT": "1", "PRESHARD_STEP_RETRY_SECONDS": str(STEP_RETRY_SECONDS)},
    )
    op.start()
    try:
        yield op
    finally:
        op.stop()


def findings(config: str = "{}") -> str:
    """A genuine preflight result: source pinned, output prefix empty; ``config`` is
    spliced in as raw JSON text (numbers no Python json would write)."""
    artifact = {
        "kind": "preflight",
        "source": {"uri": "s3://models/llama/", "digest": "sha256:" + "1" * 64},
        "vllmVersion": "0.32.0",
        "config": "CONFIG",
        "output": {"state": "empty", "objects": 0, "overlapping": []},
    }
    text = json.dumps({"result": "Succeeded", "artifact": artifact})
    return text.replace('"CONFIG"', config)


def spec(name: str) -> dict[str, Any]:
    return {
        "source": {"uri": "s3://models/llama/"},
        "tensorParallelSize": 2,
        "output": {"uri": f"s3://out/{name}/", "credentialsSecret": "s3"},
    }


def start(k8s: K8s, name: str) -> tuple[str, dict[str, Any]]:
    ns = k8s.namespace()
    k8s.secret(ns, "s3", {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"})
    k8s.create_checkpoint(ns, name, spec(name))
    job = k8s.wait_jobs(ns, 1, "app.kubernetes.io/component=preflight")[0]
    return ns, job


def complete(k8s: K8s, ns: str, job: dict[str, Any]) -> None:
    k8s.set_job_status(
        ns,
        job["metadata"]["name"],
        {"startTime": "2026-12-06T07:00:00Z", "succeeded": 1, "conditions": COMPLETE},
    )


def ready(k8s: K8s, ns: str, name: str) -> dict[str, Any]:
    return k8s.condition(ns, name) or {}


@pytest.mark.parametrize("forgery", ["label-only", "other-uid"])
def test_a_forged_pod_never_decides_the_step(
    k8s_api: K8s, operator_pf: Operator, forgery: str
) -> None:
    """The genuine pod reports clean findings (-> convert); a newer pod carrying the
    Job's labels (and, in the second case, a controller ownerReference to another uid)
    reports a failure of the attacker's choosing. Only the genuine one is read."""
    k8s = k8s_api
    name = f"forged-{forgery}"
    ns, job = start(k8s, name)
    genuine = k8s.create_pod(ns, job, "genuine")
    k8s.set_pod_terminated(ns, genuine, 0, findings())
    time.sleep(1.1)  # creationTimestamp has 1 s resolution: the forgery is the newest pod
    forged = k8s.create_forged_pod(
        ns, job, "zz-forged", owner_uid=None if forgery == "label-only" else "other-uid"
    )
    message = Result("Failed", reason="ForgedByTenant", message="chosen by the attacker")
    k8s.set_pod_terminated(ns, forged, 3, message.to_message())
    complete(k8s, ns, job)
    wait_for(
        lambda: ready(k8s, ns, name).get("reason") not in (None, "Preflight"),
        30,
        what=f"{ns}/{name} past its preflight",
    )
    assert ready(k8s, ns, name).get("reason") == "JobPending", ready(k8s, ns, name)
    conv = k8s.wait_jobs(ns, 1, "app.kubernetes.io/component=converter")
    assert conv[0]["metadata"]["annotations"]["preshard.io/checkpoint-name"] == name
    c = ready(k8s, ns, name)
    assert c.get("reason") not in ("ForgedByTenant", "PreflightFailed"), c
    status = (k8s.checkpoint(ns, name) or {}).get("status") or {}
    assert status.get("decision", {}).get("step") == "Convert"
    assert "attacker" not in json.dumps(status)


@pytest.mark.parametrize(
    "message, why",
    [
        pytest.param(
            '{"result":"Succeeded","artifact":' + "[" * 1900 + "]" * 1900 + "}",
            "nests deeper",
            id="nested-3.8KiB",
        ),
        pytest.param(findings('{"hidden_size":' + "9" * 300 + "}"), "300 digits", id="huge-int"),
        pytest.param(findings('{"rope_theta":1e400}'), "not finite", id="huge-float"),
        pytest.param(
            json.dumps({"result": "Failed", "reason": "X", "message": "m" * 5000}),
            "larger than 4096 bytes",
            id="oversized",
        ),
    ],
)
def test_a_malformed_result_fails_the_step_with_invalid_result(
    k8s_api: K8s, operator_pf: Operator, message: str, why: str
) -> None:
    k8s = k8s_api
    name = "bad-" + why.split()[0].lower()
    ns, job = start(k8s, name)
    pod = k8s.create_pod(ns, job, "p1")
    k8s.set_pod_terminated(ns, pod, 0, message)
    complete(k8s, ns, job)
    c = k8s.wait_condition(ns, name, "False", "InvalidResult")
    assert why in c["message"] and "not a valid result" in c["message"]
    status = (k8s.checkpoint(ns, name) or {}).get("status") or {}
    assert status.get("phase") == "Failed"
    assert not k8s.jobs(ns, "app.kubernetes.io/component=converter")
    assert "Traceback" not in operator_pf.logs()


def test_resources_waiting_on_step_jobs_make_next_to_no_requests(
    k8s_api: K8s, operator_pf: Operator
) -> None:
    """WAITING resources whose preflight Jobs never finish: over a window longer than two
    safety-timer periods the operator makes fewer than 0.01 requests per second per
    resource (on main: a create and a get of the Job per resource every retry)."""
    k8s = k8s_api
    ns = k8s.namespace()
    k8s.secret(ns, "s3", {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"})
    names = [f"wait-{i:02d}" for i in range(WAITING)]
    for n in names:
        k8s.create_checkpoint(ns, n, spec(n))
    k8s.wait_jobs(ns, WAITING, "app.kubernetes.io/component=preflight", timeout=60)
    wait_for(
        lambda: all(ready(k8s, ns, n).get("reason") == "Preflight" for n in names),
        60,
        what="every resource in Preflight",
    )
    time.sleep(2)  # the creations' own Events and status writes settle

    def operator_requests() -> dict[str, int]:
        total: dict[str, int] = {}
        for agent, counts in k8s.stats(by_agent=True).items():
            if agent.startswith("preshard-tests"):
                continue
            for key, n in counts.items():
                total[key] = total.get(key, 0) + n
        return total

    before = operator_requests()
    time.sleep(WINDOW_SECONDS)
    after = operator_requests()
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    delta = {k: v for k, v in delta.items() if v and not k.startswith("watch ")}
    made = sum(delta.values())
    rate = made / WINDOW_SECONDS / WAITING
    assert rate < TARGET_PER_RESOURCE_PER_SECOND, (rate, delta)
    assert not any(k.startswith(("create jobs", "get jobs")) for k in delta), delta
    # the safety timer did run meanwhile (its interval is shorter than the window) and
    # left every resource where it was, with its one Job
    assert len(k8s.jobs(ns, "app.kubernetes.io/component=preflight")) == WAITING
    assert all(ready(k8s, ns, n).get("reason") == "Preflight" for n in names)
