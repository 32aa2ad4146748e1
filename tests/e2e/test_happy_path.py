"""The product end to end with real vLLM: examples/tiny-tp2.yaml applied to the API
emulator -> the operator's Job -> the local Job runner runs the real ``preshard convert``
(vLLM CPU build, TP=2; the default engine ``auto``, which the planner supports for this
model: the rank files are planned from vLLM's weight loaders and streamed from S3, no
engine) -> shards and manifest in a real S3 server -> Ready with artifact, serving status
and ConfigMap; then ``preshard fetch`` of the result and a vLLM load with
``load_format="sharded_state"`` that generates the source model's greedy tokens: the
engine-free shards serve exactly what the source serves."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from preshard.core.manifest import MANIFEST_NAME
from preshard.worker.engine.process import EngineRequest, default_prompts, run_engine
from preshard_dev.stack import ROOT, LocalStack

from .conftest import cli, ready_condition, status_of

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]
EXAMPLE = ROOT / "examples" / "tiny-tp2.yaml"


def test_tiny_tp2_resource_to_verified_shards_and_back(stack_factory: Any, tmp_path: Path) -> None:
    stack: LocalStack = stack_factory(real_worker=True)
    model = tmp_path / "model"
    source_uri = stack.seed_tiny_model(model)
    doc = yaml.safe_load(EXAMPLE.read_text())
    assert doc["spec"]["source"]["uri"] == source_uri
    assert doc["spec"]["tensorParallelSize"] == 2
    ns, name = doc["metadata"].get("namespace", "default"), doc["metadata"]["name"]
    stack.apply(doc, ns)

    stages: list[str] = []
    deadline = time.monotonic() + 900
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = status_of(stack, ns, name)
        stage = (status.get("progress") or {}).get("stage")
        if stage and (not stages or stages[-1] != stage):
            stages.append(stage)
        if status.get("phase") in ("Succeeded", "Failed"):
            break
        time.sleep(1)
    assert status.get("phase") == "Succeeded", (status, stack.operator_log()[-3000:])
    # the example converts on CPU (accelerator: cpu): its Job requested no GPU
    (job,) = stack.jobs(ns, "converter")
    resources = job["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert "gpu" not in str(resources) and resources["requests"]["cpu"] == "2"

    # status: Ready, the artifact and the serving hand-off
    ready = ready_condition(status)
    assert ready["status"] == "True" and ready["reason"] == "Published"
    assert ready["observedGeneration"] == 1
    assert {"Planning", "Converting"} & set(stages) and stages[-1] == "Published", stages
    # the worker's result: what each stage took and what was verified (without an engine:
    # each file read back against the plan as written; docs/verification.md)
    progress = status["progress"]
    assert {"Planning", "Converting", "Uploading"} <= set(progress["stageSeconds"]), progress
    verification = progress["verification"]
    assert verification["passed"] is True
    assert [c["name"] for c in verification["checks"]] == ["engine-free"]
    assert all(c["passed"] for c in verification["checks"])
    out_uri = doc["spec"]["output"]["uri"]
    artifact = status["artifact"]
    assert artifact["uri"] == out_uri and artifact["vllmVersion"] == "0.32.0"
    assert status["serving"]["args"][:6] == [
        "--model",
        out_uri,
        "--load-format",
        "runai_streamer_sharded",
        "--tensor-parallel-size",
        "2",
    ]
    cm = stack.configmap(ns, f"{name}-serving")
    assert cm is not None
    assert cm["data"]["MODEL"] == out_uri and cm["data"]["TENSOR_PARALLEL_SIZE"] == "2"
    assert cm["metadata"]["ownerReferences"][0]["name"] == name
    reasons = [e["reason"] for e in stack.events(ns)]
    assert "JobCreated" in reasons and "Published" in reasons

    # S3: two rank files, the manifest, and what the manifest lists is what is there
    bucket, _, prefix = out_uri.removeprefix("s3://").partition("/")
    listing = stack.list_prefix(bucket, prefix)
    manifest = json.loads(
        stack.s3_client().get_object(Bucket=bucket, Key=prefix + MANIFEST_NAME)["Body"].read()
    )
    assert manifest["tensorParallelSize"] == 2
    assert manifest["convertedOn"]["engine"] == "none" and artifact["engine"] == "none"
    # the identity the operator computed from the preflight, recorded by the real worker
    assert status["path"] == "Converted"
    assert manifest["identity"] == status["identity"] and status["identity"].startswith("sha256:")
    files = {f["key"]: f["size"] for f in manifest["files"]}
    assert {k for k in files if k.startswith("model-rank-")} == {
        "model-rank-0-part-0.safetensors",
        "model-rank-1-part-0.safetensors",
    }
    assert {
        k.removeprefix(prefix): v for k, v in listing.items() if not k.endswith(MANIFEST_NAME)
    } == files
    assert artifact["files"] == len(files) and artifact["totalBytes"] == sum(files.values())

    # the serving side: fetch (what the init container runs), then load as vLLM serving does
    fetched = tmp_path / "fetched"
    r = cli(stack, "fetch", "--from", out_uri, "--to", str(fetched))
    assert r.returncode == 0, r.stderr
    for key, size in files.items():
        assert (fetched / key).stat().st_size == size

    config = json.loads((model / "config.json").read_text())
    prompts = default_prompts(config, tokenizer=True)
    reference = run_engine(
        EngineRequest(model=str(model), tensor_parallel_size=2, prompts=prompts), timeout=600
    )
    reloaded = run_engine(
        EngineRequest(
            model=str(fetched),
            tensor_parallel_size=2,
            load_format="sharded_state",
            prompts=prompts,
        ),
        timeout=600,
    )
    assert reloaded.settings["load_format"] == "sharded_state"
    # Both engines ran vLLM's engine core inside their own process (the same batches).
    assert reference.settings["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert reloaded.settings["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert len(reference.tokens) == len(prompts) and all(reference.tokens)
    assert reloaded.tokens == reference.tokens
