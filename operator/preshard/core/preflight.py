"""The preflight Job's findings (pure): what ``preshard preflight`` reports about the
source (its pinned content, the parts of config.json later checks need), the converter
image's vLLM version and the state of the output prefix, parsed as bounded tenant input.
:mod:`preshard.core.steps` picks the next step from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from preshard.core.identity import SourcePin
from preshard.core.modelconfig import model_config

PREFLIGHT_KIND = "preflight"

# Output prefix states the preflight reports.
EMPTY, INCOMPLETE, MANIFEST, INVALID = "empty", "incomplete", "manifest", "invalid"


@dataclass(frozen=True)
class OutputManifest:
    owner: str | None
    identity: str | None
    sha256: str
    etag: str | None = None
    complete: bool = False  # every listed object exists with its size
    # the operator's ledger records this manifest (sha256) as published by this owner
    # (set by the service, never from the preflight's report)
    proven: bool = False


@dataclass(frozen=True)
class Overlap:
    key: str  # the other manifest's key (relative names only: same bucket)
    owner: str | None
    relation: Literal["nested", "parent"]
    kind: Literal["manifest", "publication"] = "manifest"  # an unfinished publication


@dataclass(frozen=True)
class Preflight:
    source: SourcePin
    vllm_version: str
    state: str
    manifest: OutputManifest | None = None
    overlaps: tuple[Overlap, ...] = ()
    config: dict[str, Any] = field(default_factory=dict)
    # why config.json's numbers cannot be used (InvalidModelConfig), or None
    config_error: str | None = None
    # the kernel probe on the node type that converts (worker.engine.kernels): {method: None
    # (it has a kernel) | the kernel's own reason}; None: not probed (static fallback)
    kernels: dict[str, str | None] | None = None

    def owners(self) -> list[str]:
        """Every owner the operator must look up (living or gone)."""
        out = [self.manifest.owner] if self.manifest and self.manifest.owner else []
        out += [o.owner for o in self.overlaps if o.owner]
        return sorted(set(out))


class PreflightError(ValueError):
    pass


def _opt(d: dict[str, Any], k: str) -> str | None:
    v = d.get(k)
    return str(v) if isinstance(v, str) and v else None


def parse_preflight(data: dict[str, Any] | None) -> Preflight:
    """The preflight Job's findings (its termination message's ``artifact``)."""
    if not isinstance(data, dict) or data.get("kind") != PREFLIGHT_KIND:
        raise PreflightError("the preflight Job reported no findings")
    src = data.get("source") or {}
    out = data.get("output") or {}
    if not isinstance(src, dict) or not isinstance(out, dict):
        raise PreflightError("the preflight findings are malformed")
    digest = _opt(src, "digest")
    if not digest:
        raise PreflightError("the preflight findings have no source digest")
    state = out.get("state")
    if state not in (EMPTY, INCOMPLETE, MANIFEST, INVALID):
        raise PreflightError(f"unknown output state {state!r}")
    man = None
    raw = out.get("manifest")
    if state == MANIFEST:
        if not isinstance(raw, dict) or not _opt(raw, "sha256"):
            raise PreflightError("the preflight reported a manifest without its sha256")
        man = OutputManifest(
            owner=_opt(raw, "owner"),
            identity=_opt(raw, "identity"),
            sha256=str(raw["sha256"]),
            etag=_opt(raw, "etag"),
            complete=raw.get("complete") is True,
        )
    overlaps = []
    for o in out.get("overlapping") or []:
        if isinstance(o, dict) and o.get("relation") in ("nested", "parent"):
            key, owner = str(o.get("key", ""))[:1024], _opt(o, "owner")
            if o.get("kind") == "publication":
                overlaps.append(Overlap(key, owner, o["relation"], "publication"))
            else:
                overlaps.append(Overlap(key, owner, o["relation"]))
    # tenant input: typed and bounded before anything counts with it
    # (docs/security.md, "Job results")
    config, config_error = model_config(data.get("config"))
    return Preflight(
        source=SourcePin(_opt(src, "revision"), digest),
        vllm_version=str(data.get("vllmVersion") or "unknown"),
        state=state,
        manifest=man,
        overlaps=tuple(overlaps),
        config=config,
        config_error=config_error,
        kernels=_kernels(data.get("kernels")),
    )


def _kernels(raw: Any) -> dict[str, str | None] | None:
    """The preflight's ``kernels`` (tenant-reachable input: typed and bounded)."""
    if not isinstance(raw, dict):
        return None
    out: dict[str, str | None] = {}
    for k, v in list(raw.items())[:4]:
        if isinstance(k, str) and 0 < len(k) <= 64 and (v is None or isinstance(v, str)):
            out[k] = v[:1000] if isinstance(v, str) else None
    return out or None
