"""preshard.core.children: the conversion Job, the purge Job and the serving ConfigMap.

The builders are pinned by golden files in tests/golden/*.json (sorted keys, indent 2).
``PRESHARD_UPDATE_GOLDEN=1 pytest tests/unit/test_core_children.py`` rewrites them; by default
the built manifest is compared and a mismatch shows a unified diff.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from preshard.core.children.configmap import build_serving_configmap
from preshard.core.children.conversion import (
    CONTAINER,
    build_conversion_job,
    conversion_args,
    memory_request,
)
from preshard.core.children.credentials import (
    output_endpoint,
    output_secret,
    referenced_secrets,
    source_secret,
)
from preshard.core.children.pod import (
    RESTRICTED_CONTAINER_SECURITY,
    RESTRICTED_POD_SECURITY,
    owner_reference,
)
from preshard.core.children.purge import build_purge_job
from preshard.core.children.steps import (
    build_adopt_job,
    build_copy_job,
    build_preflight_job,
    build_withdraw_job,
)
from preshard.core.config import OperatorConfig
from preshard.core.contract import EXIT_PERMANENT, PVC_MOUNT_ROOT, TERMINATION_LOG, WORK_DIR
from preshard.core.envpolicy import RESERVED_ENV
from preshard.core.errors import SpecError
from preshard.core.naming import (
    ANNOTATION_CHECKPOINT_NAME,
    ANNOTATION_OWNER_UID,
    ANNOTATION_SPEC_HASH,
    LABEL_CHECKPOINT,
    LABEL_SPEC_HASH,
    job_name,
    labels,
    purge_job_name,
)
from preshard.core.serving import configmap_data, serving_info
from preshard.core.spec import CheckpointSpec, parse_spec

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "golden"
UPDATE_GOLDEN = os.environ.get("PRESHARD_UPDATE_GOLDEN") == "1"

NS = "ml"
UID = "6f1c2b9e-3d4a-4f5b-8c7d-0e1f2a3b4c5d"

# --------------------------------------------------------------------------- inputs

BASIC_CONFIG = OperatorConfig(converter_image="registry.example.com/ml/preshard-converter:1.2.3")
CLUSTER_CONFIG = OperatorConfig(
    converter_image="registry.example.com/ml/preshard-converter:1.2.3",
    image_pull_policy="Always",
    job_service_account="sharder",
    default_s3_endpoint="http://minio.storage:9000",
    default_credentials_secret="s3-default",
    job_ttl_seconds=7200,
    work_dir_size="2Ti",
    default_node_selector=(("gpu.example.com/class", "h100"), ("kubernetes.io/arch", "amd64")),
    default_tolerations=(
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoExecute"},
    ),
)

S3_TP2: dict[str, Any] = {
    "source": {"uri": "s3://preshard-models/tiny-llama/"},
    "tensorParallelSize": 2,
    "output": {
        "uri": "s3://preshard-checkpoints/tiny-llama/tp2/",
        "credentialsSecret": "s3-credentials",
    },
}
PVC_TP8_PP2_FP8: dict[str, Any] = {
    "source": {"uri": "pvc://model-store/llama-3.1-70b"},
    "tensorParallelSize": 8,
    "pipelineParallelSize": 2,
    "quantization": "fp8",
    "dtype": "bfloat16",
    "output": {
        "uri": "s3://models/llama-70b/tp8-pp2-fp8/",
        "region": "us-east-1",
        "maxFileSize": "2Gi",
    },
    "converter": {
        "resources": {
            "requests": {"cpu": "32", "memory": "800Gi", "nvidia.com/gpu": "1"},
            "limits": {"memory": "900Gi"},
        },
        "env": [{"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"}, {"name": "VLLM_EMPTY"}],
        "priorityClassName": "gpu-batch",
        "ttlSecondsAfterFinished": 0,
        "activeDeadlineSeconds": 43200,
        "backoffLimit": 1,
    },
}
HF: dict[str, Any] = {
    "source": {
        "uri": "hf://meta-llama/Llama-3.1-8B-Instruct@main",
        "credentialsSecret": "hf-token",
    },
    "tensorParallelSize": 1,
    "output": {
        "uri": "s3://models/llama-8b/tp1",
        "credentialsSecret": "s3-credentials",
        "endpoint": "https://s3.eu.example.com",
    },
    "verify": False,
    "deletionPolicy": "Delete",
    "converter": {
        "image": "registry.example.com/ml/preshard-converter:custom",
        "imagePullPolicy": "Never",
        "gpuResourceName": "amd.com/gpu",
        "nodeSelector": {},  # explicitly none: the operator's default still applies
        "tolerations": [],
        "serviceAccountName": "hf-sharder",
        "workDirSize": "100Gi",
    },
}
# The same resource converted on CPU and on GPUs (the goldens show what accelerator changes).
CPU_TP2: dict[str, Any] = {
    **S3_TP2,
    "verify": False,
    "converter": {
        "accelerator": "cpu",
        "resources": {
            "requests": {"cpu": "8", "memory": "24Gi"},
            "limits": {"memory": "24Gi"},
        },
    },
}
GPU_TP2: dict[str, Any] = {
    **S3_TP2,
    "converter": {
        "accelerator": "gpu",
        "resources": {
            "requests": {"cpu": "8", "memory": "24Gi"},
            "limits": {"memory": "24Gi"},
        },
    },
}
CPU_CONFIG = OperatorConfig(
    converter_image="registry.example.com/ml/preshard-converter:1.2.3",
    converter_cpu_image="registry.example.com/ml/preshard-converter-cpu:1.2.3",
)
# Llama-3.1-70B-sized, engine-free at TP=8 on a GPU-default operator: no GPU, 2 cores,
# the memory of the preflight's estimate (status.memoryEstimate).
ENGINE_NONE_TP8: dict[str, Any] = {
    **PVC_TP8_PP2_FP8,
    "pipelineParallelSize": 1,
    "converter": {"engine": "none"},
}
CPU_NO_MEMORY: dict[str, Any] = {**S3_TP2, "converter": {"accelerator": "cpu"}}


def memory_status(accelerator: str, total: int) -> dict[str, Any]:
    """A status.memoryEstimate as core.estimate.MemoryEstimate.to_status writes it."""
    return {"bytes": total, "quantity": "x", "accelerator": accelerator}


ESTIMATE_NONE = memory_status("none", 10_477_790_823)  # 9.8Gi (test_core_estimate)
ESTIMATE_CPU = memory_status("cpu", 7_730_941_000)  # 7.2Gi: the tiny TP=2 conversion
ARTIFACT: dict[str, Any] = {
    "uri": "s3://models/llama-70b/tp8-pp2-fp8/",
    "manifestUri": "s3://models/llama-70b/tp8-pp2-fp8/preshard-manifest.json",
    "files": 42,
    "totalBytes": 75_000_000_000,
    "manifestSha256": "9" * 64,
    "vllmVersion": "0.32.0",
}


def spec_of(raw: dict[str, Any], **changes: Any) -> CheckpointSpec:
    out = copy.deepcopy(raw)
    for path, value in changes.items():
        node = out
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return parse_spec(out)


# -------------------------------------------------------------------------- goldens


def check_golden(name: str, obj: Any) -> None:
    path = GOLDEN_DIR / f"{name}.json"
    text = json.dumps(obj, sort_keys=True, indent=2) + "\n"
    if UPDATE_GOLDEN:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    if not path.is_file():
        pytest.fail(f"{path} is missing: run with PRESHARD_UPDATE_GOLDEN=1", pytrace=False)
    expected = path.read_text()
    if text != expected:
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(keepends=True),
                text.splitlines(keepends=True),
                fromfile=f"tests/golden/{name}.json",
                tofile="built",
            )
        )
        pytest.fail(
            f"the built manifest differs from tests/golden/{name}.json; if the change is "
            f"intended, rerun with PRESHARD_UPDATE_GOLDEN=1 and review the diff:\n{diff}",
            pytrace=False,
        )


IDENTITY = "sha256:" + "d" * 64
GOLDEN_CASES: dict[str, Any] = {
    "conversion_job_s3_tp2": lambda: build_conversion_job(
        "tiny-tp2", NS, UID, parse_spec(S3_TP2), BASIC_CONFIG
    ),
    # the conversion identity and the source content the preflight pinned
    "conversion_job_pvc_tp8_pp2_fp8": lambda: build_conversion_job(
        "llama-70b-tp8-pp2",
        NS,
        UID,
        parse_spec(PVC_TP8_PP2_FP8),
        CLUSTER_CONFIG,
        identity=IDENTITY,
        source_digest="sha256:" + "d" * 64,
    ),
    "conversion_job_hf": lambda: build_conversion_job(
        "llama-8b", NS, UID, parse_spec(HF), CLUSTER_CONFIG
    ),
    "purge_job": lambda: build_purge_job("llama-8b", NS, UID, parse_spec(HF), CLUSTER_CONFIG),
    "conversion_job_cpu_tp2": lambda: build_conversion_job(
        "tiny-tp2", NS, UID, parse_spec(CPU_TP2), CPU_CONFIG
    ),
    "conversion_job_gpu_tp2": lambda: build_conversion_job(
        "tiny-tp2", NS, UID, parse_spec(GPU_TP2), CPU_CONFIG
    ),
    "conversion_job_engine_none_tp8": lambda: build_conversion_job(
        "llama-70b-tp8",
        NS,
        UID,
        parse_spec(ENGINE_NONE_TP8),
        CLUSTER_CONFIG,
        memory_estimate=ESTIMATE_NONE,
    ),
    "conversion_job_cpu_estimate": lambda: build_conversion_job(
        "tiny-tp2", NS, UID, parse_spec(CPU_NO_MEMORY), CPU_CONFIG, memory_estimate=ESTIMATE_CPU
    ),
    "serving_configmap": lambda: build_serving_configmap(
        "llama-70b-tp8-pp2",
        NS,
        UID,
        ARTIFACT,
        parse_spec(PVC_TP8_PP2_FP8),
        CLUSTER_CONFIG.default_s3_endpoint,
    ),
    "preflight_job_pvc": lambda: build_preflight_job(
        "llama-70b-tp8-pp2", NS, UID, parse_spec(PVC_TP8_PP2_FP8), CLUSTER_CONFIG
    ),
    "preflight_job_hf": lambda: build_preflight_job(
        "llama-8b", NS, UID, parse_spec(HF), CLUSTER_CONFIG
    ),
    "adopt_job": lambda: build_adopt_job(
        "tiny-tp2",
        NS,
        UID,
        parse_spec(S3_TP2),
        BASIC_CONFIG,
        identity=IDENTITY,
        expect_owner="ml/tiny-tp2/0ld-uid",
        expect_manifest_sha256="a" * 64,
        source_digest="sha256:" + "d" * 64,
    ),
    "copy_job": lambda: build_copy_job(
        "tiny-tp2",
        NS,
        UID,
        parse_spec(S3_TP2),
        BASIC_CONFIG,
        identity=IDENTITY,
        source_uri="s3://preshard-checkpoints/tiny-llama/orig/",
        source_manifest_sha256="b" * 64,
        source_digest="sha256:" + "d" * 64,
    ),
    "withdraw_job": lambda: build_withdraw_job(
        "tiny-tp2",
        NS,
        UID,
        parse_spec(S3_TP2),
        BASIC_CONFIG,
        expect_owner="ml/tiny-tp2/0ld-uid",
        expect_manifest_sha256="c" * 64,
    ),
    "serving_configmap_aws": lambda: build_serving_configmap(
        "tiny-tp2",
        NS,
        UID,
        {"uri": "s3://preshard-checkpoints/tiny-llama/tp2/"},
        parse_spec(S3_TP2),
    ),
}


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_golden(name: str) -> None:
    check_golden(name, GOLDEN_CASES[name]())


def test_every_golden_file_has_a_case() -> None:
    files = sorted(p.stem for p in GOLDEN_DIR.glob("*.json"))
    assert [f for f in files if f not in GOLDEN_CASES] == []


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
@pytest.mark.parametrize("kube_version", ["1.29", "1.33"])
def test_built_manifests_are_valid_kubernetes_objects(name: str, kube_version: str) -> None:
    kubernetes_validate.validate(GOLDEN_CASES[name](), kube_version, strict=True)


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_builders_are_deterministic(name: str) -> None:
    a, b = GOLDEN_CASES[name](), GOLDEN_CASES[name]()
    assert a == b
    assert json.dumps(a) == json.dumps(b)  # same insertion order too


# ---------------------------------------------------------------- small helpers


def test_labels_and_owner_reference() -> None:
    assert labels("m", "converter", "0123456789abcdef") == {
        "app.kubernetes.io/name": "preshard",
        "app.kubernetes.io/component": "converter",
        "app.kubernetes.io/managed-by": "preshard",
        "preshard.io/checkpoint": "m",
        "preshard.io/spec-hash": "0123456789",
    }
    assert LABEL_SPEC_HASH not in labels("m", "serving")
    assert owner_reference("m", UID) == {
        "apiVersion": "preshard.io/v1alpha1",
        "kind": "ShardedCheckpoint",
        "name": "m",
        "uid": UID,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def test_secret_and_endpoint_resolution() -> None:
    s3 = parse_spec(S3_TP2)
    assert output_secret(s3, BASIC_CONFIG) == "s3-credentials"
    assert output_secret(s3, CLUSTER_CONFIG) == "s3-credentials"
    pvc = parse_spec(PVC_TP8_PP2_FP8)
    assert output_secret(pvc, BASIC_CONFIG) is None
    assert output_secret(pvc, CLUSTER_CONFIG) == "s3-default"
    assert output_endpoint(pvc, CLUSTER_CONFIG) == "http://minio.storage:9000"
    assert output_endpoint(pvc, BASIC_CONFIG) is None
    hf = parse_spec(HF)
    assert output_endpoint(hf, CLUSTER_CONFIG) == "https://s3.eu.example.com"
    assert source_secret(hf) == "hf-token"
    assert source_secret(s3) is None
    assert referenced_secrets(hf, CLUSTER_CONFIG) == ["hf-token", "s3-credentials"]
    assert referenced_secrets(pvc, CLUSTER_CONFIG) == ["s3-default"]
    assert referenced_secrets(pvc, BASIC_CONFIG) == []
    same = spec_of(S3_TP2, **{"source.credentialsSecret": "s3-credentials"})
    assert referenced_secrets(same, BASIC_CONFIG) == ["s3-credentials"]


def test_conversion_args_minimal() -> None:
    assert conversion_args("tiny-tp2", NS, UID, parse_spec(S3_TP2)) == [
        "convert",
        "--source",
        "s3://preshard-models/tiny-llama/",
        "--tensor-parallel-size",
        "2",
        "--pipeline-parallel-size",
        "1",
        "--dtype",
        "auto",
        "--output",
        "s3://preshard-checkpoints/tiny-llama/tp2/",
        "--max-file-size",
        str(5 * 2**30),
        "--verify",
        "--owner",
        f"ml/tiny-tp2/{UID}",
        "--work-dir",
        "/work",
        "--progress",
        "lines",
    ]


def test_conversion_args_full() -> None:
    args = conversion_args("m", NS, UID, parse_spec(PVC_TP8_PP2_FP8))
    assert args[:9] == [
        "convert",
        "--source",
        "pvc://model-store/llama-3.1-70b",
        "--tensor-parallel-size",
        "8",
        "--pipeline-parallel-size",
        "2",
        "--quantization",
        "fp8",
    ]
    assert args[args.index("--max-file-size") + 1] == str(2 * 2**30)
    assert "--no-verify" in conversion_args("m", NS, UID, parse_spec(HF))
    # The output is normalised to a prefix ending in '/'.
    hf_args = conversion_args("m", NS, UID, parse_spec(HF))
    assert hf_args[hf_args.index("--output") + 1] == "s3://models/llama-8b/tp1/"


# ------------------------------------------------------------------ conversion Job


def container_of(job: dict[str, Any]) -> dict[str, Any]:
    containers = job["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def env_of(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container_of(job)["env"]}


def test_conversion_job_metadata_and_policy() -> None:
    spec = parse_spec(S3_TP2)
    h = spec.conversion_hash()
    job = build_conversion_job("tiny-tp2", NS, UID, spec, BASIC_CONFIG)
    assert job["metadata"]["name"] == job_name("tiny-tp2", h)
    assert job["metadata"]["namespace"] == NS
    assert job["metadata"]["annotations"] == {
        ANNOTATION_SPEC_HASH: h,
        ANNOTATION_OWNER_UID: UID,
        ANNOTATION_CHECKPOINT_NAME: "tiny-tp2",
    }
    assert job["metadata"]["labels"][LABEL_CHECKPOINT] == "tiny-tp2"
    assert job["metadata"]["labels"][LABEL_SPEC_HASH] == h[:10]
    assert job["metadata"]["ownerReferences"] == [owner_reference("tiny-tp2", UID)]
    assert job["spec"]["template"]["metadata"] == {
        "labels": job["metadata"]["labels"],
        "annotations": {ANNOTATION_SPEC_HASH: h},
    }
    assert job["spec"]["podFailurePolicy"]["rules"][0] == {
        "action": "FailJob",
        "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [EXIT_PERMANENT]},
    }
    assert EXIT_PERMANENT == 3
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # required by podFailurePolicy
    assert pod["automountServiceAccountToken"] is False  # no Kubernetes API access
    assert pod["securityContext"] == RESTRICTED_POD_SECURITY
    c = container_of(job)
    assert c["securityContext"] == RESTRICTED_CONTAINER_SECURITY
    assert c["command"] == ["preshard"]
    assert c["terminationMessagePath"] == TERMINATION_LOG
    assert c["resources"] == {
        "requests": {"nvidia.com/gpu": "2"},
        "limits": {"nvidia.com/gpu": "2"},
    }
    # Every mount has a volume; the work dir and /tmp are writable volumes.
    volumes = {v["name"] for v in pod["volumes"]}
    assert {m["name"] for m in c["volumeMounts"]} <= volumes
    assert {m["mountPath"] for m in c["volumeMounts"]} >= {WORK_DIR, "/tmp"}


def test_conversion_job_hash_follows_the_conversion_fields_only() -> None:
    base = build_conversion_job("m", NS, UID, parse_spec(S3_TP2), BASIC_CONFIG)
    same = build_conversion_job(
        "m", NS, UID, spec_of(S3_TP2, **{"converter.image": "other:1"}), BASIC_CONFIG
    )
    other = build_conversion_job("m", NS, UID, spec_of(S3_TP2, tensorParallelSize=4), BASIC_CONFIG)
    assert same["metadata"]["name"] == base["metadata"]["name"]
    assert other["metadata"]["name"] != base["metadata"]["name"]


def test_pvc_source_is_mounted_read_only() -> None:
    job = build_conversion_job("m", NS, UID, parse_spec(PVC_TP8_PP2_FP8), CLUSTER_CONFIG)
    pod = job["spec"]["template"]["spec"]
    assert {
        "name": "source",
        "persistentVolumeClaim": {"claimName": "model-store", "readOnly": True},
    } in pod["volumes"]
    assert {
        "name": "source",
        "mountPath": f"{PVC_MOUNT_ROOT}/model-store",
        "readOnly": True,
    } in container_of(job)["volumeMounts"]
    assert env_of(job)["PRESHARD_PVC_MOUNT_ROOT"] == {
        "name": "PRESHARD_PVC_MOUNT_ROOT",
        "value": "/mnt/source",
    }


@pytest.mark.parametrize("raw", [S3_TP2, HF])
def test_non_pvc_sources_mount_no_claim(raw: dict[str, Any]) -> None:
    job = build_conversion_job("m", NS, UID, parse_spec(raw), CLUSTER_CONFIG)
    assert all("persistentVolumeClaim" not in v for v in job["spec"]["template"]["spec"]["volumes"])


def test_gpu_request_is_tp_times_pp_and_overrides_the_user() -> None:
    job = build_conversion_job("m", NS, UID, parse_spec(PVC_TP8_PP2_FP8), CLUSTER_CONFIG)
    assert container_of(job)["resources"] == {
        "requests": {"cpu": "32", "memory": "800Gi", "nvidia.com/gpu": "16"},
        "limits": {"memory": "900Gi", "nvidia.com/gpu": "16"},
    }
    hf = build_conversion_job("m", NS, UID, parse_spec(HF), CLUSTER_CONFIG)
    assert container_of(hf)["resources"] == {
        "requests": {"amd.com/gpu": "1"},
        "limits": {"amd.com/gpu": "1"},
    }
    amd = OperatorConfig(gpu_resource_name="amd.com/gpu")
    s3 = build_conversion_job("m", NS, UID, parse_spec(S3_TP2), amd)
    assert container_of(s3)["resources"]["limits"] == {"amd.com/gpu": "2"}


def test_scheduling_precedence() -> None:
    pod = build_conversion_job("m", NS, UID, parse_spec(S3_TP2), CLUSTER_CONFIG)["spec"][
        "template"
    ]["spec"]
    assert pod["nodeSelector"] == {"gpu.example.com/class": "h100", "kubernetes.io/arch": "amd64"}
    assert pod["tolerations"] == [dict(t) for t in CLUSTER_CONFIG.default_tolerations]
    assert "priorityClassName" not in pod
    # Explicitly empty in the spec: no tolerations (fewer only narrows placement), but the
    # admin's nodeSelector always applies (a spec adds to it, it cannot remove it).
    pod = build_conversion_job("m", NS, UID, parse_spec(HF), CLUSTER_CONFIG)["spec"]["template"][
        "spec"
    ]
    assert "tolerations" not in pod
    assert pod["nodeSelector"] == {"gpu.example.com/class": "h100", "kubernetes.io/arch": "amd64"}
    # Set in the spec: the spec's on top of the default, sorted.
    spec = spec_of(
        S3_TP2,
        **{
            "converter.nodeSelector": {"z": "1", "a": "2"},
            "converter.tolerations": [{"key": "k", "operator": "Exists"}],
            "converter.priorityClassName": "p",
        },
    )
    pod = build_conversion_job("m", NS, UID, spec, CLUSTER_CONFIG)["spec"]["template"]["spec"]
    assert list(pod["nodeSelector"].items()) == [
        ("a", "2"),
        ("gpu.example.com/class", "h100"),
        ("kubernetes.io/arch", "amd64"),
        ("z", "1"),
    ]
    assert pod["tolerations"] == [{"key": "k", "operator": "Exists"}]
    assert pod["priorityClassName"] == "p"
    # No defaults anywhere: no keys.
    pod = build_conversion_job("m", NS, UID, parse_spec(S3_TP2), BASIC_CONFIG)["spec"]["template"][
        "spec"
    ]
    assert "nodeSelector" not in pod and "tolerations" not in pod


def test_job_limits_precedence() -> None:
    job = build_conversion_job("m", NS, UID, parse_spec(S3_TP2), CLUSTER_CONFIG)
    assert (job["spec"]["backoffLimit"], job["spec"]["activeDeadlineSeconds"]) == (2, 21600)
    assert job["spec"]["ttlSecondsAfterFinished"] == 7200  # operator default
    work = next(v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "work")
    assert work == {"name": "work", "emptyDir": {"sizeLimit": "2Ti"}}
    job = build_conversion_job("m", NS, UID, parse_spec(PVC_TP8_PP2_FP8), CLUSTER_CONFIG)
    assert job["spec"]["ttlSecondsAfterFinished"] == 0  # 0 in the spec is kept, not "unset"
    assert (job["spec"]["backoffLimit"], job["spec"]["activeDeadlineSeconds"]) == (1, 43200)
    job = build_conversion_job("m", NS, UID, parse_spec(HF), CLUSTER_CONFIG)
    work = next(v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "work")
    assert work["emptyDir"] == {"sizeLimit": "100Gi"}
    c = container_of(job)
    assert (c["image"], c["imagePullPolicy"]) == (
        "registry.example.com/ml/preshard-converter:custom",
        "Never",
    )
    assert job["spec"]["template"]["spec"]["serviceAccountName"] == "hf-sharder"


def test_long_resource_names_give_valid_job_names() -> None:
    name = "a-very-long-sharded-checkpoint-name-for-llama-3-1-405b-instruct-tp8-pp2-fp8"
    spec = parse_spec(S3_TP2)
    for job in (
        build_conversion_job(name, NS, UID, spec, BASIC_CONFIG),
        build_purge_job(name, NS, UID, spec, BASIC_CONFIG),
    ):
        assert len(job["metadata"]["name"]) <= 63
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"])
    assert build_purge_job(name, NS, UID, spec, BASIC_CONFIG)["metadata"]["name"] == purge_job_name(
        name, spec.conversion_hash()
    )


LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def test_label_values_are_valid_for_long_resource_names() -> None:
    name = "llama-3-1-405b-instruct." + "x" * 60
    spec = parse_spec(S3_TP2)
    objs = [
        build_conversion_job(name, NS, UID, spec, BASIC_CONFIG),
        build_purge_job(name, NS, UID, spec, BASIC_CONFIG),
        build_serving_configmap(name, NS, UID, ARTIFACT, spec),
    ]
    for obj in objs:
        for value in obj["metadata"]["labels"].values():
            assert len(value) <= 63 and LABEL_VALUE.match(value), value
    for job in objs[:2]:
        # The handler finds the owner by this annotation (the label is cut).
        assert job["metadata"]["annotations"][ANNOTATION_CHECKPOINT_NAME] == name
        assert job["metadata"]["labels"][LABEL_CHECKPOINT] != name


# ------------------------------------------------------------------------ env/secrets

CREDENTIAL_KEYS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN"}


def secret_env(secret: str, key: str, prefix: str = "", optional: bool = False) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": secret, "key": key}
    if optional:
        ref["optional"] = True
    return {"name": prefix + key, "valueFrom": {"secretKeyRef": ref}}


def test_s3_output_and_source_credentials() -> None:
    spec = spec_of(
        S3_TP2,
        **{
            "source.credentialsSecret": "src-creds",
            "source.endpoint": "http://src.example:9000",
            "source.region": "eu-west-1",
            "output.region": "us-west-2",
        },
    )
    env = container_of(build_conversion_job("m", NS, UID, spec, CLUSTER_CONFIG))["env"]
    assert env[:11] == [
        secret_env("s3-credentials", "AWS_ACCESS_KEY_ID"),
        secret_env("s3-credentials", "AWS_SECRET_ACCESS_KEY"),
        secret_env("s3-credentials", "AWS_SESSION_TOKEN", optional=True),
        {"name": "AWS_ENDPOINT_URL_S3", "value": "http://minio.storage:9000"},
        {"name": "AWS_REGION", "value": "us-west-2"},
        secret_env("src-creds", "AWS_ACCESS_KEY_ID", "PRESHARD_SOURCE_"),
        secret_env("src-creds", "AWS_SECRET_ACCESS_KEY", "PRESHARD_SOURCE_"),
        secret_env("src-creds", "AWS_SESSION_TOKEN", "PRESHARD_SOURCE_", optional=True),
        {"name": "PRESHARD_SOURCE_ENDPOINT_URL", "value": "http://src.example:9000"},
        {"name": "PRESHARD_SOURCE_REGION", "value": "eu-west-1"},
        {"name": "PRESHARD_TERMINATION_LOG", "value": "/dev/termination-log"},
    ]


def test_source_without_secret_uses_the_output_credentials() -> None:
    env = env_of(build_conversion_job("m", NS, UID, parse_spec(S3_TP2), BASIC_CONFIG))
    assert not [n for n in env if n.startswith("PRESHARD_SOURCE_")]
    assert env["AWS_ACCESS_KEY_ID"] == secret_env("s3-credentials", "AWS_ACCESS_KEY_ID")


def test_no_credentials_at_all_for_ambient_identity() -> None:
    spec = spec_of(S3_TP2, **{"output.credentialsSecret": None})
    env = env_of(build_conversion_job("m", NS, UID, spec, BASIC_CONFIG))
    assert not CREDENTIAL_KEYS & set(env)
    assert "AWS_ENDPOINT_URL_S3" not in env


def test_hf_source_token() -> None:
    env = env_of(build_conversion_job("m", NS, UID, parse_spec(HF), CLUSTER_CONFIG))
    assert env["HF_TOKEN"] == secret_env("hf-token", "HF_TOKEN", optional=True)
    assert not [n for n in env if n.startswith("PRESHARD_SOURCE_")]
    no_secret = spec_of(HF, **{"source.credentialsSecret": None})
    assert "HF_TOKEN" not in env_of(build_conversion_job("m", NS, UID, no_secret, CLUSTER_CONFIG))


def test_pvc_source_ignores_source_credentials() -> None:
    spec = spec_of(PVC_TP8_PP2_FP8, **{"source.credentialsSecret": "unused"})
    env = env_of(build_conversion_job("m", NS, UID, spec, CLUSTER_CONFIG))
    assert not [n for n in env if n.startswith("PRESHARD_SOURCE_") or n == "HF_TOKEN"]


def test_runtime_env_keeps_caches_on_the_work_volume() -> None:
    env = env_of(build_conversion_job("m", NS, UID, parse_spec(S3_TP2), BASIC_CONFIG))
    assert {k: v["value"] for k, v in env.items() if "value" in v} == {
        "PRESHARD_TERMINATION_LOG": "/dev/termination-log",
        "PRESHARD_WORK_DIR": "/work",
        "PRESHARD_PVC_MOUNT_ROOT": "/mnt/source",
        "HOME": "/work/home",
        "XDG_CACHE_HOME": "/work/cache",
        "HF_HOME": "/work/cache/huggingface",
        "VLLM_CACHE_ROOT": "/work/cache/vllm",
        "TRITON_CACHE_DIR": "/work/cache/triton",
        "PYTHONUNBUFFERED": "1",
    }


def test_user_env_is_plain_values_only() -> None:
    spec = spec_of(
        S3_TP2, **{"converter.env": [{"name": "VLLM_A", "value": "1"}, {"name": "NCCL_B"}]}
    )
    env = container_of(build_conversion_job("m", NS, UID, spec, BASIC_CONFIG))["env"]
    assert env[-2:] == [{"name": "VLLM_A", "value": "1"}, {"name": "NCCL_B", "value": ""}]
    # valueFrom is an unknown field (the CRD prunes it; without the CRD it is an error,
    # not a silently empty variable): Secrets come from credentialsSecret only
    with pytest.raises(SpecError, match=r"^spec.converter.env\[0\].valueFrom: unknown field$"):
        spec_of(
            S3_TP2,
            **{
                "converter.env": [
                    {"name": "VLLM_C", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}
                ]
            },
        )


def walk(obj: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    yield path, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from walk(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from walk(v, (*path, i))


SECRET_NAMES = {"s3-credentials", "s3-default", "hf-token", "src-creds"}


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_secrets_only_as_secret_key_refs(name: str) -> None:
    obj = GOLDEN_CASES[name]()
    for path, value in walk(obj):
        if isinstance(value, dict) and value.get("name") in CREDENTIAL_KEYS | {
            "PRESHARD_SOURCE_" + k for k in CREDENTIAL_KEYS
        }:
            # A credential variable: a reference to a Secret key, never a value.
            assert "value" not in value, path
            assert set(value["valueFrom"]) == {"secretKeyRef"}, path
        if isinstance(value, str) and value in SECRET_NAMES:
            assert path[-3:-1] == ("valueFrom", "secretKeyRef") and path[-1] == "name", path
        if isinstance(value, dict) and "valueFrom" in value:
            if value.get("name") == "PRESHARD_MEMORY_LIMIT":  # the Downward API, no secret
                assert value["valueFrom"] == {
                    "resourceFieldRef": {"containerName": "convert", "resource": "limits.memory"}
                }, path
                continue
            assert set(value["valueFrom"]) == {"secretKeyRef"}, path
    if obj["kind"] == "ConfigMap":
        assert not CREDENTIAL_KEYS & set(obj["data"])


def test_env_entry_without_a_name_is_an_invalid_spec_not_a_crash() -> None:
    with pytest.raises(SpecError, match=r"^spec.converter.env\[0\].name: Field required$"):
        spec = spec_of(S3_TP2, **{"converter.env": [{"value": "x"}]})
        build_conversion_job("m", NS, UID, spec, BASIC_CONFIG)


def test_user_env_cannot_override_credentials_or_runtime_variables() -> None:
    # Rejected as InvalidSpec: a plain-text secret, or a second definition of a variable
    # the Job sets (duplicate env names: the last one wins)
    with pytest.raises(SpecError) as exc:
        spec_of(
            S3_TP2,
            **{
                "converter.env": [
                    {"name": "AWS_SECRET_ACCESS_KEY", "value": "plain-text-secret"},
                    {"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"},
                    {"name": "PRESHARD_TERMINATION_LOG", "value": "/tmp/x"},
                ]
            },
        )
    assert str(exc.value) == (
        "spec.converter.env[0].name: AWS_SECRET_ACCESS_KEY is set by the operator and cannot "
        "be overridden (credentials come from credentialsSecret, endpoints and regions from "
        "spec.source and spec.output); spec.converter.env[2].name: PRESHARD_TERMINATION_LOG is "
        "set by the operator and cannot be overridden (credentials come from "
        "credentialsSecret, endpoints and regions from spec.source and spec.output)"
    )
    assert "plain-text-secret" not in str(exc.value)
    with pytest.raises(
        SpecError, match=r"^spec.converter.env: duplicate variable name\(s\) VLLM_X$"
    ):
        spec_of(S3_TP2, **{"converter.env": [{"name": "VLLM_X", "value": "1"}, {"name": "VLLM_X"}]})
    # worker tuning knobs stay available
    spec = spec_of(
        S3_TP2,
        **{
            "converter.env": [
                {"name": "PRESHARD_S3_CONCURRENCY", "value": "32"},
                {"name": "AWS_MAX_ATTEMPTS", "value": "3"},
            ]
        },
    )
    names = [
        e["name"]
        for e in container_of(build_conversion_job("m", NS, UID, spec, BASIC_CONFIG))["env"]
    ]
    assert len(names) == len(set(names))


def test_every_variable_any_spec_makes_the_builder_set_is_reserved() -> None:
    spec = spec_of(
        S3_TP2,
        **{
            "source.credentialsSecret": "src",
            "source.endpoint": "http://src:9000",
            "source.region": "eu-west-1",
            "output.credentialsSecret": "out",
            "output.endpoint": "http://out:9000",
            "output.region": "us-east-1",
        },
    )
    hf = spec_of(HF, **{"source.credentialsSecret": "hf"})
    cpu = spec_of(S3_TP2, **{"converter.accelerator": "cpu"})
    names = set()
    for s in (spec, hf, cpu):
        for build in (build_conversion_job, build_purge_job):
            names |= {
                e["name"] for e in container_of(build("m", NS, UID, s, CLUSTER_CONFIG))["env"]
            }
    assert names <= RESERVED_ENV
    assert RESERVED_ENV - names == set()  # and nothing is reserved without a reason


def test_built_jobs_share_no_mutable_state_with_module_constants() -> None:
    first = build_conversion_job("m", NS, UID, parse_spec(S3_TP2), BASIC_CONFIG)
    before = copy.deepcopy(build_conversion_job("m", NS, UID, parse_spec(S3_TP2), BASIC_CONFIG))
    try:
        for _, value in walk(first):
            if isinstance(value, dict):
                value["mutated"] = True
            elif isinstance(value, list):
                value.append("mutated")
        after = build_conversion_job("m", NS, UID, parse_spec(S3_TP2), BASIC_CONFIG)
        assert after == before
    finally:
        RESTRICTED_CONTAINER_SECURITY["capabilities"] = {"drop": ["ALL"]}
        RESTRICTED_CONTAINER_SECURITY.pop("mutated", None)
        RESTRICTED_CONTAINER_SECURITY["seccompProfile"] = {"type": "RuntimeDefault"}
        RESTRICTED_POD_SECURITY["seccompProfile"] = {"type": "RuntimeDefault"}
        RESTRICTED_POD_SECURITY.pop("mutated", None)


# ------------------------------------------------------------------------ purge Job


def test_purge_job() -> None:
    spec = parse_spec(HF)
    job = build_purge_job("llama-8b", NS, UID, spec, CLUSTER_CONFIG)
    h = spec.conversion_hash()
    assert job["metadata"]["name"] == purge_job_name("llama-8b", h)
    assert "ownerReferences" not in job["metadata"]  # its owner is being deleted
    assert job["metadata"]["annotations"] == {
        ANNOTATION_SPEC_HASH: h,
        ANNOTATION_OWNER_UID: UID,
        ANNOTATION_CHECKPOINT_NAME: "llama-8b",
    }
    assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "purge"
    c = container_of(job)
    assert c["args"] == [
        "purge",
        "--output",
        "s3://models/llama-8b/tp1/",
        "--owner",
        f"ml/llama-8b/{UID}",
    ]
    # the operator's own image, never spec.converter.image: the user's image never runs
    # with the output credentials on deletion
    assert (c["image"], c["imagePullPolicy"]) == (CLUSTER_CONFIG.converter_image, "Always")
    env = {e["name"]: e for e in c["env"]}
    # Output credentials only: the source is never read.
    assert "HF_TOKEN" not in env
    assert env["AWS_SECRET_ACCESS_KEY"] == secret_env("s3-credentials", "AWS_SECRET_ACCESS_KEY")
    assert env["AWS_ENDPOINT_URL_S3"] == {
        "name": "AWS_ENDPOINT_URL_S3",
        "value": "https://s3.eu.example.com",
    }
    pod = job["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == "hf-sharder"
    assert "nvidia.com/gpu" not in json.dumps(c["resources"])


def test_purge_job_uses_the_operator_defaults() -> None:
    job = build_purge_job("m", NS, UID, parse_spec(PVC_TP8_PP2_FP8), CLUSTER_CONFIG)
    c = container_of(job)
    assert (c["image"], c["imagePullPolicy"]) == (CLUSTER_CONFIG.converter_image, "Always")
    env = {e["name"]: e for e in c["env"]}
    assert env["AWS_ACCESS_KEY_ID"] == secret_env("s3-default", "AWS_ACCESS_KEY_ID")
    assert env["AWS_REGION"] == {"name": "AWS_REGION", "value": "us-east-1"}
    assert job["spec"]["template"]["spec"]["serviceAccountName"] == "sharder"


# -------------------------------------------------------------------- serving ConfigMap


def test_serving_configmap() -> None:
    spec = parse_spec(PVC_TP8_PP2_FP8)
    cm = build_serving_configmap("big", NS, UID, ARTIFACT, spec, "http://minio.storage:9000")
    assert cm["metadata"] == {
        "name": "big-serving",
        "namespace": NS,
        "labels": labels("big", "serving"),
        "ownerReferences": [owner_reference("big", UID)],
    }
    info = serving_info("big", spec, ARTIFACT["uri"], "http://minio.storage:9000")
    assert cm["data"] == configmap_data(info, spec, ARTIFACT)


def test_serving_configmap_locations_come_from_the_spec_not_the_pod() -> None:
    # a termination message can say anything (or nothing): MODEL, the arguments and the
    # manifest's location are the spec's output URI
    spec = parse_spec(S3_TP2)
    forged = {"uri": "s3://attacker-bucket/x/", "manifestUri": "s3://attacker-bucket/m.json"}
    data = build_serving_configmap("m", NS, UID, forged, spec)["data"]
    assert data["MODEL"] == "s3://preshard-checkpoints/tiny-llama/tp2/"
    assert data["MANIFEST_URI"] == "s3://preshard-checkpoints/tiny-llama/tp2/preshard-manifest.json"
    assert "attacker" not in json.dumps(data)
    # an artifact without "uri" (KeyError before)
    data = build_serving_configmap("m", NS, UID, {"files": 3}, spec)["data"]
    assert data["MODEL"] == "s3://preshard-checkpoints/tiny-llama/tp2/"


def test_serving_configmap_endpoint_precedence() -> None:
    spec = parse_spec(HF)  # output.endpoint set
    cm = build_serving_configmap("m", NS, UID, ARTIFACT, spec, "http://default:9000")
    assert cm["data"]["AWS_ENDPOINT_URL"] == "https://s3.eu.example.com"
    cm = build_serving_configmap("m", NS, UID, ARTIFACT, parse_spec(S3_TP2), "http://default:9000")
    assert cm["data"]["AWS_ENDPOINT_URL"] == "http://default:9000"
    cm = build_serving_configmap("m", NS, UID, ARTIFACT, parse_spec(S3_TP2))
    assert "AWS_ENDPOINT_URL" not in cm["data"]


# ------------------------------------------------------------------ engine and memory


def resources_of(job: dict[str, Any]) -> dict[str, Any]:
    return dict(container_of(job)["resources"])


def test_engine_none_requests_no_accelerator_two_cores_and_its_estimate() -> None:
    job = build_conversion_job(
        "m", NS, UID, parse_spec(ENGINE_NONE_TP8), CLUSTER_CONFIG, memory_estimate=ESTIMATE_NONE
    )
    res = resources_of(job)
    assert res == {"requests": {"cpu": "2", "memory": "9.8Gi"}}  # no GPU, no core per rank
    args = container_of(job)["args"]
    assert args[args.index("--engine") + 1] == "none"
    assert env_of(job)["PRESHARD_ACCELERATOR"]["value"] == "none"
    assert container_of(job)["image"] == CLUSTER_CONFIG.converter_cpu_image
    # placement: the CPU defaults, not the GPU nodes' (CLUSTER_CONFIG has GPU defaults)
    pod = job["spec"]["template"]["spec"]
    assert "nodeSelector" not in pod and "tolerations" not in pod
    # even where the spec says gpu: engine none wins (no accelerator is used)
    gpu_spec = spec_of(ENGINE_NONE_TP8, **{"converter.accelerator": "gpu"})
    res = resources_of(build_conversion_job("m", NS, UID, gpu_spec, CLUSTER_CONFIG))
    assert res == {"requests": {"cpu": "2"}}


def test_engine_default_comes_from_the_operator_and_auto_is_sized_for_the_engine() -> None:
    import dataclasses

    none_default = dataclasses.replace(CPU_CONFIG, default_engine="none")
    job = build_conversion_job("m", NS, UID, parse_spec(S3_TP2), none_default)
    assert "--engine" in container_of(job)["args"]
    assert "nvidia.com/gpu" not in str(resources_of(job))
    for engine in ("auto", "vllm"):
        spec = spec_of(S3_TP2, **{"converter.engine": engine})
        job = build_conversion_job("m", NS, UID, spec, none_default)
        args = container_of(job)["args"]
        assert ("--engine" in args) == (engine == "vllm")  # auto is the worker's default
        assert resources_of(job)["requests"]["nvidia.com/gpu"] == "2"  # sized for the engine
    # the engine is not part of the conversion identity: same Job name, same spec hash
    a = build_conversion_job("m", NS, UID, parse_spec(S3_TP2), CPU_CONFIG)
    b = build_conversion_job(
        "m", NS, UID, spec_of(S3_TP2, **{"converter.engine": "none"}), CPU_CONFIG
    )
    assert a["metadata"]["name"] == b["metadata"]["name"]


def test_cpu_jobs_request_the_estimate_and_the_user_wins() -> None:
    job = build_conversion_job(
        "m", NS, UID, parse_spec(CPU_NO_MEMORY), CPU_CONFIG, memory_estimate=ESTIMATE_CPU
    )
    assert resources_of(job) == {"requests": {"cpu": "2", "memory": "7.2Gi"}}
    # the user's request or limit wins (CPU_TP2 sets both)
    job = build_conversion_job(
        "m", NS, UID, parse_spec(CPU_TP2), CPU_CONFIG, memory_estimate=ESTIMATE_CPU
    )
    assert resources_of(job)["requests"]["memory"] == "24Gi"
    only_limit = spec_of(CPU_NO_MEMORY, **{"converter.resources": {"limits": {"memory": "9Gi"}}})
    job = build_conversion_job("m", NS, UID, only_limit, CPU_CONFIG, memory_estimate=ESTIMATE_CPU)
    assert "memory" not in resources_of(job)["requests"]  # Kubernetes defaults it to the limit
    # an estimate made for another path is not used; GPUs get none (host memory)
    job = build_conversion_job(
        "m", NS, UID, parse_spec(CPU_NO_MEMORY), CPU_CONFIG, memory_estimate=ESTIMATE_NONE
    )
    assert "memory" not in resources_of(job)["requests"]
    job = build_conversion_job(
        "m", NS, UID, parse_spec(GPU_TP2), CPU_CONFIG, memory_estimate=memory_status("gpu", 10**11)
    )
    assert resources_of(job)["requests"]["memory"] == "24Gi"  # the user's, untouched


@pytest.mark.parametrize(
    ("acc", "estimate", "want"),
    [
        ("cpu", memory_status("cpu", 2**30 + 1), "1.1Gi"),  # rounded up, never under
        ("none", memory_status("none", 300 * 2**20), "300Mi"),
        ("gpu", memory_status("gpu", 2**30), None),
        ("cpu", None, None),
        ("cpu", {"bytes": "7Gi", "accelerator": "cpu"}, None),
        ("cpu", {"bytes": True, "accelerator": "cpu"}, None),
        ("cpu", {"bytes": 0, "accelerator": "cpu"}, None),
    ],
)
def test_memory_request(acc: str, estimate: Any, want: str | None) -> None:
    assert memory_request(acc, estimate) == want
