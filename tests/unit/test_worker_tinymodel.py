"""The tiny random Llama generator used by the vLLM tests, the benchmark and the demo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from preshard.worker.verify.shards import read_safetensors_header
from preshard_dev.tinymodel import make_tiny_llama


def test_tiny_llama_with_tokenizer(tmp_path: Path) -> None:
    d = make_tiny_llama(tmp_path / "m", num_kv_heads=1, tie_embeddings=False, seed=3)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["head_dim"] == 64 and cfg["num_attention_heads"] == 2
    assert cfg["num_key_value_heads"] == 1 and cfg["tie_word_embeddings"] is False
    tensors = read_safetensors_header(d / "model.safetensors")
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (64, 128)
    assert tensors["model.layers.1.self_attn.q_proj.weight"].shape == (128, 128)
    assert tensors["lm_head.weight"].shape == (512, 128)
    assert {t.dtype for t in tensors.values()} == {"BF16"}

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(d))
    ids = tok("Hello world, preshard!")["input_ids"]
    assert ids and max(ids) < cfg["vocab_size"]
    assert tok.decode(ids) == "Hello world, preshard!"


def test_tiny_llama_tied_without_tokenizer_is_deterministic(tmp_path: Path) -> None:
    a = make_tiny_llama(
        tmp_path / "a", num_kv_heads=2, tie_embeddings=True, seed=1, tokenizer=False
    )
    b = make_tiny_llama(
        tmp_path / "b", num_kv_heads=2, tie_embeddings=True, seed=1, tokenizer=False
    )
    c = make_tiny_llama(
        tmp_path / "c", num_kv_heads=2, tie_embeddings=True, seed=2, tokenizer=False
    )
    assert sorted(p.name for p in a.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    assert "lm_head.weight" not in read_safetensors_header(a / "model.safetensors")
    assert json.loads((a / "config.json").read_text())["tie_word_embeddings"] is True
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_tiny_llama_rejects_bad_shapes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="heads 2 is not a multiple of num_kv_heads 3"):
        make_tiny_llama(tmp_path, num_kv_heads=3)
    with pytest.raises(ValueError, match="hidden 100 is not a multiple of heads 3"):
        make_tiny_llama(tmp_path, hidden=100, heads=3, num_kv_heads=1)
