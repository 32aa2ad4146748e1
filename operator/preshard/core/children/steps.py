"""The CPU-only step Jobs before a conversion: preflight, adopt, copy, withdraw
(:mod:`preshard.core.steps` decides which runs). No accelerator, small requests, the
resource's own credentials Secrets, restricted pod security, no Kubernetes API access."""

from __future__ import annotations

import copy
from typing import Any

from preshard.core.children.credentials import output_env, source_env
from preshard.core.children.pod import (
    accelerator,
    fail_fast,
    job_metadata,
    owner_arg,
    restricted_container,
    restricted_pod_spec,
    source_volume,
)
from preshard.core.config import OperatorConfig
from preshard.core.contract import PVC_MOUNT_ROOT, TERMINATION_LOG, WORK_DIR
from preshard.core.naming import (
    labels,
    step_job_name,
)
from preshard.core.spec import CheckpointSpec

STEP_COMPONENTS = ("preflight", "adopt", "copy", "withdraw")
STEP_RESOURCES = {
    "requests": {"cpu": "250m", "memory": "256Mi"},
    "limits": {"memory": "1Gi"},
}
# adopt and copy check the checkpoint against the source (verify --against)
VERIFY_MEMORY = {"requests": "1Gi", "limits": "8Gi"}
STEP_DEADLINE_SECONDS = 3600
STEP_TTL_SECONDS = 3600


def _step_job(
    name: str,
    namespace: str,
    uid: str,
    spec: CheckpointSpec,
    config: OperatorConfig,
    component: str,
    args: list[str],
    *extra: str,
    source_access: bool = False,
    verifies: bool = False,
) -> dict[str, Any]:
    """``verifies``: the step checks a checkpoint against the source (``verify
    --against``): it downloads both into its work dir (the conversion's size) and holds
    a few tensors in memory (the spec's converter memory request and limit apply)."""
    spec_hash = spec.conversion_hash()
    lbl = labels(name, component, spec_hash)
    work_size = (spec.converter.work_dir_size or config.work_dir_size) if verifies else "1Gi"
    volumes: list[dict[str, Any]] = [
        {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
        {"name": "work", "emptyDir": {"sizeLimit": work_size}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "work", "mountPath": WORK_DIR},
    ]
    env = output_env(spec, config)
    if source_access:
        env += source_env(spec)
        src_volumes, src_mounts = source_volume(spec)
        volumes += src_volumes
        mounts += src_mounts
    env += [
        {"name": "PRESHARD_TERMINATION_LOG", "value": TERMINATION_LOG},
        {"name": "PRESHARD_WORK_DIR", "value": WORK_DIR},
        {"name": "PRESHARD_PVC_MOUNT_ROOT", "value": PVC_MOUNT_ROOT},
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": f"{WORK_DIR}/cache/huggingface"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    container = restricted_container(
        component,
        spec.converter.image or config.converter_image,
        spec.converter.image_pull_policy or config.image_pull_policy,
        args,
        env,
        _verify_resources(spec) if verifies else copy.deepcopy(STEP_RESOURCES),
        mounts,
    )
    job = step_job_name(name, uid, component, spec_hash, *extra)
    service_account = spec.converter.service_account_name or config.job_service_account
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": job_metadata(name, namespace, uid, job, lbl, spec_hash),
        "spec": {
            "backoffLimit": 2,
            "activeDeadlineSeconds": STEP_DEADLINE_SECONDS,
            "ttlSecondsAfterFinished": STEP_TTL_SECONDS,
            "podFailurePolicy": fail_fast(component),
            "template": {
                "metadata": {"labels": lbl},
                "spec": restricted_pod_spec(service_account, container, volumes),
            },
        },
    }


def _verify_resources(spec: CheckpointSpec) -> dict[str, Any]:
    """A verifying step's resources: no accelerator; the memory the spec gives its
    converter (verify --against holds about four of the largest tensors), else
    VERIFY_MEMORY (a pod killed for memory fails the step: the resource converts)."""
    user = spec.converter.resources or {}
    req_mem = (user.get("requests") or {}).get("memory")
    lim_mem = (user.get("limits") or {}).get("memory")
    return {
        "requests": {
            "cpu": STEP_RESOURCES["requests"]["cpu"],
            "memory": str(req_mem or VERIFY_MEMORY["requests"]),
        },
        "limits": {"memory": str(lim_mem or VERIFY_MEMORY["limits"])},
    }


def _against_args(spec: CheckpointSpec, source_digest: str | None) -> list[str]:
    """The requester's own source, and the content the preflight pinned, for the step's
    ``verify --against`` check (read with this resource's source credentials)."""
    args = ["--against", spec.source.uri]
    if source_digest:
        args += ["--source-digest", source_digest]
    return args


def _step_args(
    command: str, name: str, namespace: str, uid: str, spec: CheckpointSpec,
    expect_owner: str | None,
) -> list[str]:  # fmt: skip
    """``COMMAND --output URI --owner NS/NAME/UID [--expect-owner OWNER]``."""
    args = [
        command,
        "--output",
        str(spec.output.parsed),
        "--owner",
        owner_arg(name, namespace, uid),
    ]
    if expect_owner:
        args += ["--expect-owner", expect_owner]
    return args


def build_preflight_job(
    name: str,
    namespace: str,
    uid: str,
    spec: CheckpointSpec,
    config: OperatorConfig,
    attempt: int = 0,
) -> dict[str, Any]:
    """Reads the source (its own credentials) and the output prefix; writes nothing.
    ``attempt`` > 0: a new preflight after the prefix changed under a step."""
    args = [
        "preflight",
        "--source",
        spec.source.uri,
        "--output",
        str(spec.output.parsed),
        "--owner",
        owner_arg(name, namespace, uid),
    ]
    if spec.quantization and accelerator(spec, config) == "cpu":
        # the preflight probes the method's kernel on the CPU node type that converts
        args += ["--quantization", spec.quantization]
    extra = (str(attempt),) if attempt else ()
    return _step_job(
        name, namespace, uid, spec, config, "preflight", args, *extra, source_access=True
    )


def build_adopt_job(
    name: str,
    namespace: str,
    uid: str,
    spec: CheckpointSpec,
    config: OperatorConfig,
    *,
    identity: str,
    expect_owner: str | None,
    expect_manifest_sha256: str,
    source_digest: str | None = None,
) -> dict[str, Any]:
    """Verifies the checkpoint against its manifest and against this resource's own
    source (source credentials and PVC mount, as the preflight) before taking it over."""
    args = _step_args("adopt", name, namespace, uid, spec, expect_owner)
    args += ["--expect-identity", identity, "--expect-manifest-sha256", expect_manifest_sha256]
    args += _against_args(spec, source_digest)
    return _step_job(
        name, namespace, uid, spec, config, "adopt", args, identity, expect_manifest_sha256,
        source_access=True, verifies=True,
    )  # fmt: skip


def build_copy_job(
    name: str,
    namespace: str,
    uid: str,
    spec: CheckpointSpec,
    config: OperatorConfig,
    *,
    identity: str,
    source_uri: str,
    source_manifest_sha256: str,
    source_digest: str | None = None,
) -> dict[str, Any]:
    """Copies with the NEW resource's output credentials only: a prefix they cannot read
    fails with AccessDenied (the operator then converts). The copy is checked against
    this resource's own source (``--against``) before its manifest is written.
    ``source_uri`` is another resource's prefix only where the copy policy lets the two
    namespaces trust each other (core.config.OperatorConfig.copy_trust)."""
    args = [
        "copy",
        "--from",
        source_uri,
        "--to",
        str(spec.output.parsed),
        "--owner",
        owner_arg(name, namespace, uid),
        "--expect-identity",
        identity,
        "--expect-manifest-sha256",
        source_manifest_sha256,
        *_against_args(spec, source_digest),
    ]
    return _step_job(
        name, namespace, uid, spec, config, "copy", args, identity, source_uri,
        source_manifest_sha256, source_access=True, verifies=True,
    )  # fmt: skip


def build_withdraw_job(
    name: str,
    namespace: str,
    uid: str,
    spec: CheckpointSpec,
    config: OperatorConfig,
    *,
    expect_owner: str | None,
    expect_manifest_sha256: str,
    delete_listed: bool = False,
) -> dict[str, Any]:
    """``delete_listed``: also delete the objects the manifest lists (only for a manifest
    the operator's ledger proves; a planted one could list anybody's objects)."""
    args = _step_args("withdraw", name, namespace, uid, spec, expect_owner)
    args += ["--expect-manifest-sha256", expect_manifest_sha256]
    if delete_listed:
        args.append("--delete-listed")
    return _step_job(
        name, namespace, uid, spec, config, "withdraw", args, expect_manifest_sha256,
        *(("listed",) if delete_listed else ()),
    )  # fmt: skip
