"""``preshard convert`` end to end with real vLLM at TP=1 (CLI in a subprocess).

Fixtures (``CliRun`` results) come from tests/vllm/conftest.py."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.vllm


def test_tp1_conversion_succeeds(converted_tp1: Any) -> None:
    run = converted_tp1
    assert run.rc == 0, run.stderr[-3000:]
    assert run.last_stderr_line.startswith(f"preshard: published {run.output}")
    assert "1 shard files for 1 ranks" in run.last_stderr_line
    assert run.result is not None and run.result.result == "Succeeded"
    assert run.result.artifact and run.result.reason is None


def test_tp1_output_layout(converted_tp1: Any) -> None:
    names = sorted(p.name for p in converted_tp1.output.iterdir())
    assert "model-rank-0-part-0.safetensors" in names
    for f in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "preshard-manifest.json",
    ):
        assert f in names
    assert "model.safetensors" not in names
    assert not [
        n for n in names if n.startswith("model-rank-") and n != "model-rank-0-part-0.safetensors"
    ]


def test_tp1_shards_hold_the_source_weights(converted_tp1: Any, tiny_tokenizer_model: Path) -> None:
    """The saved rank file holds every weight with the source's values (vLLM fuses
    q/k/v and gate/up): raw state, saved before vLLM's CPU backend prepacks (and empties)
    the linear weights."""
    src = load_file(str(tiny_tokenizer_model / "model.safetensors"))
    shard = load_file(str(converted_tp1.output / "model-rank-0-part-0.safetensors"))
    for i in range(2):
        p = f"model.layers.{i}."
        qkv = torch.cat([src[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        assert torch.equal(shard[p + "self_attn.qkv_proj.weight"], qkv)
        gate_up = torch.cat([src[p + "mlp.gate_proj.weight"], src[p + "mlp.up_proj.weight"]])
        assert torch.equal(shard[p + "mlp.gate_up_proj.weight"], gate_up)
        for name in (
            "self_attn.o_proj.weight",
            "mlp.down_proj.weight",
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
        ):
            assert torch.equal(shard[p + name], src[p + name]), name
    assert torch.equal(shard["model.embed_tokens.weight"], src["model.embed_tokens.weight"])
    assert torch.equal(shard["lm_head.weight"], src["lm_head.weight"])
    assert torch.equal(shard["model.norm.weight"], src["model.norm.weight"])


def test_tp1_progress_and_timings(converted_tp1: Any) -> None:
    stages = [r.stage for r in converted_tp1.progress]
    order = [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s]
    for stage in ("Downloading", "Converting", "Verifying", "Uploading"):
        assert stage in order
    assert order.index("Downloading") < order.index("Converting") < order.index("Verifying")
    assert order.index("Verifying") < order.index("Uploading")
    # Within the tolerance; bit-identical or not depends on the CPU's kernels.
    assert re.search(
        r"verified with an engine: the sharded checkpoint reloaded at TP 1 x PP 1 gives the "
        r"same tokens and top-5 log-probabilities \(abs<=0\.05, (bit-identical|max "
        r"difference [-+.e0-9]+)\) at 48 positions of 3 prompts",
        converted_tp1.stderr,
    )
    assert "verified engine-free: " in converted_tp1.stderr
    assert " bit for bit (" in converted_tp1.stderr
    assert "stage timings: download" in converted_tp1.stderr
    # vLLM's log goes to stderr; stdout carries only the progress records.
    assert all(
        line.startswith("PRESHARD-PROGRESS ")
        for line in converted_tp1.stdout.splitlines()
        if line.strip()
    )


def test_tp1_manifest(converted_tp1: Any, tiny_tokenizer_model: Path) -> None:
    import hashlib

    from preshard.core.manifest import MANIFEST_NAME, Manifest

    out = converted_tp1.output
    man = Manifest.from_json((out / MANIFEST_NAME).read_text())
    assert (man.tensor_parallel_size, man.pipeline_parallel_size) == (1, 1)
    assert man.vllm_version == "0.32.0"
    assert man.owner == "ns/tiny-tp1/uid-1"
    assert man.file_pattern == "model-rank-{rank}-part-{part}.safetensors"
    assert man.load_format == "sharded_state"
    assert (man.format_version, man.state_format) == (2, "raw")
    assert man.converted_on == {"platform": "cpu", "engine": "vllm"}
    assert man.sharding_key == "preshard-sharding.json" and man.file("preshard-sharding.json")
    assert man.verification is not None
    assert man.verification["engineFree"]["matched"] is True
    assert man.verification["engine"]["comparison"] == "abs<=0.05"
    assert man.verification["engine"]["maxAbsDifference"] <= 0.05
    assert man.verification["engine"]["positions"] == 48
    assert man.source_uri == str(tiny_tokenizer_model)
    assert [f.key for f in man.shard_files()] == ["model-rank-0-part-0.safetensors"]
    assert {f.key for f in man.other_files()} >= {"config.json", "tokenizer.json"}
    for f in man.files:
        data = (out / f.key).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (f.size, f.sha256)
    assert converted_tp1.result.artifact["files"] == len(man.files)
    assert converted_tp1.result.artifact["vllmVersion"] == "0.32.0"
