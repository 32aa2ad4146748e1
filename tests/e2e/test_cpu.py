"""accelerator: cpu end to end through the local Job runner.

* to Ready with the stand-in worker (see conftest: the real argument parser, progress,
  S3 publish and termination message; fake shards instead of vLLM): the Job the operator
  created requests no GPU, one core per rank, and tells the worker it runs on CPU;
* the real worker (``preshard convert``) in a pod whose memory limit is below the
  estimate: it fails permanently with InsufficientMemory right after reading config.json,
  before any vLLM engine starts (so no vLLM here and no lock needed), with both numbers.
  The limit reaches the worker as the kubelet passes it, through the Downward API
  (resourceFieldRef limits.memory, which the local Job runner resolves like the kubelet).

The real-vLLM conversion with accelerator: cpu is tests/e2e/test_happy_path.py (the demo's
example).
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from preshard.core.estimate import estimate_memory, format_gib
from preshard_dev.stack import LocalStack
from preshard_dev.tinymodel import make_tiny_llama

from .conftest import checkpoint_doc, ready_condition, seed_fake_source, wait_phase

pytestmark = pytest.mark.e2e
NS = "default"
CPU_CONVERTER = {
    "accelerator": "cpu",
    "backoffLimit": 2,
    "activeDeadlineSeconds": 600,
    "resources": {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"memory": "8Gi"}},
}


def the_job(stack: LocalStack, name: str) -> dict[str, Any]:
    (job,) = [
        j
        for j in stack.jobs(NS, "converter")
        if j["metadata"]["annotations"]["preshard.io/checkpoint-name"] == name
    ]
    return job


def _pod_env() -> dict[str, Any]:
    # The runner gives pods a clean environment; a worktree's PYTHONPATH (its own
    # preshard instead of the shared venv's) must reach the worker too.
    path = os.environ.get("PYTHONPATH")
    return {"runner_options": {"base_env": {"PYTHONPATH": path}}} if path else {}


def test_cpu_resource_reaches_ready_and_its_job_requests_no_gpu(stack_factory: Any) -> None:
    stack: LocalStack = stack_factory(**_pod_env())
    seed_fake_source(stack)
    stack.apply(checkpoint_doc("on-cpu", converter=CPU_CONVERTER), NS)
    status = wait_phase(stack, NS, "on-cpu", ("Succeeded", "Failed"), 120)
    ready = ready_condition(status)
    assert status["phase"] == "Succeeded" and ready["status"] == "True", status
    assert ready["reason"] == "Published"

    job = the_job(stack, "on-cpu")
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["resources"] == {
        "requests": {"cpu": "2", "memory": "8Gi"},
        "limits": {"memory": "8Gi"},
    }
    assert "gpu" not in json.dumps(c["resources"])
    assert c["image"].startswith("preshard-converter-cpu")
    env = {e["name"]: e for e in c["env"]}
    assert env["PRESHARD_ACCELERATOR"]["value"] == "cpu"
    assert env["PRESHARD_MEMORY_LIMIT"]["valueFrom"]["resourceFieldRef"]["resource"] == (
        "limits.memory"
    )
    created = [e for e in stack.events(NS) if e["reason"] == "JobCreated"]
    assert any("2 CPU ranks, no GPU" in e["message"] for e in created), created


def test_a_pod_below_the_memory_estimate_fails_before_any_engine(
    stack_factory: Any, tmp_path: Any
) -> None:
    stack: LocalStack = stack_factory(real_worker=True, **_pod_env())
    source = stack.seed_tiny_model(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    need = estimate_memory(
        config, tensor_parallel_size=2, max_file_size=5 * 2**30, accelerator="cpu"
    )
    small = {**CPU_CONVERTER, "resources": {"limits": {"memory": "1Gi"}}}
    doc = checkpoint_doc("too-small", converter=small)
    doc["spec"]["source"]["uri"] = source
    stack.apply(doc, NS)
    status = wait_phase(stack, NS, "too-small", ("Failed",), 180)
    ready = ready_condition(status)
    assert ready["status"] == "False" and ready["reason"] == "InsufficientMemory", ready
    msg = ready["message"]
    assert f"about {format_gib(need.total_bytes)}" in msg and str(need.total_bytes) in msg
    assert "1Gi" in msg and "spec.converter.resources.limits.memory" in msg
    # decided from the preflight's config.json (the CPU-only preflight Job): no
    # conversion Job was ever created, so no pod waited for capacity or started an engine
    assert status.get("memoryEstimate", {}).get("bytes") == need.total_bytes
    assert stack.jobs(NS) == []  # no conversion Job
    assert [j["metadata"]["name"] for j in stack.jobs(NS, component="preflight")]
    assert not stack.list_prefix("preshard-checkpoints", "too-small/")


def test_the_estimate_of_the_seeded_model_is_what_the_worker_uses(tmp_path: Any) -> None:
    # guards the test above: the seeded model is the demo's (kv heads 1)
    d = make_tiny_llama(tmp_path / "m", num_kv_heads=1)
    e = estimate_memory(
        json.loads((d / "config.json").read_text()), tensor_parallel_size=2, accelerator="cpu"
    )
    assert e.total_bytes > 2**30  # above the 1Gi limit used there
