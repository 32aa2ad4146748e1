"""``application/json;as=Table`` responses for kubectl: the CRD's printer columns (a
JSONPath subset) or the built-in kinds' default columns."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from preshard_dev.emulator.resources import ResourceType


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
