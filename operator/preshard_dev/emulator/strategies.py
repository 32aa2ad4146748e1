"""What the built-in kinds' REST strategies do to an object the emulator stores:
the status PrepareForCreate sets (a Pod's QoS class from its resource quantities, a
Job's empty status, a Namespace's phase) and a Secret's write-only ``stringData``."""

from __future__ import annotations

import re
from typing import Any

from preshard_dev.emulator.errors import ApiError
from preshard_dev.emulator.resources import ResourceType

_QUANTITY_RE = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)([a-zA-Z]*)$")
_QUANTITY_SUFFIX = {
    "n": 10**-9,
    "u": 10**-6,
    "m": 10**-3,
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}


def parse_quantity(value: Any) -> float:
    """A resource.Quantity ("500m", "1Gi", 2) as a number (enough to compare)."""
    m = _QUANTITY_RE.match(str(value).strip())
    if not m or m[2] not in _QUANTITY_SUFFIX:
        raise ApiError(
            400, "BadRequest", f"quantities must match the regular expression: {value!r}"
        )
    return float(m[1]) * _QUANTITY_SUFFIX[m[2]]


def pod_qos_class(pod: dict[str, Any]) -> str:
    """qos.GetPodQOS over cpu and memory (requests default to limits, as the API's
    defaulting does): BestEffort without any, Guaranteed when every container has equal
    cpu and memory requests and limits, Burstable otherwise."""
    spec = pod.get("spec") or {}
    requests: dict[str, float] = {}
    limits: dict[str, float] = {}
    guaranteed = True
    for c in (spec.get("initContainers") or []) + (spec.get("containers") or []):
        res = (c or {}).get("resources") or {}
        lim = {k: parse_quantity(v) for k, v in (res.get("limits") or {}).items()}
        req = {k: parse_quantity(v) for k, v in (res.get("requests") or {}).items()}
        req = {**lim, **req}
        for name in ("cpu", "memory"):
            if req.get(name):
                requests[name] = requests.get(name, 0) + req[name]
            if lim.get(name):
                limits[name] = limits.get(name, 0) + lim[name]
        if not (lim.get("cpu") and lim.get("memory")):
            guaranteed = False
    if not requests and not limits:
        return "BestEffort"
    if guaranteed and requests == limits:
        return "Guaranteed"
    return "Burstable"


def initial_status(rt: ResourceType, obj: dict[str, Any]) -> dict[str, Any] | None:
    """The status PrepareForCreate sets (whatever the client sent is dropped)."""
    if rt.key == ("", "pods"):
        return {"phase": "Pending", "qosClass": pod_qos_class(obj)}
    if rt.key == ("batch", "jobs"):
        return {}
    if rt.key == ("", "namespaces"):
        return {"phase": "Active"}
    return None  # custom resources: no status until written through /status
