"""The emulator's HTTP side (aiohttp): routing of every path, the non-standard
``/emulator`` endpoints (request counters, fault injection, pod log input), verbs and
request counting, body decoding, Table responses and pod logs."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import yaml
from aiohttp import web

from preshard_dev.emulator.discovery import CORE_VERSIONS, VERSION_INFO, Discovery
from preshard_dev.emulator.errors import ApiError
from preshard_dev.emulator.objects import Objects
from preshard_dev.emulator.resources import ResourceType
from preshard_dev.emulator.selectors import query_bool
from preshard_dev.emulator.store import Fault, Store, count_secret_data
from preshard_dev.emulator.tables import to_table
from preshard_dev.emulator.watch import watch

REQUEST_BODY_LOGGED = 2000  # characters of each request body kept in the request log


class Emulator:
    """The API server: an aiohttp application over one ``Store`` (``app``)."""

    def __init__(self) -> None:
        self.store = Store()
        self.objects = Objects(self.store)
        self.discovery = Discovery(self.store)
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
                return web.json_response(VERSION_INFO)
            if path == "/api":
                return web.json_response(CORE_VERSIONS)
            if path == "/apis":
                return web.json_response(self.discovery.group_list())
            if path in ("/healthz", "/readyz", "/livez"):
                return web.Response(text="ok")
            if path == "/openapi/v3":
                return web.json_response(self.discovery.openapi_index())
            if parts[:2] == ["openapi", "v3"]:
                return web.json_response(self.discovery.openapi_doc("/".join(parts[2:])))
            if "application/vnd.kubernetes.protobuf" in request.headers.get("Content-Type", ""):
                raise ApiError(415, "UnsupportedMediaType", "the emulator speaks JSON only")
            if parts[:1] == ["api"] and len(parts) >= 2:
                group, version, rest = "", parts[1], parts[2:]
            elif parts[:1] == ["apis"] and len(parts) >= 3:
                group, version, rest = parts[1], parts[2], parts[3:]
            elif parts[:1] == ["apis"] and len(parts) == 2:
                return web.json_response(self.discovery.group(parts[1]))
            else:
                raise ApiError(
                    404, "NotFound", f"the server could not find the requested resource {path}"
                )
            if not rest:
                return web.json_response(self.discovery.resource_list(group, version))
            return await self.resource_request(request, group, version, rest)
        except ApiError as err:
            return web.json_response(err.status(), status=err.code, headers=err.headers)

    # -- non-standard endpoints ------------------------------------------------------------
    async def emulator_endpoint(self, request: web.Request, parts: list[str]) -> web.StreamResponse:
        if parts == ["stats"]:
            if request.method == "DELETE":
                self.store.stats.clear()
                self.store.agent_stats.clear()
                self.store.secret_data_served.clear()
                self.store.requests.clear()
            if request.query.get("by") == "agent":
                return web.json_response({a: dict(c) for a, c in self.store.agent_stats.items()})
            if request.query.get("by") == "secret-data":
                return web.json_response(dict(self.store.secret_data_served))
            return web.json_response(dict(self.store.stats))
        if parts == ["requests"]:
            # the request log (newest last): agent, counter key, path, the body's start
            return web.json_response(list(self.store.requests))
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
        self.store.requests.append(
            {
                "agent": agent,
                "request": stat,
                "path": request.path_qs,
                "body": (await request.text())[:REQUEST_BODY_LOGGED]
                if request.can_read_body
                else "",
            }
        )
        self.store.check_fault(verb, plural)
        if sub == "log":
            return self.pod_log(namespace or "default", name or "", q)
        if sub is not None and sub not in rt.subresources:
            raise ApiError(404, "NotFound", f"{plural} has no subresource {sub}")
        if verb == "watch":
            return await watch(self.store, request, rt, namespace, name)
        if verb == "list":
            return self.respond(
                request, rt, self.objects.list_objects(rt, namespace, q), list_mode=True
            )
        if verb == "get":
            return self.respond(request, rt, self.objects.get(rt, namespace, name or ""))
        if verb == "create":
            body = await self._json(request)
            return web.json_response(await self.objects.create(rt, namespace, body, q), status=201)
        if verb in ("update", "patch"):
            body = await self._json(request)
            obj = await self.objects.update(
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
            obj = await self.objects.delete(rt, namespace, name or "", policy or "Background")
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
            if include and rt.key == ("", "secrets"):
                count_secret_data(self.store, request, len(objs))
            return web.json_response(to_table(rt, objs, include, str(self.store.rv)))
        if "as=PartialObjectMetadata" in accept:
            # metadata only (what a real API server serves for this Accept header)
            def partial(o: dict[str, Any]) -> dict[str, Any]:
                return {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": o["metadata"],
                }

            if list_mode:
                return web.json_response(
                    {
                        "kind": "PartialObjectMetadataList",
                        "apiVersion": "meta.k8s.io/v1",
                        "metadata": data["metadata"],
                        "items": [partial(o) for o in data["items"]],
                    }
                )
            return web.json_response(partial(data))
        if rt.key == ("", "secrets"):
            count_secret_data(self.store, request, len(data["items"]) if list_mode else 1)
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
