"""A Kubernetes API emulator on 127.0.0.1 for tests, the demo and benchmarks (dev only).

Why not plain kmock: DESIGN.md lists what kmock 0.8 lacks (uid/resourceVersion/
generation, namespace on POST, resourceVersion on watches, 409/422 status codes, label
selectors, PUT, namespaces). A subclass would have had to replace all of its object
handling, so this emulator implements the API semantics the operator and kubectl rely on
directly on aiohttp, and keeps them small and explicit. It is checked against the
behaviour of a real API server by ``tests/integration/test_emulator.py``.

What is emulated:

* discovery (/version, /api, /apis, group versions) for the built-in kinds preshard uses
  and for every CRD created through ``apiextensions.k8s.io/v1``;
* CRUD with uid, a global resourceVersion, creationTimestamp and namespaces from the URL;
  ``metadata.generation`` for the kinds that track it (Pods, Jobs, CRDs, custom
  resources: 1 on create, +1 per spec change, +1 once when a deletion with finalizers
  sets deletionTimestamp), none for ConfigMaps, Secrets, Namespaces and the like;
* ``Status`` errors worded and structured as apimachinery's (``configmaps "x" not found``,
  ``jobs.batch "x" already exists``, ``Operation cannot be fulfilled on ...``,
  ``Kind.group "x" is invalid: spec.output: Required value`` with causes); injected
  faults carry their reason (429 TooManyRequests with Retry-After, 503
  ServiceUnavailable, ...);
* PUT with resourceVersion preconditions (409); PUT without one is refused (422) for the
  kinds whose strategy refuses unconditional updates (custom resources, CRDs, Leases);
* PATCH: JSON patch, merge patch, and strategic merge patch for built-in kinds, merging
  by ``patchMergeKey`` for the fields those kinds carry (see ``SMP_FIELDS``: containers,
  env, volumes, volumeMounts, ports, conditions, ownerReferences, finalizers, ...) with
  the ``$patch``/``$retainKeys``/``$deleteFromPrimitiveList``/``$setElementOrder``
  directives and the server's list order; custom resources refuse strategic merge
  (415, as ``kubectl patch`` without ``--type=merge`` shows), as does any unknown type;
* the ``status`` subresource: create drops the status sent for kinds that have one
  (Pods get ``Pending`` and their QoS class, Jobs ``{}``, Namespaces ``Active``), the main
  endpoint ignores status, ``/status`` writes status only;
* CRD structural schemas on every write, the status subresource included: pruning of
  unknown fields, defaulting, OpenAPI validation, ``x-kubernetes-list-type`` map/set
  duplicates, CEL ``x-kubernetes-validations`` (transition rules included) through
  cel-python; ``fieldValidation=Strict`` refuses unknown fields (400);
* DELETE with finalizers (deletionTimestamp), propagationPolicy Foreground/Background
  cascade through ownerReferences (the garbage collector, run at once), Orphan (the
  dependents lose the owner's reference); batch/v1 Jobs default to Orphan with the API
  server's warning; ``orphanDependents`` is honoured;
* LIST and WATCH with label/field selectors, watches resuming from a resourceVersion
  (410 Gone when it is too old), bookmarks, timeoutSeconds; boolean query parameters
  (``watch``, ``allowWatchBookmarks``) read as the API server reads them (anything but
  ``0``/``false``, so the Python client's ``watch=True`` works);
* ``application/json;as=Table`` for kubectl (CRD printer columns);
* pod logs (``GET .../pods/NAME/log?tailLines=N``) fed through a non-standard
  ``POST /emulator/v1/namespaces/NS/pods/NAME/log``;
* request counters (``GET /emulator/stats``) and fault injection
  (``POST /emulator/faults`` with verb, resource, code, count, message, retryAfter).

What it does not do: authentication, authorization, admission webhooks, priority and
fairness (429 only when injected); server-side apply (``application/apply-patch+yaml``
is applied as a merge patch: no managedFields, no create on apply); the defaulting and
validation of built-in kinds (a Pod or Job is stored as sent, without imagePullPolicy,
Job selectors, ...); strategic merge metadata beyond the fields listed in ``SMP_FIELDS``
(other lists are replaced, maps merged); schema ``format`` checks and validation
ratcheting; ``fieldValidation=Warn`` warnings; paging (``limit``/``continue`` are
ignored) and watch-list (``sendInitialEvents``); graceful deletion (a Pod without
finalizers goes at once), Terminating namespaces (deleting one leaves its objects),
collection of dangling ownerReferences, and the ``orphan``/``foregroundDeletion``
finalizers as visible steps (foregroundDeletion is added only while dependents exist);
metadata changes through ``pods/status`` and ``jobs/status`` are ignored (a real server
applies some); DELETE returns the object, where a real server answers a ``Status`` for
most built-in kinds; real scheduling or controllers (the Job runner in
``preshard_dev.jobrunner`` plays the Job controller and the kubelet). And protobuf:
kubectl sends protobuf bodies for built-in kinds, so ``kubectl create configmap`` is
refused (415) while ``kubectl apply --validate=false -f`` of custom resources,
``get``/``get -w``/``describe``/``patch --type=merge``/``delete`` work. kubectl's
client-side schema validation and ``explain`` need more of the OpenAPI document than the
emulator serves: use ``--validate=false`` (the server still validates the schema and the
CEL rules).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import copy
import datetime as dt
import json
import random
import re
import sys
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

# ---------------------------------------------------------------------------- resources


GENERATE_NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


@dataclass
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    subresources: tuple[str, ...] = ()
    short_names: tuple[str, ...] = ()
    singular: str = ""
    categories: tuple[str, ...] = ()
    printer_columns: list[dict[str, Any]] = field(default_factory=list)
    schema: dict[str, Any] | None = None
    # served through a CRD (a custom resource): no strategic merge patch, no PUT without
    # a resourceVersion (customResourceStrategy)
    custom: bool = False
    # metadata.generation is kept (set to 1 on create, bumped by spec changes and by the
    # first deletion with finalizers); ConfigMaps, Secrets and the like have none
    generation: bool = False
    # AllowUnconditionalUpdate: PUT without metadata.resourceVersion
    unconditional_update: bool = True

    @property
    def key(self) -> tuple[str, str]:
        return (self.group, self.plural)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def has_status(self) -> bool:
        return "status" in self.subresources

    @property
    def qualified(self) -> str:
        """schema.GroupResource.String(): ``configmaps``, ``jobs.batch``."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def group_kind(self) -> str:
        """schema.GroupKind.String(): ``ConfigMap``, ``ShardedCheckpoint.preshard.io``."""
        return f"{self.kind}.{self.group}" if self.group else self.kind

    def _details(self, name: str) -> dict[str, Any]:
        details = {"name": name, "group": self.group, "kind": self.plural}
        return {k: v for k, v in details.items() if v}  # omitempty

    def not_found(self, name: str) -> ApiError:
        """apierrors.NewNotFound."""
        return ApiError(
            404, "NotFound", f'{self.qualified} "{name}" not found', self._details(name)
        )

    def already_exists(self, name: str) -> ApiError:
        """apierrors.NewAlreadyExists."""
        return ApiError(
            409, "AlreadyExists", f'{self.qualified} "{name}" already exists', self._details(name)
        )

    def conflict(self, name: str) -> ApiError:
        """apierrors.NewConflict for a stale resourceVersion (storage precondition)."""
        return ApiError(
            409,
            "Conflict",
            f'Operation cannot be fulfilled on {self.qualified} "{name}": the object has been '
            "modified; please apply your changes to the latest version and try again",
            self._details(name),
        )


BUILTIN = [
    ResourceType(
        "",
        "v1",
        "namespaces",
        "Namespace",
        namespaced=False,
        subresources=("status",),
        short_names=("ns",),
    ),
    # Pods have metadata.generation since Kubernetes 1.33 (podStrategy.PrepareForCreate)
    ResourceType(
        "",
        "v1",
        "pods",
        "Pod",
        subresources=("status", "log"),
        short_names=("po",),
        generation=True,
    ),
    ResourceType("", "v1", "configmaps", "ConfigMap", short_names=("cm",)),
    ResourceType("", "v1", "secrets", "Secret"),
    ResourceType("", "v1", "serviceaccounts", "ServiceAccount", short_names=("sa",)),
    ResourceType("", "v1", "events", "Event", short_names=("ev",)),
    ResourceType("batch", "v1", "jobs", "Job", subresources=("status",), generation=True),
    ResourceType("events.k8s.io", "v1", "events", "Event", short_names=("ev",)),
    ResourceType("coordination.k8s.io", "v1", "leases", "Lease", unconditional_update=False),
    ResourceType(
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        namespaced=False,
        subresources=("status",),
        short_names=("crd", "crds"),
        generation=True,
        unconditional_update=False,
    ),
]
VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]


class ApiError(Exception):
    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}
        self.headers = headers or {}

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "details": self.details,
            "code": self.code,
        }
        if not self.details:
            del out["details"]  # omitempty, as the API server writes it
        return out


# metav1.StatusReason of each HTTP status code, as apimachinery's errors package sets it
# (NewBadRequest, NewForbidden, NewTooManyRequests, ...). Unknown codes get "" (Unknown).
STATUS_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    406: "NotAcceptable",
    409: "Conflict",
    410: "Expired",
    413: "RequestEntityTooLarge",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


def query_bool(value: str | None) -> bool:
    """A boolean query parameter (watch, allowWatchBookmarks) as the API server reads it
    (apimachinery ``runtime.Convert_Slice_string_To_bool``): absent, ``0`` or ``false`` in
    any case is false; anything else, the empty string included, is true. The Python
    client sends ``watch=True``, kubectl and kopf ``watch=true`` or ``1``."""
    if value is None:
        return False
    return not (value == "0" or value.lower() == "false")


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------- selectors

_SEL_RE = re.compile(
    r"\s*(?P<key>!?[A-Za-z0-9_./-]+)\s*(?:(?P<op>==|!=|=|\s+in\s+|\s+notin\s+)\s*(?P<val>\([^)]*\)|[A-Za-z0-9_./-]*))?\s*"
)


def parse_label_selector(sel: str | None) -> list[tuple[str, str, set[str]]]:
    """Equality- and set-based selectors: a=b, a==b, a!=b, a in (x,y), a notin (x), a, !a."""
    out: list[tuple[str, str, set[str]]] = []
    if not sel:
        return out
    parts: list[str] = []
    depth, cur = 0, ""
    for ch in sel:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    for part in parts:
        if not part.strip():
            continue
        m = _SEL_RE.fullmatch(part)
        if not m:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {part!r}")
        key, op, val = m["key"], (m["op"] or "").strip(), m["val"] or ""
        if key.startswith("!"):
            out.append((key[1:], "!exists", set()))
        elif not op:
            out.append((key, "exists", set()))
        elif op in ("in", "notin"):
            out.append((key, op, {v.strip() for v in val.strip("()").split(",") if v.strip()}))
        else:
            out.append((key, "!=" if op == "!=" else "=", {val}))
    return out


def match_labels(labels: dict[str, str], reqs: list[tuple[str, str, set[str]]]) -> bool:
    for key, op, vals in reqs:
        has = key in labels
        v = labels.get(key)
        if (
            (op == "exists" and not has)
            or (op == "!exists" and has)
            or (op in ("=", "in") and v not in vals)
            or (op in ("!=", "notin") and has and v in vals)
        ):
            return False
    return True


def match_fields(obj: dict[str, Any], sel: str | None) -> bool:
    if not sel:
        return True
    for part in sel.split(","):
        if not part.strip():
            continue
        neg = "!=" in part
        key, _, val = part.partition("!=" if neg else "=")
        val = val.lstrip("=")
        cur: Any = obj
        for seg in key.strip().split("."):
            cur = cur.get(seg) if isinstance(cur, dict) else None
        if (str(cur) == val) == neg:
            return False
    return True


# ---------------------------------------------------------------------------- patching


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            result.pop(k, None)
        else:
            result[k] = merge_patch(result.get(k), v)
    return result


def _ptr(path: str) -> list[str]:
    if path == "":
        return []
    return [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]


def json_patch(doc: Any, ops: list[dict[str, Any]]) -> Any:
    """RFC 6902: add, remove, replace, test, copy, move."""
    doc = copy.deepcopy(doc)
    for op in ops:
        kind, path = op.get("op"), _ptr(op.get("path", ""))
        if kind in ("copy", "move"):
            src = _ptr(op.get("from", ""))
            value = _get(doc, src)
            if kind == "move":
                _remove(doc, src)
            doc = _add(doc, path, copy.deepcopy(value))
        elif kind == "add":
            doc = _add(doc, path, op.get("value"))
        elif kind == "remove":
            _remove(doc, path)
        elif kind == "replace":
            _get(doc, path)
            _remove(doc, path)
            doc = _add(doc, path, op.get("value"))
        elif kind == "test":
            if _get(doc, path) != op.get("value"):
                raise ApiError(422, "Invalid", f"test operation failed at {op.get('path')}")
        else:
            raise ApiError(400, "BadRequest", f"unknown JSON patch op {kind!r}")
    return doc


def _get(doc: Any, path: list[str]) -> Any:
    cur = doc
    for p in path:
        try:
            cur = cur[int(p)] if isinstance(cur, list) else cur[p]
        except (KeyError, IndexError, ValueError, TypeError):
            raise ApiError(422, "Invalid", f"path /{'/'.join(path)} does not exist") from None
    return cur


def _remove(doc: Any, path: list[str]) -> None:
    parent = _get(doc, path[:-1])
    try:
        if isinstance(parent, list):
            parent.pop(int(path[-1]))
        else:
            del parent[path[-1]]
    except (KeyError, IndexError, ValueError):
        raise ApiError(422, "Invalid", f"path /{'/'.join(path)} does not exist") from None


def _add(doc: Any, path: list[str], value: Any) -> Any:
    if not path:
        return value
    parent = _get(doc, path[:-1])
    last = path[-1]
    if isinstance(parent, list):
        if last == "-":
            parent.append(value)
        else:
            parent.insert(int(last), value)
    elif isinstance(parent, dict):
        parent[last] = value
    else:
        raise ApiError(422, "Invalid", f"cannot add at /{'/'.join(path)}")
    return doc


# Strategic merge patch (application/strategic-merge-patch+json), built-in kinds only.
#
# The API server merges by the ``patchStrategy``/``patchMergeKey`` struct tags of the Go
# types (k8s.io/api); only the fields of the kinds the emulator serves that carry such a
# tag are listed here (everything else: maps merge, lists are replaced, as in a JSON merge
# patch). The algorithm follows apimachinery's strategicpatch.mergeMap / mergeSlice:
# entries of a merge list are matched by their key and merged, new ones are added,
# ``{"$patch": "delete", key: ...}`` removes one, ``{"$patch": "replace"}`` replaces the
# list; lists of scalars (finalizers) are merged as sets; ``$patch: replace|delete`` on a
# map, ``$retainKeys``, ``$deleteFromPrimitiveList/<field>`` and ``$setElementOrder/<field>``
# are honoured. The resulting order is the server's (normalizeElementOrder): the items the
# patch names keep the patch's order, the others their live order, woven together by their
# live positions; an item new to the list goes before the unnamed items still pending at
# its turn (patching [a, b] with [c] gives [c, a, b], with [b, c] gives [a, b, c]).
# Note that an empty list in a strategic patch of a merge list changes nothing: to clear
# ``metadata.finalizers`` send ``null``, a merge patch or a JSON patch.


@dataclass(frozen=True)
class PatchField:
    strategy: str = ""  # "merge" or "" (replace lists, merge maps)
    key: str = ""  # patchMergeKey of a list of objects
    sub: dict[str, PatchField] | None = None  # the fields of the value (or list element)


def _merge_list(key: str, sub: dict[str, PatchField] | None = None) -> PatchField:
    return PatchField("merge", key, sub)


OBJECT_META_PATCH = {
    "finalizers": PatchField("merge"),  # a set of strings
    "ownerReferences": _merge_list("uid"),
}
CONTAINER_PATCH = {
    "ports": _merge_list("containerPort"),
    "env": _merge_list("name"),
    "volumeMounts": _merge_list("mountPath"),
    "volumeDevices": _merge_list("devicePath"),
}
POD_SPEC_PATCH = {
    "volumes": _merge_list("name"),  # merge,retainKeys
    "initContainers": _merge_list("name", CONTAINER_PATCH),
    "containers": _merge_list("name", CONTAINER_PATCH),
    "ephemeralContainers": _merge_list("name", CONTAINER_PATCH),
    "imagePullSecrets": _merge_list("name"),
    "hostAliases": _merge_list("ip"),
    "topologySpreadConstraints": _merge_list("topologyKey"),
    "schedulingGates": _merge_list("name"),
    "resourceClaims": _merge_list("name"),
}
POD_STATUS_PATCH = {
    "conditions": _merge_list("type"),
    "podIPs": _merge_list("ip"),
    "hostIPs": _merge_list("ip"),
    "resourceClaimStatuses": _merge_list("name"),
    # containerStatuses has no patch strategy: replaced as a whole
}
POD_TEMPLATE_PATCH = {
    "metadata": PatchField(sub=OBJECT_META_PATCH),
    "spec": PatchField(sub=POD_SPEC_PATCH),
}
SMP_FIELDS: dict[tuple[str, str], dict[str, PatchField]] = {
    ("", "pods"): {
        "spec": PatchField(sub=POD_SPEC_PATCH),
        "status": PatchField(sub=POD_STATUS_PATCH),
    },
    ("batch", "jobs"): {
        "spec": PatchField(sub={"template": PatchField(sub=POD_TEMPLATE_PATCH)}),
        "status": PatchField(sub={"conditions": _merge_list("type")}),
    },
    ("", "namespaces"): {"status": PatchField(sub={"conditions": _merge_list("type")})},
    ("", "serviceaccounts"): {"secrets": _merge_list("name")},
}
PATCH_TYPES = [
    "application/json-patch+json",
    "application/merge-patch+json",
    "application/strategic-merge-patch+json",
    "application/apply-patch+yaml",
]
# custom resources: no strategic merge patch (there are no Go struct tags to merge by)
PATCH_TYPES_CUSTOM = [t for t in PATCH_TYPES if "strategic" not in t]


def smp_meta(rt: ResourceType) -> dict[str, PatchField]:
    return {"metadata": PatchField(sub=OBJECT_META_PATCH), **SMP_FIELDS.get(rt.key, {})}


def _smp_error(message: str, code: int = 400) -> ApiError:
    return ApiError(code, STATUS_REASONS[code], message)


def _strip_patch(value: Any) -> Any:
    """A patch value taken as it is: nulls dropped (IgnoreUnmatchedNulls) and leftover
    ``$`` directives dropped (the typed decoding of a built-in kind ignores them)."""
    if isinstance(value, dict):
        return {
            k: _strip_patch(v) for k, v in value.items() if v is not None and not k.startswith("$")
        }
    if isinstance(value, list):
        return [_strip_patch(v) for v in value]
    return value


def strategic_merge_patch(
    original: dict[str, Any], patch: dict[str, Any], fields: dict[str, PatchField]
) -> dict[str, Any]:
    return _smp_map(copy.deepcopy(original), copy.deepcopy(patch), fields)


def _smp_map(
    original: dict[str, Any], patch: dict[str, Any], fields: dict[str, PatchField]
) -> dict[str, Any]:
    directive = patch.pop("$patch", None)
    if directive == "replace":
        return dict(_strip_patch(patch))
    if directive == "delete":
        return {}
    if directive is not None:
        raise _smp_error(f"Unknown patch type: {directive} in map: {patch}", 500)
    retain = patch.pop("$retainKeys", None)
    if retain is not None:
        if not isinstance(retain, list):
            raise _smp_error("invalid patch: the $retainKeys directive must be a list")
        for k, v in patch.items():
            if v is not None and not k.startswith("$") and k not in retain:
                raise _smp_error("invalid patch: all fields must be present in $retainKeys")
        for k in [k for k in original if k not in retain]:
            del original[k]
    for order_key in [k for k in patch if k.startswith("$setElementOrder/")]:
        order = patch.pop(order_key)
        name = order_key.split("/", 1)[1]
        if not isinstance(order, list):
            raise _smp_error("invalid patch: $setElementOrder must be a list")
        spec = fields.get(name, PatchField())
        orig_list, patch_list = original.get(name), patch.pop(name, None)
        if not isinstance(orig_list, list | type(None)) or not isinstance(
            patch_list, list | type(None)
        ):
            raise _smp_error(f"invalid patch: {name} is not a list")
        if orig_list is None and patch_list is None:
            continue
        if patch_list is None:
            merged = orig_list or []
        elif orig_list is None:
            merged = _strip_patch(patch_list)
        elif spec.strategy == "merge":
            merged = _smp_list(orig_list, patch_list, spec)
        else:
            merged = _strip_patch(patch_list)
        original[name] = _order_like(merged, order, orig_list or [], spec.key)
    for k, v in patch.items():
        delete_list = k.startswith("$deleteFromPrimitiveList/")
        if delete_list:
            k = k.split("/", 1)[1]
        elif k.startswith("$"):
            raise _smp_error(f"unknown directive {k!r} in the strategic merge patch")
        if v is None:
            original.pop(k, None)
            continue
        if k not in original:
            if not delete_list:
                original[k] = _strip_patch(v)
            continue
        cur = original[k]
        if delete_list:
            if isinstance(cur, list) and isinstance(v, list):
                original[k] = [x for x in cur if x not in v]
            continue
        spec = fields.get(k, PatchField())
        if isinstance(cur, dict) and isinstance(v, dict):
            original[k] = _smp_map(cur, v, spec.sub or {})
        elif isinstance(cur, list) and isinstance(v, list):
            original[k] = _smp_list(cur, v, spec) if spec.strategy == "merge" else _strip_patch(v)
        else:
            original[k] = _strip_patch(v)
    return original


def _keyed(item: Any, key: str) -> Any:
    return item.get(key) if key and isinstance(item, dict) else (None if key else item)


def _merge_sorted(left: list[Any], right: list[Any], order: list[Any], key: str) -> list[Any]:
    """strategicpatch.mergeSortedSlice: server-only items (left) are woven into the patch
    items (right) by their place in the live list; an item the live list does not have
    goes first."""

    def index(item: Any) -> int:
        want = _keyed(item, key)
        return next((i for i, o in enumerate(order) if _keyed(o, key) == want), -1)

    out: list[Any] = []
    i = j = 0
    while i < len(left) or j < len(right):
        if i >= len(left):
            out.append(right[j])
            j += 1
        elif j >= len(right):
            out.append(left[i])
            i += 1
        else:
            li, ri = index(left[i]), index(right[j])
            if li >= 0 and ri >= 0 and li < ri:
                out.append(left[i])
                i += 1
            else:
                out.append(right[j])
                j += 1
    return out


def _order_like(merged: list[Any], patch_order: list[Any], live: list[Any], key: str) -> list[Any]:
    """strategicpatch.normalizeElementOrder: the items named by ``patch_order`` in its
    order, the others in their live order, woven together."""
    named = [_keyed(p, key) for p in patch_order]
    in_patch = [m for m in merged if _keyed(m, key) in named]
    in_patch.sort(key=lambda m: named.index(_keyed(m, key)))
    server_only = [m for m in merged if _keyed(m, key) not in named]
    return _merge_sorted(server_only, in_patch, live, key)


def _smp_list(original: list[Any], patch: list[Any], spec: PatchField) -> list[Any]:
    if not original and not patch:
        return original
    items = original + patch
    if any(isinstance(x, list) for x in items):
        raise _smp_error("lists of lists are not supported", 422)
    if not any(isinstance(x, dict) for x in items):  # a set of scalars
        merged: list[Any] = []
        for x in items:
            if x not in merged:
                merged.append(x)
        return _order_like(merged, patch, original, "")
    if not all(isinstance(x, dict) for x in items):
        raise _smp_error(f"list element types are not identical: {items}", 500)
    key = spec.key
    if not key:
        raise _smp_error("cannot merge lists without merge key", 500)
    plain: list[dict[str, Any]] = []
    for item in patch:
        directive = item.get("$patch")
        if directive is None:
            plain.append(item)
        elif directive == "delete":
            if key not in item:
                raise _smp_error(f"map: {item} does not contain declared merge key: {key}", 500)
            original = [o for o in original if o.get(key) != item[key]]
        elif directive == "replace":
            return [_strip_patch(p) for p in plain] + [
                _strip_patch(p) for p in patch[patch.index(item) + 1 :] if "$patch" not in p
            ]
        else:
            raise _smp_error(f"Unknown patch type: {directive} in list", 500)
    merged = list(original)
    for item in plain:
        if key not in item:
            raise _smp_error(f"map: {item} does not contain declared merge key: {key}", 500)
        at = next((i for i, o in enumerate(merged) if o.get(key) == item[key]), None)
        if at is None:
            merged.append(_strip_patch(item))
        else:
            merged[at] = _smp_map(merged[at], item, spec.sub or {})
    return _order_like(merged, plain, original, key)


# ---------------------------------------------------------------------------- built-in strategies

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


# ---------------------------------------------------------------------------- schemas


def _prune_and_default(value: Any, schema: dict[str, Any], path: str, unknown: list[str]) -> Any:
    """Structural pruning (unknown fields dropped, recorded) and defaulting, like the API."""
    if not isinstance(schema, dict):
        return value
    if isinstance(value, dict) and schema.get("type") == "object":
        props = schema.get("properties")
        if props is not None and not schema.get("x-kubernetes-preserve-unknown-fields"):
            for k in list(value):
                if k not in props:
                    unknown.append(f"{path}.{k}")
                    del value[k]
        for k, sub in (props or {}).items():
            if k not in value and isinstance(sub, dict) and "default" in sub:
                value[k] = copy.deepcopy(sub["default"])
            if k in value:
                value[k] = _prune_and_default(value[k], sub, f"{path}.{k}", unknown)
        addl = schema.get("additionalProperties")
        if isinstance(addl, dict) and props is None:
            for k in list(value):
                value[k] = _prune_and_default(value[k], addl, f"{path}.{k}", unknown)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [
            _prune_and_default(v, schema["items"], f"{path}[{i}]", unknown)
            for i, v in enumerate(value)
        ]
    return value


def _to_jsonschema(schema: Any) -> Any:
    """Kubernetes structural schema -> JSON Schema (nullable, int-or-string)."""
    if isinstance(schema, list):
        return [_to_jsonschema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _to_jsonschema(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.pop("anyOf", None)
        out["type"] = ["integer", "string"]
    if schema.get("nullable") and "type" in out:
        t = out["type"]
        out["type"] = [*t, "null"] if isinstance(t, list) else [t, "null"]
    out.pop("nullable", None)
    return out


def _cel_rules(
    schema: dict[str, Any], path: tuple[str, ...] = ()
) -> Iterable[tuple[tuple[str, ...], dict[str, Any]]]:
    for rule in schema.get("x-kubernetes-validations") or []:
        yield path, rule
    for k, sub in (schema.get("properties") or {}).items():
        if isinstance(sub, dict):
            yield from _cel_rules(sub, (*path, k))


def _at(obj: Any, path: tuple[str, ...]) -> tuple[bool, Any]:
    cur = obj
    for p in path:
        if not isinstance(cur, dict) or p not in cur:
            return False, None
        cur = cur[p]
    return True, cur


def field_path(parts: Iterable[Any]) -> str:
    """A field path as the API server prints it: ``spec.items[0].name``."""
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def go_value(value: Any) -> str:
    """A bad value as field.Error prints it (%q for strings, %v for numbers and bools)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    return json.dumps(value, separators=(",", ":"))


FieldError = tuple[str, str, str]  # (field, cause reason, message as field.Error.ErrorBody)


def invalid(
    rt: ResourceType, name: str, errors: list[FieldError], qualified: bool = False
) -> ApiError:
    """apierrors.NewInvalid: ``Kind.group "name" is invalid: field: message`` (several
    errors in brackets, comma-separated), one cause per error. ``qualified`` names the
    resource (``shardedcheckpoints.preshard.io``) instead of the kind, as the storage
    layer's checks do (a PUT without resourceVersion)."""
    gk = rt.qualified if qualified else rt.group_kind
    texts = list(dict.fromkeys(f"{f}: {m}" if f else m for f, _, m in errors))
    agg = texts[0] if len(texts) == 1 else "[" + ", ".join(texts) + "]"
    details: dict[str, Any] = {
        "name": name,
        "group": rt.group,
        "kind": rt.plural if qualified else rt.kind,
        "causes": [{"reason": r, "message": m, "field": f} for f, r, m in errors],
    }
    return ApiError(
        422,
        "Invalid",
        f'{gk} "{name}" is invalid: {agg}',
        {k: v for k, v in details.items() if v},
    )


_TYPE_NAMES = {
    bool: "boolean",
    int: "integer",
    float: "number",
    str: "string",
    list: "array",
    dict: "object",
    type(None): "null",
}


def _schema_error(e: Any) -> list[FieldError]:
    """A jsonschema error as the field errors kube-openapi's validator reports
    (apiextensions' kubeOpenAPIResultToFieldErrors)."""
    path = list(e.absolute_path)
    where = field_path(path) or "<root>"
    v = e.validator
    if v == "required":
        missing = [
            p for p in e.validator_value if p not in (e.instance or {}) and repr(p) in e.message
        ]
        return [(field_path([*path, p]), "FieldValueRequired", "Required value") for p in missing]
    if v == "enum":
        allowed = ", ".join(json.dumps(x) for x in e.validator_value)
        return [
            (
                where,
                "FieldValueNotSupported",
                f"Unsupported value: {go_value(e.instance)}: supported values: {allowed}",
            )
        ]
    if v == "type":
        types = [e.validator_value] if isinstance(e.validator_value, str) else e.validator_value
        want = ",".join(t for t in types if t != "null")  # nullable is not a type to ask for
        got = _TYPE_NAMES.get(type(e.instance), "object")
        return [
            (
                where,
                "FieldValueTypeInvalid",
                f'Invalid value: "{got}": {where} in body must be of type {want}: "{got}"',
            )
        ]
    if v == "maxLength":
        unit = "byte" if e.validator_value == 1 else "bytes"
        return [
            (
                where,
                "FieldValueTooLong",
                f"Too long: may not be more than {e.validator_value} {unit}",
            )
        ]
    if v == "maxItems":
        return [
            (
                where,
                "FieldValueTooMany",
                f"Too many: {len(e.instance)}: must have at most {e.validator_value} items",
            )
        ]
    detail = {
        "minimum": f"should be greater than or equal to {e.validator_value}",
        "maximum": f"should be less than or equal to {e.validator_value}",
        "exclusiveMinimum": f"should be greater than {e.validator_value}",
        "exclusiveMaximum": f"should be less than {e.validator_value}",
        "pattern": f"should match '{e.validator_value}'",
        "minLength": f"should be at least {e.validator_value} chars long",
        "minItems": f"should have at least {e.validator_value} items",
        "uniqueItems": "shouldn't contain duplicates",
        "multipleOf": f"should be a multiple of {e.validator_value}",
    }.get(v, e.message)
    return [
        (
            where,
            "FieldValueInvalid",
            f"Invalid value: {go_value(e.instance)}: {where} in body {detail}",
        )
    ]


def _list_type_errors(value: Any, schema: Any, path: list[Any]) -> list[FieldError]:
    """x-kubernetes-list-type set/map: no duplicate items / map keys (Duplicate value)."""
    out: list[FieldError] = []
    if not isinstance(schema, dict):
        return out
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for k, v in value.items():
            sub = props.get(k, schema.get("additionalProperties"))
            out += _list_type_errors(v, sub, [*path, k])
    elif isinstance(value, list):
        kind = schema.get("x-kubernetes-list-type")
        keys = schema.get("x-kubernetes-list-map-keys") or []
        seen: list[Any] = []
        for i, item in enumerate(value):
            ident: Any = item
            if kind == "map" and isinstance(item, dict):
                ident = {k: item.get(k) for k in keys}
            if kind in ("set", "map"):
                if ident in seen:
                    shown = (
                        "map[string]interface {}" + json.dumps(ident, separators=(",", ":"))
                        if kind == "map"
                        else go_value(ident)
                    )
                    out.append(
                        (field_path([*path, i]), "FieldValueDuplicate", f"Duplicate value: {shown}")
                    )
                seen.append(ident)
            out += _list_type_errors(item, schema.get("items"), [*path, i])
    return out


class CRDValidator:
    def __init__(self, schema: dict[str, Any], rt: ResourceType | None = None):
        import jsonschema

        self.schema = schema
        self.rt = rt
        self.validator = jsonschema.Draft7Validator(_to_jsonschema(schema))
        self.rules = list(_cel_rules(schema))
        self._programs: dict[str, Any] = {}

    def admit(
        self, obj: dict[str, Any], old: dict[str, Any] | None, strict: bool
    ) -> dict[str, Any]:
        obj = copy.deepcopy(obj)
        meta = obj.pop("metadata", {})
        unknown: list[str] = []
        obj = _prune_and_default(obj, self.schema, "", unknown)
        obj["metadata"] = meta
        kind, version = obj.get("kind"), str(obj.get("apiVersion", "")).rpartition("/")[2]
        if strict and unknown:
            # the decoder refuses the body (fieldValidation=Strict): 400, not 422
            raise ApiError(
                400,
                "BadRequest",
                f'{kind} in version "{version}" cannot be handled as a {kind}: strict decoding '
                "error: " + ", ".join(f'unknown field "{u.lstrip(".")}"' for u in unknown),
            )
        body = {k: v for k, v in obj.items() if k != "metadata"}
        errors: list[FieldError] = []
        for e in sorted(self.validator.iter_errors(body), key=lambda e: [str(p) for p in e.path]):
            errors += _schema_error(e)
        errors += _list_type_errors(body, self.schema, [])
        if not errors:
            errors = self._check_cel(obj, old)
        if errors:
            rt = self.rt or ResourceType("", "", "", str(kind))
            raise invalid(rt, str(meta.get("name", "")), errors)
        return obj

    def _check_cel(self, obj: dict[str, Any], old: dict[str, Any] | None) -> list[FieldError]:
        if not self.rules:
            return []
        import celpy

        errors: list[FieldError] = []
        for path, rule in self.rules:
            found, value = _at(obj, path)
            if not found:
                continue
            uses_old = "oldSelf" in rule["rule"]
            old_found, old_value = _at(old, path) if old is not None else (False, None)
            if uses_old and not old_found:
                continue  # transition rules apply to updates only
            prog = self._programs.get(rule["rule"])
            if prog is None:
                env = celpy.Environment()
                prog = env.program(env.compile(rule["rule"]))
                self._programs[rule["rule"]] = prog
            activation = {"self": celpy.json_to_cel(value)}
            if uses_old:
                activation["oldSelf"] = celpy.json_to_cel(old_value)
            try:
                ok = bool(prog.evaluate(activation))
            except Exception as exc:  # evaluation error counts as a failed rule, like the API
                ok = False
                rule = {**rule, "message": f"{rule.get('message', rule['rule'])} ({exc})"}
            if not ok:
                # field.Invalid(path, <schema type>, message)
                where = field_path(path) or "<root>"
                got = _TYPE_NAMES.get(type(value), "object")
                msg = rule.get("message") or f"failed rule: {rule['rule']}"
                errors.append((where, "FieldValueInvalid", f'Invalid value: "{got}": {msg}'))
        return errors


# ---------------------------------------------------------------------------- jsonpath (printer columns)


def simple_jsonpath(obj: Any, expr: str) -> Any:
    """The subset of JSONPath printer columns use: .a.b, .a[0], .a[?(@.k=="v")].b"""
    cur: list[Any] = [obj]
    for token in re.findall(
        r"\.([A-Za-z0-9_-]+)|\[(\d+)\]|\[\?\(@\.([A-Za-z0-9_]+)==[\"']([^\"']*)[\"']\)\]", expr
    ):
        key, idx, fkey, fval = token
        nxt: list[Any] = []
        for c in cur:
            if key and isinstance(c, dict) and key in c:
                nxt.append(c[key])
            elif idx and isinstance(c, list) and int(idx) < len(c):
                nxt.append(c[int(idx)])
            elif fkey and isinstance(c, list):
                nxt.extend(i for i in c if isinstance(i, dict) and str(i.get(fkey)) == fval)
        cur = nxt
    if not cur:
        return None
    return cur[0] if len(cur) == 1 else ",".join(str(c) for c in cur)


def _age(ts: str | None) -> str:
    if not ts:
        return "<unknown>"
    try:
        t = dt.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    except ValueError:
        return "<unknown>"
    s = int((dt.datetime.now(dt.UTC) - t).total_seconds())
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    return f"{s // 3600}h"


def to_table(
    rt: ResourceType, objs: list[dict[str, Any]], include_object: bool, rv: str
) -> dict[str, Any]:
    cols: list[dict[str, Any]] = [
        {"name": "Name", "type": "string", "format": "name", "description": "Name", "priority": 0}
    ]
    getters: list[Any] = [lambda o: o["metadata"]["name"]]
    if rt.printer_columns:
        for c in rt.printer_columns:
            cols.append(
                {
                    "name": c["name"],
                    "type": c.get("type", "string"),
                    "format": c.get("format", ""),
                    "description": c.get("description", ""),
                    "priority": c.get("priority", 0),
                }
            )
            if c.get("type") == "date":
                getters.append(lambda o, p=c["jsonPath"]: _age(simple_jsonpath(o, p)))
            else:
                getters.append(lambda o, p=c["jsonPath"]: simple_jsonpath(o, p))
    else:
        if rt.plural == "pods":
            cols.append(
                {"name": "Status", "type": "string", "format": "", "description": "", "priority": 0}
            )
            getters.append(lambda o: (o.get("status") or {}).get("phase", "Pending"))
        if rt.plural == "jobs":
            cols.append(
                {"name": "Status", "type": "string", "format": "", "description": "", "priority": 0}
            )
            getters.append(
                lambda o: next(
                    (
                        c["type"]
                        for c in (o.get("status") or {}).get("conditions") or []
                        if c.get("status") == "True" and c.get("type") in ("Complete", "Failed")
                    ),
                    "Running",
                )
            )
        if rt.plural in ("configmaps", "secrets"):
            cols.append(
                {"name": "Data", "type": "integer", "format": "", "description": "", "priority": 0}
            )
            getters.append(lambda o: len(o.get("data") or {}))
        cols.append(
            {"name": "Age", "type": "string", "format": "", "description": "", "priority": 0}
        )
        getters.append(lambda o: _age(o["metadata"].get("creationTimestamp")))
    rows = []
    for o in objs:
        row: dict[str, Any] = {"cells": [g(o) for g in getters]}
        if include_object:
            row["object"] = o
        else:
            row["object"] = {
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": o["metadata"],
            }
        rows.append(row)
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": rv},
        "columnDefinitions": cols,
        "rows": rows,
    }


# ---------------------------------------------------------------------------- the store


@dataclass
class Fault:
    verb: str
    plural: str
    code: int
    count: int
    message: str = "injected fault"
    retry_after: int | None = None  # seconds; 429 defaults to 1

    def error(self) -> ApiError:
        details: dict[str, Any] = {}
        headers: dict[str, str] = {}
        retry = self.retry_after
        if retry is None and self.code == 429:
            retry = 1
        if retry is not None:
            # NewTooManyRequests / NewServerTimeout: details.retryAfterSeconds and the
            # Retry-After header (client-go and kopf honour it)
            details["retryAfterSeconds"] = retry
            headers["Retry-After"] = str(retry)
        return ApiError(
            self.code, STATUS_REASONS.get(self.code, ""), self.message, details, headers
        )


class Store:
    def __init__(self, history: int = 20000) -> None:
        self.types: dict[tuple[str, str], ResourceType] = {}
        self.objects: dict[tuple[str, str], dict[tuple[str, str], dict[str, Any]]] = {}
        self.rv = 0
        self.events: deque[tuple[int, tuple[str, str], str, dict[str, Any]]] = deque(maxlen=history)
        self.changed = asyncio.Event()
        self.validators: dict[tuple[str, str], CRDValidator] = {}
        self.logs: dict[tuple[str, str], list[str]] = {}
        self.stats: Counter[str] = Counter()
        self.agent_stats: dict[str, Counter[str]] = {}
        self.faults: list[Fault] = []
        for rt in BUILTIN:
            self.add_type(rt)
        for ns in ("default", "kube-system", "kube-public"):
            self._put_raw(
                self.types[("", "namespaces")],
                {
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {"name": ns},
                    "spec": {},
                    "status": {"phase": "Active"},
                },
            )

    def add_type(self, rt: ResourceType) -> None:
        self.types[rt.key] = rt
        self.objects.setdefault(rt.key, {})
        if rt.schema is not None:
            self.validators[rt.key] = CRDValidator(rt.schema, rt)
        else:
            self.validators.pop(rt.key, None)

    def find_type(self, group: str, version: str, plural: str) -> ResourceType:
        rt = self.types.get((group, plural))
        if rt is None or rt.version != version:
            raise ApiError(
                404,
                "NotFound",
                f"the server could not find the requested resource ({group or 'core'}/{version}, {plural})",
            )
        return rt

    def next_rv(self) -> int:
        self.rv += 1
        return self.rv

    def _put_raw(self, rt: ResourceType, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj.setdefault("metadata", {})
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", now_iso())
        meta["resourceVersion"] = str(self.next_rv())
        self.objects[rt.key][(meta.get("namespace", ""), meta["name"])] = obj
        return obj

    async def notify(self, rt: ResourceType, type_: str, obj: dict[str, Any]) -> None:
        self.events.append(
            (int(obj["metadata"]["resourceVersion"]), rt.key, type_, copy.deepcopy(obj))
        )
        # Wake every watcher: each waits on the Event current when it started waiting.
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()

    def check_fault(self, verb: str, plural: str) -> None:
        for f in self.faults:
            if f.count > 0 and f.verb in (verb, "*") and f.plural in (plural, "*"):
                f.count -= 1
                raise f.error()


# ---------------------------------------------------------------------------- the app


class Emulator:
    def __init__(self) -> None:
        self.store = Store()
        self.app = web.Application(client_max_size=64 * 2**20)
        self.app.router.add_route("*", "/{tail:.*}", self.dispatch)

    # -- routing ------------------------------------------------------------------------
    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path.rstrip("/") or "/"
        parts = [p for p in path.split("/") if p]
        try:
            if parts[:1] == ["emulator"]:
                return await self.emulator_endpoint(request, parts[1:])
            if path == "/version":
                return web.json_response(
                    {
                        "major": "1",
                        "minor": "33",
                        "gitVersion": "v1.33.0-preshard-emulator",
                        "platform": "linux/amd64",
                    }
                )
            if path == "/api":
                return web.json_response(
                    {
                        "kind": "APIVersions",
                        "versions": ["v1"],
                        "serverAddressByClientCIDRs": [
                            {"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}
                        ],
                    }
                )
            if path == "/apis":
                return web.json_response(self.group_list())
            if path in ("/healthz", "/readyz", "/livez"):
                return web.Response(text="ok")
            if path == "/openapi/v3":
                return web.json_response(self.openapi_index())
            if parts[:2] == ["openapi", "v3"]:
                return web.json_response(self.openapi_doc("/".join(parts[2:])))
            if "application/vnd.kubernetes.protobuf" in request.headers.get("Content-Type", ""):
                raise ApiError(415, "UnsupportedMediaType", "the emulator speaks JSON only")
            if parts[:1] == ["api"] and len(parts) >= 2:
                group, version, rest = "", parts[1], parts[2:]
            elif parts[:1] == ["apis"] and len(parts) >= 3:
                group, version, rest = parts[1], parts[2], parts[3:]
            elif parts[:1] == ["apis"] and len(parts) == 2:
                return web.json_response(self.group(parts[1]))
            else:
                raise ApiError(
                    404, "NotFound", f"the server could not find the requested resource {path}"
                )
            if not rest:
                return web.json_response(self.resource_list(group, version))
            return await self.resource_request(request, group, version, rest)
        except ApiError as err:
            return web.json_response(err.status(), status=err.code, headers=err.headers)

    # -- discovery ----------------------------------------------------------------------
    def _groups(self) -> dict[str, set[str]]:
        groups: dict[str, set[str]] = {}
        for rt in self.store.types.values():
            if rt.group:
                groups.setdefault(rt.group, set()).add(rt.version)
        return groups

    def group(self, name: str) -> dict[str, Any]:
        versions = self._groups().get(name)
        if not versions:
            raise ApiError(404, "NotFound", f"group {name} not found")
        vs = [{"groupVersion": f"{name}/{v}", "version": v} for v in sorted(versions)]
        return {
            "kind": "APIGroup",
            "apiVersion": "v1",
            "name": name,
            "versions": vs,
            "preferredVersion": vs[0],
        }

    def group_list(self) -> dict[str, Any]:
        return {
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": [self.group(g) for g in sorted(self._groups())],
        }

    def resource_list(self, group: str, version: str) -> dict[str, Any]:
        resources = []
        for rt in self.store.types.values():
            if rt.group != group or rt.version != version:
                continue
            resources.append(
                {
                    "name": rt.plural,
                    "singularName": rt.singular or rt.kind.lower(),
                    "namespaced": rt.namespaced,
                    "kind": rt.kind,
                    "verbs": VERBS,
                    "shortNames": list(rt.short_names),
                    "categories": list(rt.categories),
                }
            )
            for sub in rt.subresources:
                verbs = ["get"] if sub == "log" else ["get", "patch", "update"]
                resources.append(
                    {
                        "name": f"{rt.plural}/{sub}",
                        "singularName": "",
                        "namespaced": rt.namespaced,
                        "kind": "Pod" if sub == "log" else rt.kind,
                        "verbs": verbs,
                    }
                )
        if not resources:
            raise ApiError(404, "NotFound", f"no resources in {group or 'core'}/{version}")
        gv = f"{group}/{version}" if group else version
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": gv,
            "resources": resources,
        }

    # -- OpenAPI v3 (enough for kubectl: validation, explain, server-side field validation) --
    def _gv_paths(self) -> dict[str, tuple[str, str]]:
        out = {}
        for rt in self.store.types.values():
            gvpath = f"apis/{rt.group}/{rt.version}" if rt.group else f"api/{rt.version}"
            out[gvpath] = (rt.group, rt.version)
        return out

    def openapi_index(self) -> dict[str, Any]:
        return {
            "paths": {
                p: {"serverRelativeURL": f"/openapi/v3/{p}?hash=0"}
                for p in sorted(self._gv_paths())
            }
        }

    def openapi_doc(self, gvpath: str) -> dict[str, Any]:
        gv = self._gv_paths().get(gvpath)
        if gv is None:
            raise ApiError(404, "NotFound", f"no OpenAPI document for {gvpath}")
        _group, _version = gv
        schemas: dict[str, Any] = {}
        paths: dict[str, Any] = {}
        params = [
            {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}},
            {"name": "fieldManager", "in": "query", "schema": {"type": "string"}},
            {"name": "dryRun", "in": "query", "schema": {"type": "string"}},
        ]
        for rt in self.store.types.values():
            if (rt.group, rt.version) != gv:
                continue
            name = f"{rt.group or 'core'}.{rt.version}.{rt.kind}"
            schema: dict[str, Any] = (
                copy.deepcopy(rt.schema)
                if rt.schema
                else {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
            )
            props: dict[str, Any] = schema.setdefault("properties", {})
            props.setdefault("apiVersion", {"type": "string"})
            props.setdefault("kind", {"type": "string"})
            props["metadata"] = {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": True,
                "description": "Standard object metadata.",
            }
            schema["x-kubernetes-group-version-kind"] = [
                {"group": rt.group, "version": rt.version, "kind": rt.kind}
            ]
            schemas[name] = schema
            ref = {
                "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}
                }
            }
            base = (
                f"/{gvpath}/namespaces/{{namespace}}/{rt.plural}"
                if rt.namespaced
                else f"/{gvpath}/{rt.plural}"
            )
            paths[base] = {
                "post": {"parameters": params, "requestBody": ref, "responses": {"200": ref}},
                "get": {"responses": {"200": ref}},
            }
            paths[base + "/{name}"] = {
                "put": {"parameters": params, "requestBody": ref, "responses": {"200": ref}},
                "patch": {"parameters": params, "requestBody": ref, "responses": {"200": ref}},
                "get": {"responses": {"200": ref}},
            }
        return {
            "openapi": "3.0.0",
            "info": {"title": "Kubernetes", "version": "v1.33.0"},
            "paths": paths,
            "components": {"schemas": schemas},
        }

    # -- non-standard endpoints ------------------------------------------------------------
    async def emulator_endpoint(self, request: web.Request, parts: list[str]) -> web.StreamResponse:
        if parts == ["stats"]:
            if request.method == "DELETE":
                self.store.stats.clear()
                self.store.agent_stats.clear()
            if request.query.get("by") == "agent":
                return web.json_response({a: dict(c) for a, c in self.store.agent_stats.items()})
            return web.json_response(dict(self.store.stats))
        if parts == ["faults"] and request.method == "POST":
            body = await request.json()
            self.store.faults.append(
                Fault(
                    body.get("verb", "*"),
                    body.get("resource", "*"),
                    int(body.get("code", 500)),
                    int(body.get("count", 1)),
                    body.get("message", "injected fault"),
                    None if body.get("retryAfter") is None else int(body["retryAfter"]),
                )
            )
            return web.json_response({"ok": True})
        # /emulator/v1/namespaces/NS/pods/NAME/log
        if (
            len(parts) == 6
            and parts[0] == "v1"
            and parts[1] == "namespaces"
            and parts[3] == "pods"
            and parts[5] == "log"
            and request.method == "POST"
        ):
            text = await request.text()
            self.store.logs.setdefault((parts[2], parts[4]), []).append(text)
            return web.json_response({"ok": True, "bytes": len(text)})
        raise ApiError(404, "NotFound", f"no emulator endpoint /emulator/{'/'.join(parts)}")

    # -- resources ------------------------------------------------------------------------
    async def resource_request(
        self, request: web.Request, group: str, version: str, rest: list[str]
    ) -> web.StreamResponse:
        namespace: str | None = None
        if rest[0] == "namespaces" and len(rest) >= 3:
            namespace, rest = rest[1], rest[2:]
        plural = rest[0]
        if plural == "namespaces" and namespace is not None and len(rest) == 1:
            # GET /api/v1/namespaces/NAME (namespace itself)
            rest = ["namespaces", namespace]
            namespace = None
        rt = self.store.find_type(group, version, plural)
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        if rt.namespaced is False:
            namespace = None
        method = request.method
        q = request.query
        verb = {
            "GET": "watch" if query_bool(q.get("watch")) else ("get" if name else "list"),
            "POST": "create",
            "PUT": "update",
            "PATCH": "patch",
            "DELETE": "delete",
        }.get(method, method.lower())
        stat = f"{verb} {plural}{'/' + sub if sub else ''}"
        self.store.stats[stat] += 1
        self.store.stats["total"] += 1
        agent = request.headers.get("User-Agent", "").split("/")[0] or "unknown"
        self.store.agent_stats.setdefault(agent, Counter())[stat] += 1
        self.store.check_fault(verb, plural)
        if sub == "log":
            return self.pod_log(namespace or "default", name or "", q)
        if sub is not None and sub not in rt.subresources:
            raise ApiError(404, "NotFound", f"{plural} has no subresource {sub}")
        if verb == "watch":
            return await self.watch(request, rt, namespace, name)
        if verb == "list":
            return self.respond(request, rt, self.list_objects(rt, namespace, q), list_mode=True)
        if verb == "get":
            return self.respond(request, rt, self.get(rt, namespace, name or ""))
        if verb == "create":
            body = await self._json(request)
            return web.json_response(await self.create(rt, namespace, body, q), status=201)
        if verb in ("update", "patch"):
            body = await self._json(request)
            obj = await self.update(
                rt, namespace, name or "", sub, body, method, request.content_type, q
            )
            return web.json_response(obj)
        if verb == "delete":
            body = await self._json(request, optional=True) or {}
            policy = q.get("propagationPolicy") or body.get("propagationPolicy")
            orphan = q.get("orphanDependents", body.get("orphanDependents"))
            if not policy and orphan is not None:  # deprecated DeleteOptions.orphanDependents
                policy = "Orphan" if str(orphan).lower() in ("true", "1") else "Background"
            headers = {}
            if not policy and rt.key == ("batch", "jobs"):
                # batch/v1 Jobs default to orphaning their pods (DefaultGarbageCollectionPolicy)
                policy = "Orphan"
                headers["Warning"] = (
                    '299 - "child pods are preserved by default when jobs are deleted; set '
                    "propagationPolicy=Background to remove them or set propagationPolicy=Orphan "
                    'to suppress this warning"'
                )
            obj = await self.delete(rt, namespace, name or "", policy or "Background")
            return web.json_response(obj, headers=headers)
        raise ApiError(405, "MethodNotAllowed", f"{method} is not supported")

    async def _json(self, request: web.Request, optional: bool = False) -> Any:
        text = await request.text()
        if not text:
            if optional:
                return None
            raise ApiError(400, "BadRequest", "empty request body")
        try:
            return json.loads(text)
        except ValueError:
            try:
                return yaml.safe_load(text)
            except yaml.YAMLError:
                raise ApiError(400, "BadRequest", "request body is not JSON") from None

    def respond(
        self, request: web.Request, rt: ResourceType, data: Any, list_mode: bool = False
    ) -> web.StreamResponse:
        accept = request.headers.get("Accept", "")
        if "as=Table" in accept:
            objs = data["items"] if list_mode else [data]
            include = request.query.get("includeObject", "").lower() == "object"
            return web.json_response(to_table(rt, objs, include, str(self.store.rv)))
        return web.json_response(data)

    def pod_log(self, namespace: str, name: str, q: Any) -> web.StreamResponse:
        if (namespace, name) not in self.store.objects[("", "pods")]:
            raise self.store.types[("", "pods")].not_found(name)
        text = "".join(self.store.logs.get((namespace, name), []))
        tail = q.get("tailLines")
        if tail is not None:
            lines = text.splitlines(keepends=True)
            text = "".join(lines[-int(tail) :]) if int(tail) > 0 else ""
        return web.Response(text=text, content_type="text/plain")

    # -- reading ------------------------------------------------------------------------
    def _key(self, rt: ResourceType, namespace: str | None, name: str) -> tuple[str, str]:
        return ((namespace or "") if rt.namespaced else "", name)

    def get(self, rt: ResourceType, namespace: str | None, name: str) -> dict[str, Any]:
        obj = self.store.objects[rt.key].get(self._key(rt, namespace, name))
        if obj is None:
            raise rt.not_found(name)
        return copy.deepcopy(obj)

    def _matching(self, rt: ResourceType, namespace: str | None, q: Any) -> list[dict[str, Any]]:
        reqs = parse_label_selector(q.get("labelSelector"))
        fsel = q.get("fieldSelector")
        out = []
        for (ns, _), obj in sorted(self.store.objects[rt.key].items()):
            if namespace and rt.namespaced and ns != namespace:
                continue
            if not match_labels(obj["metadata"].get("labels") or {}, reqs) or not match_fields(
                obj, fsel
            ):
                continue
            out.append(obj)
        return out

    def list_objects(self, rt: ResourceType, namespace: str | None, q: Any) -> dict[str, Any]:
        items = [copy.deepcopy(o) for o in self._matching(rt, namespace, q)]
        for o in items:
            o.setdefault("apiVersion", rt.api_version)
            o.setdefault("kind", rt.kind)
        return {
            "kind": f"{rt.kind}List",
            "apiVersion": rt.api_version,
            "metadata": {"resourceVersion": str(self.store.rv)},
            "items": items,
        }

    async def watch(
        self, request: web.Request, rt: ResourceType, namespace: str | None, name: str | None
    ) -> web.StreamResponse:
        q = request.query
        reqs = parse_label_selector(q.get("labelSelector"))
        fsel = q.get("fieldSelector")
        if name:
            fsel = f"metadata.name={name}" + (f",{fsel}" if fsel else "")
        timeout = float(q.get("timeoutSeconds") or 1800)
        bookmarks = query_bool(q.get("allowWatchBookmarks"))
        table = "as=Table" in request.headers.get("Accept", "")
        rv_param = q.get("resourceVersion")
        resp = web.StreamResponse(
            headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"}
        )
        await resp.prepare(request)

        def matches(obj: dict[str, Any]) -> bool:
            meta = obj["metadata"]
            if namespace and rt.namespaced and meta.get("namespace") != namespace:
                return False
            return match_labels(meta.get("labels") or {}, reqs) and match_fields(obj, fsel)

        async def send(type_: str, obj: dict[str, Any]) -> None:
            payload: dict[str, Any] = obj
            if table and type_ != "BOOKMARK":
                payload = to_table(
                    rt,
                    [obj],
                    q.get("includeObject", "").lower() == "object",
                    obj["metadata"]["resourceVersion"],
                )
            await resp.write((json.dumps({"type": type_, "object": payload}) + "\n").encode())

        try:
            if not rv_param or rv_param == "0":
                start = self.store.rv
                for obj in self._matching(
                    rt, namespace, {"labelSelector": q.get("labelSelector"), "fieldSelector": fsel}
                ):
                    await send("ADDED", copy.deepcopy(obj))
            else:
                start = int(rv_param)
                oldest = self.store.events[0][0] if self.store.events else self.store.rv + 1
                if start < oldest - 1 and start < self.store.rv:
                    gone = ApiError(
                        410, "Expired", f"too old resource version: {start} ({oldest - 1})"
                    ).status()
                    await resp.write(
                        (json.dumps({"type": "ERROR", "object": gone}) + "\n").encode()
                    )
                    return resp
            deadline = time.monotonic() + timeout
            last = start
            last_bookmark = time.monotonic()
            while time.monotonic() < deadline:
                # The store swaps in a new Event on every change: take this one BEFORE
                # scanning, so a change made while this watch awaits its writes below
                # wakes it at once (waiting on the Event current after the scan missed
                # such changes and slept up to 1 s each: seconds of delay in a burst).
                changed = self.store.changed
                for rv, key, type_, obj in list(self.store.events):
                    if rv <= last:
                        continue
                    last = rv
                    if key == rt.key and matches(obj):
                        await send(type_, obj)
                if bookmarks and time.monotonic() - last_bookmark > 5:
                    last_bookmark = time.monotonic()
                    await send(
                        "BOOKMARK",
                        {
                            "kind": rt.kind,
                            "apiVersion": rt.api_version,
                            "metadata": {"resourceVersion": str(max(last, start))},
                        },
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        changed.wait(),
                        timeout=min(1.0, max(0.01, deadline - time.monotonic())),
                    )
        except (ConnectionResetError, asyncio.CancelledError):
            return resp
        return resp

    # -- writing ------------------------------------------------------------------------
    def _admit(
        self, rt: ResourceType, obj: dict[str, Any], old: dict[str, Any] | None, q: Any
    ) -> dict[str, Any]:
        if rt.group == "" and rt.plural == "secrets" and obj.get("stringData"):
            # as the API server: stringData is write-only, merged into data (base64)
            data = dict(obj.get("data") or {})
            for k, v in (obj.pop("stringData") or {}).items():
                data[k] = base64.b64encode(str(v).encode()).decode()
            obj["data"] = data
        validator = self.store.validators.get(rt.key)
        if validator is None:
            return obj
        return validator.admit(obj, old, strict=q.get("fieldValidation") == "Strict")

    async def create(
        self, rt: ResourceType, namespace: str | None, body: Any, q: Any
    ) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body must be an object")
        meta = body.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            # 5 characters from Kubernetes' alphabet; like the API server (1.32+), retry a
            # name that is taken instead of failing with AlreadyExists
            ns_for_key = (
                (namespace or meta.get("namespace") or "default") if rt.namespaced else None
            )
            for _ in range(8):
                meta["name"] = meta["generateName"] + "".join(
                    random.choice(GENERATE_NAME_ALPHABET)  # noqa: S311 - names, not secrets
                    for _ in range(5)
                )
                if self._key(rt, ns_for_key, meta["name"]) not in self.store.objects[rt.key]:
                    break
        name = meta.get("name")
        if not name:
            raise invalid(
                rt,
                "",
                [
                    (
                        "metadata.name",
                        "FieldValueRequired",
                        "Required value: name or generateName is required",
                    )
                ],
            )
        if rt.namespaced:
            ns = namespace or meta.get("namespace") or "default"
            if meta.get("namespace") and namespace and meta["namespace"] != namespace:
                raise ApiError(
                    400,
                    "BadRequest",
                    "the namespace of the provided object does not match the namespace sent "
                    "on the request",
                )
            if ("", ns) not in self.store.objects[("", "namespaces")]:
                raise self.store.types[("", "namespaces")].not_found(ns)
            meta["namespace"] = ns
        else:
            meta.pop("namespace", None)
        key = self._key(rt, meta.get("namespace"), name)
        if key in self.store.objects[rt.key]:
            raise rt.already_exists(name)
        body["apiVersion"] = rt.api_version
        body["kind"] = rt.kind
        if rt.has_status:
            # status is written through /status only: PrepareForCreate resets it
            body.pop("status", None)
            initial = initial_status(rt, body)
            if initial is not None:
                body["status"] = initial
        if rt.group == "" and rt.plural == "namespaces":
            finalizers = (body.setdefault("spec", {}) or {}).get("finalizers") or []
            if "kubernetes" not in finalizers:
                body["spec"] = {**(body["spec"] or {}), "finalizers": [*finalizers, "kubernetes"]}
        body = self._admit(rt, body, None, q)
        meta = body["metadata"]
        for k in (
            "uid",
            "resourceVersion",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
        ):
            meta.pop(k, None)
        if rt.generation:
            meta["generation"] = 1
        obj = self.store._put_raw(rt, body)
        if rt.plural == "customresourcedefinitions":
            self._register_crd(obj)
        await self.store.notify(rt, "ADDED", obj)
        return copy.deepcopy(obj)

    def _patched(self, rt: ResourceType, old: dict[str, Any], body: Any, ctype: str) -> Any:
        """The object a PATCH request asks for (before the strategy's own rules)."""
        if ctype == "application/json-patch+json":
            if not isinstance(body, list):
                raise ApiError(
                    400,
                    "BadRequest",
                    "json: cannot unmarshal object into Go value of type jsonpatch.Patch",
                )
            return json_patch(old, body)
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the patch must be a JSON object")
        if ctype == "application/strategic-merge-patch+json":
            return strategic_merge_patch(old, body, smp_meta(rt))
        # merge-patch+json; apply-patch+yaml (server-side apply) is approximated by a merge
        return merge_patch(old, body)

    async def update(
        self,
        rt: ResourceType,
        namespace: str | None,
        name: str,
        sub: str | None,
        body: Any,
        method: str,
        ctype: str,
        q: Any,
    ) -> dict[str, Any]:
        if method == "PATCH":
            kinds = PATCH_TYPES_CUSTOM if rt.custom else PATCH_TYPES
            if ctype not in kinds:
                raise ApiError(
                    415,
                    "UnsupportedMediaType",
                    "the body of the request was in an unknown format - accepted media types "
                    "include: " + ", ".join(kinds),
                )
        key = self._key(rt, namespace, name)
        old = self.store.objects[rt.key].get(key)
        if old is None:
            raise rt.not_found(name)
        if method == "PUT":
            if not isinstance(body, dict):
                raise ApiError(400, "BadRequest", "the body must be an object")
            new = copy.deepcopy(body)
            if not (new.get("metadata") or {}).get("resourceVersion") and not (
                rt.unconditional_update
            ):
                # the strategy refuses unconditional updates (custom resources, CRDs, Leases)
                raise invalid(
                    rt,
                    name,
                    [
                        (
                            "metadata.resourceVersion",
                            "FieldValueInvalid",
                            "Invalid value: 0x0: must be specified for an update",
                        )
                    ],
                    qualified=True,
                )
        else:
            new = self._patched(rt, old, body, ctype)
        if not isinstance(new, dict) or not isinstance(new.get("metadata", {}), dict):
            raise ApiError(400, "BadRequest", "the object must have metadata")
        # a resourceVersion in the request (or the patched object) is a precondition
        want_rv = (new.get("metadata") or {}).get("resourceVersion")
        if want_rv and want_rv != old["metadata"]["resourceVersion"]:
            raise rt.conflict(name)
        # identity and system fields are not changed by updates (rest.BeforeUpdate)
        meta = new.setdefault("metadata", {})
        for k in (
            "uid",
            "creationTimestamp",
            "namespace",
            "name",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
        ):
            if k in old["metadata"]:
                meta[k] = old["metadata"][k]
            else:
                meta.pop(k, None)
        new["apiVersion"], new["kind"] = rt.api_version, rt.kind
        if sub == "status":
            merged = copy.deepcopy(old)
            if "status" in new:
                merged["status"] = new["status"]
            else:
                merged.pop("status", None)
            new = merged
        elif rt.has_status:
            if "status" in old:
                new["status"] = copy.deepcopy(old["status"])
            else:
                new.pop("status", None)
        # the schema (pruning, defaults, validation, CEL) applies to status writes too
        new = self._admit(rt, new, old, q)
        changed_spec = {k: v for k, v in new.items() if k not in ("metadata", "status")} != {
            k: v for k, v in old.items() if k not in ("metadata", "status")
        }
        if changed_spec and rt.generation and sub != "status":
            new["metadata"]["generation"] = int(old["metadata"].get("generation", 1)) + 1
        if new == old:
            return copy.deepcopy(old)  # no-op: no new resourceVersion, no event
        new["metadata"]["resourceVersion"] = str(self.store.next_rv())
        self.store.objects[rt.key][key] = new
        if rt.plural == "customresourcedefinitions":
            self._register_crd(new)
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            await self._remove(rt, key, new)
            return copy.deepcopy(new)
        await self.store.notify(rt, "MODIFIED", new)
        return copy.deepcopy(new)

    async def delete(
        self, rt: ResourceType, namespace: str | None, name: str, policy: str
    ) -> dict[str, Any]:
        key = self._key(rt, namespace, name)
        obj = self.store.objects[rt.key].get(key)
        if obj is None:
            raise rt.not_found(name)
        meta = obj["metadata"]
        if policy == "Orphan":
            # the garbage collector's orphan finalizer, done at once: the dependents lose
            # their reference to this owner before it goes
            await self._orphan(meta["uid"])
        if policy == "Foreground" and self._dependents(meta["uid"]):
            finalizers = list(meta.get("finalizers") or [])
            if "foregroundDeletion" not in finalizers:
                finalizers.append("foregroundDeletion")
            meta["finalizers"] = finalizers
        if meta.get("finalizers"):
            if not meta.get("deletionTimestamp"):
                # markAsDeleting: the first deletion bumps a tracked generation
                if int(meta.get("generation") or 0) > 0:
                    meta["generation"] = int(meta["generation"]) + 1
                meta["deletionTimestamp"] = now_iso()
                meta["deletionGracePeriodSeconds"] = 0
                meta["resourceVersion"] = str(self.store.next_rv())
                await self.store.notify(rt, "MODIFIED", obj)
            if policy == "Foreground":
                await self._cascade(meta["uid"], policy)
            return copy.deepcopy(obj)
        await self._remove(rt, key, obj, policy)
        return copy.deepcopy(obj)

    async def _remove(
        self,
        rt: ResourceType,
        key: tuple[str, str],
        obj: dict[str, Any],
        policy: str = "Background",
    ) -> None:
        self.store.objects[rt.key].pop(key, None)
        obj["metadata"]["resourceVersion"] = str(self.store.next_rv())
        self.store.logs.pop(key, None) if rt.plural == "pods" else None
        await self.store.notify(rt, "DELETED", obj)
        if policy != "Orphan":
            await self._cascade(obj["metadata"]["uid"], "Background")
        await self._release_foreground_owners(obj)

    def _dependents(self, uid: str) -> list[tuple[ResourceType, tuple[str, str], dict[str, Any]]]:
        out = []
        for tkey, objs in self.store.objects.items():
            for okey, o in objs.items():
                if any(r.get("uid") == uid for r in o["metadata"].get("ownerReferences") or []):
                    out.append((self.store.types[tkey], okey, o))
        return out

    async def _orphan(self, uid: str) -> None:
        for rt, _, dep in self._dependents(uid):
            m = dep["metadata"]
            refs = [r for r in m.get("ownerReferences") or [] if r.get("uid") != uid]
            if refs:
                m["ownerReferences"] = refs
            else:
                m.pop("ownerReferences", None)
            m["resourceVersion"] = str(self.store.next_rv())
            await self.store.notify(rt, "MODIFIED", dep)

    async def _cascade(self, uid: str, policy: str) -> None:
        for rt, okey, _ in self._dependents(uid):
            if okey in self.store.objects[rt.key]:
                await self.delete(rt, okey[0] or None, okey[1], policy)

    async def _release_foreground_owners(self, removed: dict[str, Any]) -> None:
        for ref in removed["metadata"].get("ownerReferences") or []:
            for tkey, objs in self.store.objects.items():
                for okey, owner in list(objs.items()):
                    m = owner["metadata"]
                    if m.get("uid") != ref.get("uid") or "foregroundDeletion" not in (
                        m.get("finalizers") or []
                    ):
                        continue
                    if self._dependents(m["uid"]):
                        continue
                    m["finalizers"] = [f for f in m["finalizers"] if f != "foregroundDeletion"]
                    rt = self.store.types[tkey]
                    if not m["finalizers"]:
                        await self._remove(rt, okey, owner)
                    else:
                        m["resourceVersion"] = str(self.store.next_rv())
                        await self.store.notify(rt, "MODIFIED", owner)

    def _register_crd(self, crd: dict[str, Any]) -> None:
        spec = crd.get("spec") or {}
        names = spec.get("names") or {}
        for v in spec.get("versions") or []:
            if not v.get("served", True):
                continue
            schema = ((v.get("schema") or {}).get("openAPIV3Schema")) or None
            rt = ResourceType(
                group=spec.get("group", ""),
                version=v["name"],
                plural=names.get("plural", ""),
                kind=names.get("kind", ""),
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                subresources=tuple((v.get("subresources") or {}).keys()),
                short_names=tuple(names.get("shortNames") or ()),
                singular=names.get("singular", ""),
                categories=tuple(names.get("categories") or ()),
                printer_columns=list(v.get("additionalPrinterColumns") or []),
                schema=schema,
                custom=True,
                generation=True,
                unconditional_update=False,
            )
            self.store.add_type(rt)
        crd["status"] = {
            "conditions": [
                {
                    "type": "Established",
                    "status": "True",
                    "reason": "InitialNamesAccepted",
                    "lastTransitionTime": now_iso(),
                },
                {
                    "type": "NamesAccepted",
                    "status": "True",
                    "reason": "NoConflicts",
                    "lastTransitionTime": now_iso(),
                },
            ],
            "acceptedNames": names,
            "storedVersions": [v["name"] for v in spec.get("versions") or [] if v.get("storage")],
        }


# ---------------------------------------------------------------------------- running it


def kubeconfig(url: str, namespace: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "preshard-emulator", "cluster": {"server": url}}],
        "users": [{"name": "preshard-emulator", "user": {"token": "emulator"}}],
        "contexts": [
            {
                "name": "preshard-emulator",
                "context": {
                    "cluster": "preshard-emulator",
                    "user": "preshard-emulator",
                    "namespace": namespace,
                },
            }
        ],
        "current-context": "preshard-emulator",
    }


class EmulatorServer:
    """Runs the emulator in a background thread with its own event loop."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port
        self.emulator = Emulator()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> EmulatorServer:
        self._thread = threading.Thread(target=self._run, name="k8s-emulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(20):
            raise TimeoutError("the Kubernetes API emulator did not start")
        if self._error:
            raise self._error
        return self

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._start())
        except BaseException as exc:  # surfaced to start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        self._runner = web.AppRunner(
            self.emulator.app, handle_signals=False, access_log=None, shutdown_timeout=0.5
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []
        if sockets:
            self.port = sockets[0].getsockname()[1]

    def stop(self) -> None:
        if self.loop is None:
            return
        loop = self.loop

        async def shutdown() -> None:
            if self._runner is not None:
                await self._runner.cleanup()
            # open watches are long-running handlers: end them instead of abandoning them
            current = asyncio.current_task()
            pending = [t for t in asyncio.all_tasks() if t is not current]
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

        fut = asyncio.run_coroutine_threadsafe(shutdown(), loop)
        try:
            fut.result(timeout=10)
        except Exception:  # noqa: S110 - best-effort shutdown
            pass
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.loop = None

    def call(self, coro: Any) -> Any:
        """Run a coroutine on the emulator's loop from another thread."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def apply_file(self, path: Path | str) -> list[dict[str, Any]]:
        """Create every document of a YAML file (setup helper)."""
        out = []
        for doc in yaml.safe_load_all(Path(path).read_text()):
            if doc:
                out.append(self.create_object(doc))
        return out

    def create_object(self, doc: dict[str, Any]) -> dict[str, Any]:
        group, _, version = doc["apiVersion"].rpartition("/")
        rt = next(
            (
                t
                for t in self.emulator.store.types.values()
                if t.group == group and t.version == version and t.kind == doc["kind"]
            ),
            None,
        )
        if rt is None:
            raise ApiError(404, "NotFound", f"no resource for {doc['apiVersion']} {doc['kind']}")
        ns = (doc.get("metadata") or {}).get("namespace")
        return dict(self.call(self.emulator.create(rt, ns, copy.deepcopy(doc), {})))

    def write_kubeconfig(self, path: Path | str, namespace: str = "default") -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(yaml.safe_dump(kubeconfig(self.url, namespace)))
        return p

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _serve_forever(args: argparse.Namespace) -> None:  # pragma: no cover - CLI
    emu = Emulator()
    runner = web.AppRunner(emu.app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    url = f"http://127.0.0.1:{port}"
    for crd in args.crd or []:
        for doc in yaml.safe_load_all(Path(crd).read_text()):
            if doc:
                await emu.create(
                    emu.store.types[("apiextensions.k8s.io", "customresourcedefinitions")],
                    None,
                    doc,
                    {},
                )
    if args.kubeconfig:
        Path(args.kubeconfig).write_text(yaml.safe_dump(kubeconfig(url)))
    print(url, flush=True)
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - CLI
    p = argparse.ArgumentParser(description="Kubernetes API emulator on 127.0.0.1 (dev only)")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--kubeconfig", help="write a kubeconfig pointing at the emulator")
    p.add_argument("--crd", action="append", help="CRD file(s) to install at start")
    args = p.parse_args(argv)
    try:
        asyncio.run(_serve_forever(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
