"""The serving hand-off: how vLLM loads a published checkpoint.

Two ways, both published in ``status.serving`` and the ``<name>-serving`` ConfigMap:

* stream straight from S3: ``--load-format runai_streamer_sharded`` with the S3 prefix as
  the model (each rank streams only its own files);
* local copy: an init container runs ``preshard fetch --from URI --to /models/<name>``
  (sha256-verified), then ``--load-format sharded_state`` on that directory.

Either way the serving gate runs first (``preshard check`` before streaming, the same
flags on ``preshard fetch``): the manifest pinned by its sha256, the serving TP/PP, the
state format (``preshard.core.gate``). ``FETCH_COMMAND`` and ``CHECK_COMMAND`` carry it.

No concurrency/memory_limit model-loader-extra-config is passed with
runai_streamer_sharded: vLLM rejects it for that loader (vLLM issue #30100).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from typing import Any

from preshard.core.contract import LOAD_FORMAT_LOCAL as LOCAL_LOAD_FORMAT
from preshard.core.contract import LOAD_FORMAT_STREAM as STREAM_LOAD_FORMAT
from preshard.core.contract import LOCAL_MODEL_ROOT, MANIFEST_NAME
from preshard.core.spec import CheckpointSpec


@dataclass(frozen=True)
class ServingInfo:
    model: str
    load_format: str
    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    local_model_path: str
    local_args: tuple[str, ...]
    fetch_command: tuple[str, ...]

    def status(self, configmap_name: str) -> dict[str, Any]:
        return {
            "loadFormat": self.load_format,
            "args": list(self.args),
            "env": [{"name": k, "value": v} for k, v in self.env],
            "configMapName": configmap_name,
        }


def parallel_args(spec: CheckpointSpec, engine: str | None = None) -> list[str]:
    """vLLM's flags that must match the conversion plan (core.plan) when serving it;
    ``engine``: the effective one (core.children.pod.engine), which decides whether an online
    FP8 method's shards were pre-quantized (then served without --quantization)."""
    return spec.plan(engine=engine).serving_args()


def serving_info(
    name: str,
    spec: CheckpointSpec,
    artifact_uri: str,
    endpoint: str | None,
    engine: str | None = None,
) -> ServingInfo:
    model = artifact_uri if artifact_uri.endswith("/") else artifact_uri + "/"
    env: list[tuple[str, str]] = []
    if endpoint:
        env.append(("AWS_ENDPOINT_URL", endpoint))
        # Path-style addressing for S3-compatible stores (MinIO etc.).
        env.append(("RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING", "0"))
        # Credentials for an S3-compatible store come from the Secret; without this the
        # AWS SDKs (boto3 and the streamer's) also probe the EC2 instance metadata
        # service, which off AWS only costs start-up time (connect timeouts).
        env.append(("AWS_EC2_METADATA_DISABLED", "true"))
    local = f"{LOCAL_MODEL_ROOT}/{name}"
    par = parallel_args(spec, engine)
    return ServingInfo(
        model=model,
        load_format=STREAM_LOAD_FORMAT,
        args=("--model", model, "--load-format", STREAM_LOAD_FORMAT, *par),
        env=tuple(env),
        local_model_path=local,
        local_args=("--model", local, "--load-format", LOCAL_LOAD_FORMAT, *par),
        fetch_command=("preshard", "fetch", "--from", model, "--to", local),
    )


def gate_args(spec: CheckpointSpec, artifact: dict[str, Any]) -> list[str]:
    """The serving gate's flags for ``preshard fetch``/``preshard check``: the manifest
    pin and the parallelism the checkpoint was sharded for."""
    sha = str(artifact.get("manifestSha256") or "")
    if not sha:
        return []
    return [
        "--manifest-sha256",
        sha,
        "--tensor-parallel-size",
        str(spec.tensor_parallel_size),
        "--pipeline-parallel-size",
        str(spec.pipeline_parallel_size),
    ]


def configmap_data(
    info: ServingInfo, spec: CheckpointSpec, artifact: dict[str, Any]
) -> dict[str, str]:
    gate = gate_args(spec, artifact)
    data = {
        "MODEL": info.model,
        "LOAD_FORMAT": info.load_format,
        "TENSOR_PARALLEL_SIZE": str(spec.tensor_parallel_size),
        "PIPELINE_PARALLEL_SIZE": str(spec.pipeline_parallel_size),
        "VLLM_ARGS": shlex.join(info.args),
        "vllm-args.json": json.dumps(list(info.args)),
        "LOCAL_MODEL_PATH": info.local_model_path,
        "LOCAL_LOAD_FORMAT": LOCAL_LOAD_FORMAT,
        "LOCAL_VLLM_ARGS": shlex.join(info.local_args),
        "FETCH_COMMAND": shlex.join([*info.fetch_command, *gate]),
        "MANIFEST_URI": info.model + MANIFEST_NAME,
        "MANIFEST_SHA256": str(artifact.get("manifestSha256", "")),
        "VLLM_VERSION": str(artifact.get("vllmVersion", "")),
    }
    if gate:
        data["CHECK_COMMAND"] = shlex.join(["preshard", "check", "--from", info.model, *gate])
    if spec.quantization and "--quantization" in info.args:
        # (not for pre-quantized FP8 shards: they are served without --quantization)
        data["QUANTIZATION"] = spec.quantization
    for k, v in info.env:
        data[k] = v
    return data


def trusted_artifact(artifact: dict[str, Any], spec: CheckpointSpec) -> dict[str, Any]:
    """The worker's artifact record with the locations the operator knows itself: ``uri``
    and ``manifestUri`` come from the spec's output URI (a termination message can say
    anything, and may lack them); the rest (counts, digest, versions) is the worker's."""
    uri = str(spec.output.parsed)
    return {**artifact, "uri": uri, "manifestUri": uri + MANIFEST_NAME}
