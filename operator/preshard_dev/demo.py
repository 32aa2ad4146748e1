"""``preshard demo``: the whole product on 127.0.0.1 in one command (dev tooling).

Starts the API emulator, an S3 server, the real operator and the local Job runner
(:mod:`preshard_dev.stack`), uploads a generated tiny Llama, applies
``examples/tiny-tp2.yaml``, shows the resource's progress like ``kubectl get -w`` and
prints the final status, the published files and the serving ConfigMap. Component logs
go to files under ``--dir``; the demo prints their paths.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from preshard.core.quantity import format_bytes
from preshard_dev.stack import OUTPUT_BUCKET, ROOT, LocalStack

DEFAULT_EXAMPLE = ROOT / "examples" / "tiny-tp2.yaml"
TIMEOUT_SECONDS = 20 * 60
TERMINAL = ("Succeeded", "Failed")


def say(text: str = "") -> None:
    print(text, flush=True)


def _ready(status: dict[str, Any]) -> dict[str, Any]:
    for c in status.get("conditions") or []:
        if c.get("type") == "Ready":
            return dict(c)
    return {}


def _age(start: float) -> str:
    s = int(time.monotonic() - start)
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _progress(status: dict[str, Any]) -> str:
    p = status.get("progress") or {}
    stage = p.get("stage") or ""
    done, total = p.get("bytesDone"), p.get("bytesTotal")
    if total:
        return f"{stage} {format_bytes(int(done or 0))}/{format_bytes(int(total))}"
    return stage


def row(name: str, status: dict[str, Any], age: str) -> list[str]:
    ready = _ready(status)
    return [
        name,
        str(status.get("phase") or "-"),
        _progress(status) or "-",
        str(ready.get("status") or "-"),
        str(ready.get("reason") or "-"),
        age,
    ]


def fmt(cols: list[str]) -> str:
    widths = (14, 10, 30, 6, 22, 6)
    return "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip()


def _quiet_logging(log_file: Path) -> None:
    """Component logs go to a file; the terminal shows what a person wants to see."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def _load_example(path: Path) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    for d in docs:
        if d.get("kind") == "ShardedCheckpoint":
            return dict(d)
    raise SystemExit(f"preshard demo: {path} holds no ShardedCheckpoint")


def watch(stack: LocalStack, ns: str, name: str, timeout: float) -> dict[str, Any]:
    """Print a line each time the resource's phase, stage, progress or Ready changes."""
    start = time.monotonic()
    say(fmt(["NAME", "PHASE", "PROGRESS", "READY", "REASON", "AGE"]))
    last: list[str] | None = None
    last_print = 0.0
    shown_logs: set[str] = set()
    while time.monotonic() - start < timeout:
        obj = stack.checkpoint(ns, name) or {}
        status = dict(obj.get("status") or {})
        cols = row(name, status, _age(start))
        # a new line on every change, and a heartbeat every 30 s while nothing changes
        if cols[:5] != (last or [])[:5] or time.monotonic() - last_print > 30:
            say(fmt(cols))
            last, last_print = cols, time.monotonic()
        if stack.runner is not None:
            for pod, path in stack.runner.pod_logs().items():
                if pod not in shown_logs:
                    shown_logs.add(pod)
                    say(f"  (pod {pod}: its log, vLLM's included, is in {path})")
        if status.get("phase") in TERMINAL and status.get("observedGeneration") == (
            obj.get("metadata") or {}
        ).get("generation"):
            return status
        if STOP.wait(1):
            raise Interrupted
    raise TimeoutError(f"{ns}/{name} did not finish within {timeout / 60:.0f} minutes")


EXTENDED_NON_GPU = ("cpu", "memory", "ephemeral-storage")


def job_resources(job: dict[str, Any]) -> str:
    """What the conversion Job asked Kubernetes for, read from the Job itself."""
    containers = ((job.get("spec") or {}).get("template") or {}).get("spec", {}).get("containers")
    res = (containers or [{}])[0].get("resources") or {}
    asked = {**(res.get("requests") or {}), **(res.get("limits") or {})}
    extended = {
        k: v
        for k, v in asked.items()
        if k not in EXTENDED_NON_GPU and not k.startswith("hugepages-")
    }
    plain = ", ".join(f"{k}: {asked[k]}" for k in EXTENDED_NON_GPU if k in asked) or "nothing"
    if extended:
        gpus = ", ".join(f"{v} {k}" for k, v in sorted(extended.items()))
        return f"requests {plain}; accelerators: {gpus}"
    return f"requests {plain}; no GPU requested"


def report(stack: LocalStack, ns: str, name: str, status: dict[str, Any]) -> None:
    say()
    say(f"== status of shardedcheckpoint {ns}/{name}")
    say(
        f"phase: {status.get('phase')}    path: {status.get('path')}    "
        f"job: {status.get('jobName')}    identity: {status.get('identity')}"
    )
    for job in stack.jobs(ns):
        if job["metadata"]["name"] == status.get("jobName"):
            say(f"conversion Job {job['metadata']['name']}: {job_resources(job)}")
    for c in status.get("conditions") or []:
        say(f"  {c['type']:<11} {c['status']:<6} {c.get('reason', ''):<22} {c.get('message', '')}")
    artifact = status.get("artifact") or {}
    if artifact:
        say()
        say("== artifact")
        say(yaml.safe_dump(artifact, sort_keys=False).rstrip())
        uri = str(artifact.get("uri", ""))
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        listing = stack.list_prefix(bucket or OUTPUT_BUCKET, prefix)
        say()
        say(f"== objects under {uri}")
        for key, size in sorted(listing.items()):
            say(f"  {size:>12,d}  {key.removeprefix(prefix)}")
        say(f"  {sum(listing.values()):>12,d}  total ({len(listing)} objects)")
    serving = status.get("serving") or {}
    if serving:
        cm_name = serving.get("configMapName") or f"{name}-serving"
        cm = stack.configmap(ns, cm_name) or {}
        say()
        say(f"== serving ConfigMap {ns}/{cm_name} (envFrom it in a vLLM Deployment)")
        for k, v in sorted((cm.get("data") or {}).items()):
            say(f"  {k}: {v}")


def keep_running(stack: LocalStack, ns: str, name: str) -> None:
    assert stack.s3 is not None
    creds = stack.base_dir / "credentials.env"
    creds.write_text(
        f"export AWS_ENDPOINT_URL_S3={stack.s3_endpoint}\n"
        f"export AWS_ACCESS_KEY_ID={stack.s3.access_key}\n"
        f"export AWS_SECRET_ACCESS_KEY={stack.s3.secret_key}\n"
    )
    kc = f"kubectl --kubeconfig {stack.kubeconfig}"
    say()
    say("== everything keeps running; Ctrl-C stops it. In another terminal:")
    say(f"  {kc} get sckpt -n {ns} -o wide")
    say(f"  {kc} get jobs,pods,configmaps -n {ns}")
    say(f"  {kc} delete sckpt -n {ns} {name}    # deletionPolicy: Delete purges the output")
    say(
        f"  {kc} patch sckpt -n {ns} {name} --type=merge "
        """-p '{"spec":{"deletionPolicy":"Retain"}}'; then delete it and apply it again: """
        "Ready by adoption, no conversion (-o wide: PATH Adopted)"
    )
    say(f"  source {creds}    # S3 endpoint {stack.s3_endpoint} and the local server's keys")
    say("  .venv/bin/preshard verify s3://preshard-checkpoints/tiny-llama/tp2/")
    say("  (the emulator takes JSON only: kubectl apply --validate=false -f FILE)")
    STOP.wait()
    raise Interrupted


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: stop everything."""


# Ctrl-C and SIGTERM only set this flag; the main loop notices it within a second. An
# exception raised at an arbitrary point (inside a client library holding a lock) could
# leave the shutdown waiting on that lock.
STOP = threading.Event()


def _on_signal(signum: int, frame: Any) -> None:
    STOP.set()


def run(args: argparse.Namespace) -> int:
    base = Path(args.dir).resolve()
    example = Path(args.example).resolve() if args.example else DEFAULT_EXAMPLE
    doc = _load_example(example)
    ns = (doc.get("metadata") or {}).get("namespace") or "default"
    name = doc["metadata"]["name"]
    # a fresh cluster and bucket each run; the generated model is reused
    for stale in ("s3", "jobs", "logs"):
        shutil.rmtree(base / stale, ignore_errors=True)
    (base / "logs").mkdir(parents=True, exist_ok=True)
    _quiet_logging(base / "logs" / "demo.log")
    STOP.clear()
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    runner_options: dict[str, Any] = {}
    if os.environ.get("PRESHARD_DEMO_WORKER") == "standin":
        # tests of the demo itself: the fast stand-in worker instead of vLLM
        runner_options["command_map"] = {"preshard": [sys.executable, "-m", "preshard_dev.standin"]}
        runner_options["base_env"] = {
            k: v for k, v in os.environ.items() if k.startswith("PRESHARD_STANDIN_")
        }
    stack = LocalStack(base, namespaces=(ns,), runner_options=runner_options)
    t0 = time.monotonic()
    try:
        say(f"== starting on 127.0.0.1 (logs in {stack.log_dir})")
        stack.start()
        assert stack.emulator is not None
        say(f"  Kubernetes API emulator  {stack.emulator.url}  (kubeconfig {stack.kubeconfig})")
        say(f"  S3 server (rclone)       {stack.s3_endpoint}  (log {stack.log_dir / 's3.log'})")
        say(f"  operator                 preshard operator  (log {stack.log_dir / 'operator.log'})")
        say(
            f"  local Job runner         runs Jobs as local processes; on a real cluster "
            f"Kubernetes runs them (log {stack.log_dir / 'demo.log'})"
        )
        model_dir = base / "model"
        src = stack.seed_tiny_model(model_dir)
        size = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
        say(f"  source model             {src}  (tiny random Llama, {format_bytes(size)})")
        say()
        say(
            f"== kubectl apply -f {example.relative_to(ROOT) if example.is_relative_to(ROOT) else example}"
        )
        if STOP.is_set():
            raise Interrupted
        stack.apply(doc, ns)
        status = watch(stack, ns, name, TIMEOUT_SECONDS)
        report(stack, ns, name, status)
        ok = _ready(status).get("status") == "True"
        say()
        say(
            f"== {'done' if ok else 'FAILED'} in {time.monotonic() - t0:.0f} s: "
            f"{ns}/{name} is {'Ready' if ok else 'not Ready: ' + str(_ready(status).get('message'))}"
        )
        if args.keep:
            keep_running(stack, ns, name)
        return 0 if ok else 1
    except (Interrupted, KeyboardInterrupt):
        say("\n== interrupted: stopping everything")
        return 130
    except Exception as exc:
        say(f"\npreshard demo: error: {exc}")
        say(f"  logs: {stack.log_dir}")
        return 1
    finally:
        stack.stop()
        say(f"== stopped (logs kept in {stack.log_dir})")


def main() -> int:  # pragma: no cover - python -m preshard_dev.demo
    from preshard import cli

    return cli.main(["demo", *sys.argv[1:]])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
