"""bench/engine_free.py's pure helpers: model sizing, the process-tree walk, the targets'
verdicts (the benchmark itself runs with `make bench BENCH=engine_free`)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "engine_free.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_engine_free", BENCH)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through it
    spec.loader.exec_module(mod)
    return mod


def test_model_bytes_equal_the_generated_model(bench: ModuleType, tmp_path: Path) -> None:
    # the formula against a real (small-vocabulary) model of the same family
    from safetensors import safe_open

    from preshard_dev.tinymodel import make_tiny_llama

    model = make_tiny_llama(
        tmp_path / "m", hidden=bench.HIDDEN, heads=32, num_kv_heads=8, layers=1,
        intermediate=bench.INTER, vocab=bench.VOCAB, tokenizer=False,
    )  # fmt: skip
    total = 0
    for p in model.glob("*.safetensors"):
        with safe_open(str(p), "pt") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                n = 1
                for d in sl.get_shape():
                    n *= d
                total += 2 * n
    assert bench.model_bytes(1) == total


def test_layers_for_the_issue_sizes(bench: ModuleType) -> None:
    for gib in (1.5, 4.0):
        n = bench.layers_for(int(gib * bench.GiB))
        assert bench.model_bytes(n) >= gib * bench.GiB > bench.model_bytes(n - 1)
    assert bench.layers_for(1) == 1
    assert bench.parse_sizes("1.5, 4") == [1.5, 4.0]
    with pytest.raises(ValueError):
        bench.parse_sizes("0")


def test_descendants_walk_the_tree_only(bench: ModuleType) -> None:
    parents = {10: 1, 11: 10, 12: 11, 13: 10, 20: 1, 21: 20}
    assert bench.descendants(10, parents) == {10, 11, 12, 13}
    assert bench.descendants(99, parents) == {99}


def test_measured_sums_the_process_tree(bench: ModuleType) -> None:
    # a parent and a child each holding ~64 MiB: the tree's peak counts both
    hold = "b = bytearray(64 << 20); import time; time.sleep(1.5)"
    code = f"import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', {hold!r}]); {hold}; p.wait()"
    rc, dt, peak, _ = bench.measured([sys.executable, "-c", code])
    assert rc == 0 and dt >= 1.5
    assert peak > 2 * 64 * 2**20
    assert os.getpid() not in bench.descendants(os.getpid() + 10**7, bench._parents())


def test_verdicts_and_flatness(bench: ModuleType) -> None:
    Run = bench.Run
    runs = {
        "none": Run("none", 10.0, 600 * 2**20),
        "engine": Run("engine", 150.0, 6 * 2**30),
        "cp": Run("cp", 4.0, None),
        "none_s3": Run("none_s3", 12.0, 700 * 2**20),
        "s5cmd": Run("s5cmd", 6.0, None),
    }
    lines = bench.verdicts(1.5, runs)
    assert lines == [
        "1.5 GiB: engine-free peak 600 MiB (target < 1024 MiB): met",
        "1.5 GiB: engine / engine-free = 15.0x (target >= 10x): met",
        "1.5 GiB: engine-free / cp = 2.50x (target <= 2x): NOT met",
        "1.5 GiB: engine-free to S3 / s5cmd S3->S3 = 2.00x",
    ]
    runs["none"] = Run("none", 10.0, 600 * 2**20, ok=False)
    assert bench.verdicts(1.5, runs) == ["1.5 GiB: engine-free to S3 / s5cmd S3->S3 = 2.00x"]
    assert bench.flatness([(4.0, 660 * 2**20), (1.5, 600 * 2**20)]) == (
        "engine-free peak at 4 GiB / at 1.5 GiB = 1.10x (the model grew 2.67x; flat means about 1)"
    )
    assert bench.flatness([(1.5, 1)]) is None


def test_stage_timings_and_the_streaming_share(bench: ModuleType) -> None:
    out = (
        "PRESHARD-PROGRESS {...}\n"
        "preshard: published /tmp/o/ (engine none; 2 rank files, 1.5 GiB; plan 8.5 s, "
        "convert 3.0 s, upload 0.5 s, total 12.0 s)\n"
    )
    stages = bench.stage_timings(out)
    assert stages == {"plan": 8.5, "convert": 3.0, "upload": 0.5, "total": 12.0}
    assert bench.stage_timings("no timings here\n") == {}
    Run = bench.Run
    runs = {"none": Run("none", 12.5, 600 * 2**20, stages=stages), "cp": Run("cp", 2.0, None)}
    assert bench.verdicts(1.5, runs)[1:] == [
        "1.5 GiB: engine-free / cp = 6.25x (target <= 2x): NOT met",
        "1.5 GiB: of which streaming the bytes (convert + upload stages) 3.5 s = 1.75x cp, "
        "the rest 9.0 s (start-up, vLLM's import, planning: fixed, independent of the size)",
    ]


def test_the_bench_is_registered() -> None:
    run = (BENCH.parent / "run.py").read_text()
    assert '"engine_free.py"' in run
    out = subprocess.run(
        [sys.executable, str(BENCH), "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--no-engine" in out
