"""``preshard fetch`` and ``preshard verify`` as a user (or a serving init container) runs
them: the real console entry point in a subprocess against a real S3 server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from preshard.core.manifest import MANIFEST_NAME
from preshard_dev.s3server import RcloneS3, free_port

from .conftest import (
    Checkpoint,
    client_env,
    error_lines,
    publish,
    read_object,
    run_cli,
    sha256,
)

RANK0 = "model-rank-0-part-0.safetensors"
RANK1 = "model-rank-1-part-0.safetensors"


@pytest.fixture
def published(s3_env: RcloneS3, bucket: str, checkpoint: Checkpoint) -> tuple[str, Checkpoint]:
    uri = f"s3://{bucket}/llama/tp2/"
    publish(checkpoint, uri, s3_env.endpoint)
    return uri, checkpoint


def dir_files(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def test_fetch_downloads_and_verifies_everything(
    s3: RcloneS3, published: tuple[str, Checkpoint], tmp_path: Path
) -> None:
    uri, ckpt = published
    dest = tmp_path / "model"
    env = client_env(s3)
    proc = run_cli("fetch", "--from", uri, "--to", str(dest), "--progress", "lines", env=env)
    assert proc.returncode == 0, proc.stderr
    got = dir_files(dest)
    bucket, prefix = uri[5:].split("/", 1)
    assert got.pop(MANIFEST_NAME) == read_object(s3, bucket, prefix + MANIFEST_NAME)
    assert got == ckpt.files
    assert f"fetched {len(ckpt.files)} files" in proc.stdout
    assert "sha256-verified" in proc.stdout
    assert error_lines(proc) == []

    # A second fetch into the same directory checks the files and downloads nothing.
    proc = run_cli("fetch", "--from", uri, "--to", str(dest), "--progress", "lines", env=env)
    assert proc.returncode == 0, proc.stderr
    assert f"0 downloaded, {len(ckpt.files)} already present" in proc.stdout


def test_fetch_one_rank(s3: RcloneS3, published: tuple[str, Checkpoint], tmp_path: Path) -> None:
    uri, ckpt = published
    dest = tmp_path / "rank1"
    proc = run_cli("fetch", "--from", uri, "--to", str(dest), "--rank", "1", env=client_env(s3))
    assert proc.returncode == 0, proc.stderr
    got = dir_files(dest)
    assert RANK0 not in got
    assert got[RANK1] == ckpt.files[RANK1]
    # Config and tokenizer files go with every rank; the manifest marks the copy complete.
    assert {k for k in got if not k.startswith("model-rank-")} == {
        "config.json",
        "tokenizer.json",
        MANIFEST_NAME,
    }

    proc = run_cli("fetch", "--from", uri, "--to", str(dest), "--rank", "2", env=client_env(s3))
    assert proc.returncode == 3
    [line] = error_lines(proc)
    assert "--rank 2 is outside 0..1" in line


def test_fetch_refuses_a_prefix_without_manifest(
    s3: RcloneS3, bucket: str, checkpoint: Checkpoint, tmp_path: Path
) -> None:
    client = s3.client()
    for key, data in checkpoint.files.items():  # objects, but no manifest: an unfinished upload
        client.put_object(Bucket=bucket, Key=f"half/{key}", Body=data)
    dest = tmp_path / "model"
    proc = run_cli("fetch", "--from", f"s3://{bucket}/half/", "--to", str(dest), env=client_env(s3))
    assert proc.returncode == 3
    [line] = error_lines(proc)
    assert f"has no {MANIFEST_NAME}" in line and "not a published checkpoint" in line
    assert not dest.exists() or not any(p.is_file() for p in dest.rglob("*"))

    proc = run_cli("verify", f"s3://{bucket}/half/", env=client_env(s3))
    assert proc.returncode == 3
    assert "not a published checkpoint" in error_lines(proc)[0]


def test_verify_prints_a_summary(s3: RcloneS3, published: tuple[str, Checkpoint]) -> None:
    uri, ckpt = published
    proc = run_cli("verify", uri, env=client_env(s3))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"checkpoint {uri}" in out
    assert "TP 2 x PP 1" in out and "vLLM 0.32.0" in out and "dtype bfloat16" in out
    for key in ckpt.files:
        assert any(line.split()[:2] == ["ok", key] for line in out.splitlines()), key
    assert out.rstrip().endswith(": OK")
    assert f"{len(ckpt.files)} files" in out

    proc = run_cli("verify", uri, "--json", env=client_env(s3))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["ok"] is True and summary["problems"] == []
    assert summary["files"] == len(ckpt.files)
    assert summary["totalBytes"] == ckpt.total_bytes
    bucket, prefix = uri[5:].split("/", 1)
    assert summary["manifestSha256"] == sha256(read_object(s3, bucket, prefix + MANIFEST_NAME))


def test_a_corrupted_object_fails_fetch_and_verify(
    s3: RcloneS3, published: tuple[str, Checkpoint], tmp_path: Path
) -> None:
    """Same size, other bytes, changed behind S3's back (bit rot, a rogue writer): only
    the sha256 in the manifest can tell."""
    uri, ckpt = published
    bucket, prefix = uri[5:].split("/", 1)
    path = s3.object_path(bucket, prefix + RANK1)
    with open(path, "r+b") as f:
        f.seek(1_000_000)
        byte = f.read(1)
        f.seek(1_000_000)
        f.write(bytes([byte[0] ^ 0x01]))
    assert path.stat().st_size == len(ckpt.files[RANK1])

    proc = run_cli("verify", uri, env=client_env(s3))
    assert proc.returncode == 1
    bad = [line for line in proc.stdout.splitlines() if line.lstrip().startswith("BAD")]
    assert len(bad) == 1 and RANK1 in bad[0] and "sha256 mismatch" in bad[0]
    assert "1 PROBLEM(S)" in proc.stdout
    [line] = error_lines(proc)
    assert "1 of 4 files" in line

    proc = run_cli("verify", uri, "--json", env=client_env(s3))
    assert proc.returncode == 1
    assert [p["key"] for p in json.loads(proc.stdout)["problems"]] == [RANK1]

    dest = tmp_path / "model"
    proc = run_cli("fetch", "--from", uri, "--to", str(dest), env=client_env(s3))
    assert proc.returncode == 3
    [line] = error_lines(proc)
    assert RANK1 in line and "sha256 mismatch" in line
    # Nothing unverified is left under its final name, and the copy is not marked complete.
    assert not (dest / RANK1).exists()
    assert not (dest / MANIFEST_NAME).exists()
    assert not list(dest.glob("*.part"))

    # The other rank's files are intact and can still be fetched on their own.
    proc = run_cli("fetch", "--from", uri, "--to", str(dest), "--rank", "0", env=client_env(s3))
    assert proc.returncode == 0, proc.stderr


def test_a_missing_or_truncated_object_fails_fetch_and_verify(
    s3: RcloneS3, published: tuple[str, Checkpoint], tmp_path: Path
) -> None:
    uri, ckpt = published
    bucket, prefix = uri[5:].split("/", 1)
    client = s3.client()
    client.put_object(Bucket=bucket, Key=prefix + RANK0, Body=ckpt.files[RANK0][:-1000])
    client.delete_object(Bucket=bucket, Key=prefix + RANK1)
    dest = tmp_path / "model"

    proc = run_cli("fetch", "--from", uri, "--to", str(dest), "--rank", "0", env=client_env(s3))
    assert proc.returncode == 3
    [line] = error_lines(proc)
    size = len(ckpt.files[RANK0])
    assert f"{RANK0}: the object in {uri} has {size - 1000} bytes, expected {size}" in line

    proc = run_cli("fetch", "--from", uri, "--to", str(dest), "--rank", "1", env=client_env(s3))
    assert proc.returncode == 3
    [line] = error_lines(proc)
    assert f"{RANK1}: the object is missing from {uri}" in line
    assert not list(dest.glob("model-rank-*"))

    proc = run_cli("verify", uri, "--json", env=client_env(s3))
    assert proc.returncode == 1
    problems = {p["key"]: p["problem"] for p in json.loads(proc.stdout)["problems"]}
    assert problems == {RANK0: f"size {size - 1000} != manifest {size}", RANK1: "missing"}


# ------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("command", ["fetch", "verify"])
def test_unreachable_endpoint(s3: RcloneS3, command: str, tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    env = client_env(s3, endpoint) | {"AWS_MAX_ATTEMPTS": "2"}
    args = ["fetch", "--from", "s3://models/x/", "--to", str(tmp_path)]
    if command == "verify":
        args = ["verify", "s3://models/x/"]
    proc = run_cli(*args, env=env)
    assert proc.returncode == 1  # transient: a Job retries it
    [line] = error_lines(proc)
    assert f"the S3 endpoint at {endpoint} is unreachable" in line
    assert proc.stdout == ""


def test_missing_bucket(s3: RcloneS3, tmp_path: Path) -> None:
    uri = "s3://no-such-bucket-here/llama/"
    for args in (["fetch", "--from", uri, "--to", str(tmp_path)], ["verify", uri]):
        proc = run_cli(*args, env=client_env(s3))
        assert proc.returncode == 3, proc.stderr
        [line] = error_lines(proc)
        assert uri in line and "bucket does not exist" in line


def test_no_credentials(s3: RcloneS3, tmp_path: Path) -> None:
    env = client_env(s3)
    del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    proc = run_cli(
        "fetch", "--from", "s3://models/x/", "--to", str(tmp_path), env=env, secret=s3.secret_key
    )
    assert proc.returncode == 3
    [line] = error_lines(proc)
    assert "no S3 credentials found" in line and "AWS_ACCESS_KEY_ID" in line


def test_wrong_secret_is_never_printed(s3: RcloneS3, bucket: str, tmp_path: Path) -> None:
    wrong = "wrong-secret-" + "f00d" * 8
    env = client_env(s3) | {"AWS_SECRET_ACCESS_KEY": wrong}
    for args in (
        ["-v", "fetch", "--from", f"s3://{bucket}/x/", "--to", str(tmp_path)],
        ["-v", "verify", f"s3://{bucket}/x/", "--json"],
    ):
        proc = run_cli(*args, env=env, secret=s3.secret_key)  # run_cli checks `wrong` too
        assert proc.returncode == 3, proc.stderr
        [line] = error_lines(proc)
        assert "access denied (SignatureDoesNotMatch)" in line
        assert wrong[:12] not in proc.stdout + proc.stderr


def test_not_an_s3_uri(s3: RcloneS3, tmp_path: Path) -> None:
    proc = run_cli("fetch", "--from", "hf://org/model", "--to", str(tmp_path), env=client_env(s3))
    assert proc.returncode == 3
    [line] = error_lines(proc)
    assert "is not an s3:// prefix" in line
