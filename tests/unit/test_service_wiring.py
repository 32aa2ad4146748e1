"""How the operator is wired: the one API error mapping (service.errors), the switches
in OperatorConfig (PRESHARD_PREFLIGHT, PRESHARD_RETRY_SECONDS), the handlers registered with the configured
timer intervals and stable ids (handlers.register), the Service in kopf's memo (the
runner's startup handler), and one status writer (service.status)."""

from __future__ import annotations

import argparse
import ast
import logging
from pathlib import Path
from typing import Any

import kopf
import pytest
import urllib3
from kubernetes.client.exceptions import ApiException

from preshard import handlers, metrics
from preshard.core.config import OperatorConfig
from preshard.core.errors import PreshardError
from preshard.handlers import checkpoint
from preshard.k8s.errors import from_client
from preshard.runner import load_config
from preshard.service import Service, errors

SERVICE = Path(__file__).resolve().parents[2] / "operator" / "preshard" / "service"


def counted() -> float:
    return metrics.REGISTRY.get_sample_value("preshard_reconcile_errors_total") or 0.0


@pytest.mark.parametrize(
    ("exc", "delay", "text"),
    [
        # the client's exceptions as the k8s boundary converts them (the service sees only those)
        (from_client(ApiException(status=500, reason="Internal Server Error")), 10, "Kubernetes API error 500 Internal Server Error"),
        (from_client(urllib3.exceptions.ProtocolError("Connection aborted.")), 2, "Kubernetes API unreachable"),
        (from_client(ConnectionRefusedError(111, "refused")), 2, "Kubernetes API unreachable"),
    ],
)  # fmt: skip
def test_api_failures_become_retries_and_are_counted(
    exc: Exception, delay: float, text: str
) -> None:
    before = counted()
    with pytest.raises(kopf.TemporaryError) as err, errors.retried():
        raise exc
    assert err.value.delay == delay and str(err.value).startswith(text)
    assert counted() == before + 1
    with pytest.raises(kopf.TemporaryError), errors.retried(count=False):
        raise exc
    assert counted() == before + 1


def test_other_exceptions_and_waits_pass_through_the_mapping() -> None:
    with pytest.raises(KeyError), errors.retried():
        raise KeyError("a bug is not an API error")
    with pytest.raises(kopf.TemporaryError) as err, errors.retried():
        raise errors.retry_later("waiting for Job x to stop", delay=3)
    assert err.value.delay == 3 and str(err.value) == "waiting for Job x to stop"


def test_logged_turns_api_failures_and_retries_into_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    before = counted()
    with caplog.at_level(logging.WARNING, "preshard.service"):
        with errors.logged("update ml/llama from its Job"):
            raise from_client(ApiException(status=409, reason="Conflict"))
        with errors.logged("update ml/llama from its Job"):
            raise errors.retry_later("Kubernetes API error 500 x", delay=10)  # counted already
    assert [r.getMessage() for r in caplog.records] == [
        "could not update ml/llama from its Job: Kubernetes API error 409 Conflict",
        "could not update ml/llama from its Job: Kubernetes API error 500 x",
    ]
    assert counted() == before + 1
    with pytest.raises(ValueError), errors.logged("x"):
        raise ValueError("not swallowed")


def test_preflight_and_retry_switches_from_the_environment() -> None:
    default = OperatorConfig.from_env({})
    assert (default.preflight, default.retry_seconds) == (True, 10.0)
    off = OperatorConfig.from_env({"PRESHARD_PREFLIGHT": " 0 ", "PRESHARD_RETRY_SECONDS": "2.5"})
    assert (off.preflight, off.retry_seconds) == (False, 2.5)
    assert Service(config=off).preflight is False
    args = argparse.Namespace(namespace=None, all_namespaces=True, metrics_port=None, liveness=None)
    for raw, why in (("often", "is not a number"), ("0", "> 0"), ("inf", "finite"), ("-1", "> 0")):
        with pytest.raises(PreshardError) as exc:
            load_config(args, {"PRESHARD_RETRY_SECONDS": raw})
        assert exc.value.reason == "InvalidConfig" and why in str(exc.value)
        assert "PRESHARD_RETRY_SECONDS=" in str(exc.value)


def registered(registry: kopf.OperatorRegistry) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for reg in (registry._indexing, registry._watching, registry._spawning, registry._changing):
        for h in reg.get_all_handlers():
            found[str(h.id)] = h
    return found


def test_handlers_are_registered_with_the_configured_intervals_and_stable_ids() -> None:
    registry = kopf.OperatorRegistry()
    config = OperatorConfig.from_env({"PRESHARD_PROGRESS_POLL_SECONDS": "2.5"})
    handlers.register(
        registry, poll_seconds=config.progress_poll_seconds, retry_seconds=7, step_retry_seconds=240
    )
    found = registered(registry)
    # kopf keeps handler ids in its progress annotations: a renamed handler would re-run
    assert set(found) == {
        "outputs", "checkpoints", "identities", "on_change", "on_change/spec",
        "on_job_event", "on_gone", "on_delete", "on_step_job_event", "jobs", "pods",
    }  # fmt: skip
    # no kopf timer or daemon: kopf would add its finalizer to every resource one matches
    assert not registry._spawning.get_all_handlers()
    activities = {str(h.id) for h in registry._activities.get_all_handlers()}
    assert {"start_timers", "stop_timers"} <= activities
    # the timers (handlers.timers) with the configured intervals and initial delays
    timers = {
        t.name: t
        for t in checkpoint.checkpoint_timers(
            kopf.Memo(), {}, poll_seconds=config.progress_poll_seconds,
            retry_seconds=7, step_retry_seconds=240,
        )
    }  # fmt: skip
    assert set(timers) == {"retry_waiting", "poll_progress", "retry_steps"}
    assert (timers["poll_progress"].interval, timers["poll_progress"].initial) == (2.5, 1.25)
    assert (timers["retry_waiting"].interval, timers["retry_waiting"].initial) == (7, 3.5)
    # a step's Job is followed by its watch events; the timer is a safety net of minutes
    assert (timers["retry_steps"].interval, timers["retry_steps"].initial) == (240, 240)
    assert kopf.get_default_registry() is not registry
    assert "on_change" not in registered(kopf.get_default_registry())  # nothing at import


def test_the_handlers_find_the_service_in_kopfs_memo() -> None:
    from preshard.handlers import checkpoint, steps

    svc = Service(config=OperatorConfig(default_s3_endpoint="http://minio:9000"))
    memo = kopf.Memo(service=svc)
    status = {
        "identity": "sha256:" + "1" * 64,
        "artifact": {"uri": "s3://out/a/", "manifestSha256": "9" * 64},
        "conditions": [{"type": "Ready", "status": "True", "reason": "Published"}],
    }
    meta = {"uid": "u1", "creationTimestamp": "2026-01-01T00:00:00Z"}
    spec = {"output": {"uri": "s3://out/a/"}}
    out = checkpoint.outputs(
        name="a", namespace="ml", spec=spec, meta=meta, status=status, memo=memo
    )
    assert list(out) == [("http://minio:9000", "out")]  # the configured default endpoint
    ((ident, ready),) = steps.identities(
        name="a", namespace="ml", spec=spec, meta=meta, status=status, memo=memo
    ).items()
    assert ident == status["identity"] and ready.endpoint == "http://minio:9000"
    assert ready.ref == "ml/a" and ready.manifest_sha256 == "9" * 64
    not_ready = {**status, "conditions": [{"type": "Ready", "status": "False"}]}
    assert (
        steps.identities(
            name="a", namespace="ml", spec=spec, meta=meta, status=not_ready, memo=memo
        )
        is None
    )


def _calls_and_imports(path: Path) -> tuple[set[str], set[str]]:
    tree = ast.parse(path.read_text())
    calls = {
        n.func.attr
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
    }
    imports = {
        a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    imports |= {
        (n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
    }
    return calls, imports


def test_one_status_writer_and_kopf_only_in_errors_and_events() -> None:
    modules = {p.name: _calls_and_imports(p) for p in sorted(SERVICE.glob("*.py"))}
    assert {"reconcile.py", "steps.py", "deletion.py", "status.py"} <= set(modules)
    patchers = {name for name, (calls, _) in modules.items() if "patch_checkpoint_status" in calls}
    assert patchers == {"status.py"}
    assert {name for name, (_, imports) in modules.items() if "kopf" in imports} == {
        "errors.py",
        "events.py",
    }
