"""Fetching an S3 source into a reused work dir (fetch.fetch_source, what ``preshard
convert`` runs first) against rclone: a resumed fetch of the same source keeps what it
has, another source never inherits the previous one's files."""

from __future__ import annotations

from pathlib import Path

from preshard.worker.store import fetch
from preshard_dev.s3server import RcloneS3


def put_model(s3: RcloneS3, bucket: str, prefix: str, fill: bytes) -> None:
    c = s3.client()
    c.put_object(Bucket=bucket, Key=prefix + "config.json", Body=b'{"model_type": "llama"}')
    c.put_object(Bucket=bucket, Key=prefix + "model.safetensors", Body=fill * 4096)


def test_another_source_in_a_reused_work_dir_gets_its_own_files(
    s3_env: RcloneS3, bucket: str, tmp_path: Path
) -> None:
    put_model(s3_env, bucket, "a/", b"A")
    put_model(s3_env, bucket, "b/", b"B")  # same names and sizes, other bytes
    dest = tmp_path / "work" / "source"
    fetch.fetch_source(f"s3://{bucket}/a/", dest, endpoint_url=s3_env.endpoint)
    assert (dest / "model.safetensors").read_bytes() == b"A" * 4096
    (dest / "stray.txt").write_text("left by the first run")
    fetch.fetch_source(f"s3://{bucket}/b/", dest, endpoint_url=s3_env.endpoint)
    assert (dest / "model.safetensors").read_bytes() == b"B" * 4096
    assert not (dest / "stray.txt").exists()


def test_the_same_source_resumes_without_starting_over(
    s3_env: RcloneS3, bucket: str, tmp_path: Path
) -> None:
    put_model(s3_env, bucket, "a/", b"A")
    dest = tmp_path / "work" / "source"
    fetch.fetch_source(f"s3://{bucket}/a/", dest, endpoint_url=s3_env.endpoint)
    (dest / "keep.txt").write_text("same source: the directory is kept")
    fetch.fetch_source(f"s3://{bucket}/a/", dest, endpoint_url=s3_env.endpoint)
    assert (dest / "keep.txt").exists()
    assert (dest / "model.safetensors").read_bytes() == b"A" * 4096
