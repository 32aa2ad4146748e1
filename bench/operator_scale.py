"""Operator scale: N ShardedCheckpoints created at once against the real operator.

    python bench/operator_scale.py [--n 200,1000] [--workers 16] [--interval S] [--no-phases]
                                   [--deletion-policy Retain|Delete] [--window S]
                                   [--step-retry S] [--ready N]
    BENCH_SCALE_N=500 python bench/operator_scale.py

Three figures, each next to its target:

1. **create -> first Job** (for each of N resources, N = 200 and 1,000): every resource
   first gets its CPU-only preflight Job (``PRESHARD_PREFLIGHT=1``, the default), so the
   latency runs from the create call's return to the ADDED event of the resource's first
   Job of any step (label ``app.kubernetes.io/managed-by=preshard``) on a watch this
   script holds open; both timestamps are taken here (monotonic clock). Target at
   N=200: p99 < 2 s. ``--no-phases`` drops the second watch that splits the latency
   into kopf's finalizer patch (``--deletion-policy Delete`` only: Retain resources get
   no finalizer), the handler and the status write.
2. **steady request rate of N resources waiting on step Jobs that never finish** (no Job
   runner: the preflight Jobs stay Pending): once the burst is over, the operator's
   requests over ``--window`` seconds (default 130 s, more than two periods of the step
   safety timer, ``--step-retry``, default 60 s here; the operator's own default is
   300 s, so a cluster sees a fifth of the timer's share). Target: < 0.01 requests per
   second per waiting resource.
3. **API requests per resource through Ready** (``--ready``, default 20 resources; also
   every request that names the first resource, in order, kopf's and the operator's) on a
   second stack (``preshard_dev.stack.LocalStack``: the emulator, ``rclone serve s3``,
   the operator and the local Job runner) where the Jobs run: every resource's preflight
   Job runs the real ``preshard preflight``, its conversion Job the fast **stand-in
   worker** ``preshard_dev.standin`` (the real argument parser, S3 publish and termination
   message, fake shards instead of vLLM; the output says so). Each resource has its own
   conversion identity, so all convert (none is copied). Target: < 10 requests per
   resource; the operator's progress poll and retry intervals are the defaults (10 s).

Requests are the emulator's per-user-agent counters (``GET /emulator/stats?by=agent``):
kopf's own client sends ``kopf/<version>`` and the kubernetes client
``OpenAPI-Generator/<version>/python``; this script uses ``preshard-bench*``, the stack
``preshard-demo`` and the Job runner ``preshard-jobrunner`` (not counted). Long-lived
``watch`` requests are counted apart. Also printed: the operator's peak RSS (psutil, the
process and its children; target < 150 MB at N=200) and CPU time, and the emulator's
CPU time (they share the machine's cores). Like every benchmark here it exits non-zero
only if it cannot run, never on a number. The figures depend on what else runs on the
machine (printed: the load average at start).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import kubernetes
import psutil
import urllib3

ROOT = Path(__file__).resolve().parents[1]
CRD = ROOT / "crds" / "shardedcheckpoints.preshard.io.yaml"
GROUP, VERSION, PLURAL = "preshard.io", "v1alpha1", "shardedcheckpoints"
NAMESPACE = "bench"
SECRET = "s3"
LABEL_CHECKPOINT = "preshard.io/checkpoint"
LABEL_COMPONENT = "app.kubernetes.io/component"
FINALIZER = "preshard.io/finalizer"
BENCH_AGENT = "preshard-bench"
MANAGED_BY = "app.kubernetes.io/managed-by=preshard"
TARGET_P99 = 2.0
TARGET_REQUESTS = 10.0  # per resource through Ready
TARGET_WAITING_RATE = 0.01  # requests per second per resource waiting on a step Job
TARGET_RSS_MIB = 150.0
TARGET_N = 200  # the targets hold at this size; larger sizes print their curve only
MIB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[k]


def cpu_seconds(pid: int) -> float:
    try:
        t = psutil.Process(pid).cpu_times()
        return float(t.user + t.system)
    except psutil.Error:
        return 0.0


# ------------------------------------------------------------------------- processes


class Child:
    """A subprocess with its output in a log file."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self.log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def check(self, what: str) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {self.proc.returncode}:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def start_emulator(tmp: Path) -> tuple[Child, str, Path]:
    """The emulator's own CLI: installs the CRD, writes a kubeconfig, prints its URL."""
    kubeconfig = tmp / "kubeconfig"
    child = Child(
        [
            sys.executable,
            "-m",
            "preshard_dev.emulator",
            "--kubeconfig",
            str(kubeconfig),
            "--crd",
            str(CRD),
        ],
        dict(os.environ),
        tmp / "emulator.log",
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        child.check("the API emulator")
        lines = child.log_path.read_text(errors="replace").splitlines()
        url = next((ln.strip() for ln in lines if ln.startswith("http://")), None)
        if url and kubeconfig.exists():
            return child, url, kubeconfig
        time.sleep(0.05)
    child.stop()
    raise RuntimeError("the API emulator did not print its URL within 30 s")


def start_operator(kubeconfig: Path, tmp: Path, step_retry: float) -> tuple[Child, float]:
    """``preshard operator`` as the integration tests start it; wait for its liveness."""
    health = free_port()
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "PRESHARD_STEP_RETRY_SECONDS": str(step_retry),
        "PRESHARD_METRICS_PORT": str(free_port()),
        "PRESHARD_LIVENESS_ENDPOINT": f"http://127.0.0.1:{health}/healthz",
        "PRESHARD_CONVERTER_IMAGE": "registry.example/preshard-converter:bench",
    }
    t0 = time.monotonic()
    child = Child([sys.executable, "-m", "preshard.cli", "operator"], env, tmp / "operator.log")
    http = urllib3.PoolManager()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        child.check("the operator")
        with contextlib.suppress(urllib3.exceptions.HTTPError):
            r = http.request("GET", f"http://127.0.0.1:{health}/healthz", timeout=1, retries=False)
            if r.status == 200:
                return child, time.monotonic() - t0
        time.sleep(0.1)
    child.stop()
    raise RuntimeError(f"the operator was not healthy within 60 s:\n{child.tail()}")


class RssSampler(threading.Thread):
    """Peak RSS of a process and its descendants (the list refreshed every second)."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self._procs = [self.root]
        self._refreshed = 0.0
        self._stop_event = threading.Event()

    def sample(self) -> int:
        if time.monotonic() - self._refreshed > 1.0:
            with contextlib.suppress(psutil.Error):
                self._procs = [self.root, *self.root.children(recursive=True)]
            self._refreshed = time.monotonic()
        total = 0
        for p in self._procs:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        self.peak = max(self.peak, total)
        return total

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)


# ---------------------------------------------------------------------------- watches


class Watch(threading.Thread):
    """A raw ``watch=true`` stream (as kopf sends it); hands each event and its arrival
    time (monotonic clock) to ``on_event``."""

    def __init__(
        self, url: str, path: str, resource_version: str, on_event: Any, label_selector: str = ""
    ) -> None:
        super().__init__(name=f"watch {path}", daemon=True)
        query = {"watch": "true", "resourceVersion": resource_version, "timeoutSeconds": "3600"}
        if label_selector:
            query["labelSelector"] = label_selector
        self.target = f"{url}{path}?{urllib.parse.urlencode(query)}"
        self.on_event = on_event
        self.error: BaseException | None = None
        self._done = threading.Event()
        self._resp: Any = None
        self.http = urllib3.PoolManager(headers={"User-Agent": f"{BENCH_AGENT}-watch/1"})

    def run(self) -> None:
        try:
            self._resp = r = self.http.request(
                "GET",
                self.target,
                preload_content=False,
                retries=False,
                timeout=urllib3.Timeout(connect=10, read=None),
            )
            if r.status != 200:
                raise RuntimeError(f"watch answered {r.status}: {r.read()[:300]!r}")
            buf = b""
            for chunk in r.stream(65536, decode_content=True):
                now = time.monotonic()
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        ev = json.loads(line)
                        self.on_event(ev["type"], ev["object"], now)
                if self._done.is_set():
                    break
        except BaseException as exc:  # reported by the main thread
            if not self._done.is_set():
                self.error = exc

    def stop(self) -> None:
        self._done.set()
        if self._resp is not None:
            with contextlib.suppress(Exception):
                self._resp.shutdown()
        self.join(5)


class Timeline:
    """When each resource first reached each milestone, as seen by the watches."""

    def __init__(self) -> None:
        self.created: dict[str, float] = {}  # the create call returned (client side)
        self.finalizer: dict[str, float] = {}  # kopf's first patch (its finalizer)
        self.job: dict[str, float] = {}  # the resource's first Job's ADDED event
        self.status: dict[str, float] = {}  # status.jobName written

    def on_job(self, type_: str, obj: dict[str, Any], now: float) -> None:
        meta = obj["metadata"]
        # the full resource name; the label holds it too while it fits a label value
        owner = (meta.get("annotations") or {}).get("preshard.io/checkpoint-name") or (
            meta.get("labels") or {}
        ).get(LABEL_CHECKPOINT)
        if type_ == "ADDED" and owner:
            self.job.setdefault(owner, now)

    def on_checkpoint(self, type_: str, obj: dict[str, Any], now: float) -> None:
        meta = obj["metadata"]
        name = meta.get("name")
        if type_ == "DELETED" or not name:
            return
        if FINALIZER in (meta.get("finalizers") or []):
            self.finalizer.setdefault(name, now)
        status = obj.get("status") or {}
        if status.get("jobName") or (status.get("decision") or {}).get("jobName"):
            self.status.setdefault(name, now)

    def span(self, a: dict[str, float], b: dict[str, float]) -> list[float]:
        return [b[x] - a[x] for x in self.created if x in a and x in b]

    def phases(self) -> list[tuple[str, list[float]]]:
        return [
            ("create -> kopf's finalizer patch", self.span(self.created, self.finalizer)),
            ("finalizer -> Job ADDED (Secret GET, Job POST)", self.span(self.finalizer, self.job)),
            ("Job ADDED -> status.decision written", self.span(self.job, self.status)),
        ]


# ------------------------------------------------------------------------------ stats


def stats(http: urllib3.PoolManager, url: str, method: str = "GET") -> dict[str, dict[str, int]]:
    r = http.request(method, f"{url}/emulator/stats?by=agent")
    return dict(json.loads(r.data))


NOT_OPERATOR = (BENCH_AGENT, "preshard-demo", "preshard-jobrunner", "preshard-tests")


def operator_counts(by_agent: dict[str, dict[str, int]]) -> tuple[list[str], Counter[str]]:
    agents = sorted(a for a in by_agent if not a.startswith(NOT_OPERATOR))
    total: Counter[str] = Counter()
    for a in agents:
        total.update(by_agent[a])
    return agents, total


def wait_quiet(
    http: urllib3.PoolManager, url: str, settle: float, timeout: float
) -> tuple[Counter[str], float]:
    """Wait until the operator made no request for ``settle`` seconds; return its
    counters and when its last request was seen."""
    deadline = time.monotonic() + timeout
    last_total, last_change = -1, time.monotonic()
    counts: Counter[str] = Counter()
    while time.monotonic() < deadline:
        _, counts = operator_counts(stats(http, url))
        total = sum(counts.values())
        if total != last_total:
            last_total, last_change = total, time.monotonic()
        elif time.monotonic() - last_change >= settle:
            break
        time.sleep(0.2)
    return counts, last_change


# -------------------------------------------------------------------------------- run


def checkpoint(name: str, deletion_policy: str = "Retain") -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ShardedCheckpoint",
        "metadata": {"name": name},
        "spec": {
            "source": {"uri": "s3://models/llama-70b/"},
            "tensorParallelSize": 8,
            "output": {
                "uri": f"s3://shards/{name}/tp8/",
                "credentialsSecret": SECRET,
                "endpoint": "http://minio.local:9000",
            },
            "deletionPolicy": deletion_policy,
        },
    }


def verdict(ok: bool, n: int) -> str:
    """ok/MISSED against a target, which holds at N=TARGET_N (other sizes: the curve)."""
    if n != TARGET_N:
        return f"{'within' if ok else 'beyond'} it (no target at N={n})"
    return "ok" if ok else "MISSED"


def print_curve(names: list[str], tl: Timeline, t_burst: float) -> None:
    """How the latency grows along the burst (by tenth of the creation order) and when
    each tenth of the Jobs existed: the shape of the curve at larger N."""
    tenth = max(1, len(names) // 10)
    rows = []
    for k in range(0, len(names), tenth):
        chunk = [tl.job[x] - tl.created[x] for x in names[k : k + tenth] if x in tl.job]
        if chunk:
            rows.append(
                f"#{k + 1}-{min(k + tenth, len(names))}: p50 {percentile(chunk, 50):.2f} "
                f"p99 {percentile(chunk, 99):.2f}"
            )
    print("  by creation order (s): " + "; ".join(rows))
    done = sorted(t - t_burst for t in tl.job.values())
    if done:
        marks = []
        for q in (10, 25, 50, 75, 90, 100):
            i = min(len(done) - 1, max(0, math.ceil(len(done) * q / 100) - 1))
            marks.append(f"{q}% at {done[i]:.2f} s")
        print("  Jobs existing after the first create: " + ", ".join(marks))


def run(
    n: int,
    workers: int,
    interval: float,
    settle: float,
    timeout: float,
    with_phases: bool,
    deletion_policy: str = "Retain",
    window: float = 130.0,
    step_retry: float = 60.0,
) -> int:
    http = urllib3.PoolManager()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="preshard-bench-scale-") as tmpdir:
        tmp = Path(tmpdir)
        emulator, url, kubeconfig = start_emulator(tmp)
        operator: Child | None = None
        sampler: RssSampler | None = None
        watches: list[Watch] = []
        tl = Timeline()
        try:
            cfg = kubernetes.client.Configuration()
            kubernetes.config.load_kube_config(str(kubeconfig), client_configuration=cfg)
            cfg.connection_pool_maxsize = max(workers, 4)
            api = kubernetes.client.ApiClient(cfg)
            api.user_agent = f"{BENCH_AGENT}/1"
            core = kubernetes.client.CoreV1Api(api)
            custom = kubernetes.client.CustomObjectsApi(api)
            core.create_namespace({"metadata": {"name": NAMESPACE}})
            core.create_namespaced_secret(
                NAMESPACE,
                {
                    "metadata": {"name": SECRET},
                    "stringData": {"AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": "x"},
                },
            )

            operator, startup_s = start_operator(kubeconfig, tmp, step_retry)
            sampler = RssSampler(operator.proc.pid)
            sampler.start()
            startup_counts, _ = wait_quiet(http, url, settle=1.0, timeout=30)
            idle_rss = sampler.sample()
            stats(http, url, "DELETE")  # from here on: the burst only
            op_cpu0 = cpu_seconds(operator.proc.pid)
            emu_cpu0 = cpu_seconds(emulator.proc.pid)

            rv = core.list_namespace().metadata.resource_version
            watches.append(
                Watch(
                    url,
                    f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs",
                    rv,
                    tl.on_job,
                    f"{LABEL_CHECKPOINT},{MANAGED_BY}",
                )
            )
            if with_phases:
                watches.append(
                    Watch(
                        url,
                        f"/apis/{GROUP}/{VERSION}/namespaces/{NAMESPACE}/{PLURAL}",
                        rv,
                        tl.on_checkpoint,
                    )
                )
            for w in watches:
                w.start()

            names = [f"ckpt-{i:04d}-{uuid.uuid4().hex[:4]}" for i in range(n)]
            errors: list[str] = []

            def create(name: str) -> None:
                try:
                    custom.create_namespaced_custom_object(
                        GROUP, VERSION, NAMESPACE, PLURAL, checkpoint(name, deletion_policy)
                    )
                    tl.created[name] = time.monotonic()
                except kubernetes.client.ApiException as exc:
                    errors.append(f"{name}: {exc.status} {exc.reason}")

            t_burst = time.monotonic()
            if interval > 0:  # a trickle: one at a time
                for name in names:
                    create(name)
                    time.sleep(interval)
            else:
                with ThreadPoolExecutor(workers) as pool:
                    list(pool.map(create, names))
            t_created = time.monotonic()
            if errors:
                raise RuntimeError(f"create failed for {len(errors)} resources: {errors[:3]}")

            deadline = time.monotonic() + timeout
            while len(tl.job) < n and time.monotonic() < deadline:
                for w in watches:
                    if w.error is not None:
                        raise RuntimeError(f"watch failed: {w.error!r}")
                operator.check("the operator")
                time.sleep(0.05)
            t_all_jobs = time.monotonic()
            missing = [x for x in names if x not in tl.job]

            counts, last_request = wait_quiet(http, url, settle=settle, timeout=60)
            by_agent = stats(http, url)
            op_cpu = cpu_seconds(operator.proc.pid) - op_cpu0
            emu_cpu = cpu_seconds(emulator.proc.pid) - emu_cpu0

            # the steady state: every resource waits on a preflight Job that never runs
            _, before = operator_counts(stats(http, url))
            t_window = time.monotonic()
            while time.monotonic() - t_window < window:
                operator.check("the operator")
                time.sleep(1.0)
            _, after = operator_counts(stats(http, url))
            waited = time.monotonic() - t_window
            steady = after - before
            sampler.stop()

            items = custom.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL)
            ready = Counter(
                next(
                    (
                        f"{c.get('status')}/{c.get('reason')}"
                        for c in (o.get("status") or {}).get("conditions") or []
                        if c.get("type") == "Ready"
                    ),
                    "<none>",
                )
                for o in items["items"]
            )
            lat = [tl.job[x] - tl.created[x] for x in names if x in tl.job]

            print(f"machine:          {os.cpu_count()} CPUs, load average {load:.2f} at start")
            how = f"one every {interval} s" if interval > 0 else f"by {workers} client threads"
            print(
                f"resources:        {n} (deletionPolicy {deletion_policy}) created {how} in "
                f"{t_created - t_burst:.2f} s"
            )
            print(
                f"operator start:   {startup_s:.2f} s to liveness, "
                f"{sum(startup_counts.values())} start-up requests "
                f"({', '.join(f'{k} {v}' for k, v in sorted(startup_counts.items()))})"
            )
            print(
                f"Jobs:             {len(lat)}/{n}, the last {t_all_jobs - t_burst:.2f} s after "
                f"the first create; operator quiet after {last_request - t_burst:.2f} s"
            )
            if missing:
                print(f"  NO Job for {len(missing)} resources, e.g. {missing[:3]}")
            print("  (the first Job is the CPU-only preflight; no Job runner here: it never runs)")
            if lat:
                p50, p90, p99 = (percentile(lat, q) for q in (50, 90, 99))
                ok = p99 < TARGET_P99 and not missing
                print(
                    f"create -> 1st Job: p50 {p50:.3f} s  p90 {p90:.3f} s  p99 {p99:.3f} s  "
                    f"(min {min(lat):.3f}, mean {statistics.fmean(lat):.3f}, max {max(lat):.3f})"
                )
                print(f"                  target p99 < {TARGET_P99:.0f} s: {verdict(ok, n)}")
                edges = [0.5, 1, 2, 5, 30, float("inf")]
                hist, lo = [], 0.0
                for hi in edges:
                    k = sum(1 for v in lat if lo <= v < hi)
                    label = f">= {lo:g} s" if hi == float("inf") else f"< {hi:g} s"
                    hist.append(f"{label}: {k}")
                    lo = hi
                print(f"                  {', '.join(hist)}")
                print_curve(names, tl, t_burst)
            for label, values in tl.phases() if with_phases else []:
                if values:
                    print(
                        f"  {label:<46} p50 {percentile(values, 50):.3f} s  "
                        f"p99 {percentile(values, 99):.3f} s"
                    )
            print(
                f"operator RSS:     idle {idle_rss / MIB:.0f} MiB, peak {sampler.peak / MIB:.0f} MiB"
                f"; target < {TARGET_RSS_MIB:.0f} MiB: "
                f"{verdict(sampler.peak / MIB < TARGET_RSS_MIB, n)}"
            )
            print(
                f"CPU in the burst: operator {op_cpu:.2f} s, API emulator {emu_cpu:.2f} s "
                f"(wall {last_request - t_burst:.2f} s)"
            )
            total = sum(v for k, v in counts.items() if not k.startswith("watch "))
            agents, _ = operator_counts(by_agent)
            print(
                f"burst requests:   {total} = {total / n:.2f} per resource from create to the "
                "first Job (watches apart)"
            )
            for a in agents:
                k = sum(by_agent[a].values())
                print(f"  user agent {a:<24} {k:6d}  {k / n:5.2f}/resource")
            for key, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
                who = ", ".join(a for a in agents if by_agent[a].get(key))
                print(f"  {key:<35} {c:6d}  {c / n:5.2f}/resource  [{who}]")
            made = sum(v for k, v in steady.items() if not k.startswith("watch "))
            rate = made / waited / n
            print(
                f"waiting:          {n} resources on preflight Jobs that never finish, "
                f"{waited:.0f} s window, step safety timer every {step_retry:g} s "
                "(the operator's default: 300 s)"
            )
            print(
                f"  {made} requests = {rate:.5f} per second per waiting resource "
                f"({rate / TARGET_WAITING_RATE:.3f}x the target < {TARGET_WAITING_RATE}): "
                f"{'ok' if rate < TARGET_WAITING_RATE else 'MISSED'}"
            )
            for key, c in sorted(steady.items(), key=lambda kv: (-kv[1], kv[0])):
                if c:
                    print(f"  {key:<35} {c:6d}")
            print(f"Ready conditions: {dict(ready)}")
            if missing:
                print(f"\noperator log tail:\n{operator.tail()}", file=sys.stderr)
            return 0
        finally:
            for w in watches:
                w.stop()
            if sampler is not None:
                sampler.stop()
            if operator is not None:
                operator.stop()
            emulator.stop()


def _what(entry: dict[str, str]) -> str:
    """A few words on what a logged request carried (an Event's reason, a status's Ready
    reason, a Job's component, a patch's top-level keys)."""
    raw = entry.get("body") or ""
    try:
        body = json.loads(raw or "null")
    except ValueError:  # longer than the log keeps: what its start says
        component = re.search(r'"app.kubernetes.io/component": "(\w+)"', raw)
        reason = re.search(r'"type": "Ready", "status": "(\w+)", "reason": "(\w+)"', raw)
        if entry["request"] == "create jobs" and component:
            return f"{component.group(1)} Job"
        if reason:
            return f"Ready {reason.group(1)}/{reason.group(2)}"
        return "(body cut)"
    if not isinstance(body, dict):
        return ""
    if entry["request"] == "create events":
        return f"Event {body.get('reason')}"
    if entry["request"].endswith("/status"):
        st = body.get("status") or {}
        ready = next((c for c in st.get("conditions") or [] if c.get("type") == "Ready"), {})
        return f"Ready {ready.get('status')}/{ready.get('reason')}" if ready else str(sorted(st))
    if entry["request"] == "create jobs":
        labels = (body.get("metadata") or {}).get("labels") or {}
        return f"{labels.get('app.kubernetes.io/component')} Job"
    return str(sorted(body))[:60]


def print_one_resource(http: urllib3.PoolManager, url: str, name: str) -> None:
    """Every operator request that named one resource (its path, or its name in the
    body), in order: which are kopf's own, which the operator's, and what each carried
    (the emulator's request log, ``GET /emulator/requests``). Requests shared by
    resources (the Secret check, the ledger) name no resource and are not listed."""
    log = json.loads(http.request("GET", f"{url}/emulator/requests").data)
    mine = [
        e
        for e in log
        if not e["agent"].startswith(NOT_OPERATOR)
        and not e["request"].startswith("watch ")
        and (f"/{name}" in e["path"] or f'"{name}' in (e.get("body") or ""))
    ]
    print(f"  one resource ({name}): {len(mine)} requests that name it")
    for e in mine:
        who = "kopf" if e["agent"].startswith("kopf") else "operator"
        print(f"    {who:<8} {e['request']:<32} {_what(e)}")


def run_ready(n: int, timeout: float) -> int:
    """Requests per resource through Ready, the Jobs run by the local Job runner: the
    real ``preshard preflight``, then the stand-in worker for the conversion."""
    from preshard_dev.stack import LocalStack

    load = os.getloadavg()[0]
    standin = {"preshard": [sys.executable, "-m", "preshard_dev.standin"]}
    with tempfile.TemporaryDirectory(prefix="preshard-bench-ready-") as tmpdir:
        stack = LocalStack(
            Path(tmpdir),
            # the operator's defaults (the stack's own are 1-2 s for tests)
            operator_env={"PRESHARD_PROGRESS_POLL_SECONDS": "10", "PRESHARD_RETRY_SECONDS": "10"},
            runner_options={
                "command_map": standin,
                "max_parallel": 4,
                "base_env": {"PRESHARD_STANDIN_SECONDS": "0"},
            },
        )
        try:
            stack.start()
        except (RuntimeError, TimeoutError, OSError) as exc:
            raise RuntimeError(f"the local stack did not start: {exc}") from None
        try:
            assert stack.emulator is not None
            url = stack.emulator.url
            http = urllib3.PoolManager()
            client = stack.s3_client()
            client.put_object(Bucket="preshard-models", Key="tiny/config.json", Body=b"{}")
            client.put_object(
                Bucket="preshard-models", Key="tiny/model.safetensors", Body=b"stand-in"
            )
            wait_quiet(http, url, settle=1.0, timeout=30)
            stats(http, url, "DELETE")
            names = [f"ready-{i:03d}" for i in range(n)]
            t0 = time.monotonic()
            for i, name in enumerate(names):
                doc = {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "ShardedCheckpoint",
                    "metadata": {"name": name},
                    "spec": {
                        "source": {"uri": "s3://preshard-models/tiny/"},
                        "tensorParallelSize": 1,
                        "output": {
                            "uri": f"s3://preshard-checkpoints/{name}/",
                            "credentialsSecret": "preshard-s3",
                            # an identity each: all convert, none is copied
                            "maxFileSize": f"{100 + i}Mi",
                        },
                    },
                }
                stack.apply(doc, "default")

            def phases() -> Counter[str]:
                out: Counter[str] = Counter()
                for name in names:
                    st = (stack.checkpoint("default", name) or {}).get("status") or {}
                    ready = next(
                        (c for c in st.get("conditions") or [] if c.get("type") == "Ready"), {}
                    )
                    out[f"{ready.get('status')}/{ready.get('reason')}"] += 1
                return out

            deadline = time.monotonic() + timeout
            seen = phases()
            while time.monotonic() < deadline:
                seen = phases()
                if sum(v for k, v in seen.items() if not k.startswith(("False/", "None/"))) == n:
                    break
                time.sleep(2.0)
            took = time.monotonic() - t0
            counts, _ = wait_quiet(http, url, settle=3.0, timeout=60)
            by_agent = stats(http, url)
            agents, _ = operator_counts(by_agent)
            total = sum(v for k, v in counts.items() if not k.startswith("watch "))
            ready_n = seen.get("True/Published", 0)
            print(f"machine:          {os.cpu_count()} CPUs, load average {load:.2f} at start")
            print(
                f"through Ready:    {n} resources (preflight: the real `preshard preflight`; "
                "conversion: the STAND-IN worker preshard_dev.standin, no vLLM), run by the "
                "local Job runner"
            )
            print(f"  Ready conditions after {took:.0f} s: {dict(seen)}")
            print(
                f"  operator requests: {total} = {total / n:.2f} per resource (watches apart); "
                f"target < {TARGET_REQUESTS:.0f}: "
                f"{'ok' if total / n < TARGET_REQUESTS and ready_n == n else 'MISSED'} "
                f"({total / n / TARGET_REQUESTS:.2f}x the target)"
            )
            for key, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
                who = ", ".join(a for a in agents if by_agent[a].get(key))
                print(f"  {key:<35} {c:6d}  {c / n:5.2f}/resource  [{who}]")
            print_one_resource(http, url, names[0])
            if ready_n != n:
                print(f"\noperator log tail:\n{stack.operator_log()[-3000:]}", file=sys.stderr)
            return 0
        finally:
            stack.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--n",
        default=os.environ.get("BENCH_SCALE_N") or "200,1000",
        help="resources to create, or several sizes run one after the other with a fresh "
        "emulator and operator each (env BENCH_SCALE_N, default 200,1000: the targets "
        "at 200, the curve at 1000)",
    )
    ap.add_argument("--workers", type=int, default=16, help="client threads creating resources")
    ap.add_argument(
        "--interval",
        type=float,
        default=0.0,
        help="create one resource every INTERVAL seconds instead of all at once",
    )
    ap.add_argument(
        "--settle", type=float, default=3.0, help="seconds without operator requests = done"
    )
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for all Jobs")
    ap.add_argument(
        "--no-phases",
        action="store_true",
        help="only the Job watch (no checkpoint watch splitting the latency)",
    )
    ap.add_argument(
        "--deletion-policy",
        choices=("Retain", "Delete"),
        default="Retain",
        help="spec.deletionPolicy of the resources (Delete ones carry kopf's finalizer)",
    )
    ap.add_argument(
        "--window",
        type=float,
        default=130.0,
        help="seconds over which the requests of the waiting resources are counted",
    )
    ap.add_argument(
        "--step-retry",
        type=float,
        default=60.0,
        help="the operator's PRESHARD_STEP_RETRY_SECONDS here (its default is 300)",
    )
    ap.add_argument(
        "--ready",
        type=int,
        default=20,
        help="resources taken through Ready with the Job runner (0: skip)",
    )
    a = ap.parse_args(argv)
    try:
        sizes = [int(x) for x in str(a.n).split(",") if x.strip()]
    except ValueError:
        ap.error(f"--n takes sizes like 200 or 200,1000, not {a.n!r}")
    rc = 0
    for i, n in enumerate(sizes):
        if len(sizes) > 1:
            print(f"{'' if i == 0 else chr(10)}--- N={n} ---", flush=True)
        try:
            # Larger bursts take longer to drain: the wait grows with N.
            timeout = max(a.timeout, a.timeout * n / TARGET_N)
            rc |= run(
                n, a.workers, a.interval, a.settle, timeout, not a.no_phases, a.deletion_policy,
                window=a.window, step_retry=a.step_retry,
            )  # fmt: skip
        except RuntimeError as exc:
            print(f"operator scale benchmark could not run: {exc}", file=sys.stderr)
            rc = 1
    if a.ready > 0:
        print(f"\n--- through Ready: {a.ready} resources ---", flush=True)
        try:
            rc |= run_ready(a.ready, max(300.0, 15.0 * a.ready))
        except RuntimeError as exc:
            print(f"operator scale benchmark (through Ready) could not run: {exc}", file=sys.stderr)
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
