"""The operator's ledger of the manifests it saw published: proof for Adopt and Withdraw.

A manifest at a prefix names its owner, but anybody who could write the prefix before
a resource existed can plant one naming any owner (a gone one, or none). So Adopt and a
Withdraw that deletes a manifest's objects act only on a manifest this operator saw
published: when a resource becomes Ready (converted, copied or adopted), the operator
records ``manifest sha256 -> namespace/name/uid`` in a ConfigMap in ITS OWN namespace
(``preshard-ledger``; tenants cannot write there). The preflight reports the sha256 of
the manifest it found; it proves that manifest when the ledger maps exactly that sha256
to exactly the owner the manifest names. A manifest is content-addressed by its sha256,
which covers its file list, sizes and hashes: the ledger entry proves every byte of it.

No ledger (the operator's namespace unknown, the API refuses): nothing is proven, so
nothing is adopted and a withdraw deletes the manifest alone (safe, and a conversion
instead of an adoption). The ledger keeps at most :data:`MAX_ENTRIES` entries (a
ConfigMap holds 1 MiB); beyond that new entries are not recorded (logged): those
checkpoints are converted again rather than adopted.
"""

from __future__ import annotations

import logging
import re
from typing import Any

log = logging.getLogger(__name__)

NAME = "preshard-ledger"
MAX_ENTRIES = 4000
_SHA = re.compile(r"^[0-9a-f]{64}$")


def _namespace(svc: Any) -> str | None:
    return getattr(svc.config, "operator_namespace", None) or None


def _read(svc: Any) -> dict[str, str] | None:
    ns = _namespace(svc)
    reader = getattr(svc.api, "read_configmap_data", None)
    if ns is None or reader is None:
        return None
    try:
        data = reader(ns, NAME)
    except Exception as exc:  # the ledger only ever adds proof: no proof on failure
        log.warning("cannot read the ledger %s/%s: %s", ns, NAME, type(exc).__name__)
        return None
    return dict(data or {})


def _cache(svc: Any) -> dict[str, str] | None:
    """The ledger as this operator last read or wrote it (it is the only writer)."""
    cached = getattr(svc, "ledger_cache", None)
    return cached if isinstance(cached, dict) else None


def _remember(svc: Any, data: dict[str, str] | None) -> None:
    if data is not None and hasattr(svc, "ledger_cache"):
        svc.ledger_cache = dict(data)


def published_by(svc: Any, manifest_sha256: str | None) -> str | None:
    """The owner this operator saw publish the manifest with this sha256 (None: never
    seen, or no ledger). Always read from the API (proof is never taken from memory)."""
    if not isinstance(manifest_sha256, str) or not _SHA.match(manifest_sha256):
        return None
    data = _read(svc)
    _remember(svc, data)
    return data.get(manifest_sha256) if data else None


def record(svc: Any, manifest_sha256: object, owner: str) -> bool:
    """Record that ``owner`` published the manifest ``manifest_sha256`` (idempotent)."""
    ns = _namespace(svc)
    merge = getattr(svc.api, "merge_configmap_data", None)
    if (
        ns is None
        or merge is None
        or not isinstance(manifest_sha256, str)
        or not _SHA.match(manifest_sha256)
    ):
        return False
    # the entries as last read or written (one read per operator process, then only the
    # merge patch per entry: the operator is the ledger's only writer)
    data = _cache(svc)
    if data is None:
        data = _read(svc)
        _remember(svc, data)
    if data is not None and data.get(manifest_sha256) == owner:
        return True
    if data is not None and len(data) >= MAX_ENTRIES:
        log.warning("the ledger %s/%s is full (%d entries): %s not recorded", ns, NAME,
                    len(data), owner)  # fmt: skip
        return False
    try:
        merge(ns, NAME, {manifest_sha256: owner})
    except Exception as exc:
        log.warning("cannot write the ledger %s/%s: %s", ns, NAME, type(exc).__name__)
        if hasattr(svc, "ledger_cache"):
            svc.ledger_cache = None  # read it again next time
        return False
    cached = _cache(svc)
    if cached is not None:
        cached[manifest_sha256] = owner
    else:
        _remember(svc, {**(data or {}), manifest_sha256: owner})
    return True
