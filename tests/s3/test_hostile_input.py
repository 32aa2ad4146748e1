"""Hostile input to the worker: symlinks out of a PVC source, S3 source keys
that are not file names, endpoints with user info or unparseable, and credentials that
must never appear in an error, a log line or the termination message. Against moto
(which stores any key) and rclone serve s3."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from preshard.core.errors import PreshardError
from preshard.worker.store import fetch, publication
from preshard_dev.s3server import MotoS3, S3Server

from .conftest import client_env, error_lines, run_cli

CONFIG = b'{"model_type": "llama"}'


# ------------------------------------------------------------------ PVC / local sources


def model_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_bytes(CONFIG)
    (path / "model.safetensors").write_bytes(b"\0" * 64)
    return path


def test_a_symlink_out_of_a_pvc_source_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("PRESHARD_PVC_MOUNT_ROOT", str(tmp_path / "mnt"))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "environ-secret-value-1234")
    src = model_dir(tmp_path / "mnt" / "claim" / "llama")
    (src / "NOTICE.txt").symlink_to("/proc/self/environ")
    with pytest.raises(PreshardError) as err:
        fetch.fetch_source("pvc://claim/llama", tmp_path / "work")
    assert err.value.reason == "InvalidSource" and err.value.permanent
    assert "NOTICE.txt" in str(err.value) and "outside the source directory" in str(err.value)
    assert "environ-secret" not in str(err.value) + caplog.text
    # A relative link that climbs out is refused the same way.
    (src / "NOTICE.txt").unlink()
    (tmp_path / "mnt" / "claim" / "secret.txt").write_text("other data")
    (src / "tokenizer.json").symlink_to("../secret.txt")
    with pytest.raises(PreshardError, match=r"tokenizer\.json"):
        fetch.fetch_source("pvc://claim/llama", tmp_path / "work")


def test_a_pvc_path_that_is_itself_a_link_out_of_the_volume_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PRESHARD_PVC_MOUNT_ROOT", str(tmp_path / "mnt"))
    elsewhere = model_dir(tmp_path / "elsewhere")
    (tmp_path / "mnt" / "claim").mkdir(parents=True)
    (tmp_path / "mnt" / "claim" / "llama").symlink_to(elsewhere)
    with pytest.raises(PreshardError) as err:
        fetch.fetch_source("pvc://claim/llama", tmp_path / "work")
    assert err.value.reason == "InvalidSource" and "outside" in str(err.value)


@pytest.mark.parametrize("uri", ["pvc://claim/llama", "LOCAL"])
def test_the_preflight_digest_never_follows_a_link_out_of_the_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, uri: str
) -> None:
    """The preflight hashed (and so read) whatever a link in a PVC source
    pointed at; it now refuses it as convert does (one shared function)."""
    from preshard.worker.commands import preflight as adopt

    monkeypatch.setenv("PRESHARD_PVC_MOUNT_ROOT", str(tmp_path / "mnt"))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "environ-secret-value-1234")
    src = model_dir(tmp_path / "mnt" / "claim" / "llama")
    uri = str(src) if uri == "LOCAL" else uri
    args = type("A", (), {"source_endpoint_url": None})()
    rec, _ = adopt._source_pin(uri, args)  # type: ignore[arg-type]
    assert rec["files"] == 2
    (tmp_path / "mnt" / "claim" / "secret.txt").write_text("other data")
    for link, target in (("NOTICE.txt", "/proc/self/environ"), ("tokenizer.json", "../secret.txt")):
        (src / link).symlink_to(target)
        with pytest.raises(PreshardError) as err:
            adopt._source_pin(uri, args)  # type: ignore[arg-type]
        assert err.value.reason == "InvalidSource" and err.value.permanent
        assert link in str(err.value) and "outside the source directory" in str(err.value)
        (src / link).unlink()
    # config.json itself as the link: refused before it is read
    (tmp_path / "mnt" / "claim" / "config.json").write_text('{"hidden_size": 1}')
    (src / "config.json").unlink()
    (src / "config.json").symlink_to("../config.json")
    with pytest.raises(PreshardError, match=r"config\.json is a symbolic link"):
        adopt._source_pin(uri, args)  # type: ignore[arg-type]
    assert "environ-secret" not in caplog.text
    (src / "config.json").unlink()
    (src / "config.json").write_bytes(CONFIG)
    # the PVC path itself leading out of its volume
    if uri.startswith("pvc://"):
        elsewhere = model_dir(tmp_path / "elsewhere")
        (tmp_path / "mnt" / "claim" / "other").symlink_to(elsewhere)
        with pytest.raises(PreshardError, match="outside its volume"):
            adopt._source_pin("pvc://claim/other", args)  # type: ignore[arg-type]
    # links that stay inside are used (and hashed as the files they point at)
    (src / "blobs").mkdir()
    (src / "blobs" / "tok").write_text("{}")
    (src / "tokenizer.json").symlink_to("blobs/tok")
    rec, _ = adopt._source_pin(uri, args)  # type: ignore[arg-type]
    assert rec["files"] == 3


def test_symlinks_inside_the_source_directory_are_resolved_and_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PRESHARD_PVC_MOUNT_ROOT", str(tmp_path / "mnt"))
    src = model_dir(tmp_path / "mnt" / "claim" / "llama")
    (src / "blobs").mkdir()
    (src / "blobs" / "tok").write_text("{}")
    (src / "tokenizer.json").symlink_to("blobs/tok")
    assert fetch.fetch_source("pvc://claim/llama", tmp_path / "work") == src


def test_publish_never_follows_a_link_out_of_the_directory(
    s3_env: S3Server, bucket: str, tmp_path: Path
) -> None:
    d = model_dir(tmp_path / "shards")
    (d / "NOTICE.txt").symlink_to("/proc/self/environ")
    with pytest.raises(PreshardError) as err:
        publication.publish(
            d,
            f"s3://{bucket}/x/",
            manifest_fields={
                "source_uri": "pvc://c/x",
                "tensor_parallel_size": 1,
                "pipeline_parallel_size": 1,
                "vllm_version": "0",
            },
            endpoint_url=s3_env.endpoint,
        )
    assert "NOTICE.txt" in str(err.value) and err.value.permanent
    assert not s3_env.client().list_objects_v2(Bucket=bucket).get("Contents")


# --------------------------------------------------------------------------- S3 keys


@pytest.mark.parametrize("name", [".", "..", "a" * 5000, "back\\slash"])
def test_a_source_key_that_is_not_a_file_name_is_a_permanent_error(
    moto: MotoS3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str
) -> None:
    for k, v in client_env(moto).items():
        monkeypatch.setenv(k, v)
    c = moto.client()
    bucket = "keys-" + str(abs(hash(name)) % 10**8)
    c.create_bucket(Bucket=bucket)
    c.put_object(Bucket=bucket, Key="m1/config.json", Body=CONFIG)
    c.put_object(Bucket=bucket, Key="m1/model.safetensors", Body=b"\0" * 64)
    c.put_object(Bucket=bucket, Key="m1/" + name, Body=b"payload from the bucket")
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(PreshardError) as err:
        fetch.fetch_source(f"s3://{bucket}/m1/", work / "source", endpoint_url=moto.endpoint)
    assert err.value.reason == "InvalidSource" and err.value.permanent
    assert len(str(err.value)) < 400
    # Nothing written anywhere: not the work dir, not next to it.
    assert list(work.iterdir()) == [] and sorted(tmp_path.iterdir()) == [work]


def test_a_source_key_error_through_the_cli_is_exit_3_without_traceback(
    moto: MotoS3, tmp_path: Path
) -> None:
    c = moto.client()
    c.create_bucket(Bucket="keys-cli")
    c.put_object(Bucket="keys-cli", Key="m1/config.json", Body=CONFIG)
    c.put_object(Bucket="keys-cli", Key="m1/model.safetensors", Body=b"\0" * 64)
    c.put_object(Bucket="keys-cli", Key="m1/.", Body=b"x")
    proc = run_cli(
        "convert",
        "--source",
        "s3://keys-cli/m1/",
        "--output",
        "s3://keys-cli/out/",
        "--tensor-parallel-size",
        "1",
        "--work-dir",
        str(tmp_path / "w"),
        env=client_env(moto) | {"PRESHARD_TERMINATION_LOG": str(tmp_path / "term")},
    )
    assert proc.returncode == 3, proc.stderr
    [line] = error_lines(proc)
    assert "InvalidSource" in (tmp_path / "term").read_text()
    assert "m1/." in line


def test_a_5000_character_source_prefix_is_a_clear_permanent_error(
    moto: MotoS3, tmp_path: Path
) -> None:
    uri = "s3://keys-cli/" + "a" * 5000 + "/"
    proc = run_cli("fetch", "--from", uri, "--to", str(tmp_path / "d"), env=client_env(moto))
    assert proc.returncode == 3, proc.stderr
    [line] = error_lines(proc)
    assert len(line) < 400 and "too long" in line


# ------------------------------------------------------------------------- endpoints

USER, PASSWORD = "leaky-user", "hunter2-password-0xfeed"


BAD_ENDPOINTS = [
    f"http://{USER}:{PASSWORD}@127.0.0.1:9",
    f"http://{PASSWORD}@[bad",
    "http://x@[bad",
    "http://[bad",
    "ftp://127.0.0.1:9",
    "http://127.0.0.1:99999",
]


@pytest.mark.parametrize(
    ("endpoint", "command"),
    [(e, "fetch") for e in BAD_ENDPOINTS]
    + [(BAD_ENDPOINTS[i], c) for c in ("verify", "purge", "convert") for i in (0, 1)],
)
def test_bad_endpoints_are_usage_errors_that_never_echo_user_info(
    s3: S3Server, tmp_path: Path, endpoint: str, command: str
) -> None:
    env = client_env(s3, endpoint) | {"PRESHARD_TERMINATION_LOG": str(tmp_path / "term")}
    args = {
        "fetch": ["fetch", "--from", "s3://models/x/", "--to", str(tmp_path / "d")],
        "verify": ["verify", "s3://models/x/"],
        "purge": ["purge", "--output", "s3://models/x/", "--owner", "a/b/c"],
        "convert": [
            "convert",
            "--source",
            "s3://models/x/",
            "--output",
            "s3://models/y/",
            "--tensor-parallel-size",
            "1",
            "--work-dir",
            str(tmp_path / "w"),
        ],
    }[command]
    proc = run_cli(*args, env=env, secret=PASSWORD)
    assert proc.returncode == 3, proc.stderr
    [line] = error_lines(proc)
    assert "endpoint" in line
    out = proc.stdout + proc.stderr
    term = (tmp_path / "term").read_text() if (tmp_path / "term").exists() else ""
    for secret in (PASSWORD, USER):
        assert secret not in out and secret not in term


@pytest.mark.parametrize("flag", ["--endpoint-url", "--source-endpoint-url"])
def test_endpoint_flags_with_user_info_are_refused(s3: S3Server, tmp_path: Path, flag: str) -> None:
    endpoint = f"http://{USER}:{PASSWORD}@127.0.0.1:9"
    proc = run_cli(
        "convert",
        "--source",
        "s3://models/x/",
        "--output",
        "s3://models/y/",
        "--tensor-parallel-size",
        "1",
        "--work-dir",
        str(tmp_path / "w"),
        flag,
        endpoint,
        env=client_env(s3),
        secret=PASSWORD,
    )
    assert proc.returncode == 3, proc.stderr
    assert "user name or password" in error_lines(proc)[0]
    assert USER not in proc.stderr + proc.stdout


def test_s3_errors_are_scrubbed_of_every_credential(
    s3: S3Server, bucket: str, tmp_path: Path
) -> None:
    """Wrong keys and a session token: the access key id, secret and token never appear
    in stdout, stderr (with -v) or the termination message."""
    key_id, secret, token = "AKIAEXAMPLEKEY123456", "s3cr3t-" + "ab" * 16, "tok-" + "cd" * 40
    env = client_env(s3) | {
        "AWS_ACCESS_KEY_ID": key_id,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_SESSION_TOKEN": token,
        "PRESHARD_TERMINATION_LOG": str(tmp_path / "term"),
    }
    proc = run_cli(
        "-v",
        "convert",
        "--source",
        f"s3://{bucket}/x/",
        "--output",
        f"s3://{bucket}/y/",
        "--tensor-parallel-size",
        "1",
        "--work-dir",
        str(tmp_path / "w"),
        env=env,
        secret=secret,
    )
    assert proc.returncode == 3, proc.stderr
    term = (tmp_path / "term").read_text()
    assert json.loads(term)["reason"] == "AccessDenied"
    for value in (key_id, secret, token, token[:20]):
        assert value not in proc.stdout + proc.stderr + term


def test_scrub_removes_credentials_from_arbitrary_text(monkeypatch: pytest.MonkeyPatch) -> None:
    from preshard.worker.store.s3 import scrub

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    text = (
        "GET http://u:p4ss@host:9000/b/k?X-Amz-Signature=abcdef0123&X-Amz-Credential=AKIAABCDEFGHIJKLMNOP%2F"
        "&X-Amz-Security-Token=FwoGZXIvYXdzE failed; Authorization: AWS4-HMAC-SHA256 Credential=AKIA"
        "ABCDEFGHIJKLMNOP/x, Signature=deadbeef; secret very-secret-value"
    )
    out = scrub(text)
    for leaked in (
        "p4ss",
        "u:",
        "abcdef0123",
        "AKIAABCDEFGHIJKLMNOP",
        "FwoGZXIvYXdzE",
        "deadbeef",
        "very-secret-value",
    ):
        assert leaked not in out, (leaked, out)
    assert "host:9000" in out
    assert len(scrub("x" * 100_000)) < 1000
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == "very-secret-value"


# -------------------------------------------------------------------- manifest bounds


def _manifest(tp: int) -> bytes:
    files = [
        {"key": f"model-rank-{r}-part-0.safetensors", "size": 1, "sha256": "a" * 64}
        for r in range(2)
    ]
    return json.dumps(
        {
            "format": "preshard.io/checkpoint-manifest",
            "formatVersion": 2,
            "createdAt": None,
            "owner": None,
            "source": {"uri": "hf://o/m", "revision": None},
            "tensorParallelSize": tp,
            "pipelineParallelSize": 1,
            "quantization": None,
            "dtype": "auto",
            "vllmVersion": "0",
            "loadFormat": "sharded_state",
            "filePattern": "model-rank-{rank}-part-{part}.safetensors",
            "files": files,
            "stateFormat": "raw",
            "convertedOn": {},
            "sharding": None,
            "identity": None,
            "verification": None,
        }
    ).encode()


@pytest.mark.parametrize("tp", [10**7, 10**12])
def test_verify_of_a_manifest_with_a_huge_parallel_size_is_quick_and_short(
    s3: S3Server, bucket: str, tp: int
) -> None:
    import time

    s3.client().put_object(Bucket=bucket, Key="m/preshard-manifest.json", Body=_manifest(tp))
    t = time.monotonic()
    proc = run_cli("verify", f"s3://{bucket}/m/", env=client_env(s3), timeout=30)
    assert time.monotonic() - t < 20
    assert proc.returncode == 3, proc.stderr[-500:]
    [line] = error_lines(proc)
    assert "at most 1024" in line and len(proc.stdout + proc.stderr) < 1000


def test_an_oversized_manifest_object_is_never_read_whole(
    s3: S3Server, bucket: str, tmp_path: Path
) -> None:
    from preshard.core.manifest import MAX_MANIFEST_BYTES
    from preshard.worker.store.records import read_bounded

    body = b" " * (MAX_MANIFEST_BYTES + 10 * 2**20) + _manifest(2)
    s3.client().put_object(Bucket=bucket, Key="big/preshard-manifest.json", Body=body)
    for args in (
        ["verify", f"s3://{bucket}/big/"],
        ["fetch", "--from", f"s3://{bucket}/big/", "--to", str(tmp_path / "d")],
    ):
        proc = run_cli(*args, env=client_env(s3))
        assert proc.returncode == 3, proc.stderr[-500:]
        [line] = error_lines(proc)
        assert "larger than" in line and len(line) < 300
    # The reader stops after limit + 1 bytes (the body's remaining bytes are not read).
    got = read_bounded(s3.client(), bucket, "big/preshard-manifest.json", len(body))
    assert got == body
    with pytest.raises(Exception, match="larger than 100 bytes"):
        read_bounded(s3.client(), bucket, "big/preshard-manifest.json", 100)


def test_a_bad_region_is_a_permanent_error_without_traceback(s3: S3Server, tmp_path: Path) -> None:
    env = client_env(s3) | {"AWS_REGION": "not a region!"}
    proc = run_cli("verify", "s3://models/x/", env=env)
    assert proc.returncode == 3, proc.stderr
    [line] = error_lines(proc)
    assert "cannot create an S3 client" in line
