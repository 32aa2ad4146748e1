"""End-to-end fixtures: the whole product on 127.0.0.1 (preshard_dev.stack.LocalStack).

Real parts: the API emulator over HTTP, ``rclone serve s3``, the real operator
(``preshard operator`` as a subprocess) and the real worker (``preshard convert``) or,
where a test says so, the fast stand-in worker (``preshard_dev.standin``: the real
argument parser, progress reporter, S3 publish and termination message; fake shards
instead of vLLM). What cannot run here, the Job controller and the kubelet, is played by
the local Job runner (``preshard_dev.jobrunner``), which runs each Job's container
command as a local process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from preshard_dev.stack import LocalStack
from preshard_dev.standin import standin_weights

STANDIN = {"preshard": [sys.executable, "-m", "preshard_dev.standin"]}


def standin_stack(base: Path, **kw: Any) -> LocalStack:
    opts = dict(kw.pop("runner_options", {}))
    opts.setdefault("command_map", STANDIN)
    return LocalStack(base, runner_options=opts, **kw)


@pytest.fixture
def stack_factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    """Start stacks on demand; stop them all at the end, dumping logs on failure."""
    started: list[LocalStack] = []

    def make(**kw: Any) -> LocalStack:
        real = kw.pop("real_worker", False)
        base = tmp_path / f"stack{len(started)}"
        st = LocalStack(base, **kw) if real else standin_stack(base, **kw)
        started.append(st)
        return st.start()

    yield make
    for st in started:
        st.stop()


def status_of(stack: LocalStack, ns: str, name: str) -> dict[str, Any]:
    return dict((stack.checkpoint(ns, name) or {}).get("status") or {})


def ready_condition(status: dict[str, Any]) -> dict[str, Any]:
    return next((dict(c) for c in status.get("conditions") or [] if c["type"] == "Ready"), {})


def wait_phase(
    stack: LocalStack, ns: str, name: str, phases: tuple[str, ...], timeout: float
) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        s = status_of(stack, ns, name)
        return s if s.get("phase") in phases else None

    try:
        return dict(stack.wait_for(check, timeout, f"{ns}/{name} phase in {phases}"))
    except TimeoutError as exc:
        raise AssertionError(
            f"{exc}\n--- operator log tail ---\n{stack.operator_log()[-4000:]}\n"
            f"--- runner history ---\n{stack.runner.history if stack.runner else None}"
        ) from None


STEP_JOB_MARKERS = ("-preflight-", "-adopt-", "-copy-", "-withdraw-", "-purge-")


def is_conversion_pod(job_or_pod_name: str) -> bool:
    """A pod (or Job) of a conversion Job, not of a CPU step (preflight, adopt, copy,
    withdraw) or a purge."""
    return not any(m in job_or_pod_name for m in STEP_JOB_MARKERS)


def conversion_history(stack: LocalStack) -> list[dict[str, Any]]:
    assert stack.runner is not None
    return [h for h in stack.runner.history if is_conversion_pod(h["job"])]


def checkpoint_doc(name: str, tp: int = 2, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "source": {"uri": "s3://preshard-models/tiny-llama/"},
        "tensorParallelSize": tp,
        "output": {
            "uri": f"s3://preshard-checkpoints/{name}/",
            "credentialsSecret": "preshard-s3",
        },
        "converter": {"backoffLimit": 2, "activeDeadlineSeconds": 600},
    }
    body.update(spec)
    return {
        "apiVersion": "preshard.io/v1alpha1",
        "kind": "ShardedCheckpoint",
        "metadata": {"name": name},
        "spec": body,
    }


def seed_fake_source(stack: LocalStack) -> None:
    """A source prefix for the stand-in (it only checks that the source exists; the
    preflight also wants a config.json and *.safetensors weights)."""
    client = stack.s3_client()
    client.put_object(Bucket="preshard-models", Key="tiny-llama/config.json", Body=b"{}")
    client.put_object(
        Bucket="preshard-models", Key="tiny-llama/model.safetensors", Body=standin_weights()
    )


def cli(
    stack: LocalStack, *args: str, endpoint: str | None = None
) -> subprocess.CompletedProcess[str]:
    assert stack.s3 is not None
    env = {
        **os.environ,
        **stack.s3.env(),
        "AWS_ENDPOINT_URL_S3": endpoint or stack.s3.endpoint,
    }
    return subprocess.run(
        [sys.executable, "-m", "preshard.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
