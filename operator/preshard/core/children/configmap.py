"""The serving ConfigMap (the serving hand-off's arguments for a Deployment) and, built
once with it, ``status.serving``'s source (:mod:`preshard.core.serving`)."""

from __future__ import annotations

from typing import Any

from preshard.core.children.credentials import output_endpoint
from preshard.core.children.pod import engine, owner_reference
from preshard.core.config import OperatorConfig
from preshard.core.naming import labels, serving_configmap_name
from preshard.core.serving import ServingInfo, configmap_data, serving_info
from preshard.core.spec import CheckpointSpec


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
