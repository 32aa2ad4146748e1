"""``preshard convert``: Downloading -> Converting -> Verifying -> Uploading.

This is the engine path (``--engine vllm``, or ``auto`` when the planner does not plan
the model); ``--engine none`` (and ``auto`` when the planner plans it) is
``preshard.worker.enginefree``: Planning -> Converting (streamed from the source) ->
Uploading, no engine. Without ``--work-dir`` the work dir is a temporary directory,
removed after the run.

1. Downloading: ``storage.fetch_source`` brings the checkpoint into the work dir (a local
   directory or a mounted PVC is used in place; it is never modified or deleted).
2. Converting: checks the model's config against the requested parallelism BEFORE any
   engine starts, then loads the model in vLLM at TP x PP in a child process with the
   ``preshard_raw`` loader (``vllm_raw_loader``): every rank saves its weights as vLLM's
   weight loaders produced them, BEFORE ``process_weights_after_loading`` (stateFormat
   "raw": right on any serving hardware), and the trace of the loaders' writes. The
   engine then processes the weights as usual and records reference outputs (greedy
   tokens and top-k log-probabilities) for a few fixed prompts. The ranks' traces become
   ``preshard-sharding.json``; the source's non-weight files (config, tokenizer, ...) are
   copied next to the shards.
3. Verifying: file-level checks of the shards; the engine-free check (always; bounded
   memory): every saved tensor rebuilt from the source checkpoint bit for bit through the
   sharding metadata (``verify_against``); then (``--verify``, the default) ONE more
   engine loads the shards with ``load_format="sharded_state"`` at the same
   TP/PP/quantization and must give the same tokens and log-probabilities (within
   ``verify_shards.LOGPROB_TOLERANCE``; whether they were bit-identical is recorded). A
   load error (for example vLLM's "Missing keys") is a verification failure. Once the
   engine-free check passed, a ``publication.Publication`` begins (the output's
   ownership checks, its publication record) and the files upload in the background
   WHILE the engine check runs.
4. Uploading: what is left of the upload (its own rate and ETA), then the manifest,
   last, only when every check passed. Any failure after the upload started aborts it:
   the uploaded objects are removed (a transient failure leaves them, unreferenced and
   recorded, for the retry to re-use) and the error message says which.

The result goes to the termination message (``worker.progress.write_result``); exit
codes follow docs/architecture.md: 0 ok, 1 transient, 3 permanent (bad input, missing
source, wrong parallelism for the model, verification failure).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preshard.core import quantization
from preshard.core.contract import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_PERMANENT,
    LOAD_FORMAT_LOCAL,
    MANIFEST_NAME,
    WEIGHT_INDEXES,
    WEIGHT_SUFFIXES,
)
from preshard.core.errors import PreshardError, SpecError
from preshard.core.estimate import cpu_raw_reload_refusal
from preshard.core.manifest import ConversionFacts, conversion_fields
from preshard.core.plan import ConversionPlan
from preshard.core.progress import Result, format_rate
from preshard.core.quantity import format_bytes
from preshard.worker import verify_against, verify_shards
from preshard.worker.engine.installed import on_cpu_backend
from preshard.worker.engine.process import (
    EngineError,
    EngineOutcome,
    EngineRequest,
    Prompt,
    default_prompts,
    has_tokenizer,
    run_engine,
)

log = logging.getLogger("preshard.convert")

SHARDS_DIR = "shards"
SOURCE_DIR = "source"
# The engine's per-rank traces (preshard-trace-rank-N.json, file order included), kept
# in the work dir: the sharding metadata sorts the tensors, the streaming writer needs
# the engine's order to reproduce its files (tests compare the two paths).
TRACES_DIR = "traces"
# Exceptions vLLM raises for a model/configuration it cannot load: retrying cannot help.
PERMANENT_ENGINE_ERRORS = frozenset({"ValueError", "NotImplementedError", "ValidationError"})


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
            raise SpecError("--gpu-memory-utilization must be in (0, 1]")
        if args.max_model_len is not None and args.max_model_len < 1:
            raise SpecError("--max-model-len must be positive")
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
                raise SpecError(
                    f"--work-dir {work_dir} and the source {src} must not contain each other "
                    "(the work dir is cleaned on every run)"
                )
        if output.scheme == "file":
            out = Path(output.path).resolve()
            if _inside(out, work_dir) or _inside(work_dir, out):
                raise SpecError(
                    f"output {out} and --work-dir {work_dir} must not contain each other "
                    "(the work dir is cleaned on every run)"
                )
            if source.scheme == "file" and (
                _inside(out, Path(source.path).resolve())
                or _inside(Path(source.path).resolve(), out)
            ):
                raise SpecError(f"output {out} and the source must not contain each other")

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


class _Timer:
    """Wall time per stage, logged as each stage ends."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._t0 = time.monotonic()

    def add(self, name: str, seconds: float) -> None:
        self.timings[name] = self.timings.get(name, 0.0) + seconds

    def total(self) -> float:
        return time.monotonic() - self._t0


# ------------------------------------------------------------------------ source checks


def read_model_config(model_dir: Path, label: str) -> dict[str, Any]:
    """The checkpoint's config.json; InvalidSource if it is missing or unreadable, or
    if there are no safetensors weights."""
    config = read_config_json(model_dir, label)
    if not any(p.is_file() for p in model_dir.glob("*.safetensors")):
        raise PreshardError(
            f"the source {label} has no *.safetensors weights (other formats are not supported)",
            reason="InvalidSource",
            permanent=True,
        )
    return config


def read_config_json(model_dir: Path, label: str) -> dict[str, Any]:
    """The checkpoint's config.json (``model_dir`` may hold only the non-weight files, as
    a tensor source prepares them); InvalidSource if it is missing or unreadable."""
    if not model_dir.is_dir():
        raise PreshardError(
            f"the source {label} does not exist", reason="SourceNotFound", permanent=True
        )
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise PreshardError(
            f"the source {label} has no config.json: not a Hugging Face model directory",
            reason="InvalidSource",
            permanent=True,
        )
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise PreshardError(
            f"the source's config.json is not valid JSON: {exc}",
            reason="InvalidSource",
            permanent=True,
        ) from None
    if not isinstance(config, dict):
        raise PreshardError(
            "the source's config.json is not a JSON object", reason="InvalidSource", permanent=True
        )
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


# -------------------------------------------------------------------------------- engine


def _conversion_error(exc: EngineError) -> PreshardError:
    if exc.kind and quantization.permanent_kernel_error(exc.message):
        # a quantization kernel that does not exist on this machine: no retry can help
        return PreshardError(
            f"vLLM has no kernel for this quantization on this machine: {exc.message}",
            reason="UnsupportedQuantization",
            permanent=True,
        )
    if exc.stage == "load" and exc.kind in PERMANENT_ENGINE_ERRORS:
        return PreshardError(
            f"vLLM cannot load the model at this configuration: {exc.message}",
            reason="ConversionFailed",
            permanent=True,
        )
    if exc.stage == "generate" and exc.kind:
        # vLLM raised while generating the reference tokens: deterministic for a given
        # model and layout, so a retry cannot help.
        return PreshardError(
            f"vLLM failed to generate the reference tokens for verification: {exc.message} "
            "(--no-verify skips this step)",
            reason="ConversionFailed",
            permanent=True,
        )
    return PreshardError(
        f"conversion failed ({exc.stage}): {exc.message}", reason="ConversionFailed"
    )


def _verification_error(exc: EngineError) -> PreshardError:
    if exc.kind:  # vLLM raised: the shards do not load (e.g. "Missing keys")
        return verify_shards.VerificationFailed(
            f"reloading the shards with load_format=sharded_state failed: {exc.message}"
        )
    # The process died or timed out: not a verdict on the shards.
    return PreshardError(f"verification engine failed: {exc.message}", reason="ConversionFailed")


def convert(req: ConvertRequest, reporter: Any) -> ConvertOutcome:
    """The whole pipeline; raises PreshardError on any failure."""
    from preshard.worker import resources
    from preshard.worker.store import fetch, source_files
    from preshard.worker.store.publication import Publication

    engine_free = _engine_free(req, reporter)
    if engine_free is not None:
        return engine_free
    timer = _Timer()
    shards = prepare_work_dir(req.work_dir)

    # -- Downloading ------------------------------------------------------------------
    t = time.monotonic()
    reporter.stage("Downloading")
    src_dir = Path(
        fetch.fetch_source(
            str(req.plan.source),
            req.work_dir / SOURCE_DIR,
            endpoint_url=req.source_endpoint_url or req.endpoint_url,
            region=req.region,
            concurrency=req.concurrency,
            reporter=reporter,
            pin=req.plan.source_digest,  # SourceChanged unless the preflight's content
        )
    )
    timer.add("download", time.monotonic() - t)
    log.info("source ready in %s (%.1f s)", src_dir, timer.timings["download"])
    # hf://org/name@main: the manifest records the commit that was actually converted
    commit = (
        source_files.resolved_revision(req.work_dir / SOURCE_DIR)
        if req.plan.source.scheme == "hf"
        else None
    )

    config = read_model_config(src_dir, str(req.plan.source))
    req.plan.layout.check_model(config)
    if on_cpu_backend():
        refusal = cpu_raw_reload_refusal(config, req.plan.quantization)
        if refusal:
            raise PreshardError(refusal, reason="UnsupportedQuantization", permanent=True)
    raw_quantization, kernel_note = quantization_for_engine(req, config)
    # issue 9: refuse a pod whose memory limit is below the estimate (InsufficientMemory)
    resources.check_memory(
        config,
        tensor_parallel_size=req.plan.tensor_parallel_size,
        pipeline_parallel_size=req.plan.pipeline_parallel_size,
        dtype=req.plan.dtype,
        quantization=req.plan.quantization,
        max_file_size=req.plan.max_file_size,
    )
    # Reference tokens are only needed to compare against the reload.
    prompts = default_prompts(config, tokenizer=has_tokenizer(src_dir)) if req.plan.verify else ()

    # -- Converting -------------------------------------------------------------------
    total = weight_bytes(src_dir)
    reporter.stage("Converting", total_bytes=total)
    t = time.monotonic()
    try:
        saved: EngineOutcome = run_engine(
            req.engine_request(
                src_dir,
                prompts,
                quantization=raw_quantization,
                save_dir=str(shards),
                pattern=verify_shards.shard_pattern(req.plan.pipeline_parallel_size),
                max_file_size=req.plan.max_file_size,
            )
        )
    except EngineError as exc:
        raise _conversion_error(exc) from None
    timer.add("convert", time.monotonic() - t)
    timer.add("vllm_load_and_save", saved.load_seconds)
    timer.add("reference_generate", saved.generate_seconds)
    keep_traces(shards, req.work_dir / TRACES_DIR)
    verify_against.write_sharding(shards)
    copied = copy_non_weight_files(src_dir, shards)
    reporter.advance(total)
    log.info(
        "converted with vLLM %s on %s (load and raw save %.1f s); copied %s",
        saved.vllm_version,
        saved.platform,
        saved.load_seconds,
        ", ".join(copied) or "no other files",
    )

    # -- Verifying --------------------------------------------------------------------
    reporter.stage("Verifying")
    t = time.monotonic()
    report = verify_shards.check_shards(
        shards, req.plan.tensor_parallel_size, req.plan.pipeline_parallel_size
    )
    timer.add("check_files", time.monotonic() - t)
    log.info("shard files: %s", report.summary())
    t = time.monotonic()
    free = verify_against.verify_against(src_dir, shards, allow_derived=req.plan.verify)
    timer.add("verify_engine_free", time.monotonic() - t)
    log.info("verified engine-free: %s", free.describe())
    verification: dict[str, Any] = {"engineFree": free.summary()}
    if kernel_note:
        verification["quantization"] = kernel_note
    publication = Publication(
        shards,
        str(req.plan.output),
        owner=req.plan.owner,
        endpoint_url=req.endpoint_url,
        region=req.region,
        concurrency=req.concurrency,
    )
    try:
        # Every check so far passed: the files start going up now, while the engine
        # check below reloads them (Verifying stays the reported stage); the manifest
        # follows only once that check passed too.
        publication.begin()
        # (without an engine check the upload is the Uploading stage from its start)
        handle = publication.start(
            None if req.plan.verify else reporter, background=req.plan.verify
        )
        verified: list[list[int]] | None = None
        if req.plan.verify:
            log.info(
                "uploading %s to %s while an engine verifies the shards (the manifest is "
                "written only if it passes)",
                format_bytes(handle.bytes_total),
                req.plan.output,
            )
            t = time.monotonic()
            verification["engine"], verified = _engine_check(
                req, shards, prompts, saved, raw_quantization
            )
            timer.add("verify_engine", time.monotonic() - t)
            log.info(
                "verified with an engine: the sharded checkpoint reloaded at TP %d x PP %d "
                "gives the same tokens and top-%d log-probabilities (%s) at %d positions of "
                "%d prompts (%.1f s)",
                req.plan.tensor_parallel_size,
                req.plan.pipeline_parallel_size,
                verification["engine"]["topK"],
                _agreement(verification["engine"]),
                verification["engine"]["positions"],
                len(prompts),
                timer.timings["verify_engine"],
            )
        else:
            log.warning("--no-verify: the engine reload and output comparison were skipped")

        # -- Uploading: what is left of the upload, then the manifest, last ------------
        t = time.monotonic()
        if req.plan.verify:
            left = handle.attach(reporter, "Uploading")
            during = handle.bytes_total - left
            timer.add("upload_during_verify", (handle.finished or t) - handle.started)
            log.info(
                "uploading: %s of %s went up during the verification, %s left",
                format_bytes(during),
                format_bytes(handle.bytes_total),
                format_bytes(left),
            )
        facts = ConversionFacts(
            vllm_version=saved.vllm_version,
            platform=saved.platform,
            source_revision=commit,
            detected_quantization=checkpoint_quantization(config),
            verification=verification,
            engine="vllm",
        )
        artifact = publication.commit(conversion_fields(req.plan, facts), reporter=reporter)
        timer.add("upload", time.monotonic() - t)
        if handle.finished is not None:
            seconds = max(handle.finished - handle.started, 1e-6)
            log.info(
                "upload: %s in %.1f s (%s, %.1f s of it after the verification)",
                format_bytes(handle.bytes_total),
                seconds,
                format_rate(handle.bytes_total / seconds),
                timer.timings["upload"],
            )
    except BaseException as exc:
        _abort_publication(publication, exc)
        raise
    timer.timings["total"] = timer.total()
    log.info("stage timings: %s", format_timings(timer.timings))
    return ConvertOutcome(
        artifact=artifact,
        shards_dir=shards,
        timings=timer.timings,
        reference_tokens=[list(x) for x in saved.tokens],
        verified_tokens=verified,
        vllm_version=saved.vllm_version,
        shard_summary=report.summary(),
        verification=verification,
    )


def _engine_free(req: ConvertRequest, reporter: Any) -> ConvertOutcome | None:
    """``--engine none``, or ``auto`` when the planner supports the model: the whole
    engine-free conversion (``worker.enginefree``); None: the engine path runs."""
    from preshard.worker import enginefree

    if req.plan.engine == enginefree.ENGINE_VLLM:
        return None
    if req.plan.engine != enginefree.ENGINE_NONE and not enginefree.planner_available():
        log.info("engine: vllm (--engine auto: the engine-free planner is not installed)")
        return None
    reporter.stage("Planning")
    try:
        source = enginefree.open_request_source(req)
    except PreshardError as exc:
        if req.plan.engine == enginefree.ENGINE_NONE:
            raise
        # auto: the engine path fetches the source and reports its own errors
        log.info("engine: vllm (--engine auto: the source cannot be streamed: %s)", exc)
        return None
    try:
        model_dir = source.prepare(req.work_dir)
        req.plan.layout.check_model(read_config_json(model_dir, str(req.plan.source)))
        t = time.monotonic()
        engine, why, traces = enginefree.choose_engine(req, source, model_dir)
        log.info("engine: %s (%s; %.1f s)", engine, why, time.monotonic() - t)
        if engine != enginefree.ENGINE_NONE:
            return None
        outcome: ConvertOutcome = enginefree.convert_engine_free(
            req, reporter, source, model_dir, traces, plan_seconds=time.monotonic() - t
        )
        return outcome
    finally:
        source.close()


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
    from preshard.worker.engine import kernels

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
            raise PreshardError(
                f"quantization {q!r} cannot run on this machine (vLLM's own kernel selection "
                "on one probe layer, before any engine), and the conversion engine needs it "
                f"to load the checkpoint: {reason}. Convert on a node type where the probe "
                "passes (accelerator: gpu, or a CPU with the kernel), or use an online "
                "method (fp8_per_tensor, fp8_per_channel, fp8_per_block) over an "
                "unquantized checkpoint",
                reason="UnsupportedQuantization",
                permanent=True,
            )
    return q, {"method": q, "online": False, "kernel": None}


def online_record(q: str | None, config: dict[str, Any], *, probe: bool) -> dict[str, Any] | None:
    """The verification's ``quantization`` record for an online method (None: ``q`` is
    not one): the note the summary repeats and, with ``probe``, the kernel probe's reason
    (None: this machine has the kernel)."""
    from preshard.worker.engine import kernels

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


def _engine_check(
    req: ConvertRequest,
    shards: Path,
    prompts: tuple[Prompt, ...],
    saved: EngineOutcome,
    raw_quantization: str | None,
) -> tuple[dict[str, Any], list[list[int]]]:
    """ONE more engine loads the shards (load_format=sharded_state, at the quantization
    the conversion engine used) and must give the conversion engine's tokens and
    log-probabilities; VerificationFailed otherwise."""
    try:
        again = run_engine(
            req.engine_request(
                shards, prompts, quantization=raw_quantization, load_format=LOAD_FORMAT_LOCAL
            )
        )
    except EngineError as exc:
        raise _verification_error(exc) from None
    summary = verify_shards.compare_outputs(
        [p.describe() for p in prompts],
        [list(x) for x in saved.tokens],
        [list(x) for x in again.tokens],
        saved.logprobs,
        again.logprobs,
    )
    return summary, [list(x) for x in again.tokens]


def _agreement(engine: dict[str, Any]) -> str:
    """How the engine check's log-probabilities agreed, e.g. "abs<=0.05, bit-identical"."""
    how = (
        "bit-identical"
        if engine.get("bitIdentical")
        else f"max difference {float(engine.get('maxAbsDifference') or 0.0):.3g}"
    )
    return f"{engine.get('comparison')}, {how}"


def _abort_publication(publication: Any, exc: BaseException) -> None:
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


def verification_result(verification: dict[str, Any]) -> dict[str, Any]:
    """The result's ``verification`` in the shape the operator reads
    (``preshard.core.progress.verification_status``: ``passed``, ``summary``,
    ``checks[] {name, passed, detail}``), from the manifest's verification record."""
    checks: list[dict[str, Any]] = []
    free = verification.get("engineFree")
    planned = isinstance(free, dict) and free.get("method") == "planned"
    if planned:
        assert isinstance(free, dict)
        detail = (
            f"{free.get('files')} rank files streamed from the source as vLLM's weight loaders "
            f"plan them ({free.get('savedTensors')} tensors, "
            f"{format_bytes(int(free.get('bytesWritten') or 0))}), each read back against "
            "its plan; no engine ran (--engine none)"
        )
        checks.append(
            {"name": "engine-free", "passed": free.get("matched") is True, "detail": detail}
        )
    elif isinstance(free, dict):
        detail = (
            f"{free.get('savedTensors')} saved tensors rebuilt from "
            f"{free.get('sourceTensors')} source tensors bit for bit ({free.get('copies')} "
            f"copies, {free.get('fills')} fills, "
            f"{format_bytes(int(free.get('bytesCompared') or 0))} compared)"
        )
        checks.append(
            {"name": "engine-free", "passed": free.get("matched") is True, "detail": detail}
        )
    engine = verification.get("engine")
    if isinstance(engine, dict):
        detail = (
            f"the shards reloaded with load_format=sharded_state give the same tokens and "
            f"top-{engine.get('topK')} log-probabilities ({_agreement(engine)}) at "
            f"{engine.get('positions')} positions of {engine.get('prompts')} prompts"
        )
        checks.append({"name": "engine", "passed": engine.get("matched") is True, "detail": detail})
    passed = bool(checks) and all(c["passed"] for c in checks)
    summary = "; ".join(f"{c['name']}: {c['detail']}" for c in checks)
    if not isinstance(engine, dict) and not planned:
        summary += "; engine check skipped (--no-verify)"
    summary += quantization_summary(verification.get("quantization"))
    return {"passed": passed, "summary": summary, "checks": checks}


def quantization_summary(record: Any) -> str:
    """What the verification summary says about an online method (``quantization`` in
    the verification record): the raw files are unquantized, and whether the quantized
    engine check could run on this machine."""
    if not isinstance(record, dict) or not record.get("online"):
        return ""
    method = record.get("method")
    text = f"; {record.get('note')}"
    reason = record.get("kernel")
    if not record.get("probed"):
        text += f"; {method}'s kernel was not probed (no engine ran)"
    elif isinstance(reason, str) and reason:
        text += (
            f"; engine check with {method} skipped: {method} has no kernel on this CPU ({reason})"
        )
    else:
        text += (
            f"; engine check with {method} skipped: the engine check reloads the raw files "
            f"without the method ({method}'s kernel exists on this machine, the quantized "
            "reload is not compared)"
        )
    return text


def checkpoint_quantization(config: dict[str, Any]) -> str | None:
    """The quantization method a pre-quantized checkpoint's config.json declares."""
    qc = config.get("quantization_config")
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    return str(method) if isinstance(method, str) and method else None


def format_timings(timings: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())


# ------------------------------------------------------------------------------ command


class Terminated(BaseException):
    """SIGTERM arrived (pod deletion, Job deadline, a user): stop engines and exit."""

    note = ""  # what became of an upload in progress (convert sets it)


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def run(args: argparse.Namespace) -> int:
    from preshard.worker.progress import Reporter, write_result

    # Turn SIGTERM into an exception so that the engine's process group is stopped on the
    # way out (engine.process.run_engine's finally), instead of leaving vLLM running.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    reporter = Reporter(mode=getattr(args, "progress", "auto"))
    req: ConvertRequest | None = None
    try:
        req = ConvertRequest.from_args(args)
        outcome = convert(req, reporter)
    except Terminated as exc:
        _safe_done(reporter)
        message = "terminated (SIGTERM)" + (
            f"; nothing was published: {exc.note}" if exc.note else ""
        )
        write_result(Result(result="Failed", reason="Terminated", message=message))
        print("preshard: terminated", file=sys.stderr)
        return 143
    except PreshardError as exc:
        _safe_done(reporter)
        write_result(Result(result="Failed", reason=exc.reason, message=exc.message))
        print(f"preshard: error: {exc.message}", file=sys.stderr)
        return EXIT_PERMANENT if exc.permanent else EXIT_FAILED
    except KeyboardInterrupt as exc:
        _safe_done(reporter)
        notes = "".join(f"; {n}" for n in getattr(exc, "__notes__", []))
        write_result(Result(result="Failed", reason="Interrupted", message="interrupted" + notes))
        print("preshard: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # unexpected: a bug or an environment problem; the Job retries
        _safe_done(reporter)
        log.debug("unexpected error", exc_info=True)
        from preshard.worker.store.s3 import scrub

        notes = "".join(f"; {n}" for n in getattr(exc, "__notes__", []))
        msg = scrub(f"unexpected error: {type(exc).__name__}: {exc}{notes}")
        write_result(Result(result="Failed", reason="InternalError", message=msg))
        print(f"preshard: error: {msg} (run with -v for details)", file=sys.stderr)
        return EXIT_FAILED
    finally:
        # A temporary work dir (no --work-dir) cannot be resumed from (each run makes a
        # new one): removed whatever the outcome.
        if req is not None and req.temporary_work_dir:
            shutil.rmtree(req.work_dir, ignore_errors=True)
    _safe_done(reporter)
    write_result(
        Result(
            result="Succeeded",
            artifact=outcome.artifact,
            stages=reporter.stage_seconds(),
            verification=verification_result(outcome.verification),
        )
    )
    assert req is not None
    print(
        f"preshard: published {outcome.artifact.get('uri', req.plan.output)} "
        f"(engine {outcome.engine}; {outcome.shard_summary}; {format_timings(outcome.timings)})",
        file=sys.stderr,
    )
    return EXIT_OK


def _safe_done(reporter: Any) -> None:
    # The progress display must never mask the real outcome.
    with contextlib.suppress(Exception):
        reporter.done()
