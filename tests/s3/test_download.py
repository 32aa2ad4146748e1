"""The Downloader's receive paths against a real S3 server (rclone serve s3 on
127.0.0.1) and the fault proxy: the zero-copy path (``readinto`` under botocore's
response) is the one in use with the installed botocore/urllib3, and on it as on the
public fallback a flipped byte in any range is rejected (IntegrityError, sha256
mismatch, no file under its final name), a truncated range is resumed with every byte
intact, and a server answering more bytes than asked for is refused."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from preshard.core.errors import PreshardError
from preshard.worker.store import s3 as s3mod
from preshard.worker.store.download import (
    Downloader,
    DownloadItem,
    IntegrityError,
    SequentialHasher,
)
from preshard_dev.faultproxy import FaultProxy, FaultRule
from preshard_dev.s3server import RcloneS3

from .conftest import PART, Checkpoint, publish

KEY = "model-rank-0-part-0.safetensors"  # 2 parts + 123,457 bytes: three ranges at PART


def item(checkpoint: Checkpoint, prefix: str, dest: Path, key: str = KEY) -> DownloadItem:
    return DownloadItem(prefix + key, dest / key, len(checkpoint.files[key]), checkpoint.shas[key])


def downloader(endpoint: str, bucket: str, zero_copy: bool, concurrency: int = 4) -> Downloader:
    client = s3mod.make_client(s3mod.output_settings(endpoint))
    dl = Downloader(client, bucket, concurrency=concurrency, part_size=PART)
    dl.zero_copy = zero_copy
    return dl


class IgnoresRange:
    """The real client, asking for whole objects whatever range it is given."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def get_object(self, **kw: Any) -> Any:
        kw.pop("Range", None)
        return self._client.get_object(**kw)


@pytest.fixture
def published(s3_env: RcloneS3, bucket: str, checkpoint: Checkpoint) -> str:
    publish(checkpoint, f"s3://{bucket}/dl/", s3_env.endpoint)
    return "dl/"


def test_the_zero_copy_path_is_the_one_in_use(
    s3_env: RcloneS3,
    bucket: str,
    published: str,
    checkpoint: Checkpoint,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the installed botocore and urllib3 every range is received by readinto (if a
    library update changed their shape, the public path would take over silently: this
    test says so instead)."""
    used: dict[str, int] = {"into": 0, "public": 0}
    into, public = Downloader._receive_into, Downloader._receive

    def count(name: str, fn: Any) -> Any:
        def wrapped(*a: Any, **kw: Any) -> Any:
            used[name] += 1
            return fn(*a, **kw)

        return wrapped

    monkeypatch.setattr(Downloader, "_receive_into", count("into", into))
    monkeypatch.setattr(Downloader, "_receive", count("public", public))
    items = [
        DownloadItem(published + k, tmp_path / k, len(v), checkpoint.shas[k])
        for k, v in checkpoint.files.items()
    ]
    dl = downloader(s3_env.endpoint, bucket, True)
    assert len(dl.download(items)) == len(items)
    for k, v in checkpoint.files.items():
        assert (tmp_path / k).read_bytes() == v
    ranges = sum(max(1, -(-len(v) // PART)) for v in checkpoint.files.values())
    assert used == {"into": ranges, "public": 0}
    # Each connection went back to urllib3's pool once its response had ended: no more
    # connections than threads for all the HEADs and ranges (botocore internals, read only).
    manager = dl.client._endpoint.http_session._manager
    [pool] = [manager.pools[k] for k in manager.pools.keys()]
    assert pool.num_requests == len(items) + ranges
    assert pool.num_connections <= 4


@pytest.mark.parametrize("zero_copy", [True, False], ids=["zero-copy", "public"])
@pytest.mark.parametrize("nth", [1, 2, 3], ids=["first-range", "middle-range", "last-range"])
def test_a_flipped_byte_in_any_range_is_rejected(
    s3_env: RcloneS3,
    bucket: str,
    proxy: FaultProxy,
    published: str,
    checkpoint: Checkpoint,
    tmp_path: Path,
    zero_copy: bool,
    nth: int,
) -> None:
    rule = proxy.add_rule(
        FaultRule(action="corrupt", operation="GetObject", path=KEY + "$", nth=nth)
    )
    dl = downloader(proxy.endpoint, bucket, zero_copy, concurrency=1)  # ranges in order
    with pytest.raises(IntegrityError) as err:
        dl.download([item(checkpoint, published, tmp_path)])
    assert rule.injected == 1
    assert err.value.reason == "IntegrityError" and err.value.permanent
    assert "sha256 mismatch" in err.value.message and KEY in err.value.message
    assert not (tmp_path / KEY).exists()
    assert not list(tmp_path.glob("*.part"))


@pytest.mark.parametrize("zero_copy", [True, False], ids=["zero-copy", "public"])
def test_a_truncated_range_is_resumed_with_every_byte_intact(
    s3_env: RcloneS3,
    bucket: str,
    proxy: FaultProxy,
    published: str,
    checkpoint: Checkpoint,
    tmp_path: Path,
    zero_copy: bool,
) -> None:
    rule = proxy.add_rule(
        FaultRule(action="truncate", operation="GetObject", path=KEY + "$", nth=[1, 3])
    )
    dl = downloader(proxy.endpoint, bucket, zero_copy)
    assert len(dl.download([item(checkpoint, published, tmp_path)])) == 1
    assert rule.injected == 2
    assert (tmp_path / KEY).read_bytes() == checkpoint.files[KEY]
    # Three ranges, two of them asked for again (from where they broke off).
    gets = [r for r in proxy.records() if r.operation == "GetObject"]
    assert len(gets) == 3 + 2


@pytest.mark.parametrize("zero_copy", [True, False], ids=["zero-copy", "public"])
def test_more_bytes_than_asked_for_are_refused(
    s3_env: RcloneS3,
    bucket: str,
    published: str,
    checkpoint: Checkpoint,
    tmp_path: Path,
    zero_copy: bool,
) -> None:
    """A server that ignores the Range header answers with the whole object: the range is
    refused before any byte is written (a client wrapper drops the header here; the
    server and its answer are real)."""
    dl = downloader(s3_env.endpoint, bucket, zero_copy)
    dl.client = IgnoresRange(dl.client)
    with pytest.raises(PreshardError) as err:
        dl.download([item(checkpoint, published, tmp_path)])
    assert err.value.reason == "IntegrityError"
    assert "more than asked for" in err.value.message
    assert not (tmp_path / KEY).exists()


def test_a_range_read_back_from_the_file_is_hashed_as_written(tmp_path: Path) -> None:
    """A range that arrives ahead of the hash is hashed later from the file: a byte
    flipped in it (as received) changes the digest."""
    data = os.urandom(3 * 2**20)
    bad = bytearray(data)
    bad[2 * 2**20 + 5] ^= 0x01
    path = tmp_path / "f"
    path.write_bytes(b"\0" * len(data))
    fd = os.open(path, os.O_RDWR)
    try:
        h = SequentialHasher(fd, len(data))
        step = 2**20
        for start in (2 * step, step, 0):  # the last range first: read back from the file
            chunk = bytes(bad[start : start + step])
            os.pwrite(fd, chunk, start)
            h.written(start, chunk)
        assert h.read_back == 2 * step  # the two ranges that came ahead of the hash
        assert h.hexdigest() == hashlib.sha256(bytes(bad)).hexdigest()
        assert h.hexdigest() != hashlib.sha256(data).hexdigest()
    finally:
        os.close(fd)
