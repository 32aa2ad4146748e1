"""``s3://`` tensor sources against a real S3 server (rclone on 127.0.0.1): the same
tensors, in the same order and with the same values, as the local source over the same
files; headers and tensors by ranged GETs only (never a whole weight file), a large
tensor in concurrent pieces, a body cut short read again, and the non-weight files
prepared for the planner."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from preshard.core.errors import PreshardError
from preshard.worker.sources import open_source
from preshard.worker.sources import s3 as s3_source
from preshard_dev.faultproxy import FaultProxy, FaultRule
from preshard_dev.tinymodel import make_tiny_model

from .conftest import client_env


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("llama-tied", tmp_path_factory.mktemp("m") / "model")


def _upload(s3: object, bucket: str, model: Path, prefix: str = "m/") -> str:
    client = s3.client()  # type: ignore[attr-defined]
    for p in sorted(model.iterdir()):
        client.put_object(Bucket=bucket, Key=prefix + p.name, Body=p.read_bytes())
    return f"s3://{bucket}/{prefix}"


def _env(monkeypatch: pytest.MonkeyPatch, s3: object, endpoint: str | None = None) -> None:
    for k, v in client_env(s3, endpoint).items():  # type: ignore[arg-type]
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)


def test_s3_source_matches_local(
    s3: object, bucket: str, model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _env(monkeypatch, s3)
    uri = _upload(s3, bucket, model)
    monkeypatch.setattr(s3_source, "PIECE", 4096)  # several concurrent pieces per tensor
    calls: list[dict[str, object]] = []
    real = s3_source.S3Source._range

    def spy(self: s3_source.S3Source, key: str, begin: int, end: int, into: object = None) -> bytes:
        calls.append({"key": key, "begin": begin, "end": end})
        return real(self, key, begin, end, into)  # type: ignore[arg-type]

    monkeypatch.setattr(s3_source.S3Source, "_range", spy)
    src = open_source(uri, concurrency=4)
    local = open_source(str(model))
    assert src.tensors() == local.tensors()
    assert len(src.tensors()) > 5
    for info in src.tensors():
        a, b = src.read(info.name), local.read(info.name)
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), info.name
    sizes = {p.name: p.stat().st_size for p in model.iterdir()}
    weight = [c for c in calls if str(c["key"]).endswith(".safetensors")]
    # never a whole weight file in one read; pieces of at most PIECE bytes
    assert weight and all(int(c["end"]) - int(c["begin"]) <= max(4096, 8 + 65536) for c in weight)
    assert all(
        int(c["end"]) - int(c["begin"]) < sizes[str(c["key"]).rpartition("/")[2]] for c in weight
    )
    meta = src.prepare(tmp_path / "work")
    assert (meta / "config.json").read_bytes() == (model / "config.json").read_bytes()
    assert not list(meta.glob("*.safetensors"))
    src.close()


def test_s3_source_reads_by_range_and_retries_a_cut_body(
    s3: object, bucket: str, model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = _upload(s3, bucket, model, "cut/")
    with FaultProxy(s3.endpoint, seed=3) as proxy:  # type: ignore[attr-defined]
        _env(monkeypatch, s3, proxy.endpoint)
        src = open_source(uri, concurrency=1)
        local = open_source(str(model))
        name = max(src.tensors(), key=lambda t: t.nbytes).name
        before = len(proxy.records())
        proxy.add_rule(FaultRule(action="truncate", operation="GetObject", nth=1))
        assert torch.equal(src.read(name).view(torch.uint8), local.read(name).view(torch.uint8))
        assert proxy.stats().faults == 1
        gets = [r for r in proxy.records()[before:] if r.operation == "GetObject"]
        assert len(gets) == 2  # the cut body, then the same range again


def test_s3_source_errors(s3: object, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _env(monkeypatch, s3)
    with pytest.raises(PreshardError) as e:
        open_source(f"s3://{bucket}/nothing/")
    assert e.value.reason == "SourceNotFound" and e.value.permanent
    s3.client().put_object(Bucket=bucket, Key="bad/config.json", Body=b"{}")  # type: ignore[attr-defined]
    s3.client().put_object(Bucket=bucket, Key="bad/model.safetensors", Body=b"\xff" * 16)  # type: ignore[attr-defined]
    with pytest.raises(PreshardError, match="header length") as e:
        open_source(f"s3://{bucket}/bad/")
    assert e.value.reason == "InvalidSource"


def test_pinned_s3_source_reads_exactly_the_pinned_objects(
    s3: object, bucket: str, model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pinned source on the engine-free path: the source is read at the content the
    preflight pinned. Another pin is SourceChanged before any tensor is read; an object
    swapped after the source was opened (same name and size, other bytes) is refused on
    its next read, whatever the server does with If-Match."""
    from preshard.core.identity import files_digest
    from preshard.core.uris import parse_uri
    from preshard.worker.store import s3 as s3_client
    from preshard.worker.store import source_files

    _env(monkeypatch, s3)
    uri = _upload(s3, bucket, model, prefix="pinned/")
    client = s3_client.make_client(s3_client.source_settings())
    pin = files_digest(source_files.s3_entries(client, parse_uri(uri)))
    with pytest.raises(PreshardError) as err:
        open_source(uri, pin="sha256:" + "0" * 64)
    assert err.value.reason == "SourceChanged" and err.value.permanent
    src = open_source(uri, pin=pin)
    first = src.tensors()[0]
    src.read(first.name)  # the pinned bytes read fine
    weights = next(p for p in sorted(model.iterdir()) if p.suffix == ".safetensors")
    swapped = bytearray(weights.read_bytes())
    swapped[-1] ^= 0xFF  # one byte of the last tensor
    s3.client().put_object(Bucket=bucket, Key="pinned/" + weights.name, Body=bytes(swapped))  # type: ignore[attr-defined]
    with pytest.raises(PreshardError) as err:
        src.read(src.tensors()[-1].name)
    assert err.value.reason == "SourceChanged"
    src.close()


def test_pinned_local_source(model: Path, tmp_path: Path) -> None:
    import shutil

    from preshard.core.identity import files_digest
    from preshard.worker.store import source_files

    copy = tmp_path / "copy"
    shutil.copytree(model, copy)
    pin = files_digest(source_files.local_entries(copy))
    open_source(str(copy), pin=pin).close()
    weights = next(p for p in sorted(copy.iterdir()) if p.suffix == ".safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(PreshardError) as err:
        open_source(str(copy), pin=pin)
    assert err.value.reason == "SourceChanged"
