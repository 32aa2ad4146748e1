"""Deterministic names for child objects (Jobs, ConfigMaps) within Kubernetes limits."""

from __future__ import annotations

import hashlib
import re

MAX_NAME = 63
_INVALID = re.compile(r"[^a-z0-9-]+")


def _dns_label(s: str) -> str:
    s = _INVALID.sub("-", s.lower()).strip("-")
    return s or "x"


def bounded_name(base: str, suffix: str, limit: int = MAX_NAME) -> str:
    """``<base>-<suffix>`` cut to ``limit``; a cut base gets a short hash so names stay unique."""
    base = _dns_label(base)
    full = f"{base}-{suffix}"
    if len(full) <= limit:
        return full
    digest = hashlib.sha256(base.encode()).hexdigest()[:6]
    keep = limit - len(suffix) - len(digest) - 2
    return f"{base[:keep].rstrip('-')}-{digest}-{suffix}"


def job_name(resource_name: str, spec_hash: str) -> str:
    """Conversion Job: ``<name>-<hash10>``; same resource and spec -> same name, always."""
    return bounded_name(resource_name, spec_hash[:10])


def cleanup_job_name(resource_name: str, spec_hash: str) -> str:
    """Output-prefix deletion Job (deletionPolicy: Delete)."""
    return bounded_name(resource_name, f"purge-{spec_hash[:10]}")


def serving_configmap_name(resource_name: str) -> str:
    # ConfigMap names are DNS subdomains (253 chars); keep them readable.
    return f"{resource_name}-serving"
