"""``publication.Publication`` step by step (begin, start, commit, abort) against a real S3
server (rclone serve s3 on 127.0.0.1, which verifies Content-MD5, through the fault
proxy, which records every request). These replace the tests of the former
``transfer.start_upload``, which uploaded in the background without the publication
record and the neighbour checks."""

from __future__ import annotations

import io
import os
import time

import pytest

from preshard.core.contract import PUBLICATION_RECORD_NAME
from preshard.core.errors import PreshardError
from preshard.core.manifest import MANIFEST_NAME, build_manifest
from preshard.worker.progress import Reporter
from preshard.worker.store import publication as pubmod
from preshard.worker.store.publication import Publication
from preshard.worker.store.records import Journal
from preshard.worker.store.transfer import remote_sha256
from preshard_dev.faultproxy import FaultProxy, FaultRule
from preshard_dev.s3server import RcloneS3

from .conftest import (
    MANIFEST_FIELDS,
    PART,
    Checkpoint,
    manifest_of,
    multipart_uploads,
    object_keys,
    publish,
    read_object,
    sha256,
)

OWNER = "ns/test/uid-1"  # the owner conftest.publish writes


def publication(ckpt: Checkpoint, uri: str, endpoint: str, **kw: object) -> Publication:
    kw.setdefault("owner", OWNER)
    kw.setdefault("concurrency", 4)
    kw.setdefault("part_size", PART)
    return Publication(ckpt.path, uri, endpoint_url=endpoint, **kw)  # type: ignore[arg-type]


def test_start_uploads_in_the_background_and_commit_writes_only_the_manifest(
    s3_env: RcloneS3, bucket: str, proxy: FaultProxy, checkpoint: Checkpoint
) -> None:
    prefix = "bg/"
    pub = publication(checkpoint, f"s3://{bucket}/{prefix}", proxy.endpoint).begin()
    # The record first, before any object: this owner and every key it will write.
    journal = Journal.from_json(read_object(s3_env, bucket, prefix + PUBLICATION_RECORD_NAME))
    assert (journal.owner, journal.keys) == (OWNER, set(checkpoint.files))
    handle = pub.start()
    got = handle.wait(timeout=60)
    assert got == sorted((k, len(v), checkpoint.shas[k]) for k, v in checkpoint.files.items())
    assert handle.bytes_done == handle.bytes_total == checkpoint.total_bytes
    # Every object is there, byte for byte, with its sha256 recorded; no manifest yet.
    assert object_keys(s3_env, bucket, prefix) == {prefix + k for k in checkpoint.files} | {
        prefix + PUBLICATION_RECORD_NAME
    }
    client = s3_env.client()
    for key, data in checkpoint.files.items():
        assert read_object(s3_env, bucket, prefix + key) == data
        assert remote_sha256(client, bucket, prefix + key) == (len(data), checkpoint.shas[key])
    # Progress attached late reports the remainder (nothing here) as its own stage.
    rep = Reporter("lines", stream=io.StringIO(), machine_stream=io.StringIO())
    assert handle.attach(rep) == 0
    assert rep.records[-1].stage == "Uploading" and rep.records[-1].bytes_total == 0

    proxy.reset_stats()
    artifact = pub.commit(dict(MANIFEST_FIELDS), reporter=rep)
    puts = [r.path.rsplit("/", 1)[1] for r in proxy.records() if r.method in ("PUT", "POST")]
    assert puts == [MANIFEST_NAME]  # no file again; the manifest; the record deleted
    assert object_keys(s3_env, bucket, prefix) == {prefix + k for k in checkpoint.files} | {
        prefix + MANIFEST_NAME
    }
    assert {f["key"]: f["sha256"] for f in manifest_of(s3_env, bucket, prefix)["files"]} == (
        checkpoint.shas
    )
    body = read_object(s3_env, bucket, prefix + MANIFEST_NAME)
    assert artifact["manifestSha256"] == sha256(body)
    assert remote_sha256(client, bucket, prefix + MANIFEST_NAME) == (len(body), sha256(body))


def test_abort_mid_upload_leaves_no_object_no_multipart_upload_and_no_record(
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
    pub = publication(checkpoint, f"s3://{bucket}/{prefix}", proxy.endpoint, concurrency=2)
    handle = pub.begin().start()

    def in_flight() -> bool:  # small objects complete, multipart uploads being sent
        ops = [r.operation for r in proxy.records() if r.status is not None]
        return ops.count("PutObject") >= 3 and "UploadPart" in ops  # record + 2 small

    deadline = time.monotonic() + 30
    while not in_flight() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert handle.running()  # the abort comes mid-upload
    assert multipart_uploads(s3_env, bucket, prefix)
    note = pub.abort()
    assert pub.removed, "the objects it completed were not deleted"
    assert note.startswith(f"removed the {len(pub.removed)} object(s) this run had uploaded")
    assert object_keys(s3_env, bucket, prefix) == set()  # the record too: nothing is left
    assert multipart_uploads(s3_env, bucket, prefix) == []
    with pytest.raises(PreshardError) as err:
        handle.wait()
    assert err.value.reason == "UploadAborted"
    assert pub.abort() == note  # idempotent


def test_abort_keeps_what_another_owners_manifest_refers_to_and_never_records_it(
    s3_env: RcloneS3, bucket: str, checkpoint: Checkpoint
) -> None:
    prefix = "shared/"
    uri = f"s3://{bucket}/{prefix}"
    pub = publication(checkpoint, uri, s3_env.endpoint, owner="ns/a/uid-a").begin()
    pub.start().wait(timeout=60)
    # Meanwhile another owner's manifest appeared (a writer that ignores the record),
    # listing two of the objects this run uploaded.
    listed = ["model-rank-0-part-0.safetensors", "model-rank-1-part-0.safetensors"]
    theirs = build_manifest(
        [(k, len(checkpoint.files[k]), checkpoint.shas[k]) for k in listed],
        owner="ns/b/uid-b",
        created_at="2026-12-01T00:00:00Z",
        **MANIFEST_FIELDS,
    )
    s3_env.client().put_object(Bucket=bucket, Key=prefix + MANIFEST_NAME, Body=theirs.to_json())
    note = pub.abort()
    assert "kept 2 that another manifest there refers to" in note
    assert object_keys(s3_env, bucket, prefix) == {prefix + k for k in listed} | {
        prefix + MANIFEST_NAME
    }


def test_abort_rewrites_the_record_to_what_this_owner_still_has(
    s3_env: RcloneS3, bucket: str, tmp_path: object, checkpoint: Checkpoint
) -> None:
    """An earlier checkpoint of the same owner is there: begin withdraws its manifest;
    after an abort the record lists exactly its objects still there (for the next run
    or a purge), not the keys this run never wrote or removed."""
    prefix = "again/"
    uri = f"s3://{bucket}/{prefix}"
    publish(checkpoint, uri, s3_env.endpoint)
    (checkpoint.path / "extra.json").write_text('{"new": true}')  # a key only this run has
    rank0 = checkpoint.path / "model-rank-0-part-0.safetensors"
    rank0.write_bytes(os.urandom(rank0.stat().st_size))  # other bytes for rank 0
    pub = publication(checkpoint, uri, s3_env.endpoint).begin()
    assert prefix + MANIFEST_NAME not in object_keys(s3_env, bucket, prefix)  # withdrawn
    pub.start().wait(timeout=60)
    note = pub.abort()
    # removed: what it uploaded (rank 0's new bytes, extra.json); the others were in place
    assert sorted(k.rsplit("/", 1)[1] for k in pub.removed) == [
        "extra.json",
        "model-rank-0-part-0.safetensors",
    ]
    left = set(checkpoint.files) - {"model-rank-0-part-0.safetensors"}
    journal = Journal.from_json(read_object(s3_env, bucket, prefix + PUBLICATION_RECORD_NAME))
    assert (journal.owner, journal.keys) == (OWNER, left)
    assert (
        f"{PUBLICATION_RECORD_NAME} lists the {len(left)} object(s) of this owner still there"
        in note
    )
    assert object_keys(s3_env, bucket, prefix) == {prefix + k for k in left} | {
        prefix + PUBLICATION_RECORD_NAME
    }
    # ... and a purge by this owner then finds everything it left.
    from preshard.core.uris import parse_uri
    from preshard.worker.commands.purge import purge_prefix
    from preshard.worker.store import s3 as s3mod

    client = s3mod.make_client(s3mod.output_settings(s3_env.endpoint))
    purge_prefix(client, parse_uri(uri), OWNER)
    assert object_keys(s3_env, bucket, prefix) == set()


def test_another_owners_output_is_refused_before_any_byte_moves(
    s3_env: RcloneS3, bucket: str, proxy: FaultProxy, checkpoint: Checkpoint
) -> None:
    uri = f"s3://{bucket}/taken/"
    publish(checkpoint, uri, s3_env.endpoint)
    proxy.reset_stats()
    pub = publication(checkpoint, uri, proxy.endpoint, owner="ns/other/uid-2")
    with pytest.raises(PreshardError) as err:
        pub.begin()
    assert err.value.reason == "OutputOwnedByOther"
    assert not [r for r in proxy.records() if r.method in ("PUT", "POST", "DELETE")]
    assert pub.abort() == ""


def test_a_resumed_publication_reuses_the_objects_already_uploaded(
    s3_env: RcloneS3, bucket: str, proxy: FaultProxy, checkpoint: Checkpoint
) -> None:
    uri = f"s3://{bucket}/resume/"
    # A first run crashes after 2 parts (a stand-in for a killed pod): objects it
    # completed stay, recorded.
    with pytest.raises(PreshardError):
        pubmod.publish(
            checkpoint.path,
            uri,
            manifest_fields=dict(MANIFEST_FIELDS),
            owner=OWNER,
            endpoint_url=s3_env.endpoint,
            concurrency=1,
            part_size=PART,
            fail_after_parts=2,
        )
    there = object_keys(s3_env, bucket, "resume/") - {"resume/" + PUBLICATION_RECORD_NAME}
    assert there and "resume/" + MANIFEST_NAME not in there
    proxy.reset_stats()
    pub = publication(checkpoint, uri, proxy.endpoint).begin()
    pub.start()
    pub.commit(dict(MANIFEST_FIELDS))
    sent = {
        r.path.split("/", 2)[2]
        for r in proxy.records()
        if r.operation in ("PutObject", "UploadPart", "CreateMultipartUpload")
    }
    assert not sent & there, "objects already uploaded were sent again"
    assert {k.rsplit("/", 1)[1] for k in pub.reused} == {k.rsplit("/", 1)[1] for k in there}
    for key, data in checkpoint.files.items():
        assert read_object(s3_env, bucket, "resume/" + key) == data


def test_a_background_upload_runs_at_the_lowest_cpu_priority(
    s3_env: RcloneS3, bucket: str, checkpoint: Checkpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the engine verifies on the same cores, the upload's threads (the handle's
    and every transfer thread) run at niceness +19; a plain publish does not."""
    import threading

    from preshard.worker.store import transfer, upload_handle

    seen: dict[str, int] = {}
    real = transfer.lower_priority

    def spy(nice: int) -> None:
        real(nice)
        tid = threading.get_native_id()
        seen[threading.current_thread().name] = os.getpriority(os.PRIO_PROCESS, tid)

    monkeypatch.setattr(transfer, "lower_priority", spy)
    monkeypatch.setattr(upload_handle, "lower_priority", spy)
    pub = publication(checkpoint, f"s3://{bucket}/nice/", s3_env.endpoint).begin()
    pub.start(background=True).wait(timeout=60)
    assert seen.get("s3-upload") == 19
    assert any(n.startswith("s3-up_") and v == 19 for n, v in seen.items()), seen
    assert any(n.startswith("s3-hash") and v == 19 for n, v in seen.items()), seen
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == 0  # not this one
    pub.commit(dict(MANIFEST_FIELDS))

    seen.clear()
    publish(checkpoint, f"s3://{bucket}/plain/", s3_env.endpoint)
    assert seen and set(seen.values()) == {0}
