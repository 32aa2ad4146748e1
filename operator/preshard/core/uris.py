"""Storage URIs: ``s3://bucket/prefix/``, ``pvc://claim/path``, ``hf://org/name[@rev]``
and, for the command line only, local paths (``/abs/dir`` or ``file:///abs/dir``)."""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from preshard.core.errors import InvalidURI

Scheme = Literal["s3", "pvc", "hf", "file"]

# S3 bucket naming rules (3-63 chars, lowercase letters, digits, dots, hyphens).
_BUCKET = r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]"
# DNS-1123 subdomain (PVC names).
_CLAIM = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
_HF_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_HF_REV = r"[A-Za-z0-9][A-Za-z0-9._/-]{0,199}"

S3_RE = re.compile(rf"^s3://(?P<bucket>{_BUCKET})(/(?P<key>[^\s]*))?$")
PVC_RE = re.compile(rf"^pvc://(?P<claim>{_CLAIM})(/(?P<path>[^\s]*))?$")
HF_RE = re.compile(rf"^hf://(?P<org>{_HF_PART})/(?P<name>{_HF_PART})(@(?P<rev>{_HF_REV}))?$")

# The same rules as regexes for the CRD's openAPIV3Schema ``pattern`` (kept here so the
# schema and the operator cannot drift; a unit test compares them with the CRD).
SOURCE_URI_PATTERN = rf"^(s3://{_BUCKET}(/[^\s]*)?|pvc://{_CLAIM}(/[^\s]*)?|hf://{_HF_PART}/{_HF_PART}(@{_HF_REV})?)$"
OUTPUT_URI_PATTERN = rf"^s3://{_BUCKET}/[^\s]*[^\s/][^\s]*$"

# S3 keys are at most 1024 bytes: a prefix leaves room for the file names under it.
MAX_PREFIX_BYTES = 768
# A file name (one path segment) on a local file system.
MAX_NAME_BYTES = 255


def _short(text: str, limit: int = 80) -> str:
    """``text`` for an error message: at most ``limit`` characters (repr'd)."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} chars)"


@dataclass(frozen=True)
class StorageURI:
    scheme: Scheme
    # s3: bucket; pvc: claim; hf: "org/name"; file: "" (unused)
    authority: str
    # s3: key prefix ("" or ending in "/"); pvc/file: path; hf: ""
    path: str
    # hf only: the revision ("main" when omitted)
    revision: str | None = None

    @property
    def bucket(self) -> str:
        if self.scheme != "s3":
            raise ValueError(f"{self} is not an s3:// URI")
        return self.authority

    @property
    def prefix(self) -> str:
        """S3 key prefix, "" or ending in "/"."""
        return self.path

    def key(self, name: str) -> str:
        """The object key of ``name`` under this prefix."""
        return f"{self.path}{name}"

    def child(self, name: str) -> str:
        return f"{self}{name}" if str(self).endswith("/") else f"{self}/{name}"

    def __str__(self) -> str:
        if self.scheme == "s3":
            return f"s3://{self.authority}/{self.path}"
        if self.scheme == "pvc":
            return f"pvc://{self.authority}/{self.path}".rstrip("/")
        if self.scheme == "hf":
            rev = f"@{self.revision}" if self.revision else ""
            return f"hf://{self.authority}{rev}"
        return self.path

    def overlaps(self, other: StorageURI) -> bool:
        """True when one S3 prefix contains the other (they would overwrite each other)."""
        if self.scheme != "s3" or other.scheme != "s3" or self.bucket != other.bucket:
            return False
        return self.prefix.startswith(other.prefix) or other.prefix.startswith(self.prefix)


def _norm_prefix(key: str) -> str:
    key = key.strip("/")
    if not key:
        return ""
    if len(key.encode()) > MAX_PREFIX_BYTES:
        raise InvalidURI(
            f"S3 prefix {_short(key)} is too long: at most {MAX_PREFIX_BYTES} bytes "
            "(S3 keys are at most 1024 bytes, and the file names go below the prefix)"
        )
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise InvalidURI(f"S3 prefix {_short(key)} has an empty, '.' or '..' segment")
    return key + "/"


def check_file_name(name: str) -> str | None:
    """Why ``name`` (an object's name below a source prefix) cannot be a local file
    name, or None when it can: never '.', '..', a path separator, NUL or too long."""
    if name in ("", ".", ".."):
        return "is '.' or '..' (it would name the directory itself or its parent)"
    if "/" in name or "\\" in name or "\0" in name:
        return "contains a path separator or NUL"
    if len(name.encode()) > MAX_NAME_BYTES:
        return f"is longer than {MAX_NAME_BYTES} bytes"
    return None


def check_endpoint(url: str, what: str = "S3 endpoint") -> str:
    """An ``http(s)://host[:port][/path]`` endpoint URL; InvalidURI otherwise.

    User info (``http://USER:PASS@host``) is refused: credentials come only from the
    credentials Secret (the environment). No message echoes what the URL holds before
    its host, and none echoes an URL that cannot be parsed.
    """
    if not isinstance(url, str) or not url.strip():
        raise InvalidURI(f"the {what} URL is empty; expected http(s)://host[:port]")
    url = url.strip()
    scheme, sep, rest = url.partition("://")
    authority = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0] if sep else ""
    if "@" in authority:
        raise InvalidURI(
            f"the {what} URL must not contain a user name or password (user info before "
            "'@'): credentials come only from the credentials Secret (AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY)"
        )
    if not sep or scheme.lower() not in ("http", "https"):
        raise InvalidURI(f"the {what} URL must start with http:// or https://")
    if any(c.isspace() for c in url) or len(url) > 1024:
        raise InvalidURI(f"the {what} URL has whitespace or is longer than 1024 characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port outside 0-65535
        host = parts.hostname
    except ValueError:
        raise InvalidURI(
            f"the {what} URL is malformed (bad host or port); expected http(s)://host[:port]"
        ) from None
    if not host:
        raise InvalidURI(f"the {what} URL has no host; expected http(s)://host[:port]")
    return url


def parse_uri(uri: str, *, allow_local: bool = False) -> StorageURI:
    """Parse and normalise a storage URI; raise InvalidURI with an actionable message."""
    if not isinstance(uri, str) or not uri.strip():
        raise InvalidURI(
            "URI is empty; expected s3://bucket/prefix/, pvc://claim/path or hf://org/name[@rev]"
        )
    uri = uri.strip()
    if uri.startswith("s3://"):
        m = S3_RE.match(uri)
        if not m:
            raise InvalidURI(
                f"{_short(uri)} is not a valid S3 URI: expected s3://bucket/prefix/ with a bucket name of "
                "3-63 lowercase letters, digits, dots or hyphens"
            )
        return StorageURI("s3", m["bucket"], _norm_prefix(m["key"] or ""))
    if uri.startswith("pvc://"):
        m = PVC_RE.match(uri)
        if not m:
            raise InvalidURI(
                f"{_short(uri)} is not a valid PVC URI: expected pvc://claim-name/path/in/volume "
                "(claim name: lowercase DNS-1123)"
            )
        path = posixpath.normpath("/" + (m["path"] or "")).lstrip("/")
        if ".." in path.split("/"):
            raise InvalidURI(f"{_short(uri)}: the path must stay inside the volume")
        return StorageURI("pvc", m["claim"], "" if path == "." else path)
    if uri.startswith("hf://"):
        m = HF_RE.match(uri)
        if not m:
            raise InvalidURI(
                f"{_short(uri)} is not a valid Hugging Face URI: expected hf://org/name or hf://org/name@revision"
            )
        return StorageURI("hf", f"{m['org']}/{m['name']}", "", m["rev"])
    if allow_local:
        if uri.startswith("file://"):
            uri = uri[len("file://") :]
        if uri.startswith("/") or uri.startswith("."):
            return StorageURI("file", "", uri)
    raise InvalidURI(
        f"{_short(uri)} has an unsupported scheme: expected s3://bucket/prefix/, pvc://claim/path or hf://org/name[@rev]"
        + (" or a local path" if allow_local else "")
    )


def parse_output_uri(uri: str, *, allow_local: bool = False) -> StorageURI:
    """An output location: an S3 prefix that is not a bucket root (or, CLI only, a local dir)."""
    u = parse_uri(uri, allow_local=allow_local)
    if u.scheme == "file" and allow_local:
        return u
    if u.scheme != "s3":
        raise InvalidURI(f"output {uri!r} must be an s3:// prefix (got {u.scheme}://)")
    if not u.prefix:
        raise InvalidURI(
            f"output {uri!r} is a bucket root: give a prefix such as s3://{u.bucket}/models/name/ "
            "(a checkpoint is the prefix that holds its manifest)"
        )
    return u
