"""The load tracer and the engine-free verifier on plain torch "weight loaders".

No vLLM here: small functions below load a checkpoint into parameters the way vLLM's
loaders do (narrowed copies into a fused parameter, KV-head replication, vocabulary
padding, a tied weight, a transposed copy, a computed value), under the real
``LoadTracer``; the rank files are written with safetensors and the real
``verify_against`` replays them. The corruption tests change one element or one slice
and must fail, naming the tensor, the rank and the element.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from preshard.core.sharding import ShardingError, as_box, parse_document, placement_of
from preshard.worker.engine.load_trace import LoadTracer
from preshard.worker.verify import against as va
from preshard.worker.verify.shards import VerificationFailed

TP = 2
HIDDEN, HEADS, HEAD = 8, 4, 2
VOCAB, PADDED = 11, 12  # padded to a multiple of TP * 2


def _source(tmp: Path) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    src = {
        "embed.weight": torch.randn(VOCAB, HIDDEN, generator=g).bfloat16(),
        "q.weight": torch.randn(HEADS * HEAD, HIDDEN, generator=g).bfloat16(),
        "k.weight": torch.randn(HEAD, HIDDEN, generator=g).bfloat16(),  # ONE kv head
        "v.weight": torch.randn(HEAD, HIDDEN, generator=g).bfloat16(),
        "down.weight": torch.randn(HIDDEN, 6, generator=g).float(),  # fp32 -> bf16 param
        "norm.weight": torch.randn(HIDDEN, generator=g).bfloat16(),
        "rotary.inv_freq": torch.randn(4, generator=g),  # the model skips it
        "scale_t.weight": torch.randn(HIDDEN, 3, generator=g).bfloat16(),
    }
    (tmp / "src").mkdir(parents=True, exist_ok=True)
    save_file(src, str(tmp / "src" / "model.safetensors"))
    return load_file(str(tmp / "src" / "model.safetensors"))


def _params() -> dict[str, torch.Tensor]:
    q_local = HEADS * HEAD // TP
    return {
        "embed.weight": torch.empty(PADDED // TP, HIDDEN, dtype=torch.bfloat16),
        "qkv.weight": torch.empty(q_local + 2 * HEAD, HIDDEN, dtype=torch.bfloat16),
        "down.weight": torch.empty(HIDDEN, 6 // TP, dtype=torch.bfloat16),
        "norm.weight": torch.empty(HIDDEN, dtype=torch.bfloat16),
        "scale_t.weight": torch.empty(3, HIDDEN, dtype=torch.bfloat16),
        "attn.k_scale": torch.tensor(1.0),  # initialized by the model
    }


def _load(rank: int, source: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> None:
    """What vLLM's loaders do, in miniature."""
    per = PADDED // TP
    for name, w in source.items():
        if name == "embed.weight":  # VocabParallelEmbedding: shard rows, zero the padding
            start = rank * per
            n = max(0, min(per, VOCAB - start))
            params["embed.weight"][:n].data.copy_(w.narrow(0, start, n))
            params["embed.weight"][n:].data.fill_(0)
        elif name in ("q.weight", "k.weight", "v.weight"):  # QKVParallelLinear
            param = params["qkv.weight"].data
            if name == "q.weight":
                size = HEADS * HEAD // TP
                param.narrow(0, 0, size).copy_(w.narrow(0, rank * size, size))
            else:  # one KV head, replicated on every rank
                off = HEADS * HEAD // TP + (0 if name == "k.weight" else HEAD)
                param.narrow(0, off, HEAD).copy_(w)
        elif name == "down.weight":  # RowParallelLinear: shard the input dim
            size = 6 // TP
            params["down.weight"].data.copy_(w.narrow(1, rank * size, size))
        elif name == "norm.weight":
            params["norm.weight"].data.copy_(w)
        elif name == "scale_t.weight":  # a loader that transposes
            params["scale_t.weight"].data.copy_(w.t())


def _convert(tmp: Path, load=_load) -> tuple[Path, Path]:
    source = _source(tmp)
    out = tmp / "ckpt"
    out.mkdir(parents=True, exist_ok=True)
    for rank in range(TP):
        params = _params()
        tracer = LoadTracer(params)
        with tracer:
            for name, tensor in load_file(str(tmp / "src" / "model.safetensors")).items():
                tracer.source(name, tensor)
                load(rank, {name: tensor}, params)
        trace = tracer.finish(params).to_json()
        trace.update(
            {
                "rank": rank,
                "tpRank": rank,
                "ppRank": 0,
                "tensorParallelSize": TP,
                "pipelineParallelSize": 1,
                "saved": {
                    k: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                    for k, t in params.items()
                },
            }
        )
        save_file(params, str(out / f"model-rank-{rank}-part-0.safetensors"))
        (out / f"preshard-trace-rank-{rank}.json").write_text(json.dumps(trace))
    del source
    va.write_sharding(out)
    return tmp / "src", out


def test_trace_records_the_loaders_slices_and_the_checkpoint_verifies(tmp_path: Path) -> None:
    src, ckpt = _convert(tmp_path)
    assert not list(ckpt.glob("preshard-trace-rank-*.json"))  # merged, then removed
    doc = json.loads((ckpt / "preshard-sharding.json").read_text())
    r1 = {r["rank"]: r for r in doc["ranks"]}[1]["tensors"]
    placements = {p.get("source"): p for p in r1["qkv.weight"]["placement"]}
    assert placements["q.weight"] == {
        "source": "q.weight",
        "placement": "Shard(0)",
        "slices": {"0": [4, 4]},
        "at": [[0, 4], [0, HIDDEN]],
    }
    assert placements["k.weight"]["placement"] == "Replicate"
    assert placements["k.weight"]["at"] == [[4, 2], [0, HIDDEN]]
    assert placements["v.weight"]["at"] == [[6, 2], [0, HIDDEN]]
    # rank 1 holds vocab rows 6..10 and one padding row
    assert r1["embed.weight"]["placement"] == [
        {
            "source": "embed.weight",
            "placement": "Shard(0)",
            "slices": {"0": [6, 5]},
            "at": [[0, 5], [0, HIDDEN]],
        },
        {"fill": 0, "at": [[5, 1], [0, HIDDEN]]},
    ]
    assert r1["down.weight"]["placement"][0]["placement"] == "Shard(1)"
    assert r1["scale_t.weight"]["placement"] == [
        {"source": "scale_t.weight", "placement": "Strided"}
    ]
    assert doc["skippedSources"] == ["rotary.inv_freq"]
    report = va.verify_against(src, ckpt)
    assert report.source_tensors == 7 and report.checked_tensors == 12
    assert report.copies == 14 and report.fills == 2
    assert report.skipped_sources == ["rotary.inv_freq"]
    assert report.model_initialized == ["attn.k_scale@0", "attn.k_scale@1"]


def _tamper(ckpt: Path, rank: int, key: str, index: tuple[int, ...]) -> None:
    path = ckpt / f"model-rank-{rank}-part-0.safetensors"
    tensors = load_file(str(path))
    t = tensors[key]
    bits = t.view(torch.int16) if t.dtype == torch.bfloat16 else t.view(torch.int32)
    bits[index] += 1  # the smallest possible change of one element
    save_file(tensors, str(path))


@pytest.mark.parametrize(
    ("rank", "key", "index", "message"),
    [
        (
            1,
            "qkv.weight",
            (5, 3),
            "qkv.weight on rank 1 (model-rank-1-part-0.safetensors) "
            "differs from source tensor k.weight: element [5, 3]",
        ),
        (0, "qkv.weight", (1, 0), "differs from source tensor q.weight: element [1, 0]"),
        (1, "down.weight", (7, 2), "down.weight on rank 1"),
        (0, "scale_t.weight", (2, 7), "differs from source tensor scale_t.weight: element [2, 7]"),
        (
            1,
            "embed.weight",
            (5, 0),
            "embed.weight on rank 1 (model-rank-1-part-0.safetensors): element [5, 0] is",
        ),
    ],
)
def test_one_changed_element_fails_naming_tensor_rank_and_element(
    tmp_path: Path, rank: int, key: str, index: tuple[int, ...], message: str
) -> None:
    src, ckpt = _convert(tmp_path)
    _tamper(ckpt, rank, key, index)
    with pytest.raises(VerificationFailed) as exc:
        va.verify_against(src, ckpt)
    assert message in str(exc.value)


def test_one_wrong_slice_fails(tmp_path: Path) -> None:
    """A loader that takes rank 0's slice of q on rank 1 (the bug class of a wrong shard)
    is caught by source coverage: half of q is never loaded by any rank."""

    def wrong(rank: int, source: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> None:
        name, w = next(iter(source.items()))
        if name == "q.weight":
            size = HEADS * HEAD // TP
            params["qkv.weight"].data.narrow(0, 0, size).copy_(w.narrow(0, 0, size))
        else:
            _load(rank, source, params)

    src, ckpt = _convert(tmp_path, load=wrong)
    with pytest.raises(
        VerificationFailed, match=r"source tensor q.weight: element \[4, 0\] is loaded by no rank"
    ):
        va.verify_against(src, ckpt)


def test_metadata_pointing_at_another_slice_fails(tmp_path: Path) -> None:
    """Metadata that claims rank 1 holds rows 0..3 of q (while the file holds 4..7)."""
    src, ckpt = _convert(tmp_path)
    path = ckpt / "preshard-sharding.json"
    doc = json.loads(path.read_text())
    r1 = doc["ranks"][1]["tensors"]["qkv.weight"]
    for w in r1["writes"]:
        if w.get("source") == "q.weight":
            w["src"][0] = 0
    path.write_text(json.dumps(doc))
    with pytest.raises(VerificationFailed, match=r"differs from source tensor q\.weight"):
        va.verify_against(src, ckpt)


def test_region_written_by_no_loader_fails(tmp_path: Path) -> None:
    def no_padding(
        rank: int, source: dict[str, torch.Tensor], params: dict[str, torch.Tensor]
    ) -> None:
        name, w = next(iter(source.items()))
        if name == "embed.weight":
            per = PADDED // TP
            n = max(0, min(per, VOCAB - rank * per))
            params["embed.weight"][:n].data.copy_(w.narrow(0, rank * per, n))
        else:
            _load(rank, source, params)

    src, ckpt = _convert(tmp_path, load=no_padding)
    with pytest.raises(
        VerificationFailed,
        match=r"embed.weight on rank 1 .*element \[5, 0\] is written by no weight loader",
    ):
        va.verify_against(src, ckpt)


def test_computed_values_are_reported_not_passed(tmp_path: Path) -> None:
    def scaled(rank: int, source: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> None:
        name, w = next(iter(source.items()))
        if name == "norm.weight":
            params["norm.weight"].data.copy_(w * 2)
        else:
            _load(rank, source, params)

    src, ckpt = _convert(tmp_path, load=scaled)
    with pytest.raises(
        VerificationFailed, match=r"computed by vLLM.s weight loaders.*norm\.weight@0"
    ):
        va.verify_against(src, ckpt)
    report = va.verify_against(src, ckpt, allow_derived=True)
    assert report.derived == ["norm.weight@0", "norm.weight@1"]
    doc = json.loads((ckpt / "preshard-sharding.json").read_text())
    assert doc["ranks"][0]["tensors"]["norm.weight"]["placement"] == [{"derived": ["norm.weight"]}]


def test_another_source_fails(tmp_path: Path) -> None:
    src, ckpt = _convert(tmp_path)
    tensors = load_file(str(src / "model.safetensors"))
    tensors["k.weight"] = torch.zeros(HEAD + 1, HIDDEN, dtype=torch.bfloat16)
    save_file(tensors, str(src / "model.safetensors"))
    with pytest.raises(VerificationFailed, match=r"source tensor k.weight is BF16\[3, 8\] but was"):
        va.verify_against(src, ckpt)


def test_file_and_metadata_must_list_the_same_tensors(tmp_path: Path) -> None:
    src, ckpt = _convert(tmp_path)
    path = ckpt / "model-rank-0-part-0.safetensors"
    tensors = load_file(str(path))
    tensors["extra.weight"] = torch.zeros(2)
    save_file(tensors, str(path))
    with pytest.raises(
        VerificationFailed, match=r"rank 0: the files and the sharding metadata disagree"
    ):
        va.verify_against(src, ckpt)


def test_missing_metadata_is_a_clear_error(tmp_path: Path) -> None:
    src, ckpt = _convert(tmp_path)
    (ckpt / "preshard-sharding.json").unlink()
    with pytest.raises(VerificationFailed, match=r"has no preshard-sharding\.json"):
        va.verify_against(src, ckpt)


# ---------------------------------------------------------------------- core geometry


def test_as_box_and_placement() -> None:
    assert as_box(12, [4, 1], [2, 4], [6, 4]) == [(3, 2), (0, 4)]
    assert as_box(1, [4, 1], [6, 2], [6, 4]) == [(0, 6), (1, 2)]
    assert as_box(0, [1, 4], [4, 6], [6, 4]) is None  # transposed
    assert as_box(2, [4, 1], [6, 4], [6, 4]) is None  # runs past the end
    w = {"op": "copy", "source": "s", "src": [8, [4, 1], [2, 4]], "dst": [0, [4, 1], [2, 4]]}
    assert placement_of(w, [2, 4], [4, 4]) == {
        "source": "s",
        "placement": "Shard(0)",
        "slices": {"0": [2, 2]},
        "at": [[0, 2], [0, 4]],
    }


def _doc(**changes: object) -> dict:
    doc = {
        "format": "preshard.io/sharding-metadata",
        "formatVersion": 1,
        "tensorParallelSize": 1,
        "pipelineParallelSize": 1,
        "sources": {"s": {"shape": [4], "dtype": "float32"}},
        "skippedSources": [],
        "ranks": [
            {
                "rank": 0,
                "tensors": {
                    "t": {
                        "shape": [4],
                        "dtype": "float32",
                        "writes": [
                            {
                                "op": "copy",
                                "source": "s",
                                "src": [0, [1], [4]],
                                "dst": [0, [1], [4]],
                            }
                        ],
                    }
                },
            }
        ],
    }
    doc.update(changes)
    return doc


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(formatVersion=9), "unsupported sharding metadata formatVersion 9"),
        (lambda d: d.update(tensorParallelSize=10**7), "bad parallel sizes"),
        (
            lambda d: d["ranks"][0]["tensors"]["t"]["writes"][0].update(src=[1, [1], [4]]),
            "a copy reads outside s",
        ),
        (
            lambda d: d["ranks"][0]["tensors"]["t"]["writes"][0].update(dst=[2, [1], [4]]),
            "a write lies outside the tensor",
        ),
        (
            lambda d: d["ranks"][0]["tensors"]["t"]["writes"][0].update(source="nope"),
            "copies from an unlisted source",
        ),
        (
            lambda d: d["ranks"][0]["tensors"]["t"]["writes"][0].update(dst=[0, [-1], [4]]),
            "a region must be",
        ),
        (lambda d: d.update(ranks=[]), "must list 1 ranks"),
    ],
)
def test_parse_document_rejects(mutate, message: str) -> None:
    doc = _doc()
    mutate(doc)
    with pytest.raises(ShardingError, match=message):
        parse_document(json.dumps(doc))
    parse_document(json.dumps(_doc()))  # the unmutated document is fine


def test_parse_document_bounds_its_input() -> None:
    with pytest.raises(ShardingError, match="larger than"):
        parse_document(b" " * (512 * 2**20 + 1))
