"""``hf://org/name[@rev]`` sources: the non-weight files first, then every weight byte by
HTTP range requests on the Hub's ``resolve`` URLs; no weight file ever lands on disk.

The revision is resolved to one commit first (``HfApi.model_info``, as
``storage.fetch_source`` does), and every request names that commit, so the files cannot
change underneath a conversion; ``revision`` is that commit (the manifest records it).
``prepare`` downloads the top-level non-weight files that ``storage.HF_PATTERNS`` select
(config, tokenizer, generation config) with ``hf_hub_download``. Each weight file's
header is read with a range request for its first 64 KiB (and one more for a longer
header); each tensor with one or more range requests straight into its buffer, retried
on transport errors and 5xx/429 (huggingface_hub's ``http_stream_backoff``) and read
again when a body is cut short. ``HF_TOKEN`` authenticates, as for the download path;
huggingface_hub's client drops it on the redirect to the CDN.

Why ranges rather than one weight file at a time on disk: the writer needs tensors in
the rank files' order (safetensors sorts a file's tensors by dtype and name), not in the
source files' order, so a file-at-a-time cache would either download files again and
again or hold most of the checkpoint; a range request reads each byte once and keeps
the disk at the non-weight files.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from preshard.core.errors import InvalidSource, PreshardError, StorageUnavailable
from preshard.core.uris import StorageURI
from preshard.worker.sources import TensorInfo, register_source
from preshard.worker.sources.header import (
    INDEX_NAME,
    header_length,
    index_tensors,
    parse_header,
    to_tensor,
    weight_files,
)

log = logging.getLogger(__name__)

FIRST_READ = 64 * 2**10
META_DIR = "source-meta"
_ATTEMPTS = 3
_CHUNK = 2**20


class HfSource:
    def __init__(self, u: StorageURI, uri: str, pin: str | None = None) -> None:
        from huggingface_hub import HfApi

        from preshard.worker.store import hf as storage

        storage.quiet_hf_client()
        self.uri, self._u = uri, u
        self._token = os.environ.get("HF_TOKEN") or None
        try:
            # pinned: exactly the commit the preflight resolved, never the branch's tip now
            info = HfApi().model_info(
                u.authority, revision=pin or u.revision, token=self._token, files_metadata=True
            )
        except Exception as exc:
            raise self._error(exc) from None
        if pin is not None and info.sha != pin:
            raise storage.source_changed(uri, pin)
        if not info.sha:
            raise StorageUnavailable(f"the Hugging Face Hub returned no commit for {uri}")
        self.revision: str = info.sha
        self._sizes = {
            s.rfilename: int(s.size or 0)
            for s in info.siblings or []
            if "/" not in s.rfilename and storage.hf_wanted(s.rfilename)
        }
        if "config.json" not in self._sizes:
            raise InvalidSource(
                f"source {uri} has no config.json: not a Hugging Face-format model directory",
            )
        index = (
            self._get(INDEX_NAME, 0, self._sizes[INDEX_NAME]) if INDEX_NAME in self._sizes else None
        )
        weights = weight_files(sorted(self._sizes), index)
        if not weights:
            raise InvalidSource(f"source {uri} has no *.safetensors weights")

        def headers(name: str) -> Any:
            size = self._sizes[name]
            head = self._get(name, 0, min(size, 8 + FIRST_READ))
            n = header_length(head[:8], name, size)
            data = head[8 : 8 + n]
            if len(data) < n:
                data += self._get(name, 8 + len(data), 8 + n)
            return parse_header(data, name, size)

        self._where, self._order = index_tensors(uri, ((name, headers(name)) for name in weights))

    def _error(self, exc: BaseException) -> BaseException:
        from preshard.worker.store import hf as storage

        err = storage.hf_error(exc, self.uri, self._u.revision, has_token=self._token is not None)
        return err if err is not None else exc

    def _get(self, name: str, begin: int, end: int, into: memoryview | None = None) -> bytes:
        """Bytes ``begin..end-1`` of the file ``name`` at the resolved commit."""
        from huggingface_hub import constants, hf_hub_url
        from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_stream_backoff

        want = end - begin
        if want <= 0:
            return b""
        url = hf_hub_url(
            self._u.authority, name, revision=self.revision, endpoint=constants.ENDPOINT
        )
        headers = build_hf_headers(token=self._token) | {"Range": f"bytes={begin}-{end - 1}"}
        out = bytearray() if into is None else None
        for attempt in range(1, _ATTEMPTS + 1):
            got = 0
            try:
                with http_stream_backoff(
                    "GET", url, headers=headers, follow_redirects=True, max_retries=2
                ) as resp:
                    hf_raise_for_status(resp)
                    if resp.status_code != 206 and not (begin == 0 and resp.status_code == 200):
                        raise StorageUnavailable(
                            f"source {self.uri}: the Hub ignored a range request for {name}",
                        )
                    for chunk in resp.iter_bytes(_CHUNK):
                        chunk = chunk[: want - got]
                        if into is not None:
                            into[got : got + len(chunk)] = chunk
                        else:
                            assert out is not None
                            out += chunk
                        got += len(chunk)
                        if got >= want:
                            break
                if got == want:
                    return bytes(out) if out is not None else b""
                reason = f"{got} of {want} bytes"
            except PreshardError:
                raise
            except Exception as exc:
                err = self._error(exc)
                if isinstance(err, PreshardError) and err.permanent:
                    raise err from None
                if attempt == _ATTEMPTS:
                    raise err from None
                reason = type(exc).__name__
            if out is not None:
                out.clear()
            if attempt == _ATTEMPTS:
                raise StorageUnavailable(
                    f"source {self.uri}: {name} ended early ({reason})",
                )
            log.info("reading %s again (%s)", name, reason)
            time.sleep(min(2**attempt * 0.25, 4))
        raise AssertionError("unreachable")

    def prepare(self, work_dir: Path) -> Path:
        from huggingface_hub import hf_hub_download

        dest = work_dir / META_DIR
        dest.mkdir(parents=True, exist_ok=True)
        for name in sorted(self._sizes):
            if name.endswith(".safetensors"):
                continue
            try:
                hf_hub_download(
                    self._u.authority,
                    name,
                    revision=self.revision,
                    local_dir=str(dest),
                    token=self._token,
                )
            except Exception as exc:
                raise self._error(exc) from None
        return dest

    def tensors(self) -> list[TensorInfo]:
        return list(self._order)

    def read(self, name: str) -> Any:
        info, begin, end = self._where[name]
        buf = bytearray(end - begin)
        self._get(info.file, begin, end, memoryview(buf))
        return to_tensor(buf, info)

    def close(self) -> None:
        pass


@register_source("hf")
def open_hf(u: StorageURI, uri: str, *, pin: str | None = None, **_: Any) -> HfSource:
    return HfSource(u, uri, pin)
