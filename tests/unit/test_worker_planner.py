"""The planner's pure parts, without vLLM: the load tracer on meta tensors (what the
planner runs it on) gives the very trace it gives on real tensors; vLLM's sub-tensor
de-duplication reproduced without data pointers; the refusal of inexact plans; the
comparison of a stored sharding file with the plan (``verify --against``); vLLM's
order of checkpoint tensors.

The miniature "weight loaders" below do what vLLM's do (narrowed copies into a fused
parameter, a replicated KV head, vocabulary padding, a transposed copy, a dtype
conversion); the vLLM planner itself is tested in tests/vllm/test_planner.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from preshard.core.errors import PreshardError
from preshard.core.sharding import build_document, parse_document
from preshard.worker.engine.load_trace import LoadTracer, storage_key
from preshard.worker.planner.checkpoint import local_tensors
from preshard.worker.planner.plan import PlannerUnsupported, check_complete, filter_subtensors
from preshard.worker.verify.against import compare_with_plan
from preshard.worker.verify.shards import VerificationFailed

TP = 2
SOURCE = {
    "embed.weight": ((11, 8), torch.bfloat16),
    "q.weight": ((8, 8), torch.bfloat16),
    "k.weight": ((2, 8), torch.bfloat16),
    "v.weight": ((2, 8), torch.bfloat16),
    "down.weight": ((8, 6), torch.float32),
    "scale_t.weight": ((8, 3), torch.bfloat16),
    "rotary.inv_freq": ((4,), torch.float32),
}


def _params(device: str) -> dict[str, torch.Tensor]:
    def p(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return torch.nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), False)

    embed = p(6, 8)
    return {
        "embed.weight": embed,
        "qkv.weight": p(8, 8),
        "down.weight": p(8, 3),
        "scale_t.weight": p(3, 8),
        "lm_head.weight": embed,  # tied: the same Parameter
        "attn.k_scale": p(1, dtype=torch.float32),  # the model's own
    }


def _load(rank: int, name: str, w: torch.Tensor, params: dict[str, torch.Tensor]) -> None:
    if name == "embed.weight":
        n = max(0, min(6, 11 - rank * 6))
        params["embed.weight"][:n].data.copy_(w.narrow(0, rank * 6, n))
        params["embed.weight"][n:].data.fill_(0)
    elif name == "q.weight":
        params["qkv.weight"].data.narrow(0, 0, 4).copy_(w.narrow(0, rank * 4, 4))
    elif name in ("k.weight", "v.weight"):
        params["qkv.weight"].data.narrow(0, 4 if name == "k.weight" else 6, 2).copy_(w)
    elif name == "down.weight":
        params["down.weight"].data.copy_(w.narrow(1, rank * 3, 3))
    elif name == "scale_t.weight":
        params["scale_t.weight"].data.copy_(w.t())


def _trace(device: str, rank: int, load=_load) -> dict:
    params = _params(device)
    tracer = LoadTracer(params)
    with tracer:
        for name, (shape, dtype) in SOURCE.items():
            w = (
                torch.empty(shape, dtype=dtype, device="meta")
                if device == "meta"
                else torch.randn(shape).to(dtype)
            )
            tracer.source(name, w)
            load(rank, name, w, params)
    doc = tracer.finish(params).to_json()
    saved = filter_subtensors(dict(params))
    doc.update(
        {
            "rank": rank,
            "tpRank": rank,
            "ppRank": 0,
            "tensorParallelSize": TP,
            "pipelineParallelSize": 1,
            "saved": {
                k: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                for k, t in saved.items()
            },
        }
    )
    return doc


@pytest.mark.parametrize("rank", [0, 1])
def test_tracer_on_meta_tensors_gives_the_trace_of_real_ones(rank: int) -> None:
    real, meta = _trace("cpu", rank), _trace("meta", rank)
    assert meta == real
    # and it is the loaders' record, not an empty one
    qkv = meta["writes"]["qkv.weight"]
    assert [w["source"] for w in qkv] == ["q.weight", "k.weight", "v.weight"]
    assert qkv[0]["src"] == [rank * 4 * 8, [8, 1], [4, 8]]
    assert meta["writes"]["scale_t.weight"][0]["src"] == [0, [1, 3], [3, 8]]
    assert meta["skippedSources"] == ["rotary.inv_freq"]
    fills = [w for w in meta["writes"]["embed.weight"] if w["op"] == "fill"]
    n = 6 if rank == 0 else 5  # vocabulary rows 0..5 | 6..10 and one padding row
    assert fills == [{"op": "fill", "dst": [n * 8, [8, 1], [6 - n, 8]], "value": 0}]


def test_meta_storage_keys_tell_storages_apart() -> None:
    a = torch.empty(4, 4, device="meta")
    b = torch.empty(4, 4, device="meta")
    assert a.data_ptr() == b.data_ptr()  # why pointers cannot be used on meta
    assert storage_key(a) != storage_key(b)
    assert storage_key(a[1:]) == storage_key(a) == storage_key(torch.nn.Parameter(a))


def test_filter_subtensors_same_answer_on_meta_and_cpu() -> None:
    for device in ("cpu", "meta"):
        base = torch.empty(10, dtype=torch.float32, device=device)
        tensors = {
            "b.whole": base,
            "a.alias": base,  # the same tensor twice: the smaller key stays
            "c.part": base[2:5],  # inside another: dropped
            "d.other": torch.empty(3, device=device),
            "e.empty": torch.empty(0, device=device),  # never saved
        }
        assert list(filter_subtensors(tensors)) == ["a.alias", "d.other"], device
    # the tied pair of the miniature model keeps one name, in state-dict order
    assert list(_trace("meta", 0)["saved"]) == [
        "embed.weight",
        "qkv.weight",
        "down.weight",
        "scale_t.weight",
        "attn.k_scale",
    ]


def test_a_loader_that_computes_is_refused_naming_parameter_and_architecture() -> None:
    def scaled(rank: int, name: str, w: torch.Tensor, params: dict[str, torch.Tensor]) -> None:
        if name == "down.weight":
            params["down.weight"].data.copy_(w.narrow(1, rank * 3, 3) * 2)
        else:
            _load(rank, name, w, params)

    doc = _trace("meta", 1, scaled)
    assert [w["op"] for w in doc["writes"]["down.weight"]] == ["derived"]
    with pytest.raises(PlannerUnsupported, match=r"MiniForCausalLM.*down\.weight") as exc:
        check_complete(doc, "MiniForCausalLM")
    assert exc.value.reason == "PlannerUnsupported" and exc.value.permanent


def test_a_scalar_the_loader_made_on_meta_is_not_guessed() -> None:
    params = {"s": torch.nn.Parameter(torch.empty(1, device="meta"), False)}
    tracer = LoadTracer(params)
    with tracer:
        params["s"].data.copy_(torch.ones(1, device="meta") * 3)
    assert tracer.finish(params).to_json()["writes"]["s"][0]["op"] == "derived"


def test_a_partly_written_tensor_is_refused() -> None:
    def no_padding(rank: int, name: str, w: torch.Tensor, params: dict[str, torch.Tensor]) -> None:
        if name == "embed.weight":
            n = max(0, min(6, 11 - rank * 6))
            params["embed.weight"][:n].data.copy_(w.narrow(0, rank * 6, n))
        else:
            _load(rank, name, w, params)

    check_complete(_trace("meta", 1), "Mini")  # the faithful loaders pass
    with pytest.raises(PlannerUnsupported, match=r"8 of 48 elements of embed\.weight"):
        check_complete(_trace("meta", 1, no_padding), "Mini")


# ------------------------------------------------------------ verify --against re-plan


def _sharding(docs: list[dict]):  # type: ignore[no-untyped-def]
    return parse_document(json.dumps(build_document(docs)))


def test_stored_metadata_equal_to_the_plan_passes_in_any_write_order() -> None:
    docs = [_trace("meta", r) for r in range(TP)]
    stored = json.loads(json.dumps(docs))
    stored[1]["writes"]["qkv.weight"].reverse()
    compare_with_plan(_sharding(stored), _sharding(docs))


def test_a_lying_sharding_file_is_refused_naming_the_tensor() -> None:
    """The issue's case: a source tensor left out and a saved tensor given no writes
    (the replay of the stored file alone passes: the tensor counts as model-initialised)."""
    docs = [_trace("meta", r) for r in range(TP)]
    lying = json.loads(json.dumps(docs))
    for d in lying:
        del d["sources"]["down.weight"]
        d["writes"]["down.weight"] = []
    with pytest.raises(VerificationFailed, match=r"source tensor down\.weight is left out"):
        compare_with_plan(_sharding(lying), _sharding(docs))
    # the saved tensor alone (its source still listed, skipped)
    lying = json.loads(json.dumps(docs))
    lying[1]["writes"]["down.weight"] = []
    with pytest.raises(VerificationFailed, match=r"tensor down\.weight of rank 1 has 0 write"):
        compare_with_plan(_sharding(lying), _sharding(docs))


def test_one_shifted_slice_in_the_stored_file_is_refused() -> None:
    docs = [_trace("meta", r) for r in range(TP)]
    lying = json.loads(json.dumps(docs))
    lying[1]["writes"]["qkv.weight"][0]["src"][0] -= 8  # q rows 3..6 instead of 4..7
    with pytest.raises(VerificationFailed, match=r"qkv\.weight of rank 1"):
        compare_with_plan(_sharding(lying), _sharding(docs))
    other = json.loads(json.dumps(docs))
    other[0]["saved"]["down.weight"]["dtype"] = "float32"
    with pytest.raises(VerificationFailed, match=r"down\.weight of rank 0 is float32"):
        compare_with_plan(_sharding(other), _sharding(docs))


def test_local_tensors_follow_vllms_order(tmp_path: Path) -> None:
    for name, keys in {
        "model-10.safetensors": ["z", "a"],
        "model-2.safetensors": ["m", "b"],
        "stray.safetensors": ["s"],
    }.items():
        save_file({k: torch.zeros(2, 3) for k in keys}, str(tmp_path / name))
    files = {"model-2.safetensors": "mb", "model-10.safetensors": "za"}
    index = {"weight_map": {k: f for f, ks in files.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    got = [(t.file, t.name, t.dtype, t.shape) for t in local_tensors(tmp_path)]
    assert got == [
        ("model-2.safetensors", "b", "F32", (2, 3)),
        ("model-2.safetensors", "m", "F32", (2, 3)),
        ("model-10.safetensors", "a", "F32", (2, 3)),
        ("model-10.safetensors", "z", "F32", (2, 3)),
    ]


def _checkpoint(tmp: Path) -> tuple[Path, Path, list[dict]]:
    """A source checkpoint, its TP=2 rank files loaded by the miniature loaders (real
    tensors), their sharding metadata written as convert writes it, and the meta plan."""
    from safetensors.torch import load_file

    from preshard.worker.verify import against as va

    g = torch.Generator().manual_seed(0)
    src_dir, ckpt = tmp / "src", tmp / "ckpt"
    src_dir.mkdir()
    ckpt.mkdir()
    save_file(
        {n: torch.randn(shape, generator=g).to(dt) for n, (shape, dt) in SOURCE.items()},
        str(src_dir / "model.safetensors"),
    )
    for rank in range(TP):
        params = _params("cpu")
        tracer = LoadTracer(params)
        with tracer:
            for name, w in load_file(str(src_dir / "model.safetensors")).items():
                tracer.source(name, w)
                _load(rank, name, w, params)
        doc = tracer.finish(params).to_json()
        saved = filter_subtensors(dict(params))
        doc.update(
            {
                "rank": rank,
                "tpRank": rank,
                "ppRank": 0,
                "tensorParallelSize": TP,
                "pipelineParallelSize": 1,
                "saved": {
                    k: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                    for k, t in saved.items()
                },
            }
        )
        save_file(
            {k: t.detach() for k, t in saved.items()},
            str(ckpt / f"model-rank-{rank}-part-0.safetensors"),
        )
        (ckpt / f"preshard-trace-rank-{rank}.json").write_text(json.dumps(doc))
    va.write_sharding(ckpt)
    return src_dir, ckpt, [_trace("meta", r) for r in range(TP)]


def test_verify_against_a_plan_refuses_what_the_stored_file_lets_through(tmp_path: Path) -> None:
    """The issue's case end to end on real files: the stored metadata leaves
    ``down.weight``'s source out and gives the saved tensor no writes, and rank 1's
    ``down.weight`` holds other values: trusting the file passes, the plan refuses."""
    from safetensors.torch import load_file

    from preshard.core.manifest import SHARDING_NAME
    from preshard.worker.verify import against as va

    src, ckpt, plan = _checkpoint(tmp_path)
    planned = _sharding(plan)
    assert va.verify_against(src, ckpt, planned=planned).replanned  # the honest one passes
    path = ckpt / SHARDING_NAME
    doc = json.loads(path.read_text())
    del doc["sources"]["down.weight"]
    for r in doc["ranks"]:
        r["tensors"]["down.weight"]["writes"] = []
    path.write_text(json.dumps(doc))
    f = ckpt / "model-rank-1-part-0.safetensors"
    tensors = load_file(str(f))
    tensors["down.weight"] = tensors["down.weight"] + 1
    save_file(tensors, str(f))
    assert va.verify_against(src, ckpt).model_initialized  # trusted: passes
    with pytest.raises(VerificationFailed, match=r"source tensor down\.weight is left out"):
        va.verify_against(src, ckpt, planned=planned)


def test_without_vllm_verify_refuses_rather_than_trust(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import importlib.util

    from preshard.worker.verify import against as va

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a)
    )
    with pytest.raises(PreshardError, match="vLLM is not installed") as exc:
        va.planned_sharding(tmp_path, tp=2, pp=1, dtype="auto", quantization=None)
    assert exc.value.reason == "PlannerUnavailable" and exc.value.permanent
