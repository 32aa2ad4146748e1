"""safetensors headers and vLLM's file order, shared by every source (pure, no I/O).

A safetensors file is an 8-byte little-endian header length, a JSON header
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``,
offsets relative to the end of the header) and the data. Sources read the first 8
bytes, then the header, then each tensor by range.

vLLM 0.32's ``DefaultModelLoader`` (load_format safetensors) lists ``*.safetensors`` in
the model directory, keeps only the files ``model.safetensors.index.json`` names (when
there is one), sorts them by a natural sort of the file name
(``weight_utils._natural_sort_key``) and yields each file's tensors in
``safe_open(...).keys()`` order, which is sorted by name. ``tensors()`` of every source
follows that order, so the planner sees the weights as vLLM's iterator hands them out.
"""

from __future__ import annotations

import json
import re
from typing import Any

from preshard.core.errors import InvalidSource, PreshardError
from preshard.worker.sources import DTYPE_SIZES, TensorInfo

INDEX_NAME = "model.safetensors.index.json"
# safetensors refuses headers above 100 MB; so do we (a bounded read of untrusted data).
MAX_HEADER_BYTES = 100_000_000
# torch dtype names (as traces and the sharding metadata record them) <-> safetensors dtypes
TORCH_TO_ST = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "float8_e5m2": "F8_E5M2",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e8m0fnu": "F8_E8M0",
    "int16": "I16",
    "uint16": "U16",
    "float16": "F16",
    "bfloat16": "BF16",
    "int32": "I32",
    "uint32": "U32",
    "float32": "F32",
    "float64": "F64",
    "int64": "I64",
    "uint64": "U64",
}
ST_TO_TORCH = {v: k for k, v in TORCH_TO_ST.items()}


def natural_key(name: str) -> list[Any]:
    """vLLM's ``_natural_sort_key`` (model-00002 before model-00010)."""
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name)]


def weight_files(names: list[str], index: bytes | None) -> list[str]:
    """The weight files vLLM reads, in its order (``names``: the top-level files)."""
    files = [n for n in names if n.endswith(".safetensors") and "/" not in n]
    if index is not None:
        try:
            weight_map = json.loads(index)["weight_map"]
            listed = {str(v) for v in weight_map.values()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise _invalid(f"{INDEX_NAME} is not a valid index: {exc}") from None
        missing = sorted(listed - set(files))
        if missing:
            raise _invalid(f"{INDEX_NAME} names weight files that are missing: {missing[:3]}")
        files = [n for n in files if n in listed]
    return sorted(files, key=natural_key)


def header_length(first8: bytes, file: str, size: int | None = None) -> int:
    if len(first8) < 8:
        raise _invalid(f"{file} is too short to be a safetensors file")
    n = int.from_bytes(first8[:8], "little")
    if n > MAX_HEADER_BYTES or (size is not None and 8 + n > size):
        raise _invalid(f"{file}: header length {n} is not plausible")
    return n


def parse_header(
    data: bytes, file: str, size: int | None = None
) -> list[tuple[TensorInfo, int, int]]:
    """(tensor, begin, end) with absolute byte offsets in the file, sorted by name (the
    order ``safe_open(...).keys()`` gives)."""
    try:
        header = json.loads(data)
    except ValueError as exc:
        raise _invalid(f"{file}: the safetensors header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise _invalid(f"{file}: the safetensors header is not an object")
    base = 8 + len(data)
    out = []
    for name, entry in sorted(header.items()):
        if name == "__metadata__":
            continue
        try:
            dtype = str(entry["dtype"])
            shape = tuple(int(n) for n in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise _invalid(f"{file}: tensor {name}: malformed header entry ({exc})") from None
        if dtype not in DTYPE_SIZES:
            raise _invalid(f"{file}: tensor {name} has the unsupported dtype {dtype}")
        info = TensorInfo(name, dtype, shape, file)
        if end - begin != info.nbytes or begin < 0 or (size is not None and base + end > size):
            raise _invalid(f"{file}: tensor {name}: data offsets {begin}..{end} do not fit")
        out.append((info, base + begin, base + end))
    return out


Located = tuple[TensorInfo, int, int]  # the tensor, its first and last+1 byte in its file


def index_tensors(uri: str, files: Any) -> tuple[dict[str, Located], list[TensorInfo]]:
    """Every source reader's index: ``files`` yields (file name, its parsed header's
    entries) in vLLM's file order; returns name -> where, and the tensors in vLLM's
    iterator order. A tensor in two files is InvalidSource (vLLM would load it twice)."""
    where: dict[str, Located] = {}
    order: list[TensorInfo] = []
    for name, entries in files:
        for info, begin, end in entries:
            if info.name in where:
                raise InvalidSource(
                    f"source {uri}: tensor {info.name} is in both "
                    f"{where[info.name][0].file} and {name}",
                )
            where[info.name] = (info, begin, end)
            order.append(info)
    return where, order


def _invalid(message: str) -> PreshardError:
    return InvalidSource(message)


def to_tensor(buf: Any, info: TensorInfo) -> Any:
    """A CPU tensor of ``info``'s dtype and shape over ``buf`` (a bytearray)."""
    import torch

    dtype = getattr(torch, ST_TO_TORCH[info.dtype])
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(info.shape)
