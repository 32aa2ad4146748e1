"""``preshard convert``: Downloading -> Converting -> Verifying -> Uploading.

This is the engine path (``--engine vllm``, or ``auto`` when the planner does not plan
the model); ``--engine none`` (and ``auto`` when the planner plans it) is
``preshard.worker.enginefree``: Planning -> Converting (streamed from the source) ->
Uploading, no engine. Without ``--work-dir`` the work dir is a temporary directory,
removed after the run.

1. Downloading: ``store.fetch.fetch_source`` brings the checkpoint into the work dir (a local
   directory or a mounted PVC is used in place; it is never modified or deleted).
2. Converting: checks the model's config against the requested parallelism BEFORE any
   engine starts, then loads the model in vLLM at TP x PP in a child process with the
   ``preshard_raw`` loader (``engine.raw_loader``): every rank saves its weights as vLLM's
   weight loaders produced them, BEFORE ``process_weights_after_loading`` (stateFormat
   "raw": right on any serving hardware), and the trace of the loaders' writes. The
   engine then processes the weights as usual and records reference outputs (greedy
   tokens and top-k log-probabilities) for a few fixed prompts. The ranks' traces become
   ``preshard-sharding.json``; the source's non-weight files (config, tokenizer, ...) are
   copied next to the shards.
3. Verifying: file-level checks of the shards; the engine-free check (always; bounded
   memory): every saved tensor rebuilt from the source checkpoint bit for bit through the
   sharding metadata (``verify.against``); then (``--verify``, the default) ONE more
   engine loads the shards with ``load_format="sharded_state"`` at the same
   TP/PP/quantization and must give the same tokens and log-probabilities (within
   ``verify.shards.LOGPROB_TOLERANCE``; whether they were bit-identical is recorded). A
   load error (for example vLLM's "Missing keys") is a verification failure. Once the
   engine-free check passed, a ``store.publication.Publication`` begins (the output's
   ownership checks, its publication record) and the files upload in the background
   WHILE the engine check runs.
4. Uploading: what is left of the upload (its own rate and ETA), then the manifest,
   last, only when every check passed. Any failure after the upload started aborts it:
   the uploaded objects are removed (a transient failure leaves them, unreferenced and
   recorded, for the retry to re-use) and the error message says which.

The command (``preshard.worker.commands.convert``) runs ``convert``; the runner
(``commands.runner``) writes the result and picks the exit code.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from preshard.core import quantization
from preshard.core.contract import LOAD_FORMAT_LOCAL
from preshard.core.errors import (
    ConversionFailed,
    EngineRefused,
    PreshardError,
    UnsupportedQuantization,
    VerificationFailed,
)
from preshard.core.manifestfields import ConversionFacts, conversion_fields
from preshard.core.modelconfig import cpu_raw_reload_refusal
from preshard.core.progress import format_rate
from preshard.core.quantity import format_bytes
from preshard.worker.conversion.common import (
    SOURCE_DIR,
    TRACES_DIR,
    ConvertOutcome,
    ConvertRequest,
    Timer,
    abort_publication,
    checkpoint_quantization,
    copy_non_weight_files,
    format_timings,
    keep_traces,
    prepare_work_dir,
    quantization_for_engine,
    read_config_json,
    read_model_config,
    weight_bytes,
)
from preshard.worker.conversion.result import agreement
from preshard.worker.engine.installed import on_cpu_backend
from preshard.worker.engine.process import (
    EngineError,
    EngineOutcome,
    Prompt,
    default_prompts,
    has_tokenizer,
    run_engine,
)
from preshard.worker.verify import against as verify_against
from preshard.worker.verify import shards as verify_shards

log = logging.getLogger("preshard.convert")

# Exceptions vLLM raises for a model/configuration it cannot load: retrying cannot help.
PERMANENT_ENGINE_ERRORS = frozenset({"ValueError", "NotImplementedError", "ValidationError"})


# -------------------------------------------------------------------------------- engine


def _conversion_error(exc: EngineError) -> PreshardError:
    if exc.kind and quantization.permanent_kernel_error(exc.message):
        # a quantization kernel that does not exist on this machine: no retry can help
        return UnsupportedQuantization(
            f"vLLM has no kernel for this quantization on this machine: {exc.message}",
        )
    if exc.stage == "load" and exc.kind in PERMANENT_ENGINE_ERRORS:
        return EngineRefused(
            f"vLLM cannot load the model at this configuration: {exc.message}",
        )
    if exc.stage == "generate" and exc.kind:
        # vLLM raised while generating the reference tokens: deterministic for a given
        # model and layout, so a retry cannot help.
        return EngineRefused(
            f"vLLM failed to generate the reference tokens for verification: {exc.message} "
            "(--no-verify skips this step)",
        )
    return ConversionFailed(f"conversion failed ({exc.stage}): {exc.message}")


def _verification_error(exc: EngineError) -> PreshardError:
    if exc.kind:  # vLLM raised: the shards do not load (e.g. "Missing keys")
        return VerificationFailed(
            f"reloading the shards with load_format=sharded_state failed: {exc.message}"
        )
    # The process died or timed out: not a verdict on the shards.
    return ConversionFailed(f"verification engine failed: {exc.message}")


def convert(req: ConvertRequest, reporter: Any) -> ConvertOutcome:
    """The whole pipeline; raises PreshardError on any failure."""
    from preshard.worker import resources
    from preshard.worker.store import fetch, source_files
    from preshard.worker.store.publication import Publication

    engine_free = _engine_free(req, reporter)
    if engine_free is not None:
        return engine_free
    timer = Timer()
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
            raise UnsupportedQuantization(refusal)
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
                agreement(verification["engine"]),
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
        abort_publication(publication, exc)
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


# ------------------------------------------------------------------------------ command
