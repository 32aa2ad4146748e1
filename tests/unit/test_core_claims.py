"""Output-prefix ownership between ShardedCheckpoints (preshard.core.claims): claims keyed
by endpoint and bucket, released by a resource that failed without publishing, never held
by a refused one, conflict messages that name no other namespace's resource, the
namespace-to-prefix policy and the purge decision at deletion time."""

from __future__ import annotations

from typing import Any

import pytest

from preshard.core.claims import (
    OutputClaim,
    claim_of,
    claim_strength,
    conflict_message,
    normalize_endpoint,
    preceding_claim,
    prefix_allowed,
    purge_decision,
)

T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T00:00:01Z"


def cond(type_: str, status: str, reason: str) -> dict[str, Any]:
    return {"type": type_, "status": status, "reason": reason, "message": ""}


RUNNING = {"jobName": "j", "phase": "Running", "conditions": [cond("Ready", "False", "Converting")]}
PUBLISHED = {
    "jobName": "j",
    "phase": "Succeeded",
    "artifact": {"uri": "s3://b/p/"},
    "conditions": [cond("Ready", "True", "Published"), cond("Published", "True", "Published")],
}
FAILED = {
    "jobName": "j",
    "phase": "Failed",
    "conditions": [
        cond("Ready", "False", "AccessDenied"),
        cond("Published", "False", "AccessDenied"),
    ],
}


def claim(
    ns: str,
    name: str,
    uri: str,
    status: dict[str, Any] | None = None,
    created: str = T0,
    endpoint: str | None = None,
    default_endpoint: str | None = None,
) -> OutputClaim | None:
    output: dict[str, Any] = {"uri": uri}
    if endpoint:
        output["endpoint"] = endpoint
    return claim_of(
        ns,
        name,
        {"output": output},
        {"uid": f"uid-{ns}-{name}", "creationTimestamp": created},
        status,
        default_endpoint,
    )


def must(c: OutputClaim | None) -> OutputClaim:
    assert c is not None
    return c


def test_who_holds_a_claim() -> None:
    assert claim_strength(RUNNING) == "strong"
    assert claim_strength(PUBLISHED) == "strong"
    assert claim_strength(None) == "weak"  # new: about to get a Job
    waiting = {"phase": "Pending", "conditions": [cond("Ready", "False", "OutputConflict")]}
    assert claim_strength(waiting) == "weak"  # takes its turn when the owner goes
    # released or never held
    assert claim_strength(FAILED) is None
    for reason in ("PolicyViolation", "InvalidSpec", "InvalidURI", "CredentialsSecretNotFound"):
        assert claim_strength({"conditions": [cond("Ready", "False", reason)]}) is None, reason
    # a running conversion whose Secret went missing keeps its claim (it still writes)
    lost_secret = {**RUNNING, "conditions": [cond("Ready", "False", "CredentialsSecretNotFound")]}
    assert claim_strength(lost_secret) == "strong"


def test_a_failed_squatter_releases_the_prefix() -> None:
    # namespace b created first and failed (no access): it must not block namespace a
    squatter = claim("b", "squat", "s3://shared/models/", FAILED, created=T0)
    assert squatter is None
    mine = must(claim("a", "llama", "s3://shared/models/llama/", None, created=T1))
    assert preceding_claim(mine, []) is None
    # while it still ran, it owned the parent prefix
    running = must(claim("b", "squat", "s3://shared/models/", RUNNING, created=T0))
    assert preceding_claim(mine, [running, mine]) == running


def test_claims_are_keyed_by_endpoint_and_bucket() -> None:
    aws = must(claim("a", "x", "s3://models/m/", RUNNING))
    minio = must(claim("b", "y", "s3://models/m/", None, endpoint="http://minio:9000", created=T1))
    assert aws.store == ("", "models") and minio.store == ("http://minio:9000", "models")
    assert preceding_claim(minio, [aws, minio]) is None  # same bucket name, other store
    # the operator's default endpoint is the store of a spec without one
    dflt = must(
        claim("c", "z", "s3://models/m/", None, created=T1, default_endpoint="http://MINIO:9000/")
    )
    assert dflt.store == minio.store
    assert preceding_claim(
        dflt, [aws, must(claim("b", "y", "s3://models/m/", RUNNING, endpoint="http://minio:9000"))]
    )


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("http://minio:9000", "HTTP://Minio:9000/"),
        ("https://s3.example.com", "https://s3.example.com:443"),
        ("http://s3.example.com:80/", "http://s3.example.com"),
    ],
)
def test_one_endpoint_spelled_two_ways_is_one_store(a: str, b: str) -> None:
    assert normalize_endpoint(a) == normalize_endpoint(b)


def test_other_endpoints_are_other_stores() -> None:
    assert normalize_endpoint("http://minio:9000") != normalize_endpoint("http://minio:9001")
    assert normalize_endpoint("http://minio:9000") != normalize_endpoint("https://minio:9000")
    assert normalize_endpoint(None) == normalize_endpoint("") == ""


def test_precedence_strong_then_older_then_uid() -> None:
    older = must(claim("a", "older", "s3://bkt/m/", None, created=T0))
    newer_with_job = must(claim("a", "newer", "s3://bkt/m/tp2/", RUNNING, created=T1))
    # a resource with a Job wins over an older one without
    assert preceding_claim(older, [older, newer_with_job]) == newer_with_job
    assert preceding_claim(newer_with_job, [older, newer_with_job]) is None
    x = must(claim("a", "x", "s3://bkt/m/", None, created=T0))
    y = must(claim("a", "y", "s3://bkt/m/", None, created=T1))
    assert preceding_claim(y, [x, y]) == x and preceding_claim(x, [x, y]) is None
    # nested either way conflicts, siblings do not
    sib = must(claim("a", "sib", "s3://bkt/m2/", RUNNING))
    assert preceding_claim(y, [sib, y]) is None


def test_conflict_messages_never_name_another_namespaces_resource() -> None:
    owner = must(claim("team-b", "secret-project", "s3://shared/models/", RUNNING))
    mine = must(claim("team-a", "llama", "s3://shared/models/llama/", None, created=T1))
    msg = conflict_message(mine, owner)
    assert "secret-project" not in msg and "team-b" not in msg
    assert "another namespace" in msg and "s3://shared/models/llama/" in msg
    # within one namespace the user may learn the name
    same = must(claim("team-a", "first", "s3://shared/models/", RUNNING))
    assert "ShardedCheckpoint first in this namespace" in conflict_message(mine, same)


def test_namespace_prefix_policy() -> None:
    policy = {"team-a": ["s3://models/team-a/"], "*": ["s3://scratch/"]}
    assert prefix_allowed("team-a", "s3://models/team-a/llama/", policy)[0]
    assert not prefix_allowed("team-a", "s3://models/team-b/llama/", policy)[0]
    assert not prefix_allowed("team-a", "s3://models/team-a-evil/", policy)[0]  # not a prefix match
    assert not prefix_allowed("team-a", "s3://models/", policy)[0]  # the parent is not allowed
    assert not prefix_allowed("team-a", "s3://scratch/x/", policy)[0]  # own entry replaces "*"
    assert prefix_allowed("team-c", "s3://scratch/x/", policy)[0]
    assert not prefix_allowed("team-c", "s3://models/team-a/x/", policy)[0]
    assert not prefix_allowed("x", "s3://models/x/", {"team-a": ["s3://models/team-a/"]})[0]
    assert prefix_allowed("x", "s3://anything/x/", {})[0]  # no policy: no restriction


def test_purge_only_by_the_owner_that_did_not_fail_before_publishing() -> None:
    owner = must(claim("a", "owner", "s3://shared/models/team-a/", PUBLISHED))
    # the publisher purges
    assert purge_decision(owner, PUBLISHED, [owner], True).purge
    # deleted while converting: it owns the prefix and purges what it wrote
    running = must(claim("a", "r", "s3://shared/other/", RUNNING))
    assert purge_decision(running, RUNNING, [running], True).purge
    # a resource that waited in conflict on the parent prefix never wrote anything
    waiting_status = {"phase": "Pending", "conditions": [cond("Ready", "False", "OutputConflict")]}
    waiting = must(claim("b", "parent", "s3://shared/models/", waiting_status, created=T1))
    d = purge_decision(waiting, waiting_status, [owner, waiting], True)
    assert not d.purge and "never wrote" in d.why
    # one that waited for its Secret (the old order let it purge the parent prefix)
    nosecret = {
        "phase": "Pending",
        "conditions": [cond("Ready", "False", "CredentialsSecretNotFound")],
    }
    assert claim("b", "p", "s3://shared/models/", nosecret) is None
    assert not purge_decision(None, nosecret, [owner], True).purge
    # failed without publishing: its prefix may already be someone else's
    d = purge_decision(None, FAILED, [owner], True)
    assert not d.purge and "failed before publishing" in d.why
    # lost the prefix to a resource that precedes it (e.g. two Jobs from an older version)
    late = must(claim("b", "late", "s3://shared/models/", PUBLISHED, created=T1))
    d = purge_decision(late, PUBLISHED, [owner, late], True)
    assert not d.purge and "another resource owns" in d.why
    # the namespace may no longer write there
    assert not purge_decision(owner, PUBLISHED, [owner], False).purge
