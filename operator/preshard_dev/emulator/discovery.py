"""Discovery as the API server serves it: ``/version``, ``/api``, ``/apis``, the group
and resource lists of every served type (built-in kinds and CRDs), and an OpenAPI v3
document per group version (enough for kubectl's validation and field checks)."""

from __future__ import annotations

import copy
from typing import Any

from preshard_dev.emulator.errors import ApiError
from preshard_dev.emulator.resources import VERBS
from preshard_dev.emulator.store import Store

VERSION_INFO = {
    "major": "1",
    "minor": "33",
    "gitVersion": "v1.33.0-preshard-emulator",
    "platform": "linux/amd64",
}
CORE_VERSIONS = {
    "kind": "APIVersions",
    "versions": ["v1"],
    "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}],
}


class Discovery:
    def __init__(self, store: Store) -> None:
        self.store = store

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

    # OpenAPI v3: enough for kubectl (validation, explain, server-side field validation)
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
