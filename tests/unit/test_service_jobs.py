"""service.jobs and the step flow with kopf's Jobs index: a Job in the index is never
fetched and never created again (before the index, the retry timer made a create and a get of
the Job per resource every 10 s). The Kubernetes API is the in-memory fake of
test_handlers_steps (no API server); the index is a plain mapping shaped like kopf's
(key -> values), filled from the fake's Jobs as the watch would."""

from __future__ import annotations

from typing import Any

import pytest

from preshard.core.progress import Result
from preshard.service import reconcile
from preshard.service.jobs import ensure_job, find_job, slim_job
from tests.unit.test_handlers_steps import (
    COMPLETE,
    Fake,
    body,
    findings,
    install,
)


class Counting(Fake):
    def __init__(self, outcomes: dict[str, tuple[dict[str, Any], Result | None]]) -> None:
        super().__init__(outcomes)
        self.calls: list[str] = []

    def create_or_get_job(self, manifest: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        self.calls.append("create_or_get_job")
        return super().create_or_get_job(manifest)

    def get_job(self, ns: str, name: str) -> dict[str, Any] | None:
        self.calls.append("get_job")
        return super().get_job(ns, name)

    def index(self) -> dict[tuple[str, str], list[dict[str, Any]]]:
        """What kopf's index holds once the watch saw the fake's Jobs."""
        return {("ml", n): [slim_job(j)] for n, j in self.jobs.items()}


def test_slim_job_keeps_what_the_operator_reads() -> None:
    job = {
        "metadata": {"name": "j", "namespace": "ml", "uid": "u", "labels": {"a": "b"},
                     "managedFields": [{"x": 1}], "ownerReferences": [{"uid": "o"}]},
        "spec": {"template": {"spec": {"containers": [
            {"name": "c", "image": "i", "command": ["preshard"], "args": ["x"], "env": [1]},
            {"name": "side"},
        ], "volumes": [1]}}},
        "status": {"active": 1},
    }  # fmt: skip
    assert slim_job(job) == {
        "metadata": {"name": "j", "namespace": "ml", "uid": "u", "labels": {"a": "b"},
                     "ownerReferences": [{"uid": "o"}]},
        "spec": {"template": {"spec": {"containers": [
            {"name": "c", "image": "i", "command": ["preshard"], "args": ["x"]},
        ]}}},
        "status": {"active": 1},
    }  # fmt: skip


def test_an_indexed_job_is_neither_fetched_nor_created() -> None:
    fake = Counting({})
    wanted = {"metadata": {"name": "j", "namespace": "ml"}}
    index = {("ml", "j"): [{"metadata": {"name": "j"}, "status": {"active": 1}}]}
    job, created = ensure_job(fake.svc, index, wanted)
    assert (job["status"], created) == ({"active": 1}, False)
    assert find_job(fake.svc, index, "ml", "j") == job
    assert find_job(fake.svc, index, "ml", "other") is None
    assert fake.calls == []
    # not in the index: create-or-get, once
    k = {"metadata": {"name": "k", "namespace": "ml",
                      "labels": {"app.kubernetes.io/component": "preflight"}}}  # fmt: skip
    _, created = ensure_job(fake.svc, {}, k)
    assert created and fake.calls == ["create_or_get_job"]
    # no index at all (outside kopf): the API
    assert find_job(fake.svc, None, "ml", "k") is not None and fake.calls[-1] == "get_job"


def test_a_waiting_step_with_the_index_makes_no_job_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """The preflight Job never finishes; every later pass (a Job event, the safety timer)
    finds it in the index: no create, no get, no status write."""
    fake = install(monkeypatch, Counting({}))
    b = body()
    reconcile.reconcile(fake.svc, b, {}, {}, fake.index())  # creates the preflight Job
    assert fake.calls == ["create_or_get_job"]
    status = dict(fake.status)
    for _ in range(5):
        reconcile.reconcile(fake.svc, {**b, "status": dict(fake.status)}, {}, {}, fake.index())
    assert fake.calls == ["create_or_get_job"]
    assert fake.status == status and len(fake.jobs) == 1


def test_a_finished_step_in_the_index_moves_on_to_the_conversion(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = install(monkeypatch, Counting({"preflight": (COMPLETE, Result("Succeeded",
                   artifact=findings()))}))  # fmt: skip
    b = body()
    reconcile.reconcile(fake.svc, b, {}, {}, fake.index())
    # the preflight Job completed at once (the fake's outcome); from the index the next
    # pass reads its result and creates the conversion Job: one create each, no get
    reconcile.reconcile(fake.svc, {**b, "status": dict(fake.status)}, {}, {}, fake.index())
    assert fake.calls.count("get_job") == 0
    assert sorted(fake.component(j) for j in fake.jobs.values()) == ["converter", "preflight"]
    assert fake.calls.count("create_or_get_job") == 2
