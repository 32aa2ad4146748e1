"""What both conversion paths share (the engine path, ``engine_path``, and the
engine-free one, ``preshard.worker.enginefree``): the request (``ConvertRequest``: the
plan and how this pod runs it) and the outcome, the work dir, the source's config and
non-weight files, the quantization the engine loads with (and the kernel probe's
record), and stopping a publication in progress when anything fails."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preshard.core import quantization
from preshard.core.contract import MANIFEST_NAME, WEIGHT_INDEXES, WEIGHT_SUFFIXES
from preshard.core.errors import (
    InvalidSource,
    InvalidSpec,
    PreshardError,
    SourceNotFound,
    SpecError,
    UnsupportedQuantization,
)
from preshard.core.plan import ConversionPlan
from preshard.worker.engine import kernels
from preshard.worker.engine.installed import on_cpu_backend
from preshard.worker.engine.process import EngineRequest, Prompt, has_tokenizer
from preshard.worker.progress import Terminated
from preshard.worker.verify import against as verify_against
from preshard.worker.verify import shards as verify_shards

log = logging.getLogger("preshard.convert")

SHARDS_DIR = "shards"


SOURCE_DIR = "source"


# The engine's per-rank traces (preshard-trace-rank-N.json, file order included), kept
# in the work dir: the sharding metadata sorts the tensors, the streaming writer needs
# the engine's order to reproduce its files (tests compare the two paths).
TRACES_DIR = "traces"


@dataclass(frozen=True)
class ConvertRequest:
    """The conversion plan (preshard.core.plan: what to produce) and how this pod runs it."""

    plan: ConversionPlan
    work_dir: Path = Path("preshard-work")
    endpoint_url: str | None = None
    region: str | None = None
    concurrency: int = 16
    source_endpoint_url: str | None = None
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None
    # no --work-dir (nor PRESHARD_WORK_DIR): a temporary directory, removed after the run
    temporary_work_dir: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ConvertRequest:
        """Validate the command line; SpecError (permanent) with one clear line."""
        plan = ConversionPlan.from_namespace(args)
        if args.gpu_memory_utilization is not None and not 0 < args.gpu_memory_utilization <= 1:
            raise InvalidSpec("--gpu-memory-utilization must be in (0, 1]")
        if args.max_model_len is not None and args.max_model_len < 1:
            raise InvalidSpec("--max-model-len must be positive")
        temporary = not args.work_dir
        work_dir = (
            Path(tempfile.mkdtemp(prefix="preshard-work-")).resolve()
            if temporary
            else Path(args.work_dir).resolve()
        )
        try:
            cls._check_paths(plan, work_dir)
        except SpecError:
            if temporary:
                shutil.rmtree(work_dir, ignore_errors=True)
            raise
        return cls(
            plan=plan,
            work_dir=work_dir,
            endpoint_url=args.endpoint_url,
            region=args.region,
            concurrency=max(1, int(args.concurrency)),
            source_endpoint_url=args.source_endpoint_url,
            gpu_memory_utilization=args.gpu_memory_utilization,
            max_model_len=args.max_model_len,
            temporary_work_dir=temporary,
        )

    @staticmethod
    def _check_paths(plan: ConversionPlan, work_dir: Path) -> None:
        source, output = plan.source, plan.output
        if source.scheme == "file":
            src = Path(source.path).resolve()
            if _inside(work_dir, src) or _inside(src, work_dir):
                raise InvalidSpec(
                    f"--work-dir {work_dir} and the source {src} must not contain each other "
                    "(the work dir is cleaned on every run)"
                )
        if output.scheme == "file":
            out = Path(output.path).resolve()
            if _inside(out, work_dir) or _inside(work_dir, out):
                raise InvalidSpec(
                    f"output {out} and --work-dir {work_dir} must not contain each other "
                    "(the work dir is cleaned on every run)"
                )
            if source.scheme == "file" and (
                _inside(out, Path(source.path).resolve())
                or _inside(Path(source.path).resolve(), out)
            ):
                raise InvalidSpec(f"output {out} and the source must not contain each other")

    def engine_request(
        self,
        model: Path,
        prompts: tuple[Prompt, ...],
        *,
        quantization: str | None = None,
        **kw: Any,
    ) -> EngineRequest:
        """The vLLM engine for ``model`` at this plan's layout, ``quantization`` (the
        raw plan's: None for an online method, ``core.quantization``) and dtype, with this
        pod's runtime settings (``kw``: what the stage adds, e.g. save_dir)."""
        return EngineRequest(
            model=str(model),
            tensor_parallel_size=self.plan.tensor_parallel_size,
            pipeline_parallel_size=self.plan.pipeline_parallel_size,
            quantization=quantization,
            dtype=self.plan.dtype,
            prompts=prompts,
            gpu_memory_utilization=self.gpu_memory_utilization,
            max_model_len=self.max_model_len,
            skip_tokenizer_init=not has_tokenizer(model),
            **kw,
        )


def _inside(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


@dataclass
class ConvertOutcome:
    artifact: dict[str, Any]
    shards_dir: Path
    timings: dict[str, float] = field(default_factory=dict)
    reference_tokens: list[list[int]] = field(default_factory=list)
    verified_tokens: list[list[int]] | None = None
    vllm_version: str = ""
    shard_summary: str = ""
    verification: dict[str, Any] = field(default_factory=dict)
    engine: str = "vllm"  # which produced the files: "none" (engine-free) or "vllm"


class Timer:
    """Wall time per stage, logged as each stage ends."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._t0 = time.monotonic()

    def add(self, name: str, seconds: float) -> None:
        self.timings[name] = self.timings.get(name, 0.0) + seconds

    def total(self) -> float:
        return time.monotonic() - self._t0


def read_model_config(model_dir: Path, label: str) -> dict[str, Any]:
    """The checkpoint's config.json; InvalidSource if it is missing or unreadable, or
    if there are no safetensors weights."""
    config = read_config_json(model_dir, label)
    if not any(p.is_file() for p in model_dir.glob("*.safetensors")):
        raise InvalidSource(
            f"the source {label} has no *.safetensors weights (other formats are not supported)",
        )
    return config


def read_config_json(model_dir: Path, label: str) -> dict[str, Any]:
    """The checkpoint's config.json (``model_dir`` may hold only the non-weight files, as
    a tensor source prepares them); InvalidSource if it is missing or unreadable."""
    if not model_dir.is_dir():
        raise SourceNotFound(f"the source {label} does not exist")
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise InvalidSource(
            f"the source {label} has no config.json: not a Hugging Face model directory",
        )
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidSource(
            f"the source's config.json is not valid JSON: {exc}",
        ) from None
    if not isinstance(config, dict):
        raise InvalidSource("the source's config.json is not a JSON object")
    return config


def weight_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors") if p.is_file())


def copy_non_weight_files(src: Path, dst: Path) -> list[str]:
    """Copy the source's top-level non-weight files (config, tokenizer, ...)."""
    copied = []
    root = src.resolve()
    for p in sorted(src.iterdir()):
        if not p.is_file() or p.name.startswith(".") or p.name.startswith("preshard-"):
            continue
        if p.is_symlink() and root not in p.resolve().parents:
            # fetch_source refuses such links; a link swapped in since is skipped, never read
            log.warning("not copying %s: a link out of the source directory", p.name)
            continue
        if p.name.endswith(WEIGHT_SUFFIXES) or p.name in WEIGHT_INDEXES:
            continue
        if verify_shards.is_shard_file(p.name) or p.name == MANIFEST_NAME:
            continue
        shutil.copy2(p, dst / p.name)
        copied.append(p.name)
    return copied


def prepare_work_dir(work_dir: Path) -> Path:
    """Create the work dir and an empty shards dir (partial output of an earlier attempt
    is removed; a fetched source in the work dir is kept for resuming)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    shards = work_dir / SHARDS_DIR
    if shards.exists():
        log.info("removing partial output of an earlier attempt: %s", shards)
        shutil.rmtree(shards)
    shards.mkdir()
    return shards


def keep_traces(shards: Path, dest: Path) -> None:
    """Copy the ranks' traces out of the shards dir before they are merged and removed."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for p in verify_against.iter_traces(shards):
        shutil.copy2(p, dest / p.name)


def quantization_for_engine(
    req: ConvertRequest, config: dict[str, Any]
) -> tuple[str | None, dict[str, Any] | None]:
    """The quantization the conversion engine loads the source with, and what the
    verification records about the method (None: no method).

    An online method (``core.quantization.online_method``) is never applied by the
    conversion: the engine converts without it (the raw files hold the weights before
    quantization) and its kernel is only probed, so the summary can say whether this
    machine could serve it. Any other method is applied by the engine, so it needs its
    kernel here: a method the probe finds no kernel for is refused permanently
    (``UnsupportedQuantization``, exit 3) before any engine starts."""
    q = req.plan.quantization
    if not q:
        return None, None
    declared = checkpoint_quantization(config)
    note = online_record(q, config, probe=on_cpu_backend())
    if note is not None:
        return quantization.raw_plan_quantization(q, declared), note
    if on_cpu_backend():
        qc = config.get("quantization_config")
        reason = kernels.probe_quantization(
            q, qc if isinstance(qc, dict) and declared and declared.lower() == q else None
        )
        if reason:
            raise UnsupportedQuantization(
                f"quantization {q!r} cannot run on this machine (vLLM's own kernel selection "
                "on one probe layer, before any engine), and the conversion engine needs it "
                f"to load the checkpoint: {reason}. Convert on a node type where the probe "
                "passes (accelerator: gpu, or a CPU with the kernel), or use an online "
                "method (fp8_per_tensor, fp8_per_channel, fp8_per_block) over an "
                "unquantized checkpoint",
            )
    return q, {"method": q, "online": False, "kernel": None}


def online_record(q: str | None, config: dict[str, Any], *, probe: bool) -> dict[str, Any] | None:
    """The verification's ``quantization`` record for an online method (None: ``q`` is
    not one): the note the summary repeats and, with ``probe``, the kernel probe's reason
    (None: this machine has the kernel)."""
    if not quantization.online_method(q, checkpoint_quantization(config)):
        return None
    assert q is not None
    note: dict[str, Any] = {
        "method": q,
        "online": True,
        "note": quantization.online_note(q, moe=_is_moe(config)),
        "kernel": kernels.probe_quantization(q) if probe else None,
        "probed": probe,
    }
    log.info("%s", note["note"])
    return note


def _is_moe(config: dict[str, Any]) -> bool | None:
    """Whether config.json describes a mixture-of-experts model (None: cannot tell)."""
    text = config.get("text_config")
    cfg = text if isinstance(text, dict) else config
    keys = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
    return any(isinstance(cfg.get(k), int) and cfg.get(k, 0) > 1 for k in keys)


def abort_publication(publication: Any, exc: BaseException) -> None:
    """A check failed, or anything else did, after the upload started: stop it. On a
    permanent failure, a termination or an unexpected error the uploaded objects are
    removed; a transient failure (the Job retries) leaves them, unreferenced, for the
    retry to re-use. The error message says which."""
    transient = isinstance(exc, PreshardError) and not exc.permanent
    try:
        note = publication.abort(remove=not transient)
    except BaseException as again:  # a second SIGTERM: the first outcome still counts
        log.warning("the publication could not be stopped cleanly: %r", again)
        return
    if not note:
        return
    if isinstance(exc, PreshardError):
        exc.message = f"{exc.message}; nothing was published: {note}"
        exc.args = (exc.message,)
    elif isinstance(exc, Terminated):
        exc.note = note
    else:  # an unexpected error or an interrupt: run() adds the note to its message
        exc.add_note(f"nothing was published: {note}")


def checkpoint_quantization(config: dict[str, Any]) -> str | None:
    """The quantization method a pre-quantized checkpoint's config.json declares."""
    qc = config.get("quantization_config")
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    return str(method) if isinstance(method, str) and method else None


def format_timings(timings: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
