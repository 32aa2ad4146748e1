"""The serving hand-off of a published checkpoint: the ``<name>-serving`` ConfigMap and
``status.serving``, built once (core.children.configmap.build_serving) for every step
that publishes (a conversion, an adopt, a copy)."""

from __future__ import annotations

from typing import Any

from preshard.core.children.configmap import build_serving
from preshard.core.spec import CheckpointSpec
from preshard.service.context import Service


def apply_serving(
    svc: Service, name: str, ns: str, uid: str, spec: CheckpointSpec, artifact: dict[str, Any]
) -> dict[str, Any] | None:
    """Write the ConfigMap (only one this resource owns) and return ``status.serving``;
    None when a ConfigMap of that name belongs to something else (nothing written)."""
    info, cm = build_serving(name, ns, uid, artifact, spec, svc.config)
    if not svc.api.apply_configmap(cm, uid):
        return None
    return info.status(cm["metadata"]["name"])
