"""kopf handlers: decorators, filters and indexes that call :mod:`preshard.service`.
:func:`register` registers them all (``preshard.runner``)."""

from __future__ import annotations

import kopf

from preshard.handlers import checkpoint, steps


def register(
    registry: kopf.OperatorRegistry,
    *,
    poll_seconds: float,
    retry_seconds: float,
    step_retry_seconds: float = 300.0,
) -> None:
    checkpoint.register(
        registry,
        poll_seconds=poll_seconds,
        retry_seconds=retry_seconds,
        step_retry_seconds=step_retry_seconds,
    )
    steps.register(registry)
