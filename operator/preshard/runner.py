"""``preshard operator``: run the kopf operator with production settings."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from typing import Any

from preshard.core.config import OperatorConfig
from preshard.core.errors import InvalidConfig, NoKubeconfig

log = logging.getLogger(__name__)
# kopf's thread pool for our (sync) handlers; the Kubernetes client keeps as many
# connections, so concurrent handlers never open and discard one.
HANDLER_THREADS = 32


def load_config(args: argparse.Namespace, env: dict[str, str] | None = None) -> OperatorConfig:
    try:
        config = OperatorConfig.from_env(dict(os.environ if env is None else env))
    except ValueError as exc:
        raise InvalidConfig(f"invalid operator configuration: {exc}") from None
    namespaces = tuple(args.namespace or ()) if not args.all_namespaces else ()
    return config.with_overrides(
        namespaces=namespaces or None,
        metrics_port=args.metrics_port,
        liveness_endpoint=args.liveness,
    )


def run(args: argparse.Namespace) -> int:
    config = load_config(args)
    import kopf

    from preshard import handlers, metrics
    from preshard.handlers.diffbase import ObservedGenerationDiffBase, UnmarkedProgressStorage
    from preshard.k8s.api import KubeApi
    from preshard.service import Service, ledger

    try:
        api = KubeApi.connect(pool_size=HANDLER_THREADS)
    except Exception as exc:  # kubernetes.config.ConfigException and file errors
        raise NoKubeconfig(
            f"no Kubernetes credentials: not running in a cluster and no usable kubeconfig ({exc}); "
            "set KUBECONFIG or run inside a pod with a ServiceAccount",
        ) from None

    registry = kopf.OperatorRegistry()
    # kopf logs in as the Kubernetes client does (kubeconfig or in-cluster config); its
    # default registry adds this itself, an explicit registry needs it said.
    kopf.on.login(registry=registry)(kopf.login_via_client)
    handlers.register(
        registry,
        poll_seconds=config.progress_poll_seconds,
        retry_seconds=config.retry_seconds,
        step_retry_seconds=config.step_retry_seconds,
    )

    @kopf.on.startup(registry=registry)
    def startup(
        settings: kopf.OperatorSettings, memo: kopf.Memo, pods: Any = None, **_: Any
    ) -> None:
        # The service (configuration, API helpers, the status writer) for every handler:
        # kopf hands each one this memo (handlers.checkpoint.service).
        memo.service = Service(config=config, api=api)
        # the Jobs' pods as the watch keeps them (handlers.checkpoint.pods): read, not listed
        memo.service.pods_index = pods
        # ledger entries of resources that become Ready within 2 s: one patch
        memo.service.ledger_writer = ledger.LedgerWriter(memo.service, window=2.0)
        # kopf's progress (a handler's retries) in annotations under our own prefix.
        settings.persistence.progress_storage = UnmarkedProgressStorage(prefix="preshard.io")
        # What was handled last: the status's observedGeneration (no patch of kopf's own
        # per created resource; handlers.diffbase)
        settings.persistence.diffbase_storage = ObservedGenerationDiffBase()
        settings.persistence.finalizer = "preshard.io/finalizer"
        # Our Events are explicit (service.events); kopf's own "Handler succeeded" events
        # would double the API calls, so only its warnings and errors become Events.
        settings.posting.enabled = True
        settings.posting.level = logging.WARNING
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330
        settings.watching.connect_timeout = 30
        settings.networking.request_timeout = 60
        settings.execution.max_workers = HANDLER_THREADS
        # One queue worker (an asyncio task) per resource with events to process, no cap: a
        # cap makes every resource beyond it wait until another's worker idles out. Idle
        # workers exit after kopf's default 5 s. (Handler concurrency is max_workers.)
        settings.queueing.worker_limit = None
        settings.queueing.idle_timeout = 5.0

    metrics.serve(config.metrics_port)
    scope = "all namespaces" if config.cluster_wide else ", ".join(config.namespaces)
    log.info(
        "preshard operator: watching %s; converter image %s; GPU resource %s",
        scope,
        config.converter_image,
        config.gpu_resource_name,
    )
    asyncio.run(
        kopf.operator(
            registry=registry,
            memo=kopf.Memo(),
            clusterwide=config.cluster_wide,
            namespaces=list(config.namespaces),
            standalone=True,
            liveness_endpoint=config.liveness_endpoint or None,
        )
    )
    return 0
