"""The operator's service layer: what happens to a ShardedCheckpoint, between the kopf
handlers (:mod:`preshard.handlers`: decorators, filters, indexes) and the Kubernetes API
helpers (:mod:`preshard.k8s`).

* :mod:`.context`: :class:`Service`, the configuration and the API client the handlers
  find in kopf's ``memo`` (set by the operator's startup handler, ``preshard.runner``);
* :mod:`.reconcile`: create / resume / spec update / retry -> validate, policy, claim,
  Secrets, steps, conversion Job; Job events and progress polls -> status;
* :mod:`.steps`: the steps before a conversion (preflight -> adopt | copy | withdraw);
* :mod:`.deletion`: the deletion state machine of ``deletionPolicy: Delete``;
* :mod:`.status`: the one status writer and its cache of what was written last;
* :mod:`.errors`: the one mapping of API errors to kopf's retries (and to log lines);
* :mod:`.events`: Event posting.

Only :mod:`.errors` and :mod:`.events` import kopf (its exceptions and its Event
poster; an import-linter contract forbids kopf elsewhere in the service). Pure
decisions live in :mod:`preshard.core`.
"""

from preshard.service.context import Service

__all__ = ["Service"]
