"""The one mapping of Kubernetes API failures to kopf's retries (and, where a handler
must not retry, to one log line). One of the two service modules that import kopf
(with :mod:`preshard.service.events`).

* an ``ApiException`` (the API server answered with an error): ``kopf.TemporaryError``
  after 10 s, for this resource only;
* a connection that breaks (reset, refused, timed out) raises urllib3's errors, not
  ``ApiException``: retried after 2 s, not after kopf's 60 s backoff for unexpected
  exceptions.

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
import urllib3
from kubernetes.client.exceptions import ApiException

from preshard import metrics

log = logging.getLogger("preshard.service")

TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (urllib3.exceptions.HTTPError, ConnectionError)
API_ERROR_DELAY = 10.0
TRANSPORT_ERROR_DELAY = 2.0


def describe(exc: BaseException) -> str:
    """The wording of an API failure in retries, logs and kopf's Events (never a body)."""
    if isinstance(exc, ApiException):
        return f"Kubernetes API error {exc.status} {exc.reason}"
    if isinstance(exc, TRANSPORT_ERRORS):
        return f"Kubernetes API unreachable: {exc!r}"
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
    except ApiException as exc:
        if count:
            metrics.RECONCILE_ERRORS.inc()
        raise retry_later(describe(exc), API_ERROR_DELAY) from None
    except TRANSPORT_ERRORS as exc:
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
    try:
        yield
    except (ApiException, kopf.TemporaryError, *TRANSPORT_ERRORS, *also) as exc:
        if count and not isinstance(exc, (kopf.TemporaryError, *also)):
            metrics.RECONCILE_ERRORS.inc()
        log.log(level, "could not %s: %s", what, describe(exc))
