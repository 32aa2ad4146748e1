"""The kopf index of output claims (handlers.checkpoint.outputs): a resource that no longer
holds a claim must map to {} (kopf keeps an object's previous entries when an index
function returns None, so a failed squatter would otherwise block its prefix for ever)."""

from __future__ import annotations

from typing import Any

import kopf

from preshard.core.claims import OutputClaim
from preshard.handlers import checkpoint as h
from preshard.service import Service

SPEC = {"output": {"uri": "s3://shared/models/", "endpoint": "http://MinIO:9000/"}}
META = {"uid": "u1", "creationTimestamp": "2026-01-01T00:00:00Z"}


def index(status: dict[str, Any]) -> Any:
    memo = kopf.Memo(service=Service())  # as the operator's startup handler sets it
    return h.outputs(
        name="squat", namespace="team-b", spec=SPEC, meta=META, status=status, memo=memo
    )


def test_a_running_resource_is_indexed_by_endpoint_and_bucket() -> None:
    out = index({"jobName": "j", "phase": "Running"})
    assert list(out) == [("http://minio:9000", "shared")]
    claim = out[("http://minio:9000", "shared")]
    assert isinstance(claim, OutputClaim) and claim.strength == "strong"
    assert (claim.namespace, claim.name, claim.prefix) == ("team-b", "squat", "models/")


def test_a_released_claim_is_an_empty_mapping_not_none() -> None:
    failed = {
        "jobName": "j",
        "phase": "Failed",
        "conditions": [{"type": "Published", "status": "False", "reason": "AccessDenied"}],
    }
    assert index(failed) == {}
    refused = {"conditions": [{"type": "Ready", "status": "False", "reason": "PolicyViolation"}]}
    assert index(refused) == {}
