"""Admission of a write: what happens to a body before it is stored. A Secret's
``stringData`` is folded into ``data`` (the built-in strategy); a custom resource goes
through its CRD's structural schema (``schema.StructuralSchema``): pruning and defaulting,
then ``fieldValidation=Strict`` (unknown fields refused, 400), OpenAPI validation and CEL
(422 with one cause per field error)."""

from __future__ import annotations

import base64
import copy
from typing import Any

from preshard_dev.emulator.errors import ApiError, FieldError, invalid
from preshard_dev.emulator.resources import ResourceType
from preshard_dev.emulator.schema import StructuralSchema


class CRDValidator:
    def __init__(self, schema: dict[str, Any], rt: ResourceType | None = None):
        self.structural = StructuralSchema(schema)
        self.rt = rt

    def admit(
        self, obj: dict[str, Any], old: dict[str, Any] | None, strict: bool
    ) -> dict[str, Any]:
        obj = copy.deepcopy(obj)
        meta = obj.pop("metadata", {})
        unknown = self.structural.prune_and_default(obj)
        obj["metadata"] = meta
        kind, version = obj.get("kind"), str(obj.get("apiVersion", "")).rpartition("/")[2]
        if strict and unknown:
            # the decoder refuses the body (fieldValidation=Strict): 400, not 422
            raise ApiError(
                400,
                "BadRequest",
                f'{kind} in version "{version}" cannot be handled as a {kind}: strict decoding '
                "error: " + ", ".join(f'unknown field "{u.lstrip(".")}"' for u in unknown),
            )
        body = {k: v for k, v in obj.items() if k != "metadata"}
        errors: list[FieldError] = self.structural.validation_errors(body)
        if not errors:
            errors = self.structural.cel_errors(obj, old)
        if errors:
            rt = self.rt or ResourceType("", "", "", str(kind))
            raise invalid(rt, str(meta.get("name", "")), errors)
        return obj


def admit(
    rt: ResourceType,
    validator: CRDValidator | None,
    obj: dict[str, Any],
    old: dict[str, Any] | None,
    q: Any,
) -> dict[str, Any]:
    """The object to store for a create or update of ``rt`` (``q``: the query)."""
    if rt.group == "" and rt.plural == "secrets" and obj.get("stringData"):
        # as the API server: stringData is write-only, merged into data (base64)
        data = dict(obj.get("data") or {})
        for k, v in (obj.pop("stringData") or {}).items():
            data[k] = base64.b64encode(str(v).encode()).decode()
        obj["data"] = data
    if validator is None:
        return obj
    return validator.admit(obj, old, strict=q.get("fieldValidation") == "Strict")
