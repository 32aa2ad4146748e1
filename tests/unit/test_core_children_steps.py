"""The CPU-only step Jobs (preflight, adopt, copy, withdraw; core.children): no accelerator,
small requests, the resource's own Secrets only, restricted pod security, no Kubernetes
API access, deterministic names per resource incarnation. Golden files: test_core_children."""

from __future__ import annotations

from typing import Any

import pytest

from preshard.core.children.conversion import build_conversion_job
from preshard.core.children.pod import RESTRICTED_CONTAINER_SECURITY, RESTRICTED_POD_SECURITY
from preshard.core.children.steps import STEP_COMPONENTS, build_preflight_job
from preshard.core.naming import step_job_name
from preshard.core.spec import parse_spec
from tests.unit.test_core_children import (
    BASIC_CONFIG,
    CLUSTER_CONFIG,
    GOLDEN_CASES,
    HF,
    IDENTITY,
    NS,
    PVC_TP8_PP2_FP8,
    S3_TP2,
    UID,
)

STEP_CASES = sorted(n for n in GOLDEN_CASES if n.split("_")[0] in STEP_COMPONENTS)


def container(job: dict[str, Any]) -> dict[str, Any]:
    (c,) = job["spec"]["template"]["spec"]["containers"]
    return dict(c)


def secrets_of(job: dict[str, Any]) -> set[str]:
    return {
        e["valueFrom"]["secretKeyRef"]["name"]
        for e in container(job)["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }


def test_every_step_has_a_golden_case() -> None:
    assert {n.split("_")[0] for n in STEP_CASES} == set(STEP_COMPONENTS)


@pytest.mark.parametrize("name", STEP_CASES)
def test_no_accelerator_small_requests_restricted(name: str) -> None:
    job = GOLDEN_CASES[name]()
    c = container(job)
    res = c["resources"]
    assert set(res["requests"]) == {"cpu", "memory"} and set(res["limits"]) == {"memory"}
    assert not any("gpu" in k for k in (*res["requests"], *res["limits"]))
    pod = job["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"] == RESTRICTED_POD_SECURITY
    assert c["securityContext"] == RESTRICTED_CONTAINER_SECURITY
    assert "nodeSelector" not in pod and "tolerations" not in pod  # no GPU node placement
    assert "priorityClassName" not in pod
    assert c["command"] == ["preshard"] and c["args"][0] == name.split("_")[0]
    assert job["metadata"]["ownerReferences"][0]["uid"] == UID
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0]["onExitCodes"]["containerName"] == c["name"]


def test_preflight_reads_with_the_same_secrets_as_the_conversion() -> None:
    for raw, cfg in (
        (HF, CLUSTER_CONFIG),
        (S3_TP2, BASIC_CONFIG),
        (PVC_TP8_PP2_FP8, CLUSTER_CONFIG),
    ):
        spec = parse_spec(raw)
        pre = build_preflight_job("m", NS, UID, spec, cfg)
        conv = build_conversion_job("m", NS, UID, spec, cfg)
        assert secrets_of(pre) == secrets_of(conv)


def test_preflight_mounts_a_pvc_source_read_only() -> None:
    job = build_preflight_job("m", NS, UID, parse_spec(PVC_TP8_PP2_FP8), CLUSTER_CONFIG)
    vols = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert vols["source"]["persistentVolumeClaim"] == {"claimName": "model-store", "readOnly": True}
    mounts = {m["name"]: m for m in container(job)["volumeMounts"]}
    assert mounts["source"]["readOnly"] is True


@pytest.mark.parametrize("name", ["adopt_job", "copy_job", "withdraw_job"])
def test_writers_get_only_the_output_credentials(name: str) -> None:
    job = GOLDEN_CASES[name]()
    names = {e["name"] for e in container(job)["env"]}
    assert not any(n.startswith("PRESHARD_SOURCE_") or n == "HF_TOKEN" for n in names)
    assert secrets_of(job) == {"s3-credentials"}


def test_names_are_per_incarnation_and_state() -> None:
    h = parse_spec(S3_TP2).conversion_hash()
    a = step_job_name("m", "uid-1", "adopt", h, IDENTITY, "a" * 64)
    assert a == step_job_name("m", "uid-1", "adopt", h, IDENTITY, "a" * 64)
    assert a != step_job_name("m", "uid-2", "adopt", h, IDENTITY, "a" * 64)  # re-created
    assert a != step_job_name("m", "uid-1", "adopt", h, IDENTITY, "b" * 64)  # other state
    assert a.startswith("m-adopt-") and len(a) <= 63
    long = step_job_name("x" * 253, "u", "preflight", h)
    assert len(long) <= 63 and "preflight-" in long
    spec = parse_spec(S3_TP2)
    p0 = build_preflight_job("m", NS, UID, spec, BASIC_CONFIG)["metadata"]["name"]
    p1 = build_preflight_job("m", NS, UID, spec, BASIC_CONFIG, attempt=1)["metadata"]["name"]
    assert p0 != p1


def test_conversion_job_passes_the_identity() -> None:
    spec = parse_spec(S3_TP2)
    args = container(build_conversion_job("m", NS, UID, spec, BASIC_CONFIG, identity=IDENTITY))[
        "args"
    ]
    assert args[args.index("--identity") : args.index("--identity") + 2] == ["--identity", IDENTITY]
    plain = container(build_conversion_job("m", NS, UID, spec, BASIC_CONFIG))["args"]
    assert "--identity" not in plain
