"""The streaming shard writer against files written by safetensors itself.

Each test builds a small "model": source tensors in a safetensors checkpoint, and the
rank tensors a loader would make from them, computed here with plain torch ops
(``narrow``, ``cat``, ``.to``, ``fill``), independently of the writer's strided replay.
The reference files are written the way vLLM's ``ShardedStateLoader.save_model`` writes
them (its part loop over ``safetensors.torch.save_file``; the last test, marked vllm, runs
vLLM's own ``save_model`` with its rank functions patched, no engine), and the writer's
files must have the same names and the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from preshard.core.errors import PreshardError
from preshard.worker import shardbuild, shardlayout
from preshard.worker import shardwriter as sw
from preshard.worker.sources import TensorInfo, open_source
from preshard.worker.sources.header import natural_key, weight_files


def _strides(shape: list[int]) -> list[int]:
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= n
    return list(reversed(out))


def reference_save(
    state: dict[str, torch.Tensor], out: Path, pattern: str, max_size: int | None
) -> None:
    """``ShardedStateLoader.save_model``'s loop (vLLM 0.32), over save_file."""
    part_idx, total, part = 0, 0, {}
    for key, tensor in state.items():
        size = tensor.nelement() * tensor.element_size()
        if max_size is not None and total + size > max_size:
            save_file(part, str(out / pattern.format(part=part_idx)))
            part_idx, total, part = part_idx + 1, 0, {}
        part[key] = tensor
        total += size
    if part:
        save_file(part, str(out / pattern.format(part=part_idx)))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def copy(
    source: str,
    src_shape: list[int],
    dim: int,
    start: int,
    n: int,
    dst_off: int,
    dst_shape: list[int],
) -> dict[str, Any]:
    """A copy of ``source.narrow(dim, start, n)`` into the contiguous run of the
    destination starting at element ``dst_off`` (region ``dst_shape``)."""
    s = _strides(src_shape)
    region = list(src_shape)
    region[dim] = n
    return {
        "op": "copy",
        "source": source,
        "src": [start * s[dim], s, region],
        "dst": [dst_off, _strides(dst_shape), dst_shape],
    }


def trace(
    rank: int,
    tp: int,
    saved: dict[str, torch.Tensor],
    writes: dict[str, list[dict[str, Any]]],
    **extra: Any,
) -> dict[str, Any]:
    return {
        "rank": rank,
        "tpRank": rank,
        "ppRank": 0,
        "tensorParallelSize": tp,
        "pipelineParallelSize": 1,
        "writes": writes,
        "sources": {},
        "saved": {
            k: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
            for k, t in saved.items()
        },
        **extra,
    }


@pytest.fixture
def checkpoint(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    src = {
        "embed.weight": torch.randn(
            10, 8, generator=g, dtype=torch.float32
        ),  # vocab 10, pads to 12
        "q.weight": torch.randn(8, 8, generator=g).to(torch.bfloat16),
        "k.weight": torch.randn(4, 8, generator=g).to(torch.bfloat16),
        "down.weight": torch.randn(8, 16, generator=g).to(torch.bfloat16),
        "norm.weight": torch.randn(8, generator=g).to(torch.bfloat16),
        "counts": torch.arange(6, dtype=torch.int32),
    }
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    names = list(src)
    save_file({k: src[k] for k in names[:3]}, str(d / "model-00002-of-00002.safetensors"))
    save_file({k: src[k] for k in names[3:]}, str(d / "model-00001-of-00002.safetensors"))
    return d, src


def rank_state(
    src: dict[str, torch.Tensor], r: int
) -> tuple[dict[str, torch.Tensor], dict[str, list[dict[str, Any]]]]:
    """TP=2 rank ``r``: what a loader makes (values computed with torch ops) and the
    trace of its writes."""
    emb = torch.zeros(6, 8, dtype=torch.bfloat16)  # 12 padded rows / 2 ranks
    real = min(6, 10 - 6 * r)
    emb[:real] = src["embed.weight"][6 * r : 6 * r + real].to(torch.bfloat16)  # f32 -> bf16
    emb[real:] = 0
    qk = torch.cat([src["q.weight"].narrow(0, 4 * r, 4), src["k.weight"].narrow(0, 2 * r, 2)])
    down = src["down.weight"].narrow(1, 8 * r, 8).contiguous()
    norm = src["norm.weight"].clone()
    scale = torch.tensor(1.0)
    counts = src["counts"].to(torch.int64)
    state = {
        "lm_head.weight": emb,  # tied: model.embed.weight shares it (deduplicated away)
        "layers.0.qkv.weight": qk,
        "layers.0.attn._k_scale": scale,
        "layers.0.down.weight": down,
        "layers.0.norm.weight": norm,
        "counts": counts,
    }
    emb_writes = [copy("embed.weight", [10, 8], 0, 6 * r, real, 0, [real, 8])]
    if real < 6:
        emb_writes.append({"op": "fill", "value": 0, "dst": [real * 8, [8, 1], [6 - real, 8]]})
    writes = {
        "lm_head.weight": emb_writes,
        "model.embed.weight": emb_writes,
        "layers.0.qkv.weight": [
            copy("q.weight", [8, 8], 0, 4 * r, 4, 0, [4, 8]),
            copy("k.weight", [4, 8], 0, 2 * r, 2, 32, [2, 8]),
        ],
        "layers.0.down.weight": [
            {
                "op": "copy",
                "source": "down.weight",
                "src": [8 * r, [16, 1], [8, 8]],
                "dst": [0, [8, 1], [8, 8]],
            }
        ],
        "layers.0.norm.weight": [copy("norm.weight", [8], 0, 0, 8, 0, [8])],
        "counts": [copy("counts", [6], 0, 0, 6, 0, [6])],
    }
    return state, writes


PATTERN = "model-rank-{rank}-part-{part}.safetensors"


@pytest.mark.parametrize("max_size", [None, 200, 60, 1])
def test_byte_identical_to_save_file(tmp_path: Path, checkpoint: Any, max_size: int | None) -> None:
    model_dir, src = checkpoint
    ref = tmp_path / "ref"
    ref.mkdir()
    traces = []
    for r in range(2):
        state, writes = rank_state(src, r)
        reference_save(state, ref, PATTERN.replace("{rank}", str(r)), max_size)
        traces.append(trace(r, 2, state, writes))
    source = open_source(str(model_dir))
    out = tmp_path / "out"
    seen: list[str] = []
    report = sw.write_shards(
        traces, source, out, max_size=max_size, on_file=lambda f: seen.append(f.name)
    )
    want = {p.name: sha(p) for p in ref.iterdir()}
    assert {f.name: f.sha256 for f in report.files} == want
    assert {p.name: sha(p) for p in out.iterdir()} == want
    assert sorted(seen) == sorted(want)
    assert all(f.size == (out / f.name).stat().st_size for f in report.files)
    if max_size == 1:  # the first tensor exceeds max_size: vLLM writes an empty part 0
        assert (ref / "model-rank-0-part-0.safetensors").read_bytes()[8:].strip() == b"{}"
        assert len(want) == 2 * 7
    # TP ranks in lockstep: every source tensor read once, not once per rank
    assert report.source_reads == 6


def test_one_wrong_slice_changes_the_bytes(tmp_path: Path, checkpoint: Any) -> None:
    model_dir, src = checkpoint
    ref = tmp_path / "ref"
    ref.mkdir()
    state, writes = rank_state(src, 0)
    reference_save(state, ref, PATTERN.replace("{rank}", "0"), None)
    bad = json.loads(json.dumps(writes))
    bad["layers.0.qkv.weight"][1]["src"][0] = 8  # k rows 1..2 instead of 0..1
    report = sw.write_shards([trace(0, 1, state, bad)], open_source(str(model_dir)), tmp_path / "o")
    assert report.files[0].sha256 != sha(ref / "model-rank-0-part-0.safetensors")


def test_header_order_and_padding_match_safetensors(tmp_path: Path) -> None:
    dtypes = [torch.bool, torch.uint8, torch.int8, torch.float8_e5m2, torch.float8_e4m3fn, torch.int16,
              torch.float16, torch.bfloat16, torch.int32, torch.float32, torch.float64, torch.int64]  # fmt: skip
    tensors = {
        f"t{(7 * i) % 13}.{n}": torch.zeros(i + 1, 3, dtype=dt)
        for i, dt in enumerate(dtypes)
        for n in "ba"
    }
    save_file(tensors, str(tmp_path / "x.safetensors"))
    data = (tmp_path / "x.safetensors").read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    saved = [
        shardlayout.Saved(k, tuple(t.shape), str(t.dtype).removeprefix("torch."))
        for k, t in tensors.items()
    ]
    header, order = shardlayout.header_bytes(saved)
    assert header == data[: 8 + n]
    assert [t.key for t in order] == list(json.loads(data[8 : 8 + n]))


def test_uncovered_and_derived_are_refused(tmp_path: Path, checkpoint: Any) -> None:
    model_dir, src = checkpoint
    state, writes = rank_state(src, 0)
    source = open_source(str(model_dir))
    partial = dict(writes, **{"layers.0.qkv.weight": writes["layers.0.qkv.weight"][:1]})
    with pytest.raises(PreshardError, match=r"16 of 48 elements of layers\.0\.qkv\.weight") as e:
        sw.write_shards([trace(0, 1, state, partial)], source, tmp_path / "a")
    assert e.value.permanent and e.value.reason == "UnsupportedModel"
    derived = dict(
        writes,
        **{
            "layers.0.norm.weight": [
                {"op": "derived", "dst": [0, [1], [8]], "sources": ["norm.weight"]}
            ]
        },
    )
    with pytest.raises(PreshardError, match=r"computes layers\.0\.norm\.weight from norm\.weight"):
        sw.write_shards([trace(0, 1, state, derived)], source, tmp_path / "b")
    unknown = {**state, "layers.0.mystery": torch.zeros(2)}
    with pytest.raises(PreshardError, match=r"layers\.0\.mystery is written by no weight loader"):
        sw.write_shards([trace(0, 1, unknown, writes)], source, tmp_path / "c")
    # a trace may carry the initial value of such a tensor (the planner knows it)
    ok = sw.write_shards(
        [trace(0, 1, unknown, writes, initialized={"layers.0.mystery": 0.5})],
        source,
        tmp_path / "d",
    )
    from safetensors.torch import load_file

    assert load_file(str(ok.files[0].path))["layers.0.mystery"].tolist() == [0.5, 0.5]
    # nothing half-written is left behind by a failure
    assert not list((tmp_path / "a").glob("*.partial"))


def test_names_for_pipeline_parallel() -> None:
    assert shardlayout.render_name(None, tp_rank=1, pp_rank=1, tp_size=2, pp_size=2, part=3) == (
        "model-pp-1-tp-1-part-3.safetensors"
    )
    assert shardlayout.render_name(None, tp_rank=1, pp_rank=0, tp_size=2, pp_size=1, part=0) == (
        "model-rank-1-part-0.safetensors"
    )
    with pytest.raises(PreshardError):
        shardlayout.render_name(
            "model-rank-{rank}-part-{part}.safetensors",
            tp_rank=0,
            pp_rank=0,
            tp_size=2,
            pp_size=2,
            part=0,
        )


def test_local_source_order_and_values(checkpoint: Any, tmp_path: Path) -> None:
    model_dir, src = checkpoint
    # vLLM's order: files by natural sort, each file's tensors by name
    source = open_source(str(model_dir))
    names = [t.name for t in source.tensors()]
    assert names == ["counts", "down.weight", "norm.weight", "embed.weight", "k.weight", "q.weight"]
    assert source.tensors()[0] == TensorInfo(
        "counts", "I32", (6,), "model-00001-of-00002.safetensors"
    )
    for name, t in src.items():
        got = source.read(name)
        assert got.dtype == t.dtype and torch.equal(got, t)
    # an index limits the files (vLLM ignores a consolidated copy next to the shards)
    save_file({"q.weight": src["q.weight"]}, str(model_dir / "consolidated.safetensors"))
    index = {"weight_map": {k: "model-00001-of-00002.safetensors" for k in ("counts",)}}
    index["weight_map"]["q.weight"] = "model-00002-of-00002.safetensors"
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    assert {t.file for t in open_source(str(model_dir)).tensors()} == {
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    }
    assert sorted(["m-10.safetensors", "m-2.safetensors"], key=natural_key) == [
        "m-2.safetensors",
        "m-10.safetensors",
    ]
    with pytest.raises(PreshardError, match="missing"):
        weight_files(["a.safetensors"], json.dumps({"weight_map": {"x": "b.safetensors"}}).encode())


def test_local_source_refuses_links_out(checkpoint: Any, tmp_path: Path) -> None:
    model_dir, _ = checkpoint
    (tmp_path / "secret").write_text("x")
    (model_dir / "NOTICE.txt").symlink_to(tmp_path / "secret")
    with pytest.raises(PreshardError, match="symbolic link") as e:
        open_source(str(model_dir))
    assert e.value.reason == "InvalidSource"


class _Model(torch.nn.Module):
    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self._state = state

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return dict(self._state)


@pytest.mark.vllm
@pytest.mark.parametrize("max_size", [None, 100])
def test_same_files_as_vllm_save_model(
    tmp_path: Path,
    checkpoint: Any,
    monkeypatch: pytest.MonkeyPatch,
    max_size: int | None,
) -> None:
    import vllm.distributed as dist
    from vllm.model_executor.model_loader.sharded_state_loader import ShardedStateLoader

    model_dir, src = checkpoint
    ref = tmp_path / "ref"
    ref.mkdir()
    traces = []
    for r in range(2):
        state, writes = rank_state(src, r)
        # the tied embedding: the same storage under a second (larger) name
        state = {**state, "model.embed.weight": state["lm_head.weight"]}

        class _Group:
            world_size = 2

        monkeypatch.setattr(dist, "get_tensor_model_parallel_rank", lambda r=r: r)
        monkeypatch.setattr(dist, "get_pipeline_model_parallel_rank", lambda: 0)
        monkeypatch.setattr(dist, "get_tp_group", lambda: _Group())
        monkeypatch.setattr(dist, "get_pp_group", lambda: type("G", (), {"world_size": 1})())
        ShardedStateLoader.save_model(_Model(state), str(ref), max_size=max_size)
        saved = ShardedStateLoader._filter_subtensors(state)
        assert "model.embed.weight" not in saved
        traces.append(trace(r, 2, saved, writes))
    report = sw.write_shards(
        traces, open_source(str(model_dir)), tmp_path / "out", max_size=max_size
    )
    want = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in ref.iterdir()}
    assert len(want) >= 2
    assert {f.name: f.sha256 for f in report.files} == want


def test_pvc_source_stays_inside_its_volume(
    checkpoint: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pvc://claim/path is read under the volume's mount (PRESHARD_PVC_MOUNT_ROOT), with
    the same containment checks as the download path."""
    import shutil

    model_dir, src = checkpoint
    root = tmp_path / "mnt"
    shutil.copytree(model_dir, root / "claim" / "models" / "m")
    monkeypatch.setenv("PRESHARD_PVC_MOUNT_ROOT", str(root))
    source = open_source("pvc://claim/models/m")
    assert torch.equal(source.read("q.weight"), src["q.weight"])
    (root / "claim" / "escape").symlink_to(model_dir)  # a link out of the volume
    with pytest.raises(PreshardError, match="outside its volume"):
        open_source("pvc://claim/escape")


def test_uncovered_counts_the_elements_no_write_reaches_runs_and_strided_alike() -> None:
    """The planner's completeness check (and the writer's): from the writes' runs of
    elements when each is one consecutive run, from a mask otherwise; one missing
    element is counted either way, overlaps are not counted twice."""

    def w(off: int, strides: list[int], shape: list[int]) -> dict[str, Any]:
        return {"op": "copy", "dst": [off, strides, shape]}

    rows = [w(0, [4, 1], [2, 4]), w(8, [4, 1], [2, 4])]  # a 4x4 tensor, two row blocks
    assert shardbuild.uncovered(rows, 16) == 0
    assert shardbuild.uncovered(rows[:1], 16) == 8
    assert shardbuild.uncovered([w(0, [4, 1], [2, 4]), w(4, [4, 1], [3, 4])], 16) == 0  # overlap
    assert shardbuild.uncovered([w(0, [4, 1], [2, 4]), w(9, [1], [7])], 16) == 1  # one gap
    cols = [w(0, [4, 1], [4, 2]), w(2, [4, 1], [4, 2])]  # two column blocks: strided
    assert shardbuild.uncovered(cols, 16) == 0
    assert shardbuild.uncovered([w(0, [4, 1], [4, 2]), w(2, [4, 1], [3, 2])], 16) == 2
    assert shardbuild.uncovered([w(0, [4, 1], [4, 2]), w(2, [4, 1], [4, 1])], 16) == 4


def test_source_cache_reuses_evicted_buffers_of_the_same_size_within_its_limit(
    tmp_path: Path,
) -> None:
    """The writer's cache reads a tensor into the buffer of an evicted one of the same
    size (no new allocation): the values read are the source's, each read is counted,
    and the cache (reused buffers included) stays within its limit."""
    from safetensors.torch import save_file

    from preshard.worker.sources import open_source

    gen = torch.Generator().manual_seed(3)
    tensors = {f"w{i}": torch.randn(64, 64, generator=gen).to(torch.bfloat16) for i in range(6)}
    tensors["odd"] = torch.randn(10, 3, generator=gen)
    model = tmp_path / "m"
    model.mkdir()
    save_file(tensors, str(model / "model.safetensors"))
    (model / "config.json").write_text('{"architectures": ["X"]}')
    source = open_source(str(model))
    one = 64 * 64 * 2
    cache = shardbuild.SourceCache(source, limit=2 * one, recycle=True)
    seen: list[int] = []
    for name in ["w0", "w1", "w2", "w0", "w3", "w4", "w5", "odd", "w1"]:
        t = cache.get(name)
        assert torch.equal(t.reshape(tensors[name].shape), tensors[name]), name
        seen.append(t.data_ptr())
        assert cache._bytes <= 2 * one
    assert cache.reads == 9  # w0 again: evicted by then (a limit of two)
    # seven reads of same-sized tensors into the two buffers the first two were read into
    assert set(seen[:7]) == set(seen[:2]) and len(set(seen[:2])) == 2
    # without recycling (a builder that may keep references): new buffers every time
    plain = shardbuild.SourceCache(source, limit=2 * one)
    a = plain.get("w0")
    plain.get("w1"), plain.get("w2")
    assert torch.equal(a.reshape(64, 64), tensors["w0"])
