"""Output-prefix precedence between ShardedCheckpoints (handlers.checkpoint.output_owner)."""

from __future__ import annotations

from preshard.core.spec import parse_spec
from preshard.handlers.checkpoint import OutputClaim, output_owner


def spec(output: str):  # type: ignore[no-untyped-def]
    return parse_spec(
        {
            "source": {"uri": "s3://models/llama/"},
            "tensorParallelSize": 2,
            "output": {"uri": output},
        }
    )


def claim(prefix: str, uid: str, created: str = "2026-01-01T00:00:00Z", claimed: bool = False):  # type: ignore[no-untyped-def]
    return OutputClaim(prefix=prefix, claimed=claimed, created=created, uid=uid, ref=f"ns/{uid}")


def index(*claims: OutputClaim) -> dict[str, list[OutputClaim]]:
    return {"bkt": list(claims)}


def test_a_resource_with_a_job_wins_over_an_older_timestamp_tie() -> None:
    # same creationTimestamp (one-second resolution): the one that has a Job owns the prefix,
    # whatever the uids say
    first = claim("model/", "zzz", claimed=True)
    second = claim("model/tp2/", "aaa")
    assert output_owner(spec("s3://bkt/model/tp2/"), second, index(first, second)) == "ns/zzz"
    assert output_owner(spec("s3://bkt/model/"), first, index(first, second)) is None


def test_unclaimed_resources_are_ordered_by_creation_then_uid() -> None:
    older = claim("m/", "b", created="2026-01-01T00:00:00Z")
    newer = claim("m/", "a", created="2026-01-01T00:00:01Z")
    assert output_owner(spec("s3://bkt/m/"), newer, index(older, newer)) == "ns/b"
    assert output_owner(spec("s3://bkt/m/"), older, index(older, newer)) is None
    tie_a, tie_b = claim("m/", "a"), claim("m/", "b")
    assert output_owner(spec("s3://bkt/m/"), tie_b, index(tie_a, tie_b)) == "ns/a"
    assert output_owner(spec("s3://bkt/m/"), tie_a, index(tie_a, tie_b)) is None


def test_disjoint_prefixes_and_other_buckets_do_not_conflict() -> None:
    a = claim("model-a/", "a", claimed=True)
    b = claim("model-b/", "b")
    assert output_owner(spec("s3://bkt/model-b/"), b, index(a, b)) is None
    assert output_owner(spec("s3://other/model-a/"), b, {"other": [b]}) is None
    # nested either way is a conflict
    outer = claim("x/", "o", claimed=True)
    inner = claim("x/y/", "i")
    assert output_owner(spec("s3://bkt/x/y/"), inner, index(outer, inner)) == "ns/o"
