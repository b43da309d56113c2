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
Upstream connections are kept alive per worker, and closed once idle for a while
or once the worker has closed its end (:class:`UpstreamPool`). Tornado's
own HTTP client opens a connection per request, so the upstream side drives
:class:`tornado.http1connection.HTTP1Connection` in client mode directly.

A WebSocket is a tunnel: the client's handshake goes to the worker as it is
(but what :meth:`ProxyHandler.forward_headers` and ``forward_uri`` take out), the
worker's answer (its accept value, its choice of subprotocol) comes back as it is
(plus the handler's default headers, if it sets any), and from then on two
asyncio protocols pass frames as bytes both ways, with pause/resume
backpressure; a header-only frame meter enforces the message size (1009) and
notices a worker that vanishes without a close frame (1011).

Errors are JSON bodies ``{"error": ..., "message": ...}``: no key or an invalid
session ID → 400; a body whose length is ambiguous (two ``Content-Length``
values, ``+3``, ``Content-Length`` with ``Transfer-Encoding``) or a WebSocket
upgrade on a method other than GET → 400, before any worker is involved (and a
WebSocket handshake that :meth:`ProxyHandler.check_websocket_origin` refuses → 403);
body too large → 413; a request head over the server's ``max_header_size`` → 431 (with
:class:`ProxyServer`); pool exhausted → 503 with ``Retry-After``; worker dead,
refused or not starting → 502 (a refused connection sends the worker through the
pool's crash path at once); no response head within ``upstream_timeout`` → 504.
An error answered before the request body was read closes the connection, and
says so (``Connection: close``). A client that disconnects cancels the upstream
request.

Usage::

    app = tornado.web.Application([
        (r"/(.*)", herd.proxy.ProxyHandler, {"pool": pool, "key": herd.proxy.from_header()}),
    ])
    herd.proxy.ProxyServer(app, max_body_size=2**62).listen(8000)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import json
import logging
import os
import socket
import time
import urllib.parse
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, cast

from tornado import httputil, iostream
from tornado.http1connection import HTTP1Connection, HTTP1ConnectionParameters
from tornado.httpserver import HTTPServer
from tornado.web import RequestHandler, stream_request_body

from ._client import connect_socket
from ._exceptions import (
    InvalidSessionIdError,
    PoolClosedError,
    PoolExhaustedError,
    SpawnError,
)
from ._pool import Pool
from ._protocols import SocketOpener
from ._session import Session, session_tag, validate_session_id

__all__ = [
    "ProxyHandler",
    "ProxyServer",
    "ProxySettings",
    "Route",
    "SessionKey",
    "TunnelCount",
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


class TunnelCount:
    """How many WebSocket tunnels are open: shared by :class:`ProxySettings` (whose
    handlers count them) and :class:`ProxyServer` (whose connection cap includes them).
    """

    def __init__(self) -> None:
        self.open = 0

    def __repr__(self) -> str:
        return f"<TunnelCount open={self.open}>"


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
    :param max_message_size: the largest WebSocket message from a client, in bytes
        (a bigger one closes the connection with 1009).
    :param upstreams: the keep-alive connection pool (one is made if omitted).
    :param tunnels: counts the open WebSocket tunnels; give the same counter to
        :class:`ProxyServer` so that they count against its ``max_connections``
        (Tornado lets go of a connection once it is a tunnel).
    """

    pool: Pool[Any]
    key: SessionKey = dataclasses.field(default_factory=from_header)
    prefix: str = ""
    acquire_timeout: float | None = 30.0
    connect_timeout: float = 10.0
    upstream_timeout: float | None = 300.0
    max_body_size: int | None = None
    max_message_size: int = 64 * 1024 * 1024
    upstreams: UpstreamPool = dataclasses.field(default_factory=lambda: UpstreamPool())
    tunnels: TunnelCount = dataclasses.field(default_factory=lambda: TunnelCount())

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

    At most ``per_worker`` idle connections are kept per address, and every
    ``prune_interval`` seconds (while any are kept) :meth:`prune` closes those idle
    for ``max_idle`` or more and those the worker closed: a killed or retired
    worker's connections would otherwise sit in ``CLOSE_WAIT`` for good, since its
    successor listens on another port and nobody asks for the old one again. So
    the pool holds at most ``per_worker`` connections per live worker, and none a
    ``max_idle`` after the traffic stops.

    :param per_worker: idle connections kept per address at most.
    :param max_idle: seconds an idle connection is kept.
    :param prune_interval: seconds between prunes (``0``: none; a connection is then
        checked only when it is taken).
    """

    def __init__(
        self, *, per_worker: int = 32, max_idle: float = 30.0, prune_interval: float = 1.0
    ) -> None:
        if per_worker < 0 or max_idle < 0 or prune_interval < 0:
            raise ValueError("per_worker, max_idle and prune_interval must be >= 0")
        self.per_worker = per_worker
        self.max_idle = max_idle
        self.prune_interval = prune_interval
        # Oldest first; connect() takes the newest. An address with none has no key.
        self._idle: dict[str, deque[tuple[float, iostream.IOStream]]] = {}
        self._pruner: asyncio.TimerHandle | None = None  # set while any are kept

    def idle_count(self) -> int:
        """Idle connections kept, all addresses together."""
        return sum(len(idle) for idle in self._idle.values())

    async def connect(
        self,
        address: str,
        timeout: float,
        open_socket: Callable[[], socket.socket] | None = None,
    ) -> tuple[iostream.IOStream, bool]:
        """A connection to ``address`` and whether it is a reused one.

        :param open_socket: makes a new connection's socket (a worker in a network
            namespace of its own is reachable only from sockets made there).
        :raises OSError: the worker refused or did not answer in time.
        """
        idle = self._idle.get(address)
        now = time.monotonic()
        while idle:
            since, stream = idle.pop()
            if not idle:
                del self._idle[address]
            if now - since < self.max_idle and _still_open(stream):
                return stream, True
            stream.close()
        host, _, port = address.rpartition(":")
        sock = open_socket() if open_socket is not None else socket.socket()
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
        idle = self._idle.get(address)
        if stream.closed() or len(idle or ()) >= self.per_worker:
            stream.close()
            return
        if idle is None:
            idle = self._idle[address] = deque()
        idle.append((time.monotonic(), stream))
        self._schedule_prune()

    def prune(self) -> int:
        """Close the idle connections kept ``max_idle`` or longer and those whose
        worker has closed its end (or sent bytes nobody asked for); how many."""
        now = time.monotonic()
        closed = 0
        for address, idle in list(self._idle.items()):
            keep: deque[tuple[float, iostream.IOStream]] = deque()
            for since, stream in idle:
                if now - since < self.max_idle and _still_open(stream):
                    keep.append((since, stream))
                else:
                    stream.close()
                    closed += 1
            if keep:
                self._idle[address] = keep
            else:
                del self._idle[address]
        return closed

    def forget(self, address: str) -> None:
        """Close every idle connection to ``address`` (its worker is gone)."""
        for _, stream in self._idle.pop(address, ()):
            stream.close()

    def close(self) -> None:
        """Close every idle connection (and stop pruning until one is kept again)."""
        for address in list(self._idle):
            self.forget(address)
        if self._pruner is not None:
            self._pruner.cancel()
            self._pruner = None

    def _schedule_prune(self) -> None:
        if self._pruner is not None or not self.prune_interval:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on a loop (a test filling the pool by hand)
            return
        self._pruner = loop.call_later(self.prune_interval, self._prune_tick)

    def _prune_tick(self) -> None:
        self._pruner = None
        closed = self.prune()
        if closed:
            log.debug("closed %d idle upstream connection(s); %d kept", closed, self.idle_count())
        if self._idle:
            self._schedule_prune()


def _socket_maker(worker: object) -> Callable[[], socket.socket] | None:
    """The worker's ``open_socket`` (a worker with a network of its own has one)."""
    return worker.open_socket if isinstance(worker, SocketOpener) else None


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


# -- the server -------------------------------------------------------------------------


class ProxyServer(HTTPServer):
    """A Tornado :class:`~tornado.httpserver.HTTPServer` for the proxy: it answers a
    request head over ``max_header_size`` with ``431 Request Header Fields Too
    Large``, and takes at most ``max_connections`` client connections.

    Tornado's own server closes an over-long head's connection without a word, and
    a client (or the load balancer in front) cannot tell that from a crash. Past
    ``max_connections`` (``None``: no cap) a new connection gets a canned 503
    (``too_many_connections``, ``Connection: close``) and is closed at once,
    unread: refusing costs one write, and the connections already open are served
    on, so a flood of idle connections cannot take the descriptors that health
    probes, spawns and the workers' own traffic need. Takes ``HTTPServer``'s
    arguments besides; TLS connections keep Tornado's head handling.
    """

    def initialize(
        self,
        *args: Any,
        max_connections: int | None = None,
        tunnels: TunnelCount | None = None,
        **kwargs: Any,
    ) -> None:
        super().initialize(*args, **kwargs)
        if max_connections is not None and max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, not {max_connections}")
        self.max_connections = max_connections
        #: The WebSocket tunnels of the handlers behind this server (their
        #: :class:`ProxySettings`' ``tunnels``): they count as connections.
        self.tunnels = tunnels if tunnels is not None else TunnelCount()
        #: Connections refused at the cap so far.
        self.refused = 0

    @property
    def open_connections(self) -> int:
        """Client connections open: those Tornado serves, and the WebSocket tunnels."""
        return len(self._connections) + self.tunnels.open

    def handle_stream(self, stream: iostream.IOStream, address: tuple[Any, ...]) -> None:
        cap = self.max_connections
        if cap is not None and self.open_connections >= cap:
            self.refused += 1
            log.warning(
                "refusing a connection: %d open (max_connections %d)", self.open_connections, cap
            )
            with contextlib.suppress(OSError):
                stream.socket.send(_REFUSED)  # best effort: never wait on a refused client
            stream.close()
            return
        if type(stream) is iostream.IOStream:
            # A fresh stream on the same socket: the one TCPServer made has not
            # registered with the loop or read anything yet.
            stream = _HeadLimitStream(
                stream.socket,
                self.conn_params.max_header_size,
                max_buffer_size=stream.max_buffer_size,
                read_chunk_size=stream.read_chunk_size,
            )
        super().handle_stream(stream, address)


_REFUSED_BODY = json.dumps(
    {"error": "too_many_connections", "message": "the gateway is at its connection limit"}
).encode()
_REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json\r\n"
    b"Connection: close\r\n"
    b"Retry-After: 1\r\n"
    b"Content-Length: " + str(len(_REFUSED_BODY)).encode() + b"\r\n\r\n" + _REFUSED_BODY
)


class _HeadLimitStream(iostream.IOStream):
    """An IOStream that, closed for a request head over the limit, says 431 first.

    Tornado reads a request head with ``read_until_regex(max_bytes=...)``, and the
    stream closes itself with :class:`~tornado.iostream.UnsatisfiableReadError`
    when the limit is hit (bodies use ``read_bytes`` and ``read_until``). Instead of
    closing the socket at once, with the rest of the head unread (a reset, which
    would destroy the answer), the answer goes out, then our end of the stream, and
    the socket is closed once the client closes its end or after a few seconds.
    """

    def __init__(self, sock: socket.socket, limit: int, **kwargs: Any) -> None:
        super().__init__(sock, **kwargs)
        self.limit = limit
        self.reading_head = False  # the last bounded read was a request head

    def read_until_regex(self, regex: bytes, max_bytes: int | None = None) -> Awaitable[bytes]:
        self.reading_head = True
        return super().read_until_regex(regex, max_bytes)

    def read_until(self, delimiter: bytes, max_bytes: int | None = None) -> Awaitable[bytes]:
        self.reading_head = False
        return super().read_until(delimiter, max_bytes)

    def close_fd(self) -> None:
        if (
            self.reading_head
            and isinstance(self.error, iostream.UnsatisfiableReadError)
            and not self.writing()  # a response still going out: no room for ours
        ):
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # closed at shutdown, after the loop: no time to answer
                super().close_fd()
                return
            sock, self.socket = self.socket, None  # type: ignore[assignment]
            task = loop.create_task(_answer_and_close(sock, _head_too_large(self.limit)))
            _closing.add(task)
            task.add_done_callback(_closing.discard)
            return
        super().close_fd()


_closing: set[asyncio.Task[None]] = set()  # referenced until done (the loop keeps weak refs)
_CLOSE_TIMEOUT = 5.0  # for a client to read an error answer and close its end


def _head_too_large(limit: int) -> bytes:
    body = json.dumps(
        {"error": "head_too_large", "message": f"request line and headers over {limit} bytes"}
    ).encode()
    return (
        b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
        b"Content-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
    )


async def _answer_and_close(sock: socket.socket, answer: bytes) -> None:
    """Send ``answer``, end our stream, discard what the client still sends, close."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(_CLOSE_TIMEOUT):
            await loop.sock_sendall(sock, answer)
            sock.shutdown(socket.SHUT_WR)
            while await loop.sock_recv(sock, 65536):
                pass
    except (OSError, TimeoutError):
        pass
    finally:
        sock.close()


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
        if not self.head.cancelled():
            self.head.exception()  # mark it retrieved: no "never retrieved" log noise


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
class ProxyHandler(RequestHandler):
    """Forwards HTTP requests and WebSocket connections to the session's worker.

    Mount it with a :class:`ProxySettings` (or its fields as keyword arguments)::

        (r"/(.*)", ProxyHandler, {"settings": ProxySettings(pool=pool)})

    Hooks for a subclass that puts the proxy behind an application's own login
    (herd_nb's ``HerdProxyHandler`` uses them to apply Jupyter's rules); each is
    called on the loop thread, once per request, and does nothing by default:

    - :meth:`set_default_headers` (Tornado's): headers every answer carries, the
      JSON errors and the worker's responses alike (see :meth:`clear`);
    - :meth:`check_websocket_origin`: whether a WebSocket handshake may go on;
    - :meth:`forward_headers` and :meth:`forward_uri`: what of the client's
      request the worker gets (say, minus the application's own credentials).
    """

    #: Default headers (from :meth:`set_default_headers`) that a worker's header of
    #: the same name does not replace but goes alongside: a browser enforces every
    #: Content-Security-Policy it receives, so neither policy can loosen the other.
    ADDITIVE_DEFAULT_HEADERS = frozenset({"Content-Security-Policy"})

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
        self._websocket = False
        self._failed = False
        self._request_sent = False  # the whole request went upstream (finish() called)
        self._client_gone = False  # the client closed its connection (on_connection_close)

    # -- shared: routing and acquiring ---------------------------------------------------

    async def prepare(self) -> None:
        # Everything that can be refused is refused here, before acquire: a bad
        # request never costs a worker (or a spawn) anything.
        try:
            self.route = self._find_route()
            upgrade = self.request.headers.get("Upgrade")
            if upgrade is not None and upgrade.lower() == "websocket":
                if self.request.method != "GET":
                    raise _Failure(
                        400,
                        "bad_upgrade",
                        f"a WebSocket handshake is a GET, not {self.request.method}",
                    )
                if not self.check_websocket_origin():
                    raise _Failure(403, "cross_origin", "Cross origin websockets not allowed")
                self._websocket = True
                return
            self._check_framing()
            # Tornado's default limit is 100 MB; ours is enforced in data_received.
            self.request.connection.set_max_body_size(2**62)  # type: ignore[union-attr]
            self.session = await self._acquire(self.route)
            await self._start_upstream()
        except _Failure as failure:
            self._fail(failure, body_unread=True)

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
        forward = self.forward_uri(route.uri)
        return route if forward == route.uri else dataclasses.replace(route, uri=forward)

    # -- hooks ----------------------------------------------------------------------------

    def check_websocket_origin(self) -> bool:
        """Whether this WebSocket handshake may go on to a worker.

        Called by :meth:`prepare` for every WebSocket upgrade (after the session key
        is found, before a worker is acquired); ``False`` answers 403
        ``cross_origin``. Browsers let any page open a WebSocket to any site, with
        that site's cookies, so a subclass whose users log in with a cookie must
        check ``Origin`` here, as Tornado's ``WebSocketHandler.check_origin`` does.
        The default lets every handshake through: the proxy itself has no login.
        """
        return True

    def forward_headers(self, headers: httputil.HTTPHeaders) -> None:
        """Edit, in place, the request headers about to go to the worker.

        Called for every proxied request and every WebSocket handshake, with a copy
        of the client's end-to-end headers and herd's ``X-Forwarded-*`` already
        added. The default forwards them all.
        """

    def forward_uri(self, uri: str) -> str:
        """The path and query string to ask the worker for, given the client's.

        Called once per request, when its :class:`Route` is found (the log lines
        show what it returns). The default forwards ``uri`` as it is.
        """
        return uri

    def _check_framing(self) -> None:
        """Refuse a body whose length a proxy would have to guess; check the size limit.

        RFC 9112 §6.3: an invalid ``Content-Length`` (Tornado joins two headers into
        ``"3,3"``), or one alongside ``Transfer-Encoding``, is a 400 and the end of
        the connection, since where the next request starts is unknown. Tornado
        would refuse some of these too, but only after the head went to a worker.
        """
        headers = self.request.headers
        declared = headers.get("Content-Length")
        encoding = headers.get("Transfer-Encoding")
        if declared is not None:
            if not (declared.isdigit() and declared.isascii()):
                raise _Failure(
                    400, "bad_framing", f"Content-Length must be one decimal number: {declared!r}"
                )
            if encoding is not None:
                raise _Failure(400, "bad_framing", "both Content-Length and Transfer-Encoding")
            limit = self.settings_.max_body_size
            if limit is not None and int(declared) > limit:
                raise _Failure(413, "body_too_large", f"request body over {limit} bytes")
        elif encoding is not None:
            if encoding.lower() != "chunked":  # the only coding HTTP/1.1 requires (as Tornado)
                raise _Failure(400, "bad_framing", f"unsupported Transfer-Encoding: {encoding!r}")
            # Tornado's client chunks POST/PUT/PATCH bodies of unknown length by
            # itself; any other method with a chunked body is framed here.
            self._chunked_upstream = self.request.method not in ("POST", "PUT", "PATCH")

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

    def _fail(self, failure: _Failure, *, body_unread: bool = False) -> None:
        """Answer with ``failure`` as JSON, or cut a response already under way short.

        :param body_unread: the request body (if any) is still to come. Tornado then
            closes the connection once the answer is out (it will not read a body
            for nobody), so the answer says ``Connection: close``.
        """
        self._failed = True
        if log.isEnabledFor(logging.DEBUG):
            # What the worker would be asked for (no credentials the handler
            # strips), and the session's tag, never its ID.
            route = self.route
            tag = session_tag(route.session_id) if route else "-"
            message = failure.message
            if route and route.session_id:
                message = message.replace(route.session_id, tag)
            log.debug(
                "%s %s -> %d %s (session %s)",
                self.request.method,
                route.uri if route else "-",
                failure.status,
                message,
                tag,
            )
        if self._response is not None and self._response.started:
            # The head is already out: all we can do is cut the response short.
            self._abort()
            return
        if not self._finished:
            if body_unread or failure.status == 413:
                failure.headers["Connection"] = "close"
            _json_error(self, failure, self.route.session_id if self.route else None)
        if (
            failure.status == 413 or failure.error == "bad_framing"
        ) and self.request.connection is not None:
            # The unread body would follow (or its end is unknown); stop reading it.
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
        headers = _end_to_end(self.request.headers)
        self._add_forwarded(headers, self.request.protocol)
        self.forward_headers(headers)
        if self._chunked_upstream:
            headers["Transfer-Encoding"] = "chunked"
        return headers

    def _add_forwarded(self, headers: httputil.HTTPHeaders, proto: str) -> None:
        """X-Forwarded-For (appended to), -Proto and -Host, for the worker."""
        remote = self.request.remote_ip or ""
        previous = self.request.headers.get("X-Forwarded-For")
        headers["X-Forwarded-For"] = f"{previous}, {remote}" if previous else remote
        headers["X-Forwarded-Proto"] = proto
        headers["X-Forwarded-Host"] = self.request.headers.get("Host", "")

    async def _start_upstream(self, retry: bool = True) -> None:
        session = self.session
        assert session is not None
        assert self.route is not None
        self._address = session.worker.address
        try:
            stream, reused = await self.settings_.upstreams.connect(
                self._address, self.settings_.connect_timeout, _socket_maker(session.worker)
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
            self._request_sent = True
            async with asyncio.timeout(self.settings_.upstream_timeout):
                await response.head  # 504 only while waiting for the head
            open_after = await reading
        except asyncio.CancelledError:
            if self._client_gone and reading.cancelled():
                return  # on_connection_close stopped the read: nobody to answer
            raise
        except TimeoutError:
            self._discard_upstream()
            raise _Failure(
                504,
                "upstream_timeout",
                f"worker sent no response within {self.settings_.upstream_timeout:g}s",
            ) from None
        except (iostream.StreamClosedError, httputil.HTTPInputError) as exc:
            self._discard_upstream()
            if response.started or self._client_gone:
                self._abort()
                return  # (a client that left says nothing about the worker)
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
        if not self._client_gone:
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
        self._merge_default_headers(headers)
        # The worker's headers as they are (Tornado parsed and validated them), in
        # place of Tornado's own (Server, Content-Type, Date).
        self._headers = headers

    def _merge_default_headers(self, headers: httputil.HTTPHeaders) -> None:
        """Put :meth:`set_default_headers`'s headers into a worker's answer."""
        defaults = self._default_headers
        if not defaults:
            return
        # The handler's defaults (a host application's security headers) win over
        # the worker's, as they would on the host's own pages.
        for name in defaults:
            if name in headers and name not in self.ADDITIVE_DEFAULT_HEADERS:
                del headers[name]
        for name, value in defaults.get_all():
            headers.add(name, value)

    def _handshake_answer(self, head: bytes) -> bytes:
        """The worker's answer to a WebSocket handshake, for the client: as it is,
        but with :meth:`set_default_headers`'s headers, as on any other answer."""
        if not self._default_headers:
            return head
        status, _, fields = head.decode("latin-1").partition("\r\n")
        headers = httputil.HTTPHeaders.parse(fields)
        self._merge_default_headers(headers)
        lines = [status, *(f"{name}: {value}" for name, value in headers.get_all())]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

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
        """Reset the answer: no headers but :meth:`set_default_headers`'s.

        Tornado's version formats Date/Server/Content-Type defaults on every
        request; a proxied response replaces them with the worker's headers, and
        the JSON errors set their own. What :meth:`set_default_headers` sets (by
        default: nothing) is kept for both: the JSON errors start from it (they
        call this), and a worker's response gets it over its own headers, each
        replacing the worker's header of that name (but those in
        :attr:`ADDITIVE_DEFAULT_HEADERS`, added alongside).
        """
        self._headers = httputil.HTTPHeaders()
        self._write_buffer: list[bytes] = []
        self._status_code = 200
        self._reason = "OK"
        self.set_default_headers()
        self._default_headers = self._headers.copy() if self._headers else None

    def compute_etag(self) -> str | None:
        return None  # the worker's response is passed through as it is

    async def get(self, *args: str) -> None:
        await self._run(self._tunnel_websocket if self._websocket else self._proxy)

    async def _run(self, step: Callable[[], Awaitable[None]]) -> None:
        try:
            await step()
        except _Failure as failure:
            self._fail(failure)

    async def head(self, *args: str) -> None:
        await self._run(self._proxy)

    post = put = patch = delete = options = head

    # -- WebSocket ------------------------------------------------------------------------
    #
    # A tunnel, as nginx does it: the client's handshake goes to the worker as it is
    # (its own Sec-WebSocket-Key, subprotocols and extensions), the worker's answer
    # comes back as it is (so the worker's subprotocol choice wins), and then frames
    # pass as bytes: client frames are already masked as a server expects, worker
    # frames unmasked as a client expects. Pings, pongs, close codes and reasons
    # pass untouched. _FrameMeter reads only frame headers, to enforce the message
    # size limit and to see whether a close frame went by.

    async def _tunnel_websocket(self) -> None:
        assert self.route is not None
        route = self.route
        self.session = await self._acquire(route)
        self._address = self.session.worker.address
        host, _, port = self._address.rpartition(":")
        loop = asyncio.get_running_loop()
        worker_side = _Pipe(_FrameMeter(None), expect_head=True)
        try:
            async with asyncio.timeout(self.settings_.connect_timeout):
                connected = await connect_socket(
                    host, int(port), _socket_maker(self.session.worker)
                )
                await loop.create_connection(lambda: worker_side, sock=connected)
        except (OSError, TimeoutError) as exc:
            raise await self._worker_failed(exc) from None
        try:
            head = await self._upstream_handshake(worker_side, route)
        except BaseException:
            worker_side.close()
            raise
        status = int(head.split(b" ", 2)[1])
        if status != 101:
            worker_side.close()
            raise _Failure(
                502,
                "websocket_refused",
                f"worker answered the WebSocket handshake with HTTP {status}",
            )
        try:
            answer = self._handshake_answer(head)
        except httputil.HTTPInputError:
            worker_side.close()
            raise _Failure(
                502, "bad_handshake", "worker sent a malformed handshake answer"
            ) from None
        client_side = _Pipe(_FrameMeter(self.settings_.max_message_size))
        started = time.monotonic()
        sock: socket.socket | None = None  # the client's, until a transport owns it
        # From here on, whatever fails (a dup at the fd limit, a transport that
        # cannot start, cancellation) releases the client's socket, the worker's
        # connection and the session's use: a use left open pins the session forever.
        tunnels = self.settings_.tunnels
        tunnels.open += 1  # no longer Tornado's to count: ours, until it closes
        try:
            stream = self.detach()  # Tornado lets go of the connection here
            # The client sends nothing before our 101, so Tornado holds none of its
            # bytes: the socket moves to an asyncio transport (a dup, as closing the
            # IOStream closes its own descriptor).
            try:
                sock = socket.socket(fileno=os.dup(stream.socket.fileno()))
            finally:
                stream.close()
            await loop.connect_accepted_socket(lambda: client_side, sock)
            sock = None
            client_side.peer, worker_side.peer = worker_side, client_side
            log.info(
                "websocket %s session=%s worker=%s open",
                route.uri,
                session_tag(route.session_id),
                self.session.worker.id,
            )
            client_side.send(answer + worker_side.take_early_bytes())
            worker_side.send(client_side.take_early_bytes())  # none, from a client that waits
            await asyncio.wait(
                [client_side.done, worker_side.done], return_when=asyncio.FIRST_COMPLETED
            )
            if client_side.meter.too_big:
                await self._refuse_message(client_side, worker_side)
            elif worker_side.done.done() and not worker_side.meter.saw_close:
                client_side.send(_close_frame(1011, "the worker went away"))
        finally:
            tunnels.open -= 1
            if sock is not None:
                sock.close()
            client_side.close()
            worker_side.close()
            self._close_use()
            log.info(
                "websocket %s session=%s worker=%s closed after %.1fs",
                route.uri,
                session_tag(route.session_id),
                self.session.worker.id,
                time.monotonic() - started,
            )

    async def _refuse_message(self, client_side: _Pipe, worker_side: _Pipe) -> None:
        """A client message over the size limit: close both ends with 1009, cleanly.

        The rest of the message is still arriving. Closing the socket on unread
        bytes would reset the connection, and the client would likely lose the
        close frame, so the client side sends its close frame and its end of the
        stream, then reads on (discarding) until the client answers or goes away.
        """
        reason = "message too big"
        # The worker is the server of its connection: a masked frame, then the end
        # (close() flushes first, and stops relaying the worker's answer).
        worker_side.send(_close_frame(1009, reason, masked=True))
        worker_side.close()
        client_side.send(_close_frame(1009, reason))
        await client_side.linger(_CLOSE_LINGER)

    async def _upstream_handshake(self, worker_side: _Pipe, route: Route) -> bytes:
        headers = _end_to_end(self.request.headers)
        headers["Connection"] = "Upgrade"
        headers["Upgrade"] = self.request.headers.get("Upgrade", "websocket")
        self._add_forwarded(headers, "wss" if self.request.protocol == "https" else "ws")
        self.forward_headers(headers)
        lines = [f"GET {route.uri} HTTP/1.1"]
        lines += [f"{name}: {value}" for name, value in headers.get_all()]
        worker_side.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        try:
            async with asyncio.timeout(self.settings_.upstream_timeout):
                head = await worker_side.head
        except TimeoutError:
            raise _Failure(
                504,
                "upstream_timeout",
                "worker did not answer the WebSocket "
                f"handshake within {self.settings_.upstream_timeout:g}s",
            ) from None
        except ConnectionError as exc:
            raise await self._worker_failed(exc) from None
        if not head.startswith(b"HTTP/1.1 ") or len(head.split(b" ", 2)) < 3:
            raise _Failure(502, "bad_handshake", "worker sent a malformed handshake answer")
        return head

    def on_connection_close(self) -> None:
        # The client vanished mid-request: stop the upstream request too. Unless
        # the exchange with the worker is over (a client that closes as soon as it
        # has the body can be seen to leave before the read ends): that connection
        # is still good, and _proxy puts it back.
        self._client_gone = True
        response = self._response
        if not (self._request_sent and response is not None and response.complete):
            self._discard_upstream()
        self._close_use()

    def on_finish(self) -> None:
        self._close_use()

    def _close_use(self) -> None:
        if self.session is not None:
            self.session.close_nowait()


# How long a refused WebSocket client may take to answer our close frame.
_CLOSE_LINGER = 5.0


def _close_frame(code: int, reason: str, *, masked: bool = False) -> bytes:
    """A close frame as a server sends it (unmasked), or as a client does (masked)."""
    payload = code.to_bytes(2, "big") + reason.encode()[:123]
    if not masked:
        return bytes([0x88, len(payload)]) + payload
    key = os.urandom(4)
    return (
        bytes([0x88, 0x80 | len(payload)])
        + key
        + bytes(byte ^ key[i % 4] for i, byte in enumerate(payload))
    )


class _Pipe(asyncio.Protocol):
    """One side of a WebSocket tunnel: what it reads goes to its peer's transport.

    No coroutine or future per message: data_received writes straight into the
    other transport, and a full write buffer on one side pauses reading on the
    other (pause_writing / resume_writing), so a slow reader slows the sender.
    Until its peer is set, the worker side collects the handshake answer instead.
    """

    def __init__(self, meter: _FrameMeter, *, expect_head: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self.meter = meter
        self.expect_head = expect_head  # the worker side: a handshake answer comes first
        self.peer: _Pipe | None = None
        self.transport: asyncio.Transport | None = None
        self.head: asyncio.Future[bytes] = loop.create_future()  # the handshake answer
        self.done: asyncio.Future[None] = loop.create_future()  # the connection closed
        self.lost: asyncio.Future[None] = loop.create_future()  # its transport is gone
        self._early = bytearray()  # bytes read before the tunnel flows

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.peer is None:  # not relaying yet: the handshake answer, early frames
            self._collect(data)
            return
        if not self.meter.feed(data):
            # Over the message size limit: the frames before the big one still go,
            # the handler answers 1009, and this side discards what follows, until
            # the client's own close frame.
            cut, self.meter.cut = self.meter.cut, 0
            if cut and self.peer.transport is not None:
                self.peer.transport.write(data[:cut])
            self._finish()
            if self.meter.saw_close and self.transport is not None:
                self.transport.close()
            return
        assert self.peer.transport is not None
        self.peer.transport.write(data)

    def _collect(self, data: bytes) -> None:
        self._early += data
        if self.expect_head and not self.head.done():
            end = self._early.find(b"\r\n\r\n")
            if end >= 0:
                self.head.set_result(bytes(self._early[: end + 4]))
                del self._early[: end + 4]
            elif len(self._early) > 65536:
                self.head.set_exception(ConnectionError("handshake answer over 64 KiB"))

    def take_early_bytes(self) -> bytes:
        """Frames the worker sent right after its handshake answer."""
        early = bytes(self._early)
        self._early.clear()
        self.meter.feed(early)
        return early

    def send(self, data: bytes) -> None:
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def eof_received(self) -> bool:
        self._finish()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.head.done():
            self.head.set_exception(ConnectionError("the worker closed the connection"))
            self.head.exception()  # whoever awaits it still gets it; nobody else must
        self._finish()
        if not self.lost.done():
            self.lost.set_result(None)

    async def linger(self, timeout: float) -> None:
        """End our side of the stream, then read until the peer closes or ``timeout``.

        For closing on a peer that is still sending: closing a socket with unread
        bytes resets the connection, which can destroy what we sent last.
        """
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.resume_reading()  # a slow worker may have paused it
        if transport.can_write_eof():
            transport.write_eof()
        await asyncio.wait([self.lost], timeout=timeout)

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class _FrameMeter:
    """Follows WebSocket frame boundaries in a byte stream, reading headers only.

    :param limit: the largest message (all its frames) in payload bytes, or ``None``.
    """

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.too_big = False
        self.cut = 0  # where the frame that went over the limit starts in the last data fed
        self.saw_close = False
        self._header = bytearray()  # a frame header being collected
        self._skip = 0  # payload bytes of the current frame still to pass
        self._message = 0  # payload bytes of the current (fragmented) message

    def feed(self, data: bytes) -> bool:
        """Account for ``data``; ``False`` once a message has exceeded the limit.

        Frames are still followed after that (to see the peer's close frame).
        """
        position, end = 0, len(data)
        start = 0  # where the current frame's header starts (0: in earlier data)
        while position < end:
            if self._skip:  # inside a payload: nothing to read but its length
                step = min(self._skip, end - position)
                self._skip -= step
                position += step
                continue
            if not self._header:
                start = position
            wanted = 2 if len(self._header) < 2 else self._header_size()
            take = min(wanted - len(self._header), end - position)
            self._header += data[position : position + take]
            position += take
            if len(self._header) < 2 or len(self._header) < self._header_size():
                continue
            first, payload = self._header[0], self._payload_length()
            opcode = first & 0x0F
            if opcode == 0x8:
                self.saw_close = True
            elif opcode < 0x8:  # data frames add up to a message; control frames don't
                self._message += payload
                if self.limit is not None and self._message > self.limit and not self.too_big:
                    self.too_big = True
                    self.cut = start
                if first & 0x80:  # FIN
                    self._message = 0
            self._header.clear()
            self._skip = payload
        return not self.too_big

    def _header_size(self) -> int:
        length = self._header[1] & 0x7F
        mask = 4 if self._header[1] & 0x80 else 0
        return 2 + mask + (2 if length == 126 else 8 if length == 127 else 0)

    def _payload_length(self) -> int:
        length = self._header[1] & 0x7F
        if length == 126:
            return int.from_bytes(self._header[2:4], "big")
        if length == 127:
            return int.from_bytes(self._header[2:10], "big")
        return length
