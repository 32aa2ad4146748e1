"""Re-shard: a published preshard checkpoint read as the ORIGINAL checkpoint's tensors.

A raw preshard checkpoint (``stateFormat: raw``) carries, in ``preshard-sharding.json``,
every write vLLM's weight loaders made into every saved tensor of every rank. A ``copy``
write maps a strided region of one original (source) tensor onto a strided region of a
saved tensor: ``saved.flat[dst] = source.flat[src]``. Inverting the copies rebuilds the
original tensors exactly, so a TP=8 checkpoint can be planned again at TP=4 or TP=4 x
PP=2 without the original and without an engine (issue 20, item 5).

:class:`CheckpointSource` is a ``TensorSource`` (``preshard.worker.sources``):

* ``tensors()``: the original tensors as the sharding metadata recorded them at
  conversion (name, shape, dtype). The metadata keeps no iterator order (its
  ``sources`` are sorted by name): they come in that order, unless an entry carries an
  integer ``index`` (the position in the original weights iterator), which wins.
  ``file`` is the rank file that holds the tensor's first region.
* ``read(name)``: the tensor rebuilt from the rank files. For each copy write that adds
  elements not yet covered, only the byte span of the saved tensor holding that region
  is read (a ranged GET on S3, ``pread`` locally); replicated regions are read once.
* Trust: the manifest is the root. Before a rank file is used, its size and sha256 are
  checked against the manifest (a streaming pass, bounded memory) and its safetensors
  header against the sharding metadata; on S3 every later ranged read is pinned to the
  object that was hashed (``IfMatch`` on its ETag, and the answer's ETag compared, for
  servers that ignore If-Match). The sharding metadata and the config
  files are checked against the manifest too.
* Refused, permanently (``ReshardNotPossible``, exit 3): a checkpoint without raw
  sharding metadata; a source tensor that the copies do not cover entirely (naming the
  first element no rank holds, and saying when a ``derived`` write, a value the loaders
  computed and that cannot be inverted, is the only way it reaches the checkpoint); a
  tensor the model never read (``skippedSources``: not in the checkpoint); a saved
  tensor whose dtype differs from its source's (the conversion changed the values'
  precision: the original cannot be recovered bit for bit, so re-shard from the
  original instead). A rank file that does not match the manifest is
  ``VerificationFailed``.

:func:`resharded_from` is what the conversion records in the new manifest's
``extra.reshardedFrom`` (the origin: its URI and manifest sha256). The objects are read
through ``preshard.worker.sources.ranged`` (a local directory or an S3 prefix, whole or
by range).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from preshard.core.contract import MANIFEST_NAME, SHARDING_NAME, STATE_RAW
from preshard.core.errors import ReshardNotPossible, VerificationFailed
from preshard.core.manifest import Manifest, ManifestError, ManifestFile, manifest_sha256
from preshard.core.sharding import Sharding, ShardingError, numel, parse_document, unravel
from preshard.worker.sources import DTYPE_SIZES, TensorInfo
from preshard.worker.sources.header import ST_TO_TORCH, TORCH_TO_ST
from preshard.worker.sources.ranged import RangeReader, is_checkpoint, reader_for

if TYPE_CHECKING:
    import torch

MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit


@dataclass(frozen=True)
class _Saved:
    file: ManifestFile
    dtype: str  # safetensors dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset of the tensor's data in the file


class CheckpointSource:
    """A published raw checkpoint as a ``TensorSource`` of the original tensors."""

    def __init__(self, uri: str, reader: RangeReader) -> None:
        from preshard.core.manifest import MAX_MANIFEST_BYTES
        from preshard.core.sharding import MAX_DOCUMENT_BYTES

        self.uri, self.reader = uri, reader
        text = reader.read_all(MANIFEST_NAME, MAX_MANIFEST_BYTES)
        if text is None:
            raise ReshardNotPossible(f"{uri} has no {MANIFEST_NAME}: not a published checkpoint")
        try:
            self.manifest = Manifest.from_json(text)
        except ManifestError as exc:
            raise ReshardNotPossible(f"{uri}: {MANIFEST_NAME}: {exc}") from None
        self.manifest_sha256 = manifest_sha256(text)
        m = self.manifest
        if m.state_format != STATE_RAW or not m.sharding_key:
            raise ReshardNotPossible(
                f"{uri} holds {m.state_format} shards without sharding metadata "
                "(formatVersion 1, or saved after vLLM's processing): its tensors cannot be "
                "mapped back to the original checkpoint; convert from the original"
            )
        entry = m.file(m.sharding_key)
        assert entry is not None  # Manifest.from_json checks it is listed
        doc = reader.read_all(entry.key, MAX_DOCUMENT_BYTES)
        if doc is None or len(doc) != entry.size or hashlib.sha256(doc).hexdigest() != entry.sha256:
            raise VerificationFailed(f"{entry.key} does not match the manifest's size and sha256")
        try:
            self.sharding: Sharding = parse_document(doc)
        except ShardingError as exc:
            raise ReshardNotPossible(f"{uri}: {SHARDING_NAME}: {exc}") from None
        if (self.sharding.tensor_parallel_size, self.sharding.pipeline_parallel_size) != (
            m.tensor_parallel_size,
            m.pipeline_parallel_size,
        ):
            raise ReshardNotPossible(f"{uri}: the manifest and the sharding metadata disagree")
        self._writes = self.sharding.writes_by_source()
        self._derived: dict[str, list[str]] = {}
        for rank, tensors in self.sharding.ranks.items():
            for key, t in tensors.items():
                for w in t["writes"]:
                    if w["op"] == "derived":
                        for src in w.get("sources") or []:
                            self._derived.setdefault(str(src), []).append(f"{key}@{rank}")
        self._index: dict[int, dict[str, _Saved]] | None = None
        self._checked: set[str] = set()
        self._lock = threading.Lock()  # readers may run in threads: one header pass, one hash

    # -- the TensorSource protocol ----------------------------------------------------

    def prepare(self, work_dir: Path) -> Path:
        """The checkpoint's config and tokenizer files (the source's non-weight files,
        which conversion copied next to the shards), each checked against the manifest."""
        out = Path(work_dir) / "reshard-source"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        skip = {MANIFEST_NAME, self.manifest.sharding_key}
        for f in self.manifest.other_files():
            if f.key in skip or f.key.startswith("preshard-"):
                continue
            data = self.reader.read_all(f.key, f.size)
            if data is None or len(data) != f.size or hashlib.sha256(data).hexdigest() != f.sha256:
                raise VerificationFailed(f"{f.key} does not match the manifest's size and sha256")
            dest = out / f.key
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
        return out

    def tensors(self) -> list[TensorInfo]:
        order = sorted(
            self.sharding.sources.items(),
            key=lambda kv: (
                (0, kv[1]["index"], kv[0]) if isinstance(kv[1].get("index"), int) else (1, 0, kv[0])
            ),
        )
        out = []
        for name, info in order:
            writes = self._writes.get(name) or []
            file = ""
            if writes:
                rank, key, _ = writes[0]
                file = self._header(rank, key).file.key  # headers only: no file is hashed
            out.append(
                TensorInfo(name, st_dtype(str(info.get("dtype"))), tuple(info["shape"]), file)
            )
        return out

    def read(self, name: str) -> torch.Tensor:
        import torch

        info = self.sharding.sources.get(name)
        if info is None:
            raise ReshardNotPossible(f"{name} is not a tensor of the original checkpoint")
        shape = tuple(int(n) for n in info["shape"])
        dtype = st_dtype(str(info.get("dtype")))
        if dtype not in DTYPE_SIZES or _torch_dtype(dtype) is None:
            raise ReshardNotPossible(f"{name}: unsupported dtype {info.get('dtype')!r}")
        size = numel(shape)
        flat = torch.empty(size, dtype=_torch_dtype(dtype))
        covered = torch.zeros(size, dtype=torch.bool)
        for rank, key, w in self._writes.get(name, []):
            s_off, s_strides, region = w["src"]
            if not numel(region):
                continue
            mask = torch.as_strided(covered, region, s_strides, s_off)
            if bool(mask.all()):
                continue  # replicated: already rebuilt from another rank
            saved = self._saved(rank, key)
            if saved.dtype != dtype:
                raise ReshardNotPossible(
                    f"{name} is {dtype} in the original but saved as {saved.dtype} in {key} "
                    f"(rank {rank}): the conversion changed its precision, so the original "
                    "values cannot be recovered bit for bit; re-shard from the original "
                    "checkpoint instead"
                )
            values = self._region(saved, w["dst"])
            torch.as_strided(flat, region, s_strides, s_off).copy_(values)
            mask.fill_(True)
        if size and not bool(covered.all()):
            i = int(torch.nonzero(~covered)[0].item())
            missing = int((~covered).sum())
            if name in self.sharding.skipped_sources:
                why = "the model never read it (skippedSources), so the checkpoint does not hold it"
            elif name in self._derived:
                why = (
                    "part of it reaches the checkpoint only through values vLLM's weight loaders "
                    f"computed (derived writes in {', '.join(self._derived[name][:3])}), which "
                    "cannot be inverted"
                )
            else:
                why = "the sharding metadata maps it to no rank"
            raise ReshardNotPossible(
                f"cannot rebuild {name} from {self.uri}: element {unravel(i, shape)} "
                f"({missing} of {size} elements) is in no rank file: {why}; re-shard from "
                "the original checkpoint"
            )
        return flat.reshape(shape)

    def close(self) -> None:
        self.reader.close()

    # -- rank files -------------------------------------------------------------------

    def _header(self, rank: int, key: str) -> _Saved:
        with self._lock:
            if self._index is None:
                self._index = self._read_headers()
        saved = self._index.get(rank, {}).get(key)
        if saved is None:
            raise VerificationFailed(f"rank {rank}: {key} is in the sharding metadata, no file")
        return saved

    def _saved(self, rank: int, key: str) -> _Saved:
        """The saved tensor's place, once its file matched the manifest (hashed whole
        before its first use: on S3 a rank file is read twice, once to hash it and once by
        ranges; the price of never using a byte the manifest does not vouch for)."""
        saved = self._header(rank, key)
        with self._lock:
            if saved.file.key not in self._checked:
                size, digest = self.reader.sha256(saved.file.key)
                if size != saved.file.size or digest != saved.file.sha256:
                    raise VerificationFailed(
                        f"{saved.file.key} does not match the manifest (size {size} vs "
                        f"{saved.file.size}, or its sha256 differs): the checkpoint was "
                        "changed after it was published"
                    )
                self._checked.add(saved.file.key)
        return saved

    def _read_headers(self) -> dict[int, dict[str, _Saved]]:
        """Every rank file's safetensors header (two small ranges each), checked against
        the sharding metadata: names, shapes, dtypes, and data inside the file."""
        index: dict[int, dict[str, _Saved]] = {}
        for f in self.manifest.shard_files():
            assert f.rank is not None
            if f.size < 8:
                raise VerificationFailed(f"{f.key} is not a safetensors file")
            (n,) = struct.unpack("<Q", self.reader.read_range(f.key, 0, 8))
            if n > MAX_HEADER_BYTES or 8 + n > f.size:
                raise VerificationFailed(f"{f.key} has a bad safetensors header")
            try:
                header = json.loads(self.reader.read_range(f.key, 8, n))
            except ValueError:
                raise VerificationFailed(f"{f.key} has a bad safetensors header") from None
            listed = self.sharding.ranks.get(f.rank, {})
            if not isinstance(header, dict):
                raise VerificationFailed(f"{f.key} has a bad safetensors header")
            for key, t in header.items():
                if key == "__metadata__":
                    continue
                try:
                    begin, end = (int(x) for x in t["data_offsets"])
                    shape = tuple(int(x) for x in t["shape"])
                    str(t["dtype"])
                except (KeyError, TypeError, ValueError):
                    raise VerificationFailed(f"{f.key}: bad header entry for {key}") from None
                meta = listed.get(key)
                if meta is None:
                    raise VerificationFailed(f"{f.key}: {key} is not in the sharding metadata")
                if list(shape) != list(meta["shape"]) or t["dtype"] != st_dtype(meta["dtype"]):
                    raise VerificationFailed(
                        f"{f.key}: {key} is {t['dtype']}{list(shape)} but "
                        f"{meta['dtype']}{meta['shape']} in the sharding metadata"
                    )
                if (
                    end - begin != numel(shape) * DTYPE_SIZES.get(t["dtype"], 0)
                    or 8 + n + end > f.size
                ):
                    raise VerificationFailed(f"{f.key}: {key} lies outside the file")
                if key in index.setdefault(f.rank, {}):
                    raise VerificationFailed(f"rank {f.rank}: {key} is in two files")
                index[f.rank][key] = _Saved(f, t["dtype"], shape, 8 + n + begin)
        return index

    def _region(self, saved: _Saved, dst: list[Any]) -> torch.Tensor:
        """The values of a strided region of a saved tensor, reading only its byte span."""
        import torch

        d_off, d_strides, region = dst
        first, last = (
            d_off,
            d_off + sum((k - 1) * s for k, s in zip(region, d_strides, strict=True)),
        )
        item = DTYPE_SIZES[saved.dtype]
        data = self.reader.read_range(
            saved.file.key, saved.begin + first * item, (last - first + 1) * item
        )
        with warnings.catch_warnings():  # bytes are read-only: the span is only read
            warnings.simplefilter("ignore", UserWarning)
            span = torch.frombuffer(data, dtype=_torch_dtype(saved.dtype))
        return torch.as_strided(span, region, d_strides, 0)


# ------------------------------------------------------------------------------ helpers


def st_dtype(name: str) -> str:
    """A torch dtype name (the sharding metadata's) as a safetensors dtype."""
    name = name.removeprefix("torch.")
    return TORCH_TO_ST.get(name, name)


def _torch_dtype(st: str) -> Any:
    import torch

    name = ST_TO_TORCH.get(st)
    return None if name is None else getattr(torch, name, None)


def open_checkpoint(
    uri: str, *, endpoint_url: str | None = None, region: str | None = None
) -> CheckpointSource | None:
    """The re-shard source of ``uri`` when it is a published checkpoint (it holds a
    ``preshard-manifest.json``), else None: the caller reads it as a plain model."""
    reader = reader_for(uri, endpoint_url=endpoint_url, region=region)
    if not is_checkpoint(reader):
        reader.close()
        return None
    try:
        return CheckpointSource(uri, reader)
    except BaseException:
        reader.close()
        raise


def resharded_from(source: CheckpointSource) -> dict[str, Any]:
    """``extra.reshardedFrom`` of the re-sharded checkpoint's manifest: where it came from
    (the published checkpoint and its manifest's sha256) and what that was."""
    m = source.manifest
    out: dict[str, Any] = {
        "uri": source.uri,
        "manifestSha256": source.manifest_sha256,
        "tensorParallelSize": m.tensor_parallel_size,
        "pipelineParallelSize": m.pipeline_parallel_size,
        "source": {"uri": m.source_uri, "revision": m.source_revision},
    }
    if m.identity:
        out["identity"] = m.identity
    return out
