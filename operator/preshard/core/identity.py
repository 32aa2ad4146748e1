"""The conversion identity: one value that says whether two conversions produce the same
checkpoint.

``sha256:<hex>`` over a canonical JSON of exactly what determines the published bytes:

* the source: its URI (normalised), where it lives and what pins its content: the S3
  endpoint of an ``s3://`` source (normalised: the AWS endpoints are one store), the
  namespace of a ``pvc://`` source (a claim name means another claim in each namespace),
  the resolved revision (``hf://`` commit) and the digest of the source files (names,
  sizes and ETags for S3; sha256 of every file for PVC and local sources), as the
  preflight Job reported them (``preshard convert --source-digest`` then refuses a source
  that differs: SourceChanged);
* tensor- and pipeline-parallel size, quantization, dtype;
* the state format (``raw``: weights before ``process_weights_after_loading``);
* the vLLM version of the converter image (shards are written by that vLLM's model code);
* the file pattern and ``maxFileSize`` (they decide the file names and splits).

Not part of it, by design (tests pin each): the owner, the resource's name and namespace,
the output prefix, credentials, the output's endpoint and the regions, ``verify``,
``deletionPolicy`` and the converter's resources, image pull policy, node placement and
environment. Two resources that differ only in those get the same checkpoint, so one may
adopt or copy the other's (where the operator's copy policy allows it, and only after the
copy was checked against the requester's own source: docs/security.md).

A ``formatVersion`` field inside the hashed document lets a future preshard change what
counts without two different meanings sharing one value.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from preshard.core.contract import STATE_RAW
from preshard.core.spec import CheckpointSpec

IDENTITY_VERSION = 2
PREFIX = "sha256:"
AWS = "aws"  # every AWS S3 endpoint (and no endpoint at all) reaches one bucket namespace
_AWS_HOST = re.compile(r"^s3([.-](dualstack\.)?[a-z0-9-]+)?\.amazonaws\.com(\.cn)?$")


@dataclass(frozen=True)
class SourcePin:
    """What the preflight learnt about the source's content."""

    revision: str | None  # hf:// commit, else None
    digest: str  # "sha256:<hex>" of the file list, or the commit for hf://


def normalise_endpoint(url: str | None) -> str:
    """One spelling per S3 store: lower-case scheme and host, no credentials, no default
    port, no trailing slash; every AWS S3 endpoint (and none) is ``aws``."""
    if not url:
        return AWS
    parts = urlsplit(url.strip())
    host = (parts.hostname or "").lower()
    if _AWS_HOST.match(host):
        return AWS
    scheme = (parts.scheme or "https").lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is not None and (scheme, port) not in (("http", 80), ("https", 443)):
        host = f"{host}:{port}"
    path = parts.path.rstrip("/")
    return f"{scheme}://{host}{path}"


def source_location(
    spec: CheckpointSpec, namespace: str, source_endpoint: str | None
) -> dict[str, Any]:
    """Where the source lives, beyond its URI: the store of an ``s3://`` source, the
    namespace of a ``pvc://`` claim (nothing more for ``hf://``: the commit pins it)."""
    src = spec.source.parsed
    if src.scheme == "s3":
        return {"endpoint": normalise_endpoint(source_endpoint)}
    if src.scheme == "pvc":
        return {"namespace": namespace}
    return {}


def identity_document(
    spec: CheckpointSpec,
    source: SourcePin,
    vllm_version: str,
    state_format: str = STATE_RAW,
    *,
    namespace: str,
    source_endpoint: str | None = None,
    engine: str | None = None,
) -> dict[str, Any]:
    """The canonical document the identity hashes (also useful to explain a mismatch):
    the spec's conversion plan (preshard.core.plan) and what pins its inputs.
    ``namespace``: the resource's; ``source_endpoint``: the S3 endpoint the source is
    read from (the spec's source endpoint, else the output's, else the default);
    ``engine``: the effective engine (the spec's, else the operator's default), which
    decides whether an FP8 method's rank files are pre-quantized."""
    plan = spec.plan(engine=engine)
    src = plan.source
    return {
        "identityVersion": IDENTITY_VERSION,
        "source": {
            # hf://org/name@branch and @commit resolve to one commit: the URI without the
            # revision plus the commit is what pins it.
            "uri": f"hf://{src.authority}" if src.scheme == "hf" else str(src),
            **source_location(spec, namespace, source_endpoint),
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
        # pre-quantized FP8 rank files are other bytes than the same method's raw weights
        **({"weights": "quantized"} if plan.quantized_shards else {}),
    }


def conversion_identity(
    spec: CheckpointSpec,
    source: SourcePin,
    vllm_version: str,
    state_format: str = STATE_RAW,
    *,
    namespace: str,
    source_endpoint: str | None = None,
    engine: str | None = None,
) -> str:
    doc = identity_document(
        spec,
        source,
        vllm_version,
        state_format,
        namespace=namespace,
        source_endpoint=source_endpoint,
        engine=engine,
    )
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
