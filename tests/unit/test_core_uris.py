"""preshard.core.uris: parsing, normalisation, overlap and the CRD regexes."""

from __future__ import annotations

import re

import pytest

from preshard.core.errors import InvalidURI, SpecError
from preshard.core.uris import (
    OUTPUT_URI_PATTERN,
    SOURCE_URI_PATTERN,
    StorageURI,
    parse_output_uri,
    parse_uri,
)

UNSUPPORTED = "expected s3://bucket/prefix/, pvc://claim/path or hf://org/name[@rev]"


# ------------------------------------------------------------------------------ s3


@pytest.mark.parametrize(
    ("uri", "bucket", "prefix", "text"),
    [
        ("s3://models/llama/tp8/", "models", "llama/tp8/", "s3://models/llama/tp8/"),
        ("s3://models/llama/tp8", "models", "llama/tp8/", "s3://models/llama/tp8/"),
        ("s3://models/llama//", "models", "llama/", "s3://models/llama/"),
        ("s3://models", "models", "", "s3://models/"),
        ("s3://models/", "models", "", "s3://models/"),
        ("s3://my.bucket-1/a/b.c/", "my.bucket-1", "a/b.c/", "s3://my.bucket-1/a/b.c/"),
        ("  s3://abc/x/  ", "abc", "x/", "s3://abc/x/"),
        ("s3://" + "a" * 63 + "/k", "a" * 63, "k/", "s3://" + "a" * 63 + "/k/"),
    ],
)
def test_parse_s3(uri: str, bucket: str, prefix: str, text: str) -> None:
    u = parse_uri(uri)
    assert u == StorageURI("s3", bucket, prefix)
    assert (u.scheme, u.bucket, u.prefix, u.revision) == ("s3", bucket, prefix, None)
    assert str(u) == text
    # Normalisation is idempotent.
    assert parse_uri(str(u)) == u


@pytest.mark.parametrize(
    "uri",
    [
        "s3://AB/x",  # uppercase bucket
        "s3://Models/x",
        "s3://ab/x",  # bucket shorter than 3
        "s3://" + "a" * 64 + "/x",  # bucket longer than 63
        "s3://-bucket/x",
        "s3://bucket-/x",
        "s3://bucket_1/x",
        "s3://bucket/with space",
        "s3://",
        "s3:///key",
    ],
)
def test_parse_s3_rejects_bad_buckets(uri: str) -> None:
    with pytest.raises(InvalidURI) as exc:
        parse_uri(uri)
    assert str(exc.value) == (
        f"{uri!r} is not a valid S3 URI: expected s3://bucket/prefix/ with a bucket name of "
        "3-63 lowercase letters, digits, dots or hyphens"
    )
    assert exc.value.reason == "InvalidURI"
    assert exc.value.permanent is True


@pytest.mark.parametrize(
    ("uri", "key"),
    [
        ("s3://bucket/a//b/", "a//b"),
        ("s3://bucket/a/./b", "a/./b"),
        ("s3://bucket/a/../b/", "a/../b"),
        ("s3://bucket/..", ".."),
    ],
)
def test_parse_s3_rejects_empty_dot_and_dotdot_segments(uri: str, key: str) -> None:
    with pytest.raises(InvalidURI) as exc:
        parse_uri(uri)
    assert str(exc.value) == f"S3 prefix {key!r} has an empty, '.' or '..' segment"


def test_s3_helpers() -> None:
    u = parse_uri("s3://models/llama")
    assert u.key("preshard-manifest.json") == "llama/preshard-manifest.json"
    assert u.child("model-rank-0-part-0.safetensors") == (
        "s3://models/llama/model-rank-0-part-0.safetensors"
    )
    root = parse_uri("s3://models")
    assert root.key("x") == "x"
    assert root.child("x") == "s3://models/x"


# ----------------------------------------------------------------------------- pvc


@pytest.mark.parametrize(
    ("uri", "claim", "path", "text"),
    [
        ("pvc://models/llama/70b", "models", "llama/70b", "pvc://models/llama/70b"),
        ("pvc://models/llama/70b/", "models", "llama/70b", "pvc://models/llama/70b"),
        ("pvc://models", "models", "", "pvc://models"),
        ("pvc://models/", "models", "", "pvc://models"),
        ("pvc://model-store.v1/a", "model-store.v1", "a", "pvc://model-store.v1/a"),
        ("pvc://models/a//b/./c", "models", "a/b/c", "pvc://models/a/b/c"),
        ("pvc://models/a/../b", "models", "b", "pvc://models/b"),
        # '..' is resolved against the volume root: the path cannot leave the volume.
        ("pvc://models/../../etc/passwd", "models", "etc/passwd", "pvc://models/etc/passwd"),
    ],
)
def test_parse_pvc(uri: str, claim: str, path: str, text: str) -> None:
    u = parse_uri(uri)
    assert u == StorageURI("pvc", claim, path)
    assert str(u) == text
    assert ".." not in u.path.split("/")


@pytest.mark.parametrize("uri", ["pvc://Models/x", "pvc://-models/x", "pvc://models-/x", "pvc://"])
def test_parse_pvc_rejects_bad_claims(uri: str) -> None:
    with pytest.raises(InvalidURI) as exc:
        parse_uri(uri)
    assert str(exc.value) == (
        f"{uri!r} is not a valid PVC URI: expected pvc://claim-name/path/in/volume "
        "(claim name: lowercase DNS-1123)"
    )


def test_pvc_has_no_bucket() -> None:
    with pytest.raises(ValueError, match=r"^pvc://models/x is not an s3:// URI$"):
        _ = parse_uri("pvc://models/x").bucket


# ------------------------------------------------------------------------------ hf


@pytest.mark.parametrize(
    ("uri", "repo", "revision", "text"),
    [
        (
            "hf://meta-llama/Llama-3.1-70B-Instruct@main",
            "meta-llama/Llama-3.1-70B-Instruct",
            "main",
            "hf://meta-llama/Llama-3.1-70B-Instruct@main",
        ),
        # No revision: None (the worker's default branch), not "main".
        ("hf://org/name", "org/name", None, "hf://org/name"),
        (
            "hf://Org_1/na.me-2@refs/pr/1",
            "Org_1/na.me-2",
            "refs/pr/1",
            "hf://Org_1/na.me-2@refs/pr/1",
        ),
        ("hf://org/name@" + "a" * 40, "org/name", "a" * 40, "hf://org/name@" + "a" * 40),
    ],
)
def test_parse_hf(uri: str, repo: str, revision: str | None, text: str) -> None:
    u = parse_uri(uri)
    assert u == StorageURI("hf", repo, "", revision)
    assert str(u) == text


@pytest.mark.parametrize(
    "uri",
    [
        "hf://org",
        "hf://org/",
        "hf://org/name/extra",
        "hf://-org/name",
        "hf://org/name@",
        "hf://org/na me",
    ],
)
def test_parse_hf_rejects_bad_repos(uri: str) -> None:
    with pytest.raises(InvalidURI) as exc:
        parse_uri(uri)
    assert str(exc.value) == (
        f"{uri!r} is not a valid Hugging Face URI: expected hf://org/name or hf://org/name@revision"
    )


# ----------------------------------------------------------------- scheme / local


@pytest.mark.parametrize(
    "uri", ["gs://bucket/x", "https://example.com/m", "/models/x", "models", "S3://b/x"]
)
def test_unsupported_schemes(uri: str) -> None:
    with pytest.raises(InvalidURI) as exc:
        parse_uri(uri)
    assert str(exc.value) == f"{uri!r} has an unsupported scheme: {UNSUPPORTED}"


@pytest.mark.parametrize("uri", ["", "   ", None, 3])
def test_empty_or_non_string(uri: object) -> None:
    with pytest.raises(InvalidURI) as exc:
        parse_uri(uri)  # type: ignore[arg-type]
    assert str(exc.value) == f"URI is empty; {UNSUPPORTED}"


@pytest.mark.parametrize(
    ("uri", "path"),
    [
        ("/abs/dir", "/abs/dir"),
        ("file:///abs/dir", "/abs/dir"),
        ("./rel", "./rel"),
        ("../up", "../up"),
    ],
)
def test_local_paths_only_when_allowed(uri: str, path: str) -> None:
    u = parse_uri(uri, allow_local=True)
    assert u == StorageURI("file", "", path)
    assert str(u) == path
    with pytest.raises(InvalidURI, match="unsupported scheme"):
        parse_uri(uri)


def test_relative_name_without_dot_is_not_local() -> None:
    with pytest.raises(InvalidURI) as exc:
        parse_uri("models/x", allow_local=True)
    assert str(exc.value) == f"'models/x' has an unsupported scheme: {UNSUPPORTED} or a local path"


# -------------------------------------------------------------------------- output


def test_parse_output_uri_accepts_s3_prefixes() -> None:
    assert parse_output_uri("s3://out/llama/tp8") == StorageURI("s3", "out", "llama/tp8/")


@pytest.mark.parametrize("uri", ["s3://out", "s3://out/", "s3://out//"])
def test_parse_output_uri_rejects_bucket_roots(uri: str) -> None:
    with pytest.raises(InvalidURI) as exc:
        parse_output_uri(uri)
    assert str(exc.value) == (
        f"output {uri!r} is a bucket root: give a prefix such as s3://out/models/name/ "
        "(a checkpoint is the prefix that holds its manifest)"
    )


@pytest.mark.parametrize(("uri", "scheme"), [("pvc://claim/x", "pvc"), ("hf://org/name", "hf")])
def test_parse_output_uri_rejects_non_s3(uri: str, scheme: str) -> None:
    with pytest.raises(InvalidURI) as exc:
        parse_output_uri(uri)
    assert str(exc.value) == f"output {uri!r} must be an s3:// prefix (got {scheme}://)"
    assert isinstance(exc.value, SpecError)


def test_parse_output_uri_local_only_when_allowed() -> None:
    assert parse_output_uri("/tmp/out", allow_local=True) == StorageURI("file", "", "/tmp/out")
    with pytest.raises(InvalidURI, match="unsupported scheme"):
        parse_output_uri("/tmp/out")


# ------------------------------------------------------------------------- overlap


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("s3://b1x/a/", "s3://b1x/a/", True),
        ("s3://b1x/a/", "s3://b1x/a", True),
        ("s3://b1x/a/", "s3://b1x/a/b/", True),
        ("s3://b1x/a/b/", "s3://b1x/a/", True),
        ("s3://b1x/a/", "s3://b1x/ab/", False),  # a string prefix is not a key prefix
        ("s3://b1x/a/", "s3://b1x/b/", False),
        ("s3://b1x/a/", "s3://b2x/a/", False),
        ("s3://b1x/", "s3://b1x/anything/", True),
        ("pvc://c/a", "pvc://c/a", False),
        ("s3://b1x/a/", "hf://org/a", False),
    ],
)
def test_overlaps(a: str, b: str, expected: bool) -> None:
    ua, ub = parse_uri(a), parse_uri(b)
    assert ua.overlaps(ub) is expected
    assert ub.overlaps(ua) is expected


# ------------------------------------------------------------ CRD regex agreement


SOURCE_SAMPLES = [
    "s3://models/llama/",
    "s3://models",
    "s3://AB/x",
    "s3://ab/x",
    "s3://bucket/with space",
    "pvc://models/llama",
    "pvc://models",
    "pvc://Models/x",
    "hf://org/name",
    "hf://org/name@refs/pr/1",
    "hf://org",
    "hf://org/name/extra",
    "gs://bucket/x",
    "/abs/path",
    "",
]


@pytest.mark.parametrize("uri", SOURCE_SAMPLES)
def test_source_pattern_agrees_with_parser(uri: str) -> None:
    try:
        parse_uri(uri)
        accepted = True
    except InvalidURI:
        accepted = False
    assert bool(re.match(SOURCE_URI_PATTERN, uri)) is accepted


OUTPUT_SAMPLES = [
    "s3://out/llama/tp8/",
    "s3://out/llama",
    "s3://out",
    "s3://out/",
    "s3://OUT/x",
    "pvc://claim/x",
    "hf://org/name",
    "s3://out/a b",
]


@pytest.mark.parametrize("uri", OUTPUT_SAMPLES)
def test_output_pattern_agrees_with_parser(uri: str) -> None:
    try:
        parse_output_uri(uri)
        accepted = True
    except InvalidURI:
        accepted = False
    assert bool(re.match(OUTPUT_URI_PATTERN, uri)) is accepted


# ---------------------------------------------------------------------- hostile input

SECRET = "hunter2-s3cr3t"


@pytest.mark.parametrize(
    "url",
    [
        f"http://user:{SECRET}@minio:9000",
        f"http://{SECRET}@minio:9000/path",
        f"https://{SECRET}:@[bad",
        f"http://{SECRET}@[bad",
    ],
)
def test_endpoints_with_user_info_are_refused_without_echoing_it(url: str) -> None:
    from preshard.core.uris import check_endpoint

    with pytest.raises(InvalidURI) as exc:
        check_endpoint(url)
    assert "user name or password" in str(exc.value)
    assert SECRET not in str(exc.value) and "user:" not in str(exc.value)
    assert exc.value.permanent


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("http://[bad", "malformed"),
        ("http://minio:99999", "malformed"),
        ("ftp://minio", "http:// or https://"),
        ("minio:9000", "http:// or https://"),
        ("http://", "no host"),
        ("http://a b", "whitespace"),
    ],
)
def test_malformed_endpoints_are_refused(url: str, needle: str) -> None:
    from preshard.core.uris import check_endpoint

    with pytest.raises(InvalidURI, match=needle):
        check_endpoint(url)


@pytest.mark.parametrize(
    "url", ["http://minio.storage:9000", "https://s3.eu-west-1.amazonaws.com", "http://[::1]:9/x"]
)
def test_good_endpoints_pass(url: str) -> None:
    from preshard.core.uris import check_endpoint

    assert check_endpoint(url) == url


def test_spec_and_operator_config_refuse_endpoints_with_user_info() -> None:
    import re

    from preshard.core.config import OperatorConfig
    from preshard.core.errors import SpecError
    from preshard.core.spec import ENDPOINT_PATTERN, parse_spec

    url = f"http://admin:{SECRET}@minio:9000"
    spec = {
        "source": {"uri": "hf://org/model", "endpoint": url},
        "tensorParallelSize": 1,
        "output": {"uri": "s3://bucket/models/x/", "endpoint": url},
    }
    with pytest.raises(SpecError) as exc:
        parse_spec(spec)
    assert "user name or password" in str(exc.value) and SECRET not in str(exc.value)
    assert "admin" not in str(exc.value)
    # The CRD's pattern (admission) refuses it too, so it is never stored.
    assert not re.match(ENDPOINT_PATTERN, url)
    assert re.match(ENDPOINT_PATTERN, "http://minio.storage:9000/")
    with pytest.raises(ValueError) as err:
        OperatorConfig.from_env({"PRESHARD_S3_ENDPOINT": url})
    assert SECRET not in str(err.value) and "admin" not in str(err.value)


@pytest.mark.parametrize("name", [".", "..", "", "a/b", "a\\b", "a\0b", "x" * 256])
def test_object_names_that_are_not_file_names(name: str) -> None:
    from preshard.core.uris import check_file_name

    assert check_file_name(name) is not None


def test_ordinary_object_names_are_file_names() -> None:
    from preshard.core.uris import check_file_name

    for name in ("config.json", ".gitattributes", "x" * 255, "tokenizer (1).json"):
        assert check_file_name(name) is None


def test_a_very_long_prefix_is_a_short_clear_error() -> None:
    with pytest.raises(InvalidURI) as exc:
        parse_uri("s3://bucket/" + "a" * 5000 + "/")
    assert "too long" in str(exc.value) and len(str(exc.value)) < 300
    parse_uri("s3://bucket/" + "a" * 700 + "/")
