"""Many owners in one bucket (docs/security.md, "Object storage"): publishing or purging
a prefix touches only what that owner itself published there, and refuses when another
owner's checkpoint lies below the prefix (nested) or around it (the prefix is inside
another checkpoint). Against rclone serve s3 and moto."""

from __future__ import annotations

from pathlib import Path

import pytest

from preshard.core.contract import PUBLICATION_RECORD_NAME
from preshard.core.errors import PreshardError
from preshard.core.manifest import MANIFEST_NAME
from preshard_dev.s3server import S3Server

from .conftest import (
    PART,
    Checkpoint,
    client_env,
    error_lines,
    make_checkpoint,
    object_keys,
    publish,
    read_object,
    run_cli,
)

A = "team-a/llama/uid-a"
B = "team-b/big/uid-b"
SMALL = {
    "model-rank-0-part-0.safetensors": 40_000,
    "model-rank-1-part-0.safetensors": 40_000,
    "tokenizer.json": 1_000,
}
UNRELATED = {"models/datasets/important.bin": b"not a checkpoint: keep me", "models/x.txt": b"x"}


def snapshot(srv: S3Server, bucket: str, prefix: str = "") -> dict[str, bytes]:
    return {k: read_object(srv, bucket, k) for k in object_keys(srv, bucket, prefix)}


def put_unrelated(srv: S3Server, bucket: str) -> None:
    for key, data in UNRELATED.items():
        srv.client().put_object(Bucket=bucket, Key=key, Body=data)


def small(tmp_path: Path, name: str, seed: int = 0, **extra: int) -> Checkpoint:
    return make_checkpoint(tmp_path / name, SMALL | extra, seed=seed)


def test_publishing_a_parent_prefix_refuses_a_nested_checkpoint_of_another_owner(
    server: S3Server, any_bucket: str, tmp_path: Path
) -> None:
    b = any_bucket
    publish(small(tmp_path, "a"), f"s3://{b}/models/team-a-llama/", server.endpoint, owner=A)
    put_unrelated(server, b)
    before = snapshot(server, b)
    with pytest.raises(PreshardError) as err:
        publish(small(tmp_path, "b", seed=1), f"s3://{b}/models/", server.endpoint, owner=B)
    assert err.value.reason == "OutputOwnedByOther" and err.value.permanent
    assert "models/team-a-llama/" in str(err.value) and "below" in str(err.value)
    assert A not in str(err.value)  # another tenant's identity is not disclosed
    assert snapshot(server, b) == before  # nothing written, nothing deleted


def test_publishing_inside_another_owners_checkpoint_is_refused(
    server: S3Server, any_bucket: str, tmp_path: Path
) -> None:
    b = any_bucket
    publish(small(tmp_path, "a"), f"s3://{b}/models/a/", server.endpoint, owner=A)
    before = snapshot(server, b)
    with pytest.raises(PreshardError) as err:
        publish(small(tmp_path, "b", seed=1), f"s3://{b}/models/a/sub/", server.endpoint, owner=B)
    assert err.value.reason == "OutputOwnedByOther" and err.value.permanent
    assert "inside" in str(err.value) and "models/a/" in str(err.value)
    assert snapshot(server, b) == before


def test_republishing_deletes_only_what_the_owners_previous_manifest_listed(
    server: S3Server, any_bucket: str, tmp_path: Path
) -> None:
    b, p = any_bucket, "models/"
    first = small(tmp_path, "one", **{"model-rank-0-part-1.safetensors": 1000, "old.txt": 10})
    publish(first, f"s3://{b}/{p}", server.endpoint, owner=A)
    put_unrelated(server, b)
    server.client().put_object(Bucket=b, Key=p + "model-rank-2-part-0.safetensors", Body=b"?")
    second = small(tmp_path, "two", seed=2)
    publish(second, f"s3://{b}/{p}", server.endpoint, owner=A)
    keys = object_keys(server, b)
    # The first conversion's extra files are gone, the second's are all there...
    assert p + "old.txt" not in keys and p + "model-rank-0-part-1.safetensors" not in keys
    for k, data in second.files.items():
        assert read_object(server, b, p + k) == data
    # ...and what no manifest of A listed is left alone, the publication record is gone.
    for k, data in UNRELATED.items():
        assert read_object(server, b, k) == data
    assert read_object(server, b, p + "model-rank-2-part-0.safetensors") == b"?"
    assert p + PUBLICATION_RECORD_NAME not in keys


def test_an_interrupted_publish_is_cleaned_up_by_the_next_one(
    server: S3Server, any_bucket: str, tmp_path: Path
) -> None:
    """The run that crashed wrote objects no manifest lists; its publication record lets the next
    run (another conversion, other file names) remove them."""
    b, p = any_bucket, "models/run/"
    big = make_checkpoint(
        tmp_path / "crash",
        {"model-rank-0-part-0.safetensors": 2 * PART, "model-rank-1-part-0.safetensors": 2 * PART}
        | {"stale-only.txt": 100},
    )
    with pytest.raises(PreshardError):
        publish(big, f"s3://{b}/{p}", server.endpoint, owner=A, concurrency=1, fail_after_parts=2)
    assert p + "stale-only.txt" in object_keys(server, b, p)
    assert p + MANIFEST_NAME not in object_keys(server, b, p)
    assert p + PUBLICATION_RECORD_NAME in object_keys(server, b, p)
    # Another owner cannot take the prefix over while A's publication is unfinished.
    with pytest.raises(PreshardError) as err:
        publish(small(tmp_path, "b"), f"s3://{b}/{p}", server.endpoint, owner=B)
    assert err.value.reason == "OutputOwnedByOther"
    publish(small(tmp_path, "again", seed=3), f"s3://{b}/{p}", server.endpoint, owner=A)
    assert p + "stale-only.txt" not in object_keys(server, b, p)
    assert object_keys(server, b, p) == {p + k for k in SMALL} | {p + "config.json"} | {
        p + MANIFEST_NAME
    }


def test_publish_and_purge_refuse_an_unreadable_manifest(
    server: S3Server, any_bucket: str, tmp_path: Path
) -> None:
    b, p = any_bucket, "models/broken/"
    server.client().put_object(Bucket=b, Key=p + MANIFEST_NAME, Body=b"{not json")
    server.client().put_object(Bucket=b, Key=p + "weights.bin", Body=b"someone's")
    with pytest.raises(PreshardError) as err:
        publish(small(tmp_path, "a"), f"s3://{b}/{p}", server.endpoint, owner=A)
    assert err.value.permanent and "cannot be read" in str(err.value)
    proc = run_cli("purge", "--output", f"s3://{b}/{p}", "--owner", A, env=client_env(server))
    assert proc.returncode == 3, proc.stderr
    assert object_keys(server, b, p) == {p + MANIFEST_NAME, p + "weights.bin"}


# ------------------------------------------------------------------------------- purge


def test_purge_by_another_owner_is_refused(
    server: S3Server, any_bucket: str, tmp_path: Path
) -> None:
    b = any_bucket
    publish(small(tmp_path, "a"), f"s3://{b}/models/a/", server.endpoint, owner=A)
    before = snapshot(server, b)
    env = client_env(server)
    for uri in (f"s3://{b}/models/a/", f"s3://{b}/models/"):  # exact and parent prefix
        proc = run_cli("purge", "--output", uri, "--owner", B, env=env)
        assert proc.returncode == 3, proc.stderr
        [line] = error_lines(proc)
        assert "refusing to purge" in line and A not in line
    assert snapshot(server, b) == before


def test_purge_deletes_only_the_owners_listed_objects_manifest_first_and_is_idempotent(
    server: S3Server, any_bucket: str, tmp_path: Path
) -> None:
    b, p = any_bucket, "models/"
    ckpt = small(tmp_path, "a")
    publish(ckpt, f"s3://{b}/{p}", server.endpoint, owner=A)
    put_unrelated(server, b)
    env = client_env(server)
    proc = run_cli("purge", "--output", f"s3://{b}/{p}", "--owner", A, env=env)
    assert proc.returncode == 0, proc.stderr
    assert f"{len(ckpt.files)} objects deleted" in proc.stdout
    assert snapshot(server, b) == UNRELATED
    again = run_cli("purge", "--output", f"s3://{b}/{p}", "--owner", A, env=env)
    assert again.returncode == 0, again.stderr
    assert "0 objects deleted" in again.stdout
    assert snapshot(server, b) == UNRELATED


def test_purge_withdraws_the_manifest_before_any_object(
    s3_env: S3Server, bucket: str, proxy: object, tmp_path: Path
) -> None:
    from preshard_dev.faultproxy import FaultProxy

    assert isinstance(proxy, FaultProxy)
    uri = f"s3://{bucket}/m/"
    publish(small(tmp_path, "a"), uri, s3_env.endpoint, owner=A)
    proxy.reset_stats()
    env = client_env(s3_env, proxy.endpoint)
    proc = run_cli("purge", "--output", uri, "--owner", A, env=env)
    assert proc.returncode == 0, proc.stderr
    deletes = [r for r in proxy.records() if r.operation in ("DeleteObject", "DeleteObjects")]
    assert deletes[0].operation == "DeleteObject"
    assert deletes[0].path.endswith("/m/" + MANIFEST_NAME)
    assert any(r.operation == "DeleteObjects" for r in deletes[1:])
    assert not object_keys(s3_env, bucket, "m/")


def test_an_unfinished_publication_of_another_owner_below_the_prefix_blocks_it(
    server: S3Server, any_bucket: str, tmp_path: Path
) -> None:
    """No manifest yet below, only the publication record of B's publication in progress."""
    b = any_bucket
    server.client().put_object(
        Bucket=b,
        Key="models/b/" + PUBLICATION_RECORD_NAME,
        Body=b'{"format": "preshard.io/publish-journal", "owner": "%s", "keys": ["x"]}'
        % B.encode(),
    )
    with pytest.raises(PreshardError) as err:
        publish(small(tmp_path, "a"), f"s3://{b}/models/", server.endpoint, owner=A)
    assert err.value.reason == "OutputOwnedByOther" and "models/b/" in str(err.value)
    assert object_keys(server, b) == {"models/b/" + PUBLICATION_RECORD_NAME}


def test_the_owners_own_nested_checkpoint_is_allowed_and_kept(
    server: S3Server, any_bucket: str, tmp_path: Path
) -> None:
    b = any_bucket
    inner = small(tmp_path, "inner", seed=4)
    publish(inner, f"s3://{b}/models/inner/", server.endpoint, owner=A)
    publish(small(tmp_path, "outer", seed=5), f"s3://{b}/models/", server.endpoint, owner=A)
    proc = run_cli("purge", "--output", f"s3://{b}/models/", "--owner", A, env=client_env(server))
    assert proc.returncode == 0, proc.stderr
    assert object_keys(server, b) == {"models/inner/" + k for k in inner.files} | {
        "models/inner/" + MANIFEST_NAME
    }


def test_credentials_scoped_to_the_prefix_may_publish_without_reading_its_parents(
    s3_env: S3Server, bucket: str, proxy: object, tmp_path: Path
) -> None:
    """A bucket policy that grants only models/x/*: the parents' manifests answer 403,
    which must not fail the publication (nothing there is readable, so nothing to
    respect), while a 403 on the prefix's own manifest still does."""
    from preshard_dev.faultproxy import FaultProxy, FaultRule

    assert isinstance(proxy, FaultProxy)
    parents = rf"^/{bucket}/(models/)?preshard-(manifest|publish)\.json$"
    rule = proxy.add_rule(FaultRule(path=parents, method="GET", status=403, code="AccessDenied"))
    publish(small(tmp_path, "a"), f"s3://{bucket}/models/x/", proxy.endpoint, owner=A)
    # 2 parents x (manifest, record), read when the publication begins and again right
    # before its manifest is written (another owner may have published there meanwhile)
    assert rule.injected == 8
    assert f"models/x/{MANIFEST_NAME}" in object_keys(s3_env, bucket, "models/x/")
    proxy.add_rule(
        FaultRule(
            path=rf"^/{bucket}/models/y/preshard-manifest\.json$",
            method="GET",
            status=403,
            code="AccessDenied",
        )
    )
    with pytest.raises(PreshardError) as err:
        publish(small(tmp_path, "b"), f"s3://{bucket}/models/y/", proxy.endpoint, owner=A)
    assert err.value.reason == "AccessDenied"
