"""preshard.core.spec: the ShardedCheckpoint spec model, its errors and the conversion hash."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pydantic
import pytest

from preshard.core.errors import InvalidURI, SpecError
from preshard.core.plan import DEFAULT_MAX_FILE_SIZE, DTYPES, MAX_PARALLEL, QUANTIZATIONS
from preshard.core.spec import CheckpointSpec, parse_spec

MINIMAL: dict[str, Any] = {
    "source": {"uri": "s3://models/llama/"},
    "tensorParallelSize": 2,
    "output": {"uri": "s3://checkpoints/llama/tp2/"},
}


def spec_with(**changes: Any) -> dict[str, Any]:
    """MINIMAL with dotted-path changes, e.g. spec_with(**{"output.uri": "..."})."""
    out = copy.deepcopy(MINIMAL)
    for path, value in changes.items():
        node = out
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def test_constants() -> None:
    assert DEFAULT_MAX_FILE_SIZE == 5 * 2**30
    assert MAX_PARALLEL == 1024
    assert DTYPES == ("auto", "float16", "bfloat16", "float32")
    assert "fp8" in QUANTIZATIONS and "gptq_marlin" in QUANTIZATIONS
    assert len(set(QUANTIZATIONS)) == len(QUANTIZATIONS)


def test_minimal_spec_defaults() -> None:
    s = parse_spec(MINIMAL)
    assert s.source.uri == "s3://models/llama/"
    assert s.source.credentials_secret is None
    assert s.source.endpoint is None and s.source.region is None
    assert s.tensor_parallel_size == 2
    assert s.pipeline_parallel_size == 1
    assert s.layout.world_size == 2
    assert s.quantization is None
    assert s.dtype == "auto"
    assert s.output.uri == "s3://checkpoints/llama/tp2/"
    assert s.output.max_file_size == 5 * 2**30
    assert s.output.max_file_size_bytes == 5 * 2**30
    assert s.verify is True
    assert s.deletion_policy == "Retain"
    c = s.converter
    assert (c.image, c.image_pull_policy, c.resources, c.gpu_resource_name) == (None,) * 4
    assert (c.node_selector, c.tolerations, c.service_account_name) == (None,) * 3
    assert (c.priority_class_name, c.work_dir_size, c.env) == (None,) * 3
    assert c.backoff_limit == 2
    assert c.active_deadline_seconds == 21600
    assert c.ttl_seconds_after_finished is None


def test_full_spec() -> None:
    raw = {
        "source": {
            "uri": "hf://meta-llama/Llama-3.1-70B-Instruct@main",
            "credentialsSecret": "hf-token",
            "endpoint": "http://src:9000",
            "region": "eu-west-1",
        },
        "tensorParallelSize": 8,
        "pipelineParallelSize": 2,
        "quantization": "fp8",
        "dtype": "bfloat16",
        "output": {
            "uri": "s3://models/llama-70b/tp8-fp8",
            "credentialsSecret": "s3-credentials",
            "endpoint": "http://minio:9000",
            "region": "us-east-1",
            "maxFileSize": "2Gi",
        },
        "verify": False,
        "deletionPolicy": "Delete",
        "converter": {
            "image": "img:1",
            "imagePullPolicy": "Always",
            "resources": {"requests": {"cpu": "16", "memory": "400Gi"}},
            "gpuResourceName": "amd.com/gpu",
            "nodeSelector": {"gpu": "h100"},
            "tolerations": [{"key": "gpu", "operator": "Exists"}],
            "backoffLimit": 0,
            "activeDeadlineSeconds": 60,
            "ttlSecondsAfterFinished": 0,
            "serviceAccountName": "sharder",
            "priorityClassName": "high",
            "workDirSize": "1Ti",
            "env": [{"name": "VLLM_X", "value": "1"}],
        },
    }
    s = parse_spec(raw)
    assert s.layout.world_size == 16
    assert s.source.parsed.authority == "meta-llama/Llama-3.1-70B-Instruct"
    assert str(s.output.parsed) == "s3://models/llama-70b/tp8-fp8/"
    assert s.output.max_file_size_bytes == 2 * 2**30
    assert (s.verify, s.deletion_policy, s.quantization, s.dtype) == (
        False,
        "Delete",
        "fp8",
        "bfloat16",
    )
    c = s.converter
    assert c.gpu_resource_name == "amd.com/gpu"
    assert c.node_selector == {"gpu": "h100"}
    assert c.tolerations == [{"key": "gpu", "operator": "Exists"}]
    assert (c.backoff_limit, c.active_deadline_seconds, c.ttl_seconds_after_finished) == (0, 60, 0)
    assert c.env == [{"name": "VLLM_X", "value": "1"}]
    # Python field names work too (populate_by_name).
    assert CheckpointSpec.model_validate(s.model_dump()) == s
    assert CheckpointSpec.model_validate(s.model_dump(by_alias=True)) == s


def test_spec_is_frozen() -> None:
    s = parse_spec(MINIMAL)
    with pytest.raises(pydantic.ValidationError):
        s.tensor_parallel_size = 4  # type: ignore[misc]


@pytest.mark.parametrize(
    ("size", "expected"), [(2**20, 2**20), ("1Mi", 2**20), ("1.5Gi", 1610612736)]
)
def test_max_file_size(size: Any, expected: int) -> None:
    assert (
        parse_spec(spec_with(**{"output.maxFileSize": size})).output.max_file_size_bytes == expected
    )


@pytest.mark.parametrize("q", QUANTIZATIONS)
def test_every_quantization_is_accepted(q: str) -> None:
    assert parse_spec(spec_with(quantization=q)).quantization == q


@pytest.mark.parametrize("spec", [None, {}])
def test_empty_spec(spec: dict[str, Any] | None) -> None:
    with pytest.raises(SpecError) as exc:
        parse_spec(spec)
    assert str(exc.value) == "spec is empty: source, tensorParallelSize and output are required"
    assert exc.value.reason == "InvalidSpec"
    assert exc.value.permanent is True


QUANT_LIST = ", ".join(QUANTIZATIONS)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"source": {"uri": "s3://models/x/"}},
            "spec.tensorParallelSize: Field required; spec.output: Field required",
        ),
        (
            spec_with(tensorParallelSize=0),
            "spec.tensorParallelSize: Input should be greater than or equal to 1",
        ),
        (
            spec_with(tensorParallelSize=1025),
            "spec.tensorParallelSize: Input should be less than or equal to 1024",
        ),
        (
            spec_with(tensorParallelSize="eight"),
            "spec.tensorParallelSize: Input should be a valid integer",
        ),
        (
            spec_with(pipelineParallelSize=0),
            "spec.pipelineParallelSize: Input should be greater than or equal to 1",
        ),
        (
            spec_with(quantization="int4"),
            f"spec.quantization: unknown quantization 'int4'; supported: {QUANT_LIST}",
        ),
        (
            spec_with(dtype="fp16"),
            "spec.dtype: unknown dtype 'fp16'; supported: auto, float16, bfloat16, float32",
        ),
        (
            spec_with(deletionPolicy="Keep"),
            "spec.deletionPolicy: Input should be 'Retain' or 'Delete'",
        ),
        (spec_with(bogus=1), "spec.bogus: unknown field"),
        (spec_with(**{"output.bogus": 1}), "spec.output.bogus: unknown field"),
        (spec_with(**{"converter.bogus": 1}), "spec.converter.bogus: unknown field"),
        (spec_with(**{"source.credentials": "x"}), "spec.source.credentials: unknown field"),
        (
            spec_with(**{"output.maxFileSize": "1Ki"}),
            "spec.output.maxFileSize: maxFileSize must be at least 1Mi",
        ),
        (
            spec_with(**{"output.maxFileSize": 2**20 - 1}),
            "spec.output.maxFileSize: maxFileSize must be at least 1Mi",
        ),
        (
            spec_with(**{"output.maxFileSize": "5GB"}),
            "spec.output.maxFileSize: '5GB' is not a quantity such as 5Gi, 512Mi or 1073741824",
        ),
        (
            spec_with(**{"converter.backoffLimit": 21}),
            "spec.converter.backoffLimit: Input should be less than or equal to 20",
        ),
        (
            spec_with(**{"converter.activeDeadlineSeconds": 59}),
            "spec.converter.activeDeadlineSeconds: Input should be greater than or equal to 60",
        ),
        (
            spec_with(**{"converter.imagePullPolicy": "Sometimes"}),
            "spec.converter.imagePullPolicy: Input should be 'Always', 'IfNotPresent' or 'Never'",
        ),
        (
            spec_with(**{"converter.engine": "vLLM"}),
            "spec.converter.engine: Input should be 'auto', 'none' or 'vllm'",
        ),
        (
            spec_with(**{"converter.ttlSecondsAfterFinished": -1}),
            "spec.converter.ttlSecondsAfterFinished: Input should be greater than or equal to 0",
        ),
        (
            spec_with(quantization="int4", dtype="fp16", tensorParallelSize=0),
            "spec.tensorParallelSize: Input should be greater than or equal to 1; "
            f"spec.quantization: unknown quantization 'int4'; supported: {QUANT_LIST}; "
            "spec.dtype: unknown dtype 'fp16'; supported: auto, float16, bfloat16, float32",
        ),
    ],
)
def test_parse_spec_errors_name_every_field(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError) as exc:
        parse_spec(raw)
    assert str(exc.value) == message
    assert exc.value.reason == "InvalidSpec"
    assert exc.value.permanent is True
    assert exc.value.__cause__ is None  # no pydantic traceback in the condition


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            spec_with(**{"source.uri": "ftp://x"}),
            "spec.source.uri: 'ftp://x' has an unsupported scheme: expected s3://bucket/prefix/, "
            "pvc://claim/path or hf://org/name[@rev]",
        ),
        (
            spec_with(**{"output.uri": "s3://checkpoints/"}),
            "spec.output.uri: output 's3://checkpoints/' is a bucket root: give a prefix such as "
            "s3://checkpoints/models/name/ (a checkpoint is the prefix that holds its manifest)",
        ),
        (
            spec_with(**{"output.uri": "pvc://claim/x"}),
            "spec.output.uri: output 'pvc://claim/x' must be an s3:// prefix (got pvc://)",
        ),
        (
            spec_with(**{"source.uri": "ftp://x", "output.uri": "pvc://claim/x"}),
            "spec.source.uri: 'ftp://x' has an unsupported scheme: expected s3://bucket/prefix/, "
            "pvc://claim/path or hf://org/name[@rev]; "
            "spec.output.uri: output 'pvc://claim/x' must be an s3:// prefix (got pvc://)",
        ),
    ],
)
def test_bad_uris_are_invalid_uri_spec_errors(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidURI) as exc:
        parse_spec(raw)
    assert str(exc.value) == message
    assert exc.value.reason == "InvalidURI"
    assert isinstance(exc.value, SpecError)


def test_bad_uri_error_names_the_field_and_the_other_problems() -> None:
    with pytest.raises(SpecError) as exc:
        parse_spec(spec_with(**{"source.uri": "ftp://x"}, tensorParallelSize=0))
    assert "spec.source.uri" in str(exc.value)
    assert "spec.tensorParallelSize" in str(exc.value)
    # not only URIs: the general reason
    assert type(exc.value) is SpecError and exc.value.reason == "InvalidSpec"


# What the CRD checks, re-validated (the schema may be missing or another version).

NAME_RULE = "(lowercase letters, digits, '-' and '.', starting and ending with a letter or digit)"
RESERVED = (
    "is set by the operator and cannot be overridden (credentials come from "
    "credentialsSecret, endpoints and regions from spec.source and spec.output)"
)
NOT_ALLOWED = (
    "may not be set (allowed: VLLM_*, NCCL_*, OMP_*, MKL_*, KMP_*, TORCH_*, TORCHINDUCTOR_*, "
    "PYTORCH_*, CUDA_* and a few exact names the CRD lists, such as HF_HUB_OFFLINE or "
    "PRESHARD_S3_CONCURRENCY; credentials, endpoints and paths are the operator's)"
)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            spec_with(tensorParallelSize=True),
            "spec.tensorParallelSize: Input should be a valid integer",
        ),
        (
            spec_with(tensorParallelSize="2"),
            "spec.tensorParallelSize: Input should be a valid integer",
        ),
        (spec_with(verify="yes"), "spec.verify: Input should be a valid boolean"),
        (spec_with(verify=1), "spec.verify: Input should be a valid boolean"),
        (
            spec_with(**{"converter.backoffLimit": "2"}),
            "spec.converter.backoffLimit: Input should be a valid integer",
        ),
        (
            spec_with(**{"source.credentialsSecret": "Bad_Secret"}),
            f"spec.source.credentialsSecret: 'Bad_Secret' is not a valid object name {NAME_RULE}",
        ),
        (
            spec_with(**{"output.credentialsSecret": "x" * 254}),
            "spec.output.credentialsSecret: String should have at most 253 characters",
        ),
        (
            spec_with(**{"converter.serviceAccountName": "-sa"}),
            f"spec.converter.serviceAccountName: '-sa' is not a valid object name {NAME_RULE}",
        ),
        (
            spec_with(**{"source.endpoint": "minio:9000"}),
            "spec.source.endpoint: 'minio:9000' is not an endpoint URL such as "
            "http://minio.storage:9000",
        ),
        (
            spec_with(**{"output.endpoint": "ftp://minio"}),
            "spec.output.endpoint: 'ftp://minio' is not an endpoint URL such as "
            "http://minio.storage:9000",
        ),
        (
            spec_with(**{"output.region": "r" * 65}),
            "spec.output.region: String should have at most 64 characters",
        ),
        (
            spec_with(**{"source.uri": "s3://models/" + "x" * 1013}),
            "spec.source.uri: String should have at most 1024 characters",
        ),
        (
            spec_with(**{"converter.image": "i" * 513}),
            "spec.converter.image: String should have at most 512 characters",
        ),
        (
            spec_with(**{"converter.workDirSize": "lots"}),
            "spec.converter.workDirSize: 'lots' is not a quantity such as 200Gi",
        ),
        (
            spec_with(**{"converter.workDirSize": 200}),
            "spec.converter.workDirSize: Input should be a valid string",
        ),
        (
            spec_with(**{"output.maxFileSize": 1.5}),
            "spec.output.maxFileSize: 1.5 is not a byte count or a quantity such as 5Gi",
        ),
        (
            spec_with(**{"converter.nodeSelector": {"gpu": None}}),
            "spec.converter.nodeSelector.gpu: Input should be a valid string",
        ),
        (
            spec_with(
                **{"converter.tolerations": [{"key": "k", "operator": "Maybe", "x": 1}, "gpu"]}
            ),
            "spec.converter.tolerations[0].operator: Input should be 'Exists' or 'Equal'; "
            "spec.converter.tolerations[0].x: unknown field; "
            "spec.converter.tolerations[1]: Input should be a valid dictionary",
        ),
        (
            spec_with(**{"converter.tolerations": [{"effect": "Never", "tolerationSeconds": "5"}]}),
            "spec.converter.tolerations[0].effect: Input should be 'NoSchedule', "
            "'PreferNoSchedule', 'NoExecute' or ''; "
            "spec.converter.tolerations[0].tolerationSeconds: Input should be a valid integer",
        ),
        (
            spec_with(**{"converter.tolerations": [{}] * 65}),
            "spec.converter.tolerations: List should have at most 64 items after validation, "
            "not 65",
        ),
        (
            spec_with(
                **{
                    "converter.env": [
                        {"value": "x"},
                        {"name": "1X"},
                        {"name": "VLLM_X", "value": 1},
                    ]
                }
            ),
            f"spec.converter.env[0].name: Field required; spec.converter.env[1].name: '1X' "
            f"{NOT_ALLOWED}; spec.converter.env[2].value: Input should be a valid string",
        ),
        (
            spec_with(**{"converter.env": [{"name": "HF_TOKEN", "value": "hf_secret"}]}),
            f"spec.converter.env[0].name: HF_TOKEN {RESERVED}",
        ),
        (
            spec_with(**{"converter.env": [{"name": "HOME", "value": "/"}]}),
            f"spec.converter.env[0].name: HOME {RESERVED}",
        ),
        (
            spec_with(**{"converter.env": [{"name": "VLLM_X", "value": "v" * 32769}]}),
            "spec.converter.env[0].value: String should have at most 32768 characters",
        ),
        (
            spec_with(**{"converter.resources": {"requests": {"cpu": [1], "memory": "lots"}}}),
            "spec.converter.resources.requests.cpu: [1] is not a resource quantity such as 16, "
            "500m or 400Gi; spec.converter.resources.requests.memory: 'lots' is not a resource "
            "quantity such as 16, 500m or 400Gi",
        ),
        (
            spec_with(**{"converter.resources": {"limits": {"cpu": -1, "gpu": True}}}),
            "spec.converter.resources.limits.cpu: -1 is not a resource quantity such as 16, 500m "
            "or 400Gi; spec.converter.resources.limits.gpu: True is not a resource quantity such "
            "as 16, 500m or 400Gi",
        ),
        (
            spec_with(**{"converter.resources": {"claims": [{"name": "gpu"}]}}),
            "spec.converter.resources.claims: unknown field",
        ),
    ],
)
def test_parse_spec_revalidates_the_crd(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError) as exc:
        parse_spec(raw)
    assert str(exc.value) == message
    assert exc.value.reason == "InvalidSpec"


@pytest.mark.parametrize(
    "quantity", [16, 0, "16", "500m", "0.5", ".5", "1.", "400Gi", "1e3", "2E-2", "1Ei", "100k"]
)
def test_resource_quantities(quantity: int | str) -> None:
    raw = spec_with(**{"converter.resources": {"requests": {"cpu": quantity}}})
    assert parse_spec(raw).converter.resources == {"requests": {"cpu": quantity}}


# ----------------------------------------------------------------- conversion hash

EXPECTED_FIELDS = {
    "source": {"uri": "s3://models/llama/"},
    "tensorParallelSize": 2,
    "pipelineParallelSize": 1,
    "quantization": None,
    "dtype": "auto",
    "output": {"uri": "s3://checkpoints/llama/tp2/", "maxFileSize": 5 * 2**30},
}


def test_conversion_fields() -> None:
    assert parse_spec(MINIMAL).conversion_fields() == EXPECTED_FIELDS


def test_conversion_hash_is_stable() -> None:
    h = parse_spec(MINIMAL).conversion_hash()
    assert re.fullmatch(r"[0-9a-f]{64}", h)
    assert parse_spec(copy.deepcopy(MINIMAL)).conversion_hash() == h
    # sha256 of the canonical JSON of the conversion fields.
    blob = json.dumps(EXPECTED_FIELDS, sort_keys=True, separators=(",", ":"))
    assert h == hashlib.sha256(blob.encode()).hexdigest()
    # Pinned: the Job name derives from it, so a change re-creates every conversion Job.
    assert h == "64eca6fa2deb4da9bcdb6f8f29e2d48bec656fa58299ee93d64b98fb8f3a7eae"


@pytest.mark.parametrize(
    "change",
    [
        {"source.uri": "s3://models/llama-2/"},
        {"source.uri": "hf://org/name"},
        {"tensorParallelSize": 4},
        {"pipelineParallelSize": 2},
        {"quantization": "fp8"},
        {"dtype": "bfloat16"},
        {"output.uri": "s3://checkpoints/llama/tp2-b/"},
        {"output.uri": "s3://other-bucket/llama/tp2/"},
        {"output.maxFileSize": "1Gi"},
    ],
)
def test_conversion_hash_changes_with_conversion_fields(change: dict[str, Any]) -> None:
    base = parse_spec(MINIMAL).conversion_hash()
    assert parse_spec(spec_with(**change)).conversion_hash() != base


@pytest.mark.parametrize(
    "change",
    [
        {"verify": False},
        {"deletionPolicy": "Delete"},
        {"source.credentialsSecret": "src-creds"},
        {"source.endpoint": "http://minio:9000"},
        {"source.region": "eu-west-1"},
        {"output.credentialsSecret": "s3-creds"},
        {"output.endpoint": "http://minio:9000"},
        {"output.region": "eu-west-1"},
        {"converter.image": "img:2"},
        {"converter.backoffLimit": 5},
        {"converter.nodeSelector": {"gpu": "a100"}},
        {"converter.env": [{"name": "VLLM_X", "value": "1"}]},
        # Equivalent spellings of the same conversion.
        {"pipelineParallelSize": 1},
        {"dtype": "auto"},
        {"output.maxFileSize": "5Gi"},
        {"output.maxFileSize": 5 * 2**30},
        {"output.uri": "s3://checkpoints/llama/tp2"},
    ],
)
def test_conversion_hash_ignores_non_conversion_fields(change: dict[str, Any]) -> None:
    base = parse_spec(MINIMAL).conversion_hash()
    assert parse_spec(spec_with(**change)).conversion_hash() == base


# ------------------------------------------------------------------- model config


def test_check_model_config_accepts_divisible_sizes() -> None:
    spec = parse_spec(spec_with(tensorParallelSize=8, pipelineParallelSize=4))
    spec.layout.check_model({"num_attention_heads": 64, "num_hidden_layers": 80})
    spec.layout.check_model({"text_config": {"num_attention_heads": 32}})
    spec.layout.check_model({})  # unknown shapes are left to vLLM


def test_check_model_config_tp_mismatch() -> None:
    spec = parse_spec(spec_with(tensorParallelSize=8))
    with pytest.raises(SpecError) as exc:
        spec.layout.check_model({"num_attention_heads": 12})
    assert str(exc.value) == (
        "tensorParallelSize 8 does not divide the model's 12 attention heads; "
        "use one of [1, 2, 3, 4, 6, 12]"
    )
    assert exc.value.reason == "TensorParallelSizeMismatch"
    assert exc.value.permanent is True


def test_check_model_config_reads_text_config() -> None:
    spec = parse_spec(spec_with(tensorParallelSize=3))
    with pytest.raises(SpecError, match="does not divide the model's 8 attention heads"):
        spec.layout.check_model({"text_config": {"num_attention_heads": 8}})


def test_check_model_config_pp_mismatch() -> None:
    spec = parse_spec(spec_with(tensorParallelSize=1, pipelineParallelSize=4))
    with pytest.raises(SpecError) as exc:
        spec.layout.check_model({"num_attention_heads": 4, "num_hidden_layers": 2})
    assert str(exc.value) == "pipelineParallelSize 4 exceeds the model's 2 layers"
    assert exc.value.reason == "PipelineParallelSizeMismatch"


# ------------------------------------------------------------------- env allowlist


@pytest.mark.parametrize(
    "name",
    [
        # accepted before (only exact reserved names were blocked): each redirects
        # credentials, endpoints, code or loaded libraries
        "AWS_ENDPOINT_URL",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_SHARED_CREDENTIALS_FILE",
        "HF_ENDPOINT",
        "LD_PRELOAD",
        "PYTHONPATH",
        "PYTHONSTARTUP",
        "aws_secret_access_key",
        "aws_access_key_id",
        "vllm_plugins",
        "PRESHARD_KEEP_CPU_WEIGHTS",
        "PRESHARD_SOURCE_ENDPOINT_URL",
        "NVIDIA_VISIBLE_DEVICES",
        "HTTPS_PROXY",
        "https_proxy",
        "VLLM_",
    ],
)
def test_env_outside_the_allowlist_is_refused(name: str) -> None:
    with pytest.raises(SpecError) as exc:
        parse_spec(spec_with(**{"converter.env": [{"name": name, "value": "x"}]}))
    assert str(exc.value).startswith(f"spec.converter.env[0].name: {name}") or str(
        exc.value
    ).startswith(f"spec.converter.env[0].name: '{name}'")


@pytest.mark.parametrize(
    "name",
    [
        "VLLM_LOGGING_LEVEL",
        "VLLM_CPU_KVCACHE_SPACE",
        "NCCL_DEBUG",
        "OMP_NUM_THREADS",
        "TORCH_CUDA_ARCH_LIST",
        "PYTORCH_CUDA_ALLOC_CONF",
        "CUDA_LAUNCH_BLOCKING",
        "HF_HUB_OFFLINE",
        "TOKENIZERS_PARALLELISM",
        "PRESHARD_S3_CONCURRENCY",
        "AWS_MAX_ATTEMPTS",
    ],
)
def test_documented_tuning_variables_are_allowed(name: str) -> None:
    spec = parse_spec(spec_with(**{"converter.env": [{"name": name, "value": "1"}]}))
    assert spec.converter.env == [{"name": name, "value": "1"}]


def test_env_allowlist_is_the_crds_pattern_and_documented() -> None:
    import yaml

    from preshard.core.envpolicy import ALLOWED_ENV_NAMES, ALLOWED_ENV_PREFIXES, ENV_NAME_PATTERN

    root = Path(__file__).resolve().parents[2]
    crd = yaml.safe_load((root / "crds" / "shardedcheckpoints.preshard.io.yaml").read_text())
    env = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "properties"
    ]["converter"]["properties"]["env"]
    assert env["items"]["properties"]["name"]["pattern"] == ENV_NAME_PATTERN
    readme = (root / "README.md").read_text()
    for p in ALLOWED_ENV_PREFIXES:
        assert f"`{p}*`" in readme and f"{p}*" in env["description"], p
    for n in ALLOWED_ENV_NAMES:
        assert f"`{n}`" in readme and n in env["description"], n
    assert re.match(ENV_NAME_PATTERN, "VLLM_X") and not re.match(ENV_NAME_PATTERN, "LD_PRELOAD")


def test_engine_reaches_the_plan_and_stays_out_of_the_identity_fields() -> None:
    base = parse_spec(spec_with())
    assert base.converter.engine is None and base.plan().engine == "auto"
    none = parse_spec(spec_with(**{"converter.engine": "none"}))
    assert none.plan().engine == "none"
    assert none.plan(engine="vllm").engine == "vllm"  # the caller's effective engine wins
    assert "--engine" in none.plan().to_argv()
    # both engines write the same bytes: changing it converts nothing new
    assert none.conversion_fields() == base.conversion_fields()
    assert none.conversion_hash() == base.conversion_hash()
