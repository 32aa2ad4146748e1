"""preshard.core.manifest: the preshard-manifest.json format, strict parsing, artifact status."""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

import pytest

from preshard.core.manifest import (
    FILE_PATTERN,
    FORMAT,
    FORMAT_VERSION,
    LOAD_FORMAT,
    MANIFEST_NAME,
    PP_FILE_PATTERN,
    Manifest,
    ManifestError,
    ManifestFile,
    artifact_status,
    build_manifest,
    manifest_sha256,
    parse_shard_filename,
)

SHA_A = "a" * 64
SHA_B = "b" * 64
SHA_C = "c" * 64


def test_constants() -> None:
    assert MANIFEST_NAME == "preshard-manifest.json"
    assert FORMAT == "preshard.io/checkpoint-manifest"
    assert FORMAT_VERSION == 2
    assert FILE_PATTERN == "model-rank-{rank}-part-{part}.safetensors"
    assert PP_FILE_PATTERN == "model-pp-{pp_rank}-tp-{tp_rank}-part-{part}.safetensors"
    assert LOAD_FORMAT == "sharded_state"


@pytest.mark.parametrize(
    ("name", "tp", "expected"),
    [
        ("model-rank-0-part-0.safetensors", 1, (0, 0)),
        ("model-rank-7-part-12.safetensors", 8, (7, 12)),
        ("model-pp-0-tp-3-part-0.safetensors", 4, (3, 0)),
        ("model-pp-1-tp-2-part-5.safetensors", 4, (6, 5)),  # pp_rank * tp + tp_rank
        ("model-pp-1-tp-0-part-0.safetensors", 1, (1, 0)),
        ("config.json", 1, None),
        ("tokenizer.json", 1, None),
        ("model-rank-x-part-0.safetensors", 1, None),
        ("model-rank-0-part-0.safetensors.tmp", 1, None),
        ("model-rank-0.safetensors", 1, None),
        ("model-00001-of-00002.safetensors", 1, None),
        ("sub/model-rank-0-part-0.safetensors", 1, None),  # a bare name, not a key
    ],
)
def test_parse_shard_filename(name: str, tp: int, expected: tuple[int, int] | None) -> None:
    assert parse_shard_filename(name, tp) == expected


def _tp2() -> Manifest:
    return build_manifest(
        [
            ("model-rank-1-part-0.safetensors", 300, SHA_B),
            ("config.json", 10, SHA_C),
            ("model-rank-0-part-0.safetensors", 200, SHA_A),
        ],
        source_uri="hf://org/name",
        source_revision="main",
        tensor_parallel_size=2,
        pipeline_parallel_size=1,
        vllm_version="0.32.0",
        quantization="fp8",
        dtype="bfloat16",
        owner="ml/llama/uid-1",
        created_at="2025-01-01T00:00:00Z",
    )


EXPECTED_TP2_JSON = """{
  "format": "preshard.io/checkpoint-manifest",
  "formatVersion": 2,
  "createdAt": "2025-01-01T00:00:00Z",
  "owner": "ml/llama/uid-1",
  "source": {
    "uri": "hf://org/name",
    "revision": "main"
  },
  "tensorParallelSize": 2,
  "pipelineParallelSize": 1,
  "quantization": "fp8",
  "dtype": "bfloat16",
  "vllmVersion": "0.32.0",
  "loadFormat": "sharded_state",
  "filePattern": "model-rank-{rank}-part-{part}.safetensors",
  "totalBytes": 510,
  "files": [
    {
      "key": "config.json",
      "size": 10,
      "sha256": "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc"
    },
    {
      "key": "model-rank-0-part-0.safetensors",
      "size": 200,
      "sha256": "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
      "rank": 0,
      "part": 0
    },
    {
      "key": "model-rank-1-part-0.safetensors",
      "size": 300,
      "sha256": "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
      "rank": 1,
      "part": 0
    }
  ],
  "stateFormat": "raw",
  "convertedOn": {},
  "sharding": null,
  "identity": null,
  "verification": null
}
"""


def test_build_manifest_and_to_json_exact() -> None:
    m = _tp2()
    assert [f.key for f in m.files] == [
        "config.json",
        "model-rank-0-part-0.safetensors",
        "model-rank-1-part-0.safetensors",
    ]
    assert m.files[1] == ManifestFile("model-rank-0-part-0.safetensors", 200, SHA_A, 0, 0)
    assert m.files[0] == ManifestFile("config.json", 10, SHA_C, None, None)
    assert m.to_json() == EXPECTED_TP2_JSON


def test_manifest_queries() -> None:
    m = _tp2()
    assert m.world_size == 2
    assert m.total_bytes == 510
    assert m.file("config.json") == ManifestFile("config.json", 10, SHA_C)
    assert m.file("missing") is None
    assert [f.key for f in m.rank_files(1)] == ["model-rank-1-part-0.safetensors"]
    assert m.rank_files(5) == []
    assert [f.key for f in m.shard_files()] == [
        "model-rank-0-part-0.safetensors",
        "model-rank-1-part-0.safetensors",
    ]
    assert [f.key for f in m.other_files()] == ["config.json"]
    assert m.missing_ranks() == []
    assert m.expected_rank_files_present() is True


def test_round_trip() -> None:
    m = _tp2()
    back = Manifest.from_json(m.to_json())
    assert back == m
    assert Manifest.from_json(m.to_json().encode()) == m


def test_round_trip_pp() -> None:
    files = [
        (f"model-pp-{pp}-tp-{tp}-part-0.safetensors", 1 + pp * 2 + tp, SHA_A)
        for pp in range(2)
        for tp in range(2)
    ]
    m = build_manifest(
        files,
        source_uri="s3://src/m/",
        tensor_parallel_size=2,
        pipeline_parallel_size=2,
        vllm_version="0.32.0",
        file_pattern=PP_FILE_PATTERN,
    )
    assert sorted(f.rank for f in m.shard_files() if f.rank is not None) == [0, 1, 2, 3]
    back = Manifest.from_json(m.to_json())
    assert back == m
    assert back.file_pattern == PP_FILE_PATTERN


def test_extra_is_kept() -> None:
    m = build_manifest(
        [("model-rank-0-part-0.safetensors", 1, SHA_A)],
        source_uri="s3://src/m/",
        tensor_parallel_size=1,
        pipeline_parallel_size=1,
        vllm_version="0.32.0",
        extra={"note": "x"},
    )
    assert json.loads(m.to_json())["extra"] == {"note": "x"}
    assert Manifest.from_json(m.to_json()).extra == {"note": "x"}


def test_build_manifest_checks_keys() -> None:
    with pytest.raises(ManifestError, match="the manifest cannot list itself"):
        build_manifest(
            [(MANIFEST_NAME, 1, SHA_A)],
            source_uri="s",
            tensor_parallel_size=1,
            pipeline_parallel_size=1,
            vllm_version="v",
        )


def test_manifest_sha256() -> None:
    text = _tp2().to_json()
    expected = hashlib.sha256(text.encode()).hexdigest()
    assert manifest_sha256(text) == expected
    assert manifest_sha256(text.encode()) == expected


@pytest.mark.parametrize("uri", ["s3://out/m/", "s3://out/m"])
def test_artifact_status(uri: str) -> None:
    m = _tp2()
    text = m.to_json()
    assert artifact_status(m, uri, text) == {
        "uri": "s3://out/m/",
        "manifestUri": "s3://out/m/preshard-manifest.json",
        "files": 3,
        "totalBytes": 510,
        "manifestSha256": hashlib.sha256(text.encode()).hexdigest(),
        "vllmVersion": "0.32.0",
        "tensorParallelSize": 2,
        "pipelineParallelSize": 1,
        "stateFormat": "raw",
        # no convertedOn.engine: written by an engine (before the engine-free path)
        "engine": "vllm",
    }


def test_converted_on_engine() -> None:
    """convertedOn.engine records which produced the files; old manifests read as vllm;
    anything else is refused."""
    m = _tp2()
    assert m.engine == "vllm"
    data = json.loads(m.to_json())
    data["convertedOn"] = {"platform": "cpu", "engine": "none"}
    back = Manifest.from_json(json.dumps(data))
    assert back.engine == "none"
    assert artifact_status(back, "s3://out/m/", json.dumps(data))["engine"] == "none"
    data["convertedOn"]["engine"] = "magic"
    with pytest.raises(ManifestError, match=r"convertedOn\.engine"):
        Manifest.from_json(json.dumps(data))


# ------------------------------------------------------------------- strict parsing


def _raw() -> dict[str, Any]:
    return json.loads(_tp2().to_json())


def _with(**changes: Any) -> str:
    data = _raw()
    for key, value in changes.items():
        if value is _DROP:
            data.pop(key)
        else:
            data[key] = value
    return json.dumps(data)


_DROP = object()


def _files(*entries: dict[str, Any]) -> list[dict[str, Any]]:
    return list(entries)


def _f(key: str, size: Any = 1, sha: Any = SHA_A) -> dict[str, Any]:
    return {"key": key, "size": size, "sha256": sha}


R0 = "model-rank-0-part-0.safetensors"
R1 = "model-rank-1-part-0.safetensors"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "manifest is not valid JSON: "),
        ("[]", "manifest is not a JSON object"),
        ('"x"', "manifest is not a JSON object"),
        (_with(format="other"), "not a preshard manifest (format 'other')"),
        (_with(format=_DROP), "not a preshard manifest (format None)"),
        (
            _with(formatVersion=3),
            "unsupported manifest formatVersion 3 (this preshard reads 1, 2)",
        ),
        (
            _with(formatVersion=_DROP),
            "unsupported manifest formatVersion None (this preshard reads 1, 2)",
        ),
        (
            _with(formatVersion="1"),
            "unsupported manifest formatVersion '1' (this preshard reads 1, 2)",
        ),
        (
            _with(tensorParallelSize=_DROP),
            "manifest is missing or has a bad field: 'tensorParallelSize'",
        ),
        (_with(source=_DROP), "manifest is missing or has a bad field: 'source'"),
        (_with(files=_DROP), "manifest is missing or has a bad field: 'files'"),
        (_with(vllmVersion=_DROP), "manifest is missing or has a bad field: 'vllmVersion'"),
        (_with(tensorParallelSize="two"), "manifest is missing or has a bad field: "),
        (_with(tensorParallelSize=0), "manifest parallel sizes must be >= 1"),
        (_with(pipelineParallelSize=-1), "manifest parallel sizes must be >= 1"),
        (_with(files=[]), "manifest lists no files"),
        (_with(files={"a": 1}), "manifest lists no files"),
        (_with(files=[{"key": R0, "size": 1}]), "manifest file entry is malformed: 'sha256'"),
        (_with(files=["model-rank-0-part-0.safetensors"]), "manifest file entry is malformed: "),
        (_with(files=[_f(R0, size="big")]), "manifest file entry is malformed: "),
        (_with(files=[_f("/abs/key")]), "invalid file key '/abs/key'"),
        (_with(files=[_f("")]), "invalid file key ''"),
        (_with(files=[_f("a\\b")]), "invalid file key 'a\\\\b'"),
        (_with(files=[_f("a/../b")]), "invalid file key 'a/../b': empty, '.' or '..' segment"),
        (_with(files=[_f("a//b")]), "invalid file key 'a//b': empty, '.' or '..' segment"),
        (_with(files=[_f("./b")]), "invalid file key './b': empty, '.' or '..' segment"),
        (_with(files=[_f(MANIFEST_NAME)]), "the manifest cannot list itself"),
        (_with(files=[_f(R0), _f(R1), _f(R0)]), f"manifest lists {R0!r} twice"),
        (_with(files=[_f(R0), _f(R1, size=-1)]), f"{R1}: negative size"),
        (
            _with(files=[_f(R0), _f(R1, sha="A" * 64)]),
            f"{R1}: sha256 {'A' * 64!r} is not 64 lowercase hex digits",
        ),
        (
            _with(files=[_f(R0), _f(R1, sha="a" * 63)]),
            f"{R1}: sha256 {'a' * 63!r} is not 64 lowercase hex digits",
        ),
        (_with(totalBytes=511), "manifest totalBytes does not equal the sum of file sizes"),
        (
            _with(files=[_f(R0), _f("config.json")], totalBytes=_DROP),
            "manifest has no shard files for rank(s) [1] of 2 (TP 2 x PP 1)",
        ),
        (
            _with(files=[_f("config.json")], totalBytes=_DROP),
            "manifest has no shard files for rank(s) [0, 1] of 2 (TP 2 x PP 1)",
        ),
        (
            _with(
                files=[
                    _f("model-pp-0-tp-0-part-0.safetensors"),
                    _f("model-pp-0-tp-1-part-0.safetensors"),
                ],
                pipelineParallelSize=2,
                totalBytes=_DROP,
            ),
            "manifest has no shard files for rank(s) [2, 3] of 4 (TP 2 x PP 2)",
        ),
    ],
)
def test_from_json_rejects(text: str, message: str) -> None:
    with pytest.raises(ManifestError) as exc:
        Manifest.from_json(text)
    if message.endswith(": "):
        assert str(exc.value).startswith(message)
    else:
        assert str(exc.value) == message


def test_from_json_defaults_for_optional_fields() -> None:
    data = {
        "format": FORMAT,
        "formatVersion": 1,
        "tensorParallelSize": 1,
        "source": "not-an-object",
        "vllmVersion": "0.32.0",
        "files": [_f(R0, size=5)],
    }
    m = Manifest.from_json(json.dumps(data))
    assert m == Manifest(
        source_uri="",
        tensor_parallel_size=1,
        pipeline_parallel_size=1,
        vllm_version="0.32.0",
        files=(ManifestFile(R0, 5, SHA_A, 0, 0),),
        format_version=1,
        state_format="processed",  # formatVersion 1: save_sharded_state after processing
    )


def test_from_json_accepts_keys_under_subdirectories() -> None:
    data = _raw()
    data["files"] = [_f("shards/" + R0), _f("shards/" + R1), _f("tokenizer/tokenizer.json")]
    data.pop("totalBytes")
    m = Manifest.from_json(json.dumps(data))
    assert [(f.key, f.rank) for f in m.files] == [
        ("shards/" + R0, 0),
        ("shards/" + R1, 1),
        ("tokenizer/tokenizer.json", None),
    ]


def test_from_json_file_order_does_not_change_the_serialised_form() -> None:
    data = _raw()
    data["files"].reverse()
    original = copy.deepcopy(data)
    m = Manifest.from_json(json.dumps(data))
    assert [f.key for f in m.files] == [f["key"] for f in original["files"]]  # kept as read
    assert m.to_json() == EXPECTED_TP2_JSON  # written sorted by key
    assert data == original


# Strict parsing: unknown fields, ranks of another parallel size, numbers.


def test_from_json_rejects_unknown_top_level_fields() -> None:
    with pytest.raises(ManifestError) as exc:
        Manifest.from_json(_with(bogus=1, tensorParalelSize=2))
    assert str(exc.value) == (
        "manifest has unknown field(s) 'bogus', 'tensorParalelSize' "
        "(formatVersion 2; extensions belong in 'extra')"
    )


def test_from_json_keeps_extensions_under_extra() -> None:
    m = Manifest.from_json(_with(extra={"builder": {"name": "x", "n": [1, 2]}}))
    assert m.extra == {"builder": {"name": "x", "n": [1, 2]}}
    assert Manifest.from_json(m.to_json()) == m


@pytest.mark.parametrize("extra", [[1], "x", 5])
def test_from_json_extra_must_be_an_object(extra: Any) -> None:
    with pytest.raises(ManifestError, match="'extra' must be an object"):
        Manifest.from_json(_with(extra=extra))


@pytest.mark.parametrize("name", ["owner", "quantization", "createdAt"])
def test_from_json_optional_strings(name: str) -> None:
    with pytest.raises(ManifestError, match=f"manifest field {name!r} must be a string or null"):
        Manifest.from_json(_with(**{name: 5}))


@pytest.mark.parametrize(
    ("files", "tp", "pp", "message"),
    [
        (
            [R0, R1, "model-rank-3-part-0.safetensors"],
            2,
            1,
            "model-rank-3-part-0.safetensors: rank 3 is outside TP 2 x PP 1 "
            "(shards of another parallel size?)",
        ),
        (
            ["model-pp-0-tp-0-part-0.safetensors", "model-pp-0-tp-2-part-0.safetensors"],
            2,
            1,
            "model-pp-0-tp-2-part-0.safetensors: shard of PP rank 0, TP rank 2 is outside "
            "TP 2 x PP 1 (shards of another parallel size?)",
        ),
        (
            # tp index 2 of TP=2 would alias global rank 2 (pp 1, tp 0)
            [
                "model-pp-0-tp-0-part-0.safetensors",
                "model-pp-0-tp-1-part-0.safetensors",
                "model-pp-0-tp-2-part-0.safetensors",
                "model-pp-1-tp-1-part-0.safetensors",
            ],
            2,
            2,
            "model-pp-0-tp-2-part-0.safetensors: shard of PP rank 0, TP rank 2 is outside "
            "TP 2 x PP 2 (shards of another parallel size?)",
        ),
    ],
)
def test_from_json_rejects_ranks_outside_the_world_size(
    files: list[str], tp: int, pp: int, message: str
) -> None:
    text = _with(
        files=[_f(k) for k in files],
        tensorParallelSize=tp,
        pipelineParallelSize=pp,
        totalBytes=_DROP,
    )
    with pytest.raises(ManifestError) as exc:
        Manifest.from_json(text)
    assert str(exc.value) == message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_with(totalBytes="many"), "totalBytes 'many' is not an integer"),
        (_with(totalBytes=None), "totalBytes None is not an integer"),
        (_with(totalBytes=510.0), "totalBytes 510.0 is not an integer"),
        (_with(files=[_f(R0, size=1e400), _f(R1)], totalBytes=_DROP), "size inf is not an integer"),
        (_with(files=[_f(R0, size=True), _f(R1)], totalBytes=_DROP), "size True is not an integer"),
        (_with(tensorParallelSize=1e400), "tensorParallelSize inf is not an integer"),
        (_with(tensorParallelSize=2.5), "tensorParallelSize 2.5 is not an integer"),
        (_with(pipelineParallelSize="1"), "pipelineParallelSize '1' is not an integer"),
        ("[" * 100000 + "]" * 100000, "manifest is not valid JSON: "),
        (b"\xff\xfe", "manifest is not valid JSON: "),
    ],
)
def test_from_json_bad_numbers_raise_manifest_error(text: str, message: str) -> None:
    with pytest.raises(ManifestError) as exc:
        Manifest.from_json(text)
    assert message in str(exc.value)


def test_v1_manifest_reads_as_processed_state_and_rejects_v2_fields() -> None:
    data = _raw()
    data["formatVersion"] = 1
    for k in ("stateFormat", "convertedOn", "sharding", "identity", "verification"):
        data.pop(k)
    m = Manifest.from_json(json.dumps(data))
    assert (m.format_version, m.state_format) == (1, "processed")
    data["stateFormat"] = "raw"
    with pytest.raises(ManifestError, match="unknown field"):
        Manifest.from_json(json.dumps(data))


def test_v2_fields_round_trip_and_are_checked() -> None:
    m = build_manifest(
        [(R0, 5, SHA_A), ("preshard-sharding.json", 7, SHA_C)],
        source_uri="s3://b/m/",
        tensor_parallel_size=1,
        pipeline_parallel_size=1,
        vllm_version="0.32.0",
        converted_on={"platform": "cpu"},
        sharding_key="preshard-sharding.json",
        identity="sha256:" + "d" * 64,
        verification={"engineFree": {"tensors": 3, "matched": True}},
    )
    again = Manifest.from_json(m.to_json())
    assert again == m
    data = json.loads(m.to_json())
    data["stateFormat"] = "prepacked"
    with pytest.raises(ManifestError, match="stateFormat 'prepacked'"):
        Manifest.from_json(json.dumps(data))
    data = json.loads(m.to_json())
    data["sharding"] = {"key": "missing.json"}
    with pytest.raises(ManifestError, match="does not list"):
        Manifest.from_json(json.dumps(data))


# ------------------------------------------------------------------------------ reader bounds


@pytest.mark.parametrize("tp", [10**7, 10**12, 1025])
def test_parallel_sizes_beyond_the_crds_maximum_fail_fast_with_a_short_message(tp: int) -> None:
    import time

    t = time.monotonic()
    with pytest.raises(ManifestError) as exc:
        Manifest.from_json(_with(tensorParallelSize=tp, totalBytes=_DROP))
    assert time.monotonic() - t < 0.5
    assert "at most 1024" in str(exc.value) and len(str(exc.value)) < 200


def test_many_missing_ranks_give_a_short_message() -> None:
    with pytest.raises(ManifestError) as exc:
        Manifest.from_json(_with(tensorParallelSize=1024, pipelineParallelSize=1024))
    msg = str(exc.value)
    assert "(1048574 in all)" in msg and len(msg) < 300  # ranks 0/1 are present


def test_a_manifest_over_the_byte_limit_is_refused_before_parsing() -> None:
    from preshard.core.manifest import MAX_MANIFEST_BYTES

    body = _with().encode()
    padded = b" " * (MAX_MANIFEST_BYTES - len(body) + 1) + body  # valid JSON, 1 byte over
    with pytest.raises(ManifestError, match="larger than 32 MiB"):
        Manifest.from_json(padded)
    Manifest.from_json(padded[1:])  # exactly at the limit: read


def test_too_many_files_are_refused() -> None:
    from preshard.core.manifest import MAX_FILES

    files = [{"key": f"f{i}", "size": 0, "sha256": SHA_A} for i in range(MAX_FILES + 1)]
    with pytest.raises(ManifestError, match=f"at most {MAX_FILES}"):
        Manifest.from_json(_with(files=files, totalBytes=_DROP))


@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        ({"key": "k" * 2_000_000, "size": 1, "sha256": SHA_A}, "longer than 1024 bytes"),
        ({"key": R1, "size": 1, "sha256": "x" * 2_000_000}, "not 64 lowercase hex digits"),
        ({"key": R1, "size": 6 * 2**40, "sha256": SHA_A}, "over 5 TiB"),
        ({"key": R1, "size": "9" * 100_000, "sha256": SHA_A}, "malformed"),
    ],
)
def test_hostile_file_entries_give_short_messages(entry: dict[str, Any], needle: str) -> None:
    with pytest.raises(ManifestError) as exc:
        Manifest.from_json(_with(files=[_f(R0), entry], totalBytes=_DROP))
    assert needle in str(exc.value) and len(str(exc.value)) < 400


def test_hostile_top_level_values_give_short_messages() -> None:
    for text in (
        _with(format="f" * 1_000_000),
        _with(formatVersion="9" * 1_000_000),
        _with(stateFormat="s" * 1_000_000),
        _with(quantization=["q"] * 100_000),
        _with(**{"x" * 1_000_000: 1}),
        "[" * 100_000,
    ):
        with pytest.raises(ManifestError) as exc:
            Manifest.from_json(text)
        assert len(str(exc.value)) < 400, str(exc.value)[:100]
