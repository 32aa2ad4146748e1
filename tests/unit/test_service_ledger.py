"""The ledger's writes (service.ledger): read once per process, then merge patches only;
entries recorded together go out in one patch (LedgerWriter). The ConfigMap API is a
recorder (no API server)."""

from __future__ import annotations

import time
from typing import Any

from preshard.core.config import OperatorConfig
from preshard.service import Service, ledger

SHA = ["a" * 64, "b" * 64, "c" * 64]


class ConfigMaps:
    def __init__(self, data: dict[str, str] | None = None, fail: int = 0) -> None:
        self.data = data
        self.reads = 0
        self.merges: list[dict[str, str]] = []
        self.fail = fail

    def read_configmap_data(self, namespace: str, name: str) -> dict[str, str] | None:
        self.reads += 1
        return None if self.data is None else dict(self.data)

    def merge_configmap_data(self, namespace: str, name: str, data: dict[str, str]) -> None:
        if self.fail:
            self.fail -= 1
            raise RuntimeError("refused")
        self.merges.append(dict(data))
        self.data = {**(self.data or {}), **data}


def service(api: ConfigMaps) -> Service:
    return Service(config=OperatorConfig(operator_namespace="preshard-system"), api=api)  # type: ignore[arg-type]


def test_one_read_then_one_patch_per_new_entry() -> None:
    api = ConfigMaps({SHA[0]: "ns/a/u1"})
    svc = service(api)
    assert ledger.record(svc, SHA[0], "ns/a/u1")  # already there: nothing written
    assert ledger.record(svc, SHA[1], "ns/b/u2")
    assert ledger.record(svc, SHA[2], "ns/c/u3")
    assert api.reads == 1
    assert api.merges == [{SHA[1]: "ns/b/u2"}, {SHA[2]: "ns/c/u3"}]
    # proof is always read from the API, never taken from memory
    assert ledger.published_by(svc, SHA[2]) == "ns/c/u3" and api.reads == 2


def wait_for(fn: Any, timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fn():
            return True
        time.sleep(0.01)
    raise AssertionError("timed out")


def test_entries_recorded_together_go_out_in_one_patch() -> None:
    api = ConfigMaps()
    svc = service(api)
    svc.ledger_writer = ledger.LedgerWriter(svc, window=0.5)
    for i, sha in enumerate(SHA):
        assert ledger.record(svc, sha, f"ns/r{i}/u{i}")
    # recorded, not written yet: this operator's own record already proves it
    assert ledger.published_by(svc, SHA[1]) == "ns/r1/u1" and not api.merges
    wait_for(lambda: api.merges)
    assert api.merges == [{SHA[0]: "ns/r0/u0", SHA[1]: "ns/r1/u1", SHA[2]: "ns/r2/u2"}]
    assert ledger.record(svc, "not a sha", "ns/x/u") is False


def test_a_refused_batch_is_written_with_the_next() -> None:
    api = ConfigMaps(fail=1)
    svc = service(api)
    svc.ledger_writer = ledger.LedgerWriter(svc, window=0.05, retry=0.1)
    ledger.record(svc, SHA[0], "ns/r0/u0")
    time.sleep(0.2)  # the first attempt was refused
    ledger.record(svc, SHA[1], "ns/r1/u1")
    wait_for(lambda: api.merges, timeout=10)
    assert api.data == {SHA[0]: "ns/r0/u0", SHA[1]: "ns/r1/u1"}


def test_no_entry_beyond_the_limit(monkeypatch: Any) -> None:
    monkeypatch.setattr(ledger, "MAX_ENTRIES", 2)
    api = ConfigMaps({SHA[0]: "ns/r0/u0"})
    svc = service(api)
    assert ledger._write(svc, {SHA[1]: "ns/r1/u1", SHA[2]: "ns/r2/u2"})
    assert api.data == {SHA[0]: "ns/r0/u0", SHA[1]: "ns/r1/u1"}
    assert len(api.merges) == 1
