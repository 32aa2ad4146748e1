"""The purge Job (deletionPolicy: Delete): deletes what its owner published, manifest
first."""

from __future__ import annotations

from typing import Any

from preshard.core.children.credentials import output_env
from preshard.core.children.pod import (
    accelerator,
    job_metadata,
    job_service_account,
    owner_arg,
    restricted_container,
    restricted_pod_spec,
)
from preshard.core.config import OperatorConfig
from preshard.core.contract import TERMINATION_LOG
from preshard.core.naming import (
    labels,
    purge_job_name,
)
from preshard.core.spec import CheckpointSpec


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
    container = restricted_container(
        "purge",
        # The operator's own image, whatever spec.converter.image says: deleting needs no
        # vLLM, and an image the user picked never runs with the output credentials here.
        config.converter_image
        if accelerator(spec, config) == "gpu"
        else config.converter_cpu_image,
        config.image_pull_policy,
        ["purge", "--output", str(spec.output.parsed), "--owner", owner_arg(name, namespace, uid)],
        [
            *output_env(spec, config),
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
        "metadata": job_metadata(
            name, namespace, uid, purge_job_name(name, spec_hash), lbl, spec_hash, owned=False
        ),
        "spec": {
            "backoffLimit": 3,
            "activeDeadlineSeconds": 3600,
            "ttlSecondsAfterFinished": 600,
            "template": {
                "metadata": {"labels": lbl},
                "spec": restricted_pod_spec(
                    job_service_account(namespace, spec, config), container, volumes
                ),
            },
        },
    }
