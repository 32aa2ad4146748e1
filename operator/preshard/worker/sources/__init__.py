"""Tensor sources: what the engine-free converter reads checkpoint tensors from.

This module is the contract between the parts of the engine-free path
(``preshard.worker.planner`` plans each rank's tensors from vLLM's own weight loaders;
``preshard.worker.shardwriter`` streams each rank's files from a ``TensorSource``):

* a ``TensorSource`` presents a checkpoint as named tensors without holding it: their
  dtypes and shapes (from the safetensors headers, read by range), the checkpoint's
  non-weight files in a local directory (config.json, tokenizer, generation config), and
  each tensor's values on request, read by range (local and PVC files, S3 ranged GETs,
  ``hf://`` file by file, or a published preshard checkpoint's rank files through its
  sharding metadata for a re-shard);
* the planner gives, per rank, the same trace document the engine's ``preshard_raw``
  loader writes (``preshard-trace-rank-{rank}.json``: ``writes``, ``sources``,
  ``skippedSources``, ``aliases``, ``rank``, ``tpRank``, ``ppRank``,
  ``tensorParallelSize``, ``pipelineParallelSize``, ``saved`` in file order), so the
  writer and the verifier treat both paths alike.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from preshard.core.errors import InvalidSource

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TensorInfo:
    """One checkpoint tensor, as its safetensors header describes it."""

    name: str
    dtype: str  # safetensors dtype: "BF16", "F16", "F32", "F8_E4M3", "I32", "U8", ...
    shape: tuple[int, ...]
    file: str  # the file (relative to the checkpoint) that holds it

    @property
    def nbytes(self) -> int:
        from preshard.core.sharding import numel

        return numel(self.shape) * DTYPE_SIZES[self.dtype]


DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
    "F8_E8M0": 1, "F4": 1,
}  # fmt: skip


class TensorSource(Protocol):
    """A checkpoint read tensor by tensor, never held whole."""

    uri: str

    def prepare(self, work_dir: Path) -> Path:
        """Copy the non-weight files (config.json, tokenizer, ...) into a local directory
        under ``work_dir`` and return it (the planner builds the model from it)."""
        ...

    def tensors(self) -> list[TensorInfo]:
        """Every checkpoint tensor, in the order vLLM's weights iterator yields them."""
        ...

    def read(self, name: str) -> torch.Tensor:
        """The tensor's values on the CPU, in its own dtype and shape."""
        ...

    def close(self) -> None: ...


# ------------------------------------------------------------------------------ registry
# One module per URI scheme, imported when first used (as vLLM's model-loader registry
# maps a load format to its loader class): ``file``/``pvc`` read local files by offset,
# ``s3`` by ranged GETs, ``hf`` one weight file at a time. A module registers its opener
# with ``register_source``; ``open_source`` picks it by the URI's scheme.
SOURCE_MODULES = {
    "file": "preshard.worker.sources.local",
    "pvc": "preshard.worker.sources.local",
    "s3": "preshard.worker.sources.s3",
    "hf": "preshard.worker.sources.hf",
}
# a published checkpoint at a local, PVC or S3 location is a re-shard source
CHECKPOINT_MODULE = "preshard.worker.sources.checkpoint"
CHECKPOINT_SCHEMES = ("file", "pvc", "s3")
SourceOpener = Callable[..., TensorSource]
_REGISTRY: dict[str, SourceOpener] = {}


def register_source(*schemes: str) -> Callable[[SourceOpener], SourceOpener]:
    """Register ``opener(uri: StorageURI, text: str, **settings) -> TensorSource``."""

    def deco(opener: SourceOpener) -> SourceOpener:
        for scheme in schemes:
            _REGISTRY[scheme] = opener
        return opener

    return deco


def open_source(uri: str, **settings: Any) -> TensorSource:
    """The TensorSource for ``uri`` (``settings``: endpoint_url, region, concurrency,
    work_dir, as the scheme needs them)."""
    from preshard.core.uris import parse_uri

    u = parse_uri(uri, allow_local=True)
    if u.scheme in CHECKPOINT_SCHEMES:
        # A published preshard checkpoint (a manifest at the prefix or in the directory)
        # is read back as the original tensors: the re-shard source, when installed.
        try:
            checkpoint = importlib.import_module(CHECKPOINT_MODULE)
        except ImportError:
            checkpoint = None
        opener = getattr(checkpoint, "open_checkpoint", None)
        if opener is not None:
            found = opener(
                uri, endpoint_url=settings.get("endpoint_url"), region=settings.get("region")
            )
            if found is not None:
                pin = settings.get("pin")
                if pin is not None:
                    _check_checkpoint_pin(u, uri, pin, settings)
                return found  # type: ignore[no-any-return]
    if u.scheme not in _REGISTRY and u.scheme in SOURCE_MODULES:
        importlib.import_module(SOURCE_MODULES[u.scheme])
    opener = _REGISTRY.get(u.scheme)
    if opener is None:
        raise InvalidSource(f"no tensor source for {u.scheme}:// URIs")
    return opener(u, uri, **settings)


def _check_checkpoint_pin(u: Any, uri: str, pin: str, settings: dict[str, Any]) -> None:
    """A published checkpoint read as a source is pinned as any source is (the
    preflight's digest of its top-level objects); its rank files are then held to its
    manifest, and on S3 each range to the hashed object's ETag."""
    from preshard.worker.store import s3
    from preshard.worker.store import source_files as storage

    if u.scheme == "s3":
        client = s3.make_client(
            s3.source_settings(settings.get("endpoint_url"), settings.get("region"), 1)
        )
        storage.check_pin(uri, storage.s3_entries(client, u), pin)
    else:
        storage.check_pin(uri, storage.local_entries(storage.local_source_dir(u, uri)), pin)
