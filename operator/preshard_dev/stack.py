"""The whole product on 127.0.0.1, for ``preshard demo`` and the end-to-end tests.

``LocalStack`` starts, in this order, and stops in reverse (also on errors):

1. the Kubernetes API emulator (in-process thread) with the ShardedCheckpoint CRD and a
   kubeconfig file pointing at it;
2. a real S3 server (``rclone serve s3``) with the buckets ``preshard-models`` and
   ``preshard-checkpoints`` and, in every namespace used, the credentials Secret
   ``preshard-s3`` the examples reference;
3. the real operator, ``preshard operator`` (the cluster entry point) as a subprocess, with
   the S3 server as its default endpoint;
4. the local Job runner (:mod:`preshard_dev.jobrunner`), which runs each Job's container
   command as a local process. On a real cluster, Kubernetes runs the Jobs.

Everything writes its log under ``<dir>/logs``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes
import yaml

from preshard_dev.emulator import EmulatorServer
from preshard_dev.jobrunner import JobRunner
from preshard_dev.s3server import RcloneS3

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "crds" / "shardedcheckpoints.preshard.io.yaml"
GROUP, VERSION, PLURAL = "preshard.io", "v1alpha1", "shardedcheckpoints"
SOURCE_BUCKET, OUTPUT_BUCKET = "preshard-models", "preshard-checkpoints"
CREDENTIALS_SECRET = "preshard-s3"  # noqa: S105 - the Secret's name, not a secret
TINY_MODEL_PREFIX = "tiny-llama/"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def crd_path() -> Path:
    """The CRD file: from the source tree (an editable install) or next to the chart."""
    for candidate in (CRD, Path.cwd() / "crds" / CRD.name):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{CRD.name} not found; run from a preshard checkout")


# where the operator runs (its ledger ConfigMap: preshard.service.ledger)
OPERATOR_NAMESPACE = "preshard-system"


@dataclass
class LocalStack:
    """Emulator + S3 + operator + Job runner; use as a context manager."""

    base_dir: Path
    operator_env: dict[str, str] = field(default_factory=dict)
    runner_options: dict[str, Any] = field(default_factory=dict)
    namespaces: tuple[str, ...] = ("default",)
    s3_wrapper: Any = None  # e.g. a fault-injecting proxy factory: endpoint -> endpoint

    def __post_init__(self) -> None:
        self.base_dir = Path(self.base_dir).resolve()
        self.log_dir = self.base_dir / "logs"
        self.kubeconfig = self.base_dir / "kubeconfig"
        self.emulator: EmulatorServer | None = None
        self.s3: RcloneS3 | None = None
        self.s3_endpoint = ""
        self.operator: subprocess.Popen[bytes] | None = None
        self.runner: JobRunner | None = None
        self.health_port = free_port()
        self.metrics_port = free_port()
        self._closers: list[Any] = []

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> LocalStack:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._start_emulator()
            self._start_s3()
            self.start_operator()
            self._start_runner()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.runner is not None:
            self.runner.stop()
            self.runner = None
        self.stop_operator()
        for close in reversed(self._closers):
            with contextlib.suppress(Exception):
                close()
        self._closers.clear()
        if self.s3 is not None:
            self.s3.stop()
            self.s3 = None
        if self.emulator is not None:
            self.emulator.stop()
            self.emulator = None

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- components -----------------------------------------------------------------------
    def _start_emulator(self) -> None:
        self.emulator = EmulatorServer().start()
        self.emulator.apply_file(crd_path())
        self.emulator.write_kubeconfig(self.kubeconfig)
        cfg = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(str(self.kubeconfig), client_configuration=cfg)
        self.api = kubernetes.client.ApiClient(cfg)
        self.api.user_agent = "preshard-demo/1"
        self.core = kubernetes.client.CoreV1Api(self.api)
        self.batch = kubernetes.client.BatchV1Api(self.api)
        self.custom = kubernetes.client.CustomObjectsApi(self.api)
        for ns in self.namespaces:
            self.ensure_namespace(ns)
        # the operator's own namespace: its ledger of published manifests lives there
        self.ensure_namespace(OPERATOR_NAMESPACE)

    def ensure_namespace(self, ns: str) -> None:
        with contextlib.suppress(kubernetes.client.ApiException):
            self.core.create_namespace({"metadata": {"name": ns}})

    def _start_s3(self) -> None:
        self.s3 = RcloneS3(self.base_dir / "s3", log_path=self.log_dir / "s3.log")
        self.s3.start()
        self.s3.create_bucket(SOURCE_BUCKET)
        self.s3.create_bucket(OUTPUT_BUCKET)
        self.s3_endpoint = self.s3.endpoint
        if self.s3_wrapper is not None:
            self.s3_endpoint = self.s3_wrapper(self.s3.endpoint)
        for ns in self.namespaces:
            self.credentials_secret(ns)

    def credentials_secret(self, ns: str) -> None:
        assert self.s3 is not None
        body = {
            "metadata": {"name": CREDENTIALS_SECRET},
            "stringData": {
                "AWS_ACCESS_KEY_ID": self.s3.access_key,
                "AWS_SECRET_ACCESS_KEY": self.s3.secret_key,
            },
        }
        with contextlib.suppress(kubernetes.client.ApiException):
            self.core.create_namespaced_secret(ns, body)

    def operator_command(self) -> list[str]:
        return [sys.executable, "-m", "preshard.cli", "operator"]

    def start_operator(self) -> None:
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "PRESHARD_S3_ENDPOINT": self.s3_endpoint,
            "PRESHARD_CONVERTER_IMAGE": "vllm/vllm-openai:v0.32.0 (run locally by the job runner)",
            "PRESHARD_CONVERTER_CPU_IMAGE": "preshard-converter-cpu (run locally by the job runner)",
            "PRESHARD_METRICS_PORT": str(self.metrics_port),
            "PRESHARD_LIVENESS_ENDPOINT": f"http://127.0.0.1:{self.health_port}/healthz",
            "PRESHARD_PROGRESS_POLL_SECONDS": "1",
            "PRESHARD_RETRY_SECONDS": "2",
            "PRESHARD_OPERATOR_NAMESPACE": OPERATOR_NAMESPACE,
            **self.operator_env,
        }
        log = open(self.log_dir / "operator.log", "ab")  # noqa: SIM115 - owned by the process
        self.operator = subprocess.Popen(
            self.operator_command(),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.operator.poll() is not None:
                tail = (self.log_dir / "operator.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the operator exited:\n{tail}")
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.health_port}/healthz", timeout=1
                ) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError("the operator did not become healthy within 90 s")

    def stop_operator(self, kill: bool = False) -> None:
        proc, self.operator = self.operator, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _start_runner(self) -> None:
        opts = {"retry_delay": 1.0, "grace_seconds": 10.0, "max_parallel": 2, **self.runner_options}
        if os.environ.get("PYTHONPATH"):
            # the pods run the code the operator runs (a git worktree's, in development)
            opts["base_env"] = {"PYTHONPATH": os.environ["PYTHONPATH"], **opts.get("base_env", {})}
        self.runner = JobRunner.from_kubeconfig(self.kubeconfig, self.base_dir / "jobs", **opts)
        self.runner.start()

    # -- data -----------------------------------------------------------------------------
    def s3_client(self) -> Any:
        assert self.s3 is not None
        return self.s3.client()

    def upload_dir(self, local: Path, bucket: str, prefix: str) -> int:
        client = self.s3_client()
        n = 0
        for path in sorted(p for p in Path(local).rglob("*") if p.is_file()):
            client.upload_file(str(path), bucket, prefix + path.relative_to(local).as_posix())
            n += 1
        return n

    def seed_tiny_model(self, model_dir: Path, prefix: str = TINY_MODEL_PREFIX) -> str:
        """Generate the tiny Llama (once per directory) and upload it to the source bucket."""
        from preshard_dev.tinymodel import make_tiny_llama

        if not (model_dir / "config.json").exists():
            make_tiny_llama(model_dir, num_kv_heads=1)
        self.upload_dir(model_dir, SOURCE_BUCKET, prefix)
        return f"s3://{SOURCE_BUCKET}/{prefix}"

    def list_prefix(self, bucket: str, prefix: str) -> dict[str, int]:
        client = self.s3_client()
        out: dict[str, int] = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents") or []:
                out[obj["Key"]] = int(obj["Size"])
        return out

    # -- resources ------------------------------------------------------------------------
    def apply(self, doc: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
        ns = namespace or (doc.get("metadata") or {}).get("namespace") or "default"
        self.ensure_namespace(ns)
        self.credentials_secret(ns)
        body = {**doc, "metadata": {**doc["metadata"], "namespace": ns}}
        return dict(self.custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body))

    def apply_file(self, path: Path, namespace: str | None = None) -> list[dict[str, Any]]:
        return [
            self.apply(d, namespace)
            for d in yaml.safe_load_all(Path(path).read_text())
            if d and d.get("kind") == "ShardedCheckpoint"
        ]

    def checkpoint(self, ns: str, name: str) -> dict[str, Any] | None:
        try:
            return dict(self.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name))
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def delete_checkpoint(self, ns: str, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)

    def jobs(self, ns: str, component: str = "converter") -> list[dict[str, Any]]:
        items = self.batch.list_namespaced_job(
            ns, label_selector=f"app.kubernetes.io/component={component}"
        ).items
        return [self.api.sanitize_for_serialization(j) for j in items]

    def configmap(self, ns: str, name: str) -> dict[str, Any] | None:
        try:
            return dict(
                self.api.sanitize_for_serialization(self.core.read_namespaced_config_map(name, ns))
            )
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def events(self, ns: str) -> list[dict[str, Any]]:
        return [
            self.api.sanitize_for_serialization(e)
            for e in self.core.list_namespaced_event(ns).items
        ]

    def wait_for(self, fn: Any, timeout: float, what: str, interval: float = 0.5) -> Any:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = fn()
            if last:
                return last
            time.sleep(interval)
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")

    def operator_log(self) -> str:
        p = self.log_dir / "operator.log"
        return p.read_text(errors="replace") if p.exists() else ""
