"""The serving gate as serving init containers run it: ``preshard check`` and ``preshard
fetch --manifest-sha256 ... --tensor-parallel-size ...``, the real CLI in a subprocess
against ``rclone serve s3``. Each refusal is shown on a subtle change that must be caught."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from preshard.core.manifest import MANIFEST_NAME
from preshard.worker.store import publication
from preshard_dev.s3server import RcloneS3

from .conftest import (
    MANIFEST_FIELDS,
    Checkpoint,
    client_env,
    error_lines,
    publish,
    read_object,
    run_cli,
)

RANK0 = "model-rank-0-part-0.safetensors"
RANK1 = "model-rank-1-part-0.safetensors"


@pytest.fixture
def published(s3_env: RcloneS3, bucket: str, checkpoint: Checkpoint) -> tuple[str, str, str]:
    """(uri, bucket, prefix) of a published TP=2 checkpoint."""
    prefix = "llama/tp2/"
    publish(checkpoint, f"s3://{bucket}/{prefix}", s3_env.endpoint)
    return f"s3://{bucket}/{prefix}", bucket, prefix


def pin_of(s3: RcloneS3, bucket: str, prefix: str) -> str:
    return hashlib.sha256(read_object(s3, bucket, prefix + MANIFEST_NAME)).hexdigest()


def check(s3: RcloneS3, uri: str, pin: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_cli(
        "check", "--from", uri, "--manifest-sha256", pin, "--tensor-parallel-size", "2",
        *extra, env=client_env(s3),
    )  # fmt: skip


def replace_shard_and_rewrite_manifest(s3: RcloneS3, bucket: str, prefix: str) -> None:
    """A forged checkpoint: another rank-1 shard of the same size, and the manifest
    rewritten so that its sha256 matches (every per-file check then passes)."""
    client = s3.client()
    old = read_object(s3, bucket, prefix + RANK1)
    new = bytes(b ^ 0xFF for b in old[:64]) + old[64:]
    client.put_object(Bucket=bucket, Key=prefix + RANK1, Body=new)
    manifest = json.loads(read_object(s3, bucket, prefix + MANIFEST_NAME))
    for f in manifest["files"]:
        if f["key"] == RANK1:
            f["sha256"] = hashlib.sha256(new).hexdigest()
    body = (json.dumps(manifest, indent=2) + "\n").encode()
    client.put_object(Bucket=bucket, Key=prefix + MANIFEST_NAME, Body=body)


def test_check_passes_a_published_checkpoint(s3: RcloneS3, published: tuple[str, str, str]) -> None:
    uri, bucket, prefix = published
    proc = check(s3, uri, pin_of(s3, bucket, prefix))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "manifest matches the pin" in out and "TP 2 x PP 1" in out
    assert "vLLM 0.32.0" in out and "stateFormat raw" in out
    assert "4 objects present" in out


def test_replaced_shard_with_rewritten_manifest_fails_fetch_and_check_when_pinned(
    s3: RcloneS3, published: tuple[str, str, str], tmp_path: Path
) -> None:
    uri, bucket, prefix = published
    pin = pin_of(s3, bucket, prefix)
    replace_shard_and_rewrite_manifest(s3, bucket, prefix)
    env = client_env(s3)
    # Without the pin the forgery passes fetch (every file matches the new manifest)...
    proc = run_cli("fetch", "--from", uri, "--to", str(tmp_path / "unpinned"), env=env)
    assert proc.returncode == 0, proc.stderr
    # ...with the pin, fetch refuses before downloading anything
    dest = tmp_path / "pinned"
    proc = run_cli("fetch", "--from", uri, "--to", str(dest), "--manifest-sha256", pin, env=env)
    assert proc.returncode == 3, proc.stderr
    [line] = error_lines(proc)
    assert f"not the pinned {pin}" in line and "Do not serve it" in line
    assert not dest.exists()
    proc = check(s3, uri, pin)
    assert proc.returncode == 3
    [line] = error_lines(proc)
    assert f"not the pinned {pin}" in line


def test_check_refuses_another_parallel_size(s3: RcloneS3, published: tuple[str, str, str]) -> None:
    uri, bucket, prefix = published
    pin = pin_of(s3, bucket, prefix)
    proc = run_cli(
        "check", "--from", uri, "--manifest-sha256", pin, "--tensor-parallel-size", "4",
        env=client_env(s3),
    )  # fmt: skip
    assert proc.returncode == 3
    [line] = error_lines(proc)
    assert "sharded for tensor-parallel size 2, not 4" in line
    proc = check(s3, uri, pin, "--pipeline-parallel-size", "2")
    assert proc.returncode == 3
    assert "pipeline-parallel size 1, not 2" in error_lines(proc)[0]


@pytest.mark.parametrize("change", ["deleted", "one byte shorter"])
def test_check_refuses_a_missing_or_resized_object(
    s3: RcloneS3, published: tuple[str, str, str], change: str
) -> None:
    uri, bucket, prefix = published
    pin = pin_of(s3, bucket, prefix)
    client = s3.client()
    if change == "deleted":
        client.delete_object(Bucket=bucket, Key=prefix + RANK0)
        expected = f"{RANK0}: missing"
    else:
        body = read_object(s3, bucket, prefix + RANK0)
        client.put_object(Bucket=bucket, Key=prefix + RANK0, Body=body[:-1])
        expected = f"{RANK0}: size {len(body) - 1} != manifest {len(body)}"
    proc = check(s3, uri, pin)
    assert proc.returncode == 3
    [line] = error_lines(proc)
    assert expected in line and "1 of 4 objects" in line


def test_check_refuses_an_old_serving_vllm(s3: RcloneS3, published: tuple[str, str, str]) -> None:
    uri, bucket, prefix = published
    proc = check(s3, uri, pin_of(s3, bucket, prefix), "--serving-vllm-version", "0.31.2")
    assert proc.returncode == 3
    [line] = error_lines(proc)
    assert "vLLM 0.31.2 is older than 0.32.0" in line


def test_usage_errors_exit_2(s3: RcloneS3, published: tuple[str, str, str]) -> None:
    uri, _, _ = published
    env = client_env(s3)
    for args in (
        ["check", "--from", uri, "--manifest-sha256", "A" * 64, "-tp", "2"],  # not lowercase
        ["check", "--from", uri, "--manifest-sha256", "a" * 64],  # no TP
        ["fetch", "--from", uri, "--to", "/tmp/x", "--rank", "0", "--node-rank", "0"],
        ["fetch", "--from", uri, "--to", "/tmp/x", "--nodes", "0", "--node-rank", "0"],
        ["fetch", "--from", uri, "--to", "/tmp/x", "--node-rank", "1"],  # no --nodes
        ["fetch", "--from", uri, "--to", "/tmp/x", "--nodes", "2"],  # no --node-rank
    ):
        proc = run_cli(*args, env=env)
        assert proc.returncode == 2, (args, proc.stderr)


def test_fetch_gate_and_node_ranks(
    s3: RcloneS3, published: tuple[str, str, str], checkpoint: Checkpoint, tmp_path: Path
) -> None:
    uri, bucket, prefix = published
    pin = pin_of(s3, bucket, prefix)
    env = client_env(s3)
    dest = tmp_path / "node1"
    proc = run_cli(
        "fetch", "--from", uri, "--to", str(dest), "--manifest-sha256", pin,
        "--tensor-parallel-size", "2", "--pipeline-parallel-size", "1",
        "--node-rank", "1", "--nodes", "2", env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "node 1 of 2: ranks 1..1 of 2" in proc.stdout
    assert "manifest matches the pin" in proc.stdout
    got = {p.name for p in dest.iterdir()}
    assert got == {RANK1, "config.json", "tokenizer.json", MANIFEST_NAME}
    assert (dest / RANK1).read_bytes() == checkpoint.files[RANK1]
    # the gate runs before anything is downloaded: a wrong TP leaves no files
    bad = tmp_path / "bad"
    proc = run_cli(
        "fetch", "--from", uri, "--to", str(bad), "--manifest-sha256", pin,
        "--tensor-parallel-size", "1", env=env,
    )  # fmt: skip
    assert proc.returncode == 3
    assert "sharded for tensor-parallel size 2, not 1" in error_lines(proc)[0]
    assert not bad.exists()
    proc = run_cli(
        "fetch", "--from", uri, "--to", str(bad), "--node-rank", "0", "--nodes", "3", env=env
    )
    assert proc.returncode == 3
    assert "--nodes 3 does not divide this checkpoint's 2 ranks" in error_lines(proc)[0]


@pytest.mark.parametrize(
    ("converted_on", "ok"),
    [({"platform": "cpu"}, True), ({"platform": "cuda", "device": "NVIDIA H100 80GB HBM3"}, False)],
)
def test_processed_state_loads_only_on_the_platform_it_was_converted_on(
    s3_env: RcloneS3, bucket: str, checkpoint: Checkpoint, converted_on: dict[str, str], ok: bool
) -> None:
    """The platform comes from the vLLM installed here (CPU build): a processed checkpoint
    converted on CPU passes, one converted on a GPU is refused with what to do."""
    uri = f"s3://{bucket}/processed/"
    publication.publish(
        checkpoint.path,
        uri,
        manifest_fields={
            **MANIFEST_FIELDS,
            "state_format": "processed",
            "converted_on": converted_on,
        },
        owner="ns/test/uid-1",
        endpoint_url=s3_env.endpoint,
    )
    proc = check(s3_env, uri, pin_of(s3_env, bucket, "processed/"))
    if ok:
        assert proc.returncode == 0, proc.stderr
        assert "stateFormat processed" in proc.stdout
    else:
        assert proc.returncode == 3
        [line] = error_lines(proc)
        assert (
            "kernel layout of cuda (NVIDIA H100 80GB HBM3)" in line and "this node is cpu" in line
        )
        assert "re-convert" in line


def test_check_refuses_a_foreign_shard_that_vllm_would_stream_too(
    s3: RcloneS3, published: tuple[str, str, str]
) -> None:
    uri, bucket, prefix = published
    pin = pin_of(s3, bucket, prefix)
    s3.client().put_object(
        Bucket=bucket, Key=prefix + "old/model-rank-1-part-0.safetensors", Body=b"x"
    )
    proc = check(s3, uri, pin)
    assert proc.returncode == 3
    [line] = error_lines(proc)
    assert "vLLM would not stream" in line and "old/model-rank-1-part-0.safetensors" in line
    # the local copy reads only what the manifest lists: not affected
    proc = check(s3, uri, pin, "--load-format", "sharded_state")
    assert proc.returncode == 0, proc.stderr
