"""The PATCH content types: JSON patch (RFC 6902), JSON merge patch (RFC 7386) and
strategic merge patch for the built-in kinds."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from preshard_dev.emulator.errors import STATUS_REASONS, ApiError
from preshard_dev.emulator.resources import ResourceType


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


def patched(rt: ResourceType, old: dict[str, Any], body: Any, ctype: str) -> Any:
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
