"""The objects of a published checkpoint against its manifest: each one read back in
full, its size and sha256 compared (integrity is checked by preshard itself, never
delegated to the object store)."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from preshard.core.errors import PreshardError
from preshard.core.manifest import Manifest
from preshard.core.uris import StorageURI
from preshard.worker.store import s3
from preshard.worker.store.transfer import with_retries


@dataclass
class FileCheck:
    key: str
    size: int
    ok: bool
    problem: str = ""


def check_object(client: Any, u: StorageURI, key: str, size: int, sha: str) -> FileCheck:
    def run_once() -> FileCheck:
        try:
            resp = client.get_object(Bucket=u.bucket, Key=u.key(key))
        except s3.ClientError as exc:
            if s3.is_not_found(exc):
                return FileCheck(key, size, False, "missing")
            raise
        h = hashlib.sha256()
        n = 0
        for chunk in resp["Body"].iter_chunks(chunk_size=2**20):
            h.update(chunk)
            n += len(chunk)
        if n != size:
            return FileCheck(key, size, False, f"size {n} != manifest {size}")
        if h.hexdigest() != sha:
            return FileCheck(key, size, False, "sha256 mismatch (object changed or corrupted)")
        return FileCheck(key, size, True)

    result: FileCheck = with_retries(run_once, f"verify {key}")
    return result


def check_objects(client: Any, u: StorageURI, files: Any, concurrency: int = 8) -> list[FileCheck]:
    """Every listed object read back in full, its size and sha256 against the manifest's
    (the one such loop: ``preshard verify``, adopt and copy)."""
    try:
        with ThreadPoolExecutor(max_workers=max(1, min(concurrency, 8))) as pool:
            return list(pool.map(lambda f: check_object(client, u, f.key, f.size, f.sha256), files))
    except PreshardError:
        raise
    except Exception as exc:
        raise s3.translate(exc, str(u), "verify") from None


def verify_objects(client: Any, u: StorageURI, man: Manifest, concurrency: int = 8) -> list[str]:
    """The problems of ``check_objects`` over every object ``man`` lists ("key: problem")."""
    return [
        f"{c.key}: {c.problem}"
        for c in check_objects(client, u, man.files, concurrency)
        if not c.ok
    ]
