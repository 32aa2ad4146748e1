"""``preshard convert --engine none`` from S3 to S3 (rclone on 127.0.0.1): the source read
by ranged GETs only (no weight file in the work dir), each rank file uploaded as soon as
it is written and deleted locally, the manifest last with ``convertedOn.engine: none``,
and the published rank files byte-identical to a recorded real engine run
(tests/golden/engine-traces/mixtral: the engine's traces and its files' sha256).

TEST-ONLY PLANNER STAND-IN: the planner's ``plan_ranks`` returns the recorded engine
traces (the real planner is proven against the engine in tests/vllm); everything else
(sources, writer, checks, streaming publication, manifest) is the real code.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from preshard.cli import build_parser
from preshard.core.manifest import MANIFEST_NAME, Manifest
from preshard.worker import shardpublish
from preshard.worker.commands import runner
from preshard_dev.tinymodel import make_tiny_model

from .conftest import client_env, object_keys, read_object

GOLDEN = Path(__file__).parents[1] / "golden" / "engine-traces" / "mixtral"


def test_engine_none_s3_to_s3(
    s3: Any,
    bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    traces = [json.loads(p.read_text()) for p in sorted(GOLDEN.glob("preshard-trace-rank-*.json"))]
    info = json.loads((GOLDEN / "engine-files.json").read_text())
    from preshard.worker import planner

    monkeypatch.setattr(planner, "plan_ranks", lambda *a, **k: traces)
    for k, v in client_env(s3).items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("PRESHARD_TERMINATION_LOG", str(tmp_path / "term"))
    model = make_tiny_model("mixtral", tmp_path / "model")
    client = s3.client()
    for p in sorted(model.iterdir()):
        client.put_object(Bucket=bucket, Key="src/" + p.name, Body=p.read_bytes())
    work = tmp_path / "work"
    local_when_ready: list[set[str]] = []
    real_ready = shardpublish.StreamingPublication.ready

    def ready(self: Any, rel: str, sha: str) -> None:
        # what the work dir holds each time a file is handed to the upload
        local_when_ready.append({p.name for p in (work / "shards").glob("model-*.safetensors")})
        real_ready(self, rel, sha)

    monkeypatch.setattr(shardpublish.StreamingPublication, "ready", ready)
    args = build_parser().parse_args(
        ["convert", "--source", f"s3://{bucket}/src/", "-tp", "2", "--output", f"s3://{bucket}/out/",
         "--work-dir", str(work), "--max-file-size", "256Ki", "--owner", "ns/ef/uid", "--progress", "lines"]
    )  # fmt: skip
    assert runner.run(args) == 0  # auto: the (stand-in) planner supports the model
    stdout = capsys.readouterr().out
    assert "Planning" in stdout and "Converting" in stdout and "Uploading" in stdout
    man = Manifest.from_json(read_object(s3, bucket, "out/" + MANIFEST_NAME))
    assert man.engine == "none"
    for key, want in info["files"].items():
        assert hashlib.sha256(read_object(s3, bucket, "out/" + key)).hexdigest() == want["sha256"]
    assert {k.removeprefix("out/") for k in object_keys(s3, bucket, "out/")} == {
        f.key for f in man.files
    } | {MANIFEST_NAME}
    # never a weight file of the source on disk; every rank file deleted once uploaded
    assert not list(work.rglob("model.safetensors"))
    assert not list((work / "shards").glob("model-*.safetensors"))
    # the rank files did not all sit on disk at once
    assert max(len(s) for s in local_when_ready) < len(info["files"])
    result = json.loads((tmp_path / "term").read_text())
    assert result["artifact"]["engine"] == "none"


def test_engine_none_upload_failure_stops_the_writer(
    s3: Any, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upload refused for good (403 on a rank file) ends the conversion at once:
    exit 3, no manifest, what was uploaded removed, and the writer stopped (it did not
    go on writing every file to disk)."""
    from preshard.worker import shardwriter
    from preshard_dev.faultproxy import FaultProxy, FaultRule

    traces = [json.loads(p.read_text()) for p in sorted(GOLDEN.glob("preshard-trace-rank-*.json"))]
    from preshard.worker import planner

    monkeypatch.setattr(planner, "plan_ranks", lambda *a, **k: traces)
    model = make_tiny_model("mixtral", tmp_path / "model")
    written: list[str] = []
    real_finish = shardwriter._FileWriter.finish

    def finish(self: Any) -> Any:
        done = real_finish(self)
        written.append(done.name)
        return done

    monkeypatch.setattr(shardwriter._FileWriter, "finish", finish)
    with FaultProxy(s3.endpoint, seed=5) as proxy:
        for k, v in client_env(s3, proxy.endpoint).items():
            monkeypatch.setenv(k, v)
        monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
        monkeypatch.setenv("PRESHARD_TERMINATION_LOG", str(tmp_path / "term"))
        proxy.add_rule(
            FaultRule(
                operation="PutObject", path=r"model-rank-0-part-0", status=403, code="AccessDenied"
            )
        )
        args = build_parser().parse_args(
            ["convert", "--source", str(model), "-tp", "2", "--output", f"s3://{bucket}/bad/",
             "--work-dir", str(tmp_path / "w"), "--max-file-size", "256Ki", "--engine", "none"]
        )  # fmt: skip
        assert runner.run(args) == 3
    result = json.loads((tmp_path / "term").read_text())
    assert result["reason"] == "AccessDenied" and "nothing was published" in result["message"]
    assert MANIFEST_NAME not in {k.removeprefix("bad/") for k in object_keys(s3, bucket, "bad/")}
    assert len(written) < 8  # 8 rank files in all: the writer stopped early
