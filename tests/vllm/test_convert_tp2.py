"""TP=2 with one KV head (replicated on both ranks) and tied embeddings, from S3 to S3:
the published shards hold the right slices of the source weights, and the round trip
through ``load_format="sharded_state"`` gives the same greedy tokens as the original model.

The ``converted_tp2`` fixture (tests/vllm/conftest.py) runs the conversion once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from preshard.core.manifest import MANIFEST_NAME, Manifest
from preshard.worker.verify.shards import check_shards

pytestmark = pytest.mark.vllm


def published_dir(run: Any) -> Path:
    """The folder behind the output prefix on the rclone S3 server."""
    return run.server.object_path("shards", "tiny-kv1-tp2")


def test_tp2_round_trip_gives_the_same_outputs(converted_tp2: Any) -> None:
    out = converted_tp2.outcome
    assert len(out.reference_tokens) == 3
    assert all(len(t) == 16 for t in out.reference_tokens)
    assert out.verified_tokens == out.reference_tokens
    engine = out.verification["engine"]
    assert (engine["matched"], engine["comparison"], engine["topK"]) == (True, "abs<=0.05", 5)
    assert engine["positions"] == 48 and engine["maxAbsDifference"] <= 0.05
    assert isinstance(engine["bitIdentical"], bool)
    free = out.verification["engineFree"]
    assert free["matched"] is True and free["sourceTensors"] > 0 and free["fills"] >= 2
    # Random weights: the answers are not degenerate (same token over and over).
    assert len({t for seq in out.reference_tokens for t in seq}) > 4
    assert out.vllm_version == "0.32.0"


def test_tp2_published_artifact(converted_tp2: Any) -> None:
    art = converted_tp2.outcome.artifact
    assert art["uri"] == converted_tp2.output
    assert art["manifestUri"] == converted_tp2.output + MANIFEST_NAME
    pub = published_dir(converted_tp2)
    man = Manifest.from_json((pub / MANIFEST_NAME).read_text())
    assert (man.tensor_parallel_size, man.owner) == (2, "ns/tiny-tp2/uid-2")
    assert man.source_uri == converted_tp2.source
    assert art["files"] == len(man.files) and art["totalBytes"] == man.total_bytes
    # The real `preshard verify` re-reads every object against the manifest.
    env = {**os.environ, **converted_tp2.server.env()}
    proc = subprocess.run(
        [sys.executable, "-m", "preshard.cli", "verify", converted_tp2.output],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_tp2_files(converted_tp2: Any) -> None:
    pub = published_dir(converted_tp2)
    report = check_shards(pub, 2)
    # --max-file-size 128Ki splits each rank's ~390 KiB into several parts.
    for rank in ((0, 0), (0, 1)):
        parts = [p.name for p in report.files[rank]]
        assert len(parts) >= 3
        assert parts == [f"model-rank-{rank[1]}-part-{i}.safetensors" for i in range(len(parts))]
        assert all(p.stat().st_size <= 128 * 1024 + 64 * 1024 for p in report.files[rank])
    assert (pub / "config.json").is_file()
    assert not (pub / "tokenizer.json").exists()
    assert (pub / "preshard-sharding.json").is_file()
    assert not list(pub.glob("preshard-trace-*"))
    for key in (
        "download",
        "convert",
        "vllm_load_and_save",
        "verify_engine_free",
        "verify_engine",
        "upload",
        "total",
    ):
        assert converted_tp2.outcome.timings[key] >= 0


def load_rank(out_dir: Path, rank: int) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for p in sorted(out_dir.glob(f"model-rank-{rank}-part-*.safetensors")):
        tensors.update(load_file(str(p)))
    return tensors


def test_tp2_shards_hold_the_right_slices(converted_tp2: Any, tiny_kv1_tied_model: Path) -> None:
    src = load_file(str(tiny_kv1_tied_model / "model.safetensors"))
    ranks = [load_rank(published_dir(converted_tp2), r) for r in range(2)]
    head_dim, inter, vocab_half = 64, 256 // 2, 512 // 2
    for r, shard in enumerate(ranks):
        for i in range(2):
            p = f"model.layers.{i}."
            q = src[p + "self_attn.q_proj.weight"][r * head_dim : (r + 1) * head_dim]
            # The single KV head is replicated: every rank holds all of k and v.
            k, v = src[p + "self_attn.k_proj.weight"], src[p + "self_attn.v_proj.weight"]
            assert torch.equal(shard[p + "self_attn.qkv_proj.weight"], torch.cat([q, k, v]))
            o = src[p + "self_attn.o_proj.weight"][:, r * head_dim : (r + 1) * head_dim]
            assert torch.equal(shard[p + "self_attn.o_proj.weight"], o)
            gate = src[p + "mlp.gate_proj.weight"][r * inter : (r + 1) * inter]
            up = src[p + "mlp.up_proj.weight"][r * inter : (r + 1) * inter]
            assert torch.equal(shard[p + "mlp.gate_up_proj.weight"], torch.cat([gate, up]))
            down = src[p + "mlp.down_proj.weight"][:, r * inter : (r + 1) * inter]
            assert torch.equal(shard[p + "mlp.down_proj.weight"], down)
            norm = p + "input_layernorm.weight"
            assert torch.equal(shard[norm], src[norm])
        # Tied embeddings: one tensor per rank (vLLM keeps the lm_head name), the rank's
        # half of the vocabulary.
        emb = src["model.embed_tokens.weight"][r * vocab_half : (r + 1) * vocab_half]
        tied = [k for k in shard if k in ("lm_head.weight", "model.embed_tokens.weight")]
        assert len(tied) == 1
        assert torch.equal(shard[tied[0]], emb)
