"""The conversion Job: ``preshard convert`` with the resource's conversion plan, the
accelerator's resources (GPUs, or cores and the preflight's memory estimate) and the
operator's placement for it."""

from __future__ import annotations

import copy
from typing import Any

from preshard.core.children.credentials import output_env, source_env
from preshard.core.children.pod import (
    accelerator,
    engine,
    fail_fast,
    job_metadata,
    job_service_account,
    owner_arg,
    restricted_container,
    restricted_pod_spec,
    runtime_env,
    source_volume,
)
from preshard.core.config import OperatorConfig
from preshard.core.contract import WORK_DIR
from preshard.core.estimate import format_gib
from preshard.core.naming import (
    ANNOTATION_SPEC_HASH,
    job_name,
    labels,
)
from preshard.core.spec import CheckpointSpec

CONTAINER = "convert"

# requests.cpu of an engine-free conversion (engine: none) whatever TP x PP: the planner
# builds one rank's model at a time on the meta device, the transfer uses the other core.
ENGINE_FREE_CPUS = "2"


def converter_image(spec: CheckpointSpec, config: OperatorConfig) -> str:
    if spec.converter.image:
        return spec.converter.image
    return (
        config.converter_image if accelerator(spec, config) == "gpu" else config.converter_cpu_image
    )


def memory_request(acc: str, estimate: dict[str, Any] | None) -> str | None:
    """``requests.memory`` of a conversion container without an accelerator (cpu, none):
    the preflight's estimate (``status.memoryEstimate``, core.estimate) when it was made
    for this accelerator; None for GPUs (host memory is not what limits them) and when
    there is no estimate (config.json not countable, or PRESHARD_PREFLIGHT=0)."""
    if acc == "gpu" or not isinstance(estimate, dict) or estimate.get("accelerator") != acc:
        return None
    total = estimate.get("bytes")
    if isinstance(total, bool) or not isinstance(total, int) or total <= 0:
        return None
    return format_gib(total)


def _resources(
    spec: CheckpointSpec, config: OperatorConfig, estimate: dict[str, Any] | None = None
) -> dict[str, Any]:
    user = spec.converter.resources or {}
    requests = dict(user.get("requests") or {})
    limits = dict(user.get("limits") or {})
    acc = accelerator(spec, config)
    if acc != "gpu":
        # No GPU. With an engine, one core per rank at least (vLLM binds each CPU rank's
        # OpenMP threads to its own cores; check_accelerator refused fewer before the
        # Job); without one, a few cores whatever TP x PP (the planner builds one rank's
        # model at a time on the meta device; the transfer needs the rest).
        if "cpu" not in requests and "cpu" not in limits:
            requests["cpu"] = ENGINE_FREE_CPUS if acc == "none" else str(spec.layout.world_size)
        # memory from the preflight's estimate, so the scheduler places the pod on a
        # node that holds it (the user's own request or limit wins)
        memory = memory_request(acc, estimate)
        if memory and "memory" not in requests and "memory" not in limits:
            requests["memory"] = memory
    else:
        gpu = spec.converter.gpu_resource_name or config.gpu_resource_name
        # Quantities are strings in the API (the kubernetes client returns them as such).
        requests[gpu] = limits[gpu] = str(spec.layout.world_size)
    out: dict[str, Any] = {"requests": dict(sorted(requests.items()))}
    if limits:
        out["limits"] = dict(sorted(limits.items()))
    return out


def _accelerator_env(spec: CheckpointSpec, config: OperatorConfig) -> list[dict[str, Any]]:
    # The worker's memory preflight and CPU settings (preshard.worker.resources): the
    # container's memory limit through the Downward API (the node's allocatable memory
    # when the container has no limit), whatever the cgroup version of the node.
    env: list[dict[str, Any]] = [
        {
            "name": "PRESHARD_MEMORY_LIMIT",
            "valueFrom": {
                "resourceFieldRef": {"containerName": CONTAINER, "resource": "limits.memory"}
            },
        }
    ]
    acc = accelerator(spec, config)
    if acc != "gpu":
        env.append({"name": "PRESHARD_ACCELERATOR", "value": acc})
    return env


def conversion_args(
    name: str,
    namespace: str,
    uid: str,
    spec: CheckpointSpec,
    identity: str | None = None,
    source_digest: str | None = None,
    engine: str | None = None,
) -> list[str]:
    """``preshard convert`` with the resource's conversion plan (core.plan; ``engine`` the
    effective one, ``--engine`` when not auto), then the pod's own flags (scratch
    directory, progress lines). ``source_digest``: the source content the preflight
    pinned (the conversion refuses a source that differs)."""
    plan = spec.plan(
        owner=owner_arg(name, namespace, uid),
        identity=identity,
        source_digest=source_digest,
        engine=engine,
    )
    return ["convert", *plan.to_argv(), "--work-dir", WORK_DIR, "--progress", "lines"]


def build_conversion_job(
    name: str,
    namespace: str,
    uid: str,
    spec: CheckpointSpec,
    config: OperatorConfig,
    identity: str | None = None,
    source_digest: str | None = None,
    memory_estimate: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The conversion Job. ``memory_estimate`` is ``status.memoryEstimate`` (the
    preflight's, core.estimate): a Job without an accelerator requests that memory."""
    spec_hash = spec.conversion_hash()
    converter = spec.converter
    volumes: list[dict[str, Any]] = [
        {
            "name": "work",
            "emptyDir": {"sizeLimit": converter.work_dir_size or config.work_dir_size},
        },
        {"name": "tmp", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "work", "mountPath": WORK_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    src_volumes, src_mounts = source_volume(spec)
    volumes += src_volumes
    mounts += src_mounts
    env = output_env(spec, config) + source_env(spec) + runtime_env()
    env += _accelerator_env(spec, config)
    env += [{"name": e["name"], "value": str(e.get("value", ""))} for e in (converter.env or [])]
    container = restricted_container(
        CONTAINER,
        converter_image(spec, config),
        converter.image_pull_policy or config.image_pull_policy,
        conversion_args(name, namespace, uid, spec, identity, source_digest, engine(spec, config)),
        env,
        _resources(spec, config, memory_estimate),
        mounts,
    )
    pod_spec = restricted_pod_spec(job_service_account(namespace, spec, config), container, volumes)
    on_cpu = accelerator(spec, config) != "gpu"
    # the operator's default placement for the accelerator (the chart's converter.cpu*);
    # the admin's default nodeSelector always applies; the spec adds (or, where the policy
    # allows it, changes) entries on top of it.
    default_selector = config.default_cpu_node_selector if on_cpu else config.default_node_selector
    default_tolerations = config.default_cpu_tolerations if on_cpu else config.default_tolerations
    node_selector = {**dict(default_selector), **(converter.node_selector or {})}
    if node_selector:
        pod_spec["nodeSelector"] = dict(sorted(node_selector.items()))
    tolerations = [
        copy.deepcopy(dict(t))
        for t in (
            converter.tolerations if converter.tolerations is not None else default_tolerations
        )
    ]
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if converter.priority_class_name:
        pod_spec["priorityClassName"] = converter.priority_class_name
    lbl = labels(name, "converter", spec_hash)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": job_metadata(name, namespace, uid, job_name(name, spec_hash), lbl, spec_hash),
        "spec": {
            "backoffLimit": converter.backoff_limit,
            "activeDeadlineSeconds": converter.active_deadline_seconds,
            "ttlSecondsAfterFinished": (
                converter.ttl_seconds_after_finished
                if converter.ttl_seconds_after_finished is not None
                else config.job_ttl_seconds
            ),
            "podFailurePolicy": fail_fast(CONTAINER),
            "template": {
                "metadata": {"labels": lbl, "annotations": {ANNOTATION_SPEC_HASH: spec_hash}},
                "spec": pod_spec,
            },
        },
    }
