"""The operator <-> worker <-> serving contract, in one place.

Every name here is shared by at least two of: the operator (Job builders), the worker
(the conversion pod's commands), the manifest readers and the serving hand-off. Change
one only together with docs/architecture.md ("Worker <-> operator contract").
"""

from __future__ import annotations

import datetime as dt
import re

# -- exit codes of every ``preshard`` command (the Job's podFailurePolicy reads 3)
EXIT_OK = 0
EXIT_FAILED = 1  # transient or unexpected: the Job retries up to backoffLimit
EXIT_USAGE = 2  # bad command line (argparse)
EXIT_PERMANENT = 3  # bad input, source missing, wrong TP, verification mismatch: no retry

# -- paths inside the conversion pod
WORK_DIR = "/work"  # scratch emptyDir (source copy, shards)
PVC_MOUNT_ROOT = "/mnt/source"  # pvc:// sources, mounted read-only
TERMINATION_LOG = "/dev/termination-log"  # the Result (at most 4 KiB of JSON)
# the serving side's local copy: ``preshard fetch --to /models/<name>``
LOCAL_MODEL_ROOT = "/models"

# -- objects at a published prefix
MANIFEST_NAME = "preshard-manifest.json"  # written last: a prefix without it is no checkpoint
SHARDING_NAME = "preshard-sharding.json"  # per-parameter sharding metadata (listed, hashed)
PUBLICATION_RECORD_NAME = (
    "preshard-publish.json"  # the owner's publication record, during a publish
)

# -- rank files, as vLLM's ShardedStateLoader names them
FILE_PATTERN = "model-rank-{rank}-part-{part}.safetensors"
PP_FILE_PATTERN = "model-pp-{pp_rank}-tp-{tp_rank}-part-{part}.safetensors"
RANK_FILE_RE = re.compile(r"^model-rank-(?P<rank>\d+)-part-(?P<part>\d+)\.safetensors$")
PP_FILE_RE = re.compile(r"^model-pp-(?P<pp>\d+)-tp-(?P<tp>\d+)-part-(?P<part>\d+)\.safetensors$")


def shard_pattern(pipeline_parallel_size: int) -> str:
    """The rank-file name pattern vLLM uses for this pipeline-parallel size."""
    return PP_FILE_PATTERN if pipeline_parallel_size > 1 else FILE_PATTERN


# -- what the rank files hold (manifest ``stateFormat``)
#   "raw":       each rank's parameters as vLLM's weight loaders produced them, BEFORE
#                process_weights_after_loading (platform independent; the serving
#                hardware processes them when it loads). What preshard writes.
#   "processed": vLLM's save_sharded_state after processing, i.e. the kernel layout of
#                the converting hardware (formatVersion 1 checkpoints; only right where
#                processing leaves the layout alone).
STATE_RAW = "raw"
STATE_PROCESSED = "processed"
STATE_FORMATS = (STATE_RAW, STATE_PROCESSED)

# -- vLLM load formats
LOAD_FORMAT_LOCAL = "sharded_state"  # rank files on a local disk (and the reload check)
LOAD_FORMAT_STREAM = "runai_streamer_sharded"  # rank files streamed from S3
LOAD_FORMAT_RAW_SAVE = "preshard_raw"  # preshard's loader plugin: saves raw rank files

# -- source files
SAFETENSORS_SUFFIX = ".safetensors"
# Weights in other formats: never downloaded from a source (vLLM reads the safetensors)
# and never copied next to the shards (the rank files replace every weight file).
OTHER_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
WEIGHT_SUFFIXES = (SAFETENSORS_SUFFIX, *OTHER_WEIGHT_SUFFIXES)
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")

# -- timestamps (manifest createdAt, status times, conditions)
TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def utc_timestamp(when: dt.datetime | None = None) -> str:
    """``2026-12-01T23:45:14Z`` for ``when`` (default: now)."""
    return (when or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).strftime(TIMESTAMP_FORMAT)
