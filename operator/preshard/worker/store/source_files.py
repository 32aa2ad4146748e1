"""A source's files, as every reader of a source sees them: a ``file://`` or ``pvc://``
directory after checking that it is a model directory that reaches nothing outside
itself (``local_source_dir``, ``check_model_dir``); the top-level objects of an ``s3://``
prefix (``list_source``, the one listing, and ``list_source_files``); the pin of a
source's content (``local_entries``/``s3_entries`` -> ``core.identity.files_digest``) and
the SourceChanged refusal; the marker of what a download directory holds.

Fetching is :mod:`preshard.worker.store.fetch`'s (``hf://``: :mod:`.hf`); the tensor
sources of the engine-free path (``preshard.worker.sources``) use the same checks.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from preshard.core.contract import (
    OTHER_WEIGHT_SUFFIXES,
    PVC_MOUNT_ROOT,
    SAFETENSORS_SUFFIX,
)
from preshard.core.contract import PUBLICATION_RECORD_NAME as JOURNAL_NAME
from preshard.core.errors import InvalidSource, PreshardError, SourceChanged, SourceNotFound
from preshard.core.uris import StorageURI, check_file_name
from preshard.worker.store import s3

log = logging.getLogger(__name__)

# A source needs safetensors weights; weights in other formats are never downloaded.
WEIGHT_SUFFIXES = (SAFETENSORS_SUFFIX,)
SKIPPED_SUFFIXES = OTHER_WEIGHT_SUFFIXES


def pvc_mount_root() -> Path:
    return Path(os.environ.get("PRESHARD_PVC_MOUNT_ROOT", PVC_MOUNT_ROOT))


def check_model_dir(path: Path, uri: str) -> None:
    if not path.is_dir():
        raise SourceNotFound(
            f"source {uri} does not exist (no directory {path})",
        )
    if not (path / "config.json").is_file():
        raise InvalidSource(
            f"source {uri} has no config.json: not a Hugging Face-format model directory",
        )
    if not any(p.suffix in WEIGHT_SUFFIXES for p in path.iterdir()):
        raise InvalidSource(f"source {uri} has no *.safetensors weights")


def check_links(path: Path, uri: str, root: Path | None = None) -> None:
    """Refuse a local source that reaches outside itself through a symbolic link.

    ``root`` (the volume's mount) must contain ``path`` once resolved. Inside ``path``,
    links are resolved and checked (not followed blindly): a link whose target stays in
    the source directory is fine (vLLM and the copy read the target); one that leaves it
    (``NOTICE.txt -> /proc/self/environ``, ``../other``) or dangles is refused, so no file
    outside the source can be read, copied or published.
    """
    real = path.resolve()
    if root is not None and not real.is_relative_to(root.resolve()):
        raise InvalidSource(
            f"source {uri} is a symbolic link to a directory outside its volume; preshard "
            "never follows links out of a source",
        )
    if not real.is_dir():
        return  # check_model_dir reports it
    for p in sorted(real.iterdir()):
        if not p.is_symlink():
            continue
        try:
            target = p.resolve(strict=True)
        except (OSError, RuntimeError):
            target = None
        if target is None or not target.is_relative_to(real):
            log.warning(
                "refusing source %s: %s is a symbolic link outside the source directory",
                uri,
                p.name,
            )
            raise InvalidSource(
                f"source {uri}: {p.name} is a symbolic link to a path outside the source "
                "directory (or a dangling one); preshard never follows links out of a "
                "source: replace it with the file itself",
            )


def local_source_dir(u: StorageURI, uri: str) -> Path:
    """The directory of a ``file://`` (local path) or ``pvc://`` source, after
    ``check_links``: refused (InvalidSource) when it, or a link in it, leads outside the
    volume or the directory. Every reader of a local source (convert, verify --against,
    the preflight's digest) goes through this one function."""
    if u.scheme == "file":
        path = Path(u.path).resolve()
        check_links(path, uri)
        return path
    if u.scheme != "pvc":
        raise ValueError(f"not a local source: {u.scheme}")
    path = pvc_mount_root() / u.authority / u.path
    check_links(path, uri, root=pvc_mount_root() / u.authority)
    return path


# ------------------------------------------------------------------ the source's pin
# One digest of a source's content, computed by the preflight (which reports it) and by
# every reader that must read exactly that content (convert, the adopt/copy check):
# core.identity.files_digest over (name, size, ETag) of the top-level objects of an s3://
# prefix, over (name, size, sha256) of the top-level files of a PVC or local directory.


def local_entries(path: Path) -> list[tuple[str, int, str]]:
    """(name, size, sha256) of a directory's top-level files (dotfiles aside)."""
    from preshard.worker.store.transfer import sha256_file

    return [
        (p.name, p.stat().st_size, sha256_file(p))
        for p in sorted(path.iterdir())
        if p.is_file() and not p.name.startswith(".")
    ]


def s3_entries(client: object, u: StorageURI) -> list[tuple[str, int, str]]:
    """(name, size, ETag) of an s3:// prefix's top-level objects (raises the client's
    errors: the caller translates them)."""
    entries: list[tuple[str, int, str]] = []
    pages = client.get_paginator("list_objects_v2").paginate(  # type: ignore[attr-defined]
        Bucket=u.bucket, Prefix=u.prefix
    )
    for page in pages:
        for obj in page.get("Contents", []) or []:
            name = obj["Key"][len(u.prefix) :]
            if name and "/" not in name:
                entries.append((name, int(obj["Size"]), str(obj.get("ETag", "")).strip('"')))
    return entries


def source_changed(uri: str, pin: str) -> PreshardError:
    return SourceChanged(
        f"the source {uri} changed since the operator's preflight pinned it ({pin[:19]}...): "
        "preshard converts (and checks against) exactly the content it pinned; apply the "
        "resource again to convert the new content",
    )


def check_pin(uri: str, entries: list[tuple[str, int, str]], pin: str | None) -> None:
    """SourceChanged (permanent) when the source's files do not have the pinned digest."""
    from preshard.core.identity import files_digest

    if pin is not None and files_digest(entries) != pin:
        raise source_changed(uri, pin)


def list_source(client: object, u: StorageURI, uri: str) -> list[tuple[str, int, str]]:
    """(name, size, ETag) of the top-level objects of an ``s3://`` source, the one
    listing of an S3 source (the preflight's pin, the fetch, the tensor source):
    SourceNotFound for a missing bucket or an empty prefix; other failures translated."""
    try:
        entries = s3_entries(client, u)
    except Exception as exc:
        err = s3.translate(exc, uri, "read the source")
        if err.reason == "BucketNotFound":
            err = SourceNotFound(
                f"source {uri} does not exist (no bucket {u.bucket!r})",
            )
        raise err from None
    if not entries:
        raise _empty(uri)
    return entries


def _empty(uri: str) -> PreshardError:
    return SourceNotFound(
        f"source {uri} does not exist or is empty (no objects under the prefix)",
    )


def list_source_files(client: object, u: StorageURI, uri: str) -> dict[str, int]:
    """name -> size of the top-level objects of an ``s3://`` source (``list_source``; its
    publication record aside): InvalidSource for a name no model file can have."""
    files = {name: size for name, size, _ in list_source(client, u, uri)}
    for name in sorted(files):
        why = check_file_name(name)
        if why is not None:
            shown = name if len(name) <= 60 else name[:60] + "..."
            raise InvalidSource(
                f"source {uri}: the object {u.prefix}{shown} {why}; it cannot be a model file "
                "(rename or remove it)",
            )
    files.pop(JOURNAL_NAME, None)
    if not files:
        raise _empty(uri)
    return files


def claim_dest(dest: Path, identity: str) -> None:
    """Empty ``dest`` unless it holds (part of) this very source, so that neither a resumed
    download nor huggingface_hub's fallbacks can mix in files of another source (a reused
    --work-dir). The marker lives next to dest: a dest that is not empty makes
    snapshot_download return it as is when the Hub fails."""
    marker = dest.parent / f".{dest.name}.preshard-source"
    want = identity.rstrip("\n") + "\n"
    try:
        have = marker.read_text()
    except OSError:
        have = ""
    if have != want and dest.exists():
        log.info("removing %s: it holds files of another source or revision", dest)
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(want)


def resolved_revision(dest: Path) -> str | None:
    """The commit an ``hf://`` source in ``dest`` was downloaded at (its marker), if any."""
    try:
        identity = (dest.parent / f".{dest.name}.preshard-source").read_text().strip()
    except OSError:
        return None
    if not identity.startswith("hf ") or "@" not in identity:
        return None
    return identity.rpartition("@")[2] or None
