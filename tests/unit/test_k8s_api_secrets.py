"""preshard.k8s.api.secret_exists: a Secret found recently is not read again; a missing
one is read every time (so creating it heals at the next retry)."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from preshard.k8s import api


class FakeCore:
    def __init__(self, existing: set[tuple[str, str]]) -> None:
        self.existing = existing
        self.reads: list[tuple[str, str]] = []

    def read_namespaced_secret(self, name: str, namespace: str) -> dict[str, Any]:
        self.reads.append((namespace, name))
        if (namespace, name) not in self.existing:
            raise ApiException(status=404, reason="Not Found")
        return {"data": {"AWS_SECRET_ACCESS_KEY": "c2VjcmV0"}}


@pytest.fixture
def core(monkeypatch: pytest.MonkeyPatch) -> FakeCore:
    fake = FakeCore({("ml", "s3")})
    monkeypatch.setattr(api, "core", lambda: fake)
    monkeypatch.setattr(api, "_secrets_seen", {})
    return fake


def test_a_found_secret_is_not_read_again_for_a_while(core: FakeCore) -> None:
    assert all(api.secret_exists("ml", "s3") for _ in range(5))
    assert core.reads == [("ml", "s3")]
    assert api.secret_exists("ml", "s3", max_age=0)  # expired: read again
    assert len(core.reads) == 2


def test_a_missing_secret_is_read_every_time_and_found_once_created(core: FakeCore) -> None:
    assert not api.secret_exists("ml", "other")
    assert not api.secret_exists("ml", "other")
    assert core.reads == [("ml", "other")] * 2
    core.existing.add(("ml", "other"))
    assert api.secret_exists("ml", "other")


def test_a_deleted_secret_is_noticed_once_the_entry_expires(core: FakeCore) -> None:
    assert api.secret_exists("ml", "s3")
    core.existing.clear()
    assert api.secret_exists("ml", "s3")  # still within max_age
    assert not api.secret_exists("ml", "s3", max_age=0)
    assert not api.secret_exists("ml", "s3")  # and not cached as found any more


def test_other_errors_are_raised(core: FakeCore, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(name: str, namespace: str) -> None:
        raise ApiException(status=403, reason="Forbidden")

    monkeypatch.setattr(core, "read_namespaced_secret", forbidden)
    with pytest.raises(ApiException):
        api.secret_exists("ml", "s3")
