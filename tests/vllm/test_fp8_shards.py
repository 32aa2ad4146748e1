"""Pre-quantized FP8 rank files (``convert --quantization fp8_per_tensor|fp8_per_block``,
``preshard.worker.fp8shards``), with the real vLLM (CPU build) in subprocesses.

No engine runs here (the reload where this machine has the kernels, and its comparison
with vLLM's online method, is tests/vllm/test_fp8_reload.py). What is proven here, on any
CPU, dense layers and MoE experts alike:

* the values: every FP8 weight and scale of every rank equals, bit for bit, what vLLM's
  own reference functions give for the raw rank tensors (``fp8_probe.py``: the online
  method's ``weight_amax`` / TP all-reduce MAX / ``_fp8_scale`` then
  ``QuantFP8.forward_native``; ``per_block_cast_to_fp8``), independently of the writer;
* the names, shapes and dtypes: each rank's state dict equals the state dict of vLLM's
  FP8 model built (meta device) from the PUBLISHED config.json, i.e. what stock vLLM's
  ``sharded_state`` loader fills (it requires exactly these keys);
* the bytes: linear weights take exactly half the bf16 bytes (printed per rank);
* the proof: ``preshard verify --against`` recomputes every tensor from the source and
  names one changed FP8 element, or one changed scale.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from preshard.core.manifest import MANIFEST_NAME
from preshard_dev.tinymodel import make_tiny_model

pytestmark = pytest.mark.vllm

PROBE = Path(__file__).with_name("fp8_probe.py")


def run(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PRESHARD_TERMINATION_LOG": str(cwd / "termination-log")}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout
    )


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 4 heads, 2 KV heads (fused qkv of unequal parts), hidden 256, 2 layers
    return make_tiny_model("llama-gqa", tmp_path_factory.mktemp("fp8-src") / "model")


@pytest.fixture(scope="module")
def converted(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("fp8-convert")
    proc = run(
        "-m", "preshard.cli", "convert", "--source", str(model), "-tp", "2",
        "--quantization", "fp8_per_tensor", "--engine", "none",
        "--output", str(base / "out"), "--work-dir", str(base / "work"), "--progress", "lines",
        cwd=base,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return base / "out"


def header(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        doc: dict[str, Any] = json.loads(f.read(n))
    doc.pop("__metadata__", None)
    return doc


def test_convert_publishes_an_fp8_checkpoint(converted: Path, model: Path) -> None:
    cfg = json.loads((converted / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "fp8", "activation_scheme": "dynamic"}
    src_cfg = json.loads((model / "config.json").read_text())
    assert {k: v for k, v in cfg.items() if k != "quantization_config"} == src_cfg
    man = json.loads((converted / MANIFEST_NAME).read_text())
    assert man["quantization"] == "fp8_per_tensor"
    assert man["extra"]["quantizedAtConversion"]["method"] == "fp8_per_tensor"
    assert man["verification"]["engineFree"]["quantizedShards"] == "fp8_per_tensor"
    # not the online note ("the rank files hold the weights before quantization")
    assert "quantization" not in man["verification"]
    # bytes per rank: every Linear weight (qkv, o, gate_up, down) in FP8, half of bf16;
    # embeddings, norms and lm_head stay bf16
    raw_linear = 0
    for rank in (0, 1):
        h = header(converted / f"model-rank-{rank}-part-0.safetensors")
        fp8 = {k: v for k, v in h.items() if v["dtype"] == "F8_E4M3"}
        assert sorted({k.rsplit(".", 2)[-2] for k in fp8}) == [
            "down_proj", "gate_up_proj", "o_proj", "qkv_proj",
        ]  # fmt: skip
        for key in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
            assert h[key]["dtype"] == "BF16"
        fp8_bytes = sum(v["data_offsets"][1] - v["data_offsets"][0] for v in fp8.values())
        n = sum(v["shape"][0] * v["shape"][1] for v in fp8.values())
        assert fp8_bytes == n  # one byte per element; bf16 would be 2 n
        raw_linear = 2 * n
        scales = {k: v for k, v in h.items() if k.endswith(".weight_scale")}
        assert len(scales) == len(fp8) and all(v["dtype"] == "F32" for v in scales.values())
        assert h["model.layers.0.self_attn.qkv_proj.weight_scale"]["shape"] == [3]
        size = (converted / f"model-rank-{rank}-part-0.safetensors").stat().st_size
        print(
            f"rank {rank}: {size} bytes; linear weights {fp8_bytes} bytes in FP8 "
            f"(bf16: {raw_linear}, ratio {fp8_bytes / raw_linear:.2f})"
        )


@pytest.mark.parametrize("method", ["fp8_per_tensor", "fp8_per_block"])
def test_values_equal_vllms_reference_quantization(
    method: str, model: Path, tmp_path: Path
) -> None:
    proc = run(str(PROBE), str(model), str(tmp_path), "2", method, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    assert result["mismatch"] == []
    assert result["checked"] == 2 * 8  # 2 ranks x (qkv, o, gate_up, down) x 2 layers
    assert result["modelMatches"] == [True, True]  # names/shapes/dtypes of vLLM's FP8 model
    if method == "fp8_per_tensor":  # vLLM's load-time requantize leaves every weight as is
        assert result["requantizeNoOp"] == [True] * 16
    for name, size in result["files"].items():
        raw = result["rawFiles"][name]
        print(f"{method} {name}: {size} bytes (bf16 raw: {raw}, {size / raw:.2f}x)")
        assert size < 0.62 * raw


def verify(converted: Path, model: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run(
        "-m", "preshard.cli", "verify", "--against", str(model), str(converted), "--json",
        cwd=cwd,
    )  # fmt: skip


def tamper(ckpt: Path, key: str, index: int, tmp: Path) -> Path:
    """A copy of ``ckpt`` with one byte of ``key`` (rank 0) changed and the manifest's
    sha256 updated to match (a consistent publication of a wrong value)."""
    import shutil

    out = tmp / "tampered"
    shutil.copytree(ckpt, out)
    name = "model-rank-0-part-0.safetensors"
    path = out / name
    h = header(path)
    with path.open("r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        pos = 8 + n + h[key]["data_offsets"][0] + index
        f.seek(pos)
        b = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([b ^ 0x01]))
    man = json.loads((out / MANIFEST_NAME).read_text())
    for entry in man["files"]:
        if entry["key"] == name:
            entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (out / MANIFEST_NAME).write_text(json.dumps(man))
    return out


def test_verify_against_recomputes_the_fp8_values(
    converted: Path, model: Path, tmp_path: Path
) -> None:
    proc = verify(converted, model, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert doc["ok"] and doc["method"] == "recomputed" and doc["scheme"] == "fp8_per_tensor"
    # 2 ranks x 8 linear layers x (weight, scale)
    assert doc["quantizedTensors"] == 32 and doc["checkedTensors"] > 32


@pytest.mark.parametrize(
    ("key", "index", "element"),
    [
        ("model.layers.1.mlp.down_proj.weight", 37, "[0, 37]"),  # one FP8 element
        ("model.layers.0.self_attn.qkv_proj.weight_scale", 5, "[1]"),  # one scale's byte
    ],
)
def test_verify_against_names_one_changed_value(
    key: str, index: int, element: str, converted: Path, model: Path, tmp_path: Path
) -> None:
    bad = tamper(converted, key, index, tmp_path)
    proc = verify(bad, model, tmp_path)
    assert proc.returncode == 3, proc.stderr[-2000:]
    doc = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert doc["ok"] is False and doc["reason"] == "VerificationFailed"
    assert f"{key} on rank 0" in doc["error"] and f"element {element}" in doc["error"]


def convert(model: Path, base: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    base.mkdir(parents=True, exist_ok=True)
    return run(
        "-m", "preshard.cli", "convert", "--source", str(model), "-tp", "2", "--engine", "none",
        "--output", str(base / "out"), "--work-dir", str(base / "work"), "--progress", "lines",
        *extra, cwd=base,
    )  # fmt: skip


def test_weights_raw_are_the_conversion_without_the_method(model: Path, tmp_path: Path) -> None:
    raw = convert(model, tmp_path / "raw", "--quantization", "fp8_per_tensor", "--weights", "raw")
    assert raw.returncode == 0, raw.stderr[-3000:]
    plain = convert(model, tmp_path / "plain")
    assert plain.returncode == 0, plain.stderr[-3000:]
    for rank in (0, 1):
        name = f"model-rank-{rank}-part-0.safetensors"
        a = (tmp_path / "raw" / "out" / name).read_bytes()
        assert a == (tmp_path / "plain" / "out" / name).read_bytes()
    cfg = json.loads((tmp_path / "raw" / "out" / "config.json").read_text())
    assert "quantization_config" not in cfg  # serving quantizes (with --quantization)
    man = json.loads((tmp_path / "raw" / "out" / MANIFEST_NAME).read_text())
    assert man["quantization"] == "fp8_per_tensor"
    assert "quantizedAtConversion" not in man.get("extra", {})


# MoE experts (vLLM's FusedMoE w13_weight [E, 2I/TP, H] and w2_weight [E, H, I/TP]):
# Mixtral-style (hidden 256, 4 heads, intermediate 256: 128 per rank, so per-block too)
# and DeepSeek-style (MLA, a shared expert, a dense first layer).
MOE_OVERRIDES = {"hidden_size": 256, "num_attention_heads": 4, "intermediate_size": 256}


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(
        "mixtral", tmp_path_factory.mktemp("fp8-moe") / "model", overrides=MOE_OVERRIDES
    )


@pytest.mark.parametrize(
    ("family", "method"),
    [
        ("mixtral", "fp8_per_tensor"),
        ("mixtral", "fp8_per_block"),
        ("deepseek-v2", "fp8_per_tensor"),
    ],
)
def test_moe_experts_equal_vllms_online_moe_quantization(
    family: str, method: str, moe: Path, tmp_path: Path
) -> None:
    """Every expert's FP8 values and scales equal what vLLM's online MoE methods compute
    (Fp8PerTensorOnlineMoEMethod: per-expert amax, MAX over the TP group, one static scale
    per expert; Fp8PerBlockOnlineMoEMethod: per_block_cast_to_fp8 per expert), and the
    fp8 checkpoint's load-time requantize of w13 (to the max of the w1/w3 scales) leaves
    every expert as it is."""
    src = moe if family == "mixtral" else make_tiny_model(family, tmp_path / "model")
    proc = run(str(PROBE), str(src), str(tmp_path), "2", method, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    assert result["mismatch"] == []
    experts = [k for k in result["quantizedKeys"] if "routed_experts.w" in k]
    assert len(experts) == (4 if family == "mixtral" else 2)  # w13 + w2 per MoE layer
    assert result["modelMatches"] == [True, True]
    if method == "fp8_per_tensor":
        assert result["requantizeNoOp"] == [True] * result["checked"]
    for name, size in result["files"].items():
        print(f"{family} {method} {name}: {size} bytes (bf16 raw: {result['rawFiles'][name]})")
        assert size < 0.62 * result["rawFiles"][name]


@pytest.fixture(scope="module")
def moe_converted(moe: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("fp8-moe-convert")
    proc = convert(moe, base, "--quantization", "fp8_per_tensor")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return base / "out"


def test_moe_convert_and_verify_against(moe_converted: Path, moe: Path, tmp_path: Path) -> None:
    h = header(moe_converted / "model-rank-0-part-0.safetensors")
    w13 = "model.layers.0.block_sparse_moe.experts.routed_experts.w13_weight"
    assert h[w13]["dtype"] == "F8_E4M3" and h[w13]["shape"] == [4, 256, 256]
    assert h[f"{w13}_scale"]["shape"] == [4, 2] and h[f"{w13}_scale"]["dtype"] == "F32"
    proc = verify(moe_converted, moe, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout[proc.stdout.index("{") :])
    # 2 ranks x 2 layers x (qkv, o, w13, w2) x (weight, scale)
    assert doc["ok"] and doc["quantizedTensors"] == 32


@pytest.mark.parametrize(
    ("key", "index", "element"),
    [
        # expert 2's w13, row 3, column 5 (one FP8 byte)
        ("model.layers.1.block_sparse_moe.experts.routed_experts.w13_weight",
         (2 * 256 + 3) * 256 + 5, "[2, 3, 5]"),
        # expert 1's w3 scale (float32 [4, 2]: element [1, 1] starts at byte 12)
        ("model.layers.0.block_sparse_moe.experts.routed_experts.w13_weight_scale", 12,
         "[1, 1]"),
    ],
)  # fmt: skip
def test_moe_verify_against_names_one_changed_expert_value(
    key: str, index: int, element: str, moe_converted: Path, moe: Path, tmp_path: Path
) -> None:
    bad = tamper(moe_converted, key, index, tmp_path)
    proc = verify(bad, moe, tmp_path)
    assert proc.returncode == 3, proc.stderr[-2000:]
    doc = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert doc["ok"] is False and doc["reason"] == "VerificationFailed"
    assert f"{key} on rank 0" in doc["error"] and f"element {element}" in doc["error"]


def test_per_block_experts_the_block_does_not_divide_are_refused(tmp_path: Path) -> None:
    """intermediate 128 at TP=2: 64 per rank. vLLM's online fp8_per_block pads the
    experts to 128 and quantizes the padding; no fp8 checkpoint holds that layout."""
    src = make_tiny_model(
        "mixtral", tmp_path / "m", overrides={**MOE_OVERRIDES, "intermediate_size": 128}
    )
    proc = convert(src, tmp_path / "conv", "--quantization", "fp8_per_block")
    assert proc.returncode == 3, proc.stderr[-3000:]
    last = [x for x in proc.stderr.splitlines() if x.startswith("preshard:")][-1]
    assert "per-rank intermediate size (64)" in last and "multiples of 128" in last
    assert "--weights raw" in last
    assert "UnsupportedQuantization" in (tmp_path / "conv" / "termination-log").read_text()
    assert not (tmp_path / "conv" / "out" / MANIFEST_NAME).exists()
