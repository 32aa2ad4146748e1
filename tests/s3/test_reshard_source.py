"""A published checkpoint on S3 read back as the original tensors (re-shard source):
every rank file hashed once against the manifest, then only the byte spans of the saved
tensors that hold each needed region fetched with ranged GETs pinned to the hashed
object's ETag. Real rclone S3 server on loopback; the checkpoint is built as in
tests/unit/test_worker_reshard_source.py (the real LoadTracer, no vLLM)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from preshard.worker.sources.checkpoint import CheckpointSource, open_checkpoint
from preshard.worker.sources.ranged import S3Reader
from preshard.worker.verify.shards import VerificationFailed
from preshard_dev.s3server import RcloneS3
from tests.unit.test_worker_reshard_source import bits, make_checkpoint, original


class CountingClient:
    """The real boto3 client, counting the bytes of ranged GETs (a spy, not a mock)."""

    def __init__(self, client: Any) -> None:
        self.client, self.ranged = client, 0

    def get_object(self, **kw: Any) -> Any:
        resp = self.client.get_object(**kw)
        if "Range" in kw:
            self.ranged += int(resp["ContentLength"])
        return resp


def upload(s3: RcloneS3, bucket: str, path: Path, prefix: str) -> None:
    client = s3.client()
    for p in sorted(path.iterdir()):
        client.upload_file(str(p), bucket, prefix + p.name)


def test_every_tensor_from_s3_by_range(
    s3_env: RcloneS3, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = original()
    make_checkpoint(tmp_path / "ckpt", src)
    upload(s3_env, bucket, tmp_path / "ckpt", "ckpt/tp2/")
    uri = f"s3://{bucket}/ckpt/tp2/"
    assert open_checkpoint(f"s3://{bucket}/ckpt/") is None  # no manifest there
    source = open_checkpoint(uri)
    assert isinstance(source, CheckpointSource) and isinstance(source.reader, S3Reader)
    spy = CountingClient(source.reader.client)
    source.reader.client = spy
    for name, t in src.items():
        if name != "lm_head.weight":  # tied: not in the checkpoint
            assert torch.equal(bits(source.read(name)), bits(t)), name
    # replicated regions are read once: the norm from one rank only; headers + data spans
    # stay below the rank files' total size
    total = sum(
        (tmp_path / "ckpt" / f).stat().st_size
        for f in ("model-rank-0-part-0.safetensors", "model-rank-1-part-0.safetensors")
    )
    assert 0 < spy.ranged < total
    source.close()


def test_an_object_replaced_after_it_was_hashed_is_refused(
    s3_env: RcloneS3, bucket: str, tmp_path: Path
) -> None:
    src = original()
    make_checkpoint(tmp_path / "ckpt", src)
    upload(s3_env, bucket, tmp_path / "ckpt", "c/")
    source = open_checkpoint(f"s3://{bucket}/c/")
    assert source is not None
    source.read("model.norm.weight")  # hashes rank 0's file, pins its ETag
    # the same object replaced (other bytes) between the hash and the next range
    data = bytearray((tmp_path / "ckpt" / "model-rank-0-part-0.safetensors").read_bytes())
    data[-1] ^= 0xFF
    s3_env.client().put_object(
        Bucket=bucket, Key="c/model-rank-0-part-0.safetensors", Body=bytes(data)
    )
    with pytest.raises(VerificationFailed, match="changed while it was read"):
        source.read("model.layers.0.mlp.down_proj.weight")
