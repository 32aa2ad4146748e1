"""Child object bodies (plain dicts) built from a ShardedCheckpoint: the conversion
Job, the purge Job (deletionPolicy: Delete) and the serving ConfigMap.

Pure functions: same inputs, same manifest (pinned by golden files in tests/golden).
User values only ever land in an argument list or env values, never in a shell string.
"""

from __future__ import annotations

import copy
from typing import Any

from preshard import GROUP, KIND, VERSION
from preshard.core.config import OperatorConfig
from preshard.core.contract import EXIT_PERMANENT, PVC_MOUNT_ROOT, TERMINATION_LOG, WORK_DIR
from preshard.core.estimate import format_gib
from preshard.core.naming import (
    bounded_name,
    checkpoint_label_value,
    cleanup_job_name,
    job_name,
    serving_configmap_name,
)
from preshard.core.plan import PREQUANTIZED
from preshard.core.serving import ServingInfo, configmap_data, serving_info
from preshard.core.spec import CheckpointSpec

CONTAINER = "convert"
MANAGED_BY = "preshard"
LABEL_CHECKPOINT = "preshard.io/checkpoint"
LABEL_SPEC_HASH = "preshard.io/spec-hash"
LABEL_COMPONENT = "app.kubernetes.io/component"
ANNOTATION_SPEC_HASH = "preshard.io/spec-hash"
ANNOTATION_OWNER_UID = "preshard.io/owner-uid"
# The owner's full name: the checkpoint label holds a cut name + hash for names over 63.
ANNOTATION_CHECKPOINT_NAME = "preshard.io/checkpoint-name"

# requests.cpu of an engine-free conversion (engine: none) whatever TP x PP: the planner
# builds one rank's model at a time on the meta device, the transfer uses the other core.
ENGINE_FREE_CPUS = "2"

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


def labels(name: str, component: str, spec_hash: str | None = None) -> dict[str, str]:
    """Labels of a child object; the checkpoint label is bounded to 63 characters."""
    out = {
        "app.kubernetes.io/name": "preshard",
        LABEL_COMPONENT: component,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_CHECKPOINT: checkpoint_label_value(name),
    }
    if spec_hash:
        out[LABEL_SPEC_HASH] = spec_hash[:10]
    return out


def owner_reference(name: str, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _secret_env(env_name: str, secret: str, key: str, optional: bool = False) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": secret, "key": key}
    if optional:
        ref["optional"] = True
    return {"name": env_name, "valueFrom": {"secretKeyRef": ref}}


def _aws_env(prefix: str, secret: str) -> list[dict[str, Any]]:
    return [
        _secret_env(f"{prefix}AWS_ACCESS_KEY_ID", secret, "AWS_ACCESS_KEY_ID"),
        _secret_env(f"{prefix}AWS_SECRET_ACCESS_KEY", secret, "AWS_SECRET_ACCESS_KEY"),
        _secret_env(f"{prefix}AWS_SESSION_TOKEN", secret, "AWS_SESSION_TOKEN", optional=True),
    ]


def output_secret(spec: CheckpointSpec, config: OperatorConfig) -> str | None:
    return spec.output.credentials_secret or config.default_credentials_secret


def source_secret(spec: CheckpointSpec) -> str | None:
    """The Secret the source is read with (None: the output's credentials or none)."""
    return spec.source.credentials_secret


def output_endpoint(spec: CheckpointSpec, config: OperatorConfig) -> str | None:
    return spec.output.endpoint or config.default_s3_endpoint


def source_endpoint(spec: CheckpointSpec, config: OperatorConfig) -> str | None:
    """The S3 endpoint an ``s3://`` source is read from: its own, else the output's (the
    worker falls back to AWS_ENDPOINT_URL_S3), else the default (None: AWS)."""
    return spec.source.endpoint or output_endpoint(spec, config)


def job_service_account(namespace: str, spec: CheckpointSpec, config: OperatorConfig) -> str:
    """The conversion (and purge) pod's ServiceAccount: the spec's (the policy checked it)
    or the namespace's own converter ServiceAccount."""
    return spec.converter.service_account_name or config.service_account_for(namespace)


def referenced_secrets(spec: CheckpointSpec, config: OperatorConfig) -> list[str]:
    """Every Secret the conversion pod reads (the operator checks they exist)."""
    names = [s for s in (output_secret(spec, config), source_secret(spec)) if s]
    return sorted(set(names))


def _output_env(spec: CheckpointSpec, config: OperatorConfig) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = []
    secret = output_secret(spec, config)
    if secret:
        env += _aws_env("", secret)
    endpoint = output_endpoint(spec, config)
    if endpoint:
        env.append({"name": "AWS_ENDPOINT_URL_S3", "value": endpoint})
    if spec.output.region:
        env.append({"name": "AWS_REGION", "value": spec.output.region})
    return env


def _source_env(spec: CheckpointSpec) -> list[dict[str, Any]]:
    src = spec.source.parsed
    env: list[dict[str, Any]] = []
    secret = spec.source.credentials_secret
    if src.scheme == "hf":
        if secret:
            env.append(_secret_env("HF_TOKEN", secret, "HF_TOKEN", optional=True))
        return env
    if src.scheme == "s3":
        if secret:
            env += _aws_env("PRESHARD_SOURCE_", secret)
        if spec.source.endpoint:
            env.append({"name": "PRESHARD_SOURCE_ENDPOINT_URL", "value": spec.source.endpoint})
        if spec.source.region:
            env.append({"name": "PRESHARD_SOURCE_REGION", "value": spec.source.region})
    return env


def _runtime_env() -> list[dict[str, Any]]:
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


def engine(spec: CheckpointSpec, config: OperatorConfig) -> str:
    """The effective engine (core.plan.ENGINES): the spec's, else the operator default;
    without the spec's, ``none`` for pre-quantized FP8 shards (``spec.weights``
    ``quantized``, or ``auto`` under an ``auto`` default): they are computed only without
    an engine (the worker never falls back to one), so the Job is sized for that."""
    chosen = spec.converter.engine or config.default_engine
    prequantized = spec.weights == "quantized" or (spec.weights == "auto" and chosen == "auto")
    if spec.converter.engine is None and spec.quantization in PREQUANTIZED and prequantized:
        return "none"
    return chosen


def accelerator(spec: CheckpointSpec, config: OperatorConfig) -> str:
    """The effective accelerator: ``none`` for an engine-free conversion (engine: none:
    no GPU, no core per rank), else the spec's, else the operator default. ``auto`` is
    sized for the engine: the worker falls back to it when the planner does not support
    the model (docs/cpu-conversion.md, "Without an engine")."""
    if engine(spec, config) == "none":
        return "none"
    return spec.converter.accelerator or config.default_accelerator


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


def owner_arg(name: str, namespace: str, uid: str) -> str:
    """The owner a manifest records: ``namespace/name/uid``."""
    return f"{namespace}/{name}/{uid}"


def _source_volume(spec: CheckpointSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
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


def _metadata(
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


def _fail_fast(container: str) -> dict[str, Any]:
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


def _container(
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


def _pod_spec(
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
    src_volumes, src_mounts = _source_volume(spec)
    volumes += src_volumes
    mounts += src_mounts
    env = _output_env(spec, config) + _source_env(spec) + _runtime_env()
    env += _accelerator_env(spec, config)
    env += [{"name": e["name"], "value": str(e.get("value", ""))} for e in (converter.env or [])]
    container = _container(
        CONTAINER,
        converter_image(spec, config),
        converter.image_pull_policy or config.image_pull_policy,
        conversion_args(name, namespace, uid, spec, identity, source_digest, engine(spec, config)),
        env,
        _resources(spec, config, memory_estimate),
        mounts,
    )
    pod_spec = _pod_spec(job_service_account(namespace, spec, config), container, volumes)
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
        "metadata": _metadata(name, namespace, uid, job_name(name, spec_hash), lbl, spec_hash),
        "spec": {
            "backoffLimit": converter.backoff_limit,
            "activeDeadlineSeconds": converter.active_deadline_seconds,
            "ttlSecondsAfterFinished": (
                converter.ttl_seconds_after_finished
                if converter.ttl_seconds_after_finished is not None
                else config.job_ttl_seconds
            ),
            "podFailurePolicy": _fail_fast(CONTAINER),
            "template": {
                "metadata": {"labels": lbl, "annotations": {ANNOTATION_SPEC_HASH: spec_hash}},
                "spec": pod_spec,
            },
        },
    }


def build_purge_job(
    name: str, namespace: str, uid: str, spec: CheckpointSpec, config: OperatorConfig
) -> dict[str, Any]:
    """The Job that deletes the output prefix (deletionPolicy: Delete), manifest first.

    It has no ownerReference: its owner is being deleted, and the finalizer waits for it.
    It runs the operator's converter image and ``purge --owner NAMESPACE/NAME/UID``: the
    purge deletes only what that owner published. The service decides first whether this
    resource may purge at all (preshard.core.deletion.purge_decision_at_deletion).
    """
    spec_hash = spec.conversion_hash()
    lbl = labels(name, "purge", spec_hash)
    container = _container(
        "purge",
        # The operator's own image, whatever spec.converter.image says: deleting needs no
        # vLLM, and an image the user picked never runs with the output credentials here.
        config.converter_image
        if accelerator(spec, config) == "gpu"
        else config.converter_cpu_image,
        config.image_pull_policy,
        ["purge", "--output", str(spec.output.parsed), "--owner", owner_arg(name, namespace, uid)],
        [
            *_output_env(spec, config),
            {"name": "PRESHARD_TERMINATION_LOG", "value": TERMINATION_LOG},
            {"name": "HOME", "value": "/tmp"},
        ],
        {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        [{"name": "tmp", "mountPath": "/tmp"}],
    )
    volumes = [{"name": "tmp", "emptyDir": {}}]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(
            name, namespace, uid, cleanup_job_name(name, spec_hash), lbl, spec_hash, owned=False
        ),
        "spec": {
            "backoffLimit": 3,
            "activeDeadlineSeconds": 3600,
            "ttlSecondsAfterFinished": 600,
            "template": {
                "metadata": {"labels": lbl},
                "spec": _pod_spec(job_service_account(namespace, spec, config), container, volumes),
            },
        },
    }


def build_serving_configmap(
    name: str,
    namespace: str,
    uid: str,
    artifact: dict[str, Any],
    spec: CheckpointSpec,
    default_endpoint: str | None = None,
) -> dict[str, Any]:
    endpoint = spec.output.endpoint or default_endpoint
    # MODEL and the arguments come from the spec's output URI, never from the pod's
    # termination message (the artifact supplies only the manifest digest and version).
    info = serving_info(name, spec, str(spec.output.parsed), endpoint)
    return _serving_configmap(name, namespace, uid, info, spec, artifact)


def build_serving(
    name: str,
    namespace: str,
    uid: str,
    artifact: dict[str, Any],
    spec: CheckpointSpec,
    config: OperatorConfig,
) -> tuple[ServingInfo, dict[str, Any]]:
    """The serving hand-off, built once: ``status.serving``'s source and the ConfigMap."""
    info = serving_info(
        name, spec, str(spec.output.parsed), output_endpoint(spec, config), engine(spec, config)
    )
    return info, _serving_configmap(name, namespace, uid, info, spec, artifact)


def _serving_configmap(
    name: str,
    namespace: str,
    uid: str,
    info: ServingInfo,
    spec: CheckpointSpec,
    artifact: dict[str, Any],
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": serving_configmap_name(name),
            "namespace": namespace,
            "labels": labels(name, "serving"),
            "ownerReferences": [owner_reference(name, uid)],
        },
        "data": configmap_data(info, spec, artifact),
    }


# ------------------------------------------------------------- CPU-only reuse Jobs
# preflight / adopt / copy / withdraw (core.decide): no accelerator, small requests, the
# resource's own credentials Secrets, restricted pod security, no Kubernetes API access.

REUSE_COMPONENTS = ("preflight", "adopt", "copy", "withdraw")
REUSE_RESOURCES = {
    "requests": {"cpu": "250m", "memory": "256Mi"},
    "limits": {"memory": "1Gi"},
}
# adopt and copy check the checkpoint against the source (verify --against)
VERIFY_MEMORY = {"requests": "1Gi", "limits": "8Gi"}
REUSE_DEADLINE_SECONDS = 3600
REUSE_TTL_SECONDS = 3600


def reuse_job_name(name: str, uid: str, component: str, spec_hash: str, *extra: str) -> str:
    """``<name>-<component>-<hash10>``: one per resource incarnation (uid), spec and the
    state it acts on (a new uid with the same name never meets an old Job)."""
    import hashlib

    digest = hashlib.sha256("\0".join((uid, spec_hash, *extra)).encode()).hexdigest()
    return bounded_name(name, f"{component}-{digest[:10]}")


def _reuse_job(
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
    env = _output_env(spec, config)
    if source_access:
        env += _source_env(spec)
        src_volumes, src_mounts = _source_volume(spec)
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
    container = _container(
        component,
        spec.converter.image or config.converter_image,
        spec.converter.image_pull_policy or config.image_pull_policy,
        args,
        env,
        _verify_resources(spec) if verifies else copy.deepcopy(REUSE_RESOURCES),
        mounts,
    )
    job = reuse_job_name(name, uid, component, spec_hash, *extra)
    service_account = spec.converter.service_account_name or config.job_service_account
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(name, namespace, uid, job, lbl, spec_hash),
        "spec": {
            "backoffLimit": 2,
            "activeDeadlineSeconds": REUSE_DEADLINE_SECONDS,
            "ttlSecondsAfterFinished": REUSE_TTL_SECONDS,
            "podFailurePolicy": _fail_fast(component),
            "template": {
                "metadata": {"labels": lbl},
                "spec": _pod_spec(service_account, container, volumes),
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
            "cpu": REUSE_RESOURCES["requests"]["cpu"],
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
    return _reuse_job(
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
    return _reuse_job(
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
    return _reuse_job(
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
    return _reuse_job(
        name, namespace, uid, spec, config, "withdraw", args, expect_manifest_sha256,
        *(("listed",) if delete_listed else ()),
    )  # fmt: skip
