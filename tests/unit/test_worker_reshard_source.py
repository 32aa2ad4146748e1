"""preshard.worker.sources.checkpoint: a published checkpoint read back as the original
tensors (re-shard, docs/architecture.md "Re-shard").

No vLLM here: the checkpoints are built the way the engine's ``preshard_raw`` loader
builds them, with the real ``LoadTracer`` recording weight-loader-like writes (row and
column shards, a fused qkv, a replicated norm, vocabulary padding filled, a tied
lm_head skipped), the real ``build_document`` and manifest, and real safetensors files.
tests/vllm/test_reshard_source.py does the same over a real engine conversion on S3.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from preshard.core.contract import MANIFEST_NAME, SHARDING_NAME
from preshard.core.manifest import build_manifest
from preshard.core.sharding import build_document
from preshard.worker.engine.load_trace import LoadTracer
from preshard.worker.sources import TensorSource
from preshard.worker.sources.checkpoint import (
    CheckpointSource,
    ReshardNotPossible,
    open_checkpoint,
    resharded_from,
)
from preshard.worker.verify.shards import VerificationFailed

TP = 2
VOCAB, PADDED, HIDDEN, HEADS, INTER = 10, 12, 8, 2, 12


def original(dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    return {
        "model.embed_tokens.weight": r(VOCAB, HIDDEN),
        "model.layers.0.self_attn.q_proj.weight": r(HIDDEN, HIDDEN),
        "model.layers.0.self_attn.k_proj.weight": r(HIDDEN, HIDDEN),
        "model.layers.0.self_attn.v_proj.weight": r(HIDDEN, HIDDEN),
        "model.layers.0.self_attn.o_proj.weight": r(HIDDEN, HIDDEN),
        "model.layers.0.mlp.down_proj.weight": r(HIDDEN, INTER),
        "model.norm.weight": r(HIDDEN),
        "lm_head.weight": r(VOCAB, HIDDEN),  # tied: the model skips it
    }


def load_rank(
    src: dict[str, torch.Tensor], rank: int, saved_dtype: torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One rank's parameters filled as vLLM's loaders fill them, and its trace."""
    dt = saved_dtype or src["model.norm.weight"].dtype
    rows, half = PADDED // TP, HIDDEN // TP
    params = {
        "model.embed_tokens.weight": torch.zeros(rows, HIDDEN, dtype=dt),
        "model.layers.0.self_attn.qkv_proj.weight": torch.zeros(3 * half, HIDDEN, dtype=dt),
        "model.layers.0.self_attn.o_proj.weight": torch.zeros(HIDDEN, half, dtype=dt),
        "model.layers.0.mlp.down_proj.weight": torch.zeros(HIDDEN, INTER // TP, dtype=dt),
        "model.norm.weight": torch.zeros(HIDDEN, dtype=dt),
    }
    tracer = LoadTracer(params)
    with tracer:
        for name, t in src.items():
            tracer.source(name, t)
            if name == "model.embed_tokens.weight":  # vocab-parallel, padded to 12
                p = params[name]
                lo = rank * rows
                n = max(0, min(VOCAB - lo, rows))
                p[:n].copy_(t.narrow(0, lo, n))
                p[n:].fill_(0)
            elif name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
                shard = "qkv".index(name.split(".")[-2][0])
                p = params["model.layers.0.self_attn.qkv_proj.weight"]
                p.narrow(0, shard * half, half).copy_(t.narrow(0, rank * half, half))
            elif name.endswith("o_proj.weight"):  # row-parallel: split the input dim
                params[name].copy_(t.narrow(1, rank * half, half))
            elif name.endswith("down_proj.weight"):
                params[name].copy_(t.narrow(1, rank * (INTER // TP), INTER // TP))
            elif name == "model.norm.weight":
                params[name].copy_(t)  # replicated
    trace = tracer.finish(params).to_json()
    trace.update(
        rank=rank,
        tpRank=rank,
        ppRank=0,
        tensorParallelSize=TP,
        pipelineParallelSize=1,
        saved={k: {"shape": list(v.shape), "dtype": str(v.dtype)[6:]} for k, v in params.items()},
    )
    return params, trace


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def publish(out: Path, doc: dict[str, Any]) -> None:
    """Write the sharding metadata and a manifest of every file in ``out`` (last)."""
    (out / SHARDING_NAME).write_text(json.dumps(doc))
    files = [
        (p.name, p.stat().st_size, sha(p.read_bytes()))
        for p in sorted(out.iterdir())
        if p.name != MANIFEST_NAME
    ]
    m = build_manifest(
        files,
        source_uri="s3://models/orig/",
        source_revision=None,
        tensor_parallel_size=TP,
        pipeline_parallel_size=1,
        vllm_version="0.32.0",
        dtype="auto",
        sharding_key=SHARDING_NAME,
        identity="sha256:" + "e" * 64,
    )
    (out / MANIFEST_NAME).write_text(m.to_json())


def make_checkpoint(
    out: Path, src: dict[str, torch.Tensor], saved_dtype: torch.dtype | None = None
) -> dict[str, Any]:
    out.mkdir(parents=True)
    traces = []
    for rank in range(TP):
        params, trace = load_rank(src, rank, saved_dtype)
        save_file(params, str(out / f"model-rank-{rank}-part-0.safetensors"))
        traces.append(trace)
    (out / "config.json").write_text('{"model_type": "llama", "tie_word_embeddings": true}')
    doc = build_document(traces)
    publish(out, doc)
    return doc


@pytest.fixture
def published(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]]:
    src = original()
    doc = make_checkpoint(tmp_path / "ckpt", src)
    return tmp_path / "ckpt", src, doc


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


def test_every_original_tensor_comes_back_bit_for_bit(
    published: tuple[Path, dict[str, torch.Tensor], dict[str, Any]], tmp_path: Path
) -> None:
    path, src, _ = published
    source = open_checkpoint(str(path))
    assert isinstance(source, CheckpointSource)
    _: TensorSource = source  # the contract the planner and the writer read
    infos = {t.name: t for t in source.tensors()}
    assert list(infos) == sorted(src)  # the recorded sources, in the document's order
    for name, t in src.items():
        assert infos[name].shape == tuple(t.shape) and infos[name].dtype == "BF16"
        if name == "lm_head.weight":
            continue
        got = source.read(name)
        assert got.dtype == t.dtype and got.shape == t.shape
        assert torch.equal(bits(got), bits(t)), name
    assert infos["model.norm.weight"].file == "model-rank-0-part-0.safetensors"
    # the config files, checked against the manifest
    prepared = source.prepare(tmp_path / "work")
    assert json.loads((prepared / "config.json").read_text())["model_type"] == "llama"
    assert not (prepared / SHARDING_NAME).exists() and not (prepared / MANIFEST_NAME).exists()
    # the origin the re-sharded manifest records
    origin = resharded_from(source)
    assert origin["uri"] == str(path)
    assert origin["manifestSha256"] == sha((path / MANIFEST_NAME).read_bytes())
    assert origin["tensorParallelSize"] == TP and origin["identity"] == "sha256:" + "e" * 64
    assert origin["source"] == {"uri": "s3://models/orig/", "revision": None}
    source.close()


def test_a_plain_model_directory_is_not_a_checkpoint(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    assert open_checkpoint(str(tmp_path)) is None


def test_a_tensor_the_model_never_read_is_refused(
    published: tuple[Path, dict[str, torch.Tensor], dict[str, Any]],
) -> None:
    path, _, doc = published
    assert "lm_head.weight" in doc["skippedSources"]
    with pytest.raises(ReshardNotPossible, match=r"lm_head.weight.*never read it"):
        CheckpointSource(str(path), _reader(path)).read("lm_head.weight")


def _reader(path: Path) -> Any:
    from preshard.worker.sources.ranged import LocalReader

    return LocalReader(path)


def test_one_changed_element_in_a_rank_file_is_refused(
    published: tuple[Path, dict[str, torch.Tensor], dict[str, Any]],
) -> None:
    path, _, _ = published
    f = path / "model-rank-1-part-0.safetensors"
    tensors = load_file(str(f))
    w = tensors["model.layers.0.self_attn.o_proj.weight"]
    w[3, 1] = w[3, 1] + 1  # one element; the manifest is not updated
    save_file(tensors, str(f))
    source = CheckpointSource(str(path), _reader(path))
    with pytest.raises(
        VerificationFailed, match=r"model-rank-1-part-0\.safetensors does not match"
    ):
        source.read("model.layers.0.self_attn.o_proj.weight")
    # a tensor whose regions lie only in the untouched file still reads
    assert source.read("model.norm.weight").shape == (HIDDEN,)


def test_metadata_that_leaves_a_region_uncovered_is_refused(
    published: tuple[Path, dict[str, torch.Tensor], dict[str, Any]],
) -> None:
    path, _, doc = published
    # rank 1's copy of the second half of o_proj's columns is dropped (the manifest is
    # rewritten to match: a consistent but lying checkpoint)
    key = "model.layers.0.self_attn.o_proj.weight"
    doc["ranks"][1]["tensors"][key]["writes"] = []
    publish(path, doc)
    source = CheckpointSource(str(path), _reader(path))
    with pytest.raises(ReshardNotPossible, match=r"element \[0, 4\] \(32 of 64 elements\)"):
        source.read(key)


def test_a_derived_write_is_named_as_not_invertible(
    published: tuple[Path, dict[str, torch.Tensor], dict[str, Any]],
) -> None:
    path, _, doc = published
    key = "model.layers.0.mlp.down_proj.weight"
    entry = doc["ranks"][0]["tensors"][key]
    entry["writes"] = [
        {"op": "derived", "dst": w["dst"], "sources": [key]} for w in entry["writes"]
    ]
    publish(path, doc)
    with pytest.raises(ReshardNotPossible, match=r"derived writes in .*@0.*cannot be inverted"):
        CheckpointSource(str(path), _reader(path)).read(key)


def test_a_converted_dtype_is_refused(tmp_path: Path) -> None:
    src = original(torch.float32)  # saved as bf16: the original values are gone
    make_checkpoint(tmp_path / "ckpt", src, saved_dtype=torch.bfloat16)
    source = CheckpointSource(str(tmp_path / "ckpt"), _reader(tmp_path / "ckpt"))
    with pytest.raises(ReshardNotPossible, match=r"F32 in the original but saved as BF16"):
        source.read("model.norm.weight")


def test_a_changed_sharding_file_or_a_checkpoint_without_one_is_refused(
    published: tuple[Path, dict[str, torch.Tensor], dict[str, Any]],
) -> None:
    path, _, doc = published
    doc["ranks"][0]["tensors"]["model.norm.weight"]["writes"] = []
    (path / SHARDING_NAME).write_text(json.dumps(doc))  # manifest NOT updated
    with pytest.raises(VerificationFailed, match="does not match the manifest"):
        CheckpointSource(str(path), _reader(path))
    man = json.loads((path / MANIFEST_NAME).read_text())
    man["sharding"] = None
    (path / MANIFEST_NAME).write_text(json.dumps(man))
    with pytest.raises(ReshardNotPossible, match="without sharding metadata"):
        CheckpointSource(str(path), _reader(path))


def test_listing_the_tensors_reads_headers_only_and_a_file_is_hashed_once(
    published: tuple[Path, dict[str, torch.Tensor], dict[str, Any]],
) -> None:
    from preshard.worker.sources.ranged import LocalReader

    path, src, _ = published

    class Counting(LocalReader):
        hashed: list[str] = []

        def sha256(self, key: str) -> tuple[int, str]:
            self.hashed.append(key)
            return super().sha256(key)

    source = CheckpointSource(str(path), Counting(path))
    assert len(source.tensors()) == len(src)
    assert Counting.hashed == []  # planning needs names and shapes, no file is read whole
    for name in src:
        if name != "lm_head.weight":
            source.read(name)
    assert sorted(Counting.hashed) == [
        "model-rank-0-part-0.safetensors",
        "model-rank-1-part-0.safetensors",
    ]


def test_a_recorded_iterator_position_orders_the_tensors(
    published: tuple[Path, dict[str, torch.Tensor], dict[str, Any]],
) -> None:
    """Without it the order is the document's (sorted by name); with an integer
    ``index`` per source (the position in vLLM's weights iterator) that order wins."""
    path, src, doc = published
    names = sorted(src)
    assert [t.name for t in CheckpointSource(str(path), _reader(path)).tensors()] == names
    for i, name in enumerate(reversed(names)):
        doc["sources"][name]["index"] = i
    publish(path, doc)
    got = [t.name for t in CheckpointSource(str(path), _reader(path)).tensors()]
    assert got == list(reversed(names))
