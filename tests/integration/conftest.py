"""Fixtures: the Kubernetes API emulator (preshard_dev.emulator) on 127.0.0.1 with the CRD
installed, and the real operator (`preshard operator`, the cluster entry point) running
as a subprocess against it over HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import urllib3

from preshard_dev.emulator import EmulatorServer

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "crds" / "shardedcheckpoints.preshard.io.yaml"
GROUP, VERSION, PLURAL = "preshard.io", "v1alpha1", "shardedcheckpoints"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    fn: Callable[[], Any], timeout: float = 30.0, interval: float = 0.2, what: str = "condition"
) -> Any:
    """Poll ``fn`` until it returns a truthy value; fail with the last value seen."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


class K8s:
    """The emulator plus kubernetes-client shortcuts used by the tests."""

    def __init__(self, server: EmulatorServer, kubeconfig: Path):
        self.server = server
        self.url = server.url
        self.kubeconfig_path = kubeconfig
        cfg = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(str(kubeconfig), client_configuration=cfg)
        self.api = kubernetes.client.ApiClient(cfg)
        self.api.user_agent = "preshard-tests/1"  # the emulator counts requests per agent
        self.core = kubernetes.client.CoreV1Api(self.api)
        self.batch = kubernetes.client.BatchV1Api(self.api)
        self.custom = kubernetes.client.CustomObjectsApi(self.api)
        self.http = urllib3.PoolManager()

    # -- namespaces and secrets ------------------------------------------------------------
    def namespace(self) -> str:
        name = "t-" + uuid.uuid4().hex[:8]
        self.core.create_namespace({"metadata": {"name": name}})
        return name

    def secret(self, ns: str, name: str, data: dict[str, str]) -> None:
        self.core.create_namespaced_secret(ns, {"metadata": {"name": name}, "stringData": data})

    # -- checkpoints ------------------------------------------------------------------------
    def create_checkpoint(self, ns: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ShardedCheckpoint",
            "metadata": {"name": name},
            "spec": spec,
        }
        return dict(self.custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body))

    def checkpoint(self, ns: str, name: str) -> dict[str, Any] | None:
        try:
            return dict(self.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name))
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def delete_checkpoint(self, ns: str, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)

    def condition(self, ns: str, name: str, type_: str = "Ready") -> dict[str, Any] | None:
        obj = self.checkpoint(ns, name) or {}
        for c in (obj.get("status") or {}).get("conditions") or []:
            if c["type"] == type_:
                return dict(c)
        return None

    def wait_condition(
        self, ns: str, name: str, status: str, reason: str | None = None, timeout: float = 30
    ) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            c = self.condition(ns, name)
            if c and c["status"] == status and (reason is None or c["reason"] == reason):
                return c
            return None

        return dict(
            wait_for(
                check,
                timeout,
                what=f"{ns}/{name} Ready={status} {reason or ''} (now {self.condition(ns, name)})",
            )
        )

    # -- jobs and pods (playing the Job controller and the kubelet) --------------------------
    def jobs(self, ns: str, label_selector: str = "") -> list[dict[str, Any]]:
        items = self.batch.list_namespaced_job(ns, label_selector=label_selector).items
        return [self.api.sanitize_for_serialization(j) for j in items]

    def wait_jobs(
        self, ns: str, count: int = 1, label_selector: str = "", timeout: float = 30
    ) -> list[dict[str, Any]]:
        return list(
            wait_for(
                lambda: (j := self.jobs(ns, label_selector)) and len(j) >= count and j,
                timeout,
                what=f"{count} Job(s) in {ns}",
            )
        )

    def set_job_status(self, ns: str, name: str, status: dict[str, Any]) -> None:
        self.batch.patch_namespaced_job_status(name, ns, {"status": status})

    def create_pod(self, ns: str, job: dict[str, Any], suffix: str = "a") -> str:
        """A pod as the Job controller creates it: the Job's labels, its controller
        ownerReference and the template's container."""
        jname = job["metadata"]["name"]
        name = f"{jname}-{suffix}"
        tmpl = job["spec"]["template"]["spec"]["containers"][0]
        container = {k: tmpl[k] for k in ("name", "image", "command", "args") if k in tmpl}
        pod = {
            "metadata": {
                "name": name,
                "labels": {"job-name": jname, "batch.kubernetes.io/job-name": jname},
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": jname,
                        "uid": job["metadata"]["uid"],
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": {"containers": [container]},
        }
        self.core.create_namespaced_pod(ns, pod)
        return name

    def create_forged_pod(
        self, ns: str, job: dict[str, Any], name: str, owner_uid: str | None = None
    ) -> str:
        """What a tenant who may create pods can do: a pod with the Job's labels (and,
        with ``owner_uid``, an ownerReference to that uid) running its own image."""
        jname = job["metadata"]["name"]
        meta: dict[str, Any] = {
            "name": name,
            "labels": {"job-name": jname, "batch.kubernetes.io/job-name": jname,
                       "controller-uid": job["metadata"]["uid"]},
        }  # fmt: skip
        if owner_uid is not None:
            meta["ownerReferences"] = [
                {"apiVersion": "batch/v1", "kind": "Job", "name": jname, "uid": owner_uid,
                 "controller": True},
            ]  # fmt: skip
        container = job["spec"]["template"]["spec"]["containers"][0]["name"]
        body = {"metadata": meta, "spec": {"containers": [{"name": container, "image": "evil"}]}}
        self.core.create_namespaced_pod(ns, body)
        return name

    def set_pod_terminated(self, ns: str, pod: str, exit_code: int, message: str) -> None:
        container = self.core.read_namespaced_pod(pod, ns).spec.containers[0].name
        self.core.patch_namespaced_pod_status(
            pod,
            ns,
            {
                "status": {
                    "phase": "Succeeded" if exit_code == 0 else "Failed",
                    "containerStatuses": [
                        {
                            "name": container,
                            "image": "x",
                            "imageID": "",
                            "ready": False,
                            "restartCount": 0,
                            "state": {"terminated": {"exitCode": exit_code, "message": message}},
                        }
                    ],
                }
            },
        )

    def append_log(self, ns: str, pod: str, text: str) -> None:
        r = self.http.request(
            "POST", f"{self.url}/emulator/v1/namespaces/{ns}/pods/{pod}/log", body=text.encode()
        )
        assert r.status == 200, r.data

    def stats(self, by_agent: bool = False) -> dict[str, Any]:
        import json

        q = "?by=agent" if by_agent else ""
        return dict(json.loads(self.http.request("GET", f"{self.url}/emulator/stats{q}").data))

    def events(self, ns: str) -> list[dict[str, Any]]:
        return [
            self.api.sanitize_for_serialization(e)
            for e in self.core.list_namespaced_event(ns).items
        ]


@pytest.fixture(scope="module")
def k8s_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[K8s]:
    """A fresh emulator (module scope) with the ShardedCheckpoint CRD installed."""
    server = EmulatorServer().start()
    try:
        server.apply_file(CRD)
        kubeconfig = server.write_kubeconfig(tmp_path_factory.mktemp("kube") / "config")
        yield K8s(server, kubeconfig)
    finally:
        server.stop()


class Operator:
    """`preshard operator` as a subprocess against the emulator (restartable)."""

    def __init__(self, k8s: K8s, log_dir: Path, extra_env: dict[str, str] | None = None):
        self.k8s = k8s
        self.log_dir = log_dir
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.env = {
            **os.environ,
            "KUBECONFIG": str(k8s.kubeconfig_path),
            "PRESHARD_METRICS_PORT": str(self.metrics_port),
            "PRESHARD_LIVENESS_ENDPOINT": f"http://127.0.0.1:{self.health_port}/healthz",
            "PRESHARD_PROGRESS_POLL_SECONDS": "1",
            "PRESHARD_RETRY_SECONDS": "1",
            "PRESHARD_CONVERTER_IMAGE": "registry.example/preshard-converter:test",
            # These tests play the Job controller for conversion Jobs; the CPU-only steps
            # before them (preflight, adopt, copy) run for real in tests/e2e/test_steps.py.
            "PRESHARD_PREFLIGHT": "0",
            **(extra_env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"operator-{self.starts}.log"

    def start(self) -> None:
        self.starts += 1
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "preshard.cli", "-v", "operator"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        http = urllib3.PoolManager()

        def healthy() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"operator exited: {self.log_path.read_text()[-3000:]}")
            try:
                return (
                    http.request(
                        "GET",
                        f"http://127.0.0.1:{self.health_port}/healthz",
                        timeout=1,
                        retries=False,
                    ).status
                    == 200
                )
            except urllib3.exceptions.HTTPError:
                return False

        wait_for(healthy, 60, what="operator liveness endpoint")

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def logs(self) -> str:
        return "\n".join(
            p.read_text(errors="replace") for p in sorted(self.log_dir.glob("operator-*.log"))
        )


@pytest.fixture(scope="module")
def operator(k8s_api: K8s, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    op = Operator(k8s_api, tmp_path_factory.mktemp("operator"))
    op.start()
    try:
        yield op
    finally:
        op.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """On a failure, attach the tail of the operator's log to the report."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.when == "call" and report.failed:
        op = item.funcargs.get("operator") if hasattr(item, "funcargs") else None  # type: ignore[attr-defined]
        if isinstance(op, Operator):
            report.sections.append(("operator log (tail)", op.logs()[-6000:]))
