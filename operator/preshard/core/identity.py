"""The conversion identity: one value that says whether two conversions produce the same
checkpoint.

``sha256:<hex>`` over a canonical JSON of exactly what determines the published bytes:

* the source: its URI (normalised) and what pins its content: the resolved revision
  (``hf://`` commit) and the digest of the source files (names, sizes and ETags for S3;
  sha256 of every file for PVC and local sources), as the preflight Job reported them;
* tensor- and pipeline-parallel size, quantization, dtype;
* the state format (``raw``: weights before ``process_weights_after_loading``);
* the vLLM version of the converter image (shards are written by that vLLM's model code);
* the file pattern and ``maxFileSize`` (they decide the file names and splits).

Not part of it, by design (tests pin each): the owner, the resource's name and namespace,
the output prefix, credentials, endpoints and regions, ``verify``, ``deletionPolicy`` and
the converter's resources, image pull policy, node placement and environment. Two
resources that differ only in those get the same checkpoint, so one may adopt or copy the
other's.

A ``formatVersion`` field inside the hashed document lets a future preshard change what
counts without two different meanings sharing one value.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from preshard.core.contract import STATE_RAW
from preshard.core.spec import CheckpointSpec

IDENTITY_VERSION = 1
PREFIX = "sha256:"


@dataclass(frozen=True)
class SourcePin:
    """What the preflight learnt about the source's content."""

    revision: str | None  # hf:// commit, else None
    digest: str  # "sha256:<hex>" of the file list, or the commit for hf://


def identity_document(
    spec: CheckpointSpec, source: SourcePin, vllm_version: str, state_format: str = STATE_RAW
) -> dict[str, Any]:
    """The canonical document the identity hashes (also useful to explain a mismatch):
    the spec's conversion plan (preshard.core.plan) and what pins its inputs."""
    plan = spec.plan()
    src = plan.source
    return {
        "identityVersion": IDENTITY_VERSION,
        "source": {
            # hf://org/name@branch and @commit resolve to one commit: the URI without the
            # revision plus the commit is what pins it.
            "uri": f"hf://{src.authority}" if src.scheme == "hf" else str(src),
            "revision": source.revision,
            "digest": source.digest,
        },
        **plan.layout.status(),
        "quantization": plan.quantization,
        "dtype": plan.dtype,
        "stateFormat": state_format,
        "vllmVersion": vllm_version,
        "filePattern": plan.layout.file_pattern,
        "maxFileSize": plan.max_file_size,
    }


def conversion_identity(
    spec: CheckpointSpec, source: SourcePin, vllm_version: str, state_format: str = STATE_RAW
) -> str:
    doc = identity_document(spec, source, vllm_version, state_format)
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return PREFIX + hashlib.sha256(blob.encode()).hexdigest()


def files_digest(entries: list[tuple[str, int, str]]) -> str:
    """Digest of a source's files: (name, size, ETag or sha256), order-independent."""
    rows = sorted([str(n), int(s), str(t)] for n, s, t in entries)
    blob = json.dumps(rows, separators=(",", ":"), ensure_ascii=True)
    return PREFIX + hashlib.sha256(blob.encode()).hexdigest()


def is_identity(value: object) -> bool:
    return (
        isinstance(value, str)
        and value.startswith(PREFIX)
        and len(value) == len(PREFIX) + 64
        and all(c in "0123456789abcdef" for c in value[len(PREFIX) :])
    )
