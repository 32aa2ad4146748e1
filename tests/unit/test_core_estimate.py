"""preshard.core.estimate: the preflight memory estimate.

The parameter count is checked against real checkpoints: the tiny Llama models of
preshard_dev.tinymodel (tensor sizes read from their model.safetensors) and tiny
random models of other families built by transformers (their state dicts). One large
config, Llama 3.1 70B, is written here and its estimate worked out by hand.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open

from preshard.core import estimate as est
from preshard.core.estimate import (
    EstimateUnavailable,
    GiB,
    count_parameters,
    estimate_memory,
    format_gib,
    memory_shortfall,
)
from preshard_dev.tinymodel import make_tiny_llama


def _safetensors_numel_and_bytes(path: Path) -> tuple[int, int]:
    numel = nbytes = 0
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            numel += t.numel()
            nbytes += t.numel() * t.element_size()
    return numel, nbytes


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"num_kv_heads": 1, "tie_embeddings": True},
        {"layers": 3, "hidden": 256, "heads": 4, "num_kv_heads": 2, "vocab": 1000},
    ],
    ids=["default", "kv1-tied", "wider"],
)
def test_parameters_of_the_tiny_models_equal_their_safetensors(
    tmp_path: Path, kwargs: dict[str, Any]
) -> None:
    d = make_tiny_llama(tmp_path / "m", **kwargs)
    config = json.loads((d / "config.json").read_text())
    numel, nbytes = _safetensors_numel_and_bytes(d / "model.safetensors")
    count = count_parameters(config)
    assert count.total == numel
    e = estimate_memory(config, tensor_parallel_size=1, accelerator="cpu")
    assert e.breakdown["weights"] == nbytes  # bf16: 2 bytes per parameter
    assert e.parameters == numel


def test_kv_heads_replicated_when_tp_exceeds_them(tmp_path: Path) -> None:
    d = make_tiny_llama(tmp_path / "m", num_kv_heads=1)
    config = json.loads((d / "config.json").read_text())
    # 2 layers x (k and v) x hidden 128 x head_dim 64 x (TP 2 - 1 KV head)
    assert count_parameters(config, 2).replicated_kv == 2 * 2 * 128 * 64 * 1
    assert count_parameters(config, 1).replicated_kv == 0
    one = estimate_memory(config, tensor_parallel_size=1, accelerator="cpu")
    two = estimate_memory(config, tensor_parallel_size=2, accelerator="cpu")
    assert two.breakdown["weights"] - one.breakdown["weights"] == 2 * 2 * 128 * 64 * 2


FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen2-qkv-bias": (
        "Qwen2Config",
        {"num_key_value_heads": 1},
    ),
    "qwen3-qk-norm": (
        "Qwen3Config",
        {"num_key_value_heads": 1, "head_dim": 64},
    ),
    "mistral": ("MistralConfig", {"num_key_value_heads": 1}),
    "phi3-fused": ("Phi3Config", {"num_key_value_heads": 2, "pad_token_id": 0}),
    "mixtral-moe": (
        "MixtralConfig",
        {"num_key_value_heads": 1, "num_local_experts": 4, "num_experts_per_tok": 2},
    ),
    "qwen3-moe": (
        "Qwen3MoeConfig",
        {
            "num_key_value_heads": 1,
            "head_dim": 64,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 64,
        },
    ),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_parameters_of_other_families_equal_the_model(tmp_path: Path, family: str) -> None:
    transformers = pytest.importorskip("transformers")
    cls_name, extra = FAMILIES[family]
    cfg = getattr(transformers, cls_name)(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        **extra,
    )
    cfg.save_pretrained(tmp_path)  # the config.json a checkpoint carries
    config = json.loads((tmp_path / "config.json").read_text())
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    numel = sum(p.numel() for p in model.parameters())  # tied weights counted once
    assert count_parameters(config).total == numel


# Llama 3.1 70B's config.json (the fields the estimate reads, values as published).
LLAMA_70B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def test_llama_70b_by_hand() -> None:
    # Parameters, per layer:
    #   q_proj 8192 x (64 x 128)        =  67_108_864
    #   k_proj + v_proj 2 x 8192 x 1024 =  16_777_216
    #   o_proj (64 x 128) x 8192        =  67_108_864
    #   gate, up, down 3 x 8192 x 28672 = 704_643_072
    #   = 855_638_016 linear weights per layer; x 80 layers = 68_451_041_280
    #   norms 80 x 2 x 8192 + 8192 = 1_318_912
    #   embed_tokens and lm_head 2 x 128256 x 8192 = 2_101_346_304
    #   P = 68_451_041_280 + 1_318_912 + 2_101_346_304 = 70_553_706_496 (the "70B")
    count = count_parameters(LLAMA_70B, 8)
    assert count.linear == 68_451_041_280
    assert count.other == 1_318_912 + 2_101_346_304
    assert count.replicated_kv == 0  # 8 KV heads, TP 8: one per rank
    assert count.total == 70_553_706_496

    e = estimate_memory(
        LLAMA_70B,
        tensor_parallel_size=8,
        pipeline_parallel_size=1,
        dtype="auto",
        max_file_size=5 * GiB,
        accelerator="cpu",
    )
    # W = 2 bytes x P                                = 141_107_412_992
    # S = W / 8                                      =  17_638_426_624 per rank
    # B = 8 x min(5 GiB = 5_368_709_120, S)          =  42_949_672_960
    # KV per rank: 2 x 80 layers x 1 KV head x 128 x 2 bytes x 512 tokens x 8 seqs
    #   = 167_772_160 bytes -> 1 GiB (the minimum);  x 8 = 8_589_934_592
    # E = 8 x 1.5 GiB + 1.5 GiB = 13.5 GiB           =  14_495_514_624
    # subtotal = 207_142_535_168; margin 10 % rounded up = 20_714_253_517
    # total = 227_856_788_685 bytes = 212.21 GiB -> "212.3Gi" (rounded up)
    assert e.breakdown == {
        "weights": 141_107_412_992,
        "saveBuffers": 42_949_672_960,
        "kvCache": 8_589_934_592,
        "engineOverhead": 14_495_514_624,
        "margin": 20_714_253_517,
    }
    assert e.per_rank_shard_bytes == 17_638_426_624
    assert e.total_bytes == 227_856_788_685
    assert e.to_status()["quantity"] == "212.3Gi"
    assert e.bytes_per_parameter == 2.0

    # On GPUs the weights and KV cache are in GPU memory; the host holds the save
    # buffers and the engine processes: 42_949_672_960 + (8 x 4 GiB + 1.5 GiB =
    # 35_970_351_104) = 78_920_024_064; + 10 % rounded up (7_892_002_407)
    # = 86_812_026_471 bytes
    g = estimate_memory(LLAMA_70B, tensor_parallel_size=8, accelerator="gpu")
    assert g.total_bytes == 86_812_026_471
    assert "weights" not in g.breakdown


def test_max_file_size_bounds_the_save_buffers() -> None:
    small = estimate_memory(LLAMA_70B, tensor_parallel_size=8, max_file_size=GiB, accelerator="cpu")
    assert small.breakdown["saveBuffers"] == 8 * GiB
    # a shard smaller than maxFileSize is one part: the shard is the buffer
    tp64 = estimate_memory(LLAMA_70B, tensor_parallel_size=64, accelerator="cpu")
    assert tp64.breakdown["saveBuffers"] == 64 * tp64.per_rank_shard_bytes


def test_dtype_and_quantized_checkpoints() -> None:
    f32 = estimate_memory(LLAMA_70B, tensor_parallel_size=8, dtype="float32", accelerator="cpu")
    assert f32.breakdown["weights"] == 4 * 70_553_706_496
    # GPTQ 4-bit, group 128: linear weights 0.5 + 2.5/128 bytes, the rest in bf16
    gptq = {
        **LLAMA_70B,
        "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128},
    }
    e = estimate_memory(gptq, tensor_parallel_size=8, accelerator="cpu")
    expect = 68_451_041_280 * (0.5 + 2.5 / 128) + (1_318_912 + 2_101_346_304) * 2
    assert e.breakdown["weights"] == pytest.approx(expect, abs=1)
    fp8 = {**LLAMA_70B, "quantization_config": {"quant_method": "fp8"}}
    w = estimate_memory(fp8, tensor_parallel_size=8, accelerator="cpu").breakdown["weights"]
    assert w == 68_451_041_280 + (1_318_912 + 2_101_346_304) * 2
    # online quantization of a bf16 checkpoint loads bf16 first: no reduction
    online = estimate_memory(
        LLAMA_70B, tensor_parallel_size=8, quantization="fp8", accelerator="cpu"
    )
    assert online.breakdown["weights"] == 2 * 70_553_706_496


def test_text_config_of_a_multimodal_config() -> None:
    wrapped = {"model_type": "llava", "text_config": LLAMA_70B}
    assert count_parameters(wrapped).total == 70_553_706_496


def test_unknown_architecture_and_bad_arguments() -> None:
    with pytest.raises(EstimateUnavailable, match="hidden_size"):
        count_parameters({"num_hidden_layers": 2, "num_attention_heads": 2, "vocab_size": 10})
    with pytest.raises(ValueError, match="accelerator"):
        estimate_memory(LLAMA_70B, tensor_parallel_size=1, accelerator="tpu")
    with pytest.raises(ValueError):
        estimate_memory(LLAMA_70B, tensor_parallel_size=0)


def test_memory_shortfall_message() -> None:
    e = estimate_memory(LLAMA_70B, tensor_parallel_size=8, accelerator="cpu")
    assert memory_shortfall(None, e) is None  # no limit: nothing to compare
    assert memory_shortfall(e.total_bytes, e) is None  # exactly enough
    msg = memory_shortfall(e.total_bytes - 1, e)
    assert msg is not None
    assert "212.3Gi" in msg and str(e.total_bytes) in msg and str(e.total_bytes - 1) in msg
    assert "spec.converter.resources.limits.memory" in msg and "at least 212.3Gi" in msg
    assert "8 CPU ranks hold the model's 131.5Gi of weights" in msg


def test_format_gib() -> None:
    assert format_gib(GiB) == "1Gi"
    assert format_gib(GiB + 1) == "1.1Gi"  # rounded up: never under-reports
    assert format_gib(5 * 2**20) == "5Mi"
    assert format_gib(int(217.15 * GiB)) == "217.2Gi"


def test_status_fields_match_the_crd() -> None:
    from tests.unit.test_crd import prop

    schema = prop("status", "memoryEstimate")["properties"]
    status = estimate_memory(LLAMA_70B, tensor_parallel_size=8, accelerator="cpu").to_status()
    assert set(status) == set(schema)
    assert set(status["breakdown"]) == {
        "weights",
        "saveBuffers",
        "kvCache",
        "engineOverhead",
        "margin",
    }


def test_the_constants_are_the_documented_ones() -> None:
    # docs/cpu-conversion.md states these numbers; change both together
    assert (est.CPU_RANK_OVERHEAD, est.FRONTEND_OVERHEAD, est.GPU_RANK_OVERHEAD) == (
        3 * GiB // 2,
        3 * GiB // 2,
        4 * GiB,
    )
    doc = (Path(__file__).resolve().parents[2] / "docs" / "cpu-conversion.md").read_text()
    assert "1.5Gi per rank" in doc and "4Gi per rank" in doc and "1.5Gi frontend" in doc


def test_the_demo_example_fits_its_own_memory_limit(tmp_path: Path) -> None:
    import yaml

    from preshard.core.quantity import parse_bytes
    from preshard.core.spec import parse_spec

    root = Path(__file__).resolve().parents[2]
    doc = yaml.safe_load((root / "examples" / "tiny-tp2.yaml").read_text())
    spec = parse_spec(doc["spec"])
    d = make_tiny_llama(tmp_path / "m", num_kv_heads=1)  # the demo model (preshard_dev.stack)
    e = estimate_memory(
        json.loads((d / "config.json").read_text()),
        tensor_parallel_size=spec.tensor_parallel_size,
        pipeline_parallel_size=spec.pipeline_parallel_size,
        max_file_size=spec.output.max_file_size_bytes,
        accelerator=spec.converter.accelerator or "gpu",
    )
    limit = parse_bytes(str(doc["spec"]["converter"]["resources"]["limits"]["memory"]))
    assert e.accelerator == "cpu" and memory_shortfall(limit, e) is None


def test_preflight_reads_the_spec_limit_and_its_status_is_valid_for_the_crd() -> None:
    from preshard.core.estimate import preflight
    from tests.unit.test_crd import MINIMAL, errors, resource

    args: dict[str, Any] = {
        "tensor_parallel_size": 8,
        "pipeline_parallel_size": 1,
        "dtype": "auto",
        "quantization": None,
        "max_file_size": 5 * GiB,
        "accelerator": "cpu",
    }
    est, problem = preflight(LLAMA_70B, resources={"limits": {"memory": "200Gi"}}, **args)
    assert est is not None and est.total_bytes == 227_856_788_685
    assert problem is not None and "memory limit is 200Gi" in problem
    assert preflight(LLAMA_70B, resources={"limits": {"memory": "213Gi"}}, **args)[1] is None
    assert preflight(LLAMA_70B, resources=None, **args)[1] is None  # no limit: no verdict
    assert preflight({"model_type": "x"}, resources=None, **args) == (None, None)
    obj = resource(MINIMAL, {"memoryEstimate": est.to_status()})
    assert [f"{list(e.absolute_path)}: {e.message}" for e in errors(obj)] == []
    bad = resource(MINIMAL, {"memoryEstimate": {**est.to_status(), "bytes": "lots"}})
    assert errors(bad)  # the schema really checks it


# Llama 3.1 405B and DeepSeek-V3 (block-FP8 checkpoint) config.json fields, as published:
# docs/cpu-conversion.md states their estimates at TP=8 both ways.
LLAMA_405B: dict[str, Any] = {
    **LLAMA_70B,
    "hidden_size": 16384,
    "intermediate_size": 53248,
    "num_hidden_layers": 126,
    "num_attention_heads": 128,
}
DEEPSEEK_V3: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "first_k_dense_replace": 3,
    "num_hidden_layers": 61,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "vocab_size": 129280,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "quantization_config": {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    },
}


def test_engine_free_llama_70b_by_hand() -> None:
    # The largest tensor: embed_tokens (= lm_head) 128256 x 8192 x 2 bytes = 2_101_346_304
    # (gate_up fused would be 2 x 28672 x 8192 x 2 = 939_524_096: smaller)
    assert est.largest_tensor_bytes(LLAMA_70B) == 2_101_346_304
    e = estimate_memory(LLAMA_70B, tensor_parallel_size=8, accelerator="none")
    # 3 x T = 6_304_038_912; 8 ranks x 64 MiB = 536_870_912; upload 536_870_912;
    # process 2 GiB = 2_147_483_648; subtotal 9_525_264_384; margin 952_526_439
    assert e.breakdown == {
        "largestTensor": 6_304_038_912,
        "writeBuffers": 536_870_912,
        "uploadBuffers": 536_870_912,
        "processOverhead": 2_147_483_648,
        "margin": 952_526_439,
    }
    assert e.total_bytes == 10_477_790_823
    assert e.to_status()["quantity"] == "9.8Gi"
    assert e.to_status()["accelerator"] == "none"
    assert "largest source tensor" in e.formula


def test_engine_free_is_flat_in_the_model_size_and_the_engine_is_not() -> None:
    figures = {}
    for name, config in (("70B", LLAMA_70B), ("405B", LLAMA_405B), ("V3", DEEPSEEK_V3)):
        figures[name] = {
            acc: estimate_memory(config, tensor_parallel_size=8, accelerator=acc).total_bytes
            for acc in ("cpu", "none")
        }
    # the figures docs/cpu-conversion.md states (docs/architecture.md measured the engine)
    assert format_gib(figures["405B"]["cpu"]) == "899.3Gi"
    assert format_gib(figures["V3"]["cpu"]) == "758.3Gi"
    assert format_gib(figures["405B"]["none"]) == "16.3Gi"
    assert format_gib(figures["V3"]["none"]) == "9Gi"
    # 405B is 5.8x the 70B's weights; without an engine only its largest tensor
    # (the embeddings, 2x as wide) moves the estimate
    assert figures["405B"]["cpu"] > 4 * figures["70B"]["cpu"]
    grew = figures["405B"]["none"] - figures["70B"]["none"]
    assert abs(grew - 3 * 2_101_346_304 * 1.1) <= 1  # 3 x (T_405B - T_70B) + 10 %
    # the engine-free path ignores maxFileSize (the writer streams parts)
    small = estimate_memory(
        LLAMA_405B, tensor_parallel_size=8, max_file_size=GiB, accelerator="none"
    )
    assert small.total_bytes == figures["405B"]["none"]


def test_engine_free_largest_tensor_counts_the_checkpoint_format() -> None:
    # DeepSeek-V3: the embeddings stay bf16 (129280 x 7168 x 2 = 1_853_358_080); the
    # fp8 linears (1 byte) are smaller (dense gate_up 2 x 18432 x 7168 = 264_241_152)
    assert est.largest_tensor_bytes(DEEPSEEK_V3) == 1_853_358_080
    wide_mlp = {**LLAMA_70B, "intermediate_size": 200_000, "vocab_size": 1000}
    assert est.largest_tensor_bytes(wide_mlp) == 2 * 200_000 * 8192 * 2  # gate_up fused
    with pytest.raises(EstimateUnavailable):
        est.largest_tensor_bytes({"model_type": "mystery"})


def test_engine_free_shortfall_and_status_breakdown_in_the_crd() -> None:
    from tests.unit.test_crd import prop

    e = estimate_memory(LLAMA_70B, tensor_parallel_size=8, accelerator="none")
    msg = memory_shortfall(4 * GiB, e)
    assert msg is not None and "9.8Gi" in msg and "no engine" in msg
    assert memory_shortfall(10 * GiB, e) is None
    crd = prop("status", "memoryEstimate")
    assert "none" in crd["properties"]["accelerator"]["enum"]
    described = crd["properties"]["breakdown"]["description"]
    assert all(k in described for k in e.breakdown)
    assert (est.ENGINE_FREE_TENSOR_COPIES, est.ENGINE_FREE_RANK_BUFFER) == (3, 64 * 2**20)
    assert est.ENGINE_FREE_OVERHEAD == 2 * GiB
    doc = (Path(__file__).resolve().parents[2] / "docs" / "cpu-conversion.md").read_text()
    assert "3 x T + TP x PP x 64Mi + 512Mi + 2Gi" in doc
