"""``preshard convert --engine none``: Planning -> Converting (streamed) -> Uploading.

1. Planning: the source is opened as a ``TensorSource`` (``preshard.worker.sources``:
   local and PVC files read by offset, S3 by ranged GETs, ``hf://`` by HTTP ranges; no
   copy of the weights), its non-weight files come into the work dir, and the planner
   (``preshard.worker.planner.plan_ranks``) builds every rank's trace from vLLM's own
   model classes and weight loaders on the meta device, without an engine. The file
   layout follows from the traces (names, parts, headers, sizes), so the publication's
   record lists every key before any file is written, and the sharding metadata is
   built from the traces exactly as for the engine's.
2. Converting: ``shardwriter.write_shards`` streams every rank's files from the source
   (ranks in lockstep over a byte-bounded cache: the source is read about once), every
   buffer read back from the file as it is written and compared with what was built,
   and hashed (sha256); each completed file's header is read back with safetensors (the
   tensors, shapes and dtypes the plan lists, the size the layout says, every name led
   to exactly the bytes written for it) and the file handed to the upload at once.
3. Uploading: ``shardpublish.StreamingPublication`` uploads each file as it completes
   and deletes it (a local output on the work dir's file system: renamed into place);
   the manifest (``convertedOn.engine: "none"``) goes last, when every file is stored.

Memory: the writer's source cache (``cache_bytes``, at least the largest source tensor)
plus three buffers of the largest saved tensor plus the upload's part buffers; disk: the
non-weight files plus the rank files written and not yet uploaded (the writer waits
while more than ``max_pending`` bytes wait). No engine runs, so there is no reload check
here: ``preshard verify --against SOURCE`` re-plans and checks every file bit for bit,
and an engine reload is ``--engine vllm``'s (docs/verification.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from preshard.core.errors import PlanningFailed, PreshardError, UnsupportedModel, VerificationFailed
from preshard.core.manifest import SHARDING_NAME
from preshard.core.manifestfields import ConversionFacts, conversion_fields
from preshard.core.quantity import format_bytes
from preshard.worker import shardlayout, shardwriter
from preshard.worker.engine.installed import installed_vllm

log = logging.getLogger("preshard.convert")

ENGINE_NONE = "none"
ENGINE_VLLM = "vllm"


def planner_available() -> bool:
    import importlib.util
    import sys

    if sys.modules.get("preshard.worker.planner") is not None:
        return True
    try:
        return importlib.util.find_spec("preshard.worker.planner") is not None
    except (ImportError, ValueError):
        return False


def open_request_source(req: Any) -> Any:
    from preshard.worker.sources import open_source

    return open_source(
        str(req.plan.source),
        endpoint_url=req.source_endpoint_url or req.endpoint_url,
        region=req.region,
        concurrency=req.concurrency,
        pin=req.plan.source_digest,
    )


def choose_engine(
    req: Any, source: Any, model_dir: Path
) -> tuple[str, str, list[dict[str, Any]] | None]:
    """(engine, why, traces) for the plan's ``engine``: ``vllm`` as asked; ``none`` as
    asked (the planner's refusal, e.g. ``PlannerUnsupported``, is permanent); ``auto``:
    ``none`` whenever the planner plans the model (its traces are returned, so the model
    is planned once: planning IS the planner's ``supports`` test), else ``vllm``."""
    asked = req.plan.engine
    if asked == ENGINE_VLLM:
        return ENGINE_VLLM, "--engine vllm", None
    prequantized = req.plan.quantized_shards
    try:
        traces = plan_ranks(req, source, model_dir)
    except PreshardError as exc:
        # pre-quantized shards exist only engine-free (their serving args say so)
        if asked == ENGINE_NONE or prequantized:
            raise
        return ENGINE_VLLM, f"--engine auto: {exc.message}", None
    except Exception as exc:  # the planner failing is no reason to fail an auto run
        if asked == ENGINE_NONE or prequantized:
            if isinstance(exc, ImportError):
                raise UnsupportedModel(
                    f"--engine none: the engine-free planner is not available ({exc})",
                ) from None
            raise
        return ENGINE_VLLM, f"--engine auto: the planner failed ({type(exc).__name__}: {exc})", None
    return ENGINE_NONE, f"--engine {asked}: the planner plans the model", traces


def plan_ranks(req: Any, source: Any, model_dir: Path) -> list[dict[str, Any]]:
    from preshard.core.quantization import raw_plan_quantization, unsupported_quantization
    from preshard.worker import planner  # type: ignore[attr-defined]
    from preshard.worker.conversion import common as cv

    config = cv.read_config_json(model_dir, str(req.plan.source))

    scheme = prequantized_scheme(req.plan)
    if scheme is not None:
        from preshard.worker import fp8shards

        return fp8shards.plan_quantized(
            model_dir,
            source.tensors(),
            tp=req.plan.tensor_parallel_size,
            pp=req.plan.pipeline_parallel_size,
            dtype=req.plan.dtype,
            scheme=scheme,
        )

    quantization = raw_plan_quantization(req.plan.quantization, cv.checkpoint_quantization(config))
    try:
        traces: list[dict[str, Any]] = planner.plan_ranks(
            model_dir,
            source.tensors(),
            tp=req.plan.tensor_parallel_size,
            pp=req.plan.pipeline_parallel_size,
            dtype=req.plan.dtype,
            # an online method is planned unquantized (core.quantization)
            quantization=quantization,
        )
    except PreshardError as exc:
        # a quantization kernel's own refusal inside vLLM's loaders: UnsupportedQuantization
        raise unsupported_quantization(quantization, exc) or exc from None
    return traces


def prequantized_scheme(plan: Any) -> Any:
    """The FP8 scheme the rank files are pre-quantized with (``plan.quantized_shards``),
    else None."""
    if not plan.quantized_shards:
        return None
    from preshard.worker import fp8shards

    return fp8shards.scheme_for(plan.quantization, plan.weights)


def check_written(f: shardwriter.WrittenFile, layout: shardlayout.PartLayout) -> None:
    """A completed rank file read back through its own header: safetensors must list
    exactly the layout's tensors (shapes, dtypes) at the layout's size, and the header
    must lead every name to exactly the span the writer wrote that tensor's bytes to.
    The bytes themselves were checked as they were written (the writer reads each
    buffer back from the file and compares it with what it built, before the sha256
    of those bytes is taken), so this reads only the header: no second pass over the
    data."""
    import os

    from safetensors import safe_open

    from preshard.worker.sources.header import header_length, parse_header

    size = f.path.stat().st_size
    want = {t.key: (t.shape, shardlayout.st_dtype(t.dtype)) for t in layout.tensors}
    with safe_open(str(f.path), framework="pt") as st:
        got = {
            k: (tuple(st.get_slice(k).get_shape()), str(st.get_slice(k).get_dtype()))
            for k in st.keys()  # noqa: SIM118
        }
    if got != want or size != layout.size:
        raise VerificationFailed(
            f"{f.name} does not hold what its plan lists (tensors or size differ)",
        )
    fd = os.open(f.path, os.O_RDONLY)
    try:
        n = header_length(os.pread(fd, 8, 0), f.name, size)
        for info, begin, end in parse_header(os.pread(fd, n, 8), f.name, size):
            if f.spans.get(info.name) != (begin, end):
                raise VerificationFailed(
                    f"{f.name}: the file's header leads {info.name} to bytes "
                    f"{begin}-{end}, not to those written for it",
                )
    finally:
        os.close(fd)


def convert_engine_free(
    req: Any,
    reporter: Any,
    source: Any,
    model_dir: Path,
    traces: list[dict[str, Any]] | None = None,
    *,
    plan_seconds: float = 0.0,
) -> Any:
    """The engine-free pipeline from an open source whose non-weight files are in
    ``model_dir`` (``traces``: the planner's, when already planned); returns
    convert.ConvertOutcome; raises PreshardError."""
    from preshard.core.contract import shard_pattern
    from preshard.core.sharding import ShardingError, build_document
    from preshard.worker.conversion import common as cv
    from preshard.worker.shardpublish import StreamingPublication

    t_start = time.monotonic() - plan_seconds
    timings: dict[str, float] = {}
    plan = req.plan
    shards = cv.prepare_work_dir(req.work_dir)
    config = cv.read_config_json(model_dir, str(plan.source))
    plan.layout.check_model(config)
    t = time.monotonic()
    if traces is None:
        traces = plan_ranks(req, source, model_dir)
    timings["plan"] = plan_seconds + time.monotonic() - t
    pattern = shard_pattern(plan.pipeline_parallel_size)
    ranks = shardlayout.plan_files(traces, pattern=pattern, max_size=plan.max_file_size)
    layouts = {layout.name: layout for _, ls in ranks for layout in ls}
    scheme = prequantized_scheme(plan)
    try:
        doc = build_document(traces if scheme is None else _fp8().sharding_traces(traces))
    except (ShardingError, KeyError, TypeError, ValueError) as exc:
        raise PlanningFailed(
            f"cannot build the sharding metadata from the planned traces: {exc}",
        ) from None
    (shards / SHARDING_NAME).write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    copied = cv.copy_non_weight_files(model_dir, shards)
    builder = None
    if scheme is not None:  # an FP8 checkpoint: its config.json says so
        from preshard.worker import fp8shards

        (shards / "config.json").write_text(
            json.dumps(fp8shards.published_config(config, scheme), indent=2) + "\n"
        )
        builder = fp8shards.Fp8Builder(traces)
    others = [SHARDING_NAME, *copied]
    planned = [(n, (shards / n).stat().st_size) for n in others]
    planned += [(name, layout.size) for name, layout in layouts.items()]
    total = sum(layout.size for layout in layouts.values())
    largest = max((layout.size for layout in layouts.values()), default=0)
    log.info(
        "planned %d rank file(s), %s, at TP %d x PP %d without an engine (%.1f s)",
        len(layouts),
        format_bytes(total),
        plan.tensor_parallel_size,
        plan.pipeline_parallel_size,
        timings["plan"],
    )
    publication = StreamingPublication(
        shards,
        str(plan.output),
        planned,
        delete_after=frozenset(layouts),
        # the disk bound: a round of files of every rank waiting, plus the one being sent
        max_pending=max(largest, 1) * max(2, len(ranks)),
        owner=plan.owner,
        endpoint_url=req.endpoint_url,
        region=req.region,
        concurrency=req.concurrency,
    )
    try:
        publication.begin()
        handle = publication.start(None)
        for name in others:
            publication.ready(name, _sha256(shards / name))
        reporter.stage("Converting", total_bytes=total)
        t = time.monotonic()

        def on_file(f: shardwriter.WrittenFile) -> None:
            check_written(f, layouts[f.name])
            publication.ready(f.name, f.sha256)
            publication.wait_room()

        report = shardwriter.write_shards(
            traces,
            source,
            shards,
            pattern=pattern,
            max_size=plan.max_file_size,
            on_file=on_file,
            on_bytes=reporter.advance,
            builder=builder,
        )
        publication.finish_writing()
        timings["convert"] = time.monotonic() - t
        t = time.monotonic()
        handle.attach(reporter, "Uploading")
        saved_tensors = sum(len(p.saved) for p, _ in ranks)
        verification = {
            "engineFree": {
                "method": "planned",
                "matched": True,
                "files": len(report.files),
                "savedTensors": saved_tensors,
                "sourceTensorsRead": report.source_reads,
                "sourceBytesRead": report.source_bytes_read,
                "bytesWritten": report.bytes_written,
            }
        }
        # pre-quantized shards do not hold the weights before quantization: no online note
        online = None if scheme else cv.online_record(plan.quantization, config, probe=False)
        if online is not None:
            verification["quantization"] = online
        if scheme is not None:
            verification["engineFree"]["quantizedShards"] = scheme.method
        facts = ConversionFacts(
            vllm_version=installed_vllm()[0] or "",  # whose loaders planned the files
            source_revision=getattr(source, "revision", None),
            detected_quantization=cv.checkpoint_quantization(config),
            verification=verification,
            engine=ENGINE_NONE,
        )
        fields = conversion_fields(plan, facts)
        origin = _resharded_from(source)
        extra: dict[str, Any] = {}
        if origin is not None:  # a re-shard: the manifest records the origin
            extra["reshardedFrom"] = origin
        if scheme is not None:
            extra["quantizedAtConversion"] = {
                "method": scheme.method,
                "scheme": scheme.name,
                "quantizationConfig": scheme.quantization_config(),
            }
        if extra:
            fields["extra"] = extra
        artifact = publication.commit(fields, reporter=reporter)
        timings["upload"] = time.monotonic() - t
    except BaseException as exc:
        cv.abort_publication(publication, exc)
        raise
    timings["total"] = time.monotonic() - t_start
    log.info(
        "engine-free: %d files, %s written, %d source tensors read (%s); %s",
        len(report.files),
        format_bytes(report.bytes_written),
        report.source_reads,
        format_bytes(report.source_bytes_read),
        cv.format_timings(timings),
    )
    return cv.ConvertOutcome(
        artifact=artifact,
        shards_dir=shards,
        timings=timings,
        vllm_version=facts.vllm_version,
        shard_summary=f"{len(report.files)} rank files, {format_bytes(report.bytes_written)}",
        verification=verification,
        engine=ENGINE_NONE,
    )


def _fp8() -> Any:
    from preshard.worker import fp8shards

    return fp8shards


def _resharded_from(source: Any) -> dict[str, Any] | None:
    """``extra.reshardedFrom`` when the source is a published checkpoint (the re-shard
    source's own record of the origin), else None."""
    import importlib

    from preshard.worker.sources import CHECKPOINT_MODULE

    try:
        checkpoint = importlib.import_module(CHECKPOINT_MODULE)
    except ImportError:
        return None
    cls = getattr(checkpoint, "CheckpointSource", None)
    fn = getattr(checkpoint, "resharded_from", None)
    if cls is None or fn is None or not isinstance(source, cls):
        return None
    origin: dict[str, Any] = fn(source)
    return origin


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(8 * 2**20):
            h.update(chunk)
    return h.hexdigest()
