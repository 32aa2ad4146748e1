"""preshard.core.serving: vLLM serving arguments and the ConfigMap hand-off."""

from __future__ import annotations

import json
import re
import shlex
from typing import Any

import pytest

from preshard.core.serving import (
    LOCAL_LOAD_FORMAT,
    LOCAL_MODEL_ROOT,
    STREAM_LOAD_FORMAT,
    ServingInfo,
    configmap_data,
    parallel_args,
    serving_info,
)
from preshard.core.spec import CheckpointSpec, parse_spec


def make_spec(**extra: Any) -> CheckpointSpec:
    raw: dict[str, Any] = {
        "source": {"uri": "s3://models/llama/"},
        "tensorParallelSize": 2,
        "output": {"uri": "s3://checkpoints/llama/tp2/"},
    }
    raw.update(extra)
    return parse_spec(raw)


ARTIFACT: dict[str, Any] = {
    "uri": "s3://checkpoints/llama/tp2/",
    "manifestUri": "s3://checkpoints/llama/tp2/preshard-manifest.json",
    "files": 4,
    "totalBytes": 1234,
    "manifestSha256": "f" * 64,
    "vllmVersion": "0.32.0",
}


def test_constants() -> None:
    assert STREAM_LOAD_FORMAT == "runai_streamer_sharded"
    assert LOCAL_LOAD_FORMAT == "sharded_state"
    assert LOCAL_MODEL_ROOT == "/models"


@pytest.mark.parametrize(
    ("extra", "args"),
    [
        ({}, ["--tensor-parallel-size", "2"]),
        ({"pipelineParallelSize": 1}, ["--tensor-parallel-size", "2"]),
        (
            {"pipelineParallelSize": 3},
            ["--tensor-parallel-size", "2", "--pipeline-parallel-size", "3"],
        ),
        ({"quantization": "fp8"}, ["--tensor-parallel-size", "2", "--quantization", "fp8"]),
        ({"dtype": "auto"}, ["--tensor-parallel-size", "2"]),
        ({"dtype": "bfloat16"}, ["--tensor-parallel-size", "2", "--dtype", "bfloat16"]),
        (
            {"pipelineParallelSize": 2, "quantization": "gptq", "dtype": "float16"},
            [
                "--tensor-parallel-size",
                "2",
                "--pipeline-parallel-size",
                "2",
                "--quantization",
                "gptq",
                "--dtype",
                "float16",
            ],
        ),
    ],
)
def test_parallel_args(extra: dict[str, Any], args: list[str]) -> None:
    assert parallel_args(make_spec(**extra)) == args


def test_serving_info_without_endpoint() -> None:
    info = serving_info("llama", make_spec(), "s3://checkpoints/llama/tp2/", None)
    assert info == ServingInfo(
        model="s3://checkpoints/llama/tp2/",
        load_format="runai_streamer_sharded",
        args=(
            "--model",
            "s3://checkpoints/llama/tp2/",
            "--load-format",
            "runai_streamer_sharded",
            "--tensor-parallel-size",
            "2",
        ),
        env=(),
        local_model_path="/models/llama",
        local_args=(
            "--model",
            "/models/llama",
            "--load-format",
            "sharded_state",
            "--tensor-parallel-size",
            "2",
        ),
        fetch_command=(
            "preshard",
            "fetch",
            "--from",
            "s3://checkpoints/llama/tp2/",
            "--to",
            "/models/llama",
        ),
    )


def test_serving_info_adds_a_trailing_slash_and_endpoint_env() -> None:
    info = serving_info("m", make_spec(), "s3://checkpoints/llama/tp2", "http://minio:9000")
    assert info.model == "s3://checkpoints/llama/tp2/"
    assert info.env == (
        ("AWS_ENDPOINT_URL", "http://minio:9000"),
        ("RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING", "0"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    )


def test_no_loader_extra_config_for_the_streamer() -> None:
    # vLLM rejects concurrency/memory_limit for runai_streamer_sharded (vLLM issue #30100).
    info = serving_info("m", make_spec(quantization="fp8"), ARTIFACT["uri"], "http://e")
    assert not any("model-loader-extra-config" in a for a in info.args + info.local_args)


def test_status() -> None:
    info = serving_info("m", make_spec(), ARTIFACT["uri"], "http://minio:9000")
    assert info.status("m-serving") == {
        "loadFormat": "runai_streamer_sharded",
        "args": [
            "--model",
            "s3://checkpoints/llama/tp2/",
            "--load-format",
            "runai_streamer_sharded",
            "--tensor-parallel-size",
            "2",
        ],
        "env": [
            {"name": "AWS_ENDPOINT_URL", "value": "http://minio:9000"},
            {"name": "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING", "value": "0"},
            {"name": "AWS_EC2_METADATA_DISABLED", "value": "true"},
        ],
        "configMapName": "m-serving",
    }


def test_configmap_data_exact() -> None:
    spec = make_spec(pipelineParallelSize=2, quantization="fp8", dtype="bfloat16")
    info = serving_info("llama", spec, ARTIFACT["uri"], "http://minio:9000")
    par = "--tensor-parallel-size 2 --pipeline-parallel-size 2 --quantization fp8 --dtype bfloat16"
    gate = f"--manifest-sha256 {'f' * 64} --tensor-parallel-size 2 --pipeline-parallel-size 2"
    assert configmap_data(info, spec, ARTIFACT) == {
        "MODEL": "s3://checkpoints/llama/tp2/",
        "LOAD_FORMAT": "runai_streamer_sharded",
        "TENSOR_PARALLEL_SIZE": "2",
        "PIPELINE_PARALLEL_SIZE": "2",
        "VLLM_ARGS": f"--model s3://checkpoints/llama/tp2/ --load-format runai_streamer_sharded {par}",
        "vllm-args.json": json.dumps(list(info.args)),
        "LOCAL_MODEL_PATH": "/models/llama",
        "LOCAL_LOAD_FORMAT": "sharded_state",
        "LOCAL_VLLM_ARGS": f"--model /models/llama --load-format sharded_state {par}",
        "FETCH_COMMAND": "preshard fetch --from s3://checkpoints/llama/tp2/ --to /models/llama "
        + gate,
        "CHECK_COMMAND": "preshard check --from s3://checkpoints/llama/tp2/ " + gate,
        "MANIFEST_URI": "s3://checkpoints/llama/tp2/preshard-manifest.json",
        "MANIFEST_SHA256": "f" * 64,
        "VLLM_VERSION": "0.32.0",
        "QUANTIZATION": "fp8",
        "AWS_ENDPOINT_URL": "http://minio:9000",
        "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def test_configmap_data_minimal_artifact_and_no_quantization() -> None:
    spec = make_spec()
    info = serving_info("m", spec, "s3://checkpoints/llama/tp2/", None)
    data = configmap_data(info, spec, {"uri": "s3://checkpoints/llama/tp2/"})
    assert "QUANTIZATION" not in data
    assert "AWS_ENDPOINT_URL" not in data
    # the manifest's location is the output's, whatever the artifact says
    assert data["MANIFEST_URI"] == "s3://checkpoints/llama/tp2/preshard-manifest.json"
    # no pin known: the published fetch command has no gate flags, and there is no check
    assert (
        data["FETCH_COMMAND"] == "preshard fetch --from s3://checkpoints/llama/tp2/ --to /models/m"
    )
    assert "CHECK_COMMAND" not in data
    assert data["MANIFEST_SHA256"] == ""
    assert data["VLLM_VERSION"] == ""
    assert all(isinstance(v, str) for v in data.values())


def test_shell_and_json_forms_round_trip_for_awkward_uris() -> None:
    # A prefix with shell metacharacters must survive `sh -c "vllm serve $VLLM_ARGS"`-style use.
    uri = "s3://checkpoints/it's a $model;rm -rf/"
    spec = make_spec()
    info = serving_info("m", spec, uri, None)
    data = configmap_data(info, spec, ARTIFACT)
    assert shlex.split(data["VLLM_ARGS"]) == list(info.args)
    assert shlex.split(data["LOCAL_VLLM_ARGS"]) == list(info.local_args)
    gate = ["--manifest-sha256", ARTIFACT["manifestSha256"], "--tensor-parallel-size", "2"]
    gate += ["--pipeline-parallel-size", "1"]
    assert shlex.split(data["FETCH_COMMAND"]) == [*info.fetch_command, *gate]
    assert shlex.split(data["CHECK_COMMAND"]) == ["preshard", "check", "--from", uri, *gate]
    assert json.loads(data["vllm-args.json"]) == list(info.args)
    assert info.args[1] == uri


def test_configmap_keys_are_valid() -> None:
    spec = make_spec(quantization="fp8")
    info = serving_info("m", spec, ARTIFACT["uri"], "http://e")
    for key in configmap_data(info, spec, ARTIFACT):
        assert re.fullmatch(r"[-._a-zA-Z0-9]+", key), key


def test_trusted_artifact_takes_the_locations_from_the_spec() -> None:
    from preshard.core.serving import trusted_artifact

    spec = make_spec()
    out = str(spec.output.parsed)
    forged = {"uri": "s3://elsewhere/x/", "manifestUri": "s3://elsewhere/m", "files": 3}
    assert trusted_artifact(forged, spec) == {
        "uri": out,
        "manifestUri": out + "preshard-manifest.json",
        "files": 3,
    }
    # no uri at all (a KeyError in the handler before)
    assert trusted_artifact({"files": 1}, spec)["uri"] == out


@pytest.mark.parametrize(
    ("quantization", "engine", "served_with"),
    [
        ("fp8_per_tensor", None, None),  # pre-quantized FP8 shards: config.json says fp8
        ("fp8_per_block", "none", None),
        ("fp8_per_tensor", "vllm", "fp8_per_tensor"),  # an engine writes the raw weights
        ("fp8_per_channel", None, "fp8_per_channel"),  # raw: serving quantizes
    ],
)
def test_pre_quantized_shards_are_served_as_an_fp8_checkpoint(
    quantization: str, engine: str | None, served_with: str | None
) -> None:
    spec = make_spec(quantization=quantization)
    args = parallel_args(spec, engine)
    if served_with is None:
        assert "--quantization" not in args
    else:
        assert args[args.index("--quantization") + 1] == served_with
    info = serving_info("m", spec, "s3://checkpoints/llama/tp2/", None, engine)
    assert list(info.args[4:]) == args and list(info.local_args[4:]) == args
