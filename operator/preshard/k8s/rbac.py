"""Every Kubernetes API call the operator makes, as RBAC rules. The Helm chart's RBAC
must equal this (tests/unit/test_chart.py); keep it in step with preshard.k8s.api and
preshard.handlers (an integration test checks the emulator saw no other calls)."""

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
    # the newest pod of a Job: termination message and progress lines
    Rule(("",), ("pods",), ("list",)),
    Rule(("",), ("pods/log",), ("get",)),
    # the <name>-serving ConfigMap
    Rule(("",), ("configmaps",), ("get", "create", "patch")),
    # existence of the referenced credentials Secrets (data is never read into status/logs)
    Rule(("",), ("secrets",), ("get",)),
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
