"""Publishing to a real S3 server: multipart uploads with Content-MD5, the manifest last,
resumption after an interrupted upload."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from preshard.core.contract import PUBLICATION_RECORD_NAME
from preshard.core.errors import PreshardError
from preshard.core.manifest import MANIFEST_NAME, Manifest
from preshard.worker.store.transfer import remote_sha256
from preshard_dev.faultproxy import FaultProxy, FaultRule
from preshard_dev.s3server import RcloneS3

from .conftest import (
    PART,
    Checkpoint,
    client_env,
    manifest_of,
    object_keys,
    publish,
    read_object,
    run_cli,
    sha256,
)

WRITES = {"PutObject", "UploadPart", "CreateMultipartUpload", "CompleteMultipartUpload"}


def writes_by_key(proxy: FaultProxy, prefix: str) -> dict[str, list[str]]:
    """key (relative to prefix) -> the write operations the proxy forwarded for it."""
    out: dict[str, list[str]] = {}
    for r in proxy.records():
        if r.operation in WRITES and r.fault is None:
            key = r.path.split("/", 2)[2]
            out.setdefault(key.removeprefix(prefix), []).append(r.operation)
    return out


def parts_of(size: int) -> int:
    return -(-size // PART)


def test_publish_multipart_then_manifest_last(
    s3_env: RcloneS3, bucket: str, proxy: FaultProxy, checkpoint: Checkpoint
) -> None:
    prefix = "llama/tp2/"
    artifact = publish(checkpoint, f"s3://{bucket}/{prefix}", proxy.endpoint)

    # Every object is there and byte-identical; nothing else is.
    assert object_keys(s3_env, bucket) == {prefix + k for k in checkpoint.files} | {
        prefix + MANIFEST_NAME
    }
    for key, data in checkpoint.files.items():
        assert sha256(read_object(s3_env, bucket, prefix + key)) == sha256(data), key

    # Large files went up in 5 MiB parts, small ones in one PUT each.
    writes = writes_by_key(proxy, prefix)
    for key, data in checkpoint.files.items():
        if len(data) > PART:
            assert writes[key].count("UploadPart") == parts_of(len(data)) >= 3, key
            assert writes[key].count("CreateMultipartUpload") == 1
            assert writes[key].count("CompleteMultipartUpload") == 1
        else:
            assert writes[key] == ["PutObject"], key

    # The manifest is the very last write, and describes every file exactly.
    last_write = [r for r in proxy.records() if r.operation in WRITES][-1]
    assert last_write.path == f"/{bucket}/{prefix}{MANIFEST_NAME}"
    assert last_write.operation == "PutObject"
    raw = manifest_of(s3_env, bucket, prefix)
    assert {f["key"]: (f["size"], f["sha256"]) for f in raw["files"]} == {
        k: (len(v), sha256(v)) for k, v in checkpoint.files.items()
    }
    manifest = Manifest.from_json(read_object(s3_env, bucket, prefix + MANIFEST_NAME))
    assert manifest.tensor_parallel_size == 2
    assert [f.key for f in manifest.rank_files(1)] == ["model-rank-1-part-0.safetensors"]
    assert manifest.owner == "ns/test/uid-1"

    # status.artifact
    assert artifact["uri"] == f"s3://{bucket}/{prefix}"
    assert artifact["manifestUri"] == f"s3://{bucket}/{prefix}{MANIFEST_NAME}"
    assert artifact["files"] == len(checkpoint.files)
    assert artifact["totalBytes"] == checkpoint.total_bytes
    assert artifact["manifestSha256"] == sha256(read_object(s3_env, bucket, prefix + MANIFEST_NAME))

    # The recorded sha256 (what resumption compares) is on every object.
    client = s3_env.client()
    for key, sha in checkpoint.shas.items():
        assert remote_sha256(client, bucket, prefix + key) == (len(checkpoint.files[key]), sha)


def test_interrupted_upload_leaves_no_manifest_and_resumes(
    s3_env: RcloneS3, bucket: str, proxy: FaultProxy, checkpoint: Checkpoint
) -> None:
    prefix = "resume/"
    uri = f"s3://{bucket}/{prefix}"
    rank0 = "model-rank-0-part-0.safetensors"
    rank1 = "model-rank-1-part-0.safetensors"
    small = [k for k, v in checkpoint.files.items() if len(v) <= PART]
    # One worker: small files first, then rank 0's parts, then rank 1's. The crash comes
    # at rank 1's first part, after rank 0's last part.
    crash_after = len(small) + parts_of(len(checkpoint.files[rank0]))
    with pytest.raises(PreshardError) as err:
        publish(checkpoint, uri, proxy.endpoint, concurrency=1, fail_after_parts=crash_after)
    assert err.value.reason == "InjectedCrash"

    # No manifest: the prefix is not a checkpoint. What was finished is complete, and
    # the publication record records what this owner was writing.
    present = object_keys(s3_env, bucket, prefix)
    assert prefix + MANIFEST_NAME not in present
    assert present == {prefix + k for k in [*small, rank0]} | {prefix + PUBLICATION_RECORD_NAME}
    client = s3_env.client()
    uploads = client.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])
    assert not uploads, "the unfinished multipart upload was not aborted"

    # The re-run sends nothing for files already present with the same size and sha256.
    proxy.reset_stats()
    publish(checkpoint, uri, proxy.endpoint)
    writes = writes_by_key(proxy, prefix)
    assert set(writes) == {rank1, MANIFEST_NAME, PUBLICATION_RECORD_NAME}, writes
    assert writes[rank1].count("UploadPart") == parts_of(len(checkpoint.files[rank1]))
    heads = [r for r in proxy.records() if r.operation == "HeadObject"]
    assert {r.path.rsplit("/", 1)[1] for r in heads} >= {*small, rank0}

    raw = manifest_of(s3_env, bucket, prefix)
    assert {f["key"]: f["sha256"] for f in raw["files"]} == checkpoint.shas
    for key, data in checkpoint.files.items():
        assert read_object(s3_env, bucket, prefix + key) == data, key

    assert prefix + PUBLICATION_RECORD_NAME not in object_keys(s3_env, bucket, prefix)

    # Publishing the same checkpoint again uploads nothing but the manifest (and the
    # publication record, removed again once the manifest is there).
    proxy.reset_stats()
    publish(checkpoint, uri, proxy.endpoint)
    assert set(writes_by_key(proxy, prefix)) == {MANIFEST_NAME, PUBLICATION_RECORD_NAME}
    assert prefix + PUBLICATION_RECORD_NAME not in object_keys(s3_env, bucket, prefix)


def test_resume_replaces_objects_that_do_not_match(
    s3_env: RcloneS3, bucket: str, proxy: FaultProxy, checkpoint: Checkpoint
) -> None:
    """Same size but another sha256 (objects left at this prefix without a manifest):
    replaced, not trusted. An object no manifest of this owner listed is not this
    owner's to delete: it is left in place (readers use only what the manifest lists;
    test_ownership.py covers what a re-publish does delete)."""
    prefix = "stale/"
    client = s3_env.client()
    rank0 = "model-rank-0-part-0.safetensors"
    wrong = bytes(len(checkpoint.files[rank0]))
    client.put_object(
        Bucket=bucket, Key=prefix + rank0, Body=wrong, Metadata={"sha256": sha256(wrong)}
    )
    client.put_object(Bucket=bucket, Key=prefix + "model-rank-2-part-0.safetensors", Body=b"old")
    publish(checkpoint, f"s3://{bucket}/{prefix}", proxy.endpoint)
    writes = writes_by_key(proxy, prefix)
    assert writes[rank0].count("UploadPart") == parts_of(len(wrong))
    assert read_object(s3_env, bucket, prefix + rank0) == checkpoint.files[rank0]
    assert object_keys(s3_env, bucket, prefix) == {prefix + k for k in checkpoint.files} | {
        prefix + MANIFEST_NAME,
        prefix + "model-rank-2-part-0.safetensors",
    }
    assert "model-rank-2-part-0.safetensors" not in {
        f["key"] for f in manifest_of(s3_env, bucket, prefix)["files"]
    }


def test_damaged_and_dropped_uploads_are_sent_again(
    s3_env: RcloneS3, bucket: str, proxy: FaultProxy, checkpoint: Checkpoint
) -> None:
    """Content-MD5 goes with every upload: rclone rejects a body changed on the way
    (BadDigest) and the uploader sends it again; a part cut short by a dropped
    connection never reaches the server and is sent again too."""
    corrupt = proxy.add_rule(FaultRule(action="corrupt", operation="PutObject", nth=1))
    reset = proxy.add_rule(FaultRule(action="reset", operation="UploadPart", nth=[2, 4]))
    publish(checkpoint, f"s3://{bucket}/md5/", proxy.endpoint)
    assert (corrupt.injected, reset.injected) == (1, 2)
    [rejected] = [r for r in proxy.records() if r.fault and "corrupt" in r.fault]
    assert rejected.status == 400  # BadDigest
    for key, data in checkpoint.files.items():
        assert read_object(s3_env, bucket, "md5/" + key) == data, key


def test_a_part_damaged_in_transit_never_becomes_an_object(
    s3_env: RcloneS3, bucket: str, proxy: FaultProxy, checkpoint: Checkpoint
) -> None:
    """A part changed on the way is rejected (BadDigest). rclone then fails the whole
    multipart upload (it streams parts to disk in order), so the publish may end with a
    transient error: never with a corrupt object or a manifest, and the retry (what the
    Job's backoffLimit does) completes."""
    prefix = "part-md5/"
    key = "model-rank-0-part-0.safetensors"
    rule = proxy.add_rule(FaultRule(action="corrupt", operation="UploadPart", path=key, nth=1))
    try:
        publish(checkpoint, f"s3://{bucket}/{prefix}", proxy.endpoint, concurrency=1)
    except PreshardError as exc:
        assert not exc.permanent, exc
        assert prefix + MANIFEST_NAME not in object_keys(s3_env, bucket, prefix)
        assert prefix + key not in object_keys(s3_env, bucket, prefix)
        publish(checkpoint, f"s3://{bucket}/{prefix}", proxy.endpoint)
    assert rule.injected == 1
    for name, data in checkpoint.files.items():
        assert read_object(s3_env, bucket, prefix + name) == data, name


PUBLISH_SCRIPT = """
import sys
from pathlib import Path
from tests.s3.conftest import Checkpoint, publish
publish(Checkpoint(Path(sys.argv[1]), {}), sys.argv[2], sys.argv[3], concurrency=2)
"""


def test_killed_upload_resumes_and_purge_aborts_its_leftovers(
    s3_env: RcloneS3, bucket: str, proxy: FaultProxy, checkpoint: Checkpoint
) -> None:
    """SIGKILL mid-upload (OOM, node loss): no cleanup runs at all. Finished files stay,
    the re-run skips them, and `preshard purge` aborts the multipart upload left behind."""
    prefix = "killed/"
    uri = f"s3://{bucket}/{prefix}"
    rank0 = "model-rank-0-part-0.safetensors"
    rank1 = "model-rank-1-part-0.safetensors"
    # Rank 1's parts hang in the proxy, so the kill lands while they are in flight.
    proxy.add_rule(FaultRule(operation="UploadPart", path=rank1, action="reset", delay=60))
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-c", PUBLISH_SCRIPT, str(checkpoint.path), uri, proxy.endpoint],
        cwd=root,
        env=os.environ
        | {
            "PYTHONPATH": os.pathsep.join(
                [str(root), *filter(None, [os.environ.get("PYTHONPATH")])]
            )
        },
    )
    try:
        deadline = time.monotonic() + 30
        while not any(
            r.operation == "CompleteMultipartUpload" and r.path.endswith(rank0)
            for r in proxy.records()
        ):
            assert proc.poll() is None and time.monotonic() < deadline, show_records(proxy)
            time.sleep(0.05)
        time.sleep(0.2)  # let the other small PUT finish too
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    proxy.clear_rules()

    present = object_keys(s3_env, bucket, prefix)
    assert prefix + MANIFEST_NAME not in present
    assert prefix + rank0 in present and prefix + rank1 not in present
    client = s3_env.client()
    leftovers = client.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])
    assert [u["Key"] for u in leftovers] == [prefix + rank1]

    proxy.reset_stats()
    publish(checkpoint, uri, proxy.endpoint)
    writes = writes_by_key(proxy, prefix)
    assert rank0 not in writes and rank1 in writes and MANIFEST_NAME in writes
    for key, data in checkpoint.files.items():
        assert read_object(s3_env, bucket, prefix + key) == data, key

    done = run_cli("purge", "--output", uri, env=client_env(s3_env))
    assert done.returncode == 0, done.stderr
    assert not object_keys(s3_env, bucket, prefix)
    assert not client.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads")


def show_records(proxy: FaultProxy) -> str:
    return "\n".join(f"{r.operation} {r.path} {r.fault} {r.status}" for r in proxy.records())
