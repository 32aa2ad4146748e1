"""``preshard demo`` itself, as a subprocess: what it prints and that it stops everything.

The worker is the fast stand-in (PRESHARD_DEMO_WORKER=standin) so this runs in seconds;
the real-vLLM path of the same components is test_happy_path.py.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.e2e


def children_of(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_demo_runs_to_ready_prints_the_result_and_stops_everything(tmp_path: Path) -> None:
    env = {**os.environ, "PRESHARD_DEMO_WORKER": "standin"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "preshard.cli", "demo", "--dir", str(tmp_path / "demo")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen: list[psutil.Process] = []
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        seen = seen or [p for p in children_of(proc.pid) if "rclone" in p.name()]
        time.sleep(0.5)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "== kubectl apply -f examples/tiny-tp2.yaml" in out
    assert "tiny-tp2        Succeeded" in out and "Published" in out
    # the example converts on CPU: read back from the Job the operator created
    assert re.search(
        r"conversion Job tiny-tp2-[0-9a-f]{10}: requests cpu: 2.*; no GPU requested", out
    )
    assert "== objects under s3://preshard-checkpoints/tiny-llama/tp2/" in out
    assert "model-rank-0-part-0.safetensors" in out and "model-rank-1-part-0.safetensors" in out
    assert "preshard-manifest.json" in out
    assert "== serving ConfigMap default/tiny-tp2-serving" in out
    assert "LOAD_FORMAT: runai_streamer_sharded" in out
    assert "is Ready" in out and "== stopped" in out
    # the logs it points at exist
    logs = tmp_path / "demo" / "logs"
    assert (logs / "operator.log").stat().st_size > 0 and (logs / "s3.log").exists()
    assert seen, "the demo never started an S3 server"
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in seen)


def test_demo_stops_everything_on_ctrl_c(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PRESHARD_DEMO_WORKER": "standin",
        "PRESHARD_STANDIN_SECONDS": "60",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "preshard.cli", "demo", "--dir", str(tmp_path / "demo")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    kids: list[psutil.Process] = []
    while time.monotonic() < deadline:
        kids = children_of(proc.pid)
        if any("standin" in " ".join(k.cmdline()) for k in kids if k.is_running()):
            break
        time.sleep(0.5)
    assert any("standin" in " ".join(k.cmdline()) for k in kids), "the conversion never started"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "interrupted: stopping everything" in out and "== stopped" in out
    time.sleep(1)
    alive = [k for k in kids if k.is_running() and k.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [k.cmdline() for k in alive]
