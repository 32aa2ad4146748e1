"""`preshard render -f FILE` prints what the real operator creates.

The real kopf operator (a subprocess, its configuration from PRESHARD_* variables with an
operator-wide default accelerator of cpu) runs against the API emulator; `preshard render`
runs as a subprocess with the SAME environment, on the same file the resources are created
from. The Jobs the operator created (read raw from the API, server-set fields removed)
equal the rendered documents: the conversion Job, and for deletionPolicy: Delete the purge
Job that appears when the resource is deleted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import K8s, Operator, wait_for

CPU_IMAGE = "registry.example/preshard-converter-cpu:test"
SERVER_FIELDS = ("uid", "resourceVersion", "creationTimestamp", "generation", "managedFields")


@pytest.fixture(scope="module")
def cpu_operator(k8s_api: K8s, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    op = Operator(
        k8s_api,
        tmp_path_factory.mktemp("operator-cpu"),
        extra_env={
            "PRESHARD_DEFAULT_ACCELERATOR": "cpu",
            "PRESHARD_CONVERTER_CPU_IMAGE": CPU_IMAGE,
        },
    )
    op.start()
    try:
        yield op
    finally:
        op.stop()


@pytest.fixture
def ns(k8s_api: K8s) -> str:
    name = k8s_api.namespace()
    k8s_api.secret(name, "s3", {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "x"})
    return name


def resource(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "preshard.io/v1alpha1",
        "kind": "ShardedCheckpoint",
        "metadata": {"name": name},
        "spec": {
            "source": {"uri": "s3://models/llama/"},
            "tensorParallelSize": 2,
            "output": {"uri": f"s3://out/{name}/", "credentialsSecret": "s3"},
            **spec,
        },
    }


def render(op: Operator, path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "preshard.cli", "render", "-f", str(path), *args],
        env=op.env,  # the operator's own configuration
        capture_output=True,
        text=True,
        timeout=60,
    )


def raw_job(k8s: K8s, ns: str, name: str) -> dict[str, Any]:
    r = k8s.http.request("GET", f"{k8s.url}/apis/batch/v1/namespaces/{ns}/jobs/{name}")
    assert r.status == 200, r.data
    job = json.loads(r.data)
    job.pop("status", None)
    for f in SERVER_FIELDS:
        job["metadata"].pop(f, None)
    return dict(job)


def create(k8s: K8s, ns: str, doc: dict[str, Any]) -> str:
    obj = k8s.create_checkpoint(ns, doc["metadata"]["name"], doc["spec"])
    return str(obj["metadata"]["uid"])


def test_render_equals_the_jobs_the_operator_creates(
    k8s_api: K8s, cpu_operator: Operator, ns: str, tmp_path: Path
) -> None:
    cpu = resource("on-cpu", deletionPolicy="Delete", verify=False)  # the default: cpu
    gpu = resource(
        "on-gpu",
        converter={"accelerator": "gpu", "resources": {"requests": {"cpu": "8", "memory": "32Gi"}}},
    )
    path = tmp_path / "checkpoints.yaml"
    path.write_text(yaml.safe_dump_all([cpu, gpu], sort_keys=False))

    uids = {d["metadata"]["name"]: create(k8s_api, ns, d) for d in (cpu, gpu)}
    jobs = {
        j["metadata"]["annotations"]["preshard.io/checkpoint-name"]: j["metadata"]["name"]
        for j in k8s_api.wait_jobs(
            ns, count=2, label_selector="app.kubernetes.io/component=converter"
        )
    }

    for name in ("on-cpu", "on-gpu"):
        one = tmp_path / f"{name}.yaml"
        one.write_text(yaml.safe_dump(cpu if name == "on-cpu" else gpu))
        out = render(cpu_operator, one, "--uid", uids[name], "--namespace", ns)
        assert out.returncode == 0, out.stderr
        docs = list(yaml.safe_load_all(out.stdout))
        created = raw_job(k8s_api, ns, jobs[name])
        assert docs[0] == created
        if name == "on-cpu":
            c = created["spec"]["template"]["spec"]["containers"][0]
            assert c["image"] == CPU_IMAGE and c["resources"] == {"requests": {"cpu": "2"}}
            assert (
                len(docs) == 2
                and docs[1]["metadata"]["labels"]["app.kubernetes.io/component"] == "purge"
            )
            purge_doc = docs[1]
        else:
            c = created["spec"]["template"]["spec"]["containers"][0]
            assert c["resources"]["limits"] == {"nvidia.com/gpu": "2"}
            assert len(docs) == 1  # Retain: no purge Job

    # both resources in one file: the same documents, in file order
    both = render(cpu_operator, path, "--namespace", ns)
    assert both.returncode == 0, both.stderr
    assert [d["metadata"]["name"] for d in yaml.safe_load_all(both.stdout)] == [
        jobs["on-cpu"],
        purge_doc["metadata"]["name"],
        jobs["on-gpu"],
    ]

    # deleting the Delete resource makes the operator create the purge Job rendered above
    k8s_api.delete_checkpoint(ns, "on-cpu")
    (purge,) = k8s_api.wait_jobs(ns, label_selector="app.kubernetes.io/component=purge")
    assert raw_job(k8s_api, ns, purge["metadata"]["name"]) == purge_doc
    k8s_api.set_job_status(
        ns, purge["metadata"]["name"], {"conditions": [{"type": "Complete", "status": "True"}]}
    )
    wait_for(lambda: k8s_api.checkpoint(ns, "on-cpu") is None, 30, what="on-cpu released")


def test_render_refuses_what_the_operator_refuses(
    k8s_api: K8s, cpu_operator: Operator, ns: str, tmp_path: Path
) -> None:
    doc = resource("fp4-on-cpu", quantization="modelopt_fp4")  # cpu by default
    path = tmp_path / "fp4.yaml"
    path.write_text(yaml.safe_dump(doc))
    create(k8s_api, ns, doc)
    cond = k8s_api.wait_condition(ns, "fp4-on-cpu", "False", "UnsupportedQuantization")
    assert k8s_api.jobs(ns) == []  # refused before any Job
    out = render(cpu_operator, path)
    assert out.returncode == 3 and out.stdout == ""
    assert cond["message"] in out.stderr
    assert "'modelopt_fp4' cannot be loaded by vLLM's CPU backend" in cond["message"]

    few = resource(
        "few-cores", pipelineParallelSize=2, converter={"resources": {"requests": {"cpu": "3"}}}
    )
    create(k8s_api, ns, few)
    cond = k8s_api.wait_condition(ns, "few-cores", "False", "InsufficientCPU")
    assert "4 CPU ranks need at least 4 cores" in cond["message"]
    assert k8s_api.jobs(ns) == []
