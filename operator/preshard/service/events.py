"""Events on a ShardedCheckpoint, through kopf's poster (core/v1 Events, posted in
the background). One of the two service modules that import kopf (with
:mod:`preshard.service.errors`)."""

from __future__ import annotations

from typing import Any

import kopf


def post(body: Any, type: str, reason: str, message: str) -> None:
    kopf.event(body, type=type, reason=reason, message=message)
