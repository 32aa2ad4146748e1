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
    is_aws_s3_endpoint,
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


@pytest.mark.parametrize(
    "endpoint",
    [
        "https://s3.us-east-1.amazonaws.com",
        "https://s3.amazonaws.com",
        "s3.amazonaws.com",
        "https://s3.amazonaws.com:443/",
        "http://s3.eu-west-1.amazonaws.com/",
        "https://S3.EU-CENTRAL-1.AMAZONAWS.COM.",
        "https://s3-us-west-2.amazonaws.com",
        "https://s3.dualstack.ap-south-1.amazonaws.com",
        "https://s3-fips.us-east-2.amazonaws.com",
        "https://s3-fips.dualstack.us-east-1.amazonaws.com",
        "https://s3-accelerate.amazonaws.com",
        "https://bucket.vpce-0a1b2c3d-4e5f.s3.us-east-1.vpce.amazonaws.com",
        "https://s3.cn-north-1.amazonaws.com.cn",
    ],
)
def test_every_aws_s3_endpoint_is_the_default_store(endpoint: str) -> None:
    """``https://s3.us-east-1.amazonaws.com`` and no endpoint were two stores,
    so two resources could claim one bucket prefix. S3 bucket names are global: every
    endpoint of S3 itself is one store with the default (more conflicts can only be the
    safe side)."""
    assert is_aws_s3_endpoint(endpoint.split("://")[-1].split(":")[0].rstrip("/"))
    assert normalize_endpoint(endpoint) == normalize_endpoint(None) == ""
    aws = must(claim("a", "x", "s3://models/m/", RUNNING))
    regional = must(claim("b", "y", "s3://models/m/tp2/", None, endpoint=endpoint, created=T1))
    assert regional.store == aws.store
    assert preceding_claim(regional, [aws, regional]) == aws
    # and the operator's default endpoint spelled as a regional one
    dflt = must(claim("c", "z", "s3://models/m/", None, created=T1, default_endpoint=endpoint))
    assert dflt.store == aws.store


@pytest.mark.parametrize(
    "endpoint",
    [
        "https://s3x.amazonaws.com",  # not a label of S3's
        "https://ec2.us-east-1.amazonaws.com",
        "https://s3.amazonaws.com.evil.example",
        "https://amazonaws.com",
        "https://s3.example.com",
        "http://minio:9000",
        "https://storage.googleapis.com",
    ],
)
def test_hosts_that_only_look_like_s3_are_other_stores(endpoint: str) -> None:
    assert normalize_endpoint(endpoint) != ""


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


# ---------------------------------------------------------- a Job left Pending holds no prefix

H0, H_HALF, H2 = "2026-01-01T00:00:00Z", "2026-01-01T00:30:00Z", "2026-01-01T02:00:00Z"


def pending_job(reason: str = "JobPending", phase: str = "Pending", **extra: Any) -> dict[str, Any]:
    return {
        "jobName": "j",
        "phase": phase,
        "conditions": [
            {**cond("Ready", "False", reason), "lastTransitionTime": H0},
            {**cond("JobCreated", "True", "JobCreated"), "lastTransitionTime": H0},
            {**cond("Converting", "False", reason), "lastTransitionTime": H0},
        ],
        **extra,
    }


@pytest.mark.parametrize(
    "status",
    [
        pending_job(),
        pending_job("Unschedulable"),
        pending_job("PodWaiting"),
        # a ResourceQuota that admits no pod: the Job controller still sets startTime, so
        # the Job looks Running; no pod ever logged progress
        pending_job("Converting", phase="Running", startTime=H0),
        # a step (the preflight, an adopt or copy) whose Job never ran
        {
            "phase": "Pending",
            "decision": {"startedAt": H0, "step": "Preflight", "jobName": "p"},
            "conditions": [cond("Ready", "False", "Preflight")],
        },
    ],
)
def test_a_job_never_seen_running_holds_a_strong_claim_only_for_a_while(status: dict) -> None:
    squatter = must(claim("b", "squat", "s3://shared/models/", status, created=T0))
    assert squatter.strength == "strong" and squatter.pending_since == H0
    newer = must(claim("a", "llama", "s3://shared/models/llama/", None, created=T1))
    # within the grace it holds the prefix (its pod may start any moment) ...
    assert preceding_claim(newer, [squatter, newer], now=H_HALF) == squatter
    assert preceding_claim(squatter, [squatter, newer], now=H_HALF) is None
    # ... after PENDING_CLAIM_SECONDS it ranks after every claim that has not lapsed,
    # so it keeps nobody out; in its own view it still holds (it follows its own Job)
    assert squatter.lapsed(H2) and not squatter.lapsed(H_HALF)
    assert preceding_claim(newer, [squatter, newer], now=H2) is None
    assert preceding_claim(squatter, [squatter, newer], now=H2) is None
    # without a clock: the old ranking (strong first)
    assert preceding_claim(newer, [squatter, newer]) == squatter


@pytest.mark.parametrize(
    "status",
    [
        pending_job("Converting", phase="Running", progress={"stage": "Downloading"}),
        {**PUBLISHED, "conditions": [*PUBLISHED["conditions"], pending_job()["conditions"][1]]},
        {**pending_job(), "path": "Copied"},
    ],
)
def test_a_claim_seen_writing_never_lapses(status: dict) -> None:
    holder = must(claim("b", "holder", "s3://shared/models/", status, created=T0))
    assert holder.strength == "strong" and holder.pending_since == ""
    newer = must(claim("a", "llama", "s3://shared/models/llama/", None, created=T1))
    assert not holder.lapsed("2030-01-01T00:00:00Z")
    assert preceding_claim(newer, [holder, newer], now="2030-01-01T00:00:00Z") == holder


def test_a_lapsed_claim_blocks_no_newcomer_but_a_fresh_one_does() -> None:
    a = must(claim("x", "a", "s3://bkt/p/", pending_job(), created=T0))
    fresh = {**pending_job(), "conditions": [
        {**c, "lastTransitionTime": "2026-01-01T01:45:00Z"} for c in pending_job()["conditions"]
    ]}  # fmt: skip
    b = must(claim("y", "b", "s3://bkt/p/q/", fresh, created=T1))
    c = must(claim("z", "c", "s3://bkt/p/q/r/", None, created=T1))
    assert preceding_claim(c, [a, b, c], now=H2) == b  # b's Job is 15 minutes old
    assert preceding_claim(b, [a, b, c], now=H2) is None  # a lapsed
    assert a.rank("not a time") == a.rank()  # an unreadable clock never lapses a claim
