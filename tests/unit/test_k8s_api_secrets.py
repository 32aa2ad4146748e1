"""preshard.k8s.api.secret_exists: a metadata-only read (the Accept header asks for
PartialObjectMetadata, the body is never parsed); a Secret found recently is not read
again; a missing one is read every time (so creating it heals at the next retry)."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from preshard.k8s.api import KubeApi
from preshard.k8s.errors import KubeForbidden


class FakeResponse:
    def __init__(self) -> None:
        self.released = False
        self.drained = False

    def drain_conn(self) -> None:
        self.drained = True

    def release_conn(self) -> None:
        self.released = True


class FakeClient:
    """Records what the operator asks the API server for (the real request against the
    API emulator is in tests/integration/test_multitenant.py)."""

    def __init__(self, existing: set[tuple[str, str]]) -> None:
        self.existing = existing
        self.reads: list[tuple[str, str]] = []
        self.requests: list[dict[str, Any]] = []
        self.api: KubeApi

    def call_api(self, path: str, method: str, **kw: Any) -> FakeResponse:
        self.requests.append({"path": path, "method": method, **kw})
        key = (kw["path_params"]["namespace"], kw["path_params"]["name"])
        self.reads.append(key)
        if key not in self.existing:
            raise ApiException(status=404, reason="Not Found")
        return FakeResponse()


@pytest.fixture
def fake() -> FakeClient:
    fake = FakeClient({("ml", "s3")})
    fake.api = KubeApi(fake)  # the operator's calls on this client
    return fake


def test_the_check_asks_for_metadata_only_and_never_parses_a_body(fake: FakeClient) -> None:
    assert fake.api.secret_exists("ml", "s3")
    (req,) = fake.requests
    assert req["method"] == "GET"
    assert req["path"] == "/api/v1/namespaces/{namespace}/secrets/{name}"
    assert req["header_params"] == {
        "Accept": "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"
    }
    assert req["_preload_content"] is False  # no deserialisation into a V1Secret


def test_a_found_secret_is_not_read_again_for_a_while(fake: FakeClient) -> None:
    assert all(fake.api.secret_exists("ml", "s3") for _ in range(5))
    assert fake.reads == [("ml", "s3")]
    assert fake.api.secret_exists("ml", "s3", max_age=0)  # expired: read again
    assert len(fake.reads) == 2


def test_a_missing_secret_is_read_every_time_and_found_once_created(fake: FakeClient) -> None:
    assert not fake.api.secret_exists("ml", "other")
    assert not fake.api.secret_exists("ml", "other")
    assert fake.reads == [("ml", "other")] * 2
    fake.existing.add(("ml", "other"))
    assert fake.api.secret_exists("ml", "other")


def test_a_deleted_secret_is_noticed_once_the_entry_expires(fake: FakeClient) -> None:
    assert fake.api.secret_exists("ml", "s3")
    fake.existing.clear()
    assert fake.api.secret_exists("ml", "s3")  # still within max_age
    assert not fake.api.secret_exists("ml", "s3", max_age=0)
    assert not fake.api.secret_exists("ml", "s3")  # and not cached as found any more


def test_other_errors_are_raised(fake: FakeClient, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(path: str, method: str, **kw: Any) -> None:
        raise ApiException(status=403, reason="Forbidden")

    monkeypatch.setattr(fake, "call_api", forbidden)
    with pytest.raises(KubeForbidden):  # converted at the boundary
        fake.api.secret_exists("ml", "s3")
