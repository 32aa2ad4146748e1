"""The pure parts of ``preshard.worker.fp8shards`` (no vLLM): which scheme, how the two
plans combine and what the sharding metadata says. The values themselves are checked
against vLLM's reference functions in tests/vllm/test_fp8_shards.py."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from preshard.core.errors import PreshardError
from preshard.core.sharding import build_document
from preshard.worker import fp8shards


def rank_trace(saved: dict[str, Any], writes: dict[str, Any]) -> dict[str, Any]:
    return {
        "writes": writes, "sources": {"w": {"shape": [4, 2], "dtype": "bfloat16"},
                                      "u": {"shape": [4, 2], "dtype": "bfloat16"},
                                      "n": {"shape": [2], "dtype": "bfloat16"}},
        "skippedSources": [], "aliases": {}, "rank": 0, "tpRank": 0, "ppRank": 0,
        "tensorParallelSize": 1, "pipelineParallelSize": 1, "saved": saved,
    }  # fmt: skip


def copy_write(source: str, off: int) -> dict[str, Any]:
    return {
        "op": "copy",
        "source": source,
        "src": [0, [2, 1], [4, 2]],
        "dst": [off, [2, 1], [4, 2]],
    }


RAW = rank_trace(
    {"l.weight": {"shape": [8, 2], "dtype": "bfloat16"}, "n.weight": {"shape": [2], "dtype": "bfloat16"}},
    {"l.weight": [copy_write("w", 0), copy_write("u", 8)],
     "n.weight": [{"op": "copy", "source": "n", "src": [0, [1], [2]], "dst": [0, [1], [2]]}]},
)  # fmt: skip
QUANT = rank_trace(
    {"l.weight": {"shape": [8, 2], "dtype": "float8_e4m3fn"},
     "l.weight_scale": {"shape": [2], "dtype": "float32"},
     "n.weight": {"shape": [2], "dtype": "bfloat16"},
     "a.k_scale": {"shape": [], "dtype": "bfloat16"}},
    {"l.weight": RAW["writes"]["l.weight"], "n.weight": RAW["writes"]["n.weight"]},
)  # fmt: skip


def test_scheme_for() -> None:
    assert fp8shards.scheme_for("fp8_per_tensor", "auto") is fp8shards.SCHEMES["fp8_per_tensor"]
    assert fp8shards.scheme_for("fp8_per_block", "quantized").block == [128, 128]
    assert fp8shards.scheme_for("fp8_per_tensor", "raw") is None
    assert fp8shards.scheme_for("fp8_per_channel", "auto") is None
    with pytest.raises(PreshardError, match="compressed-tensors") as exc:
        fp8shards.scheme_for("fp8_per_channel", "quantized")
    assert exc.value.reason == "UnsupportedQuantization" and exc.value.permanent


def test_combine_and_the_sharding_metadata() -> None:
    scheme = fp8shards.SCHEMES["fp8_per_tensor"]
    (doc,) = fp8shards.combine([RAW], [QUANT], scheme)
    assert doc["saved"] == QUANT["saved"]
    assert doc["quantized"] == {"l.weight": {"scale": "l.weight_scale", "rawDtype": "bfloat16"}}
    assert doc["writes"]["l.weight"] == RAW["writes"]["l.weight"]  # the raw slice's sources
    assert doc["initialized"] == {"a.k_scale": -1.0}  # vLLM's KVCacheScaleParameter
    (st,) = fp8shards.sharding_traces([doc])
    assert [w["op"] for w in st["writes"]["l.weight"]] == ["derived", "derived"]
    assert st["writes"]["l.weight"][1] == {
        "op": "derived",
        "sources": ["u"],
        "dst": [8, [2, 1], [4, 2]],
    }
    assert st["writes"]["l.weight_scale"] == [
        {"op": "derived", "sources": ["u", "w"], "dst": [0, [1], [2]]}
    ]
    assert st["writes"]["n.weight"] == RAW["writes"]["n.weight"]
    sharding = build_document([st])
    assert sharding["skippedSources"] == []  # every source feeds a tensor
    published = fp8shards.published_config({"a": 1}, fp8shards.SCHEMES["fp8_per_block"])
    assert published["quantization_config"]["weight_block_size"] == [128, 128]


def test_combine_refuses_what_is_not_a_linear_weight() -> None:
    # (before issue 21's MoE support this refused every experts weight; now an experts
    # weight without its raw counterpart and its scale is what is refused)
    quant = copy.deepcopy(QUANT)
    quant["saved"]["experts.w13_weight"] = {"shape": [2, 8, 2], "dtype": "float8_e4m3fn"}
    with pytest.raises(PreshardError, match="not a linear weight or fused MoE experts") as exc:
        fp8shards.combine([RAW], [quant], fp8shards.SCHEMES["fp8_per_tensor"])
    assert exc.value.reason == "UnsupportedQuantization"
    quant = copy.deepcopy(QUANT)
    quant["saved"]["x.bias"] = {"shape": [8, 2], "dtype": "float8_e4m3fn"}  # not a weight
    with pytest.raises(PreshardError, match=r"x\.bias: not a linear weight"):
        fp8shards.combine([RAW], [quant], fp8shards.SCHEMES["fp8_per_tensor"])
    quant = copy.deepcopy(QUANT)
    quant["saved"]["n.weight"]["dtype"] = "float32"  # the plans disagree
    with pytest.raises(PreshardError, match=r"n\.weight: the FP8 checkpoint plan"):
        fp8shards.combine([RAW], [quant], fp8shards.SCHEMES["fp8_per_tensor"])


def experts_traces(inter: int, hidden: int, scheme: str) -> tuple[Any, Any]:
    w13 = {"shape": [2, 2 * inter, hidden], "dtype": "bfloat16"}
    w2 = {"shape": [2, hidden, inter], "dtype": "bfloat16"}
    raw = rank_trace(
        {"e.w13_weight": w13, "e.w2_weight": w2}, {"e.w13_weight": [], "e.w2_weight": []}
    )
    name = fp8shards.SCHEMES[scheme].scale_name
    quant = rank_trace(
        {
            "e.w13_weight": {**w13, "dtype": "float8_e4m3fn"},
            "e.w2_weight": {**w2, "dtype": "float8_e4m3fn"},
            f"e.w13_{name}": {"shape": [2, 2], "dtype": "float32"},
            f"e.w2_{name}": {"shape": [2], "dtype": "float32"},
        },
        {},
    )
    return raw, quant  # fmt: skip


def test_combine_takes_moe_experts_with_their_scales() -> None:
    raw, quant = experts_traces(128, 256, "fp8_per_tensor")
    [doc] = fp8shards.combine([raw], [quant], fp8shards.SCHEMES["fp8_per_tensor"])
    assert doc["quantized"] == {
        "e.w13_weight": {"scale": "e.w13_weight_scale", "rawDtype": "bfloat16", "experts": True},
        "e.w2_weight": {"scale": "e.w2_weight_scale", "rawDtype": "bfloat16", "experts": True},
    }
    raw, quant = experts_traces(128, 256, "fp8_per_block")
    [doc] = fp8shards.combine([raw], [quant], fp8shards.SCHEMES["fp8_per_block"])
    assert doc["quantized"]["e.w2_weight"]["scale"] == "e.w2_weight_scale_inv"


@pytest.mark.parametrize(("inter", "hidden"), [(64, 256), (128, 192)])
def test_per_block_experts_the_block_does_not_fill_are_refused(inter: int, hidden: int) -> None:
    raw, quant = experts_traces(inter, hidden, "fp8_per_block")
    with pytest.raises(PreshardError) as exc:
        fp8shards.combine([raw], [quant], fp8shards.SCHEMES["fp8_per_block"])
    assert exc.value.reason == "UnsupportedQuantization" and exc.value.permanent
    assert f"intermediate size ({inter}) and the hidden size ({hidden})" in exc.value.message
    assert "pads them to the block" in exc.value.message
