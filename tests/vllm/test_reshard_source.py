"""Re-shard source over a real engine conversion (docs/architecture.md, "Re-shard"): the
TP=2 checkpoint the ``converted_tp2`` fixture publishes to S3 (real vLLM 0.32 CPU build,
one KV head replicated on both ranks, tied embeddings, files split at 128 KiB) is read
back through ``preshard.worker.sources.checkpoint`` by ranged GETs, and every original
tensor the
model reads equals the source checkpoint bit for bit; the tied lm_head (never read) is
refused, as are a changed rank file and a lying sharding file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from preshard.core.contract import MANIFEST_NAME, SHARDING_NAME
from preshard.worker.sources.checkpoint import (
    CheckpointSource,
    ReshardNotPossible,
    open_checkpoint,
    resharded_from,
)
from preshard.worker.sources.ranged import LocalReader
from preshard.worker.verify.shards import VerificationFailed


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({1: torch.int8, 2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.fixture
def s3_env(converted_tp2: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in converted_tp2.server.env().items():
        monkeypatch.setenv(k, v)


def _original(converted_tp2: Any, tmp_path: Path) -> dict[str, torch.Tensor]:
    client = converted_tp2.server.client()
    bucket, prefix = converted_tp2.source.removeprefix("s3://").split("/", 1)
    out = {}
    for obj in client.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]:
        if obj["Key"].endswith(".safetensors"):
            dest = tmp_path / Path(obj["Key"]).name
            client.download_file(bucket, obj["Key"], str(dest))
            out.update(load_file(str(dest)))
    return out


def test_every_original_tensor_from_the_published_tp2_checkpoint(
    converted_tp2: Any, s3_env: None, tmp_path: Path
) -> None:
    original = _original(converted_tp2, tmp_path)
    source = open_checkpoint(converted_tp2.output)
    assert isinstance(source, CheckpointSource)
    infos = {t.name: t for t in source.tensors()}
    assert set(infos) == set(original)
    skipped = set(source.sharding.skipped_sources)
    read = 0
    for name, want in original.items():
        assert infos[name].shape == tuple(want.shape)
        if name in skipped:
            with pytest.raises(ReshardNotPossible, match="never read it"):
                source.read(name)
            continue
        got = source.read(name)
        assert got.dtype == want.dtype and torch.equal(_bits(got), _bits(want)), name
        read += 1
    assert read >= len(original) - 1  # at most the tied lm_head is skipped
    origin = resharded_from(source)
    assert origin["uri"] == converted_tp2.output and origin["tensorParallelSize"] == 2
    config = json.loads((source.prepare(tmp_path / "work") / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    source.close()


def _local_copy(converted_tp2: Any, dest: Path) -> Path:
    client = converted_tp2.server.client()
    bucket, prefix = converted_tp2.output.removeprefix("s3://").split("/", 1)
    dest.mkdir()
    for obj in client.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]:
        client.download_file(bucket, obj["Key"], str(dest / Path(obj["Key"]).name))
    return dest


def test_a_changed_rank_file_and_a_lying_sharding_file_are_refused(
    converted_tp2: Any, tmp_path: Path
) -> None:
    ckpt = _local_copy(converted_tp2, tmp_path / "ckpt")
    doc = json.loads((ckpt / SHARDING_NAME).read_text())
    # a copy only rank 1 holds (a TP shard, not a replicated region)
    rank0 = {
        (w["source"], json.dumps(w["src"]))
        for t in doc["ranks"][0]["tensors"].values()
        for w in t["writes"]
        if w["op"] == "copy"
    }
    key, copy = next(
        (k, w)
        for k, t in sorted(doc["ranks"][1]["tensors"].items())
        for w in t["writes"]
        if w["op"] == "copy" and (w["source"], json.dumps(w["src"])) not in rank0
    )
    name = copy["source"]
    # one element changed in the file that holds it (the manifest not updated)
    from safetensors import safe_open
    from safetensors.torch import save_file

    for f in sorted(ckpt.glob("model-rank-1-part-*.safetensors")):
        with safe_open(str(f), "pt") as h:
            if key in h.keys():
                tensors = {k: h.get_tensor(k) for k in h.keys()}
                _bits(tensors[key]).reshape(-1)[copy["dst"][0]] ^= 1  # one bit, in place
                save_file(tensors, str(f))
                break
    with pytest.raises(VerificationFailed, match="does not match the manifest"):
        CheckpointSource(str(ckpt), LocalReader(ckpt)).read(name)
    # a sharding file that drops that write, with the manifest rewritten to match
    ckpt = _local_copy(converted_tp2, tmp_path / "ckpt2")
    entry = doc["ranks"][1]["tensors"][key]
    entry["writes"] = [w for w in entry["writes"] if w != copy]
    text = json.dumps(doc).encode()
    (ckpt / SHARDING_NAME).write_bytes(text)
    man = json.loads((ckpt / MANIFEST_NAME).read_text())
    for f in man["files"]:
        if f["key"] == SHARDING_NAME:
            f["size"], f["sha256"] = len(text), hashlib.sha256(text).hexdigest()
    man["totalBytes"] = sum(f["size"] for f in man["files"])
    (ckpt / MANIFEST_NAME).write_text(json.dumps(man))
    source = CheckpointSource(str(ckpt), LocalReader(ckpt))
    with pytest.raises(ReshardNotPossible, match="is in no rank file"):
        source.read(name)


def _engine_free_missing() -> str | None:
    import importlib.util

    if importlib.util.find_spec("preshard.worker.planner") is None:
        return "the engine-free planner (preshard.worker.planner) is not installed"
    return None


def _convert_engine_free(src: Path, out: Path, tp: int, pp: int = 1) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable, "-m", "preshard.cli", "convert", "--source", str(src),
            "-tp", str(tp), "-pp", str(pp), "--output", str(out),
            "--work-dir", str(out.parent / f"work-{out.name}"), "--engine", "none", "--no-verify",
        ],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


def _files(d: Path) -> dict[str, str]:
    names = [
        p for p in sorted(d.iterdir()) if p.name.startswith("model-") or p.name == SHARDING_NAME
    ]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in names}


@pytest.mark.skipif(_engine_free_missing() is not None, reason=str(_engine_free_missing()))
def test_reshard_tp2_to_tp4_and_tp2_pp2_equals_planning_from_the_original(tmp_path: Path) -> None:
    """Re-sharding a published TP=2 checkpoint (no original, no engine)
    gives the same rank files and sharding metadata (same names, same sha256) as planning
    TP=4 (and TP=2 x PP=2) from the original; the manifest records the origin."""
    from preshard_dev.tinymodel import make_tiny_llama

    model = make_tiny_llama(
        tmp_path / "model", hidden=256, heads=4, num_kv_heads=2, layers=2, tokenizer=False, seed=3
    )
    _convert_engine_free(model, tmp_path / "tp2", 2)
    for tp, pp in ((4, 1), (2, 2)):
        orig, resharded = tmp_path / f"orig-{tp}x{pp}", tmp_path / f"reshard-{tp}x{pp}"
        _convert_engine_free(model, orig, tp, pp)
        _convert_engine_free(tmp_path / "tp2", resharded, tp, pp)
        want = _files(orig)
        assert len(want) > tp * pp  # every rank's files and the sharding metadata
        assert _files(resharded) == want
        man = json.loads((resharded / MANIFEST_NAME).read_text())
        origin = man["extra"]["reshardedFrom"]
        published = (tmp_path / "tp2" / MANIFEST_NAME).read_bytes()
        assert origin["manifestSha256"] == hashlib.sha256(published).hexdigest()
        assert origin["tensorParallelSize"] == 2 and origin["source"]["uri"] == str(model)
