"""Issue 18's request budget, counted: one ShardedCheckpoint taken through Ready by the
real operator (``preshard operator``, kopf over HTTP) against the API emulator, the
preflight on, the tests playing the Job controller and the kubelet for its preflight and
conversion Jobs. Counting requests is deterministic (no timed window): the emulator
counts every request per user agent, and the progress poll and the step timer are set
longer than the test, so what is counted is what the steps themselves cost.

The budget is < 10 requests per resource through Ready (bench/operator_scale.py
measures the same with the local Job runner); this resource costs 9: per Job its
creation (2), the status at each state it rests in (Preflight, JobPending, Published:
3), an Event for each Job created and for Ready (3), the serving ConfigMap (1). The
Secret check, the ledger entry and the progress poll are set apart here (a Secret read
is shared by a namespace's resources for 10 s, ledger entries are batched, the poll runs
while a conversion runs) and counted in their own assertions.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from preshard.core.progress import Result

from .conftest import K8s, Operator, wait_for
from .test_job_results import COMPLETE, findings

BUDGET = 10  # requests per resource through Ready (issue 18)
OPERATOR_NAMESPACE = "preshard-system"
ARTIFACT = {
    "uri": "s3://out/budget/tp2/",
    "manifestUri": "s3://out/budget/tp2/preshard-manifest.json",
    "files": 4,
    "totalBytes": 123456,
    "manifestSha256": "cd" * 32,
    "vllmVersion": "0.32.0",
}


@pytest.fixture(scope="module")
def operator_budget(k8s_api: K8s, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    """The operator with the preflight on, the ledger in its namespace, and the timers
    longer than the test (so they make no request in it)."""
    k8s_api.core.create_namespace({"metadata": {"name": OPERATOR_NAMESPACE}})
    op = Operator(
        k8s_api,
        tmp_path_factory.mktemp("operator-budget"),
        {
            "PRESHARD_PREFLIGHT": "1",
            "PRESHARD_OPERATOR_NAMESPACE": OPERATOR_NAMESPACE,
            "PRESHARD_PROGRESS_POLL_SECONDS": "600",
            "PRESHARD_RETRY_SECONDS": "600",
            "PRESHARD_STEP_RETRY_SECONDS": "600",
        },
    )
    op.start()
    try:
        yield op
    finally:
        op.stop()


def operator_requests(k8s: K8s) -> Counter[str]:
    """The operator's requests so far (every user agent but the tests'), watches apart."""
    total: Counter[str] = Counter()
    for agent, counts in k8s.stats(by_agent=True).items():
        if agent.startswith("preshard-tests"):
            continue
        total.update({k: v for k, v in counts.items() if not k.startswith("watch ")})
    return total


def quiet(k8s: K8s, settle: float = 1.5, timeout: float = 30) -> Counter[str]:
    """The operator's requests once it made none for ``settle`` seconds."""
    last, since = operator_requests(k8s), time.monotonic()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = operator_requests(k8s)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= settle:
            return now
    raise AssertionError(f"the operator did not go quiet: {dict(last)}")


def complete(k8s: K8s, ns: str, job: dict[str, Any], message: str, suffix: str) -> None:
    """Play the Job controller and the kubelet: the Job starts, its pod (the template's
    labels, the Job's controller reference) terminates with ``message``, the Job
    completes."""
    name = job["metadata"]["name"]
    k8s.set_job_status(ns, name, {"startTime": "2026-12-06T07:00:00Z", "active": 1})
    pod = k8s.create_pod(ns, job, suffix)
    k8s.set_pod_terminated(ns, pod, 0, message)
    k8s.set_job_status(
        ns,
        name,
        {"startTime": "2026-12-06T07:00:00Z", "active": 0, "succeeded": 1,
         "completionTime": "2026-12-06T07:05:00Z", "conditions": COMPLETE},
    )  # fmt: skip


def test_one_resource_reaches_ready_within_the_request_budget(
    k8s_api: K8s, operator_budget: Operator
) -> None:
    k8s = k8s_api
    ns = k8s.namespace()
    k8s.secret(ns, "s3", {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"})
    quiet(k8s)
    before = operator_requests(k8s)
    spec = {
        "source": {"uri": "s3://models/llama/"},
        "tensorParallelSize": 2,
        "output": {"uri": ARTIFACT["uri"], "credentialsSecret": "s3"},
    }
    k8s.create_checkpoint(ns, "budget", spec)
    (pre,) = k8s.wait_jobs(ns, 1, "app.kubernetes.io/component=preflight")
    k8s.wait_condition(ns, "budget", "False", "Preflight")
    complete(k8s, ns, pre, findings(), "pre")
    (conv,) = k8s.wait_jobs(ns, 1, "app.kubernetes.io/component=converter")
    k8s.wait_condition(ns, "budget", "False", "JobPending")
    done = Result("Succeeded", artifact=ARTIFACT, stages={"Converting": 3.0})
    complete(k8s, ns, conv, done.to_message(), "conv")
    k8s.wait_condition(ns, "budget", "True", "Published")
    made = quiet(k8s, settle=3.0) - before  # the ledger is written 2 s after Ready
    total = sum(made.values())
    print(f"\noperator requests through Ready: {total}: {dict(sorted(made.items()))}")

    # what the steps themselves cost: every count named, so a new request shows here
    shared = {
        "get secrets": 1,  # the Secret check (a namespace's resources share it for 10 s)
        "get configmaps": 1,  # the ledger, read once per operator process
        "patch configmaps": 1,  # the ledger entry (batched; here a 404 ...)
        "create configmaps": 2,  # (... then its creation) and the serving ConfigMap
    }
    assert made == Counter(
        {
            "create jobs": 2,  # the preflight, the conversion
            "patch shardedcheckpoints/status": 3,  # Preflight, JobPending, Published
            "create events": 3,  # each Job created, Ready
            **shared,
        }
    ), dict(made)
    # the resource's own (its Jobs, status, Events, serving ConfigMap) within the budget;
    # the shared ones are amortized over a namespace's (Secret) and a burst's (ledger)
    own = sum(made[k] for k in ("create jobs", "patch shardedcheckpoints/status", "create events"))
    assert own + 1 < BUDGET, dict(made)
    # none of kopf's own patches (finalizer, diff-base, progress), no pod list, no log
    assert not made["patch shardedcheckpoints"] and not made["list pods"]
    obj = k8s.checkpoint(ns, "budget") or {}
    assert "preshard.io/finalizer" not in (obj.get("metadata") or {}).get("finalizers", [])
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    assert not [a for a in annotations if a.startswith("preshard.io/")], annotations
    # and the behaviour is whole: Ready, the path and its duration, the Events
    status = obj.get("status") or {}
    assert status["path"] == "Converted" and status["artifact"]["uri"] == ARTIFACT["uri"]
    reasons = [e["reason"] for e in k8s.events(ns)]
    assert sorted(reasons) == ["JobCreated", "JobCreated", "Published"], reasons
    published = next(e for e in k8s.events(ns) if e["reason"] == "Published")
    assert "(converted in " in published["message"]
    ledger = k8s.core.read_namespaced_config_map("preshard-ledger", OPERATOR_NAMESPACE).data
    assert json.loads(json.dumps(ledger)) == {ARTIFACT["manifestSha256"]: f"{ns}/budget/"
                                               f"{obj['metadata']['uid']}"}  # fmt: skip


def test_a_spec_update_is_handled_without_kopf_annotations(
    k8s_api: K8s, operator_budget: Operator
) -> None:
    """kopf's diff-base is the status's observedGeneration (handlers.diffbase): a spec
    change still reaches the handler (a new conversion Job for the new spec), with no
    annotation of kopf's written."""
    k8s = k8s_api
    ns = k8s.namespace()
    k8s.secret(ns, "s3", {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"})
    spec = {
        "source": {"uri": "s3://models/llama/"},
        "tensorParallelSize": 2,
        "output": {"uri": "s3://out/update/tp2/", "credentialsSecret": "s3"},
    }
    k8s.create_checkpoint(ns, "upd", spec)
    k8s.wait_condition(ns, "upd", "False", "Preflight")
    obj = k8s.checkpoint(ns, "upd") or {}
    assert obj["status"]["observedGeneration"] == 1
    k8s.custom.patch_namespaced_custom_object(
        "preshard.io", "v1alpha1", ns, "shardedcheckpoints", "upd",
        {"spec": {"verify": False}},
    )  # fmt: skip
    wait_for(
        lambda: (
            ((k8s.checkpoint(ns, "upd") or {}).get("status") or {}).get("observedGeneration") == 2
        ),
        30,
        what="the new generation handled",
    )
    obj = k8s.checkpoint(ns, "upd") or {}
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    assert not [a for a in annotations if a.startswith("preshard.io/")], annotations
