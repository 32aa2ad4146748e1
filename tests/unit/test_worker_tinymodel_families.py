"""The architecture-matrix generators (tinymodel.FAMILIES) and the GPTQ writer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from preshard_dev.tinymodel import (
    FAMILIES,
    dequantize_gptq,
    gptq_pack,
    gptq_unpack,
    make_tiny_model,
    quantize_gptq,
)

# What each family must contain (a tensor name in layer 0) to exercise its feature.
FEATURE_TENSOR = {
    "llama-gqa": "model.layers.0.self_attn.k_proj.weight",
    "llama-tied": "model.layers.0.self_attn.k_proj.weight",
    "llama-padded-vocab": "lm_head.weight",
    "qwen2": "model.layers.0.self_attn.q_proj.bias",
    "qwen3": "model.layers.0.self_attn.q_norm.weight",
    "phi3": "model.layers.0.self_attn.qkv_proj.weight",
    "mixtral": "model.layers.0.block_sparse_moe.experts.3.w3.weight",
    "qwen3-moe": "model.layers.0.mlp.experts.3.up_proj.weight",
    "qwen2-moe": "model.layers.0.mlp.shared_expert.gate_proj.weight",
    "deepseek-v2": "model.layers.1.mlp.shared_experts.gate_proj.weight",
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("families")
    return {name: make_tiny_model(name, base / name) for name in FAMILIES}


def test_every_family_has_a_feature_check() -> None:
    assert set(FEATURE_TENSOR) == set(FAMILIES)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_checkpoint(models: dict[str, Path], name: str) -> None:
    d = models[name]
    fam = FAMILIES[name]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == [fam.architecture]
    assert cfg["head_dim"] == 64  # vLLM's CPU attention
    if fam.mla:  # vLLM's CPU MLA: latent 512 + rope 64
        assert (cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]) == (512, 64)
    else:
        assert cfg["hidden_size"] == cfg["num_attention_heads"] * 64
    t = load_file(str(d / "model.safetensors"))
    assert FEATURE_TENSOR[name] in t
    assert {v.dtype for v in t.values()} == {torch.bfloat16}
    # Norms and biases are random too (library init leaves them at 1 and 0, where a
    # shard holding the wrong slice would look right).
    for k, v in t.items():
        if v.dim() == 1 and ("norm" in k or k.endswith(".bias")):
            assert v.float().std() > 0.05, k
    assert not (d / "tokenizer.json").exists()


def test_family_features(models: dict[str, Path]) -> None:
    cfg = {n: json.loads((d / "config.json").read_text()) for n, d in models.items()}
    assert (cfg["llama-gqa"]["num_attention_heads"], cfg["llama-gqa"]["num_key_value_heads"]) == (
        4,
        2,
    )
    # One KV head: replicated on both ranks at TP=2.
    assert cfg["llama-tied"]["num_key_value_heads"] == 1
    assert cfg["llama-tied"]["tie_word_embeddings"] is True
    assert "lm_head.weight" not in load_file(str(models["llama-tied"] / "model.safetensors"))
    # Not a multiple of 64 * TP: vLLM pads the vocabulary.
    assert cfg["llama-padded-vocab"]["vocab_size"] == 500
    assert cfg["llama-tied"]["vocab_size"] == 500
    assert cfg["llama-gqa"]["attention_bias"] is True
    gqa = load_file(str(models["llama-gqa"] / "model.safetensors"))
    assert gqa["model.layers.0.self_attn.v_proj.bias"].shape == (128,)
    phi = load_file(str(models["phi3"] / "model.safetensors"))
    assert phi["model.layers.0.self_attn.qkv_proj.weight"].shape == (3 * 128, 128)
    assert phi["model.layers.0.mlp.gate_up_proj.weight"].shape == (2 * 256, 128)
    assert cfg["mixtral"]["num_local_experts"] == 4
    assert cfg["qwen3-moe"]["num_experts"] == 4
    assert cfg["qwen2-moe"]["shared_expert_intermediate_size"] == 256


def test_families_are_deterministic_and_distinct(tmp_path: Path, models: dict[str, Path]) -> None:
    again = make_tiny_model("mixtral", tmp_path / "again")
    assert (again / "model.safetensors").read_bytes() == (
        models["mixtral"] / "model.safetensors"
    ).read_bytes()
    other = make_tiny_model("mixtral", tmp_path / "other", seed=99)
    assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()
    seeds = [f.seed for f in FAMILIES.values()]
    assert len(set(seeds)) == len(seeds)


def test_make_tiny_model_rejects_a_head_dim_mismatch(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_attention_heads \\* head_dim"):
        make_tiny_model("qwen2", tmp_path, overrides={"hidden_size": 192})


# ----------------------------------------------------------------------------- GPTQ


def test_gptq_packing_order_by_hand() -> None:
    """Input row i of column j is nibble i % 8 (lowest first) of qweight[i // 8, j]."""
    # A [out=8, in=32] weight whose quantized values are known: scale 1 per group
    # (amax 7), q = w + 8.
    q = 1 + torch.arange(32 * 8).reshape(32, 8) % 15  # [in, out] in 1..15
    q[0, :] = 15  # make every group's amax 7 ...
    q[1, :] = 1  # ... on both sides
    w = (q - 8).t().to(torch.bfloat16)  # [out, in]
    packed = gptq_pack(w, bits=4, group_size=32)
    assert packed["scales"].shape == (1, 8) and torch.all(packed["scales"] == 1)
    qw = packed["qweight"]
    assert qw.shape == (4, 8) and qw.dtype == torch.int32
    for i in range(32):
        for j in range(8):
            nibble = (int(qw[i // 8, j]) & 0xFFFFFFFF) >> (4 * (i % 8)) & 0xF
            assert nibble == int(q[i, j]), (i, j)
    # Symmetric v1 checkpoints store zero - 1 = 7 in every nibble.
    assert packed["qzeros"].shape == (1, 1)
    assert int(packed["qzeros"][0, 0]) & 0xFFFFFFFF == 0x77777777
    assert packed["g_idx"].tolist() == [0] * 32
    assert torch.equal(gptq_unpack(packed), w.float())


def test_gptq_round_trip_error_is_within_half_a_step() -> None:
    torch.manual_seed(0)
    w = (torch.randn(64, 128) * 0.2).to(torch.bfloat16)
    packed = gptq_pack(w, group_size=32)
    assert packed["qweight"].shape == (16, 64)
    assert packed["scales"].shape == (4, 64) and packed["scales"].dtype == torch.bfloat16
    assert packed["g_idx"].tolist() == [i // 32 for i in range(128)]
    err = (gptq_unpack(packed) - w.float()).abs()
    step = packed["scales"].float()[packed["g_idx"].long()].t()  # [out, in]
    assert torch.all(err <= step / 2 + 1e-3)
    assert err.max() > 0  # it did quantize


def test_gptq_pack_rejects_sizes_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match="does not fit group 32"):
        gptq_pack(torch.zeros(8, 48), group_size=32)


def test_quantize_gptq_checkpoint(tmp_path: Path, models: dict[str, Path]) -> None:
    src = models["llama-gqa"]
    d = quantize_gptq(src, tmp_path / "gptq", group_size=32)
    cfg = json.loads((d / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"]) == ("gptq", 4, 32)
    assert qc["sym"] is True and qc["desc_act"] is False
    t = load_file(str(d / "model.safetensors"))
    s = load_file(str(src / "model.safetensors"))
    # Every decoder linear is quantized; embeddings, norms and lm_head are not.
    assert not any(k.endswith("_proj.weight") for k in t)
    p = "model.layers.1.mlp.down_proj."
    assert t[p + "qweight"].shape == (512 // 8, 256)
    assert t[p + "qzeros"].shape == (512 // 32, 256 // 8)
    assert t[p + "scales"].shape == (512 // 32, 256)
    assert t[p + "g_idx"].shape == (512,)
    for k in ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(t[k], s[k])
    w = s[p + "weight"].float()
    deq = gptq_unpack({k: t[p + k] for k in ("qweight", "scales", "g_idx")})
    assert (deq - w).abs().max() < 0.1 * w.abs().max()


def test_dequantize_gptq_gives_the_dense_weights_back(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    src = models["llama-gqa"]
    q = quantize_gptq(src, tmp_path / "gptq")
    d = dequantize_gptq(q, tmp_path / "dense")
    assert "quantization_config" not in json.loads((d / "config.json").read_text())
    s, t = load_file(str(src / "model.safetensors")), load_file(str(d / "model.safetensors"))
    assert set(t) == set(s)
    for k, v in s.items():
        assert t[k].dtype == v.dtype and t[k].shape == v.shape, k
        if k.endswith("_proj.weight"):
            assert (t[k].float() - v.float()).abs().max() < 0.1 * v.float().abs().max(), k
        else:
            assert torch.equal(t[k], v), k
