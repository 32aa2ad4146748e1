"""Local Job runner: plays the Job controller and the kubelet for the demo and the e2e tests.

Dev tooling only. On a real cluster Kubernetes runs the Jobs preshard creates; this runner
exists because no cluster (and no container runtime) is available on a laptop or in CI.

What it does, for every batch/v1 Job that matches its label selector:

* creates a Pod object for each attempt (``<job>-<5 chars>``, the Job's template, an
  ownerReference to the Job, the ``job-name`` labels) and runs the container's command and
  args as a **local process**: the image is ignored; ``command[0]`` is looked up in
  ``command_map`` (so tests can swap in a stand-in worker) or next to this Python;
* gives the process the container's environment with ``secretKeyRef`` / ``configMapKeyRef``
  resolved from the API (a missing non-optional key leaves the pod waiting with
  ``CreateContainerConfigError``, as the kubelet does) and every volume mount path mapped
  to a local directory (``emptyDir`` per pod, ``persistentVolumeClaim`` per claim under
  ``<state>/pvcs/<claim>``), rewritten in args and env values;
* streams the process output to a local log file and into the emulator's pod log
  (``POST /emulator/v1/namespaces/NS/pods/NAME/log``), so ``kubectl logs`` and the
  operator's progress reader see it;
* records the termination message (``terminationMessagePath``, falling back to the log tail
  with ``FallbackToLogsOnError``) and the exit code in the pod's ``containerStatuses``;
* sets Job status the way the Job controller does: ``startTime``, ``active``,
  ``succeeded``, ``failed``, ``completionTime`` and the conditions
  ``SuccessCriteriaMet``/``Complete`` or ``FailureTarget``/``Failed`` with the controller's
  reasons ``BackoffLimitExceeded``, ``DeadlineExceeded`` and ``PodFailurePolicy``; retries
  failed pods with exponential backoff (``retry_delay`` x 2^n, capped) up to
  ``backoffLimit``; honours ``podFailurePolicy`` FailJob/Ignore rules,
  ``activeDeadlineSeconds`` and ``ttlSecondsAfterFinished``;
* stops the process (SIGTERM to its process group, SIGKILL after ``grace_seconds``) when its
  pod or Job is deleted. Pods carry a finalizer while their process runs, so a foreground
  Job deletion completes only once the process is really gone, as on a cluster.

Not emulated: scheduling and resources (GPUs are not checked), parallelism/completions
other than 1, init containers, image pulls, probes, and restartPolicy OnFailure.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import logging
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes

log = logging.getLogger("preshard.jobrunner")

FINALIZER = "preshard.dev/jobrunner"
DEFAULT_SELECTOR = "app.kubernetes.io/managed-by=preshard"
TERMINATION_MESSAGE_LIMIT = 4096  # bytes, as the kubelet
FALLBACK_LOG_LINES, FALLBACK_LOG_BYTES = 80, 2048
USER_AGENT = "preshard-jobrunner/1"


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC).timestamp()
    except ValueError:
        return None


def _resource_field(ref: dict[str, Any], container: dict[str, Any]) -> str:
    """The Downward API's resourceFieldRef as the kubelet resolves it: the container's
    limit (its request for requests.*), else this machine's capacity ("node allocatable"),
    divided by ``divisor`` and rounded up. Only cpu and memory, the resources used here."""
    from preshard.core.quantity import parse_bytes
    from preshard.core.spec import parse_cpu

    part, _, resource = str(ref["resource"]).partition(".")
    res = container.get("resources") or {}
    value = (res.get(part) or {}).get(resource)
    if value is None and part == "requests":
        value = (res.get("limits") or {}).get(resource)
    divisor = ref.get("divisor") or "1"
    if resource == "memory":
        amount = (
            parse_bytes(str(value))
            if value is not None
            else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        )
        return str(-(-amount // parse_bytes(str(divisor))))
    if resource == "cpu":
        cores = parse_cpu(value) if value is not None else float(os.cpu_count() or 1)
        return str(math.ceil(cores / parse_cpu(divisor)))
    raise ConfigError(
        f"resourceFieldRef {ref['resource']} is not supported by the local Job runner"
    )


class ConfigError(Exception):
    """The container cannot be configured yet (missing Secret/ConfigMap key)."""


@dataclass
class Attempt:
    pod: str
    root: Path
    log_path: Path
    termination_path: Path
    termination_policy: str
    container: str
    proc: subprocess.Popen[bytes] | None = None
    pump: threading.Thread | None = None
    started_at: str = ""
    stop_reason: str | None = None  # "Deadline", "Deleted"
    kill_at: float | None = None
    config_error: str | None = None
    scratch: list[Path] = field(default_factory=list)


@dataclass
class JobTrack:
    namespace: str
    name: str
    uid: str
    failed: int = 0
    next_start: float = 0.0
    attempt: Attempt | None = None
    finished: bool = False
    attempts: int = 0


@dataclass
class JobRunner:
    """Runs preshard's Jobs as local processes; see the module docstring."""

    api: kubernetes.client.ApiClient
    state_dir: Path
    label_selector: str = DEFAULT_SELECTOR
    command_map: dict[str, list[str]] = field(default_factory=dict)
    base_env: dict[str, str] = field(default_factory=dict)
    poll_seconds: float = 0.5
    retry_delay: float = 1.0
    max_retry_delay: float = 30.0
    grace_seconds: float = 10.0
    max_parallel: int = 4
    _tracks: dict[str, JobTrack] = field(default_factory=dict, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)
    history: list[dict[str, Any]] = field(default_factory=list, init=False)

    # -- lifecycle ------------------------------------------------------------------------
    @classmethod
    def from_kubeconfig(cls, kubeconfig: Path | str, state_dir: Path, **kw: Any) -> JobRunner:
        cfg = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(str(kubeconfig), client_configuration=cfg)
        api = kubernetes.client.ApiClient(cfg)
        api.user_agent = USER_AGENT
        return cls(api=api, state_dir=Path(state_dir), **kw)

    def __post_init__(self) -> None:
        self.core = kubernetes.client.CoreV1Api(self.api)
        self.batch = kubernetes.client.BatchV1Api(self.api)
        self.state_dir.mkdir(parents=True, exist_ok=True)

    def start(self) -> JobRunner:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="jobrunner", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the loop and every running process (the pods are left as they are)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        for track in self._tracks.values():
            a = track.attempt
            if a is not None and a.proc is not None and a.proc.poll() is None:
                _signal_group(a.proc, signal.SIGTERM)
                try:
                    a.proc.wait(self.grace_seconds)
                except subprocess.TimeoutExpired:
                    _signal_group(a.proc, signal.SIGKILL)
                    a.proc.wait()

    def __enter__(self) -> JobRunner:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # keep running: the API may be restarting
                log.warning("job runner tick failed", exc_info=True)
            self._stop.wait(self.poll_seconds)

    # -- one reconciliation pass ----------------------------------------------------------
    def tick(self) -> None:
        jobs = self.batch.list_job_for_all_namespaces(label_selector=self.label_selector).items
        pods = {
            (p.metadata.namespace, p.metadata.name): p
            for p in self.core.list_pod_for_all_namespaces(label_selector=self.label_selector).items
        }
        seen = set()
        running = sum(
            1 for t in self._tracks.values() if t.attempt is not None and t.attempt.proc is not None
        )
        for job in jobs:
            uid = job.metadata.uid
            seen.add(uid)
            track = self._tracks.get(uid)
            if track is None:
                track = self._tracks[uid] = JobTrack(
                    job.metadata.namespace,
                    job.metadata.name,
                    uid,
                    failed=int((job.status and job.status.failed) or 0),
                    finished=_finished(job) is not None,
                )
            if track.finished:
                self._expire(job)
                continue
            a = track.attempt
            if a is not None:
                pod = pods.get((track.namespace, a.pod))
                if (
                    job.metadata.deletion_timestamp
                    or pod is None
                    or pod.metadata.deletion_timestamp
                ):
                    self._request_stop(a, "Deleted")
                elif self._deadline_passed(job):
                    self._request_stop(a, "Deadline")
                self._advance(track, job)
            elif job.metadata.deletion_timestamp:
                continue
            elif self._deadline_passed(job):
                self._fail_job(
                    job, "DeadlineExceeded", "Job was active longer than specified deadline"
                )
                track.finished = True
            elif time.monotonic() >= track.next_start and running < self.max_parallel:
                self._start_attempt(track, job)
                if track.attempt is not None and track.attempt.proc is not None:
                    running += 1
        for uid in [u for u in self._tracks if u not in seen]:
            track = self._tracks[uid]
            if track.attempt is not None:
                self._request_stop(track.attempt, "Deleted")
                self._advance(track, None)
            if track.attempt is None:
                del self._tracks[uid]

    def _deadline_passed(self, job: Any) -> bool:
        deadline = job.spec.active_deadline_seconds
        start = job.status and job.status.start_time
        if not deadline or not start:
            return False
        return time.time() - start.timestamp() > deadline

    def _expire(self, job: Any) -> None:
        ttl = job.spec.ttl_seconds_after_finished
        done = _finished(job)
        if ttl is None or done is None or job.metadata.deletion_timestamp:
            return
        finished_at = parse_time(done)
        if finished_at is not None and time.time() - finished_at >= ttl:
            with contextlib.suppress(kubernetes.client.ApiException):
                self.batch.delete_namespaced_job(
                    job.metadata.name, job.metadata.namespace, propagation_policy="Background"
                )

    # -- attempts -------------------------------------------------------------------------
    def _start_attempt(self, track: JobTrack, job: Any) -> None:
        raw = self.api.sanitize_for_serialization(job)
        template = raw["spec"]["template"]
        pod_spec = template["spec"]
        container = pod_spec["containers"][0]
        name = f"{track.name}-{_suffix()}"
        root = self.state_dir / "pods" / track.namespace / name
        root.mkdir(parents=True, exist_ok=True)
        labels = dict((template.get("metadata") or {}).get("labels") or {})
        labels.update(
            {
                "job-name": track.name,
                "batch.kubernetes.io/job-name": track.name,
                "controller-uid": track.uid,
                "batch.kubernetes.io/controller-uid": track.uid,
            }
        )
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": track.namespace,
                "labels": labels,
                "annotations": dict((template.get("metadata") or {}).get("annotations") or {}),
                "finalizers": [FINALIZER],
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": track.name,
                        "uid": track.uid,
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": {**pod_spec, "nodeName": "local-jobrunner"},
        }
        self.core.create_namespaced_pod(track.namespace, pod)
        a = Attempt(
            pod=name,
            root=root,
            log_path=root / "container.log",
            termination_path=root / "termination-log",
            termination_policy=container.get("terminationMessagePolicy") or "File",
            container=container["name"],
        )
        track.attempt = a
        track.attempts += 1
        status: dict[str, Any] = {"active": 1, "ready": 0}
        if not (job.status and job.status.start_time):
            status["startTime"] = now_iso()
        self.batch.patch_namespaced_job_status(track.name, track.namespace, {"status": status})
        self._launch(track, a, raw)

    def _launch(self, track: JobTrack, a: Attempt, job: dict[str, Any]) -> None:
        pod_spec = job["spec"]["template"]["spec"]
        container = pod_spec["containers"][0]
        try:
            env = self._environment(track.namespace, a, pod_spec, container)
        except ConfigError as exc:
            if a.config_error != str(exc):
                a.config_error = str(exc)
                self._pod_status(
                    track.namespace,
                    a,
                    "Pending",
                    {"waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}},
                )
            return
        mapping = self._mounts(track.namespace, a, pod_spec, container)
        command = [self._rewrite(x, mapping) for x in container.get("command") or []]
        args = [self._rewrite(x, mapping) for x in container.get("args") or []]
        if not command:
            raise ValueError(
                f"Job {track.name}: the container has no command (image entrypoints are unknown here)"
            )
        argv = self._resolve(command) + args
        cwd = self._rewrite(container.get("workingDir") or "", mapping) or str(a.root)
        a.log_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("%s/%s: running %s", track.namespace, a.pod, " ".join(argv))
        a.proc = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        a.started_at = now_iso()
        a.config_error = None
        a.pump = threading.Thread(
            target=self._pump, args=(track.namespace, a), name=f"log-{a.pod}", daemon=True
        )
        a.pump.start()
        self._pod_status(track.namespace, a, "Running", {"running": {"startedAt": a.started_at}})
        self.batch.patch_namespaced_job_status(
            track.name, track.namespace, {"status": {"active": 1, "ready": 1}}
        )

    def _advance(self, track: JobTrack, job: Any) -> None:
        a = track.attempt
        assert a is not None
        if a.proc is None:  # waiting for its configuration
            if a.stop_reason is not None:
                self._end_attempt(track, job, None)
            elif job is not None:
                self._launch(track, a, self.api.sanitize_for_serialization(job))
            return
        if a.kill_at is not None and time.monotonic() >= a.kill_at and a.proc.poll() is None:
            _signal_group(a.proc, signal.SIGKILL)
        rc = a.proc.poll()
        if rc is None:
            return
        self._end_attempt(track, job, rc)

    def _end_attempt(self, track: JobTrack, job: Any, rc: int | None) -> None:
        a = track.attempt
        assert a is not None
        if a.pump is not None:
            a.pump.join(timeout=10)
        message = self._termination_message(a, rc)
        finished = now_iso()
        state: dict[str, Any] = {
            "terminated": {
                "exitCode": -1 if rc is None else (rc if rc >= 0 else 128 - rc),
                "reason": "Completed" if rc == 0 else "Error",
                "message": message,
                "startedAt": a.started_at or finished,
                "finishedAt": finished,
            }
        }
        exit_code = state["terminated"]["exitCode"]
        with contextlib.suppress(kubernetes.client.ApiException):
            self._pod_status(track.namespace, a, "Succeeded" if rc == 0 else "Failed", state)
        with contextlib.suppress(kubernetes.client.ApiException):
            # strategic merge: remove only our finalizer ("finalizers": [] would be a no-op
            # on a real API server: finalizers merge as a set)
            self.core.patch_namespaced_pod(
                a.pod,
                track.namespace,
                {"metadata": {"$deleteFromPrimitiveList/finalizers": [FINALIZER]}},
            )
        track.attempt = None
        for d in a.scratch:
            shutil.rmtree(d, ignore_errors=True)
        self.history.append(
            {
                "namespace": track.namespace,
                "job": track.name,
                "pod": a.pod,
                "exitCode": exit_code,
                "stopReason": a.stop_reason,
                "log": str(a.log_path),
            }
        )
        if job is None or job.metadata.deletion_timestamp or a.stop_reason == "Deleted":
            if job is not None and not job.metadata.deletion_timestamp:
                # the pod was deleted under a live Job: a disruption, not a failure
                self.batch.patch_namespaced_job_status(
                    track.name, track.namespace, {"status": {"active": 0, "ready": 0}}
                )
            return
        if a.stop_reason == "Deadline":
            self._fail_job(job, "DeadlineExceeded", "Job was active longer than specified deadline")
            track.finished = True
            return
        if rc == 0:
            now = now_iso()
            conds = [
                _cond(
                    "SuccessCriteriaMet",
                    "CompletionsReached",
                    "Reached expected number of succeeded pods",
                    now,
                ),
                _cond(
                    "Complete",
                    "CompletionsReached",
                    "Reached expected number of succeeded pods",
                    now,
                ),
            ]
            self.batch.patch_namespaced_job_status(
                track.name,
                track.namespace,
                {
                    "status": {
                        "active": 0,
                        "ready": 0,
                        "succeeded": 1,
                        "completionTime": now,
                        "conditions": _merge_conditions(job, conds),
                    }
                },
            )
            track.finished = True
            return
        track.failed += 1
        rule = _matching_rule(job, a.container, exit_code)
        if rule == "FailJob":
            self._fail_job(
                job,
                "PodFailurePolicy",
                f"Container {a.container} for pod {track.namespace}/{a.pod} failed with exit code "
                f"{exit_code} matching FailJob rule",
                failed=track.failed,
            )
            track.finished = True
            return
        limit = job.spec.backoff_limit if job.spec.backoff_limit is not None else 6
        if track.failed > limit:
            self._fail_job(
                job,
                "BackoffLimitExceeded",
                "Job has reached the specified backoff limit",
                failed=track.failed,
            )
            track.finished = True
            return
        delay = min(self.max_retry_delay, self.retry_delay * 2 ** (track.failed - 1))
        track.next_start = time.monotonic() + delay
        self.batch.patch_namespaced_job_status(
            track.name,
            track.namespace,
            {"status": {"active": 0, "ready": 0, "failed": track.failed}},
        )
        log.info(
            "%s/%s failed (exit %s); retry %d in %.1fs",
            track.namespace,
            a.pod,
            exit_code,
            track.failed,
            delay,
        )

    def _fail_job(self, job: Any, reason: str, message: str, failed: int | None = None) -> None:
        now = now_iso()
        conds = [
            _cond("FailureTarget", reason, message, now),
            _cond("Failed", reason, message, now),
        ]
        status: dict[str, Any] = {
            "active": 0,
            "ready": 0,
            "conditions": _merge_conditions(job, conds),
        }
        if failed is not None:
            status["failed"] = failed
        with contextlib.suppress(kubernetes.client.ApiException):
            self.batch.patch_namespaced_job_status(
                job.metadata.name, job.metadata.namespace, {"status": status}
            )

    def _request_stop(self, a: Attempt, reason: str) -> None:
        if a.stop_reason is not None:
            return
        a.stop_reason = reason
        if a.proc is not None and a.proc.poll() is None:
            log.info("stopping %s (%s)", a.pod, reason)
            _signal_group(a.proc, signal.SIGTERM)
            a.kill_at = time.monotonic() + self.grace_seconds

    # -- pod I/O --------------------------------------------------------------------------
    def _pod_status(self, ns: str, a: Attempt, phase: str, state: dict[str, Any]) -> None:
        terminated = "terminated" in state
        status = {
            "phase": phase,
            "hostIP": "127.0.0.1",
            "podIP": "127.0.0.1",
            "startTime": a.started_at or now_iso(),
            "containerStatuses": [
                {
                    "name": a.container,
                    "image": "local-process",
                    "imageID": "",
                    "ready": phase == "Running",
                    "started": phase == "Running",
                    "restartCount": 0,
                    "state": state,
                }
            ],
            "conditions": [
                {"type": "Ready", "status": "True" if phase == "Running" else "False"},
                {"type": "ContainersReady", "status": "False" if terminated else "True"},
            ],
        }
        self.core.patch_namespaced_pod_status(a.pod, ns, {"status": status})

    def _pump(self, ns: str, a: Attempt) -> None:
        """Copy the process output to the log file and the emulator's pod log."""
        assert a.proc is not None and a.proc.stdout is not None
        buf: list[str] = []
        last = time.monotonic()
        with open(a.log_path, "ab") as out:
            for raw in iter(a.proc.stdout.readline, b""):
                out.write(raw)
                out.flush()
                buf.append(raw.decode("utf-8", errors="replace"))
                if time.monotonic() - last > 0.3 or len(buf) > 200:
                    self._post_log(ns, a.pod, "".join(buf))
                    buf, last = [], time.monotonic()
        if buf:
            self._post_log(ns, a.pod, "".join(buf))

    def _post_log(self, ns: str, pod: str, text: str) -> None:
        url = f"{self.api.configuration.host}/emulator/v1/namespaces/{ns}/pods/{pod}/log"
        req = urllib.request.Request(url, data=text.encode(), method="POST")  # noqa: S310
        try:
            with urllib.request.urlopen(req, timeout=10):  # noqa: S310 - loopback emulator
                pass
        except OSError as exc:  # the pod may be gone already; the local file has it all
            log.debug("could not append to the log of %s: %s", pod, exc)

    def _termination_message(self, a: Attempt, rc: int | None) -> str:
        try:
            data = a.termination_path.read_bytes()[:TERMINATION_MESSAGE_LIMIT]
        except OSError:
            data = b""
        if not data and rc not in (0, None) and a.termination_policy == "FallbackToLogsOnError":
            try:
                lines = a.log_path.read_bytes().splitlines(keepends=True)[-FALLBACK_LOG_LINES:]
            except OSError:
                lines = []
            data = b"".join(lines)[-FALLBACK_LOG_BYTES:]
        return data.decode("utf-8", errors="replace")

    # -- container configuration ----------------------------------------------------------
    def _environment(
        self, ns: str, a: Attempt, pod_spec: dict[str, Any], container: dict[str, Any]
    ) -> dict[str, str]:
        mapping = self._mounts(ns, a, pod_spec, container)
        env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        for k in ("LANG", "LC_ALL", "TZ"):
            if k in os.environ:
                env[k] = os.environ[k]
        env.update(self.base_env)
        for item in container.get("env") or []:
            name = item["name"]
            if "value" in item:
                env[name] = self._rewrite(str(item["value"]), mapping)
                continue
            src = item.get("valueFrom") or {}
            value = self._value_from(ns, a, src, container)
            if value is not None:
                env[name] = value
        if "/tmp" in mapping:
            env.setdefault("TMPDIR", mapping["/tmp"])
        return env

    def _value_from(
        self, ns: str, a: Attempt, src: dict[str, Any], container: dict[str, Any]
    ) -> str | None:
        if "secretKeyRef" in src or "configMapKeyRef" in src:
            is_secret = "secretKeyRef" in src
            ref = src["secretKeyRef" if is_secret else "configMapKeyRef"]
            kind = "secret" if is_secret else "configmap"
            try:
                obj = (
                    self.core.read_namespaced_secret(ref["name"], ns)
                    if is_secret
                    else self.core.read_namespaced_config_map(ref["name"], ns)
                )
            except kubernetes.client.ApiException as exc:
                if exc.status == 404 and ref.get("optional"):
                    return None
                if exc.status == 404:
                    raise ConfigError(f'{kind} "{ref["name"]}" not found') from None
                raise
            data = dict(obj.data or {})
            if ref["key"] not in data:
                if ref.get("optional"):
                    return None
                raise ConfigError(f"couldn't find key {ref['key']} in {kind} {ns}/{ref['name']}")
            value = data[ref["key"]]
            return base64.b64decode(value).decode() if is_secret else str(value)
        if "resourceFieldRef" in src:
            return _resource_field(src["resourceFieldRef"], container)
        if "fieldRef" in src:
            path = src["fieldRef"]["fieldPath"]
            return {
                "metadata.name": a.pod,
                "metadata.namespace": ns,
                "spec.nodeName": "local-jobrunner",
            }.get(path, "")
        return None

    def _mounts(
        self, ns: str, a: Attempt, pod_spec: dict[str, Any], container: dict[str, Any]
    ) -> dict[str, str]:
        """mountPath -> local directory (created), plus the termination message path."""
        volumes = {v["name"]: v for v in pod_spec.get("volumes") or []}
        mapping: dict[str, str] = {}
        for m in container.get("volumeMounts") or []:
            vol = volumes.get(m["name"]) or {}
            if "persistentVolumeClaim" in vol:
                local = self.state_dir / "pvcs" / ns / vol["persistentVolumeClaim"]["claimName"]
            elif m["mountPath"].rstrip("/") == "/tmp":
                # a short path: Unix socket paths (vLLM's ZMQ IPC under TMPDIR) must stay
                # under 108 bytes, which a deep state directory would exceed
                local = Path(tempfile.gettempdir()) / f"pjr-{a.pod[-5:]}-{a.root.stat().st_ino}"
                a.scratch.append(local)
            else:
                local = a.root / "volumes" / m["name"]
            if m.get("subPath"):
                local = local / m["subPath"]
            local.mkdir(parents=True, exist_ok=True)
            mapping[m["mountPath"].rstrip("/") or "/"] = str(local)
        term = container.get("terminationMessagePath") or "/dev/termination-log"
        mapping[term] = str(a.termination_path)
        return mapping

    @staticmethod
    def _rewrite(value: str, mapping: dict[str, str]) -> str:
        for path in sorted(mapping, key=len, reverse=True):
            if value == path or value.startswith(path + "/"):
                return mapping[path] + value[len(path) :]
        return value

    def _resolve(self, command: list[str]) -> list[str]:
        head, rest = command[0], command[1:]
        if head in self.command_map:
            return [*self.command_map[head], *rest]
        beside = Path(sys.executable).parent / head
        if beside.exists():
            return [str(beside), *rest]
        found = shutil.which(head)
        if found is None:
            raise FileNotFoundError(
                f"{head} is not installed here (the runner runs commands locally)"
            )
        return [found, *rest]

    # -- introspection for the demo and tests ----------------------------------------------
    def attempts_of(self, job_name: str) -> list[dict[str, Any]]:
        return [h for h in self.history if h["job"] == job_name]

    def pod_logs(self) -> dict[str, Path]:
        """pod name -> local log file, for running and finished attempts."""
        out = {h["pod"]: Path(h["log"]) for h in self.history}
        for t in list(self._tracks.values()):
            if t.attempt is not None:
                out[t.attempt.pod] = t.attempt.log_path
        return out

    def running_pids(self) -> dict[str, int]:
        return {
            t.attempt.pod: t.attempt.proc.pid
            for t in self._tracks.values()
            if t.attempt is not None
            and t.attempt.proc is not None
            and t.attempt.proc.poll() is None
        }


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _suffix() -> str:
    alphabet = "bcdfghjklmnpqrstvwxz2456789"  # as Kubernetes' generateName
    return "".join(secrets.choice(alphabet) for _ in range(5))


def _cond(type_: str, reason: str, message: str, now: str) -> dict[str, Any]:
    return {
        "type": type_,
        "status": "True",
        "reason": reason,
        "message": message,
        "lastProbeTime": now,
        "lastTransitionTime": now,
    }


def _merge_conditions(job: Any, new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    old = (
        [c for c in (job.status.conditions or []) if c.type not in {n["type"] for n in new}]
        if job.status
        else []
    )
    kept = [
        {"type": c.type, "status": c.status, "reason": c.reason, "message": c.message} for c in old
    ]
    return kept + new


def _finished(job: Any) -> str | None:
    """lastTransitionTime of a True Complete/Failed condition, '' if it has none."""
    for c in (job.status and job.status.conditions) or []:
        if c.type in ("Complete", "Failed") and c.status == "True":
            t = c.last_transition_time
            return t.strftime("%Y-%m-%dT%H:%M:%SZ") if t else ""
    return None


def _matching_rule(job: Any, container: str, exit_code: int) -> str | None:
    policy = job.spec.pod_failure_policy
    for rule in (policy and policy.rules) or []:
        codes = rule.on_exit_codes
        if codes is None:
            continue
        if codes.container_name and codes.container_name != container:
            continue
        hit = exit_code in codes.values
        if (codes.operator == "In" and hit) or (codes.operator == "NotIn" and not hit):
            return str(rule.action)
    return None
