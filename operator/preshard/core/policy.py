"""The operator's pod policy: what a ShardedCheckpoint may ask of its conversion pod.

Whoever may create a ShardedCheckpoint must not gain more than the cluster admin allows
(docs/security.md). The chart's values set the policy (PRESHARD_ALLOWED_* variables,
:class:`preshard.core.config.OperatorConfig`); these pure checks run before any Job is
created, and a violation is a ``Ready=False`` condition with the reason
``PolicyViolation`` and a message naming the field, never a Job.

* ``spec.converter.image``: an image the policy allows (default: only the repository of
  the operator's own converter image). Entries are ``registry/path/`` (any image under
  it; the trailing ``/`` is required), ``registry/path/name`` (any tag or digest of it),
  ``registry/path/name:tag`` or ``...@sha256:...`` (exactly that), or ``*`` (anything).
* ``spec.converter.serviceAccountName``: the namespace's own converter ServiceAccount
  (the default) or a name the policy lists.
* ``spec.converter.priorityClassName``: only the names the policy lists (default none).
* ``spec.converter.tolerations``: each must be covered by one the admin lists (the
  default tolerations and the allowed ones; default none).
* ``spec.converter.nodeSelector``: merged over the admin's default nodeSelector (which
  always applies); each key/value must be allowed (``*`` allows any value of a key).
* ``spec.output.uri``: under a prefix the namespace-to-prefix policy allows, when one
  is set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from preshard.core.claims import prefix_allowed
from preshard.core.config import OperatorConfig
from preshard.core.images import image_allowed
from preshard.core.spec import CheckpointSpec

POLICY_VIOLATION = "PolicyViolation"


def toleration_covered(want: Mapping[str, Any], allowed: Mapping[str, Any]) -> bool:
    """Whether ``allowed`` tolerates at least every taint ``want`` tolerates."""
    a_op = allowed.get("operator") or "Equal"
    w_op = want.get("operator") or "Equal"
    a_key, w_key = allowed.get("key") or "", want.get("key") or ""
    every_key = a_op == "Exists" and a_key == ""
    if not every_key:
        if a_key != w_key:
            return False
        if a_op == "Equal" and (
            w_op != "Equal" or (want.get("value") or "") != (allowed.get("value") or "")
        ):
            return False
    a_eff, w_eff = allowed.get("effect") or "", want.get("effect") or ""
    if a_eff and a_eff != w_eff:
        return False
    if a_eff in ("", "NoExecute") and w_eff in ("", "NoExecute"):
        a_sec, w_sec = allowed.get("tolerationSeconds"), want.get("tolerationSeconds")
        if a_sec is not None and (w_sec is None or w_sec > a_sec):
            return False
    return True


class Violation(NamedTuple):
    field: str
    message: str


def _fmt(values: Sequence[str]) -> str:
    return ", ".join(values) if values else "none"


def check_policy(namespace: str, spec: CheckpointSpec, config: OperatorConfig) -> list[Violation]:
    """Every way ``spec`` asks for more than the operator's policy allows (empty: none)."""
    out: list[Violation] = []
    converter = spec.converter
    if converter.image is not None and converter.image != config.converter_image:
        allowed = config.image_allowlist
        if not image_allowed(converter.image, allowed):
            out.append(
                Violation(
                    "spec.converter.image",
                    f"spec.converter.image {converter.image!r} is not allowed by the operator's "
                    f"policy (allowed: {_fmt(allowed)}); leave it unset for the default image",
                )
            )
    if converter.service_account_name is not None:
        allowed_sa = config.allowed_service_accounts_for(namespace)
        if "*" not in allowed_sa and converter.service_account_name not in allowed_sa:
            out.append(
                Violation(
                    "spec.converter.serviceAccountName",
                    f"spec.converter.serviceAccountName {converter.service_account_name!r} is not "
                    f"allowed by the operator's policy in this namespace (allowed: "
                    f"{_fmt(allowed_sa)}); leave it unset for the namespace's converter "
                    "ServiceAccount",
                )
            )
    if converter.priority_class_name is not None:
        allowed_pc = config.allowed_priority_classes
        if converter.priority_class_name not in allowed_pc:
            out.append(
                Violation(
                    "spec.converter.priorityClassName",
                    f"spec.converter.priorityClassName {converter.priority_class_name!r} is not "
                    f"allowed by the operator's policy (allowed: {_fmt(allowed_pc)})",
                )
            )
    allowed_tol = [*config.default_tolerations, *config.allowed_tolerations]
    for i, tol in enumerate(converter.tolerations or []):
        if not any(toleration_covered(tol, a) for a in allowed_tol):
            out.append(
                Violation(
                    f"spec.converter.tolerations[{i}]",
                    f"spec.converter.tolerations[{i}] {dict(tol)} is not allowed by the "
                    "operator's policy (a toleration must be one the cluster admin lists in "
                    "converter.policy.tolerations or converter.tolerations)",
                )
            )
    allowed_ns = config.node_selector_allowlist
    for key, value in sorted((converter.node_selector or {}).items()):
        values = allowed_ns.get(key, ())
        if "*" not in values and value not in values:
            out.append(
                Violation(
                    f"spec.converter.nodeSelector[{key}]",
                    f"spec.converter.nodeSelector {key}={value!r} is not allowed by the "
                    f"operator's policy (allowed values of {key}: {_fmt(values)})",
                )
            )
    ok, prefixes = prefix_allowed(namespace, str(spec.output.parsed), config.output_prefix_policy)
    if not ok:
        out.append(
            Violation(
                "spec.output.uri",
                f"spec.output.uri {str(spec.output.parsed)!r} is outside the output prefixes "
                f"this namespace may write (allowed: {_fmt(prefixes)})",
            )
        )
    return out


def policy_message(violations: Sequence[Violation]) -> str:
    return "; ".join(v.message for v in violations) + " (no Job was created)"
