"""The download integrity paths against a real S3 server (rclone serve s3 on 127.0.0.1): a
download is hashed as it arrives and a damaged byte is caught. (The background upload,
formerly ``transfer.start_upload`` here, is ``publication.Publication``: tests/s3/test_publication.py.)"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from preshard.core.errors import PreshardError
from preshard.worker.store import s3 as s3mod
from preshard.worker.store.download import (
    Downloader,
    DownloadItem,
    SequentialHasher,
)
from preshard_dev.faultproxy import FaultProxy, FaultRule
from preshard_dev.s3server import RcloneS3

from .conftest import PART, Checkpoint, publish

OWNER = "ns/test/uid-1"  # the owner conftest.publish writes


def test_download_hashes_as_it_arrives_and_catches_a_flipped_byte(
    s3_env: RcloneS3, bucket: str, proxy: FaultProxy, checkpoint: Checkpoint, tmp_path: Path
) -> None:
    uri = f"s3://{bucket}/down/"
    publish(checkpoint, uri, s3_env.endpoint)
    client = s3mod.make_client(s3mod.output_settings(proxy.endpoint))
    items = [
        DownloadItem("down/" + k, tmp_path / "ok" / k, len(v), checkpoint.shas[k])
        for k, v in checkpoint.files.items()
    ]
    dl = Downloader(client, bucket, concurrency=4, part_size=PART)
    assert len(dl.download(items)) == len(items)
    for k, v in checkpoint.files.items():
        assert (tmp_path / "ok" / k).read_bytes() == v
    # One byte flipped in the last range of a multipart file: only the sha256 catches it.
    key = "model-rank-0-part-0.safetensors"
    proxy.add_rule(
        FaultRule(action="corrupt", operation="GetObject", path=key + "$", query=None, nth=3)
    )
    bad = [
        DownloadItem(
            "down/" + key, tmp_path / "bad" / key, len(checkpoint.files[key]), checkpoint.shas[key]
        )
    ]
    with pytest.raises(PreshardError) as err:
        Downloader(client, bucket, concurrency=4, part_size=PART).download(bad)
    assert "sha256 mismatch" in err.value.message
    assert not (tmp_path / "bad" / key).exists()
    assert not list((tmp_path / "bad").glob("*.part"))


# ------------------------------------------------------------------ SequentialHasher


@pytest.mark.parametrize("order", ["forward", "reverse", "shuffled"])
def test_sequential_hasher_matches_sha256_in_any_arrival_order(tmp_path: Path, order: str) -> None:
    import random

    data = random.Random(7).randbytes(3 * 2**20 + 17)
    path = tmp_path / "f"
    path.write_bytes(b"\0" * len(data))
    fd = os.open(path, os.O_RDWR)
    try:
        h = SequentialHasher(fd, len(data))
        chunks = [(i, data[i : i + 65_537]) for i in range(0, len(data), 65_537)]
        if order == "reverse":
            chunks.reverse()
        elif order == "shuffled":
            random.Random(1).shuffle(chunks)
        for start, chunk in chunks:
            os.pwrite(fd, chunk, start)  # in the file first, as the Downloader does
            h.written(start, chunk)
        assert h.hexdigest() == hashlib.sha256(data).hexdigest()
    finally:
        os.close(fd)


def test_sequential_hasher_from_many_threads(tmp_path: Path) -> None:
    data = os.urandom(8 * 2**20)
    path = tmp_path / "f"
    path.write_bytes(b"\0" * len(data))
    fd = os.open(path, os.O_RDWR)
    try:
        h = SequentialHasher(fd, len(data))
        step = 2**20

        def part(k: int) -> None:
            for i in range(k * step, (k + 1) * step, 2**16):
                os.pwrite(fd, data[i : i + 2**16], i)
                h.written(i, data[i : i + 2**16])

        threads = [threading.Thread(target=part, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert h.hexdigest() == hashlib.sha256(data).hexdigest()
    finally:
        os.close(fd)


def test_sequential_hasher_refuses_a_digest_with_a_gap(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abcdef")
    fd = os.open(path, os.O_RDWR)
    try:
        h = SequentialHasher(fd, 6)
        h.written(0, b"ab")
        h.written(4, b"ef")  # bytes 2-3 never reported
        with pytest.raises(RuntimeError, match="hashed 2 of 6"):
            h.hexdigest()
    finally:
        os.close(fd)
