"""Kubernetes client failures, converted once, here at the ``k8s`` boundary.

Every public method of :class:`preshard.k8s.api.KubeApi` raises these instead of the
client's ``ApiException`` (the API server answered with an error) and urllib3's transport
errors (the connection broke), so nothing above this package imports the Kubernetes
client: the service maps them to retries (``service.errors``) and tests raise them from
fakes. The message is the status line, never a response body (which may echo a Secret's
or a spec's contents).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import urllib3
from kubernetes.client.exceptions import ApiException

F = TypeVar("F", bound=Callable[..., Any])


class KubeApiError(Exception):
    """The API server answered with an error status."""

    def __init__(self, status: int, reason: str = "") -> None:
        self.status = status
        self.reason = reason or ""
        super().__init__(f"Kubernetes API error {status} {self.reason}".rstrip())


class KubeForbidden(KubeApiError):
    """403: the operator's RBAC does not allow the call."""


class KubeNotFound(KubeApiError):
    """404."""


class KubeConflict(KubeApiError):
    """409: already exists, or a resourceVersion conflict."""


class KubeUnreachable(Exception):
    """The connection to the API server broke (reset, refused, timed out)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"Kubernetes API unreachable: {type(cause).__name__}")


_BY_STATUS: dict[int, type[KubeApiError]] = {
    403: KubeForbidden,
    404: KubeNotFound,
    409: KubeConflict,
}
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (urllib3.exceptions.HTTPError, ConnectionError)


def from_client(exc: BaseException) -> KubeApiError | KubeUnreachable:
    """preshard's own error for a client exception (ApiException or a transport error)."""
    if isinstance(exc, ApiException):
        status = int(exc.status or 0)
        return _BY_STATUS.get(status, KubeApiError)(status, str(exc.reason or ""))
    return KubeUnreachable(exc)


def translated(fn: F) -> F:
    """``fn`` with the client's exceptions converted (the conversion's one place)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ApiException, *TRANSPORT_ERRORS) as exc:
            raise from_client(exc) from None

    return wrapper  # type: ignore[return-value]


def translate_methods(cls: type) -> type:
    """Class decorator: every public method of ``cls`` raises only preshard's errors."""
    for name, member in list(vars(cls).items()):
        if name.startswith("_"):
            continue
        if isinstance(member, staticmethod | classmethod):
            continue
        if callable(member):
            setattr(cls, name, translated(member))
    return cls
