"""Session-scoped conversions with real vLLM (CPU build), shared by the tests here.

Every conversion costs two engine loads (convert + verify, ~20-40 s each on the shared
2-core machine), so each one runs once per session:

* ``converted_tp1``: the ``preshard convert`` CLI in a subprocess, TP=1, a model with a
  tokenizer (text prompts), local output directory.
* ``converted_tp2``: the pipeline in-process (to see the greedy tokens), TP=2, a model
  with ONE KV head (replicated across ranks), tied embeddings and no tokenizer, from a
  real S3 server on 127.0.0.1 to the same server (real fetch and publish).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from preshard.core.progress import ProgressRecord, Result, parse_progress_line
from preshard_dev.tinymodel import make_tiny_llama


@dataclass
class CliRun:
    rc: int
    stdout: str
    stderr: str
    result: Result | None
    output: Path
    work_dir: Path
    elapsed: float

    @property
    def progress(self) -> list[ProgressRecord]:
        recs = [parse_progress_line(line) for line in self.stdout.splitlines()]
        return [r for r in recs if r is not None]

    @property
    def last_stderr_line(self) -> str:
        """preshard's own last line (its summary or its one error line).

        Python's multiprocessing resource tracker may print a leaked-semaphore warning
        for vLLM's engine processes after it, when the process exits."""
        lines = [line for line in self.stderr.splitlines() if line.startswith("preshard:")]
        return lines[-1] if lines else ""


def run_convert_cli(
    base: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 900
) -> CliRun:
    base.mkdir(parents=True, exist_ok=True)
    term = base / "termination-log"
    output = base / "out"
    work = base / "work"
    full_env = {**os.environ, "PRESHARD_TERMINATION_LOG": str(term), **(env or {})}
    t0 = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "preshard.cli",
            "convert",
            *args,
            "--work-dir",
            str(work),
            "--progress",
            "lines",
        ],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=base,
    )
    elapsed = time.monotonic() - t0
    result = Result.from_message(term.read_text()) if term.exists() else None
    return CliRun(proc.returncode, proc.stdout, proc.stderr, result, output, work, elapsed)


@pytest.fixture(scope="session")
def tiny_tokenizer_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 heads, 2 KV heads, untied, with a tokenizer."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-tok"), num_kv_heads=2, seed=0)


@pytest.fixture(scope="session")
def tiny_kv1_tied_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 heads, 1 KV head, tied embeddings, no tokenizer."""
    return make_tiny_llama(
        tmp_path_factory.mktemp("tiny-kv1"),
        num_kv_heads=1,
        tie_embeddings=True,
        seed=1,
        tokenizer=False,
    )


@pytest.fixture(scope="session")
def converted_tp1(tiny_tokenizer_model: Path, tmp_path_factory: pytest.TempPathFactory) -> CliRun:
    base = tmp_path_factory.mktemp("convert-tp1")
    run = run_convert_cli(
        base,
        "--source",
        str(tiny_tokenizer_model),
        "--tensor-parallel-size",
        "1",
        "--output",
        str(base / "out"),
        "--owner",
        "ns/tiny-tp1/uid-1",
        # the engine path (the tests here check its engine verification)
        "--engine",
        "vllm",
    )
    return run


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


@dataclass
class InProcessRun:
    outcome: Any  # preshard.worker.conversion.common.ConvertOutcome
    server: Any  # preshard_dev.s3server.RcloneS3
    source: str
    output: str
    elapsed: float


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real S3 server (rclone serve s3) on 127.0.0.1, a free port."""
    from preshard_dev.s3server import RcloneS3

    server = RcloneS3(tmp_path_factory.mktemp("s3-root"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def converted_tp2(
    tiny_kv1_tied_model: Path, s3_server: Any, tmp_path_factory: pytest.TempPathFactory
) -> InProcessRun:
    """TP=2 from S3 to S3 through ``engine_path.convert`` in this process (the engines still
    run in spawned children), so the test sees the reference and the reloaded tokens."""
    from preshard.cli import build_parser
    from preshard.worker.conversion import common, engine_path
    from preshard.worker.progress import Reporter

    s3_server.create_bucket("models")
    s3_server.create_bucket("shards")
    client = s3_server.client()
    for p in tiny_kv1_tied_model.iterdir():
        client.upload_file(str(p), "models", f"tiny-kv1/{p.name}")
    source, output = "s3://models/tiny-kv1/", "s3://shards/tiny-kv1-tp2/"
    base = tmp_path_factory.mktemp("convert-tp2")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in s3_server.env().items():
            mp.setenv(k, v)
        args = build_parser().parse_args(
            [
                "convert",
                "--source",
                source,
                "--tensor-parallel-size",
                "2",
                "--output",
                output,
                "--work-dir",
                str(base / "work"),
                "--max-file-size",
                "128Ki",
                "--owner",
                "ns/tiny-tp2/uid-2",
                # the engine path (the tests here check its reference and reload tokens)
                "--engine",
                "vllm",
            ]
        )
        t0 = time.monotonic()
        outcome = engine_path.convert(common.ConvertRequest.from_args(args), Reporter(mode="lines"))
    return InProcessRun(outcome, s3_server, source, output, time.monotonic() - t0)


@pytest.fixture(scope="session")
def converted_pp2(tiny_tokenizer_model: Path, tmp_path_factory: pytest.TempPathFactory) -> CliRun:
    """PP=2 with --no-verify: vLLM 0.32's CPU backend cannot generate with pipeline
    parallelism (KeyError in the scheduler, vLLM issue #32701), so the token comparison
    cannot run; the test reloads the shards itself."""
    base = tmp_path_factory.mktemp("convert-pp2")
    return run_convert_cli(
        base,
        "--source",
        str(tiny_tokenizer_model),
        "--tensor-parallel-size",
        "1",
        "--pipeline-parallel-size",
        "2",
        "--no-verify",
        "--output",
        str(base / "out"),
        # the engine's conversion (its traces, kept in <work>/traces, are what the
        # engine-free writer is held to at PP=2)
        "--engine",
        "vllm",
    )
