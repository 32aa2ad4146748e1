"""preshard.core.gate: each refusal, and a subtle variant of each that must be caught."""

from __future__ import annotations

import dataclasses

import pytest

from preshard.core import gate
from preshard.core.errors import PreshardError
from preshard.core.manifest import STATE_PROCESSED, STATE_RAW, Manifest, build_manifest

SHA = "a" * 64


def manifest(tp: int = 2, pp: int = 1, **kw: object) -> Manifest:
    if pp > 1:
        shards = [f"model-pp-{p}-tp-{t}-part-0.safetensors" for p in range(pp) for t in range(tp)]
    else:
        shards = [f"model-rank-{r}-part-0.safetensors" for r in range(tp)]
    files = [(k, 100, SHA) for k in shards] + [("config.json", 10, SHA)]
    fields: dict[str, object] = {
        "source_uri": "s3://m/llama/",
        "tensor_parallel_size": tp,
        "pipeline_parallel_size": pp,
        "vllm_version": "0.32.0",
    }
    fields.update(kw)
    return build_manifest(files, **fields)


def refused(fn: object, *args: object) -> PreshardError:
    with pytest.raises(PreshardError) as info:  # every refusal of the gate is permanent
        fn(*args)  # type: ignore[operator]
    assert info.value.permanent
    return info.value


# ------------------------------------------------------------------------------- pin


def test_pin_accepts_the_manifest_bytes_and_refuses_one_changed_byte() -> None:
    m = manifest()
    body = m.to_json().encode()
    pin = gate.manifest_sha256(body)
    gate.check_pin(body, pin, "s3://b/p/")
    # a shard replaced and the manifest rewritten to match: one sha256 digit differs
    tampered = body.replace(SHA.encode(), ("b" + SHA[1:]).encode(), 1)
    assert Manifest.from_json(tampered)  # still a valid manifest
    err = refused(gate.check_pin, tampered, pin, "s3://b/p/")
    assert err.reason == "ManifestPinMismatch"
    assert pin in err.message and "do not serve" in err.message.lower()
    # even whitespace: the pin is over the bytes, not the parsed content
    err = refused(gate.check_pin, body + b" ", pin, "s3://b/p/")
    assert err.reason == "ManifestPinMismatch"


def test_pin_must_be_a_sha256() -> None:
    body = manifest().to_json().encode()
    for bad in ["", "A" * 64, "a" * 63, "g" * 64]:
        assert refused(gate.check_pin, body, bad, "s3://b/p/").reason == "Usage"


# ----------------------------------------------------------------------- parallelism


@pytest.mark.parametrize(
    ("tp", "pp", "reason"),
    [
        (4, 1, "TensorParallelSizeMismatch"),
        (1, 1, "TensorParallelSizeMismatch"),
        (2, 2, "PipelineParallelSizeMismatch"),
    ],
)
def test_parallelism_must_equal_the_checkpoints(tp: int, pp: int, reason: str) -> None:
    m = manifest(tp=2, pp=1)
    gate.check_parallelism(m, 2, 1)
    err = refused(gate.check_parallelism, m, tp, pp)
    assert err.reason == reason
    assert "--tensor-parallel-size 2" in err.message or "--pipeline-parallel-size 1" in err.message


def test_world_size_equal_but_split_differently_is_refused() -> None:
    # TP 2 x PP 2 and TP 4 x PP 1 both need 4 GPUs; the shards are not interchangeable
    m = manifest(tp=2, pp=2)
    assert refused(gate.check_parallelism, m, 4, 1).reason == "TensorParallelSizeMismatch"


# ---------------------------------------------------------------------- state format


def test_raw_loads_in_the_tested_vllm_on_any_platform() -> None:
    m = manifest(state_format=STATE_RAW, converted_on={"platform": "cpu"})
    for fmt in gate.LOAD_FORMATS:
        gate.check_loadable(m, gate.ServingVllm("0.32.0"), fmt)
        gate.check_loadable(m, gate.ServingVllm("0.33.1+cu129", "cuda", "NVIDIA H100"), fmt)
        gate.check_loadable(m, gate.ServingVllm("1.0.0"), fmt)


@pytest.mark.parametrize("version", ["0.31.9", "0.8.5", "0.4.3"])
def test_raw_refused_below_the_tested_vllm(version: str) -> None:
    m = manifest(state_format=STATE_RAW)
    err = refused(gate.check_loadable, m, gate.ServingVllm(version), "runai_streamer_sharded")
    assert err.reason == "VllmTooOld"
    assert "vLLM >= 0.32.0" in err.message


def test_no_vllm_or_unreadable_version_is_refused() -> None:
    m = manifest()
    err = refused(gate.check_loadable, m, gate.ServingVllm(None), "sharded_state")
    assert err.reason == "VllmNotFound" and "--serving-vllm-version" in err.message
    err = refused(gate.check_loadable, m, gate.ServingVllm("latest"), "sharded_state")
    assert err.reason == "VllmVersionUnknown"
    err = refused(gate.check_loadable, m, gate.ServingVllm("0.32.0"), "auto")
    assert err.reason == "Usage"


def test_processed_v1_without_a_recorded_platform_is_refused_with_re_convert() -> None:
    v1 = dataclasses.replace(manifest(), format_version=1, state_format=STATE_PROCESSED)
    v1 = Manifest.from_json(v1.to_json())  # as read back from S3
    assert v1.state_format == STATE_PROCESSED and gate.needs_platform(v1)
    err = refused(gate.check_loadable, v1, gate.ServingVllm("0.32.0", "cuda"), "sharded_state")
    assert err.reason == "StateFormatIncompatible"
    assert "re-convert" in err.message


def test_processed_loads_only_where_it_was_converted() -> None:
    m = manifest(
        state_format=STATE_PROCESSED,
        converted_on={"platform": "cuda", "device": "NVIDIA H100 80GB HBM3"},
    )
    same = gate.ServingVllm("0.32.0", "cuda", "NVIDIA H100 80GB HBM3")
    gate.check_loadable(m, same, "sharded_state")
    for other in [
        gate.ServingVllm("0.32.0", "cuda", "NVIDIA A100-SXM4-80GB"),  # another GPU type
        gate.ServingVllm("0.32.0", "rocm", "AMD Instinct MI300X"),
        gate.ServingVllm("0.32.0", "cpu"),
        gate.ServingVllm("0.32.1", "cuda", "NVIDIA H100 80GB HBM3"),  # another vLLM
    ]:
        err = refused(gate.check_loadable, m, other, "sharded_state")
        assert err.reason == "StateFormatIncompatible", other
        assert "re-convert" in err.message
    err = refused(gate.check_loadable, m, gate.ServingVllm("0.32.0"), "sharded_state")
    assert err.reason == "PlatformUnknown"


def test_shard_names_must_match_what_vllm_looks_for() -> None:
    m = manifest(tp=2, pp=2)
    gate.check_loadable(m, gate.ServingVllm("0.32.0"), "sharded_state")
    # a PP=2 checkpoint whose files carry TP-only names (what older vLLM wrote)
    files = [(f"model-rank-{r}-part-0.safetensors", 100, SHA) for r in range(4)]
    bad = build_manifest(
        [*files, ("config.json", 1, SHA)],
        source_uri="s3://m/",
        tensor_parallel_size=2,
        pipeline_parallel_size=2,
        vllm_version="0.32.0",
    )
    err = refused(gate.check_loadable, bad, gate.ServingVllm("0.32.0"), "sharded_state")
    assert err.reason == "ShardNamesIncompatible"


def test_parse_version() -> None:
    assert gate.parse_version("0.32.0+cpu") == (0, 32, 0)
    assert gate.parse_version("0.33.0rc1") == (0, 33, 0)
    assert gate.parse_version("0.11") == (0, 11, 0)
    assert gate.parse_version("dev") is None


# --------------------------------------------------------------------------- objects


def test_object_problems_catch_a_missing_object_and_one_byte_of_size() -> None:
    m = manifest()
    sizes: dict[str, int | None] = {f.key: f.size for f in m.files}
    assert gate.object_problems(list(m.files), sizes) == []
    sizes["model-rank-1-part-0.safetensors"] = 99
    sizes["config.json"] = None
    assert gate.object_problems(list(m.files), sizes) == [
        "config.json: missing",
        "model-rank-1-part-0.safetensors: size 99 != manifest 100",
    ]


# ------------------------------------------------------------------------ node ranks


def test_node_ranks_follow_vllms_rank_order() -> None:
    # TP 8 x PP 2 on two nodes (PP across nodes): node K holds pipeline stage K
    m = manifest(tp=8, pp=2)
    assert gate.node_ranks(m, 2, 0) == list(range(8))
    assert gate.node_ranks(m, 2, 1) == list(range(8, 16))
    stage1 = {
        f.key for f in gate.files_for_ranks(m, gate.node_ranks(m, 2, 1)) if f.rank is not None
    }
    assert stage1 == {f"model-pp-1-tp-{t}-part-0.safetensors" for t in range(8)}
    # TP 16 across two nodes: node 1 holds TP ranks 8..15
    m = manifest(tp=16)
    files = gate.files_for_ranks(m, gate.node_ranks(m, 2, 1))
    assert {f.key for f in files} == {
        *(f"model-rank-{r}-part-0.safetensors" for r in range(8, 16)),
        "config.json",
    }


def test_node_ranks_refuse_bad_splits() -> None:
    m = manifest(tp=2, pp=2)
    assert refused(gate.node_ranks, m, 3, 0).reason == "Usage"  # 4 ranks on 3 nodes
    assert refused(gate.node_ranks, m, 2, 2).reason == "Usage"
    assert gate.node_ranks(m, 4, 3) == [3]


def test_streamer_listing_catches_shards_beyond_the_first_page_and_foreign_shards() -> None:
    m = manifest(tp=2)
    keys = sorted(f.key for f in m.files)
    assert gate.streamer_listing_problems(m, keys) == []
    # 1000 objects that sort before the shards: vLLM's one listing never reaches them
    crowded = sorted([f"a-{i:04d}.bin" for i in range(998)] + keys)[:1000]
    [problem] = gate.streamer_listing_problems(m, crowded)
    assert "not among the first 1000 objects" in problem and "does not paginate" in problem
    # another checkpoint nested below the prefix: vLLM's *model-rank-0-part-* matches it
    [problem] = gate.streamer_listing_problems(m, [*keys, "old/model-rank-0-part-0.safetensors"])
    assert "old/model-rank-0-part-0.safetensors" in problem and "would load them" in problem
