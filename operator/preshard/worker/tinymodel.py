"""Tiny random Llama checkpoints for tests, benchmarks and the demo (no network, no hub).

``make_tiny_llama`` writes a Hugging Face style directory: ``config.json``,
``generation_config.json``, ``model.safetensors`` and, optionally, a small byte-level BPE
tokenizer trained offline on a built-in text. The defaults fit what vLLM's CPU backend
supports (head_dim 64) and load in seconds.

Run as a script: ``python -m preshard.worker.tinymodel DEST [--kv-heads 1] [--tie]``.
"""

from __future__ import annotations

import argparse
import json
import sys
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
