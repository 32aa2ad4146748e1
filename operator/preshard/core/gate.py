"""The serving gate: may this vLLM load this published checkpoint as it is configured?

``preshard fetch`` (local copy) and ``preshard check`` (before streaming with
``runai_streamer_sharded``) run these checks before vLLM starts, because vLLM itself
checks little: its sharded loader only *warns* when a saved tensor is smaller than the
parameter (shards of another TP size load as a half-filled model), and it never looks
at preshard's manifest.

All checks are pure (no I/O): the caller passes the manifest bytes, the serving
configuration and what it found about the serving vLLM. Each refusal is a permanent
:class:`GateError` with a PascalCase reason and a message that says what to do.

1. **Pin** (:func:`check_pin`): the manifest's sha256 must equal the pinned value (the
   serving ConfigMap's ``MANIFEST_SHA256``, i.e. ``status.artifact.manifestSha256``).
   With the pin, replacing a shard *and* rewriting the manifest to match is caught: the
   manifest lists every file's sha256, so the pin covers every byte ``fetch`` checks.
2. **Parallelism** (:func:`check_parallelism`): serving TP and PP equal the checkpoint's.
3. **State format** (:func:`check_loadable`):
   * ``stateFormat: raw`` (weights before ``process_weights_after_loading``) loads with
     stock ``sharded_state`` on any platform, in any vLLM from :data:`MIN_VLLM_RAW` on
     (the oldest vLLM this project has loaded such shards with; the loader has existed
     since 0.4.3, but untested versions are refused rather than trusted);
     ``runai_streamer_sharded`` from :data:`MIN_VLLM_STREAMER` on; PP file names
     (``model-pp-*``) need a vLLM whose sharded loader knows them (:data:`MIN_VLLM_PP`).
   * ``stateFormat: processed`` (formatVersion 1: ``save_sharded_state`` after
     processing, the kernel layout of the converting hardware) loads only on the platform
     and device type it was converted on, with the same vLLM version; a manifest that
     does not record them (every formatVersion 1 manifest) is refused: re-convert.
4. **Objects** (:func:`object_problems`): every listed object exists with its size
   (the caller HEADs them; no download).
5. **What the streamer will see** (:func:`streamer_listing_problems`): vLLM finds S3
   shards with ONE ``ListObjectsV2`` call (no pagination: the first 1000 keys under the
   prefix) and a ``*model-rank-{rank}-part-*.safetensors`` match, which also matches
   keys in nested prefixes; so every shard of the manifest must be in that first page,
   and no other shard-named object may be under the prefix.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from preshard.core.contract import LOAD_FORMAT_LOCAL, LOAD_FORMAT_STREAM
from preshard.core.errors import (
    ManifestPinMismatch,
    PipelineParallelSizeMismatch,
    PlatformUnknown,
    ShardNamesIncompatible,
    StateFormatIncompatible,
    TensorParallelSizeMismatch,
    UsageError,
    VllmNotFound,
    VllmTooOld,
    VllmVersionUnknown,
)
from preshard.core.manifest import (
    STATE_PROCESSED,
    STATE_RAW,
    Manifest,
    ManifestFile,
    manifest_sha256,
    parse_shard_filename,
)

LOAD_FORMATS = (LOAD_FORMAT_LOCAL, LOAD_FORMAT_STREAM)

# Oldest vLLM versions the gate accepts, per what needs them. 0.32.0 is the version the
# project's tests load raw shards with (sharded_state and runai_streamer_sharded, TP=2,
# PP=2); older versions are refused rather than trusted (runai_streamer_sharded exists
# since 0.8.5 but could not parse shard file names until a fix in late 2025).
MIN_VLLM_RAW = (0, 32, 0)
MIN_VLLM_STREAMER = (0, 32, 0)
MIN_VLLM_PP = (0, 32, 0)

_PIN = re.compile(r"^[0-9a-f]{64}$")
_VERSION = re.compile(r"^(\d+)\.(\d+)(?:\.(\d+))?")


def valid_pin(value: str) -> bool:
    return bool(_PIN.match(value))


def parse_version(version: str) -> tuple[int, int, int] | None:
    """(major, minor, patch) of a vLLM version string (``0.32.0``, ``0.32.0+cpu``,
    ``0.33.0rc1``, ``0.11.1.dev12``), or None when it is not one."""
    m = _VERSION.match(version.strip())
    if not m:
        return None
    return int(m[1]), int(m[2]), int(m[3] or 0)


def _fmt(v: tuple[int, int, int]) -> str:
    return ".".join(map(str, v))


# ------------------------------------------------------------------------------ checks


def check_pin(manifest_bytes: bytes, pin: str, uri: str) -> None:
    """The manifest's bytes hash to the pinned sha256."""
    if not valid_pin(pin):
        raise UsageError(
            f"--manifest-sha256 {pin[:80]!r} is not 64 lowercase hex digits",
        )
    got = manifest_sha256(manifest_bytes)
    if got != pin:
        raise ManifestPinMismatch(
            f"the manifest of {uri} has sha256 {got}, not the pinned {pin}: the checkpoint "
            "was replaced or changed after it was published. Do not serve it; re-apply the "
            "ShardedCheckpoint (or re-pin to status.artifact.manifestSha256 if the change "
            "was yours)",
        )


def check_parallelism(
    manifest: Manifest, tensor_parallel_size: int, pipeline_parallel_size: int
) -> None:
    """Serving TP and PP equal the checkpoint's (vLLM would load shards of another size
    half-filled, with only a warning)."""
    tp, pp = manifest.tensor_parallel_size, manifest.pipeline_parallel_size
    if tensor_parallel_size != tp:
        raise TensorParallelSizeMismatch(
            f"this checkpoint was sharded for tensor-parallel size {tp}, not "
            f"{tensor_parallel_size}: serve it with --tensor-parallel-size {tp} (and "
            f"{tp * pp} GPUs), or create a ShardedCheckpoint for TP {tensor_parallel_size}",
        )
    if pipeline_parallel_size != pp:
        raise PipelineParallelSizeMismatch(
            f"this checkpoint was sharded for pipeline-parallel size {pp}, not "
            f"{pipeline_parallel_size}: serve it with --pipeline-parallel-size {pp}, or "
            f"create a ShardedCheckpoint for PP {pipeline_parallel_size}",
        )


@dataclass(frozen=True)
class ServingVllm:
    """What the gate knows about the vLLM that will load the checkpoint."""

    version: str | None  # the installed vLLM's version; None: no vLLM found
    platform: str | None = None  # "cuda", "rocm", "cpu", ...; None: not determined
    device: str | None = None  # e.g. "NVIDIA H100 80GB HBM3"; None: not determined


def needs_platform(manifest: Manifest) -> bool:
    """Whether :func:`check_loadable` needs the serving platform and device (only for
    processed state: finding them imports vLLM and torch)."""
    return manifest.state_format == STATE_PROCESSED


def check_loadable(manifest: Manifest, serving: ServingVllm, load_format: str) -> None:
    """The serving vLLM can load this state format and version with ``load_format``."""
    if load_format not in LOAD_FORMATS:
        raise UsageError(
            f"load format {load_format!r} cannot load preshard checkpoints (use "
            f"{' or '.join(LOAD_FORMATS)})",
        )
    if serving.version is None:
        raise VllmNotFound(
            "no vLLM is installed here, so it cannot be checked that the serving vLLM can "
            "load this checkpoint: run this in the serving image, or pass "
            "--serving-vllm-version with the serving container's vLLM version",
        )
    have = parse_version(serving.version)
    if have is None:
        raise VllmVersionUnknown(f"cannot read the vLLM version {serving.version[:40]!r}")
    _check_file_names(manifest)
    if manifest.state_format == STATE_RAW:
        need = MIN_VLLM_RAW
        what = "raw shards with sharded_state"
        if load_format == LOAD_FORMAT_STREAM and need < MIN_VLLM_STREAMER:
            need, what = MIN_VLLM_STREAMER, "shards with runai_streamer_sharded"
        if manifest.pipeline_parallel_size > 1 and need < MIN_VLLM_PP:
            need, what = MIN_VLLM_PP, "pipeline-parallel shard files (model-pp-*)"
        if have < need:
            raise VllmTooOld(
                f"vLLM {serving.version} is older than {_fmt(need)}, the oldest vLLM that "
                f"loads {what} as preshard has tested: serve with vLLM >= {_fmt(need)}",
            )
        return
    # processed: the converting hardware's kernel layout
    conv_platform = str(manifest.converted_on.get("platform") or "") or None
    conv_device = str(manifest.converted_on.get("device") or "") or None
    redo = (
        "re-convert it with this preshard (it writes raw, platform-independent shards): "
        "delete and re-apply the ShardedCheckpoint, or apply one with a new output prefix"
    )
    if conv_platform is None:
        raise StateFormatIncompatible(
            "this checkpoint holds processed weights (formatVersion "
            f"{manifest.format_version}: the kernel layout of the hardware it was converted "
            "on) and does not record that hardware, so no serving platform can be shown to "
            f"load it correctly; {redo}",
        )
    if parse_version(manifest.vllm_version) != have:
        raise StateFormatIncompatible(
            f"this checkpoint holds processed weights saved by vLLM {manifest.vllm_version}; "
            f"the serving vLLM is {serving.version}, whose kernels may expect another "
            f"layout: serve with vLLM {manifest.vllm_version}, or {redo}",
        )
    if serving.platform is None:
        raise PlatformUnknown(
            "this checkpoint holds processed weights and the serving platform could not be "
            "determined here: run the check in the serving image on the serving node",
        )
    mismatch = serving.platform != conv_platform or (
        conv_device is not None and serving.device != conv_device
    )
    if mismatch:
        was = conv_platform + (f" ({conv_device})" if conv_device else "")
        now = serving.platform + (f" ({serving.device})" if serving.device else "")
        raise StateFormatIncompatible(
            f"this checkpoint holds processed weights in the kernel layout of {was}; this "
            f"node is {now}, where they would load wrong or not at all: serve on {was}, or "
            f"{redo}",
        )


def _check_file_names(manifest: Manifest) -> None:
    """vLLM's sharded loader looks for ``model-pp-{pp}-tp-{tp}-part-*`` when PP > 1 and
    ``model-rank-{rank}-part-*`` otherwise; shard files named the other way are not found."""
    pp = manifest.pipeline_parallel_size
    for f in manifest.shard_files():
        name = f.key.rsplit("/", 1)[-1]
        if name.startswith("model-pp-") != (pp > 1):
            expected = (
                "model-pp-{pp}-tp-{tp}-part-{part}" if pp > 1 else "model-rank-{rank}-part-{part}"
            )
            raise ShardNamesIncompatible(
                f"{f.key} is not named as vLLM's sharded loader looks for shards at "
                f"PP {pp} ({expected}.safetensors): vLLM would not find it; re-convert the "
                "checkpoint with this preshard",
            )


def object_problems(files: list[ManifestFile], sizes: Mapping[str, int | None]) -> list[str]:
    """One line per listed object that is missing (size None) or has another size."""
    out = []
    for f in files:
        got = sizes.get(f.key)
        if got is None:
            out.append(f"{f.key}: missing")
        elif got != f.size:
            out.append(f"{f.key}: size {got} != manifest {f.size}")
    return out


def streamer_listing_problems(manifest: Manifest, first_page: list[str]) -> list[str]:
    """Problems with what ``runai_streamer_sharded`` will list: ``first_page`` is the
    keys (relative to the prefix) of one ListObjectsV2 call, as vLLM makes it."""
    listed = set(first_page)
    problems = []
    beyond = [f.key for f in manifest.shard_files() if f.key not in listed]
    if beyond:
        problems.append(
            f"{len(beyond)} shard file(s) (e.g. {beyond[0]}) are not among the first "
            f"{len(first_page)} objects of the prefix, the only ones vLLM lists (it does not "
            "paginate): stream a prefix with fewer objects, or use the local copy "
            "(preshard fetch + sharded_state)"
        )
    known = {f.key for f in manifest.files}
    extra = sorted(
        k for k in first_page if k not in known and parse_shard_filename(k.rsplit("/", 1)[-1])
    )
    if extra:
        problems.append(
            f"shard-named objects that are not part of this checkpoint are under the prefix "
            f"({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''}): vLLM would load them "
            "too; remove them or publish the checkpoint under its own prefix"
        )
    return problems


# --------------------------------------------------------------------- multi-node ranks


def node_ranks(manifest: Manifest, nodes: int, node_rank: int) -> list[int]:
    """The global ranks the vLLM on node ``node_rank`` of ``nodes`` runs.

    vLLM (multiprocessing backend, ``--nnodes M --node-rank K``) gives node K the
    ``world/M`` consecutive global ranks from ``K * world/M``, and numbers ranks with TP
    innermost (``rank = pp_rank * TP + tp_rank``). So with TP = GPUs per node and PP =
    nodes, node K holds exactly pipeline stage K; with TP across nodes, node K holds TP
    ranks ``K*TP/M .. (K+1)*TP/M - 1``.
    """
    world = manifest.world_size
    if nodes < 1 or not 0 <= node_rank < nodes:
        raise UsageError(
            f"--node-rank {node_rank} must be in 0..{max(nodes, 1) - 1} (--nodes {nodes})",
        )
    if world % nodes:
        raise UsageError(
            f"--nodes {nodes} does not divide this checkpoint's {world} ranks "
            f"(TP {manifest.tensor_parallel_size} x PP {manifest.pipeline_parallel_size}): "
            "every node runs the same number of ranks",
        )
    per = world // nodes
    return list(range(node_rank * per, (node_rank + 1) * per))


def files_for_ranks(manifest: Manifest, ranks: list[int]) -> list[ManifestFile]:
    """The shard files of ``ranks`` plus every non-shard file (config, tokenizer, ...)."""
    wanted = set(ranks)
    return [f for f in manifest.files if f.rank is None or f.rank in wanted]
