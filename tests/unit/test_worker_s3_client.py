"""s3.make_client: clients share one parsed service model per process, but each one
resolves its credentials afresh (a changed environment, another tenant's source keys)."""

from __future__ import annotations

import pytest

from preshard.worker.store import s3 as s3mod


def credentials(client: object) -> tuple[str, str]:
    creds = client._request_signer._credentials.get_frozen_credentials()  # type: ignore[attr-defined]
    return creds.access_key, creds.secret_key


def test_each_client_resolves_its_own_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDFIRST0000000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "first-secret")
    first = s3mod.make_client(s3mod.output_settings("http://127.0.0.1:9", "eu-west-1"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDSECOND000000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "second-secret")
    second = s3mod.make_client(s3mod.output_settings("http://127.0.0.1:9"))
    explicit = s3mod.make_client(
        s3mod.S3Settings("http://127.0.0.1:9", None, 4, "AKIDSOURCE000000", "source-secret")
    )
    assert credentials(first) == ("AKIDFIRST0000000", "first-secret")
    assert credentials(second) == ("AKIDSECOND000000", "second-secret")
    assert credentials(explicit) == ("AKIDSOURCE000000", "source-secret")
    assert first.meta.region_name == "eu-west-1" and second.meta.region_name == "us-east-1"
    assert first.meta.endpoint_url == "http://127.0.0.1:9"
    # One service model for all of them (parsed once per process).
    assert first.meta.service_model._service_description is (  # type: ignore[attr-defined]
        second.meta.service_model._service_description  # type: ignore[attr-defined]
    )
