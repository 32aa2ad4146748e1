"""Faults end to end, each ending with nothing lost and a truthful status.

These use the stand-in worker (see conftest) except the missing-source test, which runs
the real ``preshard convert``: what is under test is the operator, the Job semantics and
the resumable, manifest-last S3 publish, which the stand-in runs for real.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from preshard.core.manifest import MANIFEST_NAME
from preshard_dev.faultproxy import FaultProxy, FaultRule
from preshard_dev.stack import LocalStack

from .conftest import (
    checkpoint_doc,
    cli,
    conversion_history,
    is_conversion_pod,
    ready_condition,
    seed_fake_source,
    status_of,
    wait_phase,
)

pytestmark = pytest.mark.e2e
NS = "default"


def converter_jobs(stack: LocalStack) -> list[dict[str, Any]]:
    return stack.jobs(NS, "converter")


def manifest_keys(stack: LocalStack, prefix: str) -> dict[str, int]:
    client = stack.s3_client()
    body = client.get_object(Bucket="preshard-checkpoints", Key=prefix + MANIFEST_NAME)[
        "Body"
    ].read()
    return {f["key"]: int(f["size"]) for f in json.loads(body)["files"]}


def wait_log(path_of: Any, text: str, timeout: float = 60) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = path_of()
        if p is not None and p.exists() and text in p.read_text(errors="replace"):
            return Path(p)
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never appeared in the pod log")


def running_pod(stack: LocalStack) -> tuple[str, int]:
    assert stack.runner is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        running = {p: pid for p, pid in stack.runner.running_pids().items() if is_conversion_pod(p)}
        if running:
            return next(iter(running.items()))
        time.sleep(0.2)
    raise AssertionError("no conversion process started")


def test_worker_killed_mid_upload_resumes_and_publishes_everything(
    stack_factory: Any, tmp_path: Path
) -> None:
    marker = tmp_path / "stalled-once"
    stack: LocalStack = stack_factory(
        runner_options={
            "base_env": {
                "PRESHARD_STANDIN_STALL_AFTER": "2",
                "PRESHARD_STANDIN_STALL_ONCE": str(marker),
            }
        }
    )
    seed_fake_source(stack)
    stack.apply(checkpoint_doc("killed", tp=4), NS)
    pod, pid = running_pod(stack)
    assert stack.runner is not None
    log = wait_log(lambda: stack.runner.pod_logs().get(pod), "stalling mid-upload")
    # mid-upload: some shards are in the bucket, the manifest is not
    partial = stack.list_prefix("preshard-checkpoints", "killed/")
    assert partial and "killed/" + MANIFEST_NAME not in partial
    os.killpg(pid, signal.SIGKILL)

    status = wait_phase(stack, NS, "killed", ("Succeeded", "Failed"), 90)
    assert status["phase"] == "Succeeded", status
    assert ready_condition(status)["status"] == "True"
    attempts = stack.runner.attempts_of(status["jobName"])
    assert [a["exitCode"] for a in attempts] == [137, 0]
    retry_log = Path(attempts[1]["log"]).read_text()
    # the retry skipped what the killed attempt had completed
    assert "bytes already present and verified" in retry_log
    assert " 0 bytes already present" not in retry_log, retry_log
    assert log != Path(attempts[1]["log"])
    listed = stack.list_prefix("preshard-checkpoints", "killed/")
    files = manifest_keys(stack, "killed/")
    assert sorted(files) == sorted(
        k.removeprefix("killed/") for k in listed if not k.endswith(MANIFEST_NAME)
    )
    assert len([k for k in files if k.startswith("model-rank-")]) == 4
    v = cli(stack, "verify", "s3://preshard-checkpoints/killed/")
    assert v.returncode == 0, v.stderr
    assert len(converter_jobs(stack)) == 1


def test_operator_restarted_while_the_job_runs(stack_factory: Any) -> None:
    stack: LocalStack = stack_factory(
        runner_options={"base_env": {"PRESHARD_STANDIN_SECONDS": "6"}}
    )
    seed_fake_source(stack)
    stack.apply(checkpoint_doc("restart"), NS)
    wait_phase(stack, NS, "restart", ("Running",), 60)
    stack.stop_operator(kill=True)
    assert stack.runner is not None
    # the conversion finishes while no operator runs
    stack.wait_for(lambda: conversion_history(stack), 60, "the conversion to finish")
    assert status_of(stack, NS, "restart")["phase"] == "Running"  # nobody updated it
    stack.start_operator()
    status = wait_phase(stack, NS, "restart", ("Succeeded", "Failed"), 60)
    assert status["phase"] == "Succeeded" and ready_condition(status)["status"] == "True"
    assert status["artifact"]["uri"] == "s3://preshard-checkpoints/restart/"
    jobs = converter_jobs(stack)
    assert len(jobs) == 1 and jobs[0]["metadata"]["name"] == status["jobName"]
    assert len(stack.runner.attempts_of(status["jobName"])) == 1
    assert stack.configmap(NS, "restart-serving") is not None


def test_transient_s3_errors_lose_nothing(stack_factory: Any) -> None:
    proxies: list[FaultProxy] = []

    def wrap(upstream: str) -> str:
        proxy = FaultProxy(upstream).start()
        proxy.add_rule(FaultRule(operation="UploadPart", fraction=0.3, code="SlowDown", status=503))
        proxy.add_rule(
            FaultRule(operation="PutObject", fraction=0.3, code="InternalError", status=500)
        )
        proxy.add_rule(FaultRule(operation="GetObject", fraction=0.3, code="SlowDown", status=503))
        proxies.append(proxy)
        return proxy.endpoint

    stack: LocalStack = stack_factory(s3_wrapper=wrap)
    try:
        seed_fake_source(stack)
        stack.apply(checkpoint_doc("flaky", tp=8), NS)
        status = wait_phase(stack, NS, "flaky", ("Succeeded", "Failed"), 120)
        assert status["phase"] == "Succeeded", status
        (proxy,) = proxies
        faults_during_publish = proxy.stats().faults
        assert faults_during_publish > 0
        # the serving side reads through the same faulty endpoint
        fetched = cli(
            stack,
            "fetch",
            "--from",
            "s3://preshard-checkpoints/flaky/",
            "--to",
            str(stack.base_dir / "fetched"),
            endpoint=proxy.endpoint,
        )
        assert fetched.returncode == 0, fetched.stderr
        files = manifest_keys(stack, "flaky/")
        for key, size in files.items():
            assert (stack.base_dir / "fetched" / key).stat().st_size == size
        v = cli(stack, "verify", "s3://preshard-checkpoints/flaky/")
        assert v.returncode == 0, v.stderr
        assert (
            len(stack.runner.attempts_of(status["jobName"])) == 1
        )  # retried inside, not by the Job
    finally:
        for p in proxies:
            p.stop()


def test_missing_source_fails_once_with_a_reason_naming_the_uri(stack_factory: Any) -> None:
    # the real worker: the CPU-only preflight finds it, before any conversion Job
    stack: LocalStack = stack_factory(real_worker=True)
    doc = checkpoint_doc("nosource")
    doc["spec"]["source"]["uri"] = "s3://preshard-models/does-not-exist/"
    stack.apply(doc, NS)
    status = wait_phase(stack, NS, "nosource", ("Failed",), 120)
    ready = ready_condition(status)
    assert ready["status"] == "False"
    assert "s3://preshard-models/does-not-exist/" in ready["message"]
    assert ready["reason"] == "SourceNotFound", ready
    time.sleep(3)  # no retry storm: still one Job with one pod
    assert converter_jobs(stack) == []  # no accelerator was ever requested
    jobs = stack.jobs(NS, "preflight")
    assert len(jobs) == 1
    assert stack.runner is not None
    assert len(stack.runner.attempts_of(jobs[0]["metadata"]["name"])) == 1
    failed = [c for c in jobs[0]["status"]["conditions"] if c["type"] == "Failed"]
    assert failed and failed[0]["reason"] == "PodFailurePolicy"
    assert not stack.list_prefix("preshard-checkpoints", "nosource/")
    reasons = [e["reason"] for e in stack.events(NS)]
    assert reasons.count("JobCreated") == 1


def test_delete_mid_conversion_stops_the_job_and_leaves_nothing(stack_factory: Any) -> None:
    stack: LocalStack = stack_factory(
        runner_options={"base_env": {"PRESHARD_STANDIN_STALL_AFTER": "2"}}
    )
    seed_fake_source(stack)
    stack.apply(checkpoint_doc("doomed", tp=4, deletionPolicy="Delete"), NS)
    pod, _pid = running_pod(stack)
    assert stack.runner is not None
    wait_log(lambda: stack.runner.pod_logs().get(pod), "stalling mid-upload")
    assert stack.list_prefix("preshard-checkpoints", "doomed/")  # partial upload
    stack.delete_checkpoint(NS, "doomed")
    stack.wait_for(lambda: stack.checkpoint(NS, "doomed") is None, 90, "the resource to go")
    history = {h["pod"]: h for h in stack.runner.history}
    assert history[pod]["stopReason"] == "Deleted"
    purge = [h for h in stack.runner.history if "-purge-" in h["job"]]
    assert purge and purge[-1]["exitCode"] == 0
    assert stack.list_prefix("preshard-checkpoints", "doomed/") == {}
    assert not stack.runner.running_pids()
    assert converter_jobs(stack) == []
