"""WATCH: the initial ADDED events (no resourceVersion, or 0), a resume from a
resourceVersion out of the store's event history (410 Expired when too old), bookmarks
and ``timeoutSeconds``; label and field selectors; Table rows for kubectl ``get -w``."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import time
from typing import Any

from aiohttp import web

from preshard_dev.emulator.errors import ApiError
from preshard_dev.emulator.resources import ResourceType
from preshard_dev.emulator.selectors import (
    match_fields,
    match_labels,
    parse_label_selector,
    query_bool,
)
from preshard_dev.emulator.store import Store, count_secret_data
from preshard_dev.emulator.tables import to_table


async def watch(
    store: Store,
    request: web.Request,
    rt: ResourceType,
    namespace: str | None,
    name: str | None,
) -> web.StreamResponse:
    """Stream the watch events of ``rt`` (one object when ``name`` is given) as JSON lines."""
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
        if rt.key == ("", "secrets") and type_ != "BOOKMARK":
            count_secret_data(store, request, 1)
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
            start = store.rv
            for obj in store.matching(
                rt, namespace, {"labelSelector": q.get("labelSelector"), "fieldSelector": fsel}
            ):
                await send("ADDED", copy.deepcopy(obj))
        else:
            start = int(rv_param)
            oldest = store.events[0][0] if store.events else store.rv + 1
            if start < oldest - 1 and start < store.rv:
                gone = ApiError(
                    410, "Expired", f"too old resource version: {start} ({oldest - 1})"
                ).status()
                await resp.write((json.dumps({"type": "ERROR", "object": gone}) + "\n").encode())
                return resp
        deadline = time.monotonic() + timeout
        last = start
        last_bookmark = time.monotonic()
        while time.monotonic() < deadline:
            # The store swaps in a new Event on every change: take this one BEFORE scanning,
            # so a change made while this watch awaits its writes below wakes it at once
            # (waiting on the Event current after the scan missed such changes and slept up
            # to 1 s each: seconds of delay in a burst).
            changed = store.changed
            for rv, key, type_, obj in list(store.events):
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
