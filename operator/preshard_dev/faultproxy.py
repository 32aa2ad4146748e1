"""A fault-injecting HTTP reverse proxy in front of an S3 server (dev tooling only).

::

    with RcloneS3() as server, FaultProxy(server.endpoint) as proxy:
        proxy.add_rule(FaultRule(operation="UploadPart", fraction=0.3, code="SlowDown"))
        env = server.env() | {"AWS_ENDPOINT_URL_S3": proxy.endpoint}
        ...                               # run the client against proxy.endpoint
        assert proxy.stats().faults > 0   # faults were really injected

The proxy listens on 127.0.0.1 (an aiohttp server on its own event loop in a background
thread) and forwards every request unchanged: the method, the raw path and query, the
``Host`` header and the body, so SigV4 signatures still verify upstream. A request that
matches a :class:`FaultRule` (method, S3 operation, path regex, query parameters) and
that the rule decides to hit (the Nth match, a random fraction, or every match, up to a
limit) gets a fault instead:

``error``
    an S3 error response (``status`` with an XML ``<Error>`` body, e.g. 503 SlowDown or
    500 InternalError) without contacting the upstream; the request body is read first.
``reset``
    the connection is dropped after ``at_byte`` bytes of the request body (default: half
    of it), with no response, as when a network path fails mid-upload.
``truncate``
    the request is forwarded, but the connection is dropped after ``at_byte`` bytes of
    the response body (default: half of it), as when a download breaks mid-body.
``corrupt``
    the request is forwarded with the byte at offset ``at_byte`` (default: the middle)
    of its body inverted; a request without a body gets that byte of the response body
    inverted instead. Tests integrity checks on both sides (Content-MD5, sha256).

Rules are checked in order and the first one that fires wins (every rule whose filter
matches counts the request, so ``nth`` is the Nth match whatever other rules did). Every
request is recorded before its response goes out (:meth:`FaultProxy.stats`,
:meth:`FaultProxy.records`), so tests can also assert what a client did or did not send,
for example that a resumed upload sent no part of a file already present.

S3 operations are recognised for path-style requests (what preshard and the dev servers
use): ``PutObject``, ``UploadPart``, ``CreateMultipartUpload``, ``GetObject`` and so on.

It also runs on its own, e.g. for the demo::

    python -m preshard_dev.faultproxy --upstream http://127.0.0.1:9000 \\
        --operation UploadPart --fraction 0.2 --code SlowDown
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import threading
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Literal
from xml.sax.saxutils import escape

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

log = logging.getLogger(__name__)

Action = Literal["error", "reset", "truncate", "corrupt"]

# Headers that describe one hop, not the message (RFC 9110 7.6.1), plus Expect: the proxy
# answers 100-continue itself and forwards the body without waiting.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
    }
)
_CHUNK = 256 * 1024
_BUFFER_LIMIT = 64 * 1024 * 1024

_MESSAGES = {
    "SlowDown": "Please reduce your request rate.",
    "InternalError": "We encountered an internal error. Please try again.",
    "ServiceUnavailable": "Service is unable to handle request.",
    "RequestTimeout": "Your socket connection to the server was not read from or written to within the timeout period.",
}


def s3_operation(
    method: str, path: str, query: Mapping[str, str], headers: Mapping[str, str]
) -> str:
    """The S3 API operation of a path-style request, e.g. ``UploadPart``.

    Unknown combinations give the bare HTTP method.
    """
    method = method.upper()
    bucket, _, key = path.lstrip("/").partition("/")
    if not bucket:
        return "ListBuckets" if method == "GET" else method
    copy = "x-amz-copy-source" in {k.lower() for k in headers}
    if not key:
        if method == "GET":
            if "uploads" in query:
                return "ListMultipartUploads"
            if "location" in query:
                return "GetBucketLocation"
            return "ListObjectsV2" if query.get("list-type") == "2" else "ListObjects"
        return {
            "HEAD": "HeadBucket",
            "PUT": "CreateBucket",
            "DELETE": "DeleteBucket",
            "POST": "DeleteObjects" if "delete" in query else "POST",
        }.get(method, method)
    if method == "PUT":
        if "partNumber" in query and "uploadId" in query:
            return "UploadPartCopy" if copy else "UploadPart"
        return "CopyObject" if copy else "PutObject"
    if method == "POST":
        if "uploads" in query:
            return "CreateMultipartUpload"
        if "uploadId" in query:
            return "CompleteMultipartUpload"
        return "POST"
    if method == "DELETE":
        return "AbortMultipartUpload" if "uploadId" in query else "DeleteObject"
    if method == "GET":
        return "ListParts" if "uploadId" in query else "GetObject"
    if method == "HEAD":
        return "HeadObject"
    return method


@dataclass
class FaultRule:
    """Which requests get which fault. Empty filters match everything.

    Filters (all given ones must match): ``method`` (HTTP method), ``operation`` (one S3
    operation name or several, see :func:`s3_operation`), ``path`` (a regular expression
    searched in the URL path, e.g. a key), ``query`` (parameter names that must be
    present, with a required value or None for any value).

    Firing, among the requests the filters match: ``nth`` (1-based index or indexes of
    the matches to hit), else ``fraction`` (probability per match, from the proxy's
    seeded random generator), else every match; ``max_faults`` caps the total.

    The fault: ``action`` (see the module docstring); ``status``, ``code`` and
    ``message`` of an ``error``; ``at_byte``, where a ``reset``, ``truncate`` or
    ``corrupt`` strikes (default: the middle of the body); ``delay`` in seconds before
    the fault, to model a slow server too.
    """

    action: Action = "error"
    status: int = 503
    code: str = "SlowDown"
    message: str | None = None
    method: str | None = None
    operation: str | Collection[str] | None = None
    path: str | None = None
    query: Mapping[str, str | None] | None = None
    nth: int | Collection[int] | None = None
    fraction: float | None = None
    max_faults: int | None = None
    at_byte: int | None = None
    delay: float = 0.0
    matched: int = field(default=0, init=False)
    injected: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.action not in ("error", "reset", "truncate", "corrupt"):
            raise ValueError(f"unknown fault action {self.action!r}")
        if self.fraction is not None and not 0.0 <= self.fraction <= 1.0:
            raise ValueError("fraction must be within 0..1")
        self._path_re = re.compile(self.path) if self.path else None

    def matches(self, method: str, operation: str, path: str, query: Mapping[str, str]) -> bool:
        if self.method and self.method.upper() != method.upper():
            return False
        if self.operation is not None:
            wanted = {self.operation} if isinstance(self.operation, str) else set(self.operation)
            if operation not in wanted:
                return False
        if self._path_re is not None and not self._path_re.search(path):
            return False
        for name, value in (self.query or {}).items():
            if name not in query or (value is not None and query[name] != value):
                return False
        return True

    def fires(self, rng: random.Random, *, eligible: bool = True) -> bool:
        """Count one match and decide whether it gets the fault (call under the lock).

        ``eligible=False``: an earlier rule already took the request; it still counts
        as a match, so ``nth`` always means the Nth request matching this rule's filter.
        """
        self.matched += 1
        if not eligible:
            return False
        if self.max_faults is not None and self.injected >= self.max_faults:
            return False
        if self.nth is not None:
            hit = self.matched in ({self.nth} if isinstance(self.nth, int) else set(self.nth))
        elif self.fraction is not None:
            hit = rng.random() < self.fraction
        else:
            hit = True
        if hit:
            self.injected += 1
        return hit

    def describe(self) -> str:
        what = f"{self.status} {self.code}" if self.action == "error" else self.action
        return f"{what} on {self.operation or self.method or 'any request'}"


@dataclass(frozen=True)
class RequestRecord:
    """One request the proxy saw, and the fault it got (None: forwarded untouched)."""

    method: str
    path: str
    query: tuple[tuple[str, str], ...]
    operation: str
    fault: str | None
    status: int | None  # status sent to the client; None when the connection was dropped


@dataclass(frozen=True)
class ProxyStats:
    requests: int
    faults: int
    by_operation: dict[str, int]
    faults_by_operation: dict[str, int]


def error_body(code: str, message: str, resource: str, request_id: str) -> bytes:
    """An S3 error document, as S3 sends it with 4xx/5xx responses."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message>"
        f"<Resource>{escape(resource)}</Resource><RequestId>{request_id}</RequestId></Error>"
    ).encode()


class FaultProxy:
    """The proxy; a context manager that starts and stops it in a background thread."""

    def __init__(
        self,
        upstream: str,
        *,
        rules: Collection[FaultRule] = (),
        host: str = "127.0.0.1",
        port: int = 0,
        seed: int = 0,
    ) -> None:
        self.upstream = URL(upstream.rstrip("/"))
        self.host = host
        self.port = port
        self._rules: list[FaultRule] = list(rules)
        self._rng = random.Random(seed)  # noqa: S311 - fault sampling, not crypto
        self._lock = threading.Lock()
        self._records: list[RequestRecord] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    # -- configuration and results ------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def add_rule(self, rule: FaultRule) -> FaultRule:
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear_rules(self) -> None:
        with self._lock:
            self._rules.clear()

    @property
    def rules(self) -> list[FaultRule]:
        with self._lock:
            return list(self._rules)

    def records(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._records)

    def reset_stats(self) -> None:
        """Forget recorded requests (rules keep their own counters)."""
        with self._lock:
            self._records.clear()

    def stats(self) -> ProxyStats:
        records = self.records()
        return ProxyStats(
            requests=len(records),
            faults=sum(1 for r in records if r.fault),
            by_operation=dict(Counter(r.operation for r in records)),
            faults_by_operation=dict(Counter(r.operation for r in records if r.fault)),
        )

    # -- lifecycle ------------------------------------------------------------------------
    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 10.0) -> FaultProxy:
        if self._thread is not None:
            raise RuntimeError("the proxy is already running")
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, name="faultproxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"the fault proxy did not start within {timeout}s")
        if self._error is not None:
            self._thread.join()
            self._thread = None
            raise RuntimeError(f"the fault proxy could not start: {self._error}") from self._error
        log.info("fault proxy on %s -> %s", self.endpoint, self.upstream)
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(RuntimeError):  # loop already closed
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=10)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        self._thread = None

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._startup())
        except BaseException as exc:  # report to start(), which re-raises
            self._error = exc
            self._ready.set()
            loop.close()
            self._loop = None
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()
            self._loop = None

    async def _startup(self) -> None:
        # One connection per request: the proxy must never reuse an upstream connection
        # that a dropped request left in an unknown state. Loopback makes this cheap.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True, limit=0),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        )
        app = web.Application(client_max_size=0)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # A handler whose client went away is cancelled (a delayed fault does not outlive
        # a killed client), and stop() waits at most a second for the rest.
        self._runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            handler_cancellation=True,
            shutdown_timeout=1.0,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            self.port = int(server.sockets[0].getsockname()[1])

    async def _shutdown(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- request handling -----------------------------------------------------------------
    def _choose(
        self, method: str, operation: str, path: str, query: Mapping[str, str]
    ) -> FaultRule | None:
        chosen: FaultRule | None = None
        with self._lock:
            for rule in self._rules:
                if rule.matches(method, operation, path, query) and rule.fires(
                    self._rng, eligible=chosen is None
                ):
                    chosen = rule
        return chosen

    def _record(
        self, request: web.Request, operation: str, rule: FaultRule | None, status: int | None
    ) -> None:
        rec = RequestRecord(
            method=request.method,
            path=request.path,
            query=tuple(request.query.items()),
            operation=operation,
            fault=rule.describe() if rule is not None else None,
            status=status,
        )
        with self._lock:
            self._records.append(rec)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        query = {k: v for k, v in request.query.items()}
        operation = s3_operation(request.method, request.path, query, request.headers)
        rule = self._choose(request.method, operation, request.path, query)
        if rule is not None and rule.delay:
            await asyncio.sleep(rule.delay)
        # Recorded before the response goes out: once a client has its answer, the record
        # of the request is there for it to inspect.
        record = partial(self._record, request, operation, rule)
        if rule is None or rule.action in ("truncate", "corrupt"):
            return await self._forward(request, rule, record)
        if rule.action == "reset":
            await self._read_some(request, rule.at_byte)
            record(None)
            return self._drop(request)
        # error: read the body first, as a server does before it answers.
        await request.read()
        rid = uuid.uuid4().hex[:16].upper()
        message = rule.message or _MESSAGES.get(rule.code, rule.code)
        body = error_body(rule.code, message, request.path, rid)
        record(rule.status)
        return web.Response(
            status=rule.status,
            body=body if request.method != "HEAD" else None,
            content_type="application/xml",
            headers={"x-amz-request-id": rid},
        )

    async def _read_some(self, request: web.Request, limit: int | None) -> None:
        """Read ``limit`` bytes of the request body (default: half of it)."""
        if limit is None:
            limit = (request.content_length or 0) // 2
        remaining = limit
        while remaining > 0:
            chunk = await request.content.read(min(remaining, _CHUNK))
            if not chunk:
                break
            remaining -= len(chunk)

    @staticmethod
    def _drop(request: web.Request) -> web.StreamResponse:
        if request.transport is not None:
            request.transport.abort()
        # aiohttp needs a response object; nothing reaches the client after the abort.
        return web.Response(status=500)

    async def _forward(
        self, request: web.Request, rule: FaultRule | None, record: Callable[[int | None], None]
    ) -> web.StreamResponse:
        """Forward the request (with a ``truncate`` or ``corrupt`` fault, if given)."""
        assert self._session is not None
        headers: CIMultiDict[str] = CIMultiDict(
            (k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP
        )
        # A body up to _BUFFER_LIMIT is read first and sent in one piece, so a server that
        # answers before reading it all (an error) and closes is heard, as by a direct
        # client; a larger one is streamed (chunked if the client chunked).
        has_body = request.body_exists and request.content_length != 0
        data: bytes | AsyncIterator[bytes] | None = None
        corrupt = rule is not None and rule.action == "corrupt"
        length = request.content_length
        if has_body and length is not None and length <= _BUFFER_LIMIT:
            data = await request.read()
            if rule is not None and corrupt:
                i = _offset(rule, len(data))
                if i < len(data):
                    data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
        elif has_body:
            data = request.content.iter_chunked(_CHUNK)
            if rule is not None and corrupt:
                data = _flip(data, _offset(rule, request.content_length))
        corrupt_response = corrupt and not has_body
        url = self.upstream.with_path(
            self.upstream.raw_path.rstrip("/") + request.raw_path, encoded=True
        )
        try:
            upstream = await self._session.request(
                request.method,
                url,
                headers=headers,
                data=data,
                allow_redirects=False,
            )
        except aiohttp.ClientError as exc:  # refused, or closed while the body was sent
            log.warning("request to the upstream %s failed: %s", self.upstream, exc)
            rid = uuid.uuid4().hex[:16].upper()
            msg = "the proxy's request to the upstream S3 server failed"
            err = error_body("BadGateway", msg, request.path, rid)
            record(502)
            return web.Response(status=502, body=err, content_type="application/xml")
        async with upstream:
            resp = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for k, v in upstream.headers.items():
                if k.lower() not in _HOP_BY_HOP:
                    resp.headers.add(k, v)
            limit: int | None = None
            if rule is not None and rule.action == "truncate":
                limit = _offset(rule, upstream.content_length)
            record(None if limit is not None else upstream.status)
            if request.method == "HEAD":
                # Sent as is: aiohttp would otherwise replace the Content-Length with 0.
                await resp.prepare(request)
                return resp
            chunks: AsyncIterator[bytes] = upstream.content.iter_chunked(_CHUNK)
            if rule is not None and corrupt_response:
                chunks = _flip(chunks, _offset(rule, upstream.content_length))
            await resp.prepare(request)
            sent = 0
            async for chunk in chunks:
                if limit is not None and sent + len(chunk) >= limit:
                    await resp.write(chunk[: limit - sent])
                    return self._drop(request)
                await resp.write(chunk)
                sent += len(chunk)
            if limit is not None:  # the body was shorter than the limit: drop at its end
                return self._drop(request)
            await resp.write_eof()
            return resp


def _offset(rule: FaultRule, length: int | None) -> int:
    return rule.at_byte if rule.at_byte is not None else (length or 0) // 2


async def _flip(chunks: AsyncIterator[bytes], offset: int) -> AsyncIterator[bytes]:
    """The same bytes, with the one at ``offset`` inverted."""
    pos = 0
    async for chunk in chunks:
        if pos <= offset < pos + len(chunk):
            i = offset - pos
            chunk = chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1 :]
        pos += len(chunk)
        yield chunk


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - manual use
    import argparse
    import signal
    import time

    p = argparse.ArgumentParser(
        description="Fault-injecting reverse proxy for an S3 server on 127.0.0.1"
    )
    p.add_argument("--upstream", required=True, help="the S3 endpoint, e.g. http://127.0.0.1:9000")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--action", choices=["error", "reset", "truncate", "corrupt"], default="error")
    p.add_argument("--status", type=int, default=503)
    p.add_argument("--code", default="SlowDown")
    p.add_argument("--method", default=None)
    p.add_argument("--operation", action="append", default=None, help="S3 operation (repeatable)")
    p.add_argument("--path", default=None, help="regular expression searched in the path")
    p.add_argument("--fraction", type=float, default=None)
    p.add_argument("--nth", type=int, action="append", default=None)
    p.add_argument("--max-faults", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    rule = FaultRule(
        action=a.action,
        status=a.status,
        code=a.code,
        method=a.method,
        operation=a.operation,
        path=a.path,
        nth=a.nth,
        fraction=a.fraction,
        max_faults=a.max_faults,
    )

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # stop cleanly on SIGTERM too, with the stats
    with FaultProxy(a.upstream, rules=[rule], port=a.port, seed=a.seed) as proxy:
        print(proxy.endpoint, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        s = proxy.stats()
        print(f"{s.requests} requests, {s.faults} faults injected: {s.faults_by_operation}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
