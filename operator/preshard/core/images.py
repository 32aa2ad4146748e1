"""Container image references: parsing, normalising (Docker Hub's implicit registry and
``library/``) and matching against the pod policy's image allowlist entries
(:mod:`preshard.core.policy`; :class:`preshard.core.config.OperatorConfig` derives its
default allowlist from the converter image here)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE_RE = re.compile(
    rf"^(?P<name>(?:[A-Za-z0-9.-]+(?::[0-9]+)?/)?{_COMPONENT}(?:/{_COMPONENT})*)"
    r"(?::(?P<tag>[\w][\w.-]{0,127}))?"
    r"(?:@(?P<digest>sha256:[a-f0-9]{64}))?$"
)


class ImageRef(NamedTuple):
    repository: str  # with the registry: docker.io/library/python
    tag: str | None
    digest: str | None


def _with_registry(name: str) -> str:
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        return f"{first.lower()}/{rest}"
    return f"docker.io/{name}" if rest else f"docker.io/library/{name}"


def _prefix_entry(entry: str) -> str:
    """``registry/path/`` with the registry made explicit (``library/`` is Docker Hub's)."""
    return _with_registry(entry.rstrip("/") + "/x")[:-1]


def parse_image(ref: str) -> ImageRef | None:
    """A normalised image reference, or None when ``ref`` is not one."""
    m = _IMAGE_RE.match(ref)
    if not m:
        return None
    tag, digest = m["tag"], m["digest"]
    if tag is None and digest is None:
        tag = "latest"
    return ImageRef(_with_registry(m["name"]), tag, digest)


def image_allowed(image: str, allowed: Sequence[str]) -> bool:
    ref = parse_image(image)
    if ref is None:
        return False
    for entry in allowed:
        entry = entry.strip()
        if entry == "*":
            return True
        if entry.endswith("/"):
            if ref.repository.startswith(_prefix_entry(entry)):
                return True
            continue
        want = _IMAGE_RE.match(entry)
        if not want:
            continue
        if _with_registry(want["name"]) != ref.repository:
            continue
        if want["tag"] is None and want["digest"] is None:
            return True  # any tag or digest of this repository
        if want["digest"] is not None:
            if ref.digest == want["digest"]:
                return True
        elif ref.digest is None and ref.tag == want["tag"]:
            return True
    return False


def default_image_allowlist(converter_image: str) -> tuple[str, ...]:
    """The repository of the operator's own converter image (any tag or digest of it)."""
    m = _IMAGE_RE.match(converter_image)
    return (m["name"],) if m else ()
