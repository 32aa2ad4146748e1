"""Output-prefix ownership between ShardedCheckpoints (pure policy, no I/O).

Every checkpoint whose output is an S3 prefix may *claim* it. Claims are keyed by the
store (the endpoint, normalised; ``""`` for AWS S3) and the bucket, so the same bucket
name on two endpoints never conflicts and two spellings of one endpoint always do. Two
claims conflict when one prefix contains the other (nested either way).

Who holds a claim (:func:`claim_strength`):

* a resource with a conversion Job (``status.jobName``) that has not failed without
  publishing: a *strong* claim (it writes, or wrote, the prefix);
* a resource without a Job that may still get one (no status yet, or waiting for the
  prefix: ``OutputConflict``): a *weak* claim, ranked by creation time, so waiting
  resources take turns instead of racing when the owner goes;
* nobody else: a resource that failed without publishing (its ``Published`` condition is
  False), one refused by the spec checks or the operator's policy, or one waiting for its
  credentials Secret holds nothing, so it can never squat another tenant's prefix.

Precedence: strong before weak, then the older creationTimestamp, then the uid (one
second resolution). Messages about a conflict name the other resource only when it is in
the same namespace (a tenant learns nothing about other namespaces).

The namespace-to-prefix policy (:func:`prefix_allowed`), the decision whether a
deletion may run a purge Job (:func:`purge_decision`) and whether a Job of this
resource's name is this resource's (:func:`job_owned_by`) live here too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple
from urllib.parse import urlsplit

from preshard.core.errors import InvalidURI
from preshard.core.naming import ANNOTATION_OWNER_UID
from preshard.core.uris import parse_output_uri, parse_uri

Strength = Literal["strong", "weak"]

# Ready reasons of a resource without a Job that holds no claim: refused for good until
# its spec changes, or waiting for its own Secret (it may never get one).
NO_CLAIM_REASONS = frozenset(
    {
        "InvalidSpec",
        "InvalidURI",
        "PolicyViolation",
        "CredentialsSecretNotFound",
        # the preflight found the prefix is not this resource's to write
        "OutputOwnedByOther",
        "OutputOverlapsCheckpoint",
        "OutputHasUnreadableManifest",
        # refused before any Job (accelerator and memory preflight checks)
        "UnsupportedQuantization",
        "InsufficientCPU",
        "InsufficientMemory",
        "InvalidModelConfig",
    }
)


def store_key(endpoint: str | None, bucket: str) -> tuple[str, str]:
    """(normalised endpoint, bucket): ``HTTP://Minio:9000/`` and ``http://minio:9000``
    are one store; no endpoint (AWS S3) is ``""``."""
    return (normalize_endpoint(endpoint), bucket)


def is_aws_s3_endpoint(host: str) -> bool:
    """A host of Amazon S3 itself: under ``amazonaws.com`` (or ``amazonaws.com.cn``), with
    a label ``s3`` or one starting with ``s3-`` (regional, legacy dash-regional,
    dualstack, FIPS, accelerate, access points, VPC endpoints)."""
    labels = host.lower().rstrip(".").split(".")
    if labels[-1] == "cn":
        labels = labels[:-1]
    if len(labels) < 3 or labels[-2:] != ["amazonaws", "com"]:
        return False
    return any(label == "s3" or label.startswith("s3-") for label in labels[:-2])


def normalize_endpoint(endpoint: str | None) -> str:
    """One key per store. Any endpoint of Amazon S3 itself (``s3.amazonaws.com``,
    ``s3.us-east-1.amazonaws.com``, ``s3-us-west-2.amazonaws.com``,
    ``s3.dualstack.eu-west-1.amazonaws.com``, FIPS, with or without a scheme, port or
    trailing slash) is the default store ``""``: S3 bucket names are one namespace for
    every region, so those are one store (``.cn`` and GovCloud are separate namespaces;
    counting them as the same store can only add a conflict, never hide one). Other
    endpoints: scheme, lowercase host, port unless the scheme's default, path without a
    trailing slash."""
    if not endpoint:
        return ""
    text = endpoint.strip()
    if "://" not in text:
        text = "https://" + text  # a bare host (botocore needs a scheme; AWS hosts may come bare)
    try:
        parts = urlsplit(text)
        host = (parts.hostname or "").lower().rstrip(".")
        port = parts.port
    except ValueError:
        return endpoint.strip().rstrip("/").lower()
    if is_aws_s3_endpoint(host):
        return ""
    scheme = parts.scheme.lower()
    default = {"http": 80, "https": 443}.get(scheme)
    netloc = host if port in (None, default) else f"{host}:{port}"
    path = parts.path.rstrip("/")
    return f"{scheme}://{netloc}{path}"


# How long a strong claim may rest on a step or Job of this resource that the operator
# has not seen write anything (a Job whose pod never started: JobPending, Unschedulable,
# PodWaiting, a ResourceQuota that admits no pod). After that it ranks below every
# claim that has not lapsed, so a Job left Pending on purpose cannot hold a prefix
# (docs/security.md, "Output claims").
PENDING_CLAIM_SECONDS = 3600


class OutputClaim(NamedTuple):
    """One resource's claim on an output prefix."""

    endpoint: str  # normalised (store_key)
    bucket: str
    prefix: str
    strength: Strength
    created: str
    uid: str
    namespace: str
    name: str
    # a strong claim the operator has not yet seen write (its step or conversion Job has
    # not run): since when ("" when it has been seen writing, or for a weak claim)
    pending_since: str = ""

    @property
    def store(self) -> tuple[str, str]:
        return (self.endpoint, self.bucket)

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def lapsed(self, now: str | None) -> bool:
        """A strong claim whose step has not been seen writing for PENDING_CLAIM_SECONDS."""
        if now is None or self.strength != "strong" or not self.pending_since:
            return False
        since, at = _parse_time(self.pending_since), _parse_time(now)
        if since is None or at is None:
            return False
        return (at - since).total_seconds() > PENDING_CLAIM_SECONDS

    def rank(self, now: str | None = None) -> tuple[int, str, str]:
        """Strong before weak, then older, then uid; with ``now``, a lapsed strong claim
        after both."""
        level = 2 if self.lapsed(now) else 0 if self.strength == "strong" else 1
        return (level, self.created, self.uid)

    def overlaps(self, other: OutputClaim) -> bool:
        return self.store == other.store and (
            self.prefix.startswith(other.prefix) or other.prefix.startswith(self.prefix)
        )


def _condition(status: Mapping[str, Any], type_: str) -> Mapping[str, Any]:
    for c in status.get("conditions") or []:
        if isinstance(c, Mapping) and c.get("type") == type_:
            return c
    return {}


def failed_without_publishing(status: Mapping[str, Any] | None) -> bool:
    """The conversion finished without a checkpoint (Published=False)."""
    return _condition(status or {}, "Published").get("status") == "False"


def _parse_time(text: str) -> datetime | None:
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (ValueError, TypeError):
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def seen_writing(status: Mapping[str, Any] | None) -> bool:
    """Whether the operator has observed this resource's own work reach its prefix: a
    published, adopted or copied checkpoint (Published=True, ``status.path``, an artifact), or a
    conversion pod that ran the worker (a progress record from its log). A Job that
    exists but whose pod never started is not, nor is the Job's ``Running`` phase (the
    Job controller sets startTime and counts a pod as active before it is scheduled or
    while a ResourceQuota admits none)."""
    status = status or {}
    if status.get("path") or status.get("artifact") or status.get("progress"):
        return True
    return _condition(status, "Published").get("status") == "True"


def pending_since(status: Mapping[str, Any] | None) -> str:
    """Since when a strong claim has rested on work not yet seen writing: the conversion
    Job's creation (its JobCreated condition) or the start of the steps (the step
    record's ``status.decision.startedAt``); "" when it was seen writing or no time is known."""
    status = status or {}
    if seen_writing(status):
        return ""
    if status.get("jobName"):
        since = _condition(status, "JobCreated").get("lastTransitionTime")
        if isinstance(since, str) and since:
            return since
    record = status.get("decision")  # the step record
    if isinstance(record, Mapping) and isinstance(record.get("startedAt"), str):
        return str(record["startedAt"])
    return ""


def claim_strength(status: Mapping[str, Any] | None) -> Strength | None:
    """Whether (and how strongly) a resource in this state holds its output prefix."""
    status = status or {}
    if status.get("jobName"):
        return None if failed_without_publishing(status) else "strong"
    if _condition(status, "Ready").get("reason") in NO_CLAIM_REASONS:
        return None
    if status.get("decision") or status.get("path"):
        # a preflight/adopt/copy step has acted on the prefix, or the checkpoint is there
        return None if failed_without_publishing(status) else "strong"
    if status.get("phase") == "Failed":
        return None
    return "weak"


def claim_of(
    namespace: str,
    name: str,
    spec: Mapping[str, Any] | None,
    meta: Mapping[str, Any] | None,
    status: Mapping[str, Any] | None,
    default_endpoint: str | None,
) -> OutputClaim | None:
    """The claim of a resource as the watch shows it (None: it holds none)."""
    out_spec = (spec or {}).get("output") or {}
    if not isinstance(out_spec, Mapping):
        return None
    try:
        out = parse_output_uri(str(out_spec.get("uri", "")))
    except InvalidURI:
        return None
    strength = claim_strength(status)
    if strength is None:
        return None
    endpoint = out_spec.get("endpoint") or default_endpoint
    meta = meta or {}
    return OutputClaim(
        endpoint=normalize_endpoint(str(endpoint) if endpoint else None),
        bucket=out.bucket,
        prefix=out.prefix,
        strength=strength,
        created=str(meta.get("creationTimestamp") or ""),
        uid=str(meta.get("uid") or ""),
        namespace=namespace,
        name=name,
        pending_since=pending_since(status) if strength == "strong" else "",
    )


def preceding_claim(
    me: OutputClaim, claims: Iterable[OutputClaim], now: str | None = None
) -> OutputClaim | None:
    """The claim that overlaps ours and precedes it (the owner), if any. With ``now``,
    other resources' strong claims that lapsed (their step or Job not seen writing for
    PENDING_CLAIM_SECONDS) rank after every claim that has not: they no longer keep
    anyone from the prefix. Our own claim never lapses in our own view, so a resource
    whose Job waits long keeps following it (if two Jobs end up writing overlapping
    prefixes, the publication rules let only one publish: docs/security.md)."""
    mine = me.rank()
    owners = [c for c in claims if c.uid != me.uid and c.overlaps(me) and c.rank(now) < mine]
    return min(owners, key=lambda c: c.rank(now)) if owners else None


def conflict_message(me: OutputClaim, owner: OutputClaim) -> str:
    """What a user may learn about the owner: its name only within the same namespace."""
    who = (
        f"ShardedCheckpoint {owner.name} in this namespace"
        if owner.namespace == me.namespace
        else "a ShardedCheckpoint in another namespace"
    )
    return (
        f"output {me.uri} overlaps an output prefix already used by {who} (the same prefix, "
        "or one containing or inside it); choose another spec.output.uri (this resource "
        "starts once that prefix is released)"
    )


# ------------------------------------------------------------- namespace prefix policy


def prefix_allowed(
    namespace: str, uri: str, policy: Mapping[str, Sequence[str]]
) -> tuple[bool, tuple[str, ...]]:
    """Whether ``namespace`` may write ``uri`` under the namespace-to-prefix policy
    (namespace, or ``*`` for every other namespace, to a list of ``s3://bucket/prefix/``).
    An empty policy allows everything. Returns (allowed, the prefixes that apply)."""
    if not policy:
        return True, ()
    prefixes = tuple(policy.get(namespace, policy.get("*", ())))
    out = parse_uri(uri)
    for p in prefixes:
        allowed = parse_uri(p)
        if allowed.bucket == out.bucket and out.prefix.startswith(allowed.prefix):
            return True, prefixes
    return False, prefixes


# -------------------------------------------------------------------------- deletion


class PurgeDecision(NamedTuple):
    purge: bool
    why: str


def purge_decision(
    me: OutputClaim | None,
    status: Mapping[str, Any] | None,
    claims: Iterable[OutputClaim],
    namespace_allowed: bool,
) -> PurgeDecision:
    """Whether deleting a ``deletionPolicy: Delete`` resource may run a purge Job, decided
    again at deletion time from what the resource did and what it holds now:

    * it must hold a strong claim on its prefix (it had a conversion Job and did not fail
      without publishing: a failed resource's prefix may already be another's),
    * no other claim may precede it (it did not lose the prefix to another resource),
    * its namespace must still be allowed to write the prefix.

    The purge Job itself (``preshard purge --owner``) deletes only what this owner
    published; this check keeps it from even starting for a resource that never owned
    the prefix."""
    if not namespace_allowed:
        return PurgeDecision(False, "the namespace may not write this output prefix")
    if me is None or me.strength != "strong":
        if failed_without_publishing(status):
            return PurgeDecision(False, "the conversion failed before publishing anything")
        return PurgeDecision(False, "this resource never wrote to its output prefix")
    owner = preceding_claim(me, claims)
    if owner is not None:
        return PurgeDecision(False, "another resource owns the output prefix")
    return PurgeDecision(True, "")


# ------------------------------------------------------------------------------ jobs


def job_owned_by(job: Mapping[str, Any], uid: str) -> bool:
    """Whether a Job found under this resource's Job name belongs to the resource of
    ``uid`` (an ownerReference, or the owner annotation preshard writes); a Job of
    another resource or another tool under that name is never adopted."""
    meta = job.get("metadata") or {}
    return any(r.get("uid") == uid for r in meta.get("ownerReferences") or []) or (
        (meta.get("annotations") or {}).get(ANNOTATION_OWNER_UID) == uid
    )
