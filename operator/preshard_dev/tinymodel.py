"""Tiny random checkpoints for tests, benchmarks and the demo (no network, no hub).

``make_tiny_llama`` writes a Hugging Face style directory: ``config.json``,
``generation_config.json``, ``model.safetensors`` and, optionally, a small byte-level BPE
tokenizer trained offline on a built-in text. The defaults fit what vLLM's CPU backend
supports (head_dim 64) and load in seconds.

``make_tiny_model(family, dest)`` writes one of the architecture families in
``FAMILIES`` (the architecture matrix: dense GQA, tied embeddings, padded vocabulary,
qkv bias, q/k norm, HF-fused qkv, three MoE families), each from a fixed seed, so the
same family always gives the same bytes. ``quantize_gptq(src, dest)`` turns a dense
checkpoint into a 4-bit GPTQ checkpoint (packed ``qweight``/``qzeros``/``scales``/
``g_idx``) that vLLM's CPU backend loads through its WNA16 kernels.

Run as a script: ``python -m preshard_dev.tinymodel DEST [--kv-heads 1] [--tie]``,
``--family NAME`` for a matrix family, ``--gptq`` to quantize it.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Text the tiny tokenizer is trained on; any text still tokenizes (byte-level fallback).
_CORPUS = (
    "preshard saves each tensor-parallel rank of a model with vLLM, verifies the shards "
    "and uploads them with a manifest written last. The quick brown fox jumps over the "
    "lazy dog. Hello world, hello model, hello shards. One two three four five six seven "
    "eight nine ten. Kubernetes runs the conversion job; the operator publishes status."
)
BOS, EOS, UNK = "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (BOS, EOS, UNK)


def _make_tokenizer(dest: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK
    )
    fast.save_pretrained(str(dest))


def make_tiny_llama(
    dest: str | Path,
    *,
    num_kv_heads: int = 2,
    tie_embeddings: bool = False,
    seed: int = 0,
    layers: int = 2,
    hidden: int = 128,
    heads: int = 2,
    intermediate: int | None = None,
    vocab: int = 512,
    max_positions: int = 256,
    dtype: str = "bfloat16",
    tokenizer: bool = True,
) -> Path:
    """Write a random Llama checkpoint to ``dest`` and return its path.

    head_dim is ``hidden // heads`` (64 with the defaults: vLLM's CPU attention needs a
    supported head size). ``num_kv_heads`` below the tensor-parallel size exercises KV-head
    replication; ``tie_embeddings`` shares ``lm_head`` with the input embedding.
    ``tokenizer=False`` leaves the model without tokenizer files (engines must then run
    with ``skip_tokenizer_init`` and token-id prompts).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden % heads:
        raise ValueError(f"hidden {hidden} is not a multiple of heads {heads}")
    if heads % num_kv_heads:
        raise ValueError(f"heads {heads} is not a multiple of num_kv_heads {num_kv_heads}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie_embeddings,
        bos_token_id=0,
        eos_token_id=1,
        # Larger than Llama's 0.02 so a random model's logits are well separated and
        # greedy decoding is not decided by rounding.
        initializer_range=0.2,
        dtype=dtype,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(str(dest), safe_serialization=True)
    # Never let a library default make the config ambiguous about tying.
    cfg_path = dest / "config.json"
    cfg: dict[str, Any] = json.loads(cfg_path.read_text())
    cfg["tie_word_embeddings"] = tie_embeddings
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if tokenizer:
        _make_tokenizer(dest, vocab)
    return dest


@dataclass(frozen=True)
class Family:
    """One architecture of the matrix: a Hugging Face config class and its tiny settings.

    ``config`` holds the keyword arguments for the config class (on top of the shared
    tiny defaults in ``_BASE``); ``seed`` is fixed per family so every run writes the same
    weights. ``covers`` says which sharding feature the family exercises."""

    name: str
    architecture: str
    config_class: str
    covers: str
    seed: int
    config: dict[str, Any] = field(default_factory=dict)
    moe: bool = False
    # multi-head latent attention: head sizes are not hidden_size / heads
    mla: bool = False


# Shared by every family: head_dim 64 (vLLM's CPU attention), 2 layers, a well-separated
# random init (see make_tiny_llama), 256 positions. Every partitioned size is a multiple of
# 64 at TP=2 so vLLM's CPU kernels and the WNA16 (GPTQ) kernels accept it.
_BASE: dict[str, Any] = {
    "vocab_size": 512,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 256,
    "initializer_range": 0.2,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
}

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "llama-gqa",
            "LlamaForCausalLM",
            "LlamaConfig",
            "dense GQA (4 query heads share 2 KV heads: one per rank at TP=2) with "
            "attention biases (q/k/v fused into qkv_proj.bias; o_proj.bias replicated)",
            seed=10,
            config={
                "hidden_size": 256,
                "num_attention_heads": 4,
                "intermediate_size": 512,
                "attention_bias": True,
            },
        ),
        Family(
            "llama-tied",
            "LlamaForCausalLM",
            "LlamaConfig",
            "tied embeddings (lm_head is embed_tokens) over a padded vocabulary of 500, "
            "and one KV head, replicated at TP=2",
            seed=11,
            config={"tie_word_embeddings": True, "num_key_value_heads": 1, "vocab_size": 500},
        ),
        Family(
            "llama-padded-vocab",
            "LlamaForCausalLM",
            "LlamaConfig",
            "vocabulary of 500 (not a multiple of 64*TP): vLLM pads embed_tokens and lm_head",
            seed=12,
            config={"vocab_size": 500},
        ),
        Family(
            "qwen2",
            "Qwen2ForCausalLM",
            "Qwen2Config",
            "qkv bias (q_proj/k_proj/v_proj.bias fused into qkv_proj.bias)",
            seed=13,
        ),
        Family(
            "qwen3",
            "Qwen3ForCausalLM",
            "Qwen3Config",
            "q/k norm (per-head RMSNorm weights, replicated)",
            seed=14,
        ),
        Family(
            "phi3",
            "Phi3ForCausalLM",
            "Phi3Config",
            "HF-fused qkv_proj and gate_up_proj in the checkpoint, split per rank by vLLM",
            seed=15,
            config={"pad_token_id": 2},
        ),
        Family(
            "mixtral",
            "MixtralForCausalLM",
            "MixtralConfig",
            "MoE, Mixtral style: 4 experts (w1/w2/w3), top-2, fused into w13/w2 per rank",
            seed=16,
            config={"intermediate_size": 128, "num_local_experts": 4, "num_experts_per_tok": 2},
            moe=True,
        ),
        Family(
            "qwen3-moe",
            "Qwen3MoeForCausalLM",
            "Qwen3MoeConfig",
            "MoE, Qwen3 style: 4 experts (gate/up/down_proj), top-2, q/k norm",
            seed=17,
            config={
                "moe_intermediate_size": 128,
                "num_experts": 4,
                "num_experts_per_tok": 2,
                "norm_topk_prob": True,
                "decoder_sparse_step": 1,
                "mlp_only_layers": [],
            },
            moe=True,
        ),
        Family(
            "qwen2-moe",
            "Qwen2MoeForCausalLM",
            "Qwen2MoeConfig",
            "MoE, Qwen2 style: 4 experts plus a gated shared expert, qkv bias",
            seed=18,
            config={
                "moe_intermediate_size": 128,
                "shared_expert_intermediate_size": 256,
                "num_experts": 4,
                "num_experts_per_tok": 2,
                "norm_topk_prob": False,
                "decoder_sparse_step": 1,
                "mlp_only_layers": [],
            },
            moe=True,
        ),
        Family(
            "deepseek-v2",
            "DeepseekV2ForCausalLM",
            "DeepseekV2Config",
            "MLA attention (latent KV, kv_lora_rank 512 + rope 64 as vLLM's CPU MLA needs) "
            "and MoE with a shared expert after one dense layer, DeepSeek-V2-Lite style",
            seed=19,
            config={
                "hidden_size": 256,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
                "intermediate_size": 256,
                "q_lora_rank": None,
                "kv_lora_rank": 512,
                "qk_rope_head_dim": 64,
                "qk_nope_head_dim": 64,
                "v_head_dim": 64,
                "head_dim": 64,
                "n_routed_experts": 4,
                "n_shared_experts": 1,
                "moe_intermediate_size": 128,
                "num_experts_per_tok": 2,
                "first_k_dense_replace": 1,
                "moe_layer_freq": 1,
                "topk_method": "greedy",
                "n_group": 1,
                "topk_group": 1,
                "norm_topk_prob": False,
                "routed_scaling_factor": 1.0,
            },
            moe=True,
            mla=True,
        ),
    )
}


def make_tiny_model(
    family: str | Family,
    dest: str | Path,
    *,
    seed: int | None = None,
    dtype: str = "bfloat16",
    tokenizer: bool = False,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """Write the tiny random checkpoint of ``family`` (a name in ``FAMILIES``) to ``dest``.

    The weights come from the family's fixed seed (or ``seed``), so the same call always
    writes the same tensors. Without ``tokenizer`` the model has no tokenizer files (vLLM
    then runs with ``skip_tokenizer_init`` and token-id prompts). ``overrides`` replace
    config values (e.g. a larger model for a benchmark)."""
    import torch
    import transformers

    fam = FAMILIES[family] if isinstance(family, str) else family
    settings = {**_BASE, **fam.config, **(overrides or {})}
    heads, head_dim = settings["num_attention_heads"], settings["head_dim"]
    if not fam.mla and settings["hidden_size"] != heads * head_dim:
        raise ValueError(f"{fam.name}: hidden_size must be num_attention_heads * head_dim")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    config = getattr(transformers, fam.config_class)(**settings, dtype=dtype)
    model_class = getattr(transformers, fam.architecture)
    torch.manual_seed(fam.seed if seed is None else seed)
    model = model_class(config)
    # Library init leaves norms at 1 and biases at 0: a shard holding the wrong slice of
    # those would go unnoticed. Make them random too (same seed, same values).
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if param.dim() == 1 and "norm" in pname:
                param.normal_(1.0, 0.1)
            elif pname.endswith(".bias"):
                param.normal_(0.0, 0.2)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(str(dest), safe_serialization=True)
    cfg_path = dest / "config.json"
    cfg: dict[str, Any] = json.loads(cfg_path.read_text())
    # Spell out what the engine must not guess (library defaults differ between versions).
    cfg["architectures"] = [fam.architecture]
    cfg["tie_word_embeddings"] = bool(settings["tie_word_embeddings"])
    for key in ("num_experts", "num_local_experts", "moe_intermediate_size"):
        if key in settings:
            cfg[key] = settings[key]
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if tokenizer:
        _make_tokenizer(dest, int(settings["vocab_size"]))
    return dest


# ------------------------------------------------------------------------------ GPTQ

# The linear layers GPTQ quantizes in a Llama-style decoder block (as AutoGPTQ does);
# embeddings, norms and lm_head stay in the model dtype.
GPTQ_MODULES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def _to_int32(packed: Any) -> Any:
    """32 packed bits held in int64 as the int32 with the same bit pattern."""
    import torch

    return ((packed + 2**31) % 2**32 - 2**31).to(torch.int32)


def gptq_pack(weight: Any, *, bits: int = 4, group_size: int = 32) -> dict[str, Any]:
    """Quantize one ``[out, in]`` weight to symmetric GPTQ ``bits``-bit (round to nearest).

    Returns the four tensors of a GPTQ (AutoGPTQ v1 format, ``desc_act=False``) linear:

    * ``qweight`` int32 ``[in / (32/bits), out]``: input row ``i`` of output column ``j``
      sits in ``qweight[i // pf, j]`` at bits ``bits * (i % pf)`` (lowest first);
    * ``qzeros`` int32 ``[in / group, out / pf]``: packed along the output dim the same
      way; symmetric checkpoints store ``2**(bits-1) - 1`` (v1's zero minus one);
    * ``scales`` ``[in / group, out]`` in the weight's dtype;
    * ``g_idx`` int32 ``[in]``: the group of each input row (``i // group``).

    The dequantized weight is ``(q - 2**(bits-1)) * scale`` (vLLM's ``uint4b8``)."""
    import torch

    out_f, in_f = weight.shape
    pf = 32 // bits
    if in_f % group_size or in_f % pf or out_f % pf:
        raise ValueError(f"weight {tuple(weight.shape)} does not fit group {group_size}")
    half = 2 ** (bits - 1)
    w = weight.float().t().contiguous()  # [in, out]
    groups = w.view(in_f // group_size, group_size, out_f)
    amax = groups.abs().amax(dim=1).clamp(min=1e-6)  # [groups, out]
    scales = (amax / (half - 1)).to(weight.dtype)
    s = scales.float().repeat_interleave(group_size, dim=0)  # [in, out]
    q = (torch.round(w / s) + half).clamp(0, 2 * half - 1).to(torch.int64)
    shifts = (torch.arange(pf, dtype=torch.int64) * bits).view(1, pf, 1)
    packed = (q.view(in_f // pf, pf, out_f) << shifts).sum(dim=1)
    qweight = _to_int32(packed)
    zeros = torch.full((in_f // group_size, out_f), half - 1, dtype=torch.int64)
    zshifts = (torch.arange(pf, dtype=torch.int64) * bits).view(1, 1, pf)
    zpacked = (zeros.view(in_f // group_size, out_f // pf, pf) << zshifts).sum(dim=2)
    qzeros = _to_int32(zpacked)
    g_idx = (torch.arange(in_f, dtype=torch.int32) // group_size).to(torch.int32)
    return {"qweight": qweight.contiguous(), "qzeros": qzeros, "scales": scales, "g_idx": g_idx}


def gptq_unpack(tensors: dict[str, Any], *, bits: int = 4) -> Any:
    """The ``[out, in]`` float32 weight a GPTQ linear stands for (inverse of gptq_pack for
    the symmetric format; used by tests to check the packing against vLLM)."""
    import torch

    qweight, scales, g_idx = tensors["qweight"], tensors["scales"], tensors["g_idx"]
    pf = 32 // bits
    mask = (1 << bits) - 1
    raw = qweight.to(torch.int64) & 0xFFFFFFFF
    shifts = (torch.arange(pf, dtype=torch.int64) * bits).view(1, pf, 1)
    q = ((raw.unsqueeze(1) >> shifts) & mask).reshape(-1, qweight.shape[1])  # [in, out]
    half = 2 ** (bits - 1)
    w = (q.float() - half) * scales.float()[g_idx.long()]
    return w.t().contiguous()


def quantize_gptq(
    src: str | Path,
    dest: str | Path,
    *,
    bits: int = 4,
    group_size: int = 32,
) -> Path:
    """Write a GPTQ ``bits``-bit copy of the dense checkpoint ``src`` to ``dest``.

    Every linear of ``GPTQ_MODULES`` becomes ``qweight``/``qzeros``/``scales``/``g_idx``
    (see gptq_pack); config.json gets the ``quantization_config`` vLLM reads
    (``quant_method: gptq``, symmetric, ``desc_act: false``). Other tensors and files are
    copied unchanged."""
    import shutil

    from safetensors.torch import load_file, save_file

    src, dest = Path(src), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(src / "model.safetensors"))
    out: dict[str, Any] = {}
    for name, t in tensors.items():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module.split(".", 3)[-1] in GPTQ_MODULES:
            for k, v in gptq_pack(t, bits=bits, group_size=group_size).items():
                out[f"{module}.{k}"] = v
        else:
            out[name] = t
    save_file(out, str(dest / "model.safetensors"), metadata={"format": "pt"})
    for p in src.iterdir():
        if p.name not in ("model.safetensors", "config.json") and p.is_file():
            shutil.copy2(p, dest / p.name)
    cfg: dict[str, Any] = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": False,
        "sym": True,
        "lm_head": False,
        "damp_percent": 0.01,
        "true_sequential": True,
        "static_groups": False,
        "checkpoint_format": "gptq",
    }
    (dest / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return dest


def dequantize_gptq(src: str | Path, dest: str | Path) -> Path:
    """Write the dense checkpoint a GPTQ checkpoint from quantize_gptq stands for (each
    linear's dequantized weight in the model dtype, no quantization_config): what the
    quantized model must approximately compute, so a wrong packing order shows."""
    import shutil

    from safetensors.torch import load_file, save_file

    src, dest = Path(src), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    cfg: dict[str, Any] = json.loads((src / "config.json").read_text())
    qc = cfg.pop("quantization_config")
    tensors = load_file(str(src / "model.safetensors"))
    out: dict[str, Any] = {}
    for name, t in tensors.items():
        module, _, kind = name.rpartition(".")
        if kind == "qweight":
            parts = {k: tensors[f"{module}.{k}"] for k in ("qweight", "scales", "g_idx")}
            dtype = parts["scales"].dtype
            out[f"{module}.weight"] = gptq_unpack(parts, bits=qc["bits"]).to(dtype)
        elif kind not in ("qzeros", "scales", "g_idx"):
            out[name] = t
    save_file(out, str(dest / "model.safetensors"), metadata={"format": "pt"})
    for p in src.iterdir():
        if p.name not in ("model.safetensors", "config.json") and p.is_file():
            shutil.copy2(p, dest / p.name)
    (dest / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return dest


# -------------------------------------------------------------------------- block FP8

FP8_BLOCK = (128, 128)


def fp8_block_pack(weight: Any, *, block: tuple[int, int] = FP8_BLOCK) -> dict[str, Any]:
    """Quantize one ``[out, in]`` weight to block-scaled FP8 as DeepSeek-V3 style
    checkpoints store it: ``weight`` float8_e4m3fn ``[out, in]`` and ``weight_scale_inv``
    float32 ``[ceil(out / bn), ceil(in / bk)]`` (the dequantized weight is each block times
    its scale)."""
    import torch

    bn, bk = block
    out_f, in_f = weight.shape
    rows, cols = -(-out_f // bn), -(-in_f // bk)
    w = torch.zeros(rows * bn, cols * bk, dtype=torch.float32)
    w[:out_f, :in_f] = weight.float()
    blocks = w.view(rows, bn, cols, bk)
    fmax = torch.finfo(torch.float8_e4m3fn).max
    scale = (blocks.abs().amax(dim=(1, 3)) / fmax).clamp(min=1e-12)  # [rows, cols]
    q = (blocks / scale.view(rows, 1, cols, 1)).clamp(-fmax, fmax).to(torch.float8_e4m3fn)
    q = q.view(rows * bn, cols * bk)[:out_f, :in_f].contiguous()
    return {"weight": q, "weight_scale_inv": scale.contiguous()}


def make_tiny_fp8_block(dest: str | Path, *, seed: int = 5) -> Path:
    """A block-FP8 Llama (``quant_method: fp8``, ``weight_block_size: [128, 128]``, the
    format of DeepSeek-V3/R1, Kimi K2 and Qwen3 FP8 checkpoints): every decoder linear is
    float8_e4m3fn with a float32 ``weight_scale_inv`` per 128x128 block; embeddings, norms
    and ``lm_head`` stay bfloat16. Its dimensions keep every linear a whole number of
    blocks per rank at TP=2 (hidden 256, 4 heads and 4 KV heads of 64, intermediate 512).
    vLLM's CPU block-FP8 kernels need AMX, so only the planner can shard it on machines
    without."""
    import shutil

    from safetensors.torch import load_file, save_file

    dest = Path(dest)
    dense = dest.with_name(dest.name + "-dense")
    make_tiny_llama(
        dense, num_kv_heads=4, heads=4, hidden=256, intermediate=512, seed=seed, tokenizer=False
    )
    dest.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(dense / "model.safetensors"))
    out: dict[str, Any] = {}
    for name, t in tensors.items():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module.split(".", 3)[-1] in GPTQ_MODULES:
            for k, v in fp8_block_pack(t).items():
                out[f"{module}.{k}"] = v
        else:
            out[name] = t
    save_file(out, str(dest / "model.safetensors"), metadata={"format": "pt"})
    for p in dense.iterdir():
        if p.name not in ("model.safetensors", "config.json") and p.is_file():
            shutil.copy2(p, dest / p.name)
    cfg: dict[str, Any] = json.loads((dense / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "weight_block_size": list(FP8_BLOCK),
    }
    (dest / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(dense)
    return dest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write a tiny random Llama checkpoint.")
    p.add_argument("dest")
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--tie", action="store_true", help="tie lm_head to the input embedding")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-tokenizer", action="store_true")
    a = p.parse_args(argv)
    out = make_tiny_llama(
        a.dest,
        num_kv_heads=a.kv_heads,
        heads=a.heads,
        hidden=a.hidden,
        layers=a.layers,
        vocab=a.vocab,
        tie_embeddings=a.tie,
        seed=a.seed,
        tokenizer=not a.no_tokenizer,
    )
    print(out)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
