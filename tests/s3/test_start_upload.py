"""The background upload (transfer.start_upload) against a real S3 server (rclone serve s3
on 127.0.0.1, which verifies Content-MD5), and the upload/download integrity paths:
a corrupted part is rejected by the server and sent again, a download is hashed as it
arrives and a damaged byte is caught."""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time
from pathlib import Path

import botocore.exceptions
import pytest

from preshard.core.errors import PreshardError
from preshard.core.manifest import MANIFEST_NAME
from preshard.worker import s3 as s3mod
from preshard.worker.progress import Reporter
from preshard.worker.transfer import (
    Downloader,
    DownloadItem,
    SequentialHasher,
    remote_sha256,
    start_upload,
)
from preshard_dev.faultproxy import FaultProxy, FaultRule
from preshard_dev.s3server import RcloneS3

from .conftest import PART, Checkpoint, manifest_of, object_keys, publish, read_object

OWNER = "ns/test/uid-1"  # the owner conftest.publish writes


def multipart_uploads(s3: RcloneS3, bucket: str, prefix: str) -> list[str]:
    try:
        resp = s3.client().list_multipart_uploads(Bucket=bucket, Prefix=prefix)
    except botocore.exceptions.ClientError as exc:
        # rclone's answer for a bucket that never had a multipart upload
        if exc.response.get("Error", {}).get("Code") == "NoSuchUpload":
            return []
        raise
    return [u["Key"] for u in resp.get("Uploads", [])]


def test_wait_returns_the_hashes_and_writes_no_manifest(
    s3_env: RcloneS3, bucket: str, proxy: FaultProxy, checkpoint: Checkpoint
) -> None:
    prefix = "bg/"
    handle = start_upload(
        checkpoint.path,
        f"s3://{bucket}/{prefix}",
        owner=OWNER,
        endpoint_url=proxy.endpoint,
        concurrency=4,
        part_size=PART,
    )
    # Progress goes to a Reporter attached at any time (bytes done before are added).
    rep = Reporter("lines", stream=io.StringIO(), machine_stream=io.StringIO())
    rep.stage("Uploading", handle.bytes_total)
    handle.attach(rep)
    got = handle.wait(timeout=60)
    assert rep.bytes_done == checkpoint.total_bytes
    assert got == sorted((k, len(v), checkpoint.shas[k]) for k, v in checkpoint.files.items())
    assert handle.bytes_done == handle.bytes_total == checkpoint.total_bytes
    # Every object is there, byte for byte, with its sha256 recorded; no manifest.
    assert object_keys(s3_env, bucket, prefix) == {prefix + k for k in checkpoint.files}
    client = s3_env.client()
    for key, data in checkpoint.files.items():
        assert read_object(s3_env, bucket, prefix + key) == data
        assert remote_sha256(client, bucket, prefix + key) == (len(data), checkpoint.shas[key])
    assert not any(r.path.endswith(MANIFEST_NAME) and r.method == "PUT" for r in proxy.records())

    # publish afterwards sends no file again: only the manifest.
    proxy.reset_stats()
    publish(checkpoint, f"s3://{bucket}/{prefix}", proxy.endpoint)
    puts = {
        r.path.rsplit("/", 1)[1]
        for r in proxy.records()
        if r.operation in ("PutObject", "UploadPart", "CreateMultipartUpload")
    }
    # no file again: the manifest, and the publication record that publish writes first
    # and removes last (the keys it may clean up, issue 11)
    assert puts == {MANIFEST_NAME, "preshard-publish.json"}
    assert object_keys(s3_env, bucket, prefix) == {prefix + k for k in checkpoint.files} | {
        prefix + MANIFEST_NAME
    }
    assert {f["key"]: f["sha256"] for f in manifest_of(s3_env, bucket, prefix)["files"]} == (
        checkpoint.shas
    )


def test_abort_leaves_no_object_and_no_multipart_upload(
    s3_env: RcloneS3,
    bucket: str,
    proxy: FaultProxy,
    checkpoint: Checkpoint,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    prefix = "abort/"
    # Slow parts (a slow server answering SlowDown, retried by preshard, not botocore):
    # the abort comes while the upload is in flight, after some objects were completed.
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    proxy.add_rule(FaultRule(operation="UploadPart", code="SlowDown", delay=0.3, max_faults=8))
    handle = start_upload(
        checkpoint.path,
        f"s3://{bucket}/{prefix}",
        owner=OWNER,
        endpoint_url=proxy.endpoint,
        concurrency=2,
        part_size=PART,
    )

    def in_flight() -> bool:  # small objects complete, multipart uploads being sent
        ops = [r.operation for r in proxy.records() if r.status is not None]
        return ops.count("PutObject") == 2 and "UploadPart" in ops

    deadline = time.monotonic() + 30
    while not in_flight() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert handle.running()  # the abort comes mid-upload
    assert multipart_uploads(s3_env, bucket, prefix)
    deleted = handle.abort()
    assert deleted, "the objects it completed were not deleted"
    assert object_keys(s3_env, bucket, prefix) == set()
    assert multipart_uploads(s3_env, bucket, prefix) == []
    with pytest.raises(PreshardError) as err:
        handle.wait()
    assert err.value.reason == "UploadAborted"
    assert handle.abort() == deleted  # idempotent


def test_abort_keeps_objects_another_owners_manifest_refers_to(
    s3_env: RcloneS3, bucket: str, checkpoint: Checkpoint
) -> None:
    prefix = "shared/"
    uri = f"s3://{bucket}/{prefix}"
    handle = start_upload(
        checkpoint.path, uri, owner="ns/a/uid-a", endpoint_url=s3_env.endpoint, part_size=PART
    )
    handle.wait(timeout=60)
    # Meanwhile another owner published at this prefix (conftest.publish's owner).
    publish(checkpoint, uri, s3_env.endpoint)
    assert handle.abort() == []
    assert object_keys(s3_env, bucket, prefix) == {prefix + k for k in checkpoint.files} | {
        prefix + MANIFEST_NAME
    }


def test_another_owners_output_is_refused_before_any_byte_moves(
    s3_env: RcloneS3, bucket: str, proxy: FaultProxy, checkpoint: Checkpoint
) -> None:
    uri = f"s3://{bucket}/taken/"
    publish(checkpoint, uri, s3_env.endpoint)
    proxy.reset_stats()
    handle = start_upload(checkpoint.path, uri, owner="ns/other/uid-2", endpoint_url=proxy.endpoint)
    with pytest.raises(PreshardError) as err:
        handle.wait(timeout=60)
    assert err.value.reason == "OutputOwnedByOther"
    assert not [r for r in proxy.records() if r.method in ("PUT", "POST", "DELETE")]
    assert handle.abort() == []


def test_a_replaced_object_withdraws_the_old_manifest_of_the_same_owner(
    s3_env: RcloneS3, bucket: str, checkpoint: Checkpoint
) -> None:
    uri = f"s3://{bucket}/again/"
    publish(checkpoint, uri, s3_env.endpoint)
    rank0 = checkpoint.path / "model-rank-0-part-0.safetensors"
    rank0.write_bytes(os.urandom(rank0.stat().st_size))  # a new conversion, other bytes
    handle = start_upload(checkpoint.path, uri, owner=OWNER, endpoint_url=s3_env.endpoint)
    handle.wait(timeout=60)
    assert "again/" + MANIFEST_NAME not in object_keys(s3_env, bucket, "again/")
    assert read_object(s3_env, bucket, "again/model-rank-0-part-0.safetensors") == (
        rank0.read_bytes()
    )


def test_a_corrupted_part_is_rejected_by_the_server_and_never_stored(
    s3_env: RcloneS3, bucket: str, proxy: FaultProxy, checkpoint: Checkpoint
) -> None:
    """The proxy flips one byte of one part on the way up: rclone checks Content-MD5 and
    answers BadDigest. Then either the part is sent again and the object is
    byte-identical (what S3 does), or, when rclone has dropped the multipart upload
    (NoSuchUpload: a quirk of rclone that depends on the order the parts arrive in),
    the upload fails with a clear error, nothing of the file is stored, and the next
    run sends it whole. Corrupted bytes are never stored either way."""
    key = "model-rank-1-part-0.safetensors"
    uri = f"s3://{bucket}/md5/"
    rule = proxy.add_rule(
        FaultRule(
            action="corrupt",
            operation="UploadPart",
            path=key + "$",
            query={"partNumber": "2"},
            max_faults=1,
        )
    )
    handle = start_upload(
        checkpoint.path, uri, owner=OWNER, endpoint_url=proxy.endpoint, part_size=PART
    )
    try:
        handle.wait(timeout=60)
    except PreshardError as exc:
        assert "NoSuchUpload" in exc.message and uri in exc.message
        assert "md5/" + key not in object_keys(s3_env, bucket, "md5/")
        assert multipart_uploads(s3_env, bucket, "md5/") == []
        start_upload(
            checkpoint.path, uri, owner=OWNER, endpoint_url=proxy.endpoint, part_size=PART
        ).wait(timeout=60)
    assert rule.injected == 1
    rejected = [r for r in proxy.records() if r.operation == "UploadPart" and r.status == 400]
    assert len(rejected) == 1, "the server did not reject the corrupted part"
    assert read_object(s3_env, bucket, "md5/" + key) == checkpoint.files[key]


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
