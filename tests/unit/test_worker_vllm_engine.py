"""The engine runner's pure parts and its process handling (without vLLM).

Process handling is exercised with substitute child entry points (module-level functions
below) instead of a vLLM engine: a real engine costs a minute; tests/vllm/ covers it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

import pytest

from preshard.worker.engine import cpu as vcpu
from preshard.worker.engine import process as ve
from preshard.worker.engine.process import EngineError, EngineOutcome, EngineRequest, Prompt


def test_omp_threads_bind_splits_cpus() -> None:
    assert vcpu.omp_threads_bind(1, [0, 1]) == "0,1"
    assert vcpu.omp_threads_bind(2, [0, 1]) == "0|1"
    assert vcpu.omp_threads_bind(2, [4, 5, 6, 7, 8]) == "4,5,6|7,8"
    assert vcpu.omp_threads_bind(4, [0, 1]) == "0|1|0|1"  # fewer CPUs than workers: shared
    assert vcpu.omp_threads_bind(3, [3]) == "3|3|3"
    with pytest.raises(ValueError):
        vcpu.omp_threads_bind(0, [0])


def test_omp_threads_bind_defaults_to_affinity() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    assert vcpu.omp_threads_bind(1) == ",".join(map(str, cpus))


def test_cpu_env_keeps_user_settings() -> None:
    env = vcpu.cpu_env(2, {})
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert env["VLLM_CPU_OMP_THREADS_BIND"].count("|") == 1
    assert (
        vcpu.cpu_env(2, {"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_OMP_THREADS_BIND": "0-1|2-3"})
        == {}
    )


def test_engine_kwargs_cpu_vs_other(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"max_position_embeddings": 131072}')
    req = EngineRequest(model=str(tmp_path), tensor_parallel_size=2, quantization="fp8")
    cpu = ve._engine_kwargs(req, is_cpu=True)
    assert cpu["enforce_eager"] is True
    # derived from the pod's memory (tests/unit/test_worker_resources.py)
    assert cpu["gpu_memory_utilization"] == vcpu.cpu_memory_utilization(2)
    assert cpu["max_model_len"] == vcpu.CPU_MAX_MODEL_LEN
    assert cpu["quantization"] == "fp8" and cpu["tensor_parallel_size"] == 2
    gpu = ve._engine_kwargs(req, is_cpu=False)
    # On GPUs vLLM's own defaults apply.
    for key in ("enforce_eager", "gpu_memory_utilization", "max_model_len", "max_num_seqs"):
        assert key not in gpu
    explicit = EngineRequest(model=str(tmp_path), gpu_memory_utilization=0.5, max_model_len=64)
    assert ve._engine_kwargs(explicit, is_cpu=True)["gpu_memory_utilization"] == 0.5
    assert ve._engine_kwargs(explicit, is_cpu=False)["max_model_len"] == 64
    (tmp_path / "config.json").write_text('{"max_position_embeddings": 128}')
    assert ve._engine_kwargs(req, is_cpu=True)["max_model_len"] == 128


def test_default_prompts() -> None:
    text = ve.default_prompts({}, tokenizer=True)
    assert [p.text for p in text] == list(ve.TEXT_PROMPTS)
    ids = ve.default_prompts({"vocab_size": 20}, tokenizer=False)
    assert all(p.text is None and p.token_ids for p in ids)
    assert all(0 <= t < 20 for p in ids for t in p.token_ids or ())
    nested = ve.default_prompts({"text_config": {"vocab_size": 50}}, tokenizer=False)
    assert max(t for p in nested for t in p.token_ids or ()) < 50
    assert Prompt(token_ids=(1, 2)).describe() == "token ids [1, 2]"
    assert Prompt(text="hi").describe() == "'hi'"


def test_has_tokenizer(tmp_path: Path) -> None:
    assert not ve.has_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    assert ve.has_tokenizer(tmp_path)


def test_find_root_cause_skips_vllm_wrappers_and_warnings() -> None:
    lines = [
        "(preshard-vllm pid=9) WARNING 11-22 23:52:39 [base.py:380] ValueError: Tokenizer not "
        "available when `skip_tokenizer_init=True`",
        "(Worker pid=11) ERROR 11-22 23:57:58 [multiproc_executor.py:953]     raise "
        'ValueError(f"Missing keys")',
        "(Worker pid=11) ERROR 11-22 23:57:58 [multiproc_executor.py:953] ValueError: Missing "
        "keys ('model.layers.0.self_attn.qkv_proj.weight',) in loaded state!",
        "(EngineCore pid=10) ERROR 11-22 23:57:59 [core.py:1510] Exception: WorkerProc "
        "initialization failed due to an exception in a background process. See stack trace",
        "RuntimeError: Engine core initialization failed. See root cause above.",
    ]
    assert ve.find_root_cause(lines) == (
        "ValueError",
        "Missing keys ('model.layers.0.self_attn.qkv_proj.weight',) in loaded state!",
    )
    assert ve.find_root_cause(lines[3:]) is None
    assert ve.find_root_cause(["torch.OutOfMemoryError: CPU out of memory"]) == (
        "OutOfMemoryError",
        "CPU out of memory",
    )


# -- process handling with substitute child entry points ---------------------------------


def child_ok(req: EngineRequest, conn: Connection) -> None:
    conn.send(
        (
            "ok",
            EngineOutcome(
                tokens=((1, 2),),
                load_seconds=1.0,
                generate_seconds=0.0,
                save_seconds=0.0,
                vllm_version="x",
                platform="test",
                settings={"model": req.model},
            ),
        )
    )


def child_error(req: EngineRequest, conn: Connection) -> None:
    conn.send(("error", "load", "ValueError", "bad model", "Traceback ..."))


def child_dies(req: EngineRequest, conn: Connection) -> None:
    os._exit(7)


def child_hangs_with_grandchild(req: EngineRequest, conn: Connection) -> None:
    os.setsid()
    # Like vLLM's engine core: a process of its own, in the child's process group.
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    Path(req.model).write_text(str(proc.pid))
    time.sleep(300)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_run_engine_returns_outcome() -> None:
    out = ve.run_engine(EngineRequest(model="/m"), target=child_ok, timeout=60)
    assert out.tokens == ((1, 2),) and out.settings == {"model": "/m"}


def test_run_engine_reports_child_error() -> None:
    with pytest.raises(EngineError) as ei:
        ve.run_engine(EngineRequest(model="/m"), target=child_error, timeout=60)
    assert str(ei.value) == "ValueError: bad model"
    assert ei.value.stage == "load" and ei.value.kind == "ValueError"


def test_run_engine_child_dies_without_a_word() -> None:
    with pytest.raises(EngineError, match="exited with code 7 before reporting a result") as ei:
        ve.run_engine(EngineRequest(model="/m"), target=child_dies, timeout=60)
    assert ei.value.kind == ""


def test_run_engine_timeout_stops_the_whole_process_tree(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    t0 = time.monotonic()
    with pytest.raises(EngineError, match="did not finish within 8 s") as ei:
        ve.run_engine(
            EngineRequest(model=str(pidfile)), target=child_hangs_with_grandchild, timeout=8
        )
    assert ei.value.stage == "timeout"
    assert time.monotonic() - t0 < 60
    grandchild = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(grandchild):  # clean up before failing
        os.kill(grandchild, signal.SIGKILL)
        pytest.fail("the engine's grandchild process survived the timeout")


SIGTERM_SCRIPT = """
import signal, sys
from preshard.worker.conversion import common
from preshard.worker.commands import runner
from preshard.worker.progress import Terminated
from preshard.worker.engine.process import EngineRequest, run_engine
from test_worker_vllm_engine import child_hangs_with_grandchild

if __name__ == "__main__":
    signal.signal(signal.SIGTERM, runner._on_sigterm)
    try:
        run_engine(EngineRequest(model=sys.argv[1]), target=child_hangs_with_grandchild)
    except Terminated:
        print("TERMINATED", flush=True)
        sys.exit(143)
"""


def test_sigterm_stops_the_engine_tree(tmp_path: Path) -> None:
    """What `preshard convert` does on SIGTERM (pod deletion, Ctrl-C elsewhere): the
    engine's whole process group goes, nothing is left running."""
    pidfile = tmp_path / "grandchild.pid"
    script = tmp_path / "term.py"
    script.write_text(SIGTERM_SCRIPT)
    path = [str(Path(__file__).parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(pidfile)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        deadline = time.monotonic() + 60
        while not pidfile.exists() or not pidfile.read_text():
            assert time.monotonic() < deadline, "the substitute engine never started"
            assert proc.poll() is None, "the runner exited early"
            time.sleep(0.2)
        grandchild = int(pidfile.read_text())
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143 and "TERMINATED" in out
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(grandchild):
        os.kill(grandchild, signal.SIGKILL)
        pytest.fail("the engine's grandchild process survived SIGTERM")
