"""``preshard preflight``, ``adopt``, ``copy`` and ``withdraw`` (worker/adopt.py) against
real S3 servers on loopback: ``rclone serve s3`` (ignores If-Match, lacks UploadPartCopy)
and moto (honours If-Match, has UploadPartCopy). The CLI runs as a real subprocess;
results are read from its termination message file."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from preshard.core.errors import PreshardError
from preshard.core.manifest import MANIFEST_NAME
from preshard.core.preflight import parse_preflight
from preshard.core.progress import TERMINATION_MESSAGE_LIMIT, Result
from preshard.worker.commands import preflight as ad
from preshard.worker.store import records
from preshard.worker.store import s3 as s3mod
from preshard_dev.s3server import MotoS3, RcloneS3

from .conftest import (
    Checkpoint,
    client_env,
    manifest_of,
    object_keys,
    publish,
    read_object,
    run_cli,
)

ID = "sha256:" + "a" * 64
OWNER = "ns/test/uid-1"  # conftest.publish's owner
NEW = "ns/test/uid-2"


@pytest.fixture(autouse=True)
def _creds(s3_env: RcloneS3) -> None:
    """In-process publish (the fixtures' checkpoints) reads the standard AWS_* env; the
    rclone and moto servers take the same dev keys."""


def published(s3: Any, bucket: str, ckpt: Checkpoint, prefix: str = "ck/") -> bytes:
    publish(ckpt, f"s3://{bucket}/{prefix}", s3.endpoint)
    # record an identity, as ``preshard convert --identity`` does
    c = s3.client()
    m = json.loads(read_object(s3, bucket, prefix + MANIFEST_NAME))
    m["identity"] = ID
    body = (json.dumps(m, indent=2) + "\n").encode()
    c.put_object(Bucket=bucket, Key=prefix + MANIFEST_NAME, Body=body)
    return body


def run(
    s3: Any, tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[int, Result | None, str]:
    term = tmp_path / f"term-{args[0]}-{len(list(tmp_path.glob('term-*')))}"
    e = client_env(s3) | {"PRESHARD_TERMINATION_LOG": str(term)} | (env or {})
    proc = run_cli(*args, env=e)
    text = term.read_text() if term.exists() else None
    assert text is None or len(text.encode()) <= TERMINATION_MESSAGE_LIMIT
    return proc.returncode, Result.from_message(text), proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoS3]:
    with MotoS3() as server:
        yield server  # type: ignore[misc]


@pytest.fixture
def moto_bucket(moto: MotoS3) -> str:
    import uuid

    name = "m-" + uuid.uuid4().hex[:10]
    moto.client().create_bucket(Bucket=name)
    return name


# ------------------------------------------------------------------------------ adopt


def test_adopt_verifies_then_rewrites_only_the_owner(
    s3: RcloneS3, bucket: str, checkpoint: Checkpoint, tmp_path: Path
) -> None:
    published(s3, bucket, checkpoint)
    before = manifest_of(s3, bucket, "ck/")
    rc, res, out = run(
        s3, tmp_path, "adopt", "--output", f"s3://{bucket}/ck/", "--owner", NEW,
        "--expect-owner", OWNER, "--expect-identity", ID,
    )  # fmt: skip
    assert rc == 0, out
    after = manifest_of(s3, bucket, "ck/")
    assert after["owner"] == NEW
    assert {k: v for k, v in after.items() if k != "owner"} == {
        k: v for k, v in before.items() if k != "owner"
    }
    assert res is not None and res.artifact is not None
    body = read_object(s3, bucket, "ck/" + MANIFEST_NAME)
    assert res.artifact["manifestSha256"] == hashlib.sha256(body).hexdigest()


def test_adopt_catches_one_flipped_byte_and_changes_nothing(
    s3: RcloneS3, bucket: str, checkpoint: Checkpoint, tmp_path: Path
) -> None:
    published(s3, bucket, checkpoint)
    key = "ck/model-rank-1-part-0.safetensors"
    data = bytearray(read_object(s3, bucket, key))
    data[len(data) // 2] ^= 0x01  # same size, one bit
    s3.client().put_object(Bucket=bucket, Key=key, Body=bytes(data))
    before = read_object(s3, bucket, "ck/" + MANIFEST_NAME)
    rc, res, out = run(
        s3, tmp_path, "adopt", "--output", f"s3://{bucket}/ck/", "--owner", NEW,
        "--expect-owner", OWNER, "--expect-identity", ID,
    )  # fmt: skip
    assert rc == 3, out
    assert res is not None and res.reason == "VerificationFailed"
    assert "model-rank-1-part-0.safetensors" in (res.message or "")
    assert read_object(s3, bucket, "ck/" + MANIFEST_NAME) == before  # owner not taken


@pytest.mark.parametrize(
    "flag,value,reason",
    [
        ("--expect-owner", "ns/test/someone-else", "OutputChanged"),
        ("--expect-identity", "sha256:" + "b" * 64, "IdentityMismatch"),
        ("--expect-manifest-sha256", "0" * 64, "OutputChanged"),
    ],
)
def test_adopt_refuses_a_manifest_other_than_expected(
    s3: RcloneS3,
    bucket: str,
    checkpoint: Checkpoint,
    tmp_path: Path,
    flag: str,
    value: str,
    reason: str,
) -> None:
    published(s3, bucket, checkpoint)
    args = {"--expect-owner": OWNER, "--expect-identity": ID, flag: value}
    flat = [x for kv in args.items() for x in kv]
    rc, res, out = run(
        s3, tmp_path, "adopt", "--output", f"s3://{bucket}/ck/", "--owner", NEW, *flat
    )
    assert rc == 3, out
    assert res is not None and res.reason == reason
    assert manifest_of(s3, bucket, "ck/")["owner"] == OWNER


def test_put_manifest_rereads_before_writing_on_a_server_that_ignores_if_match(
    s3: RcloneS3, bucket: str, checkpoint: Checkpoint
) -> None:
    body = published(s3, bucket, checkpoint)
    u = ad.parse_uri(f"s3://{bucket}/ck/")
    client = s3.client()
    # another writer replaced the manifest after we verified it
    client.put_object(
        Bucket=bucket, Key="ck/" + MANIFEST_NAME, Body=body.replace(b"uid-1", b"uid-9")
    )
    with pytest.raises(PreshardError) as err:
        records.put_manifest(client, u, "{}", conditional=True, expect_body=body)
    assert err.value.reason == "OutputChanged"
    assert b"uid-9" in read_object(s3, bucket, "ck/" + MANIFEST_NAME)


def test_put_manifest_sends_if_match_and_a_server_that_honours_it_refuses(
    moto: MotoS3, moto_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = moto.client()
    client.put_object(Bucket=moto_bucket, Key="ck/" + MANIFEST_NAME, Body=b"ours")
    old_etag = client.head_object(Bucket=moto_bucket, Key="ck/" + MANIFEST_NAME)["ETag"]
    client.put_object(Bucket=moto_bucket, Key="ck/" + MANIFEST_NAME, Body=b"theirs")
    # the race the re-read cannot see: it still sees our bytes and our ETag
    monkeypatch.setattr(records, "read_manifest_tagged", lambda *a: (None, b"ours", old_etag))
    u = ad.parse_uri(f"s3://{moto_bucket}/ck/")
    with pytest.raises(PreshardError) as err:
        records.put_manifest(
            client, u, "{}", conditional=True, expect_body=b"ours", expect_etag=old_etag
        )
    assert err.value.reason == "OutputChanged"
    assert (
        client.get_object(Bucket=moto_bucket, Key="ck/" + MANIFEST_NAME)["Body"].read() == b"theirs"
    )


# ------------------------------------------------------------------------------- copy


def test_copy_server_side_verified_with_a_new_manifest(
    s3: RcloneS3, bucket: str, checkpoint: Checkpoint, tmp_path: Path
) -> None:
    src_body = published(s3, bucket, checkpoint, "orig/")
    rc, res, out = run(
        s3, tmp_path, "copy", "--from", f"s3://{bucket}/orig/", "--to", f"s3://{bucket}/twin/",
        "--owner", NEW, "--expect-identity", ID,
        "--expect-manifest-sha256", hashlib.sha256(src_body).hexdigest(),
    )  # fmt: skip
    assert rc == 0, out
    for name, data in checkpoint.files.items():
        assert read_object(s3, bucket, "twin/" + name) == data
    twin, orig = manifest_of(s3, bucket, "twin/"), manifest_of(s3, bucket, "orig/")
    assert twin["owner"] == NEW and orig["owner"] == OWNER
    assert twin["files"] == orig["files"] and twin["identity"] == ID
    assert twin["extra"]["copiedFrom"] == {
        "uri": f"s3://{bucket}/orig/",
        "manifestSha256": hashlib.sha256(src_body).hexdigest(),
    }
    assert res is not None and res.artifact is not None
    assert res.artifact["origin"]["uri"] == f"s3://{bucket}/orig/"


def test_copy_of_a_corrupted_original_writes_no_manifest(
    s3: RcloneS3, bucket: str, checkpoint: Checkpoint, tmp_path: Path
) -> None:
    published(s3, bucket, checkpoint, "orig/")
    key = "orig/tokenizer.json"
    data = bytearray(read_object(s3, bucket, key))
    data[0] ^= 0x80
    s3.client().put_object(Bucket=bucket, Key=key, Body=bytes(data))
    rc, res, out = run(
        s3, tmp_path, "copy", "--from", f"s3://{bucket}/orig/", "--to", f"s3://{bucket}/twin/",
        "--owner", NEW, "--expect-identity", ID,
    )  # fmt: skip
    assert rc != 0, out
    assert res is not None and res.reason == "VerificationFailed"
    assert "twin/" + MANIFEST_NAME not in object_keys(s3, bucket, "twin/")


def test_copy_refuses_a_destination_with_a_manifest(
    s3: RcloneS3, bucket: str, checkpoint: Checkpoint, tmp_path: Path
) -> None:
    published(s3, bucket, checkpoint, "orig/")
    published(s3, bucket, checkpoint, "twin/")
    before = read_object(s3, bucket, "twin/" + MANIFEST_NAME)
    rc, res, _ = run(
        s3, tmp_path, "copy", "--from", f"s3://{bucket}/orig/", "--to", f"s3://{bucket}/twin/",
        "--owner", NEW, "--expect-identity", ID,
    )  # fmt: skip
    assert rc == 3 and res is not None and res.reason == "OutputChanged"
    assert read_object(s3, bucket, "twin/" + MANIFEST_NAME) == before


def test_multipart_copy_on_a_server_with_upload_part_copy(
    moto: MotoS3, moto_bucket: str, checkpoint: Checkpoint, tmp_path: Path
) -> None:
    published(moto, moto_bucket, checkpoint, "orig/")
    rc, res, out = run(
        moto, tmp_path, "copy", "--from", f"s3://{moto_bucket}/orig/",
        "--to", f"s3://{moto_bucket}/twin/", "--owner", NEW, "--expect-identity", ID,
        "--multipart-threshold", str(6 * 2**20), "--part-size", str(5 * 2**20),
    )  # fmt: skip
    assert rc == 0, out
    assert res is not None and res.result == "Succeeded"
    c = moto.client()
    for name, data in checkpoint.files.items():
        assert c.get_object(Bucket=moto_bucket, Key="twin/" + name)["Body"].read() == data
    # the shard files (> 10 MiB) were copied in parts
    head = c.head_object(Bucket=moto_bucket, Key="twin/model-rank-0-part-0.safetensors")
    assert "-" in head["ETag"]  # a multipart ETag


def test_multipart_copy_on_rclone_says_it_is_not_supported(
    s3: RcloneS3, bucket: str, checkpoint: Checkpoint, tmp_path: Path
) -> None:
    published(s3, bucket, checkpoint, "orig/")
    rc, res, _ = run(
        s3, tmp_path, "copy", "--from", f"s3://{bucket}/orig/", "--to", f"s3://{bucket}/twin/",
        "--owner", NEW, "--expect-identity", ID, "--multipart-threshold", str(6 * 2**20),
        "--part-size", str(5 * 2**20),
    )  # fmt: skip
    assert rc == 3 and res is not None and res.reason == "CopyNotSupported"
    assert "twin/" + MANIFEST_NAME not in object_keys(s3, bucket, "twin/")


def test_copy_with_credentials_that_cannot_read_fails_access_denied(
    s3: RcloneS3, bucket: str, checkpoint: Checkpoint, tmp_path: Path
) -> None:
    published(s3, bucket, checkpoint, "orig/")
    rc, res, out = run(
        s3, tmp_path, "copy", "--from", f"s3://{bucket}/orig/", "--to", f"s3://{bucket}/twin/",
        "--owner", NEW, "--expect-identity", ID,
        env={"AWS_ACCESS_KEY_ID": "someone-else", "AWS_SECRET_ACCESS_KEY": "not-the-key"},
    )  # fmt: skip
    assert rc == 3, out
    assert res is not None and res.reason == "AccessDenied"
    assert "not-the-key" not in out


# --------------------------------------------------------------------------- withdraw


def test_withdraw_only_the_manifest_it_was_told_about(
    s3: RcloneS3, bucket: str, checkpoint: Checkpoint, tmp_path: Path
) -> None:
    body = published(s3, bucket, checkpoint)
    s3.client().put_object(Bucket=bucket, Key="ck/unlisted.bin", Body=b"not the checkpoint's")
    rc, res, _ = run(
        s3, tmp_path, "withdraw", "--output", f"s3://{bucket}/ck/", "--owner", NEW,
        "--expect-manifest-sha256", "0" * 64,
    )  # fmt: skip
    assert rc == 3 and res is not None and res.reason == "OutputChanged"
    assert read_object(s3, bucket, "ck/" + MANIFEST_NAME) == body
    rc, res, _ = run(
        s3, tmp_path, "withdraw", "--output", f"s3://{bucket}/ck/", "--owner", NEW,
        "--expect-owner", OWNER, "--expect-manifest-sha256", hashlib.sha256(body).hexdigest(),
        "--delete-listed",  # the operator saw this manifest published (its ledger)
    )  # fmt: skip
    assert rc == 0
    keys = object_keys(s3, bucket, "ck/")
    # the gone owner's manifest and the objects it listed are gone (a replacing conversion
    # leaves no stale shard of another layout); anything it did not list stays
    assert "ck/" + MANIFEST_NAME not in keys and "ck/config.json" not in keys
    assert keys == {"ck/unlisted.bin"}


# -------------------------------------------------------------------------- preflight


def test_preflight_reports_source_config_vllm_and_output(
    s3: RcloneS3, bucket: str, checkpoint: Checkpoint, tmp_path: Path
) -> None:
    c = s3.client()
    config = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 128,
        "torch_dtype": "bfloat16",
        "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]},
        "long_unwanted_field": "x" * 5000,
    }
    c.put_object(Bucket=bucket, Key="src/config.json", Body=json.dumps(config).encode())
    c.put_object(Bucket=bucket, Key="src/model.safetensors", Body=b"w1")
    body = published(s3, bucket, checkpoint, "out/")
    published(s3, bucket, checkpoint, "out/nested/")
    rc, res, out = run(
        s3, tmp_path, "preflight", "--source", f"s3://{bucket}/src/",
        "--output", f"s3://{bucket}/out/", "--owner", NEW,
    )  # fmt: skip
    assert rc == 0, out
    assert res is not None and res.artifact is not None
    p = parse_preflight(res.artifact)
    assert p.config["hidden_size"] == 64 and p.config["architectures"] == ["LlamaForCausalLM"]
    assert p.config["quantization_config"] == {"quant_method": "fp8"}
    assert "long_unwanted_field" not in p.config
    assert p.vllm_version == ad.vllm_version() != "unknown"
    assert p.manifest is not None and p.manifest.owner == OWNER and p.manifest.identity == ID
    assert p.manifest.sha256 == hashlib.sha256(body).hexdigest() and p.manifest.complete
    assert [(o.key, o.relation, o.owner) for o in p.overlaps] == [
        ("out/nested/" + MANIFEST_NAME, "nested", OWNER)
    ]
    digest = p.source.digest
    # one changed source object (same size) changes the digest
    c.put_object(Bucket=bucket, Key="src/model.safetensors", Body=b"w2")
    _, res2, _ = run(
        s3, tmp_path, "preflight", "--source", f"s3://{bucket}/src/",
        "--output", f"s3://{bucket}/out/nested/", "--owner", NEW,
    )  # fmt: skip
    assert res2 is not None and res2.artifact is not None
    p2 = parse_preflight(res2.artifact)
    assert p2.source.digest != digest
    assert [(o.key, o.relation) for o in p2.overlaps] == [("out/" + MANIFEST_NAME, "parent")]


def test_preflight_reports_an_incomplete_checkpoint(
    s3: RcloneS3, bucket: str, checkpoint: Checkpoint, tmp_path: Path
) -> None:
    published(s3, bucket, checkpoint, "out/")
    s3.client().delete_object(Bucket=bucket, Key="out/model-rank-0-part-0.safetensors")
    state = ad.output_state(s3.client(), ad.parse_uri(f"s3://{bucket}/out/"))
    assert state["state"] == "manifest" and state["manifest"]["complete"] is False


def test_preflight_of_a_local_source_hashes_the_files(tmp_path: Path) -> None:
    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text('{"hidden_size": 8}')
    (src / "model.safetensors").write_bytes(b"abc")
    args = type("A", (), {"source_endpoint_url": None})()
    rec, config = ad._source_pin(str(src), args)  # type: ignore[arg-type]
    (src / "model.safetensors").write_bytes(b"abd")  # same size, other bytes
    rec2, _ = ad._source_pin(str(src), args)  # type: ignore[arg-type]
    assert config == {"hidden_size": 8} and rec["files"] == 2
    assert rec["digest"] != rec2["digest"]


def test_preflight_of_a_missing_source_is_permanent(
    s3: RcloneS3, bucket: str, tmp_path: Path
) -> None:
    rc, res, _ = run(
        s3, tmp_path, "preflight", "--source", f"s3://{bucket}/nothing/",
        "--output", f"s3://{bucket}/out/", "--owner", NEW,
    )  # fmt: skip
    assert rc == 3 and res is not None and res.reason == "SourceNotFound"
    assert f"s3://{bucket}/nothing/" in (res.message or "")


def test_big_findings_still_fit_the_termination_message() -> None:
    findings: dict[str, Any] = {
        "kind": "preflight",
        "source": {"uri": "s3://b/p/", "digest": "sha256:" + "1" * 64},
        "config": {f"k{i}": "v" * 60 for i in range(60)},
        "vllmVersion": "0.32.0",
        "output": {
            "state": "empty",
            "overlapping": [{"key": "k" * 900, "owner": "o" * 300, "relation": "nested"}] * 3,
        },
    }
    out = ad.fit_findings(findings)
    assert len(Result("Succeeded", artifact=out).to_message().encode()) <= TERMINATION_MESSAGE_LIMIT
    assert out["output"]["overlapping"]  # the refusal's evidence is kept
    assert parse_preflight(out).overlaps


def test_s3_module_is_the_workers() -> None:
    assert ad.s3 is s3mod
