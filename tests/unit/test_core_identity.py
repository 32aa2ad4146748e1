"""core.identity: every field that must change the conversion identity does, and none of
those that must not."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from preshard.core.identity import (
    SourcePin,
    conversion_identity,
    files_digest,
    identity_document,
    is_identity,
    normalise_endpoint,
)
from preshard.core.spec import parse_spec

BASE: dict[str, Any] = {
    "source": {"uri": "s3://models/llama/"},
    "tensorParallelSize": 2,
    "output": {"uri": "s3://out/llama/tp2/", "credentialsSecret": "s3-a"},
}
PIN = SourcePin(None, "sha256:" + "1" * 64)
VLLM = "0.32.0"


def ident(
    spec: dict[str, Any],
    pin: SourcePin = PIN,
    vllm: str = VLLM,
    state: str = "raw",
    namespace: str = "ml",
) -> str:
    s = parse_spec(spec)
    return conversion_identity(
        s, pin, vllm, state, namespace=namespace, source_endpoint=s.source.endpoint
    )


def with_(path: str, value: Any) -> dict[str, Any]:
    spec = copy.deepcopy(BASE)
    target = spec
    keys = path.split(".")
    for k in keys[:-1]:
        target = target.setdefault(k, {})
    target[keys[-1]] = value
    return spec


def test_it_is_a_sha256_value_and_stable() -> None:
    a = ident(BASE)
    assert is_identity(a) and a == ident(copy.deepcopy(BASE))
    # pinned: a change of the canonical document is a change of every identity
    assert a == conversion_identity(parse_spec(BASE), PIN, VLLM, namespace="ml")
    assert identity_document(parse_spec(BASE), PIN, VLLM, namespace="ml")["identityVersion"] == 2


@pytest.mark.parametrize(
    "path,value",
    [
        ("source.uri", "s3://models/other/"),
        ("tensorParallelSize", 4),
        ("pipelineParallelSize", 2),
        ("quantization", "fp8"),
        ("dtype", "bfloat16"),
        ("output.maxFileSize", "1Gi"),
        # another store: the same bucket/prefix there is another source
        # (docs/security.md, "Copy, Adopt and Withdraw")
        ("source.endpoint", "http://other:9000"),
    ],
)
def test_conversion_fields_change_it(path: str, value: Any) -> None:
    assert ident(with_(path, value)) != ident(BASE)


def test_the_source_content_changes_it() -> None:
    assert ident(BASE, SourcePin(None, "sha256:" + "2" * 64)) != ident(BASE)
    assert ident(BASE, SourcePin("abc", PIN.digest)) != ident(BASE)


def test_vllm_version_and_state_format_change_it() -> None:
    assert ident(BASE, vllm="0.33.0") != ident(BASE)
    assert ident(BASE, state="processed") != ident(BASE)


def test_pipeline_parallel_changes_the_file_pattern_too() -> None:
    doc = identity_document(parse_spec(with_("pipelineParallelSize", 2)), PIN, VLLM, namespace="n")
    assert doc["filePattern"].startswith("model-pp-")
    base = identity_document(parse_spec(BASE), PIN, VLLM, namespace="n")
    assert base["filePattern"].startswith("model-rank-")


@pytest.mark.parametrize(
    "path,value",
    [
        ("output.uri", "s3://elsewhere/llama/"),  # the prefix: copies have the same identity
        ("output.credentialsSecret", "s3-b"),
        ("output.endpoint", "http://minio:9000"),
        ("output.region", "eu-west-1"),
        ("source.credentialsSecret", "src"),
        ("source.region", "us-east-2"),
        ("verify", False),
        ("deletionPolicy", "Delete"),
        ("converter.resources", {"requests": {"cpu": "8", "memory": "64Gi"}}),
        ("converter.image", "registry.example/vllm:custom"),
        ("converter.imagePullPolicy", "Always"),
        ("converter.nodeSelector", {"gpu": "h100"}),
        ("converter.tolerations", [{"key": "gpu", "operator": "Exists"}]),
        ("converter.env", [{"name": "VLLM_X", "value": "1"}]),
        ("converter.backoffLimit", 5),
        ("converter.serviceAccountName", "other"),
        ("converter.priorityClassName", "high"),
        ("converter.workDirSize", "500Gi"),
    ],
)
def test_what_must_not_change_it(path: str, value: Any) -> None:
    assert ident(with_(path, value)) == ident(BASE)


def test_owner_and_name_are_not_inputs_and_the_namespace_only_for_pvc() -> None:
    # the function takes no owner, name or credentials at all; an s3:// or hf:// source in
    # two namespaces gives one identity (one store, the same objects) ...
    assert ident(BASE, namespace="a") == ident(copy.deepcopy(BASE), namespace="b")
    hf = with_("source.uri", "hf://org/model")
    assert ident(hf, namespace="a") == ident(hf, namespace="b")
    # ... a pvc:// claim name means another claim in each namespace
    # (docs/security.md, "Copy, Adopt and Withdraw")
    pvc = with_("source.uri", "pvc://models/llama")
    assert ident(pvc, namespace="a") != ident(pvc, namespace="b")


def test_hf_branch_and_commit_pin_to_the_commit() -> None:
    commit = "c" * 40
    main = ident(with_("source.uri", "hf://org/model@main"), SourcePin(commit, commit))
    pinned = ident(with_("source.uri", f"hf://org/model@{commit}"), SourcePin(commit, commit))
    assert main == pinned
    other = ident(with_("source.uri", "hf://org/model@main"), SourcePin("d" * 40, "d" * 40))
    assert other != main


def test_max_file_size_units_are_normalised() -> None:
    assert ident(with_("output.maxFileSize", "1Gi")) == ident(with_("output.maxFileSize", 2**30))


def test_files_digest_is_order_independent_and_sensitive() -> None:
    a = [("a.safetensors", 10, "e1"), ("config.json", 2, "e2")]
    assert files_digest(a) == files_digest(list(reversed(a)))
    assert files_digest(a) != files_digest([("a.safetensors", 11, "e1"), ("config.json", 2, "e2")])
    assert files_digest(a) != files_digest([("a.safetensors", 10, "e3"), ("config.json", 2, "e2")])
    assert files_digest(a) != files_digest([("b.safetensors", 10, "e1"), ("config.json", 2, "e2")])
    assert files_digest(a) != files_digest(a[:1])


@pytest.mark.parametrize(
    "a,b",
    [
        (None, "https://s3.amazonaws.com"),
        (None, "https://s3.eu-west-1.amazonaws.com/"),
        ("https://s3.us-east-1.amazonaws.com", "https://s3.dualstack.us-east-1.amazonaws.com"),
        ("http://MINIO:9000/", "http://minio:9000"),
        ("https://minio.example:443", "https://minio.example"),
        ("http://u:p@minio:9000", "http://minio:9000"),
    ],
)
def test_endpoints_are_normalised(a: str | None, b: str) -> None:
    assert normalise_endpoint(a) == normalise_endpoint(b)


def test_different_stores_stay_different() -> None:
    assert normalise_endpoint("http://minio:9000") != normalise_endpoint("http://minio:9001")
    assert normalise_endpoint("http://minio:9000") != normalise_endpoint(None)
    assert normalise_endpoint("http://a.example") != normalise_endpoint("https://a.example")


def test_is_identity() -> None:
    assert not is_identity(None) and not is_identity("sha256:xyz")
    assert not is_identity("sha256:" + "A" * 64)
    assert is_identity("sha256:" + "a" * 64)


def test_pre_quantized_shards_are_another_identity_than_the_raw_weights() -> None:
    """An online FP8 method's pre-quantized rank files (engine-free, the default) are
    other bytes than the same method's raw weights (engine vllm): another identity, so
    neither is ever copied or adopted for the other."""
    fp8 = with_("quantization", "fp8_per_tensor")
    raw = copy.deepcopy(fp8)
    raw["converter"] = {"engine": "vllm"}
    assert ident(fp8) != ident(raw)
    doc = identity_document(parse_spec(fp8), PIN, VLLM, namespace="ml")
    assert doc["weights"] == "quantized"
    # no field for conversions without pre-quantization: their identities are unchanged
    assert "weights" not in identity_document(parse_spec(raw), PIN, VLLM, namespace="ml")
    assert "weights" not in identity_document(parse_spec(BASE), PIN, VLLM, namespace="ml")
