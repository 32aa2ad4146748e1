"""core.steps: the path chosen from the preflight's findings, before any accelerator."""

from __future__ import annotations

from typing import Any

import pytest

from preshard.core import steps as cs
from preshard.core.identity import SourcePin, conversion_identity
from preshard.core.preflight import (
    OutputManifest,
    Overlap,
    Preflight,
    PreflightError,
    parse_preflight,
)
from preshard.core.spec import parse_spec
from preshard.core.steps import ReadyCheckpoint, next_step

SPEC = parse_spec(
    {
        "source": {"uri": "s3://models/llama/"},
        "tensorParallelSize": 2,
        "output": {"uri": "s3://out/llama/"},
    }
)
PIN = SourcePin(None, "sha256:" + "1" * 64)
ME = "ml/llama/uid-new"
OLD = "ml/llama/uid-old"
OTHER_NS = "team-b/secret-project/uid-b"
ID = conversion_identity(SPEC, PIN, "0.32.0", namespace="ml")
SHA = "f" * 64


def pre(manifest: OutputManifest | None = None, *overlaps: Overlap, state: str = "") -> Preflight:
    return Preflight(
        source=PIN,
        vllm_version="0.32.0",
        state=state or ("manifest" if manifest else "empty"),
        manifest=manifest,
        overlaps=overlaps,
    )


def man(
    owner: str | None, identity: str | None = ID, complete: bool = True, proven: bool = False
) -> OutputManifest:
    """``proven``: the operator's ledger records this manifest as its owner's."""
    return OutputManifest(
        owner=owner, identity=identity, sha256=SHA, complete=complete, proven=proven
    )


def ready(
    ref: str = "ml/orig", uri: str = "s3://out/orig/", endpoint: str | None = None
) -> ReadyCheckpoint:
    return ReadyCheckpoint(
        ref=ref, uid="uid-orig", uri=uri, manifest_sha256="e" * 64, endpoint=endpoint
    )


def test_empty_prefix_converts() -> None:
    d = next_step(SPEC, ME, pre(), frozenset(), [])
    assert d.step == "Convert" and not d.withdraw and d.identity == ID


def test_same_identity_gone_owner_adopts_with_expectations() -> None:
    d = next_step(SPEC, ME, pre(man(OLD, proven=True)), frozenset(), [])
    assert d.step == "Adopt"
    assert d.expect_owner == OLD and d.expect_manifest_sha256 == SHA


def test_a_manifest_the_operator_never_saw_published_is_not_adopted() -> None:
    # finding 4: a planted manifest claiming this identity with a gone owner converts
    # instead, after a withdraw of the manifest alone (never the objects it lists)
    d = next_step(SPEC, ME, pre(man(OLD)), frozenset(), [])
    assert d.step == "Convert" and d.withdraw and not d.withdraw_listed
    assert d.expect_manifest_sha256 == SHA
    proven = next_step(SPEC, ME, pre(man(OLD, identity="sha256:" + "0" * 64, proven=True)),
                    frozenset(), [])  # fmt: skip
    assert proven.step == "Convert" and proven.withdraw and proven.withdraw_listed


def test_the_identity_pins_where_the_source_lives() -> None:
    # finding 1: pvc://models/llama is another claim in each namespace
    pvc = parse_spec({"source": {"uri": "pvc://models/llama"}, "tensorParallelSize": 2,
                      "output": {"uri": "s3://out/llama/"}})  # fmt: skip
    a = conversion_identity(pvc, PIN, "0.32.0", namespace="team-x")
    assert a != conversion_identity(pvc, PIN, "0.32.0", namespace="team-c")
    # one s3:// prefix on two stores is two sources; the AWS endpoints are one store
    on = lambda ep: conversion_identity(SPEC, PIN, "0.32.0", namespace="a", source_endpoint=ep)  # noqa: E731
    assert on("http://minio:9000") != on(None)
    assert on("https://s3.us-east-1.amazonaws.com") == on(None) == on("https://s3.amazonaws.com/")
    assert on("http://MinIO:9000/") == on("http://minio:9000")
    # the namespace is not part of an s3:// source's identity (same store, same objects)
    assert conversion_identity(SPEC, PIN, "0.32.0", namespace="b") == ID


def test_same_identity_living_owner_is_refused_and_never_adopted() -> None:
    d = next_step(SPEC, ME, pre(man(OLD)), frozenset({OLD}), [ready()])
    assert d.step == "OutputOwnedByOther" and d.reason == "OutputOwnedByOther"
    assert "ml/llama" in d.message  # same namespace: named


def test_a_living_owner_of_another_namespace_is_not_named() -> None:
    d = next_step(SPEC, ME, pre(man(OTHER_NS)), frozenset({OTHER_NS}), [])
    assert d.step == "OutputOwnedByOther"
    assert "team-b" not in d.message and "secret-project" not in d.message


def test_an_owner_that_is_not_a_resource_is_never_proven_gone() -> None:
    d = next_step(SPEC, ME, pre(man("alice")), frozenset(), [])
    assert d.step == "OutputOwnedByOther"


def test_our_own_checkpoint_is_adopted_without_a_ledger_entry() -> None:
    d = next_step(SPEC, ME, pre(man(ME)), frozenset(), [])
    assert d.step == "Adopt" and d.expect_owner == ME


def test_an_incomplete_checkpoint_is_not_adopted() -> None:
    d = next_step(SPEC, ME, pre(man(OLD, complete=False, proven=True)), frozenset(), [])
    assert d.step == "Convert" and d.withdraw


def test_a_legacy_manifest_without_identity_is_replaced() -> None:
    d = next_step(SPEC, ME, pre(man(OLD, identity=None)), frozenset(), [])
    assert d.step == "Convert" and d.withdraw and d.expect_manifest_sha256 == SHA


def test_another_identity_of_a_gone_owner_is_withdrawn_then_converted() -> None:
    d = next_step(SPEC, ME, pre(man(OLD, identity="sha256:" + "0" * 64)), frozenset(), [])
    assert d.step == "Convert" and d.withdraw and d.expect_owner == OLD
    assert "withdrawn first" in d.message


def test_another_identity_of_ours_is_converted_without_a_withdraw_job() -> None:
    # publish withdraws our own manifest first, as it always did
    d = next_step(SPEC, ME, pre(man(ME, identity="sha256:" + "0" * 64)), frozenset(), [])
    assert d.step == "Convert" and not d.withdraw


def test_an_ownerless_manifest_is_nobodys() -> None:
    # nobody's, so nobody vouches for its bytes: converted over (finding 4), never adopted
    d = next_step(SPEC, ME, pre(man(None)), frozenset(), [])
    assert d.step == "Convert" and not d.withdraw_listed


def test_a_ready_twin_is_copied() -> None:
    d = next_step(SPEC, ME, pre(), frozenset(), [ready()])
    assert d.step == "Copy" and d.copy_from == ready()


def test_copy_names_only_a_prefix_of_the_same_namespace() -> None:
    here = next_step(SPEC, ME, pre(), frozenset(), [ready(ref="ml/z", uri="s3://out/z/")])
    assert "s3://out/z/" in here.message
    trust = frozenset({"team-b"})
    there = next_step(SPEC, ME, pre(), frozenset(), [ready(ref="team-b/x", uri="s3://out/b/")],
                   copy_from_namespaces=trust)  # fmt: skip
    assert there.step == "Copy" and "s3://out/b/" not in there.message


def test_copy_from_another_namespace_only_where_the_policy_trusts_it() -> None:
    other = [ready(ref="team-b/x", uri="s3://out/b/")]
    assert next_step(SPEC, ME, pre(), frozenset(), other).step == "Convert"  # default
    assert next_step(SPEC, ME, pre(), frozenset(), other,
                  copy_from_namespaces=frozenset({"team-c"})).step == "Convert"  # fmt: skip
    assert next_step(SPEC, ME, pre(), frozenset(), other,
                  copy_from_namespaces=frozenset({"*"})).step == "Copy"  # fmt: skip


def test_a_nested_unfinished_publication_is_an_overlap() -> None:
    # finding 3: another owner's preshard-publish.json below the prefix
    rec = Overlap("llama/sub/preshard-publish.json", OTHER_NS, "nested", "publication")
    d = next_step(SPEC, ME, pre(None, rec), frozenset({OTHER_NS}), [ready()])
    assert d.step == "OutputOwnedByOther" and "team-b" not in d.message
    d = next_step(SPEC, ME, pre(None, rec), frozenset(), [ready()])
    assert d.step == "OutputOverlapsCheckpoint"
    parsed = parse_preflight({"kind": "preflight", "source": {"digest": PIN.digest},
        "output": {"state": "incomplete", "overlapping": [{"key": "a/preshard-publish.json",
        "relation": "nested", "kind": "publication", "owner": OLD}]}})  # fmt: skip
    assert parsed.overlaps[0].kind == "publication"


def test_copy_prefers_the_same_namespace() -> None:
    there = ready(ref="team-b/x", uri="s3://out/b/")
    here = ready(ref="ml/z", uri="s3://out/z/")
    d = next_step(
        SPEC, ME, pre(), frozenset(), [there, here], copy_from_namespaces=frozenset({"*"})
    )
    assert d.copy_from == here


@pytest.mark.parametrize(
    "candidate",
    [
        ready(endpoint="http://other-s3:9000"),  # another store: no server-side copy
        ready(uri="s3://out/llama/"),  # our own prefix
        ready(uri="s3://out/llama/sub/"),  # below it
        ready(uri="s3://out/"),  # above it
    ],
)
def test_copy_candidates_that_do_not_qualify(candidate: ReadyCheckpoint) -> None:
    assert next_step(SPEC, ME, pre(), frozenset(), [candidate]).step == "Convert"


def test_copy_not_over_a_manifest_and_not_after_a_failed_copy() -> None:
    other = man(OLD, identity="sha256:" + "0" * 64)
    assert next_step(SPEC, ME, pre(other), frozenset(), [ready()]).step == "Convert"
    d = next_step(SPEC, ME, pre(), frozenset(), [ready()], copy_allowed=False)
    assert d.step == "Convert"


def test_a_failed_adopt_falls_back_to_a_replacing_conversion() -> None:
    d = next_step(SPEC, ME, pre(man(OLD, proven=True)), frozenset(), [], adopt_allowed=False)
    assert d.step == "Convert" and d.withdraw


def test_a_living_owner_below_or_above_is_refused() -> None:
    below = Overlap("llama/sub/preshard-manifest.json", OLD, "nested")
    d = next_step(SPEC, ME, pre(None, below), frozenset({OLD}), [ready()])
    assert d.step == "OutputOwnedByOther" and "below" in d.message
    above = Overlap("preshard-manifest.json", OLD, "parent")
    d = next_step(SPEC, ME, pre(None, above), frozenset({OLD}), [])
    assert d.step == "OutputOwnedByOther" and "above" in d.message


def test_a_gone_owner_below_is_refused_too() -> None:
    below = Overlap("llama/sub/preshard-manifest.json", OLD, "nested")
    d = next_step(SPEC, ME, pre(None, below), frozenset(), [])
    assert d.step == "OutputOverlapsCheckpoint"


def test_refusal_comes_before_adoption() -> None:
    below = Overlap("llama/sub/preshard-manifest.json", OTHER_NS, "nested")
    d = next_step(SPEC, ME, pre(man(OLD), below), frozenset({OTHER_NS}), [])
    assert d.step == "OutputOwnedByOther" and "team-b" not in d.message


# A Llama 3.1 70B config.json (the fields the preflight reports).
LLAMA_70B = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "torch_dtype": "bfloat16",
    "tie_word_embeddings": False,
}


def _spec_with_memory(limit: str | None) -> Any:
    raw: dict[str, Any] = {
        "source": {"uri": "s3://models/llama/"},
        "tensorParallelSize": 8,
        "output": {"uri": "s3://out/llama/"},
        "converter": {"accelerator": "cpu"},
    }
    if limit:
        raw["converter"]["resources"] = {"limits": {"memory": limit}, "requests": {"cpu": "8"}}
    return parse_spec(raw)


def test_the_gate_stops_a_conversion_whose_pod_memory_is_below_the_estimate() -> None:
    """The real estimate (core/estimate.py) on a 70B config: a 64Gi CPU pod is refused
    with both numbers before any conversion pod; 1Ti passes; no limit is not judged."""
    p = Preflight(source=PIN, vllm_version="0.32.0", state="empty", config=LLAMA_70B)
    small = _spec_with_memory("64Gi")
    d = next_step(small, ME, p, frozenset(), [], accelerator="cpu")
    assert (d.step, d.reason) == ("CannotConvert", "InsufficientMemory")
    assert "64Gi" in d.message or str(64 * 2**30) in d.message
    est = cs.memory_estimate_status(small, p, "cpu")
    assert est is not None and est["bytes"] > 64 * 2**30
    assert next_step(_spec_with_memory("1Ti"), ME, p, frozenset(), [], accelerator="cpu").step == (
        "Convert"
    )
    assert next_step(_spec_with_memory(None), ME, p, frozenset(), [], accelerator="cpu").step == (
        "Convert"
    )
    # the conversion refusal never stands between a resource and its own published checkpoint
    adopt = Preflight(
        source=PIN, vllm_version="0.32.0", state="manifest", manifest=man(OLD,
        identity=conversion_identity(small, PIN, "0.32.0", namespace="ml"), proven=True),
        config=LLAMA_70B
    )  # fmt: skip
    assert next_step(small, ME, adopt, frozenset(), [], accelerator="cpu").step == "Adopt"


def test_the_gate_refuses_a_layout_the_model_cannot_take_before_any_accelerator() -> None:
    """TP 3 of a 64-head model: refused by the operator from the preflight's config.json
    with the worker's own rule and wording (core.plan.Layout), not after a GPU Job."""
    p = Preflight(source=PIN, vllm_version="0.32.0", state="empty", config=LLAMA_70B)
    for tp, pp, reason, words in [
        (3, 1, "TensorParallelSizeMismatch", "does not divide the model's 64 attention heads"),
        (1, 81, "PipelineParallelSizeMismatch", "exceeds the model's 80 layers"),
    ]:
        spec = parse_spec(
            {
                "source": {"uri": "s3://models/llama/"},
                "tensorParallelSize": tp,
                "pipelineParallelSize": pp,
                "output": {"uri": "s3://out/llama/"},
            }
        )
        d = next_step(spec, ME, p, frozenset(), [])
        assert (d.step, d.reason) == ("CannotConvert", reason)
        assert words in d.message
    ok = parse_spec({**SPEC.model_dump(by_alias=True, exclude_none=True), "tensorParallelSize": 8})
    assert next_step(ok, ME, p, frozenset(), []).step == "Convert"


def findings(**output: Any) -> dict[str, Any]:
    return {
        "kind": "preflight",
        "source": {"uri": "s3://models/llama/", "digest": PIN.digest, "revision": None},
        "vllmVersion": "0.32.0",
        "config": {"hidden_size": 64},
        "output": {"state": "empty", "objects": 0, "overlapping": [], **output},
    }


def test_parse_preflight_roundtrip() -> None:
    p = parse_preflight(
        findings(
            state="manifest",
            manifest={"owner": OLD, "identity": ID, "sha256": SHA, "etag": '"x"', "complete": True},
            overlapping=[{"key": "a/preshard-manifest.json", "owner": OLD, "relation": "parent"}],
        )
    )
    assert p.manifest == OutputManifest(OLD, ID, SHA, '"x"', True)
    assert p.overlaps == (Overlap("a/preshard-manifest.json", OLD, "parent"),)
    assert p.owners() == [OLD] and p.config == {"hidden_size": 64}
    assert next_step(SPEC, ME, p, frozenset(), []).step == "OutputOverlapsCheckpoint"


@pytest.mark.parametrize(
    "data",
    [
        None,
        {"kind": "other"},
        {**findings(), "source": {"uri": "x"}},  # no digest
        findings(state="weird"),
        findings(state="manifest"),  # a manifest without its sha256
    ],
)
def test_parse_preflight_rejects_malformed_findings(data: Any) -> None:
    with pytest.raises(PreflightError):
        parse_preflight(data)


def test_complete_must_be_literally_true() -> None:
    p = parse_preflight(
        findings(
            state="manifest",
            manifest={"owner": OLD, "identity": ID, "sha256": SHA, "complete": "yes"},
        )
    )
    assert p.manifest is not None and not p.manifest.complete


def test_an_unreadable_manifest_is_never_touched() -> None:
    d = next_step(SPEC, ME, pre(state="invalid"), frozenset(), [ready()])
    assert d.step == "OutputOwnedByOther" and d.reason == "OutputHasUnreadableManifest"


def test_a_gptq_checkpoint_is_refused_on_cpu_before_any_job_but_not_on_gpu() -> None:
    from preshard.core.modelconfig import cpu_raw_reload_refusal, prequantized_method

    gptq = {**LLAMA_70B, "quantization_config": {"quant_method": "GPTQ", "bits": 4}}
    assert prequantized_method(gptq) == "gptq"
    assert prequantized_method(LLAMA_70B) is None
    assert cpu_raw_reload_refusal(LLAMA_70B, None) is None
    assert cpu_raw_reload_refusal(LLAMA_70B, "fp8") is None
    assert "quantized with awq" in (cpu_raw_reload_refusal(LLAMA_70B, "awq") or "")
    p = Preflight(source=PIN, vllm_version="0.32.0", state="empty", config=gptq)
    d = next_step(_spec_with_memory("1Ti"), ME, p, frozenset(), [], accelerator="cpu")
    assert (d.step, d.reason) == ("CannotConvert", "UnsupportedQuantization")
    assert "quantized with gptq" in d.message and "CPU backend" in d.message
    assert next_step(_spec_with_memory("1Ti"), ME, p, frozenset(), [], accelerator="gpu").step == (
        "Convert"
    )


def test_an_engine_free_conversion_is_gated_by_its_own_estimate_only() -> None:
    """accelerator "none" (spec.converter.engine: none, core.children.pod.accelerator): the
    engine-free estimate (a few GiB for 70B) decides; the CPU backend's reload refusal
    (GPTQ) does not apply, since no engine runs."""
    p = Preflight(source=PIN, vllm_version="0.32.0", state="empty", config=LLAMA_70B)
    est = cs.memory_estimate_status(_spec_with_memory("64Gi"), p, "none")
    assert est is not None and est["accelerator"] == "none" and est["bytes"] < 10 * 2**30
    assert next_step(
        _spec_with_memory("64Gi"), ME, p, frozenset(), [], accelerator="none"
    ).step == ("Convert")
    d = next_step(_spec_with_memory("4Gi"), ME, p, frozenset(), [], accelerator="none")
    assert (d.step, d.reason) == ("CannotConvert", "InsufficientMemory")
    assert "no engine" in d.message
    gptq = {**LLAMA_70B, "quantization_config": {"quant_method": "gptq", "bits": 4}}
    p = Preflight(source=PIN, vllm_version="0.32.0", state="empty", config=gptq)
    assert next_step(
        _spec_with_memory("64Gi"), ME, p, frozenset(), [], accelerator="none"
    ).step == ("Convert")
