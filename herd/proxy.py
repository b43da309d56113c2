"""Session-routing reverse proxy for HTTP and WebSocket, as Tornado handlers.

Each request: find the session key → ``pool.acquire(sid)`` → forward to the
session's worker → close the use. Affinity therefore holds across requests and
connections; a WebSocket holds its use open for its whole life, so the TTL
never evicts a connected session.

Data flow of one HTTP request::

    client ──headers──> prepare(): route, acquire, take an upstream connection,
                                   write the request head upstream
           ──body─────> data_received(): chunk by chunk, awaited (backpressure)
                        <method>(): finish the upstream request, await the response
    worker ──head─────> _Response.headers_received(): status, end-to-end headers
           ──body─────> _Response.data_received(): write + flush (backpressure)
                        on_finish(): connection back to the keep-alive pool, use closed

Nothing buffers a whole body: memory stays flat for a 1 GB upload or download,
and a chunked or ``text/event-stream`` response reaches the client chunk by chunk.
Upstream connections are kept alive per worker (:class:`UpstreamPool`). Tornado's
own HTTP client opens a connection per request, so the upstream side drives
:class:`tornado.http1connection.HTTP1Connection` in client mode directly.

Errors are JSON bodies ``{"error": ..., "message": ...}``: no key or an invalid
session ID → 400; body too large → 413; pool exhausted → 503 with
``Retry-After``; worker dead, refused or not starting → 502 (a refused connection
sends the worker through the pool's crash path at once); no response head within
``upstream_timeout`` → 504. A client that disconnects cancels the upstream request.

Usage::

    app = tornado.web.Application([
        (r"/(.*)", herd.proxy.ProxyHandler, {"pool": pool, "key": herd.proxy.from_header()}),
    ])
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import json
import logging
import socket
import time
import urllib.parse
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from tornado import httputil, iostream, websocket
from tornado.http1connection import HTTP1Connection, HTTP1ConnectionParameters
from tornado.httpclient import HTTPRequest
from tornado.web import RequestHandler, stream_request_body

from ._exceptions import (
    InvalidSessionIdError,
    PoolClosedError,
    PoolExhaustedError,
    SpawnError,
)
from ._pool import Pool
from ._session import Session, validate_session_id

__all__ = [
    "ProxyHandler",
    "ProxySettings",
    "Route",
    "SessionKey",
    "UpstreamPool",
    "from_callable",
    "from_cookie",
    "from_header",
    "from_path",
    "from_query",
]

log = logging.getLogger("herd.proxy")

# RFC 9110 §7.6.1: connection-specific headers a proxy must not forward, plus
# those named in the Connection header itself.
HOP_BY_HOP = frozenset(
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
    }
)


# -- session keys ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Route:
    """Where a request goes: its session ID and the URI to ask the worker for.

    :param session_id: the session's ID (not yet validated).
    :param uri: path and query string to forward (``"/api?x=1"``).
    :param prefix: the public path in front of ``uri`` (for rewriting ``Location``);
        empty unless the session ID is a path segment.
    """

    session_id: str
    uri: str
    prefix: str = ""


SessionKey = Callable[[httputil.HTTPServerRequest, str], "Route | None"]
"""Finds a request's session: ``key(request, uri) -> Route | None``.

``uri`` is the request URI with the handler's mount prefix removed. ``None`` means
the request carries no session key (the proxy answers 400).
"""


def from_header(name: str = "X-Session-ID") -> SessionKey:
    """The session ID is the value of request header ``name``."""

    def key(request: httputil.HTTPServerRequest, uri: str) -> Route | None:
        value = request.headers.get(name)
        return Route(value, uri) if value is not None else None

    key.__doc__ = f"header {name}"
    return key


def from_cookie(name: str = "herd-session") -> SessionKey:
    """The session ID is the value of cookie ``name``."""

    def key(request: httputil.HTTPServerRequest, uri: str) -> Route | None:
        morsel = request.cookies.get(name)
        return Route(morsel.value, uri) if morsel is not None else None

    key.__doc__ = f"cookie {name}"
    return key


def from_query(name: str = "session") -> SessionKey:
    """The session ID is query parameter ``name`` (left in the forwarded URI)."""

    def key(request: httputil.HTTPServerRequest, uri: str) -> Route | None:
        values = request.query_arguments.get(name)
        return Route(values[0].decode("utf-8", "replace"), uri) if values else None

    key.__doc__ = f"query parameter {name}"
    return key


def from_path() -> SessionKey:
    """The session ID is the first path segment, stripped before forwarding.

    ``/alice/api?x=1`` goes to session ``alice`` as ``/api?x=1``; a relative
    ``Location`` in the response (``/login``) is rewritten to ``/alice/login``.
    """

    def key(request: httputil.HTTPServerRequest, uri: str) -> Route | None:
        path, sep, query = uri.partition("?")
        segment, _slash, rest = path.lstrip("/").partition("/")
        if not segment:
            return None
        forward = "/" + rest + (sep + query if sep else "")
        return Route(urllib.parse.unquote(segment), forward, "/" + segment)

    key.__doc__ = "first path segment"
    return key


def from_callable(find: Callable[[httputil.HTTPServerRequest], str | None]) -> SessionKey:
    """The session ID is whatever ``find(request)`` returns (``None``: no key)."""

    def key(request: httputil.HTTPServerRequest, uri: str) -> Route | None:
        value = find(request)
        return Route(value, uri) if value is not None else None

    key.__doc__ = getattr(find, "__name__", "callable")
    return key


# -- settings ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProxySettings:
    """How a :class:`ProxyHandler` forwards requests.

    :param pool: the pool whose workers serve the sessions.
    :param key: finds the session of a request (default: ``X-Session-ID`` header).
    :param prefix: the path the handler is mounted under, removed before forwarding.
    :param acquire_timeout: seconds to wait for a worker before 503.
    :param connect_timeout: seconds to connect to a worker before 502.
    :param upstream_timeout: seconds for the worker to send its response head
        before 504 (a streaming body may then take as long as it likes).
    :param max_body_size: the largest request body in bytes (``None``: no limit);
        checked against ``Content-Length`` at once and while a body streams.
    :param max_message_size: the largest WebSocket message in bytes.
    :param allow_origin: ``"*"`` accepts WebSocket upgrades from any origin;
        ``None`` applies Tornado's same-origin check.
    :param upstreams: the keep-alive connection pool (one is made if omitted).
    """

    pool: Pool[Any]
    key: SessionKey = dataclasses.field(default_factory=from_header)
    prefix: str = ""
    acquire_timeout: float | None = 30.0
    connect_timeout: float = 10.0
    upstream_timeout: float | None = 300.0
    max_body_size: int | None = None
    max_message_size: int = 64 * 1024 * 1024
    allow_origin: str | None = "*"
    upstreams: UpstreamPool = dataclasses.field(default_factory=lambda: UpstreamPool())

    def __post_init__(self) -> None:
        if self.prefix and (not self.prefix.startswith("/") or self.prefix.endswith("/")):
            raise ValueError(f"prefix must look like '/a/b' (no trailing slash): {self.prefix!r}")
        if self.max_body_size is not None and self.max_body_size < 0:
            raise ValueError("max_body_size must be >= 0 or None")
        if self.max_message_size < 1:
            raise ValueError("max_message_size must be >= 1")


# -- upstream connections -------------------------------------------------------------


class UpstreamPool:
    """Idle keep-alive connections to workers, by address.

    A connection is reused only if the worker left it open (checked with a
    non-blocking peek when it is taken) and idle for less than ``max_idle``.
    """

    def __init__(self, *, per_worker: int = 32, max_idle: float = 30.0) -> None:
        self.per_worker = per_worker
        self.max_idle = max_idle
        self._idle: dict[str, deque[tuple[float, iostream.IOStream]]] = {}

    async def connect(self, address: str, timeout: float) -> tuple[iostream.IOStream, bool]:
        """A connection to ``address`` and whether it is a reused one.

        :raises OSError: the worker refused or did not answer in time.
        """
        idle = self._idle.get(address)
        now = time.monotonic()
        while idle:
            since, stream = idle.pop()
            if now - since < self.max_idle and _still_open(stream):
                return stream, True
            stream.close()
        host, _, port = address.rpartition(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stream = iostream.IOStream(sock)
        try:
            await asyncio.wait_for(stream.connect((host, int(port))), timeout)
        except TimeoutError:
            stream.close()
            raise OSError(errno.ETIMEDOUT, f"connecting to {address} timed out") from None
        except iostream.StreamClosedError as exc:
            stream.close()
            cause = exc.real_error if isinstance(exc.real_error, OSError) else None
            raise cause or OSError(errno.ECONNREFUSED, f"{address} refused") from None
        return stream, False

    def put(self, address: str, stream: iostream.IOStream) -> None:
        """Keep ``stream`` for the next request to ``address``."""
        idle = self._idle.setdefault(address, deque())
        if len(idle) >= self.per_worker or stream.closed():
            stream.close()
            return
        idle.append((time.monotonic(), stream))

    def forget(self, address: str) -> None:
        """Close every idle connection to ``address`` (its worker is gone)."""
        for _, stream in self._idle.pop(address, ()):
            stream.close()

    def close(self) -> None:
        """Close every idle connection."""
        for address in list(self._idle):
            self.forget(address)


def _still_open(stream: iostream.IOStream) -> bool:
    if stream.closed():
        return False
    try:
        stream.socket.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True  # nothing to read: open and quiet, as it should be
    except OSError:
        return False
    return False  # EOF, or stray bytes from an answer nobody asked for: not reusable


# -- the handler ------------------------------------------------------------------------

# Bodies stream through, so no size limit on responses (Tornado's default is 100 MB).
_UPSTREAM_PARAMETERS = HTTP1ConnectionParameters(
    no_keep_alive=False, decompress=False, max_body_size=2**62
)


class _Failure(Exception):
    """An error to answer with a JSON body."""

    def __init__(self, status: int, error: str, message: str, **headers: str) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.headers = headers


class _Response(httputil.HTTPMessageDelegate):
    """Streams the worker's response to the client."""

    def __init__(self, handler: ProxyHandler) -> None:
        self.handler = handler
        self.head = asyncio.get_running_loop().create_future()  # set at the response head
        self.keep_alive = False
        self.started = False
        self.complete = False  # the whole body arrived

    def headers_received(
        self,
        start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
        headers: httputil.HTTPHeaders,
    ) -> None:
        assert isinstance(start_line, httputil.ResponseStartLine)
        if 100 <= start_line.code < 200:
            return  # 100 Continue: Tornado reads on to the real response
        self.keep_alive = start_line.version == "HTTP/1.1" and "close" not in _tokens(
            headers.get("Connection", "")
        )
        self.started = True
        self.handler._send_head(start_line, headers)
        if not self.head.done():
            self.head.set_result(None)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        return self.handler._send_chunk(chunk)

    def finish(self) -> None:
        self.complete = True
        if not self.head.done():
            self.head.set_result(None)

    def on_connection_close(self) -> None:
        if not self.head.done():
            self.head.set_exception(iostream.StreamClosedError())

    def reading_done(self, reading: asyncio.Task[bool]) -> None:
        """The read ended; if no head came (the worker died first), say so.

        Tornado tells the delegate of a closed connection only after a head.
        """
        error = None if reading.cancelled() else reading.exception()
        if not self.head.done():
            self.head.set_exception(error or iostream.StreamClosedError())
        self.head.exception() if not self.head.cancelled() else None  # retrieved: no log noise


def _close_args(code: int | None, reason: str | None) -> tuple[int | None, str | None]:
    """Close code and reason to pass on; 1005/1006 only describe, they are never sent."""
    if code is None or code == 1005:
        return None, None
    if code == 1006:  # the other side vanished without a close frame
        return 1011, "the other side of the proxy dropped the connection"
    return code, reason


def _end_to_end(headers: httputil.HTTPHeaders) -> httputil.HTTPHeaders:
    """A copy without hop-by-hop headers (and those named in ``Connection``).

    Tornado parsed and validated these headers already, so the copy clones its
    name -> values maps instead of re-adding (and re-validating) header by header,
    which costs a tenth of a proxied request. The original is left alone: Tornado
    still reads the body by it.
    """
    named = _tokens(headers.get("Connection", "")) if "Connection" in headers else set()
    copy = httputil.HTTPHeaders()
    try:
        source_list, source_dict = headers._as_list, headers._dict  # type: ignore[attr-defined]
        target_list, target_dict = copy._as_list, copy._dict  # type: ignore[attr-defined]
    except AttributeError:  # pragma: no cover - a Tornado without these internals
        for name, value in headers.get_all():
            if name.lower() not in HOP_BY_HOP and name.lower() not in named:
                copy.add(name, value)
        return copy
    for name, values in source_list.items():
        lower = name.lower()
        if lower not in HOP_BY_HOP and lower not in named:
            target_list[name] = list(values)
            target_dict[name] = source_dict[name]
    return copy


def _tokens(value: str) -> set[str]:
    return {token.strip().lower() for token in value.split(",") if token.strip()}


def _json_error(handler: RequestHandler, failure: _Failure, session_id: str | None) -> None:
    handler.clear()
    handler.set_status(failure.status)
    for name, value in failure.headers.items():
        handler.set_header(name.replace("_", "-"), value)
    handler.set_header("Content-Type", "application/json")
    body: dict[str, Any] = {"error": failure.error, "message": failure.message}
    if session_id is not None:
        body["session_id"] = session_id
    handler.finish(json.dumps(body))


@stream_request_body
class ProxyHandler(websocket.WebSocketHandler):
    """Forwards HTTP requests and WebSocket connections to the session's worker.

    Mount it with a :class:`ProxySettings` (or its fields as keyword arguments)::

        (r"/(.*)", ProxyHandler, {"settings": ProxySettings(pool=pool)})
    """

    SUPPORTED_METHODS = ("GET", "HEAD", "POST", "DELETE", "PATCH", "PUT", "OPTIONS")

    # Per request state (one handler object per request).
    settings_: ProxySettings
    route: Route | None
    session: Session[Any] | None

    def initialize(self, settings: ProxySettings | None = None, **fields: Any) -> None:
        self.settings_ = settings if settings is not None else ProxySettings(**fields)
        self.route = None
        self.session = None
        self._upstream: HTTP1Connection | None = None
        self._stream: iostream.IOStream | None = None
        self._address = ""
        self._response: _Response | None = None
        self._reading: asyncio.Task[bool] | None = None
        self._received = 0
        self._chunked_upstream = False
        self._failed = False
        self._ws_upstream: websocket.WebSocketClientConnection | None = None
        self._ws_pump: asyncio.Task[None] | None = None

    # -- shared: routing and acquiring ---------------------------------------------------

    def _is_websocket(self) -> bool:
        return self.request.headers.get("Upgrade", "").lower() == "websocket"

    async def prepare(self) -> None:
        try:
            self.route = self._find_route()
            if self._is_websocket():
                return
            if self.settings_.max_body_size is not None:
                self._check_declared_length(self.settings_.max_body_size)
            # Tornado's default limit is 100 MB; ours is enforced in data_received.
            self.request.connection.set_max_body_size(2**62)  # type: ignore[union-attr]
            self.session = await self._acquire(self.route)
            await self._start_upstream()
        except _Failure as failure:
            self._fail(failure)

    def _find_route(self) -> Route:
        uri = self.request.uri or "/"
        prefix = self.settings_.prefix
        if prefix:
            if not (uri == prefix or uri.startswith(prefix + "/") or uri.startswith(prefix + "?")):
                raise _Failure(404, "not_found", f"not under {prefix}")
            uri = uri[len(prefix) :]
        if not uri.startswith("/"):
            uri = "/" + uri
        route = self.settings_.key(self.request, uri)
        if route is None:
            how = self.settings_.key.__doc__ or "the session key"
            raise _Failure(400, "no_session", f"no session key in the request (expected {how})")
        try:
            validate_session_id(route.session_id)
        except InvalidSessionIdError as exc:
            raise _Failure(400, "invalid_session", str(exc)) from None
        return route

    def _check_declared_length(self, limit: int) -> None:
        declared = self.request.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _Failure(413, "body_too_large", f"request body over {limit} bytes")

    async def _acquire(self, route: Route) -> Session[Any]:
        pool = self.settings_.pool
        try:
            return await pool.acquire(route.session_id, timeout=self.settings_.acquire_timeout)
        except PoolExhaustedError as exc:
            raise _Failure(503, "pool_exhausted", str(exc), Retry_After="1") from None
        except PoolClosedError as exc:
            raise _Failure(503, "pool_closed", str(exc)) from None
        except SpawnError as exc:
            raise _Failure(502, "spawn_failed", exc.message) from None

    def _fail(self, failure: _Failure) -> None:
        self._failed = True
        log.debug(
            "%s %s -> %d %s (session %s)",
            self.request.method,
            self.request.uri,
            failure.status,
            failure.message,
            self.route.session_id if self.route else "-",
        )
        if self._response is not None and self._response.started:
            # The head is already out: all we can do is cut the response short.
            self._abort()
            return
        if not self._finished:
            _json_error(self, failure, self.route.session_id if self.route else None)
        if failure.status == 413 and self.request.connection is not None:
            # The unread body would follow; stop reading it.
            self.request.connection.close()  # type: ignore[attr-defined]

    def _abort(self) -> None:
        if self.request.connection is not None:
            self.request.connection.close()  # type: ignore[attr-defined]

    async def _worker_failed(self, exc: BaseException) -> _Failure:
        """A connection to the worker failed: is the worker dead? 502 either way."""
        session = self.session
        assert session is not None
        self.settings_.upstreams.forget(self._address)
        alive = await self.settings_.pool.check_worker(session.worker.id)
        state = "alive but refusing" if alive else "dead"
        return _Failure(
            502,
            "worker_unavailable",
            f"worker {session.worker.id} of session {session.session_id!r} is {state}: {exc}",
        )

    # -- HTTP ---------------------------------------------------------------------------

    def _request_headers(self) -> httputil.HTTPHeaders:
        incoming = self.request.headers
        headers = _end_to_end(incoming)
        chunked = "Content-Length" not in incoming and "chunked" in _tokens(
            incoming.get("Transfer-Encoding", "")
        )
        # Tornado's client chunks POST/PUT/PATCH bodies of unknown length by itself;
        # any other method with a chunked body is framed here.
        self._chunked_upstream = chunked and self.request.method not in ("POST", "PUT", "PATCH")
        remote = self.request.remote_ip or ""
        previous = incoming.get("X-Forwarded-For")
        headers["X-Forwarded-For"] = f"{previous}, {remote}" if previous else remote
        headers["X-Forwarded-Proto"] = self.request.protocol
        headers["X-Forwarded-Host"] = incoming.get("Host", "")
        if self._chunked_upstream:
            headers["Transfer-Encoding"] = "chunked"
        return headers

    async def _start_upstream(self, retry: bool = True) -> None:
        session = self.session
        assert session is not None
        assert self.route is not None
        self._address = session.worker.address
        try:
            stream, reused = await self.settings_.upstreams.connect(
                self._address, self.settings_.connect_timeout
            )
        except OSError as exc:
            raise await self._worker_failed(exc) from None
        self._stream = stream
        self._upstream = HTTP1Connection(stream, True, _UPSTREAM_PARAMETERS)
        start = httputil.RequestStartLine(self.request.method or "GET", self.route.uri, "HTTP/1.1")
        self._response = _Response(self)
        try:
            await self._upstream.write_headers(start, self._request_headers())
        except iostream.StreamClosedError as exc:
            if reused and retry:  # the worker closed an idle connection: once more, fresh
                self._stream.close()
                await self._start_upstream(retry=False)
                return
            raise await self._worker_failed(exc) from None
        self._reading = asyncio.ensure_future(self._upstream.read_response(self._response))
        self._reading.add_done_callback(self._response.reading_done)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        if self._failed or self._upstream is None:
            return None
        self._received += len(chunk)
        limit = self.settings_.max_body_size
        if limit is not None and self._received > limit:
            self._fail(_Failure(413, "body_too_large", f"request body over {limit} bytes"))
            return None
        if self._chunked_upstream:
            chunk = b"%x\r\n%b\r\n" % (len(chunk), chunk)
        return self._upstream.write(chunk)

    async def _proxy(self) -> None:
        if self._failed or self._finished:
            return
        upstream, response, reading = self._upstream, self._response, self._reading
        assert upstream is not None
        assert response is not None
        assert reading is not None
        try:
            if self._chunked_upstream:
                await upstream.write(b"0\r\n\r\n")
            upstream.finish()
            async with asyncio.timeout(self.settings_.upstream_timeout):
                await response.head  # 504 only while waiting for the head
            open_after = await reading
        except TimeoutError:
            self._discard_upstream()
            raise _Failure(
                504,
                "upstream_timeout",
                f"worker sent no response within {self.settings_.upstream_timeout:g}s",
            ) from None
        except (iostream.StreamClosedError, httputil.HTTPInputError) as exc:
            self._discard_upstream()
            if response.started:
                self._abort()
                return
            raise await self._worker_failed(exc) from None
        if self._done():  # the client went away while the response streamed
            return
        if not response.complete:  # the worker's body ended short: cut ours short too
            self._discard_upstream()
            self._abort()
            return
        if open_after and response.keep_alive and self._stream is not None:
            self.settings_.upstreams.put(self._address, upstream.detach())
            self._stream = None
        else:
            self._discard_upstream()
        self.finish()

    def _done(self) -> bool:
        return self._finished

    def _discard_upstream(self) -> None:
        if self._reading is not None and not self._reading.done():
            self._reading.cancel()
        if self._upstream is not None:
            self._upstream.close()
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def _send_head(
        self, start_line: httputil.ResponseStartLine, headers: httputil.HTTPHeaders
    ) -> None:
        self.set_status(start_line.code, start_line.reason or None)
        headers = _end_to_end(headers)
        location = headers.get("Location")
        if location is not None:
            headers["Location"] = self._rewrite_location(location)
        # The worker's headers as they are (Tornado parsed and validated them), in
        # place of the handler's defaults (Server, Content-Type, Date).
        self._headers = headers

    def _rewrite_location(self, location: str) -> str:
        assert self.route is not None
        if location.startswith(f"http://{self._address}"):
            location = location[len(f"http://{self._address}") :] or "/"
        if self.route.prefix and location.startswith("/") and not location.startswith("//"):
            return self.settings_.prefix + self.route.prefix + location
        if self.settings_.prefix and location.startswith("/") and not location.startswith("//"):
            return self.settings_.prefix + location
        return location

    def _send_chunk(self, chunk: bytes) -> Awaitable[None] | None:
        if self._finished or self.request.method == "HEAD":
            return None
        self.write(chunk)
        return self.flush()

    def clear(self) -> None:
        # Tornado's version formats Date/Server/Content-Type defaults on every
        # request; a proxied response replaces them with the worker's headers, and
        # the JSON errors set their own.
        self._headers = httputil.HTTPHeaders()
        self._write_buffer: list[bytes] = []
        self._status_code = 200
        self._reason = "OK"

    def compute_etag(self) -> str | None:
        return None  # the worker's response is passed through as it is

    async def get(self, *args: str) -> None:
        if self._is_websocket():
            await self._open_websocket(*args)
        else:
            await self._run(self._proxy)

    async def _run(self, step: Callable[[], Awaitable[None]]) -> None:
        try:
            await step()
        except _Failure as failure:
            self._fail(failure)

    async def head(self, *args: str) -> None:
        await self._run(self._proxy)

    post = put = patch = delete = options = head

    def on_connection_close(self) -> None:
        if self.ws_connection is not None:
            super().on_connection_close()
            return
        # The client vanished mid-request: stop the upstream request too.
        self._discard_upstream()
        self._close_use()

    def on_finish(self) -> None:
        if self.ws_connection is not None:
            return  # the 101 handshake "finished": the use lasts until the socket closes
        self._close_use()

    def _close_use(self) -> None:
        if self.session is not None:
            self.session.close_nowait()

    # -- WebSocket ------------------------------------------------------------------------

    def check_origin(self, origin: str) -> bool:
        if self.settings_.allow_origin == "*":
            return True
        return super().check_origin(origin)

    def get_compression_options(self) -> dict[str, Any] | None:
        return None

    async def _open_websocket(self, *args: str) -> None:
        assert self.route is not None
        try:
            self.session = await self._acquire(self.route)
            self._address = self.session.worker.address
            requested = [
                p.strip()
                for p in self.request.headers.get("Sec-WebSocket-Protocol", "").split(",")
                if p.strip()
            ]
            headers = {
                k: v
                for k, v in self.request.headers.get_all()
                if k.lower() in ("cookie", "authorization", "origin", "user-agent")
            }
            upstream_request = HTTPRequest(
                f"ws://{self._address}{self.route.uri}",
                headers=headers,
                connect_timeout=self.settings_.connect_timeout,
                request_timeout=self.settings_.upstream_timeout or 0,
            )
            try:
                self._ws_upstream = await websocket.websocket_connect(
                    upstream_request,
                    subprotocols=requested or None,
                    max_message_size=self.settings_.max_message_size,
                    on_message_callback=None,
                )
            except (OSError, iostream.StreamClosedError) as exc:
                raise await self._worker_failed(exc) from None
            except Exception as exc:  # the worker answered, but not with a WebSocket
                code = getattr(exc, "code", 502)
                raise _Failure(
                    502, "websocket_refused", f"worker refused the WebSocket ({code}): {exc}"
                ) from None
        except _Failure as failure:
            self._fail(failure)
            self._close_use()
            return
        await super().get(*args)
        if self.ws_connection is None:  # the client handshake failed
            self._ws_upstream.close()
            self._close_use()

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        upstream = self._ws_upstream
        return upstream.selected_subprotocol if upstream is not None else None

    def open(self, *args: str) -> None:
        assert self._ws_upstream is not None
        self._ws_pump = asyncio.ensure_future(self._pump_from_worker(self._ws_upstream))

    async def _pump_from_worker(self, upstream: websocket.WebSocketClientConnection) -> None:
        try:
            while True:
                message = await upstream.read_message()
                if message is None:
                    break
                await self.write_message(message, binary=isinstance(message, bytes))
        except websocket.WebSocketClosedError:
            pass  # the client went away; on_close handles the worker side
        finally:
            code, reason = upstream.close_code, upstream.close_reason
            if code is None:
                # Tornado cannot tell a dropped connection from a close frame without a
                # code; both reach the client as 1011 (the worker went away).
                code = 1006
            upstream.close()
            if self.ws_connection is not None and not self.ws_connection.is_closing():
                self.close(*_close_args(code, reason))
            self._close_use()

    async def on_message(self, message: str | bytes) -> None:
        upstream = self._ws_upstream
        if upstream is None:
            return
        try:
            await upstream.write_message(message, binary=isinstance(message, bytes))
        except websocket.WebSocketClosedError:
            self.close(1011, "worker connection closed")

    def on_ping(self, data: bytes) -> None:
        if self._ws_upstream is not None and self._ws_upstream.protocol is not None:
            with contextlib.suppress(websocket.WebSocketClosedError):
                self._ws_upstream.ping(data)

    def on_close(self) -> None:
        upstream = self._ws_upstream
        if upstream is not None:
            upstream.close(*_close_args(self.close_code, self.close_reason))
        self._close_use()
