"""Every Kubernetes API call the operator makes, as RBAC rules. The Helm chart's RBAC
must equal this (tests/unit/test_chart.py); keep it in step with preshard.k8s.api,
preshard.service and preshard.handlers (an integration test checks the emulator saw no
other calls).

Secrets: only the metadata-only existence check (``PRESHARD_SECRET_CHECK=metadata``)
needs ``get`` on Secrets (:data:`SECRET_CHECK_RULE`); with the check off the operator
holds no Secret permission at all (the chart's default in cluster-wide mode)."""

from __future__ import annotations

from typing import NamedTuple


class Rule(NamedTuple):
    api_groups: tuple[str, ...]
    resources: tuple[str, ...]
    verbs: tuple[str, ...]
    namespaced: bool = True


REQUIRED_RBAC: tuple[Rule, ...] = (
    # kopf: list/watch the resources and patch finalizers + its progress annotations
    # (a conversion Job event finds its checkpoint in kopf's index); get: whether the owner
    # a manifest records still exists (adopt only from a gone owner), and the resource of
    # a preflight/adopt/copy Job's event.
    Rule(("preshard.io",), ("shardedcheckpoints",), ("get", "list", "watch", "patch")),
    Rule(("preshard.io",), ("shardedcheckpoints/status",), ("patch",)),
    # conversion and purge Jobs (create-or-get, track, delete on deletionPolicy: Delete)
    Rule(("batch",), ("jobs",), ("get", "list", "watch", "create", "delete")),
    # the newest pod of a Job: termination message and progress lines (the operator's
    # pods index watches the Jobs' pods; a finished Job's pod not there yet is listed)
    Rule(("",), ("pods",), ("list", "watch")),
    Rule(("",), ("pods/log",), ("get",)),
    # the <name>-serving ConfigMap
    Rule(("",), ("configmaps",), ("get", "create", "patch")),
    # Events on ShardedCheckpoints (kopf posts core/v1 Events)
    Rule(("",), ("events",), ("create",)),
    # kopf's resource observer (discovers CRD changes)
    Rule(
        ("apiextensions.k8s.io",),
        ("customresourcedefinitions",),
        ("list", "watch"),
        namespaced=False,
    ),
)

# The metadata-only existence check of referenced credentials Secrets (the request asks
# for PartialObjectMetadata; RBAC cannot tell that from a full read, hence the option to
# turn the check off and hold no Secret permission).
SECRET_CHECK_RULE = Rule(("",), ("secrets",), ("get",))


def required_rbac(check_secrets: bool) -> tuple[Rule, ...]:
    """The rules for an operator configured with ``check_secrets``."""
    return REQUIRED_RBAC + ((SECRET_CHECK_RULE,) if check_secrets else ())
