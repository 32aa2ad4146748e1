"""The one mapping of Kubernetes API failures to kopf's retries (and, where a handler
must not retry, to one log line). One of the two service modules that import kopf
(with :mod:`preshard.service.events`).

* a ``KubeApiError`` (the API server answered with an error): ``kopf.TemporaryError``
  after 10 s, for this resource only;
* a ``KubeUnreachable`` (the connection broke: reset, refused, timed out): retried after
  2 s, not after kopf's 60 s backoff for unexpected exceptions.

Both are :mod:`preshard.k8s.errors`, the Kubernetes client's exceptions converted once at
the ``k8s`` boundary: the service never imports the client.

Permanent problems never get here: they become a Ready=False condition with a
PascalCase reason (no crash loop, no retry storm), so nothing maps to
``kopf.PermanentError``. Waits of the deletion state machine (a Job still stopping, a
purge still running) are :func:`retry_later`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import kopf

from preshard import metrics
from preshard.k8s.errors import KubeApiError, KubeUnreachable

log = logging.getLogger("preshard.service")

API_ERROR_DELAY = 10.0
TRANSPORT_ERROR_DELAY = 2.0


def describe(exc: BaseException) -> str:
    """The wording of an API failure in retries, logs and kopf's Events (never a body)."""
    return str(exc)


def retry_later(message: str, delay: float) -> kopf.TemporaryError:
    """An exception to raise: kopf runs the handler again after ``delay`` seconds."""
    return kopf.TemporaryError(message, delay=delay)


@contextlib.contextmanager
def retried(*, count: bool = True) -> Iterator[None]:
    """API failures in the block become kopf retries of this resource's handler
    (``count``: also in ``preshard_reconcile_errors_total``)."""
    try:
        yield
    except KubeApiError as exc:
        if count:
            metrics.RECONCILE_ERRORS.inc()
        raise retry_later(describe(exc), API_ERROR_DELAY) from None
    except KubeUnreachable as exc:
        if count:
            metrics.RECONCILE_ERRORS.inc()
        raise retry_later(describe(exc), TRANSPORT_ERROR_DELAY) from None


@contextlib.contextmanager
def logged(
    what: str,
    *,
    level: int = logging.WARNING,
    count: bool = True,
    also: tuple[type[BaseException], ...] = (),
) -> Iterator[None]:
    """For handlers whose failure must not be retried by kopf (a Job event: the next
    event, a timer or a retry of the resource's own handler heals it): API failures in
    the block (a retry raised inside it too, and ``also``) become one log line
    ``could not <what>: ...``."""
    caught: tuple[type[BaseException], ...] = (
        KubeApiError,
        KubeUnreachable,
        kopf.TemporaryError,
        *also,
    )
    try:
        yield
    except caught as exc:
        if count and not isinstance(exc, (kopf.TemporaryError, *also)):
            metrics.RECONCILE_ERRORS.inc()
        log.log(level, "could not %s: %s", what, describe(exc))
