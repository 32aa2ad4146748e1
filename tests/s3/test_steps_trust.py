"""docs/security.md "Copy, Adopt and Withdraw", the worker side: Copy and Adopt take
only provably the same content, Copy follows the publication rules, Withdraw deletes
only what a proven owner published, and the source a conversion reads is the one the
preflight pinned.

Real parts: ``preshard copy``/``adopt``/``withdraw`` as subprocesses against ``rclone serve
s3`` on loopback; a real raw checkpoint with real sharding metadata, built by the real
``LoadTracer`` from a real safetensors source (tests/unit/test_worker_load_trace.py's
miniature loaders: no vLLM here), checked by the real ``verify --against``."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from preshard.core.contract import PUBLICATION_RECORD_NAME
from preshard.core.identity import files_digest
from preshard.core.manifest import MANIFEST_NAME, Manifest
from preshard.core.uris import parse_uri
from preshard.worker.commands import preflight as ad
from preshard.worker.store import fetch, publication, source_files
from preshard.worker.store.records import Journal
from preshard_dev.s3server import RcloneS3
from tests.unit.test_worker_load_trace import _convert, _tamper

from .conftest import MANIFEST_FIELDS, object_keys, read_object
from .test_step_commands import run

ID = "sha256:" + "a" * 64
X = "team-x/llama/uid-x"  # the attacker's resource
C = "team-c/llama/uid-c"  # the victim's


@pytest.fixture(autouse=True)
def _creds(s3_env: RcloneS3) -> None:
    """In-process publish reads the standard AWS_* env (the rclone dev keys)."""


def genuine(tmp: Path) -> tuple[Path, Path]:
    """(source dir, checkpoint dir): a raw TP=2 checkpoint converted from the source."""
    src, ckpt = _convert(tmp)
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return src, ckpt


def publish_dir(s3: RcloneS3, bucket: str, ckpt: Path, prefix: str, owner: str) -> bytes:
    publication.publish(
        ckpt,
        f"s3://{bucket}/{prefix}",
        manifest_fields={**MANIFEST_FIELDS, "identity": ID},
        owner=owner,
        endpoint_url=s3.endpoint,
        concurrency=2,
    )
    return read_object(s3, bucket, prefix + MANIFEST_NAME)


def copy_args(bucket: str, body: bytes, src: Path, *extra: str) -> list[str]:
    return [
        "copy", "--from", f"s3://{bucket}/x/", "--to", f"s3://{bucket}/c/", "--owner", C,
        "--expect-identity", ID, "--expect-manifest-sha256", hashlib.sha256(body).hexdigest(),
        "--against", str(src), "--source-digest", files_digest(source_files.local_entries(src)),
        *extra,
    ]  # fmt: skip


def rank0(s3: RcloneS3, bucket: str, key: str, tmp: Path) -> dict[str, torch.Tensor]:
    path = tmp / "rank0.safetensors"
    path.write_bytes(read_object(s3, bucket, key))
    return load_file(str(path))


# ---------------------------------------------------------------- finding 1: content


def test_another_sources_bytes_under_the_identity_are_not_copied(
    s3: RcloneS3, bucket: str, tmp_path: Path
) -> None:
    """X published swapped weights (one element of rank 0) under the genuine identity; C's
    copy checks them against C's own source: refused, nothing of X's left in C's prefix."""
    src, ckpt = genuine(tmp_path / "c")
    swapped = tmp_path / "x-ckpt"
    shutil.copytree(ckpt, swapped)
    _tamper(swapped, 0, "qkv.weight", (1, 2))
    body = publish_dir(s3, bucket, swapped, "x/", X)
    s3.client().put_object(Bucket=bucket, Key="c/notes.txt", Body=b"C's own object")
    rc, res, out = run(s3, tmp_path, *copy_args(bucket, body, src))
    assert rc == 3, out
    assert res is not None and res.reason == "VerificationFailed"
    assert "qkv.weight on rank 0" in (res.message or "")
    # no manifest, none of the copied objects, no record: only what was there before
    assert object_keys(s3, bucket, "c/") == {"c/notes.txt"}


def test_the_same_content_is_copied_after_the_check(
    s3: RcloneS3, bucket: str, tmp_path: Path
) -> None:
    src, ckpt = genuine(tmp_path / "c")
    body = publish_dir(s3, bucket, ckpt, "x/", X)
    rc, res, out = run(s3, tmp_path, *copy_args(bucket, body, src))
    assert rc == 0, out
    assert res is not None and res.artifact is not None
    assert res.artifact["checkedAgainstSource"] is True
    man = json.loads(read_object(s3, bucket, "c/" + MANIFEST_NAME))
    assert man["owner"] == C
    got = rank0(s3, bucket, "c/model-rank-0-part-0.safetensors", tmp_path)
    want = load_file(str(ckpt / "model-rank-0-part-0.safetensors"))
    assert torch.equal(got["qkv.weight"], want["qkv.weight"])
    assert f"c/{PUBLICATION_RECORD_NAME}" not in object_keys(
        s3, bucket, "c/"
    )  # record removed last


def test_a_source_that_changed_since_the_preflight_is_refused(
    s3: RcloneS3, bucket: str, tmp_path: Path
) -> None:
    src, ckpt = genuine(tmp_path / "c")
    body = publish_dir(s3, bucket, ckpt, "x/", X)
    args = copy_args(bucket, body, src)
    (src / "config.json").write_text(json.dumps({"model_type": "llama", "x": 1}))
    rc, res, out = run(s3, tmp_path, *args)
    assert rc == 3 and res is not None and res.reason == "SourceChanged", out
    assert MANIFEST_NAME not in {k.rsplit("/", 1)[-1] for k in object_keys(s3, bucket, "c/")}


def test_adopt_of_bytes_that_are_not_the_requesters_conversion_is_refused(
    s3: RcloneS3, bucket: str, tmp_path: Path
) -> None:
    src, ckpt = genuine(tmp_path / "c")
    planted = tmp_path / "planted"
    shutil.copytree(ckpt, planted)
    _tamper(planted, 1, "down.weight", (0, 0))
    body = publish_dir(s3, bucket, planted, "c/", "team-c/gone/uid-0")
    rc, res, out = run(
        s3, tmp_path, "adopt", "--output", f"s3://{bucket}/c/", "--owner", C,
        "--expect-owner", "team-c/gone/uid-0", "--expect-identity", ID,
        "--expect-manifest-sha256", hashlib.sha256(body).hexdigest(), "--against", str(src),
    )  # fmt: skip
    assert rc == 3 and res is not None and res.reason == "VerificationFailed", out
    assert read_object(s3, bucket, "c/" + MANIFEST_NAME) == body  # not taken over


# ------------------------------------------------------- finding 3: publication rules


def test_copy_deletes_nothing_it_did_not_write(s3: RcloneS3, bucket: str, tmp_path: Path) -> None:
    src, ckpt = genuine(tmp_path / "c")
    body = publish_dir(s3, bucket, ckpt, "x/", X)
    s3.client().put_object(Bucket=bucket, Key="c/notes.txt", Body=b"unrelated")
    rc, _, out = run(s3, tmp_path, *copy_args(bucket, body, src))
    assert rc == 0, out
    assert read_object(s3, bucket, "c/notes.txt") == b"unrelated"


def test_copy_refuses_another_owners_unfinished_publication_below_and_keeps_it(
    s3: RcloneS3, bucket: str, tmp_path: Path
) -> None:
    src, ckpt = genuine(tmp_path / "c")
    body = publish_dir(s3, bucket, ckpt, "x/", X)
    c = s3.client()
    rec = Journal("team-b/other/uid-b", frozenset({"w.safetensors"})).to_json()
    c.put_object(Bucket=bucket, Key=f"c/team-b/{PUBLICATION_RECORD_NAME}", Body=rec)
    c.put_object(Bucket=bucket, Key="c/team-b/w.safetensors", Body=b"in progress")
    rc, res, out = run(s3, tmp_path, *copy_args(bucket, body, src))
    assert rc == 3 and res is not None and res.reason == "OutputOwnedByOther", out
    assert "team-b/other" not in (res.message or "")  # never the other owner
    assert object_keys(s3, bucket, "c/") == {
        f"c/team-b/{PUBLICATION_RECORD_NAME}",
        "c/team-b/w.safetensors",
    }


def test_copy_refuses_a_parent_checkpoint_of_another_owner(
    s3: RcloneS3, bucket: str, tmp_path: Path
) -> None:
    src, ckpt = genuine(tmp_path / "c")
    body = publish_dir(s3, bucket, ckpt, "x/", X)
    parent = publish_dir(s3, bucket, ckpt, "p/", "team-b/parent/uid-p")
    args = [a.replace(f"s3://{bucket}/c/", f"s3://{bucket}/p/c/") for a in
            copy_args(bucket, body, src)]  # fmt: skip
    rc, res, out = run(s3, tmp_path, *args)
    assert rc == 3 and res is not None and res.reason == "OutputOwnedByOther", out
    assert read_object(s3, bucket, "p/" + MANIFEST_NAME) == parent
    assert not object_keys(s3, bucket, "p/c/")


def test_copy_writes_its_record_first(s3: RcloneS3, bucket: str, tmp_path: Path) -> None:
    """A copy that fails midway (rclone has no UploadPartCopy) leaves its publication
    record listing every key it may have written, for the next run or a purge."""
    src, ckpt = genuine(tmp_path / "c")
    body = publish_dir(s3, bucket, ckpt, "x/", X)
    rc, res, _ = run(s3, tmp_path, *copy_args(bucket, body, src, "--multipart-threshold", "1"))
    assert rc == 3 and res is not None and res.reason == "CopyNotSupported"
    rec = Journal.from_json(read_object(s3, bucket, f"c/{PUBLICATION_RECORD_NAME}"))
    man = json.loads(read_object(s3, bucket, "x/" + MANIFEST_NAME))
    assert rec.owner == C and rec.keys == {f["key"] for f in man["files"]}


def test_the_preflight_counts_a_nested_publication_record_as_an_overlap(
    s3: RcloneS3, bucket: str
) -> None:
    rec = Journal("team-b/other/uid-b", frozenset({"w"})).to_json()
    s3.client().put_object(Bucket=bucket, Key=f"out/sub/{PUBLICATION_RECORD_NAME}", Body=rec)
    state = ad.output_state(s3.client(), parse_uri(f"s3://{bucket}/out/"))
    assert state["overlapping"] == [
        {"key": f"out/sub/{PUBLICATION_RECORD_NAME}", "relation": "nested", "kind": "publication",
         "owner": "team-b/other/uid-b"}
    ]  # fmt: skip


# ---------------------------------------------------------- finding 4: planted manifests


def planted_manifest(s3: RcloneS3, bucket: str, tmp: Path, prefix: str, owner: str | None) -> bytes:
    """A valid manifest at ``prefix`` claiming the identity, naming ``owner`` and listing
    ``victim.bin``: someone else's object under the prefix."""
    _, ckpt = genuine(tmp)
    publish_dir(s3, bucket, ckpt, "template/", X)
    man = json.loads(read_object(s3, bucket, "template/" + MANIFEST_NAME))
    man["owner"] = owner
    man["files"] = [*man["files"], {"key": "victim.bin", "size": 16, "sha256": "0" * 64}]
    if "totalBytes" in man:
        man["totalBytes"] += 16
    body = json.dumps(man).encode()
    Manifest.from_json(body)  # a well-formed manifest: only its provenance is missing
    c = s3.client()
    c.put_object(Bucket=bucket, Key=prefix + "victim.bin", Body=b"someone's object")
    c.put_object(Bucket=bucket, Key=prefix + MANIFEST_NAME, Body=body)
    return body


def test_withdraw_of_an_unproven_manifest_deletes_the_manifest_alone(
    s3: RcloneS3, bucket: str, tmp_path: Path
) -> None:
    body = planted_manifest(s3, bucket, tmp_path, "ck/", "ns/gone/uid-0")
    rc, _, out = run(
        s3, tmp_path, "withdraw", "--output", f"s3://{bucket}/ck/", "--owner", C,
        "--expect-owner", "ns/gone/uid-0",
        "--expect-manifest-sha256", hashlib.sha256(body).hexdigest(),
    )  # fmt: skip
    assert rc == 0, out
    assert object_keys(s3, bucket, "ck/") == {"ck/victim.bin"}


def test_publishing_over_an_ownerless_manifest_never_deletes_what_it_lists(
    s3: RcloneS3, bucket: str, tmp_path: Path
) -> None:
    planted_manifest(s3, bucket, tmp_path, "ck/", None)
    _, ckpt = genuine(tmp_path / "c")
    publish_dir(s3, bucket, ckpt, "ck/", C)
    assert read_object(s3, bucket, "ck/victim.bin") == b"someone's object"
    assert json.loads(read_object(s3, bucket, "ck/" + MANIFEST_NAME))["owner"] == C


# ------------------------------------------------------------ the pin in fetch_source


def test_fetch_source_refuses_a_local_source_that_changed(tmp_path: Path) -> None:
    src, _ = genuine(tmp_path)
    pin = files_digest(source_files.local_entries(src))
    assert fetch.fetch_source(str(src), tmp_path / "w", pin=pin) == src.resolve()
    data = bytearray((src / "model.safetensors").read_bytes())
    data[-1] ^= 1  # same size, one bit
    (src / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(Exception) as exc:
        fetch.fetch_source(str(src), tmp_path / "w", pin=pin)
    assert getattr(exc.value, "reason", None) == "SourceChanged"


def test_fetch_source_refuses_an_s3_source_that_changed(
    s3: RcloneS3, bucket: str, tmp_path: Path
) -> None:
    src, _ = genuine(tmp_path)
    c = s3.client()
    for p in src.iterdir():
        c.put_object(Bucket=bucket, Key="src/" + p.name, Body=p.read_bytes())
    u = parse_uri(f"s3://{bucket}/src/")
    pin = files_digest(source_files.s3_entries(c, u))
    got = fetch.fetch_source(str(u), tmp_path / "w1", endpoint_url=s3.endpoint, pin=pin)
    assert (got / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    data = bytearray((src / "model.safetensors").read_bytes())
    data[-1] ^= 1
    c.put_object(Bucket=bucket, Key="src/model.safetensors", Body=bytes(data))
    with pytest.raises(Exception) as exc:
        fetch.fetch_source(str(u), tmp_path / "w2", endpoint_url=s3.endpoint, pin=pin)
    assert getattr(exc.value, "reason", None) == "SourceChanged"
    assert not (tmp_path / "w2" / "model.safetensors").exists()  # refused before reading


def test_convert_refuses_weights_swapped_after_the_preflight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding 1: the preflight pinned the genuine files; the tenant swaps the weights
    before the conversion runs: ``convert --source-digest`` fails permanently
    (SourceChanged) before any engine, and publishes nothing."""
    from preshard.core.errors import PreshardError
    from preshard.worker.conversion import engine_path

    from .test_convert_overlap import fake_source, reporter, request

    src = tmp_path / "src"
    fake_source(src)
    pin = files_digest(source_files.local_entries(src))
    weights = next(src.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # the swap: same names and sizes, other bytes
    weights.write_bytes(bytes(data))

    def no_engine(*a: object, **k: object) -> None:
        raise AssertionError("the engine must not run")

    monkeypatch.setattr(engine_path, "run_engine", no_engine)
    out = tmp_path / "out"
    req = request(tmp_path, str(out), None, source_digest=pin)
    with pytest.raises(PreshardError) as exc:
        engine_path.convert(req, reporter())
    assert exc.value.reason == "SourceChanged" and exc.value.permanent
    assert not out.exists() or not any(out.iterdir())


def test_verify_against_downloads_a_published_s3_checkpoint(
    s3_env: RcloneS3, bucket: str, tmp_path: Path
) -> None:
    """``preshard verify --against SOURCE s3://...`` downloads the checkpoint (every file
    sha256-checked, the manifest last) and then checks it against the sharding vLLM plans
    from the source: this miniature checkpoint's tensors no vLLM model has, so the check
    refuses it after the download, with one clear line (exit 3), never a traceback (the
    download once went through ``fetch``'s command line and failed on its flags)."""
    src, ckpt = genuine(tmp_path / "v")
    publish_dir(s3_env, bucket, ckpt, "v/", X)
    work = tmp_path / "work"
    rc, _, out = run(
        s3_env, tmp_path, "verify", "--against", str(src), "--work-dir", str(work),
        f"s3://{bucket}/v/",
    )  # fmt: skip
    assert rc == 3, out
    assert "Traceback" not in out and "unexpected error" not in out, out
    [line] = [x for x in out.splitlines() if x.startswith("preshard: error:")]
    # the download came first and is complete: every listed file, and the manifest last
    man = Manifest.from_json((work / "checkpoint" / MANIFEST_NAME).read_bytes())
    got = {p.name for p in (work / "checkpoint").iterdir()}
    assert got == {f.key for f in man.files} | {MANIFEST_NAME}, (got, line)
    assert man.files and all(
        (work / "checkpoint" / f.key).read_bytes() == (ckpt / f.key).read_bytes() for f in man.files
    )
