"""What deleting a ``deletionPolicy: Delete`` resource may do (pure policy, no I/O).

Moved out of the deletion handler: whether its purge Job may run
(:func:`purge_decision_at_deletion`: :func:`preshard.core.claims.purge_decision`, the
namespace's output prefixes, then its converter ServiceAccount), and which CPU step
(preflight, adopt, copy, withdraw) must be stopped first and whether it wrote anything
of this resource's to the prefix (:func:`running_step`, :func:`step_wrote_output`).
The service (:mod:`preshard.service.deletion`) does the I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from preshard.core.claims import OutputClaim, PurgeDecision, prefix_allowed, purge_decision
from preshard.core.config import OperatorConfig
from preshard.core.policy import check_policy
from preshard.core.spec import CheckpointSpec

# status.decision.step values of the CPU-only steps before a conversion
STEPS = ("Preflight", "Adopt", "Copy", "Withdraw")
_SERVICE_ACCOUNT_FIELD = "spec.converter.serviceAccountName"


def purge_decision_at_deletion(
    namespace: str,
    spec: CheckpointSpec,
    status: Mapping[str, Any] | None,
    me: OutputClaim | None,
    claims: Iterable[OutputClaim],
    config: OperatorConfig,
) -> PurgeDecision:
    """Decided again at deletion, from what this resource did and holds (never from a
    reason alone): only the owner of the prefix that did not fail before publishing, in
    a namespace still allowed to write the prefix, purges; and only with a converter
    ServiceAccount the operator's policy still allows (the purge Job runs as it)."""
    allowed, _prefixes = prefix_allowed(
        namespace, str(spec.output.parsed), config.output_prefix_policy
    )
    decision = purge_decision(me, status, claims if me else [], allowed)
    if decision.purge:
        for v in check_policy(namespace, spec, config):
            if v.field == _SERVICE_ACCOUNT_FIELD:
                return decision._replace(purge=False, why=v.message)
    return decision


def running_step(status: Mapping[str, Any] | None) -> tuple[str, str] | None:
    """(step, Job name) of a CPU step in the step record (``status.decision``), if any."""
    record = (status or {}).get("decision") or {}
    step, job = record.get("step"), record.get("jobName")
    if step in STEPS and job:
        return str(step), str(job)
    return None


def step_wrote_output(step: str) -> bool:
    """Whether a stopped step may have left objects of this resource at the prefix:
    only a copy writes (preflight and adopt only read; withdraw deletes a gone owner's)."""
    return step == "Copy"
