"""``preshard convert --engine none`` for checkpoints whose engines cannot run on this
machine's CPU backend (block-FP8 needs AMX; vLLM 0.32's CPU backend cannot reload 4-bit
GPTQ raw shards; MLA + MoE), then ``preshard verify --against`` (which RE-PLANS from the
source with vLLM's weight loaders and rebuilds every tensor bit for bit), and one changed
element in a rank file (the manifest rewritten to match, so only the values are wrong)
fails it, naming the tensor. No engine and no kernel runs: these hold on every machine.

Real vLLM (its model classes and weight loaders, on the meta device) through the real
CLI in a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from preshard_dev import tinymodel

pytestmark = pytest.mark.vllm


def _preshard(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PRESHARD_TERMINATION_LOG": str(cwd / "termination-log")}
    return subprocess.run(
        [sys.executable, "-m", "preshard.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


def _model(kind: str, path: Path) -> Path:
    if kind == "block-fp8":
        return tinymodel.make_tiny_fp8_block(path)
    if kind == "gptq":
        dense = tinymodel.make_tiny_model("llama-gqa", path.parent / "dense")
        return tinymodel.quantize_gptq(dense, path)
    return tinymodel.make_tiny_model("deepseek-v2", path)


def _tamper(out: Path, key: str | None = None) -> str:
    """Change one element of the largest tensor (or ``key``) of rank 1's files and rewrite
    the manifest's sha256 and size for it: only the values are wrong."""
    paths = sorted(out.glob("model-rank-1-part-*.safetensors"))
    path = next(p for p in paths if key is None or key in load_file(str(p)))
    tensors = load_file(str(path))
    name = key or max(tensors, key=lambda k: tensors[k].numel())
    t = tensors[name].clone()
    flat = t.reshape(-1).view(torch.uint8)
    flat[flat.numel() // 2] ^= 0x01
    tensors[name] = t
    save_file(tensors, str(path))
    man_path = out / "preshard-manifest.json"
    man = json.loads(man_path.read_text())
    for f in man["files"]:
        if f["key"] == path.name:
            f["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
            f["size"] = path.stat().st_size
    man_path.write_text(json.dumps(man))
    return name


@pytest.mark.parametrize("kind", ["block-fp8", "gptq", "deepseek-v2"])
def test_engine_free_conversion_passes_verify_against_and_catches_one_element(
    kind: str, tmp_path: Path
) -> None:
    src = _model(kind, tmp_path / "src")
    out = tmp_path / "out"
    proc = _preshard(
        "convert", "--source", str(src), "-tp", "2", "--output", str(out), "--engine", "none",
        "--max-file-size", "256Ki", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    man = json.loads((out / "preshard-manifest.json").read_text())
    assert man["convertedOn"]["engine"] == "none"
    assert sorted(
        {f["key"].split("-part-")[0] for f in man["files"] if f["key"].startswith("model-")}
    ) == [
        "model-rank-0",
        "model-rank-1",
    ]
    proc = _preshard("verify", "--against", str(src), str(out), "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["ok"] is True and report["sharding"] == "re-planned"
    if kind == "block-fp8":
        # a tensor no loader writes (vLLM's KV-cache scale sentinel, -1.0): its value is
        # the model's own initialisation, which the planner records and verify checks
        scales = tmp_path / "scales"
        shutil.copytree(out, scales)
        cases = [(scales, _tamper(scales, "model.layers.1.self_attn.attn.k_scale"))]
    else:
        cases = []
    cases.append((out, _tamper(out)))
    for where, name in cases:
        proc = _preshard("verify", "--against", str(src), str(where), "--json", cwd=tmp_path)
        assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
        report = json.loads(proc.stdout)
        assert report["ok"] is False
        assert name in json.dumps(report), report
