"""Run one vLLM engine in a child process: load (optionally saving raw shards), generate.

Everything that imports vLLM or torch for the conversion lives here, and it is imported
only inside the child process. Each engine runs in a fresh ``spawn``-ed process that is
the leader of its own process group, so that

* the engine's memory and vLLM's own worker processes are released when it ends (the
  conversion engine and the verification engine never coexist), and
* the parent can always stop the whole tree (timeout, Ctrl-C, a crashed child): the CLI
  never hangs and leaves no orphaned vLLM workers behind.

The parent and the child exchange plain picklable dataclasses over a pipe.

On vLLM's CPU platform (tests, the demo, laptops) the child applies the settings the CPU
backend needs (see DESIGN.md); on any other platform it uses vLLM's defaults apart from
what the caller passes explicitly.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import re
import signal
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from preshard.core.errors import ConversionFailed
from preshard.worker.engine.cpu import (
    CPU_MAX_MODEL_LEN,
    CPU_MAX_NUM_SEQS,
    cpu_env,
    cpu_memory_utilization,
)

log = logging.getLogger(__name__)

# Files that mark a model directory as carrying its own tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")
# Fixed prompts for the reference/verification comparison.
TEXT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Hello, my name is",
)
# Tokens generated per prompt for the reference/verification comparison (default;
# PRESHARD_VERIFY_TOKENS, read when a request is made), and the top-k log-probabilities
# recorded at every position.
MAX_TOKENS = 16
TOP_LOGPROBS = 5
# Wall-clock limit of one engine run (default; PRESHARD_ENGINE_TIMEOUT, read per run).
DEFAULT_TIMEOUT = 3 * 3600.0


def verify_tokens() -> int:
    """Tokens generated per prompt: PRESHARD_VERIFY_TOKENS, else MAX_TOKENS."""
    return int(os.environ.get("PRESHARD_VERIFY_TOKENS") or MAX_TOKENS)


def engine_timeout() -> float:
    """One engine run's wall-clock limit: PRESHARD_ENGINE_TIMEOUT, else DEFAULT_TIMEOUT."""
    return float(os.environ.get("PRESHARD_ENGINE_TIMEOUT") or DEFAULT_TIMEOUT)


@dataclass(frozen=True)
class Prompt:
    """A text prompt, or token ids when the model has no tokenizer."""

    text: str | None = None
    token_ids: tuple[int, ...] | None = None

    def describe(self) -> str:
        if self.text is not None:
            return repr(self.text)
        return f"token ids {list(self.token_ids or ())}"


@dataclass(frozen=True)
class EngineRequest:
    model: str
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    quantization: str | None = None
    dtype: str = "auto"
    load_format: str = "auto"
    prompts: tuple[Prompt, ...] = ()
    # Save each rank's raw (unprocessed) weights here while loading (load_format
    # preshard_raw, see vllm_raw_loader); None: no save (verification engine)
    save_dir: str | None = None
    pattern: str | None = None
    max_file_size: int | None = None
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None
    skip_tokenizer_init: bool = False
    max_tokens: int = field(default_factory=verify_tokens)
    top_logprobs: int = TOP_LOGPROBS
    extra_env: dict[str, str] = field(default_factory=dict)


# Per prompt, per generated position: the top-k (token id, log-probability), best first.
Logprobs = tuple[tuple[tuple[tuple[int, float], ...], ...], ...]


@dataclass(frozen=True)
class EngineOutcome:
    tokens: tuple[tuple[int, ...], ...]
    load_seconds: float
    generate_seconds: float
    save_seconds: float
    vllm_version: str
    platform: str
    settings: dict[str, Any]
    logprobs: Logprobs = ()


class EngineError(ConversionFailed):
    """The engine failed. ``stage`` is "load", "generate" or "save"; ``kind`` is the
    exception class name in the child ("" when the child died without a word). A
    ConversionFailed (transient) until the conversion path classifies it."""

    def __init__(self, message: str, *, stage: str, kind: str = "", detail: str = ""):
        super().__init__(message)
        self.stage = stage
        self.kind = kind
        self.detail = detail


def has_tokenizer(model_dir: str | os.PathLike[str]) -> bool:
    return any(os.path.exists(os.path.join(model_dir, f)) for f in TOKENIZER_FILES)


def default_prompts(config: dict[str, Any], *, tokenizer: bool) -> tuple[Prompt, ...]:
    """Text prompts when there is a tokenizer, otherwise fixed token ids within the vocab."""
    if tokenizer:
        return tuple(Prompt(text=t) for t in TEXT_PROMPTS)
    vocab = config.get("vocab_size")
    if not isinstance(vocab, int) and isinstance(config.get("text_config"), dict):
        vocab = config["text_config"].get("vocab_size")
    vocab = vocab if isinstance(vocab, int) and vocab > 16 else 32000
    seqs = ([1, 2, 3, 4, 5, 6, 7, 8], [100, 200, 300, 400], [11, 13, 17, 19, 23, 29])
    return tuple(Prompt(token_ids=tuple(3 + (i % (vocab - 3)) for i in s)) for s in seqs)


# ----------------------------------------------------------------------------- child side

# vLLM's switch between an engine core in its own process (1, its default) and in the
# caller's (0).
ENV_V1_MULTIPROCESSING = "VLLM_ENABLE_V1_MULTIPROCESSING"

# An exception line in vLLM's logs, e.g.
# "(Worker pid=7) ERROR 11-22 23:57:58 [multiproc_executor.py:953] ValueError: Missing keys"
_EXC_LINE = re.compile(
    r"^(?:\([^)]*pid=\d+\) )?(?:ERROR\s[^\]]*\] )?"
    r"(?P<exc>[A-Za-z_][\w.]*(?:Error|Exception|Exit)): (?P<msg>\S.*)$"
)
# Wrappers vLLM raises around the real failure of a background process.
_WRAPPER_MESSAGES = ("See root cause", "See stack trace", "initialization failed")


def find_root_cause(lines: list[str]) -> tuple[str, str] | None:
    """The first exception line in vLLM's log output that is not one of vLLM's wrapper
    exceptions: the real reason an engine process failed (vLLM reports the failure of a
    background process to the caller only as "Engine core initialization failed")."""
    for line in lines:
        m = _EXC_LINE.match(line.rstrip())
        if m and not any(w in m["msg"] for w in _WRAPPER_MESSAGES):
            return m["exc"].rsplit(".", 1)[-1], m["msg"]
    return None


class _StderrTee:
    """Copy everything written to fd 2 (by this process and every process it starts,
    which inherit fd 2) to the original stderr, keeping the last lines for diagnosis."""

    def __init__(self, keep: int = 400) -> None:
        self.lines: deque[str] = deque(maxlen=keep)
        self._orig = os.dup(2)
        r, w = os.pipe()
        os.dup2(w, 2)
        os.close(w)
        self._r = r
        self._partial = b""
        threading.Thread(target=self._pump, name="stderr-tee", daemon=True).start()

    def _pump(self) -> None:
        while True:
            try:
                chunk = os.read(self._r, 65536)
            except OSError:
                return
            if not chunk:
                return
            with contextlib.suppress(OSError):
                os.write(self._orig, chunk)
            data = self._partial + chunk
            *complete, self._partial = data.split(b"\n")
            for raw in complete:
                self.lines.append(raw.decode("utf-8", "replace"))

    def snapshot(self) -> list[str]:
        time.sleep(0.5)  # let the pump drain what the engine processes just wrote
        return list(self.lines)


def _engine_kwargs(req: EngineRequest, *, is_cpu: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "model": req.model,
        "tensor_parallel_size": req.tensor_parallel_size,
        "pipeline_parallel_size": req.pipeline_parallel_size,
        "dtype": req.dtype,
        "load_format": req.load_format,
        "skip_tokenizer_init": req.skip_tokenizer_init,
        "seed": 0,
    }
    if req.quantization:
        kwargs["quantization"] = req.quantization
    if req.gpu_memory_utilization is not None:
        kwargs["gpu_memory_utilization"] = req.gpu_memory_utilization
    if req.max_model_len is not None:
        kwargs["max_model_len"] = req.max_model_len
    if is_cpu:
        kwargs.setdefault(
            "gpu_memory_utilization",
            cpu_memory_utilization(req.tensor_parallel_size * req.pipeline_parallel_size),
        )
        kwargs["enforce_eager"] = True
        kwargs["max_num_seqs"] = CPU_MAX_NUM_SEQS
        if "max_model_len" not in kwargs:
            kwargs["max_model_len"] = CPU_MAX_MODEL_LEN
            with contextlib.suppress(Exception):
                import json

                with open(os.path.join(req.model, "config.json")) as f:
                    cfg = json.load(f)
                mpe = cfg.get("max_position_embeddings")
                if isinstance(mpe, int) and mpe > 0:
                    kwargs["max_model_len"] = min(mpe, CPU_MAX_MODEL_LEN)
    return kwargs


def _child_main(req: EngineRequest, conn: Connection) -> None:  # pragma: no cover - child
    """Entry point of the spawned engine process (module level, so spawn can import it)."""
    with contextlib.suppress(OSError):
        os.setsid()
    tee: _StderrTee | None = None
    with contextlib.suppress(OSError):
        tee = _StderrTee()
    stage = "load"
    try:
        os.environ.update(req.extra_env)
        if req.save_dir is not None:
            from preshard.worker.engine import raw_loader as raw

            # Inherited by vLLM's worker processes, where the loader runs.
            os.environ[raw.ENV_SAVE_DIR] = req.save_dir
            os.environ[raw.ENV_PATTERN] = req.pattern or ""
            os.environ[raw.ENV_MAX_SIZE] = str(req.max_file_size or "")
        # vLLM logs to stderr: stdout carries the PRESHARD-PROGRESS records.
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        # vLLM's engine core in this process: LLM.generate then queues every prompt before
        # the first step, so the conversion engine and the verification engine run the
        # same batches. With the engine core in a process of its own the first step starts
        # with whichever prompts have arrived over its socket (a timing race), and kernels
        # whose rounding depends on the batch (GPU GEMMs, some CPUs) then give the two
        # engines other log-probabilities over the same weights.
        os.environ.setdefault(ENV_V1_MULTIPROCESSING, "0")
        from vllm.platforms import current_platform

        is_cpu = bool(current_platform.is_cpu())
        settings: dict[str, Any] = {ENV_V1_MULTIPROCESSING: os.environ[ENV_V1_MULTIPROCESSING]}
        if is_cpu:
            extra = cpu_env(req.tensor_parallel_size * req.pipeline_parallel_size, os.environ)
            os.environ.update(extra)
            settings.update(extra)

        import vllm
        from vllm import LLM, SamplingParams

        kwargs = _engine_kwargs(req, is_cpu=is_cpu)
        if req.save_dir is not None:
            from preshard.worker.engine.raw_loader import LOAD_FORMAT, register

            register()  # this process (vLLM's own processes run the plugin entry point)
            kwargs["load_format"] = LOAD_FORMAT
        settings.update({k: v for k, v in kwargs.items() if k != "model"})
        t0 = time.monotonic()
        llm = LLM(**kwargs)
        t1 = time.monotonic()

        stage = "generate"
        params = SamplingParams(
            temperature=0.0,
            max_tokens=req.max_tokens,
            ignore_eos=True,
            logprobs=req.top_logprobs or None,
        )
        inputs: list[Any] = [
            p.text if p.text is not None else {"prompt_token_ids": list(p.token_ids or ())}
            for p in req.prompts
        ]
        tokens: tuple[tuple[int, ...], ...] = ()
        logprobs: Logprobs = ()
        if inputs:
            outputs = llm.generate(inputs, params, use_tqdm=False)
            tokens = tuple(tuple(int(t) for t in o.outputs[0].token_ids) for o in outputs)
            logprobs = tuple(_top_logprobs(o.outputs[0].logprobs) for o in outputs)
        t2 = time.monotonic()
        # The raw shards were written while loading (inside t1 - t0).
        save_seconds = 0.0
        conn.send(
            (
                "ok",
                EngineOutcome(
                    tokens=tokens,
                    load_seconds=t1 - t0,
                    generate_seconds=t2 - t1,
                    save_seconds=save_seconds,
                    vllm_version=str(vllm.__version__),
                    platform=str(current_platform.device_type or "unknown"),
                    settings=settings,
                    logprobs=logprobs,
                ),
            )
        )
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
    except BaseException as exc:
        kind, msg = type(exc).__name__, _one_line(exc)
        tb = traceback.format_exc()
        # vLLM re-raises a background process's failure as a generic RuntimeError.
        wrapped = kind == "EngineDeadError" or any(w in msg for w in _WRAPPER_MESSAGES)
        cause = find_root_cause(tee.snapshot()) if tee is not None and wrapped else None
        if cause:
            kind, msg = cause[0], _one_line(Exception(cause[1]))
        with contextlib.suppress(Exception):
            conn.send(("error", stage, kind, msg, tb))
    finally:
        with contextlib.suppress(Exception):
            conn.close()


def _top_logprobs(positions: Any) -> tuple[tuple[tuple[int, float], ...], ...]:
    """vLLM's per-position {token: Logprob} dicts as sorted (token, logprob) tuples."""
    out = []
    for pos in positions or ():
        items = [(int(tok), float(lp.logprob)) for tok, lp in pos.items()]
        items.sort(key=lambda x: (-x[1], x[0]))
        out.append(tuple(items))
    return tuple(out)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 1500 else text[:1500] + " ..."


# ---------------------------------------------------------------------------- parent side


def _kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _stop_tree(proc: multiprocessing.process.BaseProcess, grace: float = 10.0) -> None:
    """Stop the child and everything in its process group (vLLM engine core, workers)."""
    pid = proc.pid
    if pid is None:
        return
    _kill_group(pid, signal.SIGTERM)
    if proc.is_alive():
        proc.terminate()
    proc.join(grace)
    _kill_group(pid, signal.SIGKILL)
    if proc.is_alive():
        proc.kill()
    proc.join(5)


def _quiet_resource_tracker() -> None:
    """vLLM's engine processes leave semaphores that multiprocessing's resource tracker
    (a separate process, started with this environment) cleans up at exit, printing a
    'leaked semaphore' UserWarning after preshard's own last line. The cleanup is what
    matters; the warning is noise in a command's output."""
    rule = "ignore:resource_tracker:UserWarning"
    current = os.environ.get("PYTHONWARNINGS", "")
    if rule not in current.split(","):
        os.environ["PYTHONWARNINGS"] = f"{current},{rule}" if current else rule


def run_engine(
    req: EngineRequest,
    *,
    timeout: float | None = None,
    target: Callable[[EngineRequest, Connection], None] = _child_main,
) -> EngineOutcome:
    """Run ``req`` in a fresh spawned process; raise EngineError on any failure.

    ``target`` is the child's entry point (tests substitute a module-level function to
    exercise the process handling without vLLM).
    """
    timeout = engine_timeout() if timeout is None else timeout
    _quiet_resource_tracker()
    ctx = multiprocessing.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, args=(req, child_conn), name="preshard-vllm", daemon=False)
    proc.start()
    child_conn.close()
    deadline = time.monotonic() + timeout
    message: Any = None
    try:
        while True:
            if parent_conn.poll(1.0):
                try:
                    message = parent_conn.recv()
                except EOFError:
                    message = None
                break
            if not proc.is_alive():
                # Anything sent just before exiting is still in the pipe.
                if parent_conn.poll(0.5):
                    with contextlib.suppress(EOFError):
                        message = parent_conn.recv()
                break
            if time.monotonic() > deadline:
                raise EngineError(
                    f"vLLM engine did not finish within {int(timeout)} s "
                    "(PRESHARD_ENGINE_TIMEOUT); stopped it",
                    stage="timeout",
                )
        # The child shuts its engine down after answering; give it time to do so.
        proc.join(120)
    finally:
        _stop_tree(proc)
        parent_conn.close()
    if message is None:
        code = proc.exitcode
        if code is not None and code < 0:
            how = f"was killed by signal {-code}"
        else:
            how = f"exited with code {code}"
        hint = " (out of memory?)" if code == -signal.SIGKILL else ""
        raise EngineError(
            f"vLLM engine process {how}{hint} before reporting a result", stage="load"
        )
    if message[0] == "ok":
        outcome: EngineOutcome = message[1]
        return outcome
    _, stage, kind, msg, tb = message
    log.debug("vLLM engine failed in %s:\n%s", stage, tb)
    raise EngineError(f"{kind}: {msg}", stage=stage, kind=kind, detail=tb)
