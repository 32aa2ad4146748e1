"""Deterministic names for child objects (Jobs, ConfigMaps) within Kubernetes limits, and
the labels and annotations preshard puts on them."""

from __future__ import annotations

import hashlib
import re

MAX_NAME = 63
MAX_LABEL_VALUE = 63
MAX_SUBDOMAIN = 253
_INVALID = re.compile(r"[^a-z0-9-]+")

MANAGED_BY = "preshard"
LABEL_CHECKPOINT = "preshard.io/checkpoint"
LABEL_SPEC_HASH = "preshard.io/spec-hash"
LABEL_COMPONENT = "app.kubernetes.io/component"
ANNOTATION_SPEC_HASH = "preshard.io/spec-hash"
ANNOTATION_OWNER_UID = "preshard.io/owner-uid"
# The owner's full name: the checkpoint label holds a cut name + hash for names over 63.
ANNOTATION_CHECKPOINT_NAME = "preshard.io/checkpoint-name"


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


def purge_job_name(resource_name: str, spec_hash: str) -> str:
    """Output-prefix deletion Job (deletionPolicy: Delete)."""
    return bounded_name(resource_name, f"purge-{spec_hash[:10]}")


def _digest(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()[:10]


def checkpoint_label_value(resource_name: str) -> str:
    """The ``preshard.io/checkpoint`` label value: the resource name, or for names over the
    63-character label limit a cut name plus a hash of the whole name.

    A resource name is a DNS subdomain (up to 253 characters), so a long one cannot be a
    label value; the full name is in the ``preshard.io/checkpoint-name`` annotation.
    """
    if len(resource_name) <= MAX_LABEL_VALUE:
        return resource_name
    keep = MAX_LABEL_VALUE - 11
    return f"{resource_name[:keep].rstrip('-.')}-{_digest(resource_name)}"


def serving_configmap_name(resource_name: str) -> str:
    """``<name>-serving``; ConfigMap names are DNS subdomains (253 characters), so a name
    too long for the suffix is cut and gets a hash of the whole name."""
    suffix = "-serving"
    if len(resource_name) + len(suffix) <= MAX_SUBDOMAIN:
        return resource_name + suffix
    keep = MAX_SUBDOMAIN - len(suffix) - 11
    return f"{resource_name[:keep].rstrip('-.')}-{_digest(resource_name)}{suffix}"


def step_job_name(name: str, uid: str, component: str, spec_hash: str, *extra: str) -> str:
    """``<name>-<component>-<hash10>``: one per resource incarnation (uid), spec and the
    state it acts on (a new uid with the same name never meets an old Job)."""
    digest = hashlib.sha256("\0".join((uid, spec_hash, *extra)).encode()).hexdigest()
    return bounded_name(name, f"{component}-{digest[:10]}")


def labels(name: str, component: str, spec_hash: str | None = None) -> dict[str, str]:
    """Labels of a child object; the checkpoint label is bounded to 63 characters."""
    out = {
        "app.kubernetes.io/name": "preshard",
        LABEL_COMPONENT: component,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_CHECKPOINT: checkpoint_label_value(name),
    }
    if spec_hash:
        out[LABEL_SPEC_HASH] = spec_hash[:10]
    return out
