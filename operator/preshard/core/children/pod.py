"""What every Job's pod is made of: metadata and owner, the restricted security contexts,
the container and pod template, the failure policy, the runtime environment and a
``pvc://`` source's volume; the effective engine, accelerator and ServiceAccount."""

from __future__ import annotations

import copy
from typing import Any

from preshard import GROUP, KIND, VERSION
from preshard.core.config import OperatorConfig
from preshard.core.contract import EXIT_PERMANENT, PVC_MOUNT_ROOT, TERMINATION_LOG, WORK_DIR
from preshard.core.naming import (
    ANNOTATION_CHECKPOINT_NAME,
    ANNOTATION_OWNER_UID,
    ANNOTATION_SPEC_HASH,
)
from preshard.core.spec import CheckpointSpec

RESTRICTED_CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}
RESTRICTED_POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "runAsGroup": 1000,
    "fsGroup": 1000,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def owner_reference(name: str, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def owner_arg(name: str, namespace: str, uid: str) -> str:
    """The owner a manifest records: ``namespace/name/uid``."""
    return f"{namespace}/{name}/{uid}"


def job_metadata(
    name: str, namespace: str, uid: str, job: str, lbl: dict[str, str], spec_hash: str, *,
    owned: bool = True,
) -> dict[str, Any]:  # fmt: skip
    meta: dict[str, Any] = {
        "name": job,
        "namespace": namespace,
        "labels": lbl,
        "annotations": {
            ANNOTATION_SPEC_HASH: spec_hash,
            ANNOTATION_OWNER_UID: uid,
            ANNOTATION_CHECKPOINT_NAME: name,
        },
    }
    if owned:
        meta["ownerReferences"] = [owner_reference(name, uid)]
    return meta


def fail_fast(container: str) -> dict[str, Any]:
    """podFailurePolicy: a permanent failure (exit code 3) fails the Job at once; a pod
    evicted by a disruption does not count against backoffLimit."""
    return {
        "rules": [
            {
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": container,
                    "operator": "In",
                    "values": [EXIT_PERMANENT],
                },
            },
            {
                "action": "Ignore",
                "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
            },
        ]
    }


def restricted_container(
    name: str, image: str, pull: str, args: list[str], env: list[dict[str, Any]],
    resources: dict[str, Any], mounts: list[dict[str, Any]],
) -> dict[str, Any]:  # fmt: skip
    return {
        "name": name,
        "image": image,
        "imagePullPolicy": pull,
        "command": ["preshard"],
        "args": args,
        "env": env,
        "resources": resources,
        "securityContext": copy.deepcopy(RESTRICTED_CONTAINER_SECURITY),
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": mounts,
    }


def restricted_pod_spec(
    service_account: str, container: dict[str, Any], volumes: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "restartPolicy": "Never",
        "serviceAccountName": service_account,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": copy.deepcopy(RESTRICTED_POD_SECURITY),
        "containers": [container],
        "volumes": volumes,
    }


def runtime_env() -> list[dict[str, Any]]:
    # The root filesystem is read-only: every cache goes under the /work volume.
    return [
        {"name": "PRESHARD_TERMINATION_LOG", "value": TERMINATION_LOG},
        {"name": "PRESHARD_WORK_DIR", "value": WORK_DIR},
        {"name": "PRESHARD_PVC_MOUNT_ROOT", "value": PVC_MOUNT_ROOT},
        {"name": "HOME", "value": f"{WORK_DIR}/home"},
        {"name": "XDG_CACHE_HOME", "value": f"{WORK_DIR}/cache"},
        {"name": "HF_HOME", "value": f"{WORK_DIR}/cache/huggingface"},
        {"name": "VLLM_CACHE_ROOT", "value": f"{WORK_DIR}/cache/vllm"},
        {"name": "TRITON_CACHE_DIR", "value": f"{WORK_DIR}/cache/triton"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]


def source_volume(spec: CheckpointSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A pvc:// source's claim, mounted read-only under PVC_MOUNT_ROOT (else nothing)."""
    src = spec.source.parsed
    if src.scheme != "pvc":
        return [], []
    volume = {
        "name": "source",
        "persistentVolumeClaim": {"claimName": src.authority, "readOnly": True},
    }
    mount = {"name": "source", "mountPath": f"{PVC_MOUNT_ROOT}/{src.authority}", "readOnly": True}
    return [volume], [mount]


def engine(spec: CheckpointSpec, config: OperatorConfig) -> str:
    """The effective engine (core.plan.ENGINES): the spec's, else the operator default."""
    return spec.converter.engine or config.default_engine


def accelerator(spec: CheckpointSpec, config: OperatorConfig) -> str:
    """The effective accelerator: ``none`` for an engine-free conversion (engine: none:
    no GPU, no core per rank), else the spec's, else the operator default. ``auto`` is
    sized for the engine: the worker falls back to it when the planner does not support
    the model (docs/cpu-conversion.md, "Without an engine")."""
    if engine(spec, config) == "none":
        return "none"
    return spec.converter.accelerator or config.default_accelerator


def job_service_account(namespace: str, spec: CheckpointSpec, config: OperatorConfig) -> str:
    """The conversion (and purge) pod's ServiceAccount: the spec's (the policy checked it)
    or the namespace's own converter ServiceAccount."""
    return spec.converter.service_account_name or config.service_account_for(namespace)
