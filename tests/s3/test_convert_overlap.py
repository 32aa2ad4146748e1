"""``convert()`` uploads the rank files WHILE the engine verification runs, and writes the
manifest only when every check passed; a failed check (or any error) aborts the upload.

Real parts: the conversion pipeline (``preshard.worker.conversion.engine_path.convert``), the real
``publication.Publication`` against a real S3 server on 127.0.0.1 (``rclone serve s3``, through
the fault proxy, which records every request), the real file-level shard checks and the
real progress reporter. Stood in (no vLLM here; a real-vLLM run of the whole path is
tests/vllm/test_convert_tp2.py): the two vLLM engine runs (``convert.run_engine``: the
conversion writes rank files like the ``preshard_raw`` loader, the verification engine is
a function the test controls) and the engine-free check (``verify_against``, tested with
real shards in tests/vllm and tests/unit), whose report a stand-in returns.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from preshard.core.contract import PUBLICATION_RECORD_NAME
from preshard.core.errors import PreshardError
from preshard.core.manifest import MANIFEST_NAME, Manifest, build_manifest
from preshard.core.plan import ConversionPlan, Layout
from preshard.core.progress import Result, verification_status
from preshard.core.uris import parse_output_uri, parse_uri
from preshard.worker.commands import runner
from preshard.worker.conversion import common, engine_path
from preshard.worker.conversion import result as conv_result
from preshard.worker.engine.process import EngineError, EngineOutcome, EngineRequest
from preshard.worker.progress import Reporter, Terminated
from preshard.worker.store.records import Journal
from preshard.worker.verify import against as verify_against
from preshard_dev.faultproxy import FaultProxy
from preshard_dev.s3server import RcloneS3

from .conftest import MANIFEST_FIELDS, multipart_uploads, object_keys, read_object

OWNER = "ns/overlap/uid-1"
RANKS = ("model-rank-0-part-0.safetensors", "model-rank-1-part-0.safetensors")
TOKENS = ((5, 6, 7), (8, 9, 10), (11, 12, 13))  # the three default prompts
OTHER = "ns/other/uid-9"
WAIT = 60.0


def fake_source(d: Path) -> Path:
    d.mkdir(parents=True)
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "num_hidden_layers": 2,
        "vocab_size": 512,
        "torch_dtype": "float32",
    }
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "tokenizer.json").write_text("{}")
    save_file(
        {"model.embed_tokens.weight": np.ones((512, 128), np.float32)}, str(d / "m.safetensors")
    )
    return d


def outcome(tokens: tuple[tuple[int, ...], ...] = TOKENS) -> EngineOutcome:
    logprobs = tuple(tuple(((t, -0.5), (t + 1, -1.5)) for t in toks) for toks in tokens)
    return EngineOutcome(
        tokens=tokens,
        load_seconds=0.1,
        generate_seconds=0.1,
        save_seconds=0.1,
        vllm_version="0.32.0",
        platform="cpu",
        settings={},
        logprobs=logprobs,
    )


class Engines:
    """Stands in for ``run_engine``: the conversion writes two rank files (seeded, so a
    second run writes the same bytes); the verification engine runs ``verify``."""

    def __init__(self, verify: Callable[[EngineRequest], EngineOutcome], mib: int = 6) -> None:
        self.verify = verify
        self.mib = mib
        self.calls: list[str] = []

    def __call__(self, req: EngineRequest, **_: Any) -> EngineOutcome:
        if req.load_format == "sharded_state":
            self.calls.append("verify")
            return self.verify(req)
        self.calls.append("convert")
        assert req.save_dir is not None
        rng = np.random.default_rng(7)
        rows = self.mib * 2**20 // (4 * 256)
        for rank, name in enumerate(RANKS):
            w = rng.standard_normal((rows, 256), dtype=np.float32) + rank
            save_file({"model.layers.0.mlp.down_proj.weight": w}, str(Path(req.save_dir) / name))
        return outcome()


class FreeReport:
    def summary(self) -> dict[str, Any]:
        return {
            "method": "engine-free",
            "matched": True,
            "sourceTensors": 1,
            "savedTensors": 2,
            "copies": 2,
            "fills": 0,
            "bytesCompared": 12 * 2**20,
        }

    def describe(self) -> str:
        return "2 saved tensors rebuilt from 1 source tensors bit for bit (stand-in)"


@pytest.fixture
def pipeline(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Engines]:
    def install(verify: Callable[[EngineRequest], EngineOutcome], **kw: Any) -> Engines:
        engines = Engines(verify, **kw)
        monkeypatch.setattr(engine_path, "run_engine", engines)
        monkeypatch.setattr(
            verify_against,
            "write_sharding",
            lambda shards: (shards / "preshard-sharding.json").write_text('{"stand-in": 1}\n'),
        )
        monkeypatch.setattr(verify_against, "verify_against", lambda *a, **k: FreeReport())
        return engines

    return install


def request(tmp_path: Path, output: str, endpoint: str | None, **kw: Any) -> common.ConvertRequest:
    src = tmp_path / "src"
    if not src.exists():
        fake_source(src)
    plan = ConversionPlan(
        source=parse_uri(str(src), allow_local=True),
        output=parse_output_uri(output, allow_local=True),
        layout=Layout(2),
        owner=OWNER,
        **kw,
    )
    return common.ConvertRequest(
        plan=plan, work_dir=tmp_path / "work", endpoint_url=endpoint, concurrency=4
    )


def reporter() -> Reporter:
    return Reporter("lines", stream=io.StringIO(), machine_stream=io.StringIO())


def wait_for(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def uploads(proxy: FaultProxy) -> list[str]:
    """Object names sent (PUT or a part) through the proxy, in order."""
    return [
        r.path.rsplit("/", 1)[1]
        for r in proxy.records()
        if r.operation in ("PutObject", "UploadPart", "CreateMultipartUpload")
    ]


def local_names() -> set[str]:
    return {*RANKS, "config.json", "tokenizer.json", "preshard-sharding.json"}


def test_the_upload_runs_while_the_engine_verifies_and_the_manifest_comes_last(
    s3_env: RcloneS3, bucket: str, proxy: FaultProxy, tmp_path: Path, pipeline: Any
) -> None:
    prefix = "overlap/"
    seen: dict[str, Any] = {}

    def verify(req: EngineRequest) -> EngineOutcome:
        # The stand-in verification blocks until every file is in the bucket: it only
        # returns if the upload started before (and ran during) the verification.
        want = {prefix + n for n in local_names()}
        wait_for(lambda: want <= object_keys(s3_env, bucket, prefix), "the upload")
        seen["keys"] = object_keys(s3_env, bucket, prefix)
        # ... and until the upload's thread has finished (its progress counted)
        wait_for(
            lambda: not any(t.name == "s3-upload" for t in threading.enumerate()), "the thread"
        )
        seen["journal"] = Journal.from_json(
            read_object(s3_env, bucket, prefix + PUBLICATION_RECORD_NAME)
        )
        return outcome()

    engines = pipeline(verify)
    rep = reporter()
    out = engine_path.convert(request(tmp_path, f"s3://{bucket}/{prefix}", proxy.endpoint), rep)

    assert engines.calls == ["convert", "verify"]
    # While the engine verified: every file uploaded, the record listing each key
    # written, and no manifest yet.
    assert prefix + MANIFEST_NAME not in seen["keys"]
    assert seen["keys"] == {prefix + n for n in local_names()} | {prefix + PUBLICATION_RECORD_NAME}
    assert seen["journal"].owner == OWNER
    assert seen["journal"].keys == local_names()
    # The manifest last, after every file; the record removed after it.
    sent = uploads(proxy)
    assert sent.index(PUBLICATION_RECORD_NAME) < min(sent.index(n) for n in local_names())
    assert sent.count(MANIFEST_NAME) == 1 and sent[-1] == MANIFEST_NAME
    assert object_keys(s3_env, bucket, prefix) == {prefix + n for n in local_names()} | {
        prefix + MANIFEST_NAME
    }
    man = Manifest.from_json(read_object(s3_env, bucket, prefix + MANIFEST_NAME))
    shards = tmp_path / "work" / "shards"
    for f in man.files:
        assert read_object(s3_env, bucket, prefix + f.key) == (shards / f.key).read_bytes()
    assert man.owner == OWNER and man.verification is not None
    assert man.verification["engine"]["positions"] == 9
    # Progress: Verifying while the upload ran, then Uploading for what was left.
    stages = [r.stage for r in rep.records]
    order = [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s]
    assert order[-3:] == ["Verifying", "Uploading", "Published"]
    uploading = [r for r in rep.records if r.stage == "Uploading"]
    # everything went up during the verification: the remainder is 0 bytes
    assert uploading[0].bytes_total == 0
    assert out.timings["upload_during_verify"] > 0
    assert {"verify_engine", "upload", "verify_engine_free"} <= set(out.timings)


def test_a_failed_verification_publishes_nothing_and_removes_what_was_uploaded(
    s3_env: RcloneS3, bucket: str, proxy: FaultProxy, tmp_path: Path, pipeline: Any
) -> None:
    prefix = "bad/"

    def verify(req: EngineRequest) -> EngineOutcome:
        wait_for(lambda: prefix + RANKS[1] in object_keys(s3_env, bucket, prefix), "a rank file")
        return outcome(((5, 6, 7), (8, 9, 11), (11, 12, 13)))  # one token differs

    pipeline(verify)
    with pytest.raises(PreshardError) as err:
        engine_path.convert(
            request(tmp_path, f"s3://{bucket}/{prefix}", proxy.endpoint), reporter()
        )
    assert err.value.reason == "VerificationFailed" and err.value.permanent
    assert "nothing was published: removed the " in err.value.message
    assert RANKS[1] in err.value.message
    # No manifest, no shard, no record: nothing of this owner is left.
    assert object_keys(s3_env, bucket, prefix) == set()
    assert MANIFEST_NAME not in uploads(proxy)


def test_an_engine_that_cannot_load_the_shards_aborts_mid_upload(
    s3_env: RcloneS3,
    bucket: str,
    proxy: FaultProxy,
    tmp_path: Path,
    pipeline: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The verification fails while the upload is still in flight (slow parts): queued
    parts stop, the multipart uploads are aborted and completed objects deleted."""
    from preshard_dev.faultproxy import FaultRule

    prefix = "midway/"
    # Rank files of 40 MiB (multipart: 32 MiB parts), slow parts (SlowDown after 0.3 s,
    # retried by preshard, not botocore).
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    proxy.add_rule(FaultRule(operation="UploadPart", delay=0.3, max_faults=8))

    def verify(req: EngineRequest) -> EngineOutcome:
        wait_for(lambda: any(r.operation == "UploadPart" for r in proxy.records()), "a part")
        raise EngineError("Missing keys", stage="load", kind="KeyError")

    pipeline(verify, mib=40)
    with pytest.raises(PreshardError) as err:
        engine_path.convert(
            request(tmp_path, f"s3://{bucket}/{prefix}", proxy.endpoint), reporter()
        )
    assert err.value.reason == "VerificationFailed"
    assert "nothing was published" in err.value.message
    assert object_keys(s3_env, bucket, prefix) == set()
    assert multipart_uploads(s3_env, bucket, prefix) == []


def test_another_owners_manifest_appearing_meanwhile_is_refused_and_kept(
    s3_env: RcloneS3, bucket: str, proxy: FaultProxy, tmp_path: Path, pipeline: Any
) -> None:
    """preshard itself would not publish here meanwhile (this run's record names its
    owner); a writer that ignores the record does: its manifest, listing rank 0 with its
    own bytes, appears while this run verifies. The commit refuses, and the abort leaves
    that object and that manifest alone."""
    prefix = "race/"
    client = s3_env.client()

    def verify(req: EngineRequest) -> EngineOutcome:
        want = {prefix + n for n in local_names()}
        wait_for(lambda: want <= object_keys(s3_env, bucket, prefix), "the upload")
        client.put_object(Bucket=bucket, Key=prefix + RANKS[0], Body=b"theirs")
        client.put_object(Bucket=bucket, Key=prefix + "theirs/" + RANKS[1], Body=b"theirs")
        sha = hashlib.sha256(b"theirs").hexdigest()
        theirs = build_manifest(
            [(RANKS[0], 6, sha), ("theirs/" + RANKS[1], 6, sha)],
            owner=OTHER,
            created_at="2026-12-01T00:00:00Z",
            **MANIFEST_FIELDS,
        )
        client.put_object(Bucket=bucket, Key=prefix + MANIFEST_NAME, Body=theirs.to_json())
        return outcome()

    pipeline(verify)
    with pytest.raises(PreshardError) as err:
        engine_path.convert(
            request(tmp_path, f"s3://{bucket}/{prefix}", proxy.endpoint), reporter()
        )
    assert err.value.reason == "OutputOwnedByOther"
    assert "nothing was published: removed the 4 object(s)" in err.value.message
    assert "kept 1 that another manifest there refers to" in err.value.message
    man = Manifest.from_json(read_object(s3_env, bucket, prefix + MANIFEST_NAME))
    assert man.owner == OTHER  # theirs, untouched
    assert read_object(s3_env, bucket, prefix + RANKS[0]) == b"theirs"
    # Ours is gone, and no record claims their object as ours (a purge would delete it).
    assert object_keys(s3_env, bucket, prefix) == {
        prefix + RANKS[0],
        prefix + "theirs/" + RANKS[1],
        prefix + MANIFEST_NAME,
    }


def test_a_transient_failure_leaves_the_upload_recorded_and_the_retry_reuses_it(
    s3_env: RcloneS3, bucket: str, proxy: FaultProxy, tmp_path: Path, pipeline: Any
) -> None:
    prefix = "retry/"
    want = {prefix + n for n in local_names()}

    def dies(req: EngineRequest) -> EngineOutcome:
        wait_for(lambda: want <= object_keys(s3_env, bucket, prefix), "the upload")
        raise EngineError("the engine process died (signal 9)", stage="load")

    pipeline(dies)
    with pytest.raises(PreshardError) as err:
        engine_path.convert(
            request(tmp_path, f"s3://{bucket}/{prefix}", proxy.endpoint), reporter()
        )
    assert not err.value.permanent  # the Job retries
    assert "are left unreferenced" in err.value.message
    assert PUBLICATION_RECORD_NAME in err.value.message
    # Unreferenced (no manifest) and recorded as this owner's.
    assert object_keys(s3_env, bucket, prefix) == want | {prefix + PUBLICATION_RECORD_NAME}
    journal = Journal.from_json(read_object(s3_env, bucket, prefix + PUBLICATION_RECORD_NAME))
    assert (journal.owner, journal.keys) == (OWNER, local_names())

    # The retry (same bytes: a deterministic conversion) sends no file again.
    proxy.reset_stats()
    pipeline(lambda req: outcome())
    out = engine_path.convert(
        request(tmp_path, f"s3://{bucket}/{prefix}", proxy.endpoint), reporter()
    )
    assert set(uploads(proxy)) == {PUBLICATION_RECORD_NAME, MANIFEST_NAME}
    assert out.artifact["files"] == len(local_names())
    assert object_keys(s3_env, bucket, prefix) == want | {prefix + MANIFEST_NAME}


def test_termination_during_verification_removes_the_upload(
    s3_env: RcloneS3, bucket: str, proxy: FaultProxy, tmp_path: Path, pipeline: Any
) -> None:
    prefix = "sigterm/"

    def terminated(req: EngineRequest) -> EngineOutcome:
        wait_for(lambda: prefix + RANKS[0] in object_keys(s3_env, bucket, prefix), "the upload")
        raise Terminated()

    pipeline(terminated)
    with pytest.raises(Terminated) as err:
        engine_path.convert(
            request(tmp_path, f"s3://{bucket}/{prefix}", proxy.endpoint), reporter()
        )
    assert err.value.note.startswith("removed the ")
    assert object_keys(s3_env, bucket, prefix) == set()


def test_no_verify_and_a_local_output_upload_as_before(tmp_path: Path, pipeline: Any) -> None:
    engines = pipeline(lambda req: pytest.fail("no engine check with --no-verify"))
    out_dir = tmp_path / "out"
    rep = reporter()
    out = engine_path.convert(request(tmp_path, str(out_dir), None, verify=False), rep)
    assert engines.calls == ["convert"]
    assert {p.name for p in out_dir.iterdir()} == local_names() | {MANIFEST_NAME}
    man = Manifest.from_json((out_dir / MANIFEST_NAME).read_text())
    shards = tmp_path / "work" / "shards"
    for f in man.files:
        assert (out_dir / f.key).read_bytes() == (shards / f.key).read_bytes()
    uploading = [r for r in rep.records if r.stage == "Uploading"]
    assert uploading[-1].bytes_done == uploading[-1].bytes_total == man.total_bytes
    assert out.artifact["manifestUri"] == str(out_dir / MANIFEST_NAME)


def test_a_failed_verification_removes_local_copies(tmp_path: Path, pipeline: Any) -> None:
    started = threading.Event()

    def verify(req: EngineRequest) -> EngineOutcome:
        wait_for(lambda: (tmp_path / "out" / RANKS[1]).exists(), "the copy")
        started.set()
        return outcome(((1,), (2,), (3,)))

    pipeline(verify)
    with pytest.raises(PreshardError) as err:
        engine_path.convert(request(tmp_path, str(tmp_path / "out"), None), reporter())
    assert started.is_set() and err.value.reason == "VerificationFailed"
    assert list((tmp_path / "out").iterdir()) == []


def test_the_result_carries_stages_and_the_verification_the_operator_reads(
    s3_env: RcloneS3, bucket: str, tmp_path: Path, pipeline: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``preshard convert`` (run) writes stages and verification in the termination
    message, in the shape status.progress.verification takes."""
    from preshard.cli import build_parser

    pipeline(lambda req: outcome())
    fake_source(tmp_path / "src")
    term = tmp_path / "termination-log"
    monkeypatch.setenv("PRESHARD_TERMINATION_LOG", str(term))
    args = build_parser().parse_args(
        [
            "convert",
            "--source",
            str(tmp_path / "src"),
            "-tp",
            "2",
            "--output",
            f"s3://{bucket}/result/",
            "--endpoint-url",
            s3_env.endpoint,
            "--work-dir",
            str(tmp_path / "work"),
            "--owner",
            OWNER,
            "--progress",
            "lines",
        ]
    )
    assert runner.run(args) == 0
    result = Result.from_message(term.read_text())
    assert result is not None and result.result == "Succeeded"
    assert result.stages is not None
    assert {"Downloading", "Converting", "Verifying", "Uploading"} <= set(result.stages)
    v = result.verification
    assert v is not None
    assert verification_status(v) == v  # exactly the fields the CRD declares
    assert v["passed"] is True
    assert [c["name"] for c in v["checks"]] == ["engine-free", "engine"]
    assert all(c["passed"] for c in v["checks"])
    assert "2 saved tensors rebuilt from 1 source tensors bit for bit" in v["checks"][0]["detail"]
    assert (
        "top-2 log-probabilities (abs<=0.05, bit-identical) at 9 positions of 3 prompts"
        in v["checks"][1]["detail"]
    )
    assert v["summary"].startswith("engine-free: ")


def test_verification_result_reports_a_failed_check_and_a_skipped_engine() -> None:
    free = FreeReport().summary()
    got = conv_result.verification_result({"engineFree": free | {"matched": False}})
    assert got["passed"] is False
    assert [c["passed"] for c in got["checks"]] == [False]
    assert got["summary"].endswith("; engine check skipped (--no-verify)")
    assert verification_status(got) == got


def test_an_unexpected_error_removes_the_upload_and_says_so(
    s3_env: RcloneS3, bucket: str, proxy: FaultProxy, tmp_path: Path, pipeline: Any
) -> None:
    prefix = "bug/"

    def bug(req: EngineRequest) -> EngineOutcome:
        wait_for(lambda: prefix + RANKS[1] in object_keys(s3_env, bucket, prefix), "the upload")
        raise RuntimeError("a bug")

    pipeline(bug)
    with pytest.raises(RuntimeError) as err:
        engine_path.convert(
            request(tmp_path, f"s3://{bucket}/{prefix}", proxy.endpoint), reporter()
        )
    assert any(n.startswith("nothing was published: removed the ") for n in err.value.__notes__)
    assert object_keys(s3_env, bucket, prefix) == set()
