"""The records at an output prefix and the ownership rules they carry.

A prefix says who owns it in two small objects: ``preshard-manifest.json`` (a complete
checkpoint) and the publication record ``preshard-publish.json`` (:class:`Journal`: an
unfinished publication or purge, and every key it may leave behind). This module reads
them bounded (:func:`read_bounded`: never a whole large object, a body damaged on the
way read again), writes them with their sha256 in the metadata, deletes keys, and
decides whether an owner may write at a prefix (:func:`check_own` for the prefix itself,
:func:`check_neighbours` for checkpoints below or above it). The one publication path
(:class:`~preshard.worker.store.publication.Publication`), ``preshard purge`` and the
step commands (adopt, copy, withdraw) all go through it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import botocore.exceptions

from preshard.core.contract import (
    PUBLICATION_RECORD_NAME as JOURNAL_NAME,
)
from preshard.core.errors import OutputChanged, OutputOwnedByOther, PreshardError, StorageError
from preshard.core.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    Manifest,
    ManifestError,
)
from preshard.core.uris import StorageURI
from preshard.worker.store import s3
from preshard.worker.store.transfer import with_retries

log = logging.getLogger(__name__)

# JOURNAL_NAME (core.contract) is written before a publication changes anything at a
# prefix and removed after its manifest: the owner and every key the publication may
# leave behind (the previous manifest's and its own), so that an interrupted run's
# objects are cleaned up by the next one, and nothing else ever is.
JOURNAL_FORMAT = "preshard.io/publish-journal"


class Unreadable:
    """A manifest or journal that exists but cannot be read (its owner is unknown)."""

    def __init__(self, why: str) -> None:
        self.why = why


@dataclass(frozen=True)
class Journal:
    owner: str | None
    keys: frozenset[str]  # relative to the prefix

    def to_json(self) -> bytes:
        return (
            json.dumps(
                {"format": JOURNAL_FORMAT, "owner": self.owner, "keys": sorted(self.keys)},
                indent=1,
            ).encode()
            + b"\n"
        )

    @classmethod
    def from_json(cls, body: bytes) -> Journal:
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            raise ManifestError("publish journal is not valid JSON") from None
        if not isinstance(data, dict) or data.get("format") != JOURNAL_FORMAT:
            raise ManifestError("not a preshard publish journal")
        owner, keys = data.get("owner"), data.get("keys")
        if owner is not None and not isinstance(owner, str):
            raise ManifestError("publish journal owner is not a string")
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise ManifestError("publish journal keys are not a list of strings")
        return cls(owner, frozenset(keys))


def read_bounded(client: Any, bucket: str, key: str, limit: int) -> bytes:
    """A small object's bytes, reading at most ``limit`` + 1 of them (never a whole large
    object); ManifestError when it is larger. ClientError (404...) propagates.

    A body cut short or damaged on the way (its length, or the sha256 recorded in its
    metadata, does not match) is read again (botocore retries the request itself, not a
    body that breaks while it is read). The one reader of small objects (manifests,
    records, a source's config.json)."""
    return read_bounded_tagged(client, bucket, key, limit)[0]


def read_bounded_tagged(client: Any, bucket: str, key: str, limit: int) -> tuple[bytes, str | None]:
    """:func:`read_bounded`, and the object's ETag (for a conditional write)."""
    attempts = 4
    for attempt in range(1, attempts + 1):
        resp = client.get_object(Bucket=bucket, Key=key)
        body = resp["Body"]
        length = resp.get("ContentLength")
        meta = {k.lower(): v for k, v in (resp.get("Metadata") or {}).items()}
        try:
            if isinstance(length, int) and length > limit:
                raise ManifestError(f"{key} is larger than {limit} bytes")
            # With a known length: read it whole (botocore checks the length); else at
            # most limit + 1 bytes.
            data: bytes = body.read() if isinstance(length, int) else body.read(limit + 1)
            if len(data) > limit:
                raise ManifestError(f"{key} is larger than {limit} bytes")
            want = meta.get("sha256")
            if want and hashlib.sha256(data).hexdigest() != want:
                raise botocore.exceptions.IncompleteReadError(
                    actual_bytes=len(data), expected_bytes=length or len(data)
                )
            etag = resp.get("ETag")
            return data, str(etag) if etag else None
        except (
            botocore.exceptions.ResponseStreamingError,
            botocore.exceptions.IncompleteReadError,
            botocore.exceptions.ReadTimeoutError,
            ConnectionError,
        ) as exc:
            if attempt == attempts:
                raise
            log.info("retrying get %s after %s", key, type(exc).__name__)
            time.sleep(0.2 * attempt)
        finally:
            body.close()
    raise AssertionError("unreachable")  # pragma: no cover


def _get_record(client: Any, bucket: str, key: str, uri: str) -> tuple[bytes, str | None] | None:
    """A manifest's or record's (bytes, ETag), bounded; None when absent; ManifestError
    when too large; any other failure translated."""
    try:
        return read_bounded_tagged(client, bucket, key, MAX_MANIFEST_BYTES)
    except ManifestError:
        raise
    except botocore.exceptions.ClientError as exc:
        if s3.is_not_found(exc):
            return None
        raise s3.translate(exc, uri, "read the manifest of") from None
    except Exception as exc:
        raise s3.translate(exc, uri, "read the manifest of") from None


def _read_record(
    client: Any, bucket: str, key: str, uri: str, parse: Any
) -> Any | Unreadable | None:
    """The parsed manifest/journal at ``key``; None when absent; Unreadable when it
    exists but cannot be parsed (or is too large)."""
    try:
        got = _get_record(client, bucket, key, uri)
        return None if got is None else parse(got[0])
    except ManifestError as exc:
        return Unreadable(str(exc)[:200])


def read_manifest(client: Any, bucket: str, key: str, uri: str) -> Manifest | Unreadable | None:
    result: Manifest | Unreadable | None = _read_record(
        client, bucket, key, uri, Manifest.from_json
    )
    return result


def read_manifest_tagged(
    client: Any, bucket: str, key: str, uri: str
) -> tuple[Manifest | None, bytes, str | None] | None:
    """(the manifest, None when it cannot be parsed or is too large; its bytes; its
    ETag); None when there is none (what adopt, copy and withdraw compare and replace)."""
    body, etag = b"", None
    try:
        got = _get_record(client, bucket, key, uri)
        if got is None:
            return None
        body, etag = got
        return Manifest.from_json(body), body, etag
    except ManifestError as exc:
        log.warning("unreadable manifest %s: %s", key, exc)
        return None, body, etag


def read_journal(client: Any, bucket: str, key: str, uri: str) -> Journal | Unreadable | None:
    result: Journal | Unreadable | None = _read_record(client, bucket, key, uri, Journal.from_json)
    return result


def _same_owner(record: Manifest | Journal | Unreadable, owner: str | None) -> bool:
    """A record at another prefix is ours only when it names exactly our (set) owner."""
    return not isinstance(record, Unreadable) and owner is not None and record.owner == owner


def check_neighbours(
    client: Any, u: StorageURI, listing: dict[str, int], owner: str | None, what: str
) -> None:
    """Refuse (permanent) when a checkpoint (or an unfinished publication) that is not
    ``owner``'s lies below ``u``'s prefix (nested) or above it (``u`` would be inside it).

    The message names the other prefix (in the same bucket, which the caller may use)
    but never the other owner."""
    uri = str(u)
    names = (MANIFEST_NAME, JOURNAL_NAME)
    own = {u.key(n) for n in names}
    for key in sorted(listing):
        if key in own or key.rsplit("/", 1)[-1] not in names:
            continue
        reader = read_manifest if key.endswith(MANIFEST_NAME) else read_journal
        record = reader(client, u.bucket, key, uri)
        if record is not None and not _same_owner(record, owner):
            nested = f"s3://{u.bucket}/{key.rsplit('/', 1)[0]}/"
            raise OutputOwnedByOther(
                f"refusing to {what} {uri}: another owner's checkpoint lies below it, at "
                f"{nested}; preshard never touches another owner's checkpoint (choose a "
                "prefix that contains no other checkpoint)",
            )
    parts = u.prefix.rstrip("/").split("/")[:-1] if u.prefix else []
    ancestors = [""] + ["/".join(parts[: i + 1]) + "/" for i in range(len(parts))]
    for anc in ancestors:
        for name in names:
            reader = read_manifest if name == MANIFEST_NAME else read_journal
            try:
                record = reader(client, u.bucket, anc + name, uri)
            except PreshardError as exc:
                if exc.reason != "AccessDenied":
                    raise
                # Credentials scoped to a prefix may not read its parents: what they
                # cannot read is not a checkpoint they could be asked to respect.
                log.debug("cannot read %s%s (access denied): not checked", anc, name)
                continue
            if record is not None and not _same_owner(record, owner):
                raise OutputOwnedByOther(
                    f"refusing to {what} {uri}: it lies inside another owner's checkpoint at "
                    f"s3://{u.bucket}/{anc}; choose a prefix outside it",
                )


def check_own(
    record: Manifest | Journal | Unreadable | None, owner: str | None, uri: str, what: str
) -> None:
    """The manifest/journal at the prefix itself: refuse when another owner's, or when it
    cannot be read (its owner, and what it lists, are unknown)."""
    if record is None:
        return
    if isinstance(record, Unreadable):
        raise OutputOwnedByOther(
            f"refusing to {what} {uri}: its {MANIFEST_NAME} (or {JOURNAL_NAME}) cannot be "
            f"read ({record.why}), so its owner and objects are unknown; remove it by hand "
            "if it is yours",
        )
    if record.owner is not None and record.owner != owner:
        raise OutputOwnedByOther(
            f"refusing to {what} {uri}: it holds a checkpoint published by another owner; "
            "choose another output prefix (preshard never overwrites or deletes another "
            "owner's checkpoint)",
        )


def put_journal(client: Any, u: StorageURI, journal: Journal) -> None:
    _put_record(client, u, JOURNAL_NAME, journal.to_json(), "put journal")


def delete_one(client: Any, u: StorageURI, name: str, what: str) -> None:
    s3.with_translation(
        lambda: with_retries(lambda: client.delete_object(Bucket=u.bucket, Key=u.key(name)), what),
        str(u),
    )


def put_manifest(
    client: Any,
    u: StorageURI,
    text: str,
    *,
    conditional: bool = False,
    expect_body: bytes | None = None,
    expect_etag: str | None = None,
) -> None:
    """Write the manifest (the one writer of it). A publication writes it last, after
    its own ownership checks (``conditional=False``). ``conditional``: the step commands
    replace a manifest they verified (``expect_body``; None: there must be none): it is
    re-read and compared right before the write, then PUT with If-Match on the ETag
    read (If-None-Match: * for a new one); OutputChanged (permanent, nothing written)
    when it changed. ``expect_etag`` is what the caller read (the re-read's is sent)."""
    if not conditional:
        _put_record(client, u, MANIFEST_NAME, text.encode(), "put manifest")
        return
    uri = str(u)
    key = u.key(MANIFEST_NAME)
    now = read_manifest_tagged(client, u.bucket, key, uri)
    now_body = now[1] if now is not None else None
    if now_body != expect_body:
        raise OutputChanged(
            f"the manifest of {uri} changed while this Job ran; nothing was written",
        )
    body = text.encode()
    md5 = base64.b64encode(hashlib.md5(body).digest()).decode()  # noqa: S324 - Content-MD5
    cond: dict[str, str] = {}
    if expect_body is None:
        cond["IfNoneMatch"] = "*"
    elif now is not None and now[2]:
        cond["IfMatch"] = str(now[2])

    def put(**extra: str) -> Any:
        return client.put_object(
            Bucket=u.bucket,
            Key=key,
            Body=body,
            ContentMD5=md5,
            ContentType="application/json",
            Metadata={"sha256": hashlib.sha256(body).hexdigest()},
            **extra,
        )

    try:
        with_retries(lambda: put(**cond), "put manifest")
    except botocore.exceptions.ClientError as exc:
        code = s3.error_code(exc)
        if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
            raise OutputChanged(
                f"the manifest of {uri} changed while this Job ran; nothing was written",
            ) from None
        if code in ("NotImplemented", "501") and cond:
            with_retries(put, "put manifest")  # a server without conditional writes
        else:
            raise s3.translate(exc, uri, "write the manifest of") from None


def _put_record(client: Any, u: StorageURI, name: str, body: bytes, what: str) -> None:
    """A small JSON object at the prefix, with its Content-MD5 (checked by the server)
    and its sha256 in the object's metadata."""
    md5 = base64.b64encode(hashlib.md5(body).digest()).decode()  # noqa: S324 - Content-MD5
    s3.with_translation(
        lambda: with_retries(
            lambda: client.put_object(
                Bucket=u.bucket,
                Key=u.key(name),
                Body=body,
                ContentMD5=md5,
                ContentType="application/json",
                Metadata={"sha256": hashlib.sha256(body).hexdigest()},
            ),
            what,
        ),
        str(u),
    )


def delete_keys(client: Any, bucket: str, keys: list[str], uri: str) -> int:
    deleted = 0
    for i in range(0, len(keys), 1000):
        batch = keys[i : i + 1000]
        resp = s3.with_translation(
            lambda batch=batch: with_retries(
                lambda: client.delete_objects(
                    Bucket=bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
                ),
                "delete objects",
            ),
            uri,
        )
        errors = resp.get("Errors") or []
        if errors:
            raise StorageError(
                f"could not delete {len(errors)} object(s) under {uri}: "
                f"{s3.scrub(str(errors[0].get('Code')), 100)}",
            )
        deleted += len(batch)
    return deleted
