"""Fixtures: a real S3 server on 127.0.0.1 (``rclone serve s3``, which verifies
Content-MD5), the fault proxy in front of it, a small multi-file checkpoint, and the
real ``preshard`` CLI as a subprocess."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import botocore.exceptions
import pytest

from preshard.core.manifest import MANIFEST_NAME
from preshard.worker.store import publication
from preshard_dev.faultproxy import FaultProxy
from preshard_dev.s3server import MotoS3, RcloneS3, S3Server

MiB = 2**20
PART = 5 * MiB  # S3's minimum part size: small files still give several parts

MANIFEST_FIELDS = {
    "source_uri": "hf://test-org/tiny-llama@main",
    "tensor_parallel_size": 2,
    "pipeline_parallel_size": 1,
    "vllm_version": "0.32.0",
    "dtype": "bfloat16",
}


@pytest.fixture(scope="session")
def s3() -> Iterator[RcloneS3]:
    with RcloneS3() as server:
        yield server  # type: ignore[misc]


@pytest.fixture
def bucket(s3: RcloneS3) -> str:
    name = "t-" + uuid.uuid4().hex[:10]
    # Through the API: RcloneS3.create_bucket makes a folder, which rclone's directory
    # cache does not see once it has listed the root (so only before the first request).
    s3.client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def proxy(s3: RcloneS3) -> Iterator[FaultProxy]:
    with FaultProxy(s3.endpoint, seed=1) as p:
        yield p


@pytest.fixture
def s3_env(s3: RcloneS3, monkeypatch: pytest.MonkeyPatch) -> RcloneS3:
    """The server's credentials in this process's environment (for in-process publish)."""
    for k, v in client_env(s3).items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3


def client_env(s3: S3Server, endpoint: str | None = None) -> dict[str, str]:
    env = s3.env()
    if endpoint:
        env["AWS_ENDPOINT_URL_S3"] = endpoint
    # Never read the machine's AWS config or instance metadata.
    env |= {
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    return env


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Checkpoint:
    """A local directory shaped like a converted TP=2 checkpoint (random bytes)."""

    path: Path
    files: dict[str, bytes]

    @property
    def shas(self) -> dict[str, str]:
        return {k: sha256(v) for k, v in self.files.items()}

    @property
    def total_bytes(self) -> int:
        return sum(len(v) for v in self.files.values())


def make_checkpoint(path: Path, sizes: dict[str, int] | None = None, seed: int = 0) -> Checkpoint:
    rng = random.Random(seed)
    sizes = sizes or {
        # Two multipart files (3 parts each at 5 MiB, odd last parts) and small files.
        "model-rank-0-part-0.safetensors": 2 * PART + 123_457,
        "model-rank-1-part-0.safetensors": 2 * PART + 98_765,
        "tokenizer.json": 20_000,
    }
    files: dict[str, bytes] = {
        "config.json": json.dumps({"model_type": "llama", "seed": seed}).encode(),
    }
    for name, size in sizes.items():
        files[name] = rng.randbytes(size)
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return Checkpoint(path, files)


@pytest.fixture
def checkpoint(tmp_path: Path) -> Checkpoint:
    return make_checkpoint(tmp_path / "shards")


def publish(ckpt: Checkpoint, uri: str, endpoint: str, **kw: Any) -> dict[str, Any]:
    """publication.publish (what ``preshard convert`` runs last) with small parts."""
    kw.setdefault("part_size", PART)
    kw.setdefault("concurrency", 4)
    kw.setdefault("owner", "ns/test/uid-1")
    return publication.publish(
        ckpt.path,
        uri,
        manifest_fields=dict(MANIFEST_FIELDS),
        endpoint_url=endpoint,
        **kw,
    )


def read_object(s3: S3Server, bucket: str, key: str) -> bytes:
    return bytes(s3.client().get_object(Bucket=bucket, Key=key)["Body"].read())


def multipart_uploads(s3: S3Server, bucket: str, prefix: str) -> list[str]:
    """Keys of the unfinished multipart uploads under ``prefix``."""
    try:
        resp = s3.client().list_multipart_uploads(Bucket=bucket, Prefix=prefix)
    except botocore.exceptions.ClientError as exc:
        # rclone's answer for a bucket that never had a multipart upload
        if exc.response.get("Error", {}).get("Code") == "NoSuchUpload":
            return []
        raise
    return [u["Key"] for u in resp.get("Uploads", [])]


def object_keys(s3: S3Server, bucket: str, prefix: str = "") -> set[str]:
    resp = s3.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return {o["Key"] for o in resp.get("Contents", [])}


def manifest_of(s3: S3Server, bucket: str, prefix: str) -> dict[str, Any]:
    return dict(json.loads(read_object(s3, bucket, prefix + MANIFEST_NAME)))


def run_cli(
    *args: str, env: dict[str, str], secret: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """The real ``preshard`` console entry point in a fresh process.

    Every run is also checked for the properties every CLI error must have: no
    traceback, and the secret key never printed.
    """
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "PRESHARD_")) and k != "PYTHONWARNINGS"
    }
    proc = subprocess.run(
        [sys.executable, "-m", "preshard.cli", *args],
        env=base | env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out
    for value in {secret, env.get("AWS_SECRET_ACCESS_KEY")} - {None, ""}:
        assert value not in out, "a secret key appeared in the CLI output"
    return proc


def error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """The ``preshard: error:`` lines (log lines have timestamps and are not errors)."""
    return [line for line in proc.stderr.splitlines() if line.startswith("preshard: error:")]


@pytest.fixture(scope="session")
def moto() -> Iterator[MotoS3]:
    with MotoS3() as server:
        yield server  # type: ignore[misc]


@pytest.fixture(params=["rclone", "moto"])
def server(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """Each real S3 server in turn (rclone serve s3, moto), its credentials in this
    process's environment."""
    srv: S3Server = request.getfixturevalue("s3" if request.param == "rclone" else "moto")
    for k, v in client_env(srv).items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return srv


@pytest.fixture
def any_bucket(server: S3Server) -> str:
    name = "t-" + uuid.uuid4().hex[:10]
    server.client().create_bucket(Bucket=name)
    return name
