"""The query parameters LIST and WATCH read: label selectors (equality- and set-based),
field selectors, and booleans as the API server parses them."""

from __future__ import annotations

import re
from typing import Any

from preshard_dev.emulator.errors import ApiError

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


def query_bool(value: str | None) -> bool:
    """A boolean query parameter (watch, allowWatchBookmarks) as the API server reads it
    (apimachinery ``runtime.Convert_Slice_string_To_bool``): absent, ``0`` or ``false`` in
    any case is false; anything else, the empty string included, is true. The Python
    client sends ``watch=True``, kubectl and kopf ``watch=true`` or ``1``."""
    if value is None:
        return False
    return not (value == "0" or value.lower() == "false")
