"""API errors as apimachinery words and structures them: ``Status`` bodies, the reason
of each HTTP code, and ``field.Error`` lists folded into a 422 ``Invalid``."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from preshard_dev.emulator.resources import ResourceType


class ApiError(Exception):
    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}
        self.headers = headers or {}

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "details": self.details,
            "code": self.code,
        }
        if not self.details:
            del out["details"]  # omitempty, as the API server writes it
        return out


# metav1.StatusReason of each HTTP status code, as apimachinery's errors package sets it
# (NewBadRequest, NewForbidden, NewTooManyRequests, ...). Unknown codes get "" (Unknown).
STATUS_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    406: "NotAcceptable",
    409: "Conflict",
    410: "Expired",
    413: "RequestEntityTooLarge",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


def field_path(parts: Iterable[Any]) -> str:
    """A field path as the API server prints it: ``spec.items[0].name``."""
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def go_value(value: Any) -> str:
    """A bad value as field.Error prints it (%q for strings, %v for numbers and bools)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    return json.dumps(value, separators=(",", ":"))


FieldError = tuple[str, str, str]  # (field, cause reason, message as field.Error.ErrorBody)


def invalid(
    rt: ResourceType, name: str, errors: list[FieldError], qualified: bool = False
) -> ApiError:
    """apierrors.NewInvalid: ``Kind.group "name" is invalid: field: message`` (several
    errors in brackets, comma-separated), one cause per error. ``qualified`` names the
    resource (``shardedcheckpoints.preshard.io``) instead of the kind, as the storage
    layer's checks do (a PUT without resourceVersion)."""
    gk = rt.qualified if qualified else rt.group_kind
    texts = list(dict.fromkeys(f"{f}: {m}" if f else m for f, _, m in errors))
    agg = texts[0] if len(texts) == 1 else "[" + ", ".join(texts) + "]"
    details: dict[str, Any] = {
        "name": name,
        "group": rt.group,
        "kind": rt.plural if qualified else rt.kind,
        "causes": [{"reason": r, "message": m, "field": f} for f, r, m in errors],
    }
    return ApiError(
        422,
        "Invalid",
        f'{gk} "{name}" is invalid: {agg}',
        {k: v for k, v in details.items() if v},
    )
