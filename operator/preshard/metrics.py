"""Prometheus metrics of the operator (own registry, served on --metrics-port)."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry(auto_describe=True)

CONVERSIONS = Counter(
    "preshard_conversions_total",
    "Conversions that finished, by result (Succeeded or Failed).",
    ["result"],
    registry=REGISTRY,
)
DURATION = Histogram(
    "preshard_conversion_duration_seconds",
    "Wall time of finished conversions, from the Job's start to its completion.",
    buckets=(30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400),
    registry=REGISTRY,
)
ACTIVE_JOBS = Gauge(
    "preshard_active_jobs", "Conversion Jobs that exist and have not finished.", registry=REGISTRY
)
RECONCILE_ERRORS = Counter(
    "preshard_reconcile_errors_total",
    "Reconciliations that failed with an unexpected error (retried).",
    registry=REGISTRY,
)

_active: set[str] = set()
_lock = threading.Lock()


def observe_phase(uid: str, phase: str, old_phase: str | None, duration: float | None) -> None:
    """Track a checkpoint's phase. A conversion is counted when its status turns
    Succeeded/Failed (a transition), so an operator restart does not count it again."""
    with _lock:
        if phase in ("Pending", "Running"):
            _active.add(uid)
        else:
            _active.discard(uid)
        if phase in ("Succeeded", "Failed") and old_phase not in ("Succeeded", "Failed"):
            CONVERSIONS.labels(result=phase).inc()
            if duration is not None and duration >= 0:
                DURATION.observe(duration)
        ACTIVE_JOBS.set(len(_active))


def forget(uid: str) -> None:
    with _lock:
        _active.discard(uid)
        ACTIVE_JOBS.set(len(_active))


def serve(port: int) -> None:
    if port:
        start_http_server(port, addr="0.0.0.0", registry=REGISTRY)
