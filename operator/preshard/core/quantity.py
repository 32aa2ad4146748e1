"""Kubernetes resource quantities ("5Gi", "500M", "1073741824") as integers."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_SUFFIX = {
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
}
QUANTITY_RE = re.compile(r"^(?P<num>[0-9]+(\.[0-9]+)?)(?P<suffix>Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$")
# Same rule for the CRD schema.
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$"
# Any non-negative Kubernetes resource quantity (cpu "500m", memory "400Gi", "1e3"):
# Kubernetes' grammar without a sign.
RESOURCE_QUANTITY_RE = re.compile(
    r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?[0-9]+)?$"
)


def parse_bytes(value: str | int) -> int:
    """Parse a byte quantity; raise ValueError with the accepted forms."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a byte quantity")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value} is negative")
        return value
    m = QUANTITY_RE.match(str(value).strip())
    if not m:
        raise ValueError(f"{value!r} is not a quantity such as 5Gi, 512Mi or 1073741824")
    try:
        num = Decimal(m["num"])
    except InvalidOperation as exc:  # pragma: no cover - regex guarantees a number
        raise ValueError(f"{value!r} is not a number") from exc
    return int(num * _SUFFIX[m["suffix"] or ""])


def format_bytes(n: int) -> str:
    """Human-readable binary size: 1536 -> '1.5 KiB'."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover
