"""Status writes (service.status, through service.reconcile): one write and one Event per
change, whatever the order in which the create handler and a Job event (with a stale
body) get there; the Job's creation folded into that Event; kopf filters and the
checkpoint index (handlers.checkpoint).

The Kubernetes calls are replaced by recorders (no API server)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import kopf
import pytest
import urllib3

from preshard.core.spec import parse_spec
from preshard.handlers import checkpoint as h
from preshard.k8s.api import termination_result
from preshard.k8s.errors import from_client
from preshard.service import Service, reconcile

UID = "0b5c-uid"
SPEC = {
    "source": {"uri": "s3://models/llama/"},
    "tensorParallelSize": 2,
    "output": {"uri": "s3://out/llama/tp2/"},
}
JOB = {"metadata": {"name": "llama-0123456789"}, "status": {}}  # not started


def body(status: dict[str, Any] | None = None, uid: str = UID) -> dict[str, Any]:
    b: dict[str, Any] = {
        "metadata": {"name": "llama", "namespace": "ml", "uid": uid, "generation": 1},
        "spec": dict(SPEC),
    }
    if status is not None:
        b["status"] = status
    return b


class Recorder:
    def __init__(self) -> None:
        self.patches: list[dict[str, Any]] = []
        self.events: list[tuple[str, str, str]] = []
        self.gone = False
        self.api: Any = None
        self.svc: Service

    def patch(self, namespace: str, name: str, patch: dict[str, Any]) -> bool:
        if self.gone:
            return False
        self.patches.append(patch)
        return True

    def event(self, obj: Any, *, type: str, reason: str, message: str) -> None:
        self.events.append((type, reason, message))


@pytest.fixture
def rec(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    r = Recorder()
    monkeypatch.setattr(kopf, "event", r.event)

    def no_pod_reads(*a: Any, **k: Any) -> None:
        raise AssertionError("a Job that has not started has no pod to read")

    r.api = SimpleNamespace(
        patch_checkpoint_status=r.patch,
        job_pod=no_pod_reads,
        pod_progress=no_pod_reads,
        termination_result=termination_result,
    )
    r.svc = Service(api=r.api)  # type: ignore[arg-type]
    yield r
    r.svc.status.forget(UID)


def test_the_create_handler_then_a_stale_job_event_write_once(rec: Recorder) -> None:
    spec = parse_spec(SPEC)
    created = "created conversion Job llama-0123456789 (2 GPUs)"
    reconcile.sync(rec.svc, body(), spec, JOB, job_created=created)
    assert len(rec.patches) == 1 and rec.patches[0]["phase"] == "Pending"
    ((type_, reason, message),) = rec.events
    assert (type_, reason) == ("Normal", "JobCreated")
    assert message.startswith(f"{created}; JobPending: conversion Job llama-0123456789: ")
    # the Job's ADDED event with a body read before that write (no status yet)
    reconcile.sync(rec.svc, body(), spec, JOB)
    assert len(rec.patches) == 1 and len(rec.events) == 1


def test_a_job_event_first_then_the_create_handler(rec: Recorder) -> None:
    spec = parse_spec(SPEC)
    reconcile.sync(rec.svc, body(), spec, JOB)  # the Job event won the race
    reconcile.sync(
        rec.svc, body(), spec, JOB, job_created="created conversion Job llama-0123456789 (2 GPUs)"
    )
    assert len(rec.patches) == 1
    # a Normal step between is not announced (service.status.announced): one Event, the
    # creation's
    assert [r for _, r, _ in rec.events] == ["JobCreated"]
    assert rec.events[0][2] == "created conversion Job llama-0123456789 (2 GPUs)"


def test_known_status_prefers_what_was_written_until_forgotten(rec: Recorder) -> None:
    reconcile.sync(rec.svc, body(), parse_spec(SPEC), JOB)
    written = rec.svc.status.known(body({"phase": "stale"}))
    assert written["phase"] == "Pending" and written["jobName"] == "llama-0123456789"
    rec.svc.status.forget(UID)
    assert rec.svc.status.known(body({"phase": "stale"})) == {"phase": "stale"}


def test_a_resource_deleted_meanwhile_gets_no_event_and_no_cache(rec: Recorder) -> None:
    rec.gone = True
    reconcile.sync(rec.svc, body(), parse_spec(SPEC), JOB, job_created="created")
    assert rec.events == []
    assert rec.svc.status.known(body({"phase": "x"})) == {"phase": "x"}


@pytest.mark.parametrize(
    ("spec", "purges"),
    [
        ({"deletionPolicy": "Delete"}, True),
        ({"deletionPolicy": "Retain"}, False),
        ({}, False),  # the CRD's default is Retain
        (None, False),
    ],
)
def test_only_delete_matches_the_deletion_handler(spec: Any, purges: bool) -> None:
    assert h._purges_output(spec=spec) is purges


def test_the_checkpoint_index_keeps_what_job_events_need() -> None:
    b = body({"phase": "Running"})
    b["metadata"].update(
        {
            "resourceVersion": "42",
            "annotations": {"preshard.io/last-handled-configuration": "{...}"},
            "managedFields": [{"manager": "kopf"}],
            "deletionTimestamp": "2026-01-01T00:00:00Z",
        }
    )
    ((key, slim),) = h.checkpoints(body=kopf.Body(b)).items()
    assert key == ("ml", "llama")
    assert slim == {
        "apiVersion": "preshard.io/v1alpha1",  # for the Events the timers post
        "kind": "ShardedCheckpoint",
        "metadata": {
            "name": "llama",
            "namespace": "ml",
            "uid": UID,
            "generation": 1,
            "deletionTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": SPEC,
        "status": {"phase": "Running"},
    }


@pytest.mark.parametrize(
    "error",
    [
        urllib3.exceptions.ProtocolError("Connection aborted.", ConnectionResetError(104)),
        urllib3.exceptions.MaxRetryError(None, "/api", "refused"),  # type: ignore[arg-type]
        ConnectionRefusedError(111, "refused"),
    ],
)
def test_a_broken_connection_is_retried_soon(
    rec: Recorder, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    # not after kopf's 60 s backoff for unexpected exceptions; the fake stands for KubeApi,
    # whose methods raise the client's errors as the k8s boundary converts them
    def broken(*args: Any) -> Any:
        raise from_client(error)

    monkeypatch.setattr(rec.api, "secret_exists", broken, raising=False)
    monkeypatch.setattr(rec.api, "create_or_get_job", broken, raising=False)
    with pytest.raises(kopf.TemporaryError) as err:
        reconcile.reconcile(rec.svc, body(), {})
    assert err.value.delay == 2
    assert rec.patches == [] and rec.events == []


def _ready(status: str, reason: str, message: str = "m") -> dict[str, Any]:
    return {"type": "Ready", "status": status, "reason": reason, "message": message}


@pytest.mark.parametrize(
    ("old", "new", "created", "posted"),
    [
        # a Normal step between: in the status, not posted
        ({"phase": "Pending", "conditions": [_ready("False", "JobPending")]},
         {"phase": "Running", "conditions": [_ready("False", "Converting")]}, None, []),
        # a Warning: posted
        ({"phase": "Running", "conditions": [_ready("False", "Converting")]},
         {"phase": "Failed", "conditions": [_ready("False", "SourceNotFound", "gone")]}, None,
         [("Warning", "SourceNotFound", "gone")]),
        # a Job created: posted, with the state it left the resource in
        ({}, {"phase": "Pending", "conditions": [_ready("False", "JobPending", "w")]}, "made",
         [("Normal", "JobCreated", "made; JobPending: w")]),
        # Ready: posted, with the path's duration
        ({"phase": "Running", "conditions": [_ready("False", "Converting")]},
         {"phase": "Succeeded", "path": "Converted", "durationSeconds": 42,
          "conditions": [_ready("True", "Published", "at s3://o/")]}, None,
         [("Normal", "Published", "at s3://o/ (converted in 42 s)")]),
        ({"phase": "Running", "conditions": [_ready("False", "Adopting")]},
         {"phase": "Succeeded", "path": "Adopted", "durationSeconds": 3,
          "conditions": [_ready("True", "Adopted", "ok")]}, None,
         [("Normal", "Adopted", "ok (adopted in 3 s)")]),
    ],
)  # fmt: skip
def test_only_creations_warnings_and_ready_are_announced(
    rec: Recorder, old: dict[str, Any], new: dict[str, Any], created: str | None, posted: Any
) -> None:
    rec.svc.status.write(body(), old, new, created)
    assert rec.events == posted
