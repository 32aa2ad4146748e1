"""Online quantization with real vLLM (CPU build): the kernel probe on this machine, an online
method converted on both paths (one engine conversion reused by several assertions),
and a method whose kernel is missing refused with exit 3 before any engine.

Run under the heavy lock: ``flock /tmp/preshard-heavy.lock .venv/bin/pytest
tests/vllm/test_quantization_online.py -x -q`` (~3 minutes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from preshard.worker.engine.kernels import probe_quantization
from tests.vllm.conftest import CliRun, read_json, run_convert_cli

pytestmark = pytest.mark.vllm

AMX = bool(torch.cpu._is_amx_tile_supported())


def test_probe_asks_vllms_own_kernels_on_this_machine() -> None:
    # per-tensor FP8 quantizes with _C::static_scaled_fp8_quant, which the CPU build
    # registers without a kernel: the probe reports the op's own error
    reason = probe_quantization("fp8_per_tensor")
    assert reason is not None and "static_scaled_fp8_quant" in reason
    # block FP8 linear layers: the AMX W8A16 kernel exists exactly where AMX does
    block = probe_quantization("fp8_per_block")
    assert (block is None) == AMX, block
    # no CPU MXFP8 linear kernel at all: vLLM's kernel chooser says so
    mx = probe_quantization("mxfp8")
    assert mx is not None and "MXFP8" in mx
    # a serialized FP8 checkpoint: per-tensor needs the missing op, block needs AMX
    per_tensor = probe_quantization("fp8", {"quant_method": "fp8", "activation_scheme": "static"})
    assert per_tensor is not None and "static_scaled_fp8_quant" in per_tensor
    ckpt_block = probe_quantization(
        "fp8",
        {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
    )
    assert (ckpt_block is None) == AMX, ckpt_block


def _convert(base: Path, model: Path, *extra: str) -> CliRun:
    return run_convert_cli(
        base,
        "--source",
        str(model),
        "--tensor-parallel-size",
        "1",
        "--output",
        str(base / "out"),
        "--owner",
        "ns/q/uid-1",
        *extra,
    )


@pytest.fixture(scope="module")
def fp8_engine(tiny_tokenizer_model: Path, tmp_path_factory: pytest.TempPathFactory) -> CliRun:
    base = tmp_path_factory.mktemp("fp8-online-engine")
    return _convert(
        base, tiny_tokenizer_model, "--quantization", "fp8_per_tensor", "--engine", "vllm"
    )


def test_online_fp8_converts_on_the_engine_path_never_exit_1(
    fp8_engine: CliRun, tiny_tokenizer_model: Path
) -> None:
    run = fp8_engine
    assert run.rc in (0, 3), run.stderr[-3000:]
    assert run.rc == 0, run.last_stderr_line  # the raw weights need no FP8 kernel
    man = read_json(run.output / "preshard-manifest.json")
    assert man["quantization"] == "fp8_per_tensor"  # serving quantizes on its own
    assert man["convertedOn"].get("engine", "vllm") == "vllm"
    record = man["verification"]["quantization"]
    assert record["online"] is True and record["probed"] is True
    assert "static_scaled_fp8_quant" in record["kernel"]
    assert run.result is not None and run.result.result == "Succeeded"
    # the raw file holds the weights before quantization: the source's bf16 values
    src = load_file(str(tiny_tokenizer_model / "model.safetensors"))
    shard = load_file(str(run.output / "model-rank-0-part-0.safetensors"))
    qkv = torch.cat([src[f"model.layers.0.self_attn.{x}_proj.weight"] for x in "qkv"])
    assert shard["model.layers.0.self_attn.qkv_proj.weight"].dtype == torch.bfloat16
    assert torch.equal(shard["model.layers.0.self_attn.qkv_proj.weight"], qkv)
    assert not any(k.endswith("weight_scale") for k in shard)


def test_online_fp8_summary_says_the_quantized_check_was_skipped(fp8_engine: CliRun) -> None:
    from preshard.worker.conversion.result import verification_result

    man = read_json(fp8_engine.output / "preshard-manifest.json")
    summary = verification_result(man["verification"])["summary"]
    assert "engine check with fp8_per_tensor skipped: fp8_per_tensor has no kernel" in summary
    assert "engine:" in summary  # the unquantized reload still ran and matched


def test_online_fp8_engine_free_writes_the_same_bytes(
    fp8_engine: CliRun, tiny_tokenizer_model: Path, tmp_path: Path
) -> None:
    # --weights raw: the unquantized rank files (without it, the engine-free default for
    # the FP8 online methods is pre-quantized FP8 shards: tests/vllm/test_fp8_shards.py)
    free = _convert(
        tmp_path, tiny_tokenizer_model, "--quantization", "fp8_per_tensor", "--engine", "none",
        "--weights", "raw",
    )  # fmt: skip
    assert free.rc == 0, free.stderr[-3000:]
    name = "model-rank-0-part-0.safetensors"
    assert (free.output / name).read_bytes() == (fp8_engine.output / name).read_bytes()
    man = read_json(free.output / "preshard-manifest.json")
    assert man["quantization"] == "fp8_per_tensor"
    assert man["verification"]["quantization"]["probed"] is False


def test_a_needed_kernel_that_is_missing_exits_3_before_any_engine(
    tiny_tokenizer_model: Path, tmp_path: Path
) -> None:
    """``fp8`` is a checkpoint method (not online in vLLM 0.32): the engine would load
    the source with it, so it needs the per-tensor FP8 kernel, which this CPU build does
    not have: refused permanently, with the kernel's own reason, and no engine started."""
    run = _convert(tmp_path, tiny_tokenizer_model, "--quantization", "fp8", "--engine", "vllm")
    assert run.rc == 3, run.stderr[-3000:]
    assert run.result is not None and run.result.reason == "UnsupportedQuantization"
    # over a bf16 checkpoint vLLM 0.32's Fp8Config has no config to read (fp8 no longer
    # quantizes online): its own ValueError, reported verbatim
    msg = run.result.message or ""
    assert "quantization 'fp8' cannot run on this machine" in msg
    assert "activation_scheme" in msg and "before any engine" in msg
    assert "Converting" not in [r.stage for r in run.progress]
    assert not (run.output / "preshard-manifest.json").exists()
