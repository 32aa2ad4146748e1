"""File-level shard checks (preshard.worker.verify_shards) on synthetic safetensors files.

Files are written with the real ``safetensors`` package (numpy backend), so the header
parser is checked against the reference writer; malformed files are crafted by hand.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from preshard.worker import verify_shards as vs
from preshard.worker.verify_shards import VerificationFailed, check_shards, compare_tokens

LAYER = {
    "model.layers.0.self_attn.qkv_proj.weight": (6, 4),
    "model.layers.0.mlp.down_proj.weight": (4, 3),
    "model.norm.weight": (4,),
    "model.layers.0.self_attn.attn._k_scale": (),
}


def write_rank(d: Path, name: str, tensors: dict[str, tuple[int, ...]], dtype=np.float32) -> Path:
    arrays = {k: np.ones(shape, dtype=dtype) for k, shape in tensors.items()}
    path = d / name
    save_file(arrays, str(path))
    return path


def tp_files(d: Path, tp: int, tensors=LAYER) -> None:
    for r in range(tp):
        write_rank(d, f"model-rank-{r}-part-0.safetensors", tensors)


def test_header_parser_matches_safetensors_writer(tmp_path: Path) -> None:
    p = write_rank(tmp_path, "x.safetensors", {"a": (2, 3), "b": (5,), "s": ()})
    info = vs.read_safetensors_header(p)
    assert {k: v.shape for k, v in info.items()} == {"a": (2, 3), "b": (5,), "s": ()}
    assert info["a"].dtype == "F32" and info["a"].nbytes == 24 and info["a"].numel == 6
    assert info["s"].numel == 1  # a scalar is not empty


def test_good_tp2_layout_passes_and_summarises(tmp_path: Path) -> None:
    tp_files(tmp_path, 2)
    (tmp_path / "config.json").write_text("{}")
    report = check_shards(tmp_path, 2)
    assert sorted(report.files) == [(0, 0), (0, 1)]
    assert report.file_count == 2
    assert set(report.tensors[(0, 1)]) == set(LAYER)
    assert report.summary().startswith("2 shard files for 2 ranks, 8 tensors, ")


def test_multi_part_ranks(tmp_path: Path) -> None:
    items = list(LAYER.items())
    for r in range(2):
        write_rank(tmp_path, f"model-rank-{r}-part-0.safetensors", dict(items[:2]))
        write_rank(tmp_path, f"model-rank-{r}-part-1.safetensors", dict(items[2:]))
    report = check_shards(tmp_path, 2)
    assert [p.name for p in report.files[(0, 1)]] == [
        "model-rank-1-part-0.safetensors",
        "model-rank-1-part-1.safetensors",
    ]


def test_missing_part_zero(tmp_path: Path) -> None:
    write_rank(tmp_path, "model-rank-0-part-1.safetensors", LAYER)
    with pytest.raises(VerificationFailed, match=r"rank 0: part numbers \[1\] are not 0..0"):
        check_shards(tmp_path, 1)


def test_shards_of_another_tp_size_are_rejected(tmp_path: Path) -> None:
    # A TP=4 directory checked as TP=2 would load half-filled in vLLM.
    tp_files(tmp_path, 4)
    with pytest.raises(VerificationFailed, match="rank 2, rank 3, outside the 2 ranks") as ei:
        check_shards(tmp_path, 2)
    assert ei.value.reason == "VerificationFailed" and ei.value.permanent


def test_missing_rank(tmp_path: Path) -> None:
    tp_files(tmp_path, 1)
    with pytest.raises(VerificationFailed, match=r"no shard files for rank 1 \(expected 2 ranks"):
        check_shards(tmp_path, 2)


def test_no_shards_at_all(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(VerificationFailed, match=r"no shard files \(model-rank-\*-part-\*"):
        check_shards(tmp_path, 1)


def test_pp_layout(tmp_path: Path) -> None:
    for pp in range(2):
        keys = {f"model.layers.{pp}.mlp.down_proj.weight": (4, 3)}
        for tp in range(2):
            write_rank(tmp_path, f"model-pp-{pp}-tp-{tp}-part-0.safetensors", keys)
    report = check_shards(tmp_path, 2, 2)
    assert sorted(report.files) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    # The same files are not a TP=4 PP=1 checkpoint.
    with pytest.raises(VerificationFailed, match="another pipeline-parallel layout"):
        check_shards(tmp_path, 4, 1)


def test_tp_only_files_rejected_for_pp(tmp_path: Path) -> None:
    tp_files(tmp_path, 2)
    with pytest.raises(VerificationFailed, match=r"expected only model-pp-\{pp_rank\}"):
        check_shards(tmp_path, 1, 2)


def test_empty_tensor_is_a_dropped_weight(tmp_path: Path) -> None:
    tensors = dict(LAYER)
    tensors["model.layers.0.self_attn.qkv_proj.weight"] = (0,)
    write_rank(tmp_path, "model-rank-0-part-0.safetensors", tensors)
    with pytest.raises(VerificationFailed, match=r"qkv_proj.weight' .* is empty \(shape \[0\]\)"):
        check_shards(tmp_path, 1)


def test_rank_lacking_a_tensor(tmp_path: Path) -> None:
    write_rank(tmp_path, "model-rank-0-part-0.safetensors", LAYER)
    fewer = {k: v for k, v in LAYER.items() if "down_proj" not in k}
    write_rank(tmp_path, "model-rank-1-part-0.safetensors", fewer)
    with pytest.raises(
        VerificationFailed, match=r"rank 1 lacks tensors that rank 0 has: .*down_proj"
    ):
        check_shards(tmp_path, 2)


def test_dtype_mismatch_between_ranks(tmp_path: Path) -> None:
    write_rank(tmp_path, "model-rank-0-part-0.safetensors", LAYER)
    write_rank(tmp_path, "model-rank-1-part-0.safetensors", LAYER, dtype=np.float16)
    with pytest.raises(VerificationFailed, match="is F32 on rank 0 but F16 on rank 1"):
        check_shards(tmp_path, 2)


def test_duplicate_key_across_parts(tmp_path: Path) -> None:
    write_rank(tmp_path, "model-rank-0-part-0.safetensors", LAYER)
    write_rank(tmp_path, "model-rank-0-part-1.safetensors", {"model.norm.weight": (4,)})
    with pytest.raises(
        VerificationFailed, match=r"'model\.norm\.weight' appears in two part files"
    ):
        check_shards(tmp_path, 1)


def test_truncated_file(tmp_path: Path) -> None:
    p = write_rank(tmp_path, "model-rank-0-part-0.safetensors", LAYER)
    p.write_bytes(p.read_bytes()[:-5])
    with pytest.raises(VerificationFailed, match="not a valid safetensors file"):
        check_shards(tmp_path, 1)


@pytest.mark.parametrize(
    "blob",
    [
        b"abc",
        struct.pack("<Q", 10**9) + b"{}",
        struct.pack("<Q", 4) + b"[1,]",
        struct.pack("<Q", 2) + b"[]",
    ],
)
def test_garbage_files(tmp_path: Path, blob: bytes) -> None:
    (tmp_path / "model-rank-0-part-0.safetensors").write_bytes(blob)
    with pytest.raises(
        VerificationFailed, match=r"model-rank-0-part-0\.safetensors is not a valid"
    ):
        check_shards(tmp_path, 1)


def test_offsets_outside_data(tmp_path: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 64]}}).encode()
    (tmp_path / "model-rank-0-part-0.safetensors").write_bytes(
        struct.pack("<Q", len(header)) + header + b"\0" * 8
    )
    with pytest.raises(VerificationFailed, match="outside the file's data"):
        check_shards(tmp_path, 1)


def test_shard_pattern_and_names() -> None:
    assert vs.shard_pattern(1) == "model-rank-{rank}-part-{part}.safetensors"
    assert vs.shard_pattern(2) == "model-pp-{pp_rank}-tp-{tp_rank}-part-{part}.safetensors"
    assert vs.is_shard_file("model-rank-12-part-3.safetensors")
    assert vs.is_shard_file("model-pp-1-tp-0-part-0.safetensors")
    assert not vs.is_shard_file("model.safetensors")
    assert not vs.is_shard_file("model-rank-1-part-0.safetensors.part")


def test_compare_tokens() -> None:
    compare_tokens(["'a'", "'b'"], [[1, 2], [3]], [[1, 2], [3]])
    with pytest.raises(VerificationFailed) as ei:
        compare_tokens(["'a'", "'b'"], [[1, 2], [3, 4]], [[1, 2], [3, 5]])
    assert str(ei.value) == (
        "greedy tokens differ for prompt 'b': source model [3, 4], sharded checkpoint [3, 5]"
    )
    with pytest.raises(VerificationFailed, match="answered 1 of 2 prompts"):
        compare_tokens(["'a'", "'b'"], [[1], [2]], [[1]])
