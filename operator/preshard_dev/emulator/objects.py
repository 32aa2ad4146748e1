"""What the API server does with objects: get and list, create (names, namespaces,
generateName, initial status, generation), update and patch (preconditions, identity
fields, the status subresource, generation), delete (finalizers, propagation policies and
the garbage collector through ownerReferences), and a CRD's types once it is created."""

from __future__ import annotations

import copy
import random
from typing import Any

from preshard_dev.emulator.admission import admit
from preshard_dev.emulator.errors import ApiError, invalid
from preshard_dev.emulator.patching import PATCH_TYPES, PATCH_TYPES_CUSTOM, patched
from preshard_dev.emulator.resources import GENERATE_NAME_ALPHABET, ResourceType, now_iso
from preshard_dev.emulator.store import Store
from preshard_dev.emulator.strategies import initial_status


class Objects:
    """The object operations of the API on a ``Store`` (HTTP-free: ``http.Emulator`` maps
    requests to them, ``server.EmulatorServer`` calls ``create`` for its setup helpers)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    # -- reading ------------------------------------------------------------------------
    def _key(self, rt: ResourceType, namespace: str | None, name: str) -> tuple[str, str]:
        return ((namespace or "") if rt.namespaced else "", name)

    def get(self, rt: ResourceType, namespace: str | None, name: str) -> dict[str, Any]:
        obj = self.store.objects[rt.key].get(self._key(rt, namespace, name))
        if obj is None:
            raise rt.not_found(name)
        return copy.deepcopy(obj)

    def list_objects(self, rt: ResourceType, namespace: str | None, q: Any) -> dict[str, Any]:
        items = [copy.deepcopy(o) for o in self.store.matching(rt, namespace, q)]
        for o in items:
            o.setdefault("apiVersion", rt.api_version)
            o.setdefault("kind", rt.kind)
        return {
            "kind": f"{rt.kind}List",
            "apiVersion": rt.api_version,
            "metadata": {"resourceVersion": str(self.store.rv)},
            "items": items,
        }

    # -- writing ------------------------------------------------------------------------
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
        body = admit(rt, self.store.validators.get(rt.key), body, None, q)
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
            new = patched(rt, old, body, ctype)
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
        new = admit(rt, self.store.validators.get(rt.key), new, old, q)
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

    # -- deleting and the garbage collector ---------------------------------------------
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

    # -- CRDs -------------------------------------------------------------------------
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
