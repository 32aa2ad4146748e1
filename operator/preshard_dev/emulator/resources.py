"""The resource types the emulator serves (built-in kinds and, through CRDs, custom ones)
and the facts each kind's REST strategy decides: status subresource, generation,
unconditional updates, the names of its errors."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from preshard_dev.emulator.errors import ApiError

GENERATE_NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


@dataclass
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    subresources: tuple[str, ...] = ()
    short_names: tuple[str, ...] = ()
    singular: str = ""
    categories: tuple[str, ...] = ()
    printer_columns: list[dict[str, Any]] = field(default_factory=list)
    schema: dict[str, Any] | None = None
    # served through a CRD (a custom resource): no strategic merge patch, no PUT without
    # a resourceVersion (customResourceStrategy)
    custom: bool = False
    # metadata.generation is kept (set to 1 on create, bumped by spec changes and by the
    # first deletion with finalizers); ConfigMaps, Secrets and the like have none
    generation: bool = False
    # AllowUnconditionalUpdate: PUT without metadata.resourceVersion
    unconditional_update: bool = True

    @property
    def key(self) -> tuple[str, str]:
        return (self.group, self.plural)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def has_status(self) -> bool:
        return "status" in self.subresources

    @property
    def qualified(self) -> str:
        """schema.GroupResource.String(): ``configmaps``, ``jobs.batch``."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def group_kind(self) -> str:
        """schema.GroupKind.String(): ``ConfigMap``, ``ShardedCheckpoint.preshard.io``."""
        return f"{self.kind}.{self.group}" if self.group else self.kind

    def _details(self, name: str) -> dict[str, Any]:
        details = {"name": name, "group": self.group, "kind": self.plural}
        return {k: v for k, v in details.items() if v}  # omitempty

    def not_found(self, name: str) -> ApiError:
        """apierrors.NewNotFound."""
        return ApiError(
            404, "NotFound", f'{self.qualified} "{name}" not found', self._details(name)
        )

    def already_exists(self, name: str) -> ApiError:
        """apierrors.NewAlreadyExists."""
        return ApiError(
            409, "AlreadyExists", f'{self.qualified} "{name}" already exists', self._details(name)
        )

    def conflict(self, name: str) -> ApiError:
        """apierrors.NewConflict for a stale resourceVersion (storage precondition)."""
        return ApiError(
            409,
            "Conflict",
            f'Operation cannot be fulfilled on {self.qualified} "{name}": the object has been '
            "modified; please apply your changes to the latest version and try again",
            self._details(name),
        )


BUILTIN = [
    ResourceType(
        "",
        "v1",
        "namespaces",
        "Namespace",
        namespaced=False,
        subresources=("status",),
        short_names=("ns",),
    ),
    # Pods have metadata.generation since Kubernetes 1.33 (podStrategy.PrepareForCreate)
    ResourceType(
        "",
        "v1",
        "pods",
        "Pod",
        subresources=("status", "log"),
        short_names=("po",),
        generation=True,
    ),
    ResourceType("", "v1", "configmaps", "ConfigMap", short_names=("cm",)),
    ResourceType("", "v1", "secrets", "Secret"),
    ResourceType("", "v1", "serviceaccounts", "ServiceAccount", short_names=("sa",)),
    ResourceType("", "v1", "events", "Event", short_names=("ev",)),
    ResourceType("batch", "v1", "jobs", "Job", subresources=("status",), generation=True),
    ResourceType("events.k8s.io", "v1", "events", "Event", short_names=("ev",)),
    ResourceType("coordination.k8s.io", "v1", "leases", "Lease", unconditional_update=False),
    ResourceType(
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        namespaced=False,
        subresources=("status",),
        short_names=("crd", "crds"),
        generation=True,
        unconditional_update=False,
    ),
]
VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
