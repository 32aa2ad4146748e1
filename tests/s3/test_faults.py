"""Transient S3 failures injected by the fault proxy (preshard_dev.faultproxy) between
preshard and a real S3 server: publish, fetch and verify complete with every byte
intact, and the faults were really injected."""

from __future__ import annotations

from pathlib import Path

from preshard.core.manifest import MANIFEST_NAME
from preshard_dev.faultproxy import FaultProxy, FaultRule
from preshard_dev.s3server import RcloneS3

from .conftest import (
    Checkpoint,
    client_env,
    error_lines,
    manifest_of,
    publish,
    read_object,
    run_cli,
)


def show(proxy: FaultProxy) -> str:
    return "\n".join(f"{r.operation} {r.path} {r.fault} {r.status}" for r in proxy.records())


def upload_faults() -> list[FaultRule]:
    """5xx and SlowDown on every kind of request a publish sends, a dropped connection."""
    return [
        FaultRule(operation="UploadPart", action="reset", nth=2),
        FaultRule(operation="UploadPart", fraction=0.2, max_faults=2, code="SlowDown"),
        FaultRule(operation="PutObject", nth=1, status=500, code="InternalError"),
        FaultRule(path=MANIFEST_NAME + "$", method="PUT", nth=1, code="SlowDown"),
        FaultRule(path=MANIFEST_NAME + "$", method="GET", action="truncate", nth=1),
        FaultRule(operation="CreateMultipartUpload", nth=1, code="SlowDown"),
        FaultRule(operation="CompleteMultipartUpload", nth=1, status=500, code="InternalError"),
        FaultRule(operation="HeadObject", nth=1, code="SlowDown"),
        FaultRule(operation="ListObjectsV2", nth=1, status=500, code="InternalError"),
    ]


def download_faults() -> list[FaultRule]:
    """Broken and refused reads of the manifest and of the files."""
    return [
        FaultRule(path=MANIFEST_NAME + "$", action="truncate", nth=1),
        FaultRule(path=MANIFEST_NAME + "$", nth=2, code="SlowDown"),
        FaultRule(path="safetensors$", action="truncate", nth=1),
        FaultRule(path="config.json$", action="reset", nth=1),
        FaultRule(operation="GetObject", fraction=0.2, max_faults=2, code="SlowDown"),
    ]


def test_publish_fetch_and_verify_survive_transient_faults(
    s3_env: RcloneS3, bucket: str, proxy: FaultProxy, checkpoint: Checkpoint, tmp_path: Path
) -> None:
    prefix = "flaky/"
    uri = f"s3://{bucket}/{prefix}"
    # An existing checkpoint at the prefix: the re-publish reads it, heads objects, lists.
    publish(checkpoint, uri, s3_env.endpoint)
    for key, data in list(checkpoint.files.items())[:2]:  # two files changed since
        changed = data[::-1]
        checkpoint.files[key] = changed
        (checkpoint.path / key).write_bytes(changed)
    checkpoint.files["model-rank-1-part-1.safetensors"] = b"\x01" * 7_000_000
    (checkpoint.path / "model-rank-1-part-1.safetensors").write_bytes(b"\x01" * 7_000_000)
    for rule in upload_faults():
        proxy.add_rule(rule)

    publish(checkpoint, uri, proxy.endpoint)
    up = proxy.stats()
    assert all(rule.injected for rule in proxy.rules if rule.fraction is None), show(proxy)
    for op in ("UploadPart", "PutObject", "CreateMultipartUpload", "CompleteMultipartUpload"):
        assert up.faults_by_operation.get(op, 0) > 0, (op, up)
    raw = manifest_of(s3_env, bucket, prefix)
    assert {f["key"]: f["sha256"] for f in raw["files"]} == checkpoint.shas
    for key, data in checkpoint.files.items():
        assert read_object(s3_env, bucket, prefix + key) == data, key

    proxy.reset_stats()
    proxy.clear_rules()
    rules = [proxy.add_rule(rule) for rule in download_faults()]
    dest = tmp_path / "model"
    env = client_env(s3_env, proxy.endpoint)
    proc = run_cli("fetch", "--from", uri, "--to", str(dest), "--concurrency", "4", env=env)
    assert proc.returncode == 0, proc.stderr
    assert error_lines(proc) == []
    assert all(rule.injected for rule in rules[:4]), show(proxy)
    for key, data in checkpoint.files.items():
        assert (dest / key).read_bytes() == data, key

    proxy.reset_stats()
    proxy.clear_rules()
    truncate = proxy.add_rule(FaultRule(path="safetensors$", action="truncate", nth=1))
    error = proxy.add_rule(
        FaultRule(operation="GetObject", nth=[1, 3], status=500, code="InternalError")
    )
    proc = run_cli("verify", uri, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert truncate.injected == 1 and error.injected >= 1  # the manifest's first GET
    assert proc.stdout.rstrip().endswith(": OK")


def test_damage_in_transit_on_download_is_caught(
    s3_env: RcloneS3, bucket: str, proxy: FaultProxy, checkpoint: Checkpoint, tmp_path: Path
) -> None:
    """A byte changed on the way down is not trusted: the sha256 check rejects the file,
    which never appears under its final name."""
    uri = f"s3://{bucket}/wire/"
    publish(checkpoint, uri, s3_env.endpoint)
    key = "model-rank-0-part-0.safetensors"
    rule = proxy.add_rule(FaultRule(action="corrupt", operation="GetObject", path=key + "$"))
    dest = tmp_path / "model"
    proc = run_cli(
        "fetch", "--from", uri, "--to", str(dest), env=client_env(s3_env, proxy.endpoint)
    )
    assert rule.injected >= 1
    assert proc.returncode != 0
    [line] = error_lines(proc)
    assert key in line and "sha256 mismatch" in line
    assert not (dest / key).exists() and not (dest / MANIFEST_NAME).exists()
