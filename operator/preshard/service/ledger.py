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
import threading
import time
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
    seen, or no ledger): read from the API, or an entry this operator recorded that its
    :class:`LedgerWriter` has not written yet (the same record, not yet flushed)."""
    if not isinstance(manifest_sha256, str) or not _SHA.match(manifest_sha256):
        return None
    writer = getattr(svc, "ledger_writer", None)
    if isinstance(writer, LedgerWriter) and _namespace(svc) is not None:
        owner = writer.pending(manifest_sha256)
        if owner is not None:
            return owner
    data = _read(svc)
    _remember(svc, data)
    return data.get(manifest_sha256) if data else None


class LedgerWriter:
    """Entries recorded within ``window`` seconds of each other reach the ledger in one
    merge patch (a burst of resources becoming Ready costs a patch per window, not one
    each), written by one background thread; an entry that cannot be written is tried
    again with the next batch. An entry still waiting when the operator stops is lost:
    that checkpoint is converted again rather than adopted (the ledger only ever adds
    proof)."""

    def __init__(self, svc: Any, window: float = 0.5, retry: float = 5.0) -> None:
        self._svc = svc
        self._window = window
        self._retry = retry
        self._pending: dict[str, str] = {}
        self._cv = threading.Condition()
        threading.Thread(target=self._run, name="preshard-ledger", daemon=True).start()

    def pending(self, manifest_sha256: str) -> str | None:
        """The owner of an entry recorded but not written yet."""
        with self._cv:
            return self._pending.get(manifest_sha256)

    def add(self, manifest_sha256: str, owner: str) -> None:
        with self._cv:
            self._pending[manifest_sha256] = owner
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._pending:
                    self._cv.wait()
            time.sleep(self._window)
            with self._cv:
                batch, self._pending = self._pending, {}
            if not _write(self._svc, batch):
                with self._cv:
                    self._pending = {**batch, **self._pending}
                time.sleep(self._retry)


def _write(svc: Any, entries: dict[str, str]) -> bool:
    """Merge ``entries`` into the ledger (those it already holds skipped, none beyond
    :data:`MAX_ENTRIES`). False: the API refused, try again."""
    ns = _namespace(svc)
    merge = getattr(svc.api, "merge_configmap_data", None)
    if ns is None or merge is None:
        return True  # no ledger: nothing to write, ever
    # the entries as last read or written (one read per operator process, then only the
    # merge patch: the operator is the ledger's only writer)
    data = _cache(svc)
    if data is None:
        data = _read(svc)
        _remember(svc, data)
    new = {k: v for k, v in entries.items() if data is None or data.get(k) != v}
    if not new:
        return True
    room = MAX_ENTRIES - len(data or {})
    if room < len(new):
        kept = dict(list(new.items())[: max(room, 0)])
        log.warning("the ledger %s/%s is full (%d entries): %s not recorded", ns, NAME,
                    len(data or {}), ", ".join(v for k, v in new.items() if k not in kept))  # fmt: skip
        new = kept
        if not new:
            return True
    try:
        merge(ns, NAME, new)
    except Exception as exc:
        log.warning("cannot write the ledger %s/%s: %s", ns, NAME, type(exc).__name__)
        if hasattr(svc, "ledger_cache"):
            svc.ledger_cache = None  # read it again next time
        return False
    cached = _cache(svc)
    if cached is not None:
        cached.update(new)
    else:
        _remember(svc, {**(data or {}), **new})
    return True


def record(svc: Any, manifest_sha256: object, owner: str) -> bool:
    """Record that ``owner`` published the manifest ``manifest_sha256`` (idempotent):
    through the service's :class:`LedgerWriter` when it has one (the operator), else at
    once."""
    ns = _namespace(svc)
    merge = getattr(svc.api, "merge_configmap_data", None)
    if (
        ns is None
        or merge is None
        or not isinstance(manifest_sha256, str)
        or not _SHA.match(manifest_sha256)
    ):
        return False
    writer = getattr(svc, "ledger_writer", None)
    if isinstance(writer, LedgerWriter):
        writer.add(manifest_sha256, owner)
        return True
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
