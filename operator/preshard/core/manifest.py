"""``preshard-manifest.json``: the record that makes an S3 prefix a checkpoint.

It is uploaded LAST; a prefix without it is not a checkpoint. It lists every file with
its size and sha256, so readers (``preshard fetch``/``verify``) check integrity
themselves instead of trusting the object store.

Compatibility: ``formatVersion`` is the contract. A reader accepts exactly the versions
it knows (1 and 2), and within a version it is strict: an unknown top-level field (a typo such as
``tensorParalelSize``) is an error, not silently ignored. Additions that older readers
may skip go under the free-form ``extra`` object; anything else is a new formatVersion.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from preshard.core.contract import (
    FILE_PATTERN,
    LOAD_FORMAT_LOCAL,
    MANIFEST_NAME,
    PP_FILE_PATTERN,
    PP_FILE_RE,
    RANK_FILE_RE,
    SHARDING_NAME,
    STATE_FORMATS,
    STATE_PROCESSED,
    STATE_RAW,
)
from preshard.core.plan import MAX_PARALLEL

# convertedOn.engine: which produced the rank files (core.plan's engines minus "auto",
# which a conversion resolves before it runs)
CONVERSION_ENGINES = ("none", "vllm")
CONVERTED_BY_ENGINE = "vllm"  # manifests without convertedOn.engine

__all__ = [
    "FILE_PATTERN",
    "MANIFEST_NAME",
    "PP_FILE_PATTERN",
    "SHARDING_NAME",
    "STATE_FORMATS",
    "STATE_PROCESSED",
    "STATE_RAW",
    "Manifest",
    "ManifestError",
    "ManifestFile",
    "artifact_status",
    "build_manifest",
    "manifest_sha256",
    "parse_shard_filename",
]

FORMAT = "preshard.io/checkpoint-manifest"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
# stateFormat values (STATE_RAW: what preshard writes) and the file names: see
# preshard.core.contract, re-exported here for the readers.
LOAD_FORMAT = LOAD_FORMAT_LOCAL

# Reader bounds: a manifest is read (at most MAX_MANIFEST_BYTES + 1 bytes) and checked
# against these before anything is allocated per rank or file, so a hostile manifest
# costs neither memory nor time, and errors stay short.
MAX_MANIFEST_BYTES = 32 * 2**20
MAX_FILES = 200_000
MAX_FILE_BYTES = 5 * 2**40  # S3's largest object
MAX_KEY_BYTES = 1024
MAX_ERROR_VALUE = 80

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ManifestError(ValueError):
    """The manifest is malformed or does not describe a usable checkpoint."""


# Every top-level field of formatVersion 1 (what Manifest.to_json writes).
FIELDS = frozenset(
    {
        "format",
        "formatVersion",
        "createdAt",
        "owner",
        "source",
        "tensorParallelSize",
        "pipelineParallelSize",
        "quantization",
        "dtype",
        "vllmVersion",
        "loadFormat",
        "filePattern",
        "totalBytes",
        "files",
        "extra",
    }
)
# formatVersion 2 adds these.
FIELDS_V2 = FIELDS | {"stateFormat", "convertedOn", "sharding", "identity", "verification"}


def _short(value: Any) -> str:
    """repr(value) for an error message, cut to MAX_ERROR_VALUE characters."""
    text = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return text if len(text) <= MAX_ERROR_VALUE else text[:MAX_ERROR_VALUE] + "..."


def _cut(text: str) -> str:
    """``text`` (a key) for an error message, cut to MAX_ERROR_VALUE characters."""
    return text if len(text) <= MAX_ERROR_VALUE else text[:MAX_ERROR_VALUE] + "..."


def _int(value: Any, what: str) -> int:
    """A JSON integer (not a bool, float or string); ValueError naming the field."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} {_short(value)} is not an integer")
    return value


def _ranks(ranks: list[int], limit: int = 10) -> str:
    shown = ", ".join(map(str, ranks[:limit]))
    return f"[{shown}{f', ... ({len(ranks)} in all)' if len(ranks) > limit else ''}]"


def _opt_str(data: dict[str, Any], name: str) -> str | None:
    value = data.get(name)
    if value is not None and not isinstance(value, str):
        raise ManifestError(
            f"manifest field {name!r} must be a string or null, not {_short(value)}"
        )
    return value


def parse_shard_filename(name: str, tensor_parallel_size: int = 1) -> tuple[int, int] | None:
    """(global rank, part) of a shard file name, or None for a non-shard file.

    The PP form's global rank is ``pp_rank * tensor_parallel_size + tp_rank``.
    """
    m = RANK_FILE_RE.match(name)
    if m:
        return int(m["rank"]), int(m["part"])
    m = PP_FILE_RE.match(name)
    if m:
        return int(m["pp"]) * tensor_parallel_size + int(m["tp"]), int(m["part"])
    return None


def _shard_of(key: str, tp: int, pp: int) -> tuple[int, int] | None:
    """(global rank, part) of a shard key in a TP x PP manifest; ManifestError for a shard
    of another parallel size (a rank, or a PP/TP index, outside TP x PP)."""
    name = key.rsplit("/", 1)[-1]
    parsed = parse_shard_filename(name, tp)
    if parsed is None:
        return None
    m = PP_FILE_RE.match(name)
    if m and (int(m["pp"]) >= pp or int(m["tp"]) >= tp):
        raise ManifestError(
            f"{key}: shard of PP rank {int(m['pp'])}, TP rank {int(m['tp'])} is outside "
            f"TP {tp} x PP {pp} (shards of another parallel size?)"
        )
    if parsed[0] >= tp * pp:
        raise ManifestError(
            f"{key}: rank {parsed[0]} is outside TP {tp} x PP {pp} "
            "(shards of another parallel size?)"
        )
    return parsed


def _check_key(key: str) -> None:
    if len(key.encode()) > MAX_KEY_BYTES:
        raise ManifestError(f"invalid file key {_short(key)}: longer than {MAX_KEY_BYTES} bytes")
    if not key or key.startswith("/") or "\\" in key or "\0" in key:
        raise ManifestError(f"invalid file key {_short(key)}")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise ManifestError(f"invalid file key {_short(key)}: empty, '.' or '..' segment")
    if key == MANIFEST_NAME:
        raise ManifestError("the manifest cannot list itself")


@dataclass(frozen=True)
class ManifestFile:
    key: str
    size: int
    sha256: str
    rank: int | None = None
    part: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self.key, "size": self.size, "sha256": self.sha256}
        if self.rank is not None:
            out["rank"] = self.rank
            out["part"] = self.part
        return out


@dataclass(frozen=True)
class Manifest:
    source_uri: str
    tensor_parallel_size: int
    pipeline_parallel_size: int
    vllm_version: str
    files: tuple[ManifestFile, ...]
    dtype: str = "auto"
    quantization: str | None = None
    source_revision: str | None = None
    owner: str | None = None
    file_pattern: str = FILE_PATTERN
    load_format: str = LOAD_FORMAT
    created_at: str | None = None
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    # formatVersion 2
    state_format: str = STATE_RAW
    # where and how it was converted: {"platform": "cpu"|"cuda"|..., "device": "...",
    # "engine": "none"|"vllm"} (no "engine": written before the engine-free path, i.e.
    # by a vLLM engine)
    converted_on: dict[str, Any] = field(default_factory=dict)
    # key of the sharding metadata file (one of ``files``), or None
    sharding_key: str | None = None
    # the conversion identity (preshard.core), or None
    identity: str | None = None
    # what the conversion verified (summary), or None
    verification: dict[str, Any] | None = None

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def engine(self) -> str:
        """Which engine produced the rank files: "none" (planned from vLLM's weight
        loaders and streamed from the source) or "vllm" (a vLLM engine loaded the model;
        every manifest written before convertedOn.engine existed)."""
        return str(self.converted_on.get("engine") or CONVERTED_BY_ENGINE)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def file(self, key: str) -> ManifestFile | None:
        for f in self.files:
            if f.key == key:
                return f
        return None

    def rank_files(self, rank: int) -> list[ManifestFile]:
        return [f for f in self.files if f.rank == rank]

    def shard_files(self) -> list[ManifestFile]:
        return [f for f in self.files if f.rank is not None]

    def other_files(self) -> list[ManifestFile]:
        return [f for f in self.files if f.rank is None]

    def missing_ranks(self) -> list[int]:
        present = {f.rank for f in self.files if f.rank is not None}
        return [r for r in range(self.world_size) if r not in present]

    def expected_rank_files_present(self) -> bool:
        return not self.missing_ranks()

    def to_json(self) -> str:
        data: dict[str, Any] = {
            "format": FORMAT,
            "formatVersion": self.format_version,
            "createdAt": self.created_at,
            "owner": self.owner,
            "source": {"uri": self.source_uri, "revision": self.source_revision},
            "tensorParallelSize": self.tensor_parallel_size,
            "pipelineParallelSize": self.pipeline_parallel_size,
            "quantization": self.quantization,
            "dtype": self.dtype,
            "vllmVersion": self.vllm_version,
            "loadFormat": self.load_format,
            "filePattern": self.file_pattern,
            "totalBytes": self.total_bytes,
            "files": [f.to_json() for f in sorted(self.files, key=lambda f: f.key)],
        }
        if self.format_version >= 2:
            data["stateFormat"] = self.state_format
            data["convertedOn"] = self.converted_on
            data["sharding"] = {"key": self.sharding_key} if self.sharding_key else None
            data["identity"] = self.identity
            data["verification"] = self.verification
        if self.extra:
            data["extra"] = self.extra
        return json.dumps(data, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        if len(text) > MAX_MANIFEST_BYTES:
            raise ManifestError(
                f"manifest is larger than {MAX_MANIFEST_BYTES // 2**20} MiB (not a preshard manifest?)"
            )
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise ManifestError(f"manifest is not valid JSON: {str(exc)[:200]}") from None
        if not isinstance(data, dict):
            raise ManifestError("manifest is not a JSON object")
        if data.get("format") != FORMAT:
            raise ManifestError(f"not a preshard manifest (format {_short(data.get('format'))})")
        version = data.get("formatVersion")
        if isinstance(version, bool) or version not in READABLE_VERSIONS:
            raise ManifestError(
                f"unsupported manifest formatVersion {_short(version)} (this preshard reads "
                f"{', '.join(map(str, READABLE_VERSIONS))})"
            )
        known = FIELDS_V2 if version >= 2 else FIELDS
        unknown = sorted(set(data) - known)
        if unknown:
            raise ManifestError(
                f"manifest has unknown field(s) {_cut(', '.join(map(repr, unknown)))} "
                f"(formatVersion {version}; extensions belong in 'extra')"
            )
        v2 = _v2_fields(data) if version >= 2 else {"state_format": STATE_PROCESSED}
        try:
            tp = _int(data["tensorParallelSize"], "tensorParallelSize")
            pp = _int(data.get("pipelineParallelSize", 1), "pipelineParallelSize")
            total = _int(data["totalBytes"], "totalBytes") if "totalBytes" in data else None
            source = data["source"]
            raw_files = data["files"]
            vllm_version = str(data["vllmVersion"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(
                f"manifest is missing or has a bad field: {str(exc)[:200]}"
            ) from None
        if tp < 1 or pp < 1:
            raise ManifestError("manifest parallel sizes must be >= 1")
        if tp > MAX_PARALLEL or pp > MAX_PARALLEL:
            raise ManifestError(
                f"manifest parallel sizes must be at most {MAX_PARALLEL} "
                f"(tensorParallelSize {_short(tp)}, pipelineParallelSize {_short(pp)})"
            )
        extra = data.get("extra")
        if extra is not None and not isinstance(extra, dict):
            raise ManifestError("manifest field 'extra' must be an object")
        if not isinstance(raw_files, list) or not raw_files:
            raise ManifestError("manifest lists no files")
        if len(raw_files) > MAX_FILES:
            raise ManifestError(f"manifest lists {len(raw_files)} files (at most {MAX_FILES})")

        files: list[ManifestFile] = []
        seen: set[str] = set()
        for raw in raw_files:
            try:
                key, sha = str(raw["key"]), str(raw["sha256"])
                size = _int(raw["size"], "size")
            except (KeyError, TypeError, ValueError) as exc:
                raise ManifestError(f"manifest file entry is malformed: {str(exc)[:200]}") from None
            _check_key(key)
            if key in seen:
                raise ManifestError(f"manifest lists {_short(key)} twice")
            seen.add(key)
            if not 0 <= size <= MAX_FILE_BYTES:
                what = "negative size" if size < 0 else f"size {_short(size)} is over 5 TiB"
                raise ManifestError(f"{_cut(key)}: {what}")
            if not _SHA256.match(sha):
                raise ManifestError(
                    f"{_cut(key)}: sha256 {_short(sha)} is not 64 lowercase hex digits"
                )
            parsed = _shard_of(key, tp, pp)
            files.append(
                ManifestFile(
                    key, size, sha, parsed[0] if parsed else None, parsed[1] if parsed else None
                )
            )
        m = cls(
            source_uri=str(source.get("uri", "")) if isinstance(source, dict) else "",
            source_revision=_opt_str(source, "revision") if isinstance(source, dict) else None,
            tensor_parallel_size=tp,
            pipeline_parallel_size=pp,
            quantization=_opt_str(data, "quantization"),
            dtype=str(data.get("dtype", "auto")),
            vllm_version=vllm_version,
            files=tuple(files),
            owner=_opt_str(data, "owner"),
            file_pattern=str(data.get("filePattern", FILE_PATTERN)),
            load_format=str(data.get("loadFormat", LOAD_FORMAT)),
            created_at=_opt_str(data, "createdAt"),
            extra=extra or {},
            format_version=version,
            **v2,
        )
        if m.sharding_key is not None and m.file(m.sharding_key) is None:
            raise ManifestError(
                f"manifest names sharding metadata {m.sharding_key!r} that it does not list"
            )
        if total is not None and total != m.total_bytes:
            raise ManifestError("manifest totalBytes does not equal the sum of file sizes")
        missing = m.missing_ranks()
        if missing:
            raise ManifestError(
                f"manifest has no shard files for rank(s) {_ranks(missing)} of "
                f"{m.world_size} (TP {tp} x PP {pp})"
            )
        return m


def _v2_fields(data: dict[str, Any]) -> dict[str, Any]:
    state = data.get("stateFormat")
    if state not in STATE_FORMATS:
        raise ManifestError(
            f"manifest stateFormat {_short(state)} is not one of {', '.join(STATE_FORMATS)}"
        )
    converted_on = data.get("convertedOn") or {}
    if not isinstance(converted_on, dict):
        raise ManifestError("manifest field 'convertedOn' must be an object")
    engine = converted_on.get("engine")
    if engine is not None and engine not in CONVERSION_ENGINES:
        raise ManifestError(
            f"manifest convertedOn.engine {_short(engine)} is not one of "
            f"{', '.join(CONVERSION_ENGINES)}"
        )
    sharding = data.get("sharding")
    sharding_key = None
    if sharding is not None:
        if not isinstance(sharding, dict) or not isinstance(sharding.get("key"), str):
            raise ManifestError("manifest field 'sharding' must be an object with a 'key'")
        sharding_key = sharding["key"]
        _check_key(sharding_key)
    verification = data.get("verification")
    if verification is not None and not isinstance(verification, dict):
        raise ManifestError("manifest field 'verification' must be an object or null")
    return {
        "state_format": state,
        "converted_on": converted_on,
        "sharding_key": sharding_key,
        "identity": _opt_str(data, "identity"),
        "verification": verification,
    }


def build_manifest(files: list[tuple[str, int, str]], **fields: Any) -> Manifest:
    """A manifest from (key, size, sha256) tuples; ranks are parsed from the names."""
    tp = int(fields.get("tensor_parallel_size", 1))
    entries = []
    for key, size, sha in files:
        _check_key(key)
        parsed = parse_shard_filename(key.rsplit("/", 1)[-1], tp)
        entries.append(
            ManifestFile(
                key, size, sha, parsed[0] if parsed else None, parsed[1] if parsed else None
            )
        )
    return Manifest(files=tuple(sorted(entries, key=lambda f: f.key)), **fields)


def manifest_sha256(text: str | bytes) -> str:
    data = text.encode() if isinstance(text, str) else text
    return hashlib.sha256(data).hexdigest()


def artifact_status(manifest: Manifest, uri: str, manifest_text: str | bytes) -> dict[str, Any]:
    """The ``status.artifact`` object for a published manifest."""
    base = uri if uri.endswith("/") else uri + "/"
    return {
        "uri": base,
        "manifestUri": base + MANIFEST_NAME,
        "files": len(manifest.files),
        "totalBytes": manifest.total_bytes,
        "manifestSha256": manifest_sha256(manifest_text),
        "vllmVersion": manifest.vllm_version,
        "tensorParallelSize": manifest.tensor_parallel_size,
        "pipelineParallelSize": manifest.pipeline_parallel_size,
        "stateFormat": manifest.state_format,
        "engine": manifest.engine,
    }
