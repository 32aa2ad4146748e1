"""``preshard convert`` failures that must happen before any vLLM engine starts: one clear
line on stderr, no traceback, the right exit code and termination message.

The CLI runs in a subprocess with the real storage/progress modules; the wrapper prints
on stdout whether the process imported torch or vLLM at all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from preshard.core.progress import Result

WRAPPER = (
    "import sys\n"
    "from preshard.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "print('HEAVY-IMPORTS', sorted(m for m in ('torch', 'vllm') if m in sys.modules))\n"
    "sys.exit(rc)\n"
)


def fake_model(d: Path, **config) -> Path:
    d.mkdir(parents=True)
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "num_hidden_layers": 2,
        "vocab_size": 512,
    }
    cfg.update(config)
    (d / "config.json").write_text(json.dumps(cfg))
    save_file(
        {"model.embed_tokens.weight": np.zeros((4, 4), np.float32)}, str(d / "model.safetensors")
    )
    return d


def convert_cli(tmp_path: Path, *args: str) -> tuple[int, str, list[str], Result | None, float]:
    term = tmp_path / "termination-log"
    env = {**os.environ, "PRESHARD_TERMINATION_LOG": str(term)}
    t0 = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            WRAPPER,
            "convert",
            *args,
            "--work-dir",
            str(tmp_path / "work"),
            "--progress",
            "lines",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    elapsed = time.monotonic() - t0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    # Everything else on stderr is INFO logging and the human progress display.
    errors = [
        line
        for line in lines
        if line.startswith("preshard:")
        or "Traceback" in line
        or "Error" in line
        or " ERROR " in line
        or " WARNING " in line
    ]
    result = Result.from_message(term.read_text()) if term.exists() else None
    return proc.returncode, proc.stdout, errors, result, elapsed


def test_wrong_tp_for_the_model_fails_before_vllm(tmp_path: Path) -> None:
    model = fake_model(tmp_path / "model")
    rc, stdout, errors, result, elapsed = convert_cli(
        tmp_path, "--source", str(model), "-tp", "4", "--output", str(tmp_path / "out")
    )
    assert rc == 3
    assert errors == [
        "preshard: error: tensorParallelSize 4 does not divide the model's 2 attention heads; "
        "use one of [1, 2]"
    ]
    assert result is not None
    assert (result.result, result.reason) == ("Failed", "TensorParallelSizeMismatch")
    assert "HEAVY-IMPORTS []" in stdout  # neither torch nor vLLM was even imported
    assert elapsed < 60
    assert not (tmp_path / "out").exists()
    assert (model / "model.safetensors").exists()  # the source is never touched


def test_kv_heads_not_divisible_fails_before_vllm(tmp_path: Path) -> None:
    model = fake_model(tmp_path / "model", num_attention_heads=6, num_key_value_heads=3)
    rc, stdout, errors, result, _ = convert_cli(
        tmp_path, "--source", str(model), "-tp", "2", "--output", str(tmp_path / "out")
    )
    assert rc == 3
    assert errors == [
        "preshard: error: tensorParallelSize 2 does not divide the model's 3 key/value heads"
    ]
    assert result is not None and result.reason == "TensorParallelSizeMismatch"
    assert "HEAVY-IMPORTS []" in stdout


def test_unknown_quantization_is_one_line(tmp_path: Path) -> None:
    model = fake_model(tmp_path / "model")
    rc, stdout, errors, result, _ = convert_cli(
        tmp_path,
        "--source",
        str(model),
        "-tp",
        "1",
        "--quantization",
        "fp3",
        "--output",
        str(tmp_path / "out"),
    )
    assert rc == 3
    assert len(errors) == 1
    assert errors[0].startswith("preshard: error: unknown quantization 'fp3'; supported: fp8, ")
    assert result is not None and result.reason == "UnknownQuantization"
    assert "HEAVY-IMPORTS []" in stdout


@pytest.mark.parametrize("case", ["missing", "no-config", "no-safetensors"])
def test_bad_source_is_permanent(tmp_path: Path, case: str) -> None:
    src = tmp_path / "model"
    if case != "missing":
        src.mkdir()
        if case == "no-safetensors":
            (src / "config.json").write_text("{}")
            (src / "pytorch_model.bin").write_bytes(b"x")
        else:
            (src / "model.safetensors").write_bytes(b"x")
    rc, stdout, errors, result, _ = convert_cli(
        tmp_path, "--source", str(src), "-tp", "1", "--output", str(tmp_path / "out")
    )
    assert rc == 3
    assert len(errors) == 1 and errors[0].startswith("preshard: error: ")
    assert str(src) in errors[0]
    assert "Traceback" not in errors[0]
    assert result is not None
    assert result.reason == ("SourceNotFound" if case == "missing" else "InvalidSource")
    assert "HEAVY-IMPORTS []" in stdout
