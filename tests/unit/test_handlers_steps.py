"""service.steps (through service.reconcile): the flow preflight -> adopt | copy |
withdraw -> convert, with the Kubernetes calls replaced by an in-memory fake (no API
server; the e2e tests in tests/e2e/test_steps.py run the same flow for real). Jobs
finish as each test says."""

from __future__ import annotations

from typing import Any

import kopf
import pytest

from preshard.core.config import OperatorConfig
from preshard.core.identity import SourcePin, conversion_identity
from preshard.core.progress import Result
from preshard.core.spec import parse_spec
from preshard.core.steps import ReadyCheckpoint
from preshard.k8s.errors import KubeForbidden
from preshard.service import Service, reconcile, steps

UID = "uid-new"
SPEC = {
    "source": {"uri": "s3://models/llama/"},
    "tensorParallelSize": 2,
    "output": {"uri": "s3://out/llama/", "credentialsSecret": "s3"},
}
DIGEST = "sha256:" + "1" * 64
IDENTITY = conversion_identity(parse_spec(SPEC), SourcePin(None, DIGEST), "0.32.0", namespace="ml")
OLD_SHA = "a" * 64
ARTIFACT = {
    "uri": "s3://out/llama/",
    "manifestUri": "s3://out/llama/preshard-manifest.json",
    "files": 3,
    "totalBytes": 300,
    "manifestSha256": "9" * 64,
    "vllmVersion": "0.32.0",
}


def findings(manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "kind": "preflight",
        "source": {"uri": SPEC["source"]["uri"], "digest": DIGEST, "revision": None},
        "vllmVersion": "0.32.0",
        "config": {},
        "output": {
            "state": "manifest" if manifest else "empty",
            "manifest": manifest,
            "overlapping": [],
        },
    }


COMPLETE = {"startTime": "t", "conditions": [{"type": "Complete", "status": "True"}]}
FAILED = {"conditions": [{"type": "Failed", "status": "True", "reason": "PodFailurePolicy"}]}


class Fake:
    """Jobs by name; each component finishes with (job status, Result) when created."""

    def __init__(
        self,
        outcomes: dict[str, tuple[dict[str, Any], Result | None]],
        config: OperatorConfig | None = None,
    ) -> None:
        config = config or OperatorConfig(preflight=True, operator_namespace="preshard-system")
        self.svc = Service(api=self, config=config)  # type: ignore[arg-type]
        # the operator's ledger (ConfigMap preshard-system/preshard-ledger): sha -> owner
        self.ledger: dict[str, str] = {}
        self.outcomes = outcomes
        self.jobs: dict[str, dict[str, Any]] = {}
        self.status: dict[str, Any] = {}
        self.events: list[tuple[str, str, str]] = []
        self.living: dict[tuple[str, str], str] = {}
        self.configmaps: list[str] = []

    def component(self, job: dict[str, Any]) -> str:
        return str(job["metadata"]["labels"]["app.kubernetes.io/component"])

    def create_or_get_job(self, manifest: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        name = manifest["metadata"]["name"]
        if name in self.jobs:
            return self.jobs[name], False
        job = dict(manifest)
        job["status"] = dict(self.outcomes.get(self.component(job), ({}, None))[0])
        self.jobs[name] = job
        return job, True

    def get_job(self, ns: str, name: str) -> dict[str, Any] | None:
        return self.jobs.get(name)

    def job_pod(self, job: dict[str, Any]) -> dict[str, Any] | None:
        name = job["metadata"]["name"]
        return {"job": name} if name in self.jobs else None

    def termination_result(self, pod: dict[str, Any] | None, job: dict[str, Any]) -> Result | None:
        if pod is None:
            return None
        return self.outcomes.get(self.component(self.jobs[pod["job"]]), ({}, None))[1]

    def secret_exists(self, ns: str, name: str) -> bool:
        return True

    def apply_configmap(self, cm: dict[str, Any], uid: str) -> bool:
        self.configmaps.append(cm["metadata"]["name"])
        return True

    def read_configmap_data(self, ns: str, name: str) -> dict[str, str] | None:
        assert (ns, name) == ("preshard-system", "preshard-ledger")
        return dict(self.ledger)

    def merge_configmap_data(self, ns: str, name: str, data: dict[str, str]) -> None:
        assert (ns, name) == ("preshard-system", "preshard-ledger")
        self.ledger.update(data)

    def pod_progress(self, ns: str, pod: str) -> None:
        return None

    def patch_checkpoint_status(self, ns: str, name: str, patch: dict[str, Any]) -> bool:
        for k, v in patch.items():
            if v is None:
                self.status.pop(k, None)
            else:
                self.status[k] = v
        return True

    def get_checkpoint(self, ns: str, name: str) -> dict[str, Any] | None:
        uid = self.living.get((ns, name))
        return {"metadata": {"uid": uid}} if uid else None

    def event(self, obj: Any, *, type: str, reason: str, message: str) -> None:
        self.events.append((type, reason, message))

    def by_component(self, component: str) -> list[dict[str, Any]]:
        return [j for j in self.jobs.values() if self.component(j) == component]


def install(monkeypatch: pytest.MonkeyPatch, fake: Fake) -> Fake:
    """The fake is the Service's Kubernetes API (fake.svc); Events are recorded too."""
    monkeypatch.setattr(kopf, "event", fake.event)
    fake.svc.status.forget(UID)
    return fake


def body(status: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"name": "llama", "namespace": "ml", "uid": UID, "generation": 1,
                     "creationTimestamp": "2026-12-01T00:00:00Z"},
        "spec": dict(SPEC),
        "status": status or {},
    }  # fmt: skip


def ready_of(fake: Fake) -> dict[str, Any]:
    return next(c for c in fake.status["conditions"] if c["type"] == "Ready")


def test_a_pending_preflight_is_all_there_is_before_it_reports(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = install(monkeypatch, Fake({}))
    reconcile.reconcile(fake.svc, body(), {}, {})
    assert [fake.component(j) for j in fake.jobs.values()] == ["preflight"]
    assert ready_of(fake)["reason"] == "Preflight" and fake.status["phase"] == "Pending"
    assert fake.status["decision"]["step"] == "Preflight"
    assert ("Normal", "JobCreated") in [(t, r) for t, r, _ in fake.events]


def test_gone_owner_same_identity_is_adopted_without_a_conversion_job(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    man = {"owner": "ml/llama/uid-old", "identity": IDENTITY, "sha256": "a" * 64, "complete": True}
    fake = install(
        monkeypatch,
        Fake({
            "preflight": (COMPLETE, Result("Succeeded", artifact=findings(man))),
            "adopt": (COMPLETE, Result("Succeeded", artifact=ARTIFACT)),
        }),
    )  # fmt: skip
    fake.ledger[OLD_SHA] = "ml/llama/uid-old"  # the operator saw it published
    reconcile.reconcile(fake.svc, body(), {}, {})
    assert not fake.by_component("converter")
    (adopt,) = fake.by_component("adopt")
    args = adopt["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--expect-owner") + 1] == "ml/llama/uid-old"
    assert args[args.index("--expect-identity") + 1] == IDENTITY
    # checked against this resource's own source, exactly the pinned content
    assert args[args.index("--against") + 1] == "s3://models/llama/"
    assert args[args.index("--source-digest") + 1] == DIGEST
    # and the adopted manifest is now recorded as this resource's
    assert fake.ledger[ARTIFACT["manifestSha256"]] == f"ml/llama/{UID}"
    assert fake.status["path"] == "Adopted" and ready_of(fake)["reason"] == "Adopted"
    assert fake.status["identity"] == IDENTITY and "decision" not in fake.status
    assert fake.configmaps == ["llama-serving"]
    assert any(r == "Adopted" for _, r, _ in fake.events)


def test_a_living_owner_is_refused_before_any_job_but_the_preflight(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    man = {"owner": "ml/other/uid-o", "identity": IDENTITY, "sha256": "a" * 64, "complete": True}
    fake = Fake({"preflight": (COMPLETE, Result("Succeeded", artifact=findings(man)))})
    fake.living[("ml", "other")] = "uid-o"
    install(monkeypatch, fake)
    reconcile.reconcile(fake.svc, body(), {}, {})
    assert [fake.component(j) for j in fake.jobs.values()] == ["preflight"]
    assert ready_of(fake)["reason"] == "OutputOwnedByOther"
    assert "decision" not in fake.status  # a refused resource claims nothing


def test_an_owner_in_a_namespace_we_may_not_read_counts_as_living(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    man = {"owner": "team-b/x/uid-b", "identity": IDENTITY, "sha256": "a" * 64, "complete": True}
    fake = install(
        monkeypatch, Fake({"preflight": (COMPLETE, Result("Succeeded", artifact=findings(man)))})
    )

    def forbidden(ns: str, name: str) -> Any:
        raise KubeForbidden(403, "Forbidden")

    monkeypatch.setattr(fake, "get_checkpoint", forbidden)
    reconcile.reconcile(fake.svc, body(), {}, {})
    assert ready_of(fake)["reason"] == "OutputOwnedByOther"
    assert "team-b" not in ready_of(fake)["message"]


def test_a_planted_manifest_is_not_adopted_and_its_objects_are_not_withdrawn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # finding 4: a manifest claiming this identity, with a gone owner, that the operator
    # never saw published (no ledger entry): withdraw the manifest alone, then convert
    man = {"owner": "ml/llama/uid-old", "identity": IDENTITY, "sha256": OLD_SHA, "complete": True}
    fake = install(
        monkeypatch,
        Fake({
            "preflight": (COMPLETE, Result("Succeeded", artifact=findings(man))),
            "withdraw": (COMPLETE, Result("Succeeded", artifact={"uri": "s3://out/llama/"})),
        }),
    )  # fmt: skip
    fake.ledger[OLD_SHA] = "ml/someone-else/uid-x"  # another owner: proves nothing here
    reconcile.reconcile(fake.svc, body(), {}, {})
    assert not fake.by_component("adopt")
    (withdraw,) = fake.by_component("withdraw")
    wargs = withdraw["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--delete-listed" not in wargs
    (conv,) = fake.by_component("converter")
    args = conv["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--source-digest") + 1] == DIGEST


def test_a_proven_manifest_of_another_identity_is_withdrawn_with_its_objects(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    man = {"owner": "ml/llama/uid-old", "identity": "sha256:" + "0" * 64, "sha256": OLD_SHA,
           "complete": True}  # fmt: skip
    fake = install(
        monkeypatch,
        Fake({
            "preflight": (COMPLETE, Result("Succeeded", artifact=findings(man))),
            "withdraw": (COMPLETE, Result("Succeeded", artifact={"uri": "s3://out/llama/"})),
        }),
    )  # fmt: skip
    fake.ledger[OLD_SHA] = "ml/llama/uid-old"
    reconcile.reconcile(fake.svc, body(), {}, {})
    (withdraw,) = fake.by_component("withdraw")
    assert "--delete-listed" in withdraw["spec"]["template"]["spec"]["containers"][0]["args"]
    assert len(fake.by_component("converter")) == 1


def test_no_copy_from_another_namespace_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    # finding 1: a Ready twin of another namespace is never offered (nor named) unless the
    # admin's copy policy says the two namespaces trust each other
    fake = install(
        monkeypatch, Fake({"preflight": (COMPLETE, Result("Succeeded", artifact=findings()))})
    )
    twin = ReadyCheckpoint("team-b/secret", "uid-t", "s3://out/team-b-secret/", "e" * 64, None)
    reconcile.reconcile(fake.svc, body(), {}, {IDENTITY: [twin]})
    assert not fake.by_component("copy")
    (conv,) = fake.by_component("converter")
    assert "team-b" not in repr(conv) and "team-b" not in repr(fake.status)
    assert not any("team-b" in m for _, _, m in fake.events)


def test_a_copy_that_is_denied_falls_back_to_a_conversion(monkeypatch: pytest.MonkeyPatch) -> None:
    trust = OperatorConfig(
        preflight=True, operator_namespace="preshard-system", copy_trust=(("ml", "team-b"),)
    )
    fake = install(
        monkeypatch,
        Fake({
            "preflight": (COMPLETE, Result("Succeeded", artifact=findings())),
            "copy": (FAILED, Result("Failed", "AccessDenied", "cannot read s3://out/team-b-secret/")),
        }, trust),
    )  # fmt: skip
    twin = ReadyCheckpoint("team-b/secret", "uid-t", "s3://out/team-b-secret/", "e" * 64, None)
    reconcile.reconcile(fake.svc, body(), {}, {IDENTITY: [twin]})
    (copy_job,) = fake.by_component("copy")
    env = copy_job["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {e["valueFrom"]["secretKeyRef"]["name"] for e in env if "valueFrom" in e} == {"s3"}
    (conv,) = fake.by_component("converter")
    args = conv["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--identity") + 1] == IDENTITY
    warnings = [(r, m) for t, r, m in fake.events if t == "Warning"]
    assert [r for r, _ in warnings] == ["CopyFailed"]
    assert "team-b" not in warnings[0][1] and "AccessDenied" in warnings[0][1]
    assert not any("team-b" in m for _, _, m in fake.events)  # no message names it
    assert "team-b" not in repr(fake.status)  # nor the status
    assert fake.status["decision"]["noCopy"] is True


def test_a_failed_adopt_withdraws_and_converts(monkeypatch: pytest.MonkeyPatch) -> None:
    man = {"owner": "ml/llama/uid-old", "identity": IDENTITY, "sha256": "a" * 64, "complete": True}
    fake = install(
        monkeypatch,
        Fake({
            "preflight": (COMPLETE, Result("Succeeded", artifact=findings(man))),
            "adopt": (FAILED, Result("Failed", "VerificationFailed", "1 of 3 objects differ")),
            "withdraw": (COMPLETE, Result("Succeeded", artifact={"uri": "s3://out/llama/"})),
        }),
    )  # fmt: skip
    fake.ledger[OLD_SHA] = "ml/llama/uid-old"
    reconcile.reconcile(fake.svc, body(), {}, {})
    assert len(fake.by_component("withdraw")) == 1
    assert len(fake.by_component("converter")) == 1
    assert ("Warning", "AdoptFailed") in [(t, r) for t, r, _ in fake.events]


def test_an_output_that_changed_under_a_step_gets_a_new_preflight(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    man = {"owner": "ml/llama/uid-old", "identity": IDENTITY, "sha256": "a" * 64, "complete": True}
    fake = install(
        monkeypatch,
        Fake({
            "preflight": (COMPLETE, Result("Succeeded", artifact=findings(man))),
            "adopt": (FAILED, Result("Failed", "OutputChanged", "the manifest changed")),
        }),
    )  # fmt: skip
    fake.ledger[OLD_SHA] = "ml/llama/uid-old"
    reconcile.reconcile(fake.svc, body(), {}, {})
    preflights = fake.by_component("preflight")
    assert len(preflights) == 3  # MAX_ROUNDS, then the adopt failure counts as such
    assert len({j["metadata"]["name"] for j in preflights}) == 3


def test_a_conversion_becomes_converted_with_its_duration(monkeypatch: pytest.MonkeyPatch) -> None:
    old = {"startTime": "2026-12-01T00:00:05Z", "completionTime": "2026-12-01T00:01:05Z",
           "decision": {"step": "Convert", "startedAt": "2026-12-01T00:00:00Z"},
           "conditions": [{"type": "Ready", "status": "False", "reason": "Converting"}]}  # fmt: skip
    new = {**old, "artifact": ARTIFACT,
           "conditions": [{"type": "Ready", "status": "True", "reason": "Published"}]}  # fmt: skip
    fake = install(monkeypatch, Fake({}))
    marked = steps.after_sync(body(), old, new, fake.svc)
    assert marked["path"] == "Converted" and marked["durationSeconds"] == 65
    assert fake.ledger == {ARTIFACT["manifestSha256"]: f"ml/llama/{UID}"}
    assert "decision" not in marked
    # one Event, the Ready one the status writer posts, says how long it took
    assert fake.events == []
    fake.svc.status.write(body(), old, marked)
    assert [(r, m) for _, r, m in fake.events] == [("Published", "converted in 65 s")]


def test_a_new_generation_of_an_adopted_resource_is_acknowledged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = install(monkeypatch, Fake({}))
    cond = {"type": "Ready", "status": "True", "reason": "Adopted", "message": "m",
            "observedGeneration": 1, "lastTransitionTime": "2026-12-01T00:00:00Z"}  # fmt: skip
    b = body({"path": "Adopted", "observedGeneration": 1, "conditions": [cond]})
    b["metadata"]["generation"] = 2  # e.g. spec.verify changed
    reconcile.reconcile(fake.svc, b, {}, {})
    assert fake.jobs == {}  # nothing runs again
    assert fake.status["observedGeneration"] == 2
    (ready,) = fake.status["conditions"]
    assert ready["observedGeneration"] == 2
    assert ready["lastTransitionTime"] == "2026-12-01T00:00:00Z" and ready["reason"] == "Adopted"


@pytest.mark.parametrize(
    ("converter", "requests"),
    [
        ({"engine": "none"}, {"cpu": "2", "memory": "9.8Gi"}),  # no engine: its own estimate
        ({"accelerator": "cpu"}, {"cpu": "8", "memory": "212.3Gi"}),  # the engine on CPU
    ],
)
def test_the_conversion_job_requests_the_preflights_memory_estimate(
    monkeypatch: pytest.MonkeyPatch, converter: dict[str, Any], requests: dict[str, str]
) -> None:
    """The preflight read a 70B config.json: the conversion Job that follows requests the
    memory of status.memoryEstimate (core.estimate, for its own path)."""
    config = {
        "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672,
        "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
        "vocab_size": 128256, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }  # fmt: skip
    found = {**findings(), "config": config}
    fake = install(
        monkeypatch, Fake({"preflight": (COMPLETE, Result("Succeeded", artifact=found))})
    )
    b = body()
    b["spec"] = {**SPEC, "tensorParallelSize": 8, "converter": converter}
    reconcile.reconcile(fake.svc, b, {}, {})
    (job,) = fake.by_component("converter")
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["resources"] == {"requests": requests}
    assert fake.status["memoryEstimate"]["quantity"] == requests["memory"]
