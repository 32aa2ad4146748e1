"""service.deletion: the deletion state machine of a ``deletionPolicy: Delete`` resource,
with the Kubernetes calls replaced by an in-memory fake (no API server; the same flow
runs against the emulator in tests/integration/test_operator.py and end to end in
tests/e2e/test_faults.py). Every status write goes through the service's status writer:
the fake is the writer's API too, so a patch from elsewhere would show as well."""

from __future__ import annotations

from typing import Any

import kopf
import pytest

from preshard.core.config import OperatorConfig
from preshard.core.naming import job_name
from preshard.core.spec import parse_spec
from preshard.service import Service, deletion

UID = "uid-1"
SPEC = {
    "source": {"uri": "s3://models/llama/"},
    "tensorParallelSize": 2,
    "output": {"uri": "s3://out/llama/", "credentialsSecret": "s3"},
    "deletionPolicy": "Delete",
}
CONV = job_name("llama", parse_spec(SPEC).conversion_hash())
COMPLETE = {"conditions": [{"type": "Complete", "status": "True"}]}
FAILED = {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}
PUBLISHED = {
    "jobName": CONV,
    "phase": "Succeeded",
    "conditions": [{"type": "Published", "status": "True", "reason": "Published"}],
}


class Fake:
    def __init__(self, jobs: dict[str, dict[str, Any]] | None = None) -> None:
        self.jobs = dict(jobs or {})
        self.deleted: list[tuple[str, str]] = []
        self.created: list[dict[str, Any]] = []
        self.patches: list[dict[str, Any]] = []
        self.events: list[tuple[str, str, str]] = []
        self.purge_status: dict[str, Any] = {}

    def get_job(self, ns: str, name: str) -> dict[str, Any] | None:
        return self.jobs.get(name)

    def delete_job(self, ns: str, name: str, propagation: str = "Foreground") -> bool:
        self.deleted.append((name, propagation))
        job = self.jobs.get(name)
        if job is not None:
            job["metadata"]["deletionTimestamp"] = "now"
        return job is not None

    def create_or_get_job(self, manifest: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        name = manifest["metadata"]["name"]
        if name in self.jobs:
            return self.jobs[name], False
        job = {**manifest, "status": dict(self.purge_status)}
        self.jobs[name] = job
        self.created.append(job)
        return job, True

    def patch_checkpoint_status(self, ns: str, name: str, patch: dict[str, Any]) -> bool:
        self.patches.append(patch)
        return True

    def event(self, obj: Any, *, type: str, reason: str, message: str) -> None:
        self.events.append((type, reason, message))


def job(name: str, status: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name}, "status": status or {}}


def body(status: dict[str, Any], spec: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"name": "llama", "namespace": "ml", "uid": UID, "generation": 1,
                     "creationTimestamp": "2026-12-01T00:00:00Z",
                     "deletionTimestamp": "2026-12-01T01:00:00Z"},
        "spec": dict(spec or SPEC),
        "status": status,
    }  # fmt: skip


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Fake:
    f = Fake()
    monkeypatch.setattr(kopf, "event", f.event)
    return f


def service(fake: Fake, config: OperatorConfig | None = None) -> Service:
    return Service(config=config or OperatorConfig(), api=fake)  # type: ignore[arg-type]


def outputs_of(svc: Service, b: dict[str, Any]) -> dict[Any, Any]:
    from preshard.service.reconcile import claim

    me = claim(svc, b, b["status"])
    return {me.store: [me]} if me else {}


def test_a_running_conversion_is_stopped_first_and_the_phase_written_once(fake: Fake) -> None:
    fake.jobs[CONV] = job(CONV, {"active": 1})
    svc = service(fake)
    b = body({**PUBLISHED, "phase": "Running"})
    with pytest.raises(kopf.TemporaryError) as err:
        deletion.delete(svc, b, outputs_of(svc, b))
    assert err.value.delay == 2 and CONV in str(err.value)
    assert fake.deleted == [(CONV, "Foreground")]
    assert fake.patches == [{"phase": "Deleting"}]
    assert [r for _, r, _ in fake.events] == ["Deleting"]
    # kopf retries with the body that now says Deleting: no second write, no second Event
    b["status"]["phase"] = "Deleting"
    with pytest.raises(kopf.TemporaryError):
        deletion.delete(svc, b, outputs_of(svc, b))
    assert fake.patches == [{"phase": "Deleting"}]
    assert fake.deleted == [(CONV, "Foreground")]  # already being deleted
    assert [r for _, r, _ in fake.events] == ["Deleting"]


def test_the_owner_purges_once_its_job_is_gone(fake: Fake) -> None:
    svc = service(fake)
    b = body(dict(PUBLISHED))
    with pytest.raises(kopf.TemporaryError) as err:
        deletion.delete(svc, b, outputs_of(svc, b))
    assert err.value.delay == 3
    (purge,) = fake.created
    args = purge["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:3] == ["purge", "--output", "s3://out/llama/"]
    assert args[args.index("--owner") + 1] == f"ml/llama/{UID}"
    assert fake.patches == [{"phase": "Deleting"}]
    assert [r for _, r, _ in fake.events] == ["Purging"]
    purge["status"] = COMPLETE
    deletion.delete(svc, b, outputs_of(svc, b))  # returns: the finalizer is released
    assert [r for _, r, _ in fake.events] == ["Purging", "Purged"]


def test_a_failed_purge_is_replaced_and_names_the_way_out(fake: Fake) -> None:
    fake.purge_status = FAILED
    svc = service(fake)
    b = body(dict(PUBLISHED))
    with pytest.raises(kopf.TemporaryError) as err:
        deletion.delete(svc, b, outputs_of(svc, b))
    assert err.value.delay == 30
    (purge,) = fake.created
    assert fake.deleted == [(purge["metadata"]["name"], "Background")]
    ((type_, _, message),) = [e for e in fake.events if e[1] == "PurgeFailed"]
    assert type_ == "Warning" and "BackoffLimitExceeded" in message
    assert '"deletionPolicy":"Retain"' in message


def test_a_resource_that_never_wrote_skips_the_purge(fake: Fake) -> None:
    svc = service(fake)
    b = body({"conditions": [{"type": "Ready", "status": "False", "reason": "OutputConflict"}]})
    deletion.delete(svc, b, outputs_of(svc, b))
    assert fake.created == [] and fake.patches == []
    ((_, reason, message),) = fake.events
    assert reason == "PurgeSkipped" and "never wrote" in message


def test_a_service_account_the_policy_no_longer_allows_skips_the_purge(fake: Fake) -> None:
    spec = {**SPEC, "converter": {"serviceAccountName": "cluster-admin"}}
    svc = service(fake)
    b = body(dict(PUBLISHED), spec)
    deletion.delete(svc, b, outputs_of(svc, b))
    assert fake.created == []
    ((_, reason, message),) = fake.events
    assert reason == "PurgeSkipped" and "cluster-admin" in message


@pytest.mark.parametrize(
    ("step", "purges"), [("Copy", True), ("Adopt", False), ("Preflight", False)]
)
def test_a_running_step_is_stopped_and_only_a_copy_is_purged(
    fake: Fake, step: str, purges: bool
) -> None:
    fake.jobs["llama-step"] = job("llama-step", {"active": 1})
    svc = service(fake)
    b = body({"decision": {"step": step, "jobName": "llama-step"}})
    with pytest.raises(kopf.TemporaryError) as err:
        deletion.delete(svc, b, outputs_of(svc, b))
    assert err.value.delay == 2 and fake.deleted == [("llama-step", "Foreground")]
    del fake.jobs["llama-step"]  # gone
    if purges:
        with pytest.raises(kopf.TemporaryError):  # waiting for the purge Job
            deletion.delete(svc, b, outputs_of(svc, b))
        assert [j["metadata"]["labels"]["app.kubernetes.io/component"] for j in fake.created] == [
            "purge"
        ]
    else:
        deletion.delete(svc, b, outputs_of(svc, b))
        assert fake.created == [] and fake.events == []


def test_retain_and_invalid_specs_do_nothing(fake: Fake) -> None:
    svc = service(fake)
    deletion.delete(svc, body(dict(PUBLISHED), {**SPEC, "deletionPolicy": "Retain"}), {})
    deletion.delete(svc, body(dict(PUBLISHED), {**SPEC, "tensorParallelSize": 0}), {})
    assert fake.created == fake.patches == fake.events == fake.deleted == []


def test_deletion_drops_what_the_writer_remembered(fake: Fake) -> None:
    svc = service(fake)
    b = body({"decision": {"step": "Preflight", "jobName": "gone"}})
    svc.status.write(b, {}, {"phase": "Pending"})
    assert svc.status.known(b) == {"phase": "Pending"}
    deletion.delete(svc, b, {})
    assert svc.status.known(b) == b["status"]
