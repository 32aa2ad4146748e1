"""Publishing checkpoints: the one publication path.

A :class:`Publication` (``publish`` runs all of it at once) checks who owns the output
(:mod:`preshard.worker.store.records`), records what it is about to write, uploads the converted
files resumably (:class:`~preshard.worker.store.transfer.Uploader`), hashing each right before
it goes, possibly while the conversion still verifies them, and writes
``preshard-manifest.json`` LAST, so a prefix with a manifest always describes complete,
verified objects.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

from preshard.core.contract import (
    PUBLICATION_RECORD_NAME as JOURNAL_NAME,
)
from preshard.core.contract import (
    utc_timestamp,
)
from preshard.core.errors import NothingToPublish, PreshardError
from preshard.core.manifest import (
    MANIFEST_NAME,
    Manifest,
    artifact_status,
    build_manifest,
)
from preshard.core.uris import parse_output_uri
from preshard.worker.progress import Reporter
from preshard.worker.store import s3
from preshard.worker.store.records import (
    Journal,
    Unreadable,
    check_neighbours,
    check_own,
    delete_keys,
    delete_one,
    put_journal,
    put_manifest,
    read_journal,
    read_manifest,
)
from preshard.worker.store.transfer import (
    UploadAborted,
    Uploader,
    UploadItem,
    remote_sha256,
    sha256_file,
)
from preshard.worker.store.upload_handle import (
    LocalFile,
    UploadHandle,
    _copy_hashing,
    local_files,
)

log = logging.getLogger(__name__)

# Niceness of a background upload's threads (Publication.start(background=True)).
BACKGROUND_NICE = 19


class Publication:
    """One publication of a local directory at an output prefix, in steps, so that the
    upload can run while the conversion still verifies what it uploads:

    * :meth:`begin`: every ownership check of the prefix (another owner's manifest or
      unfinished publication at it, below it or above it is refused: permanent, nothing
      written), then the publication record ``preshard-publish.json`` (this owner and
      every key this publication may leave behind: its own and those of this owner's
      previous checkpoint) BEFORE any object, then the previous manifest withdrawn;
    * :meth:`start`: the upload, in background threads; each file is hashed right
      before its parts are queued, and an object already there with the same size and
      sha256 is kept (a resumed run sends it no more);
    * :meth:`commit`: wait for the upload, check the prefix again, delete the keys of
      this owner's previous checkpoint that the new one does not list (owner-only: never
      a listing of the prefix), write the manifest LAST (its sha256 in its metadata),
      remove the record;
    * :meth:`abort`: stop the upload (unfinished multipart uploads are aborted) and,
      with ``remove``, delete what this run uploaded that no manifest refers to, and
      rewrite the record to exactly what this owner still has at the prefix.

    :func:`publish` is begin + start + commit. A ``file://`` output copies instead (and
    has no record).
    """

    def __init__(
        self,
        local_dir: Path,
        output_uri: str,
        *,
        owner: str | None = None,
        endpoint_url: str | None = None,
        region: str | None = None,
        concurrency: int = 16,
        part_size: int | None = None,
        fail_after_parts: int | None = None,
    ) -> None:
        self.local_dir = Path(local_dir)
        self.out = parse_output_uri(output_uri, allow_local=True)
        self.uri = str(self.out)
        self.owner = owner
        self.endpoint_url, self.region, self.concurrency = endpoint_url, region, concurrency
        self.part_size, self.fail_after_parts = part_size, fail_after_parts
        self.files: list[LocalFile] = []
        self.handle: UploadHandle | None = None
        self.state = "new"  # begun, started, committed, aborted
        self.removed: list[str] = []  # keys abort deleted
        self.reused: list[str] = []  # keys found in place (not sent again)
        self.note = ""  # abort's sentence for the result message
        self._client: Any = None
        self._settings: s3.S3Settings | None = None
        self._remote: dict[str, int] = {}  # the prefix's listing at begin
        self._previous: set[str] = set()  # keys of this owner's earlier checkpoint/record
        self._journal_keys: frozenset[str] = frozenset()
        self._copied: list[Path] = []  # file:// outputs: what this run wrote
        self._lock = threading.Lock()

    @property
    def local(self) -> bool:
        return self.out.scheme == "file"

    @property
    def journal_keys(self) -> frozenset[str]:
        """The keys the record lists (relative to the prefix)."""
        return self._journal_keys

    # -- begin --------------------------------------------------------------------------
    def begin(self) -> Publication:
        if self.state != "new":
            raise RuntimeError(f"begin() on a publication that is {self.state}")
        paths = local_files(self.local_dir)
        if not paths:
            raise NothingToPublish(
                f"nothing to publish in {self.local_dir}",
            )
        self.files = [
            LocalFile(p.relative_to(self.local_dir).as_posix(), p, p.stat().st_size) for p in paths
        ]
        self._begin_output()
        return self

    def _begin_output(self) -> None:
        """``self.files`` known: a local output loses its manifest; an S3 output gets every
        ownership check and the publication record (``_begin_s3``)."""
        if self.local:
            dest = Path(self.out.path)
            dest.mkdir(parents=True, exist_ok=True)
            (dest / MANIFEST_NAME).unlink(missing_ok=True)
        else:
            self._begin_s3()
        self.state = "begun"

    def _uploader(self, handle: UploadHandle) -> Uploader:
        """The upload thread's Uploader: this publication's client, bucket, concurrency
        and part size, the handle's progress, cancel event and niceness."""
        assert self._settings is not None
        up = Uploader(
            self._client,
            self.out.bucket,
            concurrency=self._settings.concurrency,
            reporter=handle.progress,  # type: ignore[arg-type]
            uri=self.uri,
            **({"part_size": self.part_size} if self.part_size else {}),
        )
        up.cancel = handle.cancel
        up.fail_after_parts = self.fail_after_parts
        up.nice = handle.nice
        handle.uploader = up
        return up

    def _begin_s3(self) -> None:
        out, uri = self.out, self.uri
        self._settings = s3.output_settings(self.endpoint_url, self.region, self.concurrency)
        client = self._client = s3.make_client(self._settings)
        s3.check_bucket(client, out.bucket, uri)
        existing = read_manifest(client, out.bucket, out.key(MANIFEST_NAME), uri)
        journal = read_journal(client, out.bucket, out.key(JOURNAL_NAME), uri)
        check_own(existing, self.owner, uri, "publish to")
        check_own(journal, self.owner, uri, "publish to")
        try:
            self._remote = s3.list_objects(client, out.bucket, out.prefix)
        except Exception as exc:
            raise s3.translate(exc, uri, "list") from None
        check_neighbours(client, out, self._remote, self.owner, "publish to")
        assert not isinstance(existing, Unreadable) and not isinstance(journal, Unreadable)
        if existing is not None and existing.owner == self.owner:
            # only this owner's previous checkpoint: a manifest of nobody (an empty owner,
            # which check_own lets us replace) proves nothing about the objects it lists,
            # so they are never deleted (issue 18: a planted manifest listing another
            # object); the manifest itself is still withdrawn below
            self._previous |= {f.key for f in existing.files}
        if journal is not None:
            self._previous |= journal.keys
        self._journal_keys = frozenset(self._previous | {f.rel for f in self.files})
        # The record first: from here on, whatever this run or the previous checkpoint
        # leaves behind is recorded as this owner's, for the next run or a purge.
        put_journal(client, out, Journal(self.owner, self._journal_keys))
        if existing is not None:
            # Re-publishing: withdraw the old manifest first so the prefix never has a
            # manifest that points at objects being replaced.
            log.info("withdrawing the previous manifest of %s (this owner's)", uri)
            delete_one(client, out, MANIFEST_NAME, "delete old manifest")

    # -- start --------------------------------------------------------------------------
    def start(self, reporter: Reporter | None = None, *, background: bool = False) -> UploadHandle:
        """Start the upload; with ``reporter``, report it as the Uploading stage now
        (else later, from :meth:`UploadHandle.attach`, or not at all). ``background``:
        its threads run at the lowest CPU priority (niceness +19), so that while an
        engine verifies on the same cores (vLLM's CPU backend binds one OpenMP thread to
        each and stalls when one is preempted) the upload only takes idle CPU time."""
        if self.state != "begun":
            raise RuntimeError(f"start() on a publication that is {self.state}")
        run = self._copy_local if self.local else self._upload_s3
        nice = BACKGROUND_NICE if background else 0
        self.handle = UploadHandle(self.files, run, reporter, nice)
        self.state = "started"
        return self.handle

    def _upload_s3(self, handle: UploadHandle) -> list[tuple[str, int, str]]:
        out, client, remote = self.out, self._client, self._remote
        assert self._settings is not None

        def skip(item: UploadItem) -> bool:
            if remote.get(item.key) != item.size:
                return False
            got = remote_sha256(client, out.bucket, item.key)
            if got is None or got[1] != item.sha256:
                return False
            with self._lock:
                self.reused.append(item.key)
            return True

        up = self._uploader(handle)
        up.skip = skip
        done = {
            i.key: i
            for i in up.upload([UploadItem(f.path, out.key(f.rel), f.size) for f in self.files])
        }
        log.info(
            "uploaded %d of %d files to %s (%d bytes; %d bytes already present and verified)",
            len(self.files) - len(self.reused),
            len(self.files),
            self.uri,
            handle.bytes_total - sum(remote.get(k, 0) for k in self.reused),
            sum(remote.get(k, 0) for k in self.reused),
        )
        return [(f.rel, f.size, str(done[out.key(f.rel)].sha256)) for f in self.files]

    def _copy_local(self, handle: UploadHandle) -> list[tuple[str, int, str]]:
        dest = Path(self.out.path)
        results = []
        for f in self.files:
            if handle.cancel.is_set():
                raise UploadAborted("the upload was aborted")
            dst = dest / f.rel
            if f.path.resolve() == dst.resolve():
                sha = sha256_file(f.path)
            else:
                dst.parent.mkdir(parents=True, exist_ok=True)
                with self._lock:
                    self._copied.append(dst)
                sha = _copy_hashing(f.path, dst, handle.cancel)
            handle.progress.advance(f.size)
            results.append((f.rel, f.size, sha))
        return results

    # -- commit -------------------------------------------------------------------------
    def commit(
        self, manifest_fields: dict[str, Any], *, reporter: Reporter | None = None
    ) -> dict[str, Any]:
        """Wait for the upload and publish: the manifest last; returns status.artifact."""
        if self.state == "begun":
            self.start()
        if self.state != "started" or self.handle is None:
            raise RuntimeError(f"commit() on a publication that is {self.state}")
        files = self.handle.wait()
        manifest = build_manifest(
            files, owner=self.owner, created_at=utc_timestamp(), **manifest_fields
        )
        text = manifest.to_json()
        if self.local:
            dest = Path(self.out.path)
            tmp = dest / (MANIFEST_NAME + ".part")
            tmp.write_text(text)
            os.replace(tmp, dest / MANIFEST_NAME)
            self.state = "committed"
            if reporter is not None:
                reporter.done()
            return artifact_status(manifest, str(dest), text) | {
                "uri": str(dest) + "/",
                "manifestUri": str(dest / MANIFEST_NAME),
            }
        self._commit_s3(text)
        self.state = "committed"
        if reporter is not None:
            reporter.done()
            reporter.stage("Published", manifest.total_bytes)
            reporter.advance(manifest.total_bytes)
            reporter.done()
        return artifact_status(manifest, self.uri, text)

    def _commit_s3(self, text: str) -> None:
        out, uri, client = self.out, self.uri, self._client
        # The prefix once more, right before the manifest: another owner may have
        # published at, below or above it while this run uploaded.
        now = read_manifest(client, out.bucket, out.key(MANIFEST_NAME), uri)
        check_own(now, self.owner, uri, "publish to")
        check_own(
            read_journal(client, out.bucket, out.key(JOURNAL_NAME), uri),
            self.owner,
            uri,
            "publish to",
        )
        try:
            listing = s3.list_objects(client, out.bucket, out.prefix)
        except Exception as exc:
            raise s3.translate(exc, uri, "list") from None
        check_neighbours(client, out, listing, self.owner, "publish to")
        # Stale objects: what this owner's previous checkpoint (or unfinished run) wrote
        # and this one does not list. Nothing else, whatever else the prefix holds.
        new_keys = {f.rel for f in self.files}
        stale = sorted(out.key(k) for k in self._previous - new_keys if out.key(k) in listing)
        if stale:
            log.info("deleting %d object(s) of this owner's previous checkpoint", len(stale))
        delete_keys(client, out.bucket, stale, uri)
        mine = self._previous | new_keys | {MANIFEST_NAME, JOURNAL_NAME}
        others = [k for k in listing if k[len(out.prefix) :] not in mine]
        if others:
            log.warning(
                "%s: %d object(s) under the prefix are not this checkpoint's and were left "
                "in place (readers use only what the manifest lists)",
                uri,
                len(others),
            )
        put_manifest(client, out, text)  # the manifest, last
        # Complete: the manifest now lists everything of this owner here.
        delete_one(client, out, JOURNAL_NAME, "delete journal")

    # -- abort --------------------------------------------------------------------------
    def abort(self, *, remove: bool = True) -> str:
        """Stop the upload; with ``remove``, delete what this run uploaded that no
        manifest refers to and rewrite the record to what this owner still has at the
        prefix (deleted when nothing is left). Returns one sentence for the result
        message ("" when nothing had been written). Never raises a storage error: what
        cannot be removed is left unreferenced, and the sentence says so."""
        if self.state in ("new", "committed", "aborted"):
            return self.note
        if self.handle is not None:
            self.handle.stop()
        self.state = "aborted"
        if self.local:
            self.note = self._abort_local(remove)
            return self.note
        up = self.handle.uploader if self.handle is not None else None
        uploaded = sorted(set(up.uploaded_keys)) if up is not None else []
        keep_hint = (
            f"no manifest lists them; {self.uri}{JOURNAL_NAME} does, for the next run to "
            "re-use and for a purge"
        )
        if not remove:
            self.note = (
                f"{len(uploaded)} object(s) uploaded to {self.uri} are left unreferenced "
                f"({keep_hint})"
            )
            log.warning("publication stopped: %s", self.note)
            return self.note
        try:
            self.note = self._remove_uploaded(uploaded)
        except PreshardError as exc:
            self.note = (
                f"{len(uploaded)} object(s) uploaded to {self.uri} could not be removed "
                f"({exc.message}) and are left unreferenced ({keep_hint})"
            )
            log.warning("publication aborted: %s", self.note)
        return self.note

    def _remove_uploaded(self, uploaded: list[str]) -> str:
        out, uri, client = self.out, self.uri, self._client
        current = read_manifest(client, out.bucket, out.key(MANIFEST_NAME), uri)
        if isinstance(current, Unreadable):
            keep = set(uploaded)  # what it lists is unknown: delete nothing
        elif current is not None:
            keep = {out.key(f.key) for f in current.files} & set(uploaded)
        else:
            keep = set()
        doomed = [k for k in uploaded if k not in keep]
        delete_keys(client, out.bucket, doomed, uri)
        self.removed = doomed
        # The record: exactly the keys of this owner still at the prefix (what was there
        # at begin, this owner's earlier checkpoint whose manifest was withdrawn and
        # objects found in place, plus uploads that a manifest now refers to).
        gone = {k[len(out.prefix) :] for k in doomed}
        there = set(self._remote) | set(uploaded)
        # (objects another owner's manifest now refers to are theirs: not recorded)
        left = {k for k in self._journal_keys if out.key(k) in there} - gone
        if isinstance(current, Manifest) and current.owner != self.owner:
            left -= {k[len(out.prefix) :] for k in keep}
        journal = read_journal(client, out.bucket, out.key(JOURNAL_NAME), uri)
        if isinstance(journal, Journal) and journal.owner == self.owner:
            if left:
                put_journal(client, out, Journal(self.owner, frozenset(left)))
            else:
                delete_one(client, out, JOURNAL_NAME, "delete journal")
            self._journal_keys = frozenset(left)
        shown = ", ".join(k[len(out.prefix) :] for k in doomed[:5]) + (
            ", ..." if len(doomed) > 5 else ""
        )
        note = f"removed the {len(doomed)} object(s) this run had uploaded to {uri}"
        if doomed:
            note += f" ({shown})"
        if keep:
            note += f"; kept {len(keep)} that another manifest there refers to"
        if left:
            note += (
                f"; {JOURNAL_NAME} lists the {len(left)} object(s) of this owner still "
                "there, for the next run or a purge"
            )
        log.info("publication aborted: %s", note)
        return note

    def _abort_local(self, remove: bool) -> str:
        if not remove:
            return f"{len(self._copied)} file(s) copied to {self.out.path} are left (no manifest)"
        for p in self._copied:
            p.unlink(missing_ok=True)
        note = f"removed the {len(self._copied)} file(s) this run had copied to {self.out.path}"
        log.info("publication aborted: %s", note)
        return note


def publish(
    local_dir: Path,
    output_uri: str,
    *,
    manifest_fields: dict[str, Any],
    owner: str | None = None,
    endpoint_url: str | None = None,
    region: str | None = None,
    concurrency: int = 16,
    reporter: Reporter | None = None,
    part_size: int | None = None,
    fail_after_parts: int | None = None,
) -> dict[str, Any]:
    """Upload ``local_dir`` to ``output_uri`` with the manifest last; return status.artifact
    (:class:`Publication`'s begin, start and commit).

    Ownership: refuses (permanent, nothing written or deleted) when the prefix holds
    another owner's checkpoint, when one lies below it or when the prefix lies inside
    one. The only objects ever deleted are keys that this owner's previous manifest at
    the prefix listed, or that an unfinished publication of this owner (its record)
    was writing: never the result of listing the prefix. A failure leaves what was
    uploaded in place (listed in the record) for the next run to re-use.
    """
    pub = Publication(
        local_dir,
        output_uri,
        owner=owner,
        endpoint_url=endpoint_url,
        region=region,
        concurrency=concurrency,
        part_size=part_size,
        fail_after_parts=fail_after_parts,
    ).begin()
    pub.start(reporter)
    try:
        return pub.commit(manifest_fields, reporter=reporter)
    except BaseException:
        pub.abort(remove=False)
        raise
