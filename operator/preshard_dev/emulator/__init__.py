"""A Kubernetes API emulator on 127.0.0.1 for tests, the demo and benchmarks (dev only).

Why not plain kmock: kmock 0.8 lacks uid/resourceVersion/generation, namespaces on POST,
resourceVersion on watches, 409/422 status codes, label selectors, PUT and namespaces
(docs/architecture.md, "The Kubernetes API emulator"). A subclass would have had to
replace all of its object handling, so this emulator implements the API semantics the
operator and kubectl rely on directly on aiohttp, and keeps them small and explicit. It
is checked against the behaviour of a real API server by
``tests/integration/test_emulator.py``.

What is emulated:

* discovery (/version, /api, /apis, group versions) for the built-in kinds preshard uses
  and for every CRD created through ``apiextensions.k8s.io/v1``;
* CRUD with uid, a global resourceVersion, creationTimestamp and namespaces from the URL;
  ``metadata.generation`` for the kinds that track it (Pods, Jobs, CRDs, custom
  resources: 1 on create, +1 per spec change, +1 once when a deletion with finalizers
  sets deletionTimestamp), none for ConfigMaps, Secrets, Namespaces and the like;
* ``Status`` errors worded and structured as apimachinery's (``configmaps "x" not found``,
  ``jobs.batch "x" already exists``, ``Operation cannot be fulfilled on ...``,
  ``Kind.group "x" is invalid: spec.output: Required value`` with causes); injected
  faults carry their reason (429 TooManyRequests with Retry-After, 503
  ServiceUnavailable, ...);
* PUT with resourceVersion preconditions (409); PUT without one is refused (422) for the
  kinds whose strategy refuses unconditional updates (custom resources, CRDs, Leases);
* PATCH: JSON patch, merge patch, and strategic merge patch for built-in kinds, merging
  by ``patchMergeKey`` for the fields those kinds carry (see ``SMP_FIELDS``: containers,
  env, volumes, volumeMounts, ports, conditions, ownerReferences, finalizers, ...) with
  the ``$patch``/``$retainKeys``/``$deleteFromPrimitiveList``/``$setElementOrder``
  directives and the server's list order; custom resources refuse strategic merge
  (415, as ``kubectl patch`` without ``--type=merge`` shows), as does any unknown type;
* the ``status`` subresource: create drops the status sent for kinds that have one
  (Pods get ``Pending`` and their QoS class, Jobs ``{}``, Namespaces ``Active``), the main
  endpoint ignores status, ``/status`` writes status only;
* CRD structural schemas on every write, the status subresource included: pruning of
  unknown fields, defaulting, OpenAPI validation, ``x-kubernetes-list-type`` map/set
  duplicates, CEL ``x-kubernetes-validations`` (transition rules included) through
  cel-python; ``fieldValidation=Strict`` refuses unknown fields (400);
* DELETE with finalizers (deletionTimestamp), propagationPolicy Foreground/Background
  cascade through ownerReferences (the garbage collector, run at once), Orphan (the
  dependents lose the owner's reference); batch/v1 Jobs default to Orphan with the API
  server's warning; ``orphanDependents`` is honoured;
* LIST and WATCH with label/field selectors, watches resuming from a resourceVersion
  (410 Gone when it is too old), bookmarks, timeoutSeconds; boolean query parameters
  (``watch``, ``allowWatchBookmarks``) read as the API server reads them (anything but
  ``0``/``false``, so the Python client's ``watch=True`` works);
* ``application/json;as=Table`` for kubectl (CRD printer columns) and
  ``application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1`` (metadata only) on
  GET and LIST; Secret objects served with their data are counted per user agent
  (``GET /emulator/stats?by=secret-data``);
* pod logs (``GET .../pods/NAME/log?tailLines=N``) fed through a non-standard
  ``POST /emulator/v1/namespaces/NS/pods/NAME/log``;
* request counters (``GET /emulator/stats``) and fault injection
  (``POST /emulator/faults`` with verb, resource, code, count, message, retryAfter).

What it does not do: authentication, authorization, admission webhooks, priority and
fairness (429 only when injected); server-side apply (``application/apply-patch+yaml``
is applied as a merge patch: no managedFields, no create on apply); the defaulting and
validation of built-in kinds (a Pod or Job is stored as sent, without imagePullPolicy,
Job selectors, ...); strategic merge metadata beyond the fields listed in ``SMP_FIELDS``
(other lists are replaced, maps merged); schema ``format`` checks and validation
ratcheting; ``fieldValidation=Warn`` warnings; paging (``limit``/``continue`` are
ignored) and watch-list (``sendInitialEvents``); graceful deletion (a Pod without
finalizers goes at once), Terminating namespaces (deleting one leaves its objects),
collection of dangling ownerReferences, and the ``orphan``/``foregroundDeletion``
finalizers as visible steps (foregroundDeletion is added only while dependents exist);
metadata changes through ``pods/status`` and ``jobs/status`` are ignored (a real server
applies some); DELETE returns the object, where a real server answers a ``Status`` for
most built-in kinds; real scheduling or controllers (the Job runner in
``preshard_dev.jobrunner`` plays the Job controller and the kubelet). And protobuf:
kubectl sends protobuf bodies for built-in kinds, so ``kubectl create configmap`` is
refused (415) while ``kubectl apply --validate=false -f`` of custom resources,
``get``/``get -w``/``describe``/``patch --type=merge``/``delete`` work. kubectl's
client-side schema validation and ``explain`` need more of the OpenAPI document than the
emulator serves: use ``--validate=false`` (the server still validates the schema and the
CEL rules).

The modules: ``resources`` (the served types), ``errors`` (Status bodies), ``store``
(objects, events, faults), ``objects`` (CRUD and garbage collection), ``admission`` and
``schema`` (CRD structural schemas), ``patching``, ``strategies`` (built-in kinds),
``selectors``, ``watch``, ``tables``, ``discovery``, ``http`` (routing), ``server``.
"""

from preshard_dev.emulator.errors import ApiError
from preshard_dev.emulator.http import Emulator
from preshard_dev.emulator.resources import ResourceType
from preshard_dev.emulator.server import EmulatorServer, kubeconfig

__all__ = ["ApiError", "Emulator", "EmulatorServer", "ResourceType", "kubeconfig"]
