"""A stand-in for the Hugging Face Hub on 127.0.0.1 (dev tooling only).

The real Hub (huggingface.co) is unreachable from the machines that build and test
preshard (only package registries are), so ``hf://`` sources are tested against this
server instead. It is NOT the Hub: it speaks the subset of the Hub's HTTP API that
``huggingface_hub.snapshot_download`` uses (checked against huggingface_hub 2.4), with the
Hub's status codes and error headers, and serves repositories from local directories.

Point huggingface_hub at it with ``HF_ENDPOINT`` (``FakeHub.env()``). huggingface_hub reads
``HF_ENDPOINT`` once, when it is imported, so set it in the environment of a subprocess
(``preshard convert`` in the tests) rather than in an interpreter that already imported it.

Endpoints (``{rev}`` is a branch or tag name, URL-quoted, or a 40-hex commit sha):

* ``GET /api/models/{org}/{name}`` and ``GET /api/models/{org}/{name}/revision/{rev}``:
  model info with ``sha`` (the commit) and ``siblings`` (``?blobs=true`` adds sizes, blob
  ids and LFS data).
* ``GET /api/models/{org}/{name}/tree/{rev}[/{path}]?recursive=&cursor=``: the tree
  listing (files with ``oid``, ``size`` and ``lfs`` for LFS files, directories), paginated
  with a ``Link: <...>; rel="next"`` header like the Hub (``page_size`` entries a page).
* ``HEAD``/``GET /{org}/{name}/resolve/{rev}/{path}``: a regular file answers 200 with
  ``ETag`` (its git blob sha1), ``X-Repo-Commit`` and ``Content-Length``; an LFS file
  (``*.safetensors``, ``*.bin``, ... or >= 10 MiB) answers 302 to a signed "CDN" URL with
  ``X-Linked-Etag`` (its sha256), ``X-Linked-Size`` and ``X-Repo-Commit``, as the Hub does.
  The CDN URL names the host ``localhost`` instead of ``127.0.0.1``: another host to the
  client, which (as with the real CDN) drops the Authorization header when following it.
* ``GET``/``HEAD /cdn-lfs/{sha256}?expires=&signature=``: LFS content; the signature
  (HMAC, as the Hub's CDN URLs are signed) is checked, no token is needed. Downloads
  honour ``Range: bytes=N-`` (206), so interrupted downloads resume.

Access, as on the Hub:

* a missing repository, or a private one the request has no access to, answers
  ``X-Error-Code: RepoNotFound`` (401 without a token, 404 with one);
* an unknown revision answers 404 ``RevisionNotFound``; an unknown file 404 ``EntryNotFound``;
* a gated repository lists its info and tree publicly, but ``resolve`` answers
  ``X-Error-Code: GatedRepo``: 401 without a token, 403 with a token not granted access;
* a token that is not registered (``add_token``) answers 401 with
  ``X-Error-Message: Invalid credentials in Authorization header`` on every endpoint.

Every request is recorded (``requests``, ``count``, ``downloaded``; never the token).
``fault`` injects failures into the next N matching requests: an HTTP status, a body cut
off after K bytes (the connection closes mid-download), or a connection closed without
an answer.

Files are read from the directories given to ``add_repo``/``add_revision`` when served;
they must not change afterwards (their hashes are computed when added).

Run by hand: ``python -m preshard_dev.hfhub --repo org/name=DIR [--gated-repo org/x=DIR]
[--token hf_xxx]`` prints the ``HF_ENDPOINT`` to export.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import hmac
import json
import re
import secrets
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from preshard.worker.store.transfer import sha256_file

LFS_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".onnx",
    ".gguf",
    ".model",
    ".tiktoken",
)
LFS_MIN_SIZE = 10 * 2**20
LFS_POINTER_SIZE = 134
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"
_CHUNK = 2**20


def git_blob_sha1(path: Path) -> str:
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())  # noqa: S324 - git's object id
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class HubFile:
    path: str  # inside the repository, "/"-separated
    source: Path  # where the content is read from
    size: int
    blob_id: str  # git blob sha1 (the ETag of a regular file)
    sha256: str | None  # LFS files only (their ETag)

    @property
    def lfs(self) -> bool:
        return self.sha256 is not None


@dataclass
class Commit:
    sha: str
    files: dict[str, HubFile]
    created: str


@dataclass
class Repo:
    repo_id: str
    gated: bool = False
    private: bool = False
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit sha

    def resolve(self, rev: str) -> Commit | None:
        sha = self.refs.get(rev, rev)
        return self.commits.get(sha)


@dataclass(frozen=True)
class Request:
    """One request as the hub saw it (the token itself is never recorded)."""

    method: str
    path: str  # without the query string
    kind: str  # info, tree, resolve, cdn or other
    status: int
    authorized: bool  # an Authorization header was sent
    range: str | None = None


@dataclass
class Fault:
    kind: str | None  # None: any request
    path_contains: str
    times: int
    status: int | None = None  # answer this status (with an X-Error-Message)
    cut_after: int | None = None  # send this many body bytes, then close the connection
    drop: bool = False  # close the connection without answering
    method: str | None = None  # None: any


class FakeHub:
    """A Hugging Face Hub stand-in on 127.0.0.1 (see the module docstring)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, cdn_host: str = "localhost") -> None:
        self.host = host
        self.port = port
        self.cdn_host = cdn_host
        self.page_size = 1000
        self.repos: dict[str, Repo] = {}
        self.tokens: dict[str, set[str]] = {}  # token -> repo ids it may read (gated/private)
        self.requests: list[Request] = []
        self._faults: list[Fault] = []
        self._secret = secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._serial = 0

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self, token: str | None = None, hf_home: Path | None = None) -> dict[str, str]:
        """Environment for a huggingface_hub client (a subprocess) of this hub."""
        out = {"HF_ENDPOINT": self.endpoint, "HF_HUB_DISABLE_TELEMETRY": "1"}
        if token is not None:
            out["HF_TOKEN"] = token
        if hf_home is not None:
            out["HF_HOME"] = str(hf_home)
        return out

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="fake-hf-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- content ---------------------------------------------------------------------------
    def add_repo(
        self,
        repo_id: str,
        directory: str | Path,
        *,
        gated: bool = False,
        private: bool = False,
        branch: str = "main",
    ) -> str:
        """Serve ``directory`` as ``repo_id`` at ``branch``; return the commit sha."""
        if repo_id in self.repos:
            raise ValueError(f"{repo_id} already exists (use add_revision)")
        if repo_id.count("/") != 1:
            raise ValueError(f"repo id {repo_id!r} is not org/name")
        self.repos[repo_id] = Repo(repo_id, gated=gated, private=private)
        return self.add_revision(repo_id, directory, ref=branch)

    def add_revision(self, repo_id: str, directory: str | Path, *, ref: str | None = None) -> str:
        """A new commit of ``repo_id`` holding ``directory`` (every file, recursively);
        ``ref`` (a branch or tag) is moved to it. Return the commit sha."""
        repo = self.repos[repo_id]
        root = Path(directory)
        files: dict[str, HubFile] = {}
        for p in sorted(root.rglob("*")):
            rel = p.relative_to(root)
            if not p.is_file() or rel.parts[0] in (".git", ".cache"):
                continue
            size = p.stat().st_size
            lfs = p.name.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE
            files[rel.as_posix()] = HubFile(
                rel.as_posix(), p, size, git_blob_sha1(p), sha256_file(p) if lfs else None
            )
        with self._lock:
            self._serial += 1
            listing = "\n".join(f"{f.path} {f.blob_id}" for f in files.values())
            sha = hashlib.sha1(  # noqa: S324 - a commit id, not security
                f"{repo_id}\n{self._serial}\n{listing}".encode()
            ).hexdigest()
            created = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
            repo.commits[sha] = Commit(sha, files, created)
            if ref is not None:
                repo.refs[ref] = sha
        return sha

    def add_token(self, token: str, repos: Iterable[str] = ()) -> None:
        """A valid token; it may read the gated/private repositories listed."""
        self.tokens[token] = set(repos)

    # -- observation and faults -----------------------------------------------------------
    def count(self, kind: str | None = None, method: str | None = None, path: str = "") -> int:
        with self._lock:
            return sum(
                1
                for r in self.requests
                if (kind is None or r.kind == kind)
                and (method is None or r.method == method)
                and path in r.path
            )

    def downloaded(self) -> list[str]:
        """Repository paths whose content was sent (GET on resolve, or on the CDN by name)."""
        names: list[str] = []
        with self._lock:
            reqs = list(self.requests)
        by_sha = {
            f.sha256: f.path
            for repo in self.repos.values()
            for c in repo.commits.values()
            for f in c.files.values()
            if f.sha256
        }
        for r in reqs:
            if r.method != "GET" or r.status not in (200, 206):
                continue
            if r.kind == "resolve":
                names.append(unquote(r.path.split("/resolve/", 1)[1].split("/", 1)[1]))
            elif r.kind == "cdn":
                names.append(by_sha.get(r.path.rsplit("/", 1)[1], r.path))
        return names

    def reset_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    def fault(
        self,
        kind: str | None = None,
        *,
        status: int | None = None,
        cut_after: int | None = None,
        drop: bool = False,
        times: int = 1,
        path_contains: str = "",
        method: str | None = None,
    ) -> None:
        """Fail the next ``times`` requests of ``kind`` (info, tree, resolve, cdn; None:
        any) whose path contains ``path_contains`` (and whose method is ``method``, if
        given): answer ``status``, send only ``cut_after`` bytes of the body and close the
        connection, or (``drop``) close the connection without answering."""
        if sum((status is not None, cut_after is not None, drop)) != 1:
            raise ValueError("give exactly one of status, cut_after and drop")
        with self._lock:
            self._faults.append(Fault(kind, path_contains, times, status, cut_after, drop, method))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_fault(self, kind: str, method: str, path: str) -> Fault | None:
        with self._lock:
            for f in self._faults:
                if (
                    f.times > 0
                    and (f.kind is None or f.kind == kind)
                    and (f.method is None or f.method == method)
                    and f.path_contains in path
                ):
                    f.times -= 1
                    return f
        return None

    def _record(self, req: Request) -> None:
        with self._lock:
            self.requests.append(req)

    # -- signing ---------------------------------------------------------------------------
    def _signature(self, sha256: str, expires: int) -> str:
        return hmac.new(self._secret, f"{sha256}:{expires}".encode(), hashlib.sha256).hexdigest()

    def cdn_url(self, sha256: str, ttl: int = 3600) -> str:
        expires = int(time.time()) + ttl
        sig = self._signature(sha256, expires)
        return (
            f"http://{self.cdn_host}:{self.port}/cdn-lfs/{sha256}?expires={expires}&signature={sig}"
        )

    def _blob(self, sha256: str) -> HubFile | None:
        for repo in self.repos.values():
            for c in repo.commits.values():
                for f in c.files.values():
                    if f.sha256 == sha256:
                        return f
        return None


class _HubError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = dict(headers or {})


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"
    server_version = "preshard-fake-hf-hub/1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    # -- plumbing --------------------------------------------------------------------------
    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        raw_path, query = split.path, parse_qs(split.query)
        segments = [unquote(s) for s in raw_path.strip("/").split("/")]
        kind = _kind(raw_path)
        self._status = 0  # 0 in the record: no answer (a dropped connection)
        self._kind = kind
        self._raw_path = raw_path
        self._cut_after: int | None = None
        try:
            fault = self.hub._take_fault(kind, self.command, raw_path)
            if fault is not None and fault.drop:
                self.close_connection = True
                return
            if fault is not None and fault.status is not None:
                raise _HubError(fault.status, f"injected fault ({fault.status})")
            self._cut_after = fault.cut_after if fault is not None else None
            token = self._token()
            if kind == "cdn":
                self._cdn(segments, query)
            elif kind in ("info", "tree"):
                self._api(kind, segments, query, token)
            elif kind == "resolve":
                self._resolve(segments, token)
            else:
                raise _HubError(404, "Not Found")
        except _HubError as err:
            body = json.dumps({"error": err.message}).encode()
            headers = {"X-Error-Message": err.message, **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._send(err.status, headers, body, content_type="application/json")
        except (BrokenPipeError, ConnectionResetError):  # the client went away
            self.close_connection = True
        finally:
            self.hub._record(
                Request(
                    self.command,
                    raw_path,
                    kind,
                    self._status,
                    "authorization" in {k.lower() for k in self.headers},
                    self.headers.get("Range"),
                )
            )

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization")
        if not auth:
            return None
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or token not in self.hub.tokens:
            raise _HubError(401, INVALID_CREDENTIALS)
        return token

    def _send(
        self,
        status: int,
        headers: Mapping[str, str],
        body: bytes = b"",
        *,
        content_type: str = "application/octet-stream",
        length: int | None = None,
    ) -> None:
        self._status = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, data: Any, headers: Mapping[str, str] | None = None) -> None:
        self._send(200, headers or {}, json.dumps(data).encode(), content_type="application/json")

    def _repo(self, segments: list[str], token: str | None) -> Repo:
        repo_id = "/".join(segments[:2])
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and not self._may_read(repo, token)):
            # The Hub does not tell a missing repository from a private one.
            raise _HubError(
                401 if token is None else 404,
                "Repository not found",
                "RepoNotFound",
            )
        return repo

    def _may_read(self, repo: Repo, token: str | None) -> bool:
        return token is not None and repo.repo_id in self.hub.tokens.get(token, set())

    @staticmethod
    def _commit(repo: Repo, rev: str) -> Commit:
        commit = repo.resolve(rev)
        if commit is None:
            raise _HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    # -- /api/models/... -------------------------------------------------------------------
    def _api(
        self, kind: str, segments: list[str], query: dict[str, list[str]], token: str | None
    ) -> None:
        # segments: api, models, org, name, [revision|tree], rev, [path...]
        rest = segments[2:]
        if len(rest) < 2:
            raise _HubError(404, "Not Found")
        repo = self._repo(rest, token)
        tail = rest[2:]
        if kind == "info":
            if tail and (tail[0] != "revision" or len(tail) != 2):
                raise _HubError(404, "Not Found")
            commit = self._commit(repo, tail[1] if tail else "main")
            blobs = (query.get("blobs") or ["false"])[0].lower() == "true"
            self._json(_model_info(repo, commit, blobs))
            return
        if len(tail) < 2:
            raise _HubError(404, "Not Found")
        commit = self._commit(repo, tail[1])
        sub = "/".join(tail[2:]).strip("/")
        recursive = (query.get("recursive") or ["false"])[0].lower() == "true"
        entries = _tree(commit, sub, recursive)
        if entries is None:
            raise _HubError(404, f"Entry not found: {sub}", "EntryNotFound")
        start = int(base64.urlsafe_b64decode((query.get("cursor") or ["MA=="])[0]).decode() or 0)
        page = entries[start : start + self.hub.page_size]
        headers = {}
        if start + self.hub.page_size < len(entries):
            cursor = base64.urlsafe_b64encode(str(start + self.hub.page_size).encode()).decode()
            params = "&".join(
                f"{k}={quote(v[0])}" for k, v in sorted(query.items()) if k != "cursor"
            )
            url = f"{self.hub.endpoint}{self._raw_path}?{params}&cursor={cursor}"
            headers["Link"] = f'<{url}>; rel="next"'
        self._json(page, headers)

    # -- /{org}/{name}/resolve/{rev}/{path} ------------------------------------------------
    def _resolve(self, segments: list[str], token: str | None) -> None:
        raw = self._raw_path.strip("/").split("/")
        # org, name, "resolve", rev (quoted, one segment), path...
        if len(raw) < 5:
            raise _HubError(404, "Not Found")
        repo = self._repo(segments, token)
        commit = self._commit(repo, unquote(raw[3]))
        if repo.gated and not self._may_read(repo, token):
            if token is None:
                raise _HubError(
                    401,
                    f"Access to model {repo.repo_id} is restricted. You must have access to it "
                    "and be authenticated to access it. Please log in.",
                    "GatedRepo",
                )
            raise _HubError(
                403,
                f"Access to model {repo.repo_id} is restricted and you are not in the authorized "
                f"list. Visit {self.hub.endpoint}/{repo.repo_id} to ask for access.",
                "GatedRepo",
            )
        name = unquote("/".join(raw[4:]))
        f = commit.files.get(name)
        if f is None:
            raise _HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        common = {"X-Repo-Commit": commit.sha, "Accept-Ranges": "bytes"}
        if f.lfs:
            assert f.sha256 is not None
            self._send(
                302,
                {
                    **common,
                    "ETag": f'"{f.blob_id}"',
                    "X-Linked-Etag": f'"{f.sha256}"',
                    "X-Linked-Size": str(f.size),
                    "Location": self.hub.cdn_url(f.sha256),
                },
                content_type="text/plain; charset=utf-8",
            )
            return
        self._content(f, {**common, "ETag": f'"{f.blob_id}"'})

    # -- /cdn-lfs/{sha256} -----------------------------------------------------------------
    def _cdn(self, segments: list[str], query: dict[str, list[str]]) -> None:
        sha = segments[-1]
        try:
            expires = int((query.get("expires") or ["0"])[0])
        except ValueError:
            expires = 0
        sig = (query.get("signature") or [""])[0]
        if (
            len(segments) != 2
            or expires < time.time()
            or not hmac.compare_digest(sig, self.hub._signature(sha, expires))
        ):
            raise _HubError(403, "AccessDenied: the signed URL is invalid or expired")
        f = self.hub._blob(sha)
        if f is None:
            raise _HubError(404, "NoSuchKey")
        self._content(f, {"ETag": f'"{sha}"', "Accept-Ranges": "bytes"})

    def _content(self, f: HubFile, headers: dict[str, str]) -> None:
        start, end = 0, f.size - 1
        status = 200
        rng = self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if not m or (not m[1] and not m[2]):
                raise _HubError(416, f"invalid range {rng!r}")
            if m[1]:
                start = int(m[1])
                end = min(int(m[2]), f.size - 1) if m[2] else f.size - 1
            else:  # the last N bytes
                start = max(0, f.size - int(m[2]))
            if start >= f.size or start > end:
                raise _HubError(
                    416,
                    "Requested Range Not Satisfiable",
                    headers={"Content-Range": f"bytes */{f.size}"},
                )
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{end}/{f.size}"}
        length = end - start + 1
        self._send(status, headers, length=length)
        if self.command == "HEAD":
            return
        limit = length if self._cut_after is None else min(length, self._cut_after)
        with open(f.source, "rb") as src:
            src.seek(start)
            sent = 0
            while sent < limit:
                chunk = src.read(min(_CHUNK, limit - sent))
                if not chunk:
                    break
                self.wfile.write(chunk)
                sent += len(chunk)
        if sent < length:  # a cut-off body: close the connection mid-response
            self.wfile.flush()
            self.close_connection = True


def _kind(raw_path: str) -> str:
    if raw_path.startswith("/cdn-lfs/"):
        return "cdn"
    if raw_path.startswith("/api/models/"):
        parts = raw_path.strip("/").split("/")
        return "tree" if len(parts) > 4 and parts[4] == "tree" else "info"
    parts = raw_path.strip("/").split("/")
    if len(parts) >= 3 and parts[2] == "resolve":
        return "resolve"
    return "other"


def _file_entry(f: HubFile) -> dict[str, Any]:
    entry: dict[str, Any] = {"type": "file", "oid": f.blob_id, "size": f.size, "path": f.path}
    if f.sha256 is not None:
        entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": LFS_POINTER_SIZE}
    return entry


def _tree(commit: Commit, sub: str, recursive: bool) -> list[dict[str, Any]] | None:
    prefix = f"{sub}/" if sub else ""
    files = [f for p, f in commit.files.items() if p.startswith(prefix)]
    if sub and not files:
        return None
    dirs: set[str] = set()
    out: list[dict[str, Any]] = []
    for f in files:
        rel = f.path[len(prefix) :]
        parts = rel.split("/")
        for i in range(1, len(parts)):
            if recursive or i == 1:
                dirs.add(prefix + "/".join(parts[:i]))
        if recursive or len(parts) == 1:
            out.append(_file_entry(f))
    dir_entries = [
        {
            "type": "directory",
            "oid": hashlib.sha1(d.encode()).hexdigest(),  # noqa: S324 - a tree id
            "size": 0,
            "path": d,
        }
        for d in sorted(dirs)
    ]
    return dir_entries + sorted(out, key=lambda e: e["path"])


def _model_info(repo: Repo, commit: Commit, blobs: bool) -> dict[str, Any]:
    siblings: list[dict[str, Any]] = []
    for f in sorted(commit.files.values(), key=lambda f: f.path):
        s: dict[str, Any] = {"rfilename": f.path}
        if blobs:
            s["size"] = f.size
            s["blobId"] = f.blob_id
            if f.sha256:
                s["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": LFS_POINTER_SIZE}
        siblings.append(s)
    org = repo.repo_id.split("/")[0]
    return {
        "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],  # noqa: S324 - an id
        "id": repo.repo_id,
        "modelId": repo.repo_id,
        "author": org,
        "sha": commit.sha,
        "lastModified": commit.created,
        "createdAt": commit.created,
        "private": repo.private,
        "gated": "manual" if repo.gated else False,
        "disabled": False,
        "downloads": 0,
        "likes": 0,
        "tags": ["safetensors"],
        "library_name": "transformers",
        "siblings": siblings,
        "usedStorage": sum(f.size for f in commit.files.values()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Serve local directories as Hugging Face Hub model repos on 127.0.0.1 "
        "(a stand-in for huggingface.co; dev tooling)."
    )
    p.add_argument("--repo", action="append", default=[], metavar="ORG/NAME=DIR")
    p.add_argument("--gated-repo", action="append", default=[], metavar="ORG/NAME=DIR")
    p.add_argument("--token", action="append", default=[], help="a token with access to all repos")
    p.add_argument("--port", type=int, default=0)
    a = p.parse_args(argv)
    hub = FakeHub(port=a.port)
    for spec, gated in [(s, False) for s in a.repo] + [(s, True) for s in a.gated_repo]:
        repo_id, _, directory = spec.partition("=")
        print(f"{repo_id}@main = {hub.add_repo(repo_id, directory, gated=gated)}")
    for token in a.token:
        hub.add_token(token, hub.repos)
    with hub:
        print(f"export HF_ENDPOINT={hub.endpoint}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
