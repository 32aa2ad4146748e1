"""The manifest of a conversion: its fields from the conversion plan (what was asked)
and the conversion's facts (what it found out), for the publication to write."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from preshard.core.contract import LOAD_FORMAT_LOCAL, SHARDING_NAME
from preshard.core.manifest import Manifest, build_manifest
from preshard.core.plan import ConversionPlan


@dataclass(frozen=True)
class ConversionFacts:
    """What a conversion found out (the plan says what was asked)."""

    vllm_version: str
    platform: str = ""  # where it ran: "cpu", "cuda", ...
    source_revision: str | None = None  # the commit an hf:// revision resolved to
    detected_quantization: str | None = None  # a pre-quantized checkpoint's method
    verification: dict[str, Any] | None = None  # what was checked (docs/verification.md)
    engine: str = ""  # which produced the files: "none" (engine-free) or "vllm"


def manifest_for(
    plan: ConversionPlan,
    files: list[tuple[str, int, str]],
    facts: ConversionFacts,
    *,
    created_at: str | None = None,
) -> Manifest:
    """The manifest of a conversion: every field from the plan or the facts."""
    return build_manifest(
        files, owner=plan.owner, created_at=created_at, **conversion_fields(plan, facts)
    )


def conversion_fields(plan: ConversionPlan, facts: ConversionFacts) -> dict[str, Any]:
    """The manifest fields of a conversion except its files, owner and creation time
    (what ``worker.store.publication.Publication.commit`` adds): from the plan or the facts."""
    return dict(
        source_uri=plan.source_label,
        source_revision=facts.source_revision or plan.source.revision,
        tensor_parallel_size=plan.tensor_parallel_size,
        pipeline_parallel_size=plan.pipeline_parallel_size,
        # the method asked for, else the one a pre-quantized checkpoint declares (vLLM
        # reads quantization_config from config.json by itself)
        quantization=plan.quantization or facts.detected_quantization,
        dtype=plan.dtype,
        vllm_version=facts.vllm_version,
        file_pattern=plan.layout.file_pattern,
        load_format=LOAD_FORMAT_LOCAL,
        state_format=plan.state_format,
        converted_on=({"platform": facts.platform} if facts.platform else {})
        | ({"engine": facts.engine} if facts.engine else {}),
        sharding_key=SHARDING_NAME,
        identity=plan.identity,
        verification=facts.verification,
    )
