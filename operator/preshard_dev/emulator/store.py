"""The emulator's state: resource types, objects, the global resourceVersion, the event
history watches replay, pod logs, request counters and injected faults."""

from __future__ import annotations

import asyncio
import copy
import uuid
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

from preshard_dev.emulator.admission import CRDValidator
from preshard_dev.emulator.errors import STATUS_REASONS, ApiError
from preshard_dev.emulator.resources import BUILTIN, ResourceType, now_iso
from preshard_dev.emulator.selectors import match_fields, match_labels, parse_label_selector


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
        # every counted request, for per-resource breakdowns (GET /emulator/requests)
        self.requests: deque[dict[str, str]] = deque(maxlen=history)
        # user agent -> Secret objects served with their data (get, list, watch), for
        # tests that prove a client never reads Secret data
        self.secret_data_served: Counter[str] = Counter()
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

    def matching(self, rt: ResourceType, namespace: str | None, q: Any) -> list[dict[str, Any]]:
        """The stored objects of ``rt`` in ``namespace`` (every one for None) that match the
        ``labelSelector`` and ``fieldSelector`` of ``q``, in key order."""
        reqs = parse_label_selector(q.get("labelSelector"))
        fsel = q.get("fieldSelector")
        out = []
        for (ns, _), obj in sorted(self.objects[rt.key].items()):
            if namespace and rt.namespaced and ns != namespace:
                continue
            if not match_labels(obj["metadata"].get("labels") or {}, reqs) or not match_fields(
                obj, fsel
            ):
                continue
            out.append(obj)
        return out


def count_secret_data(store: Store, request: Any, n: int) -> None:
    """Count ``n`` Secret objects served with their data to the request's user agent."""
    agent = request.headers.get("User-Agent", "").split("/")[0] or "unknown"
    store.secret_data_served[agent] += n
