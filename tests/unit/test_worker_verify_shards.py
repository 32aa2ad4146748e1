"""File-level shard checks (preshard.worker.verify.shards) on synthetic safetensors files.

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

from preshard.worker.verify import shards as vs
from preshard.worker.verify.shards import VerificationFailed, check_shards, compare_tokens

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


# ------------------------------------------------------------------- compare_outputs

PROMPTS = ["'a'", "'b'"]
TOKENS = [[7, 9], [3, 3]]
# Per prompt, per position: (token, log-probability) pairs, highest first (what
# engine.process._top_logprobs returns), top-3.
LOGPROBS = (
    (((7, -0.5), (8, -1.25), (2, -3.0)), ((9, -0.75), (1, -1.5), (4, -2.0))),
    (((3, -0.1), (5, -2.5), (6, -4.0)), ((3, -0.2), (6, -2.25), (5, -2.3))),
)


def _with(prompt: int, pos: int, top: tuple[tuple[int, float], ...]) -> tuple:
    rows = [list(p) for p in LOGPROBS]
    rows[prompt][pos] = top
    return tuple(tuple(p) for p in rows)


def test_compare_outputs_bit_identical() -> None:
    summary = vs.compare_outputs(PROMPTS, TOKENS, TOKENS, LOGPROBS, LOGPROBS)
    assert summary == {
        "method": "engine",
        "matched": True,
        "prompts": 2,
        "positions": 4,
        "topK": 3,
        "comparison": f"abs<={vs.LOGPROB_TOLERANCE}",
        "bitIdentical": True,
        "maxAbsDifference": 0.0,
    }


def test_compare_outputs_accepts_rounding_noise_and_records_it() -> None:
    # What two CPU engines over the same bits gave on the CI machine: every log-probability
    # of one position shifted by about 1.1e-5 (the normaliser moved by one logit's ulp).
    noisy = _with(1, 1, ((3, -0.2000113), (6, -2.2500113), (5, -2.3000113)))
    summary = vs.compare_outputs(PROMPTS, TOKENS, TOKENS, LOGPROBS, noisy)
    assert summary["bitIdentical"] is False
    assert summary["maxAbsDifference"] == pytest.approx(1.13e-5, abs=1e-7)
    # A near-tie at the top-k boundary may swap places with the next token.
    swapped = _with(1, 1, ((3, -0.2), (6, -2.25), (11, -2.29)))
    assert vs.compare_outputs(PROMPTS, TOKENS, TOKENS, LOGPROBS, swapped)["matched"] is True


def test_compare_outputs_catches_one_changed_value() -> None:
    off = _with(0, 1, ((9, -0.75), (1, -1.5 - 0.06), (4, -2.0)))
    with pytest.raises(VerificationFailed) as ei:
        vs.compare_outputs(PROMPTS, TOKENS, TOKENS, LOGPROBS, off)
    assert str(ei.value) == (
        "log-probability of token 1 at position 1 for prompt 'a': source model -1.5, sharded "
        f"checkpoint -1.56 (tolerance {vs.LOGPROB_TOLERANCE})"
    )


@pytest.mark.parametrize(
    ("top", "missing", "who"),
    [
        # The source's second-best token is not in the reload's top-3 at all.
        (((7, -0.5), (2, -3.0), (12, -3.1)), 8, "source model"),
        # The reload has a token the source ranks far lower (not a near-tie).
        (((7, -0.5), (8, -1.25), (13, -1.3)), 13, "sharded checkpoint"),
    ],
)
def test_compare_outputs_catches_another_top_k(top: tuple, missing: int, who: str) -> None:
    with pytest.raises(VerificationFailed) as ei:
        vs.compare_outputs(PROMPTS, TOKENS, TOKENS, LOGPROBS, _with(0, 0, top))
    assert str(ei.value).startswith(f"token {missing} is in the {who}'s top-3 at position 0 for")


def test_compare_outputs_catches_other_tokens_and_shapes() -> None:
    with pytest.raises(VerificationFailed, match="greedy tokens differ for prompt 'a'"):
        vs.compare_outputs(PROMPTS, TOKENS, [[7, 8], [3, 3]], LOGPROBS, LOGPROBS)
    short = (LOGPROBS[0][:1], LOGPROBS[1])
    with pytest.raises(VerificationFailed, match="prompt 'a': 2 positions from the source"):
        vs.compare_outputs(PROMPTS, TOKENS, TOKENS, LOGPROBS, short)
    with pytest.raises(VerificationFailed, match="log-probabilities for other prompts"):
        vs.compare_outputs(PROMPTS, TOKENS, TOKENS, LOGPROBS, LOGPROBS[:1])
