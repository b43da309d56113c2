"""The relay: ``herd serve``'s front end, HTTP/1.1 on asyncio protocols and llhttp.

:class:`ProxyHandler` runs a whole Tornado HTTP stack on each side of a request
(a ``RequestHandler`` for the client, an ``HTTP1Connection`` for the worker); for
what is, once the session is known, a byte relay, most of that time is spent on
objects nobody needs. The relay parses only what it must, with llhttp (the C
parser of Node.js, through ``httptools``), and passes the rest as bytes::

    client bytes ─> _Client: llhttp ─> head: route, refusals, Pool.try_acquire,
                                        a kept upstream connection, head written
                                   ─> body: each piece written upstream (chunked
                                        bodies framed again here)
    worker bytes ─> _Upstream: llhttp ─> head: status, end-to-end headers,
                                           Location rewritten, written to the client
                                      ─> body: each piece written to the client
                                      ─> end: connection kept, use closed, logged

For a session already pinned, with a kept connection to its worker, a request
runs in the protocols' callbacks alone: no task, no future, no coroutine.
With a shared registry, a request for a session another node of the fleet owns
goes to that node instead of a worker (:mod:`herd.proxy._fleet`): the client's
own URI and headers, the same framing and streaming, and for an owner the pool
remembers, the same callbacks-only path. A new
session (an acquire that waits), a new upstream connection, a worker that fails
(the crash path) and a WebSocket handshake run in a task of the request.

What :class:`ProxyHandler` does, the relay does too, and its tests run on both:
end-to-end headers only (RFC 9110 §7.6.1), ``X-Forwarded-*``, ``Location``
rewritten under a path key, streaming both ways with back-pressure (a full write
buffer on one side pauses reading on the other), upstream keep-alive per worker,
the JSON errors (400, 403, 404, 405, 413, 431, 502, 503, 504), the size limits,
the WebSocket tunnel (the same :class:`~herd.proxy._tunnel._Tunnel`), the
connection cap and the idle-connection timeout. Malformed input is refused as
strictly as Tornado refuses it, or more: llhttp refuses two ``Content-Length``
values, ``Content-Length`` with ``Transfer-Encoding``, obs-fold, bare LF,
whitespace before a colon and control characters, and the relay refuses any
``Transfer-Encoding`` but ``chunked``. A worker's response is parsed as strictly
(it is a tenant's program): its body is passed on in the framing the relay
writes, so a worker cannot put a second response into a client's connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import http.client
import http.cookies
import logging
import os
import socket
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast, overload

import httptools
from tornado import httputil
from tornado.escape import parse_qs_bytes

from .._client import connect_socket
from .._exceptions import SessionElsewhereError
from .._session import Session, session_tag
from ._errors import _canned_error, _error_body, _Failure, acquire_or_fail, worker_failure
from ._fleet import Node, NodeUnreachable, forward_to, hops, node_unreachable
from ._headers import FORWARDED_HOPS, HOP_BY_HOP
from ._keys import Route, find_route, logged_uri
from ._settings import ProxySettings
from ._tunnel import _Pipe, _Tunnel
from ._upstream import KeepAlive, _socket_maker

log = logging.getLogger("herd.proxy")

_HOP = frozenset(name.encode() for name in HOP_BY_HOP)
_METHODS = frozenset({"GET", "HEAD", "POST", "DELETE", "PATCH", "PUT", "OPTIONS"})
_READ_HIGH = 256 * 1024  # request body buffered while no upstream is ready, before pausing
_CLOSE_LINGER = 5.0  # for a client to read an error answer and close its end

LocalRoute = Callable[["RequestHead"], tuple[int, list[tuple[str, str]], bytes]]
"""A route the relay answers itself (``herd serve``'s stats): gets the request,
returns its status, headers and body."""

AccessLog = Callable[["RequestHead", int, "Route | None", "str | None", float], None]
"""Called once per answered request: ``(request, status, route, worker_id, seconds)``."""


class Headers:
    """A request's headers, for reading (case-insensitive; the values of a repeated
    name joined with commas, as Tornado's ``HTTPHeaders.get`` joins them)."""

    __slots__ = ("_index", "raw")

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        #: The headers as they came, names and values as bytes, in order.
        self.raw = raw
        self._index: dict[str, list[str]] | None = None

    def _values(self) -> dict[str, list[str]]:
        index = self._index
        if index is None:
            index = self._index = {}
            for name, value in self.raw:
                index.setdefault(name.decode("latin-1").lower(), []).append(value.decode("latin-1"))
        return index

    @overload
    def get(self, name: str, /) -> str | None: ...
    @overload
    def get(self, name: str, default: str, /) -> str: ...

    def get(self, name: str, default: str | None = None, /) -> str | None:
        values = self._values().get(name.lower())
        return ",".join(values) if values else default

    def get_list(self, name: str) -> list[str]:
        """Every value of ``name``, in order."""
        return list(self._values().get(name.lower(), ()))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._values()

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return str(value)

    def __repr__(self) -> str:
        return f"<Headers {len(self.raw)}>"


class RequestHead:
    """A request as the relay gives it to session keys, local routes and the access
    log: the reading side of Tornado's ``HTTPServerRequest`` (:class:`RequestView`)."""

    __slots__ = (
        "_arguments",
        "_cookies",
        "headers",
        "method",
        "protocol",
        "remote_ip",
        "uri",
        "version",
    )

    def __init__(
        self,
        method: str,
        uri: str,
        headers: Headers,
        remote_ip: str | None,
        version: str = "HTTP/1.1",
    ) -> None:
        self.method = method
        self.uri = uri
        self.headers = headers
        self.remote_ip = remote_ip
        #: ``"HTTP/1.1"`` or ``"HTTP/1.0"``.
        self.version = version
        self.protocol = "http"
        self._cookies: http.cookies.SimpleCookie | None = None
        self._arguments: dict[str, list[bytes]] | None = None

    @property
    def path(self) -> str:
        return self.uri.partition("?")[0]

    @property
    def query(self) -> str:
        return self.uri.partition("?")[2]

    @property
    def host(self) -> str:
        return str(self.headers.get("Host") or "127.0.0.1")

    @property
    def cookies(self) -> http.cookies.SimpleCookie:
        """The ``Cookie`` header, parsed as Tornado parses it."""
        if self._cookies is None:
            self._cookies = http.cookies.SimpleCookie()
            header = self.headers.get("Cookie")
            if header is not None:
                for name, value in httputil.parse_cookie(header).items():
                    with contextlib.suppress(http.cookies.CookieError):
                        self._cookies[name] = value
        return self._cookies

    @property
    def query_arguments(self) -> dict[str, list[bytes]]:
        if self._arguments is None:
            self._arguments = parse_qs_bytes(self.query, keep_blank_values=True)
        return self._arguments


class RelayUpstreams(KeepAlive["_Upstream"]):
    """The relay's kept connections to workers (see :class:`KeepAlive`)."""

    def _usable(self, conn: _Upstream) -> bool:
        return conn.idle_and_open()


class RelayServer:
    """``herd serve``'s HTTP server and proxy in one: see the module's docstring.

    :param settings: the pool, the session key and the limits, as for
        :class:`ProxyHandler` (its ``upstreams`` are not used: the relay keeps its
        own, :attr:`upstreams`).
    :param max_connections: client connections at most (``None``: no cap); past it
        a new connection gets a canned 503 and is closed. WebSocket tunnels count.
    :param max_header_size: the largest request head in bytes (past it: 431).
    :param idle_connection_timeout: seconds a connection may wait without sending a
        whole request head (idle keep-alive, or a head trickling in); ``None``: no limit.
    :param check_origin: whether a WebSocket handshake may go on, given its request
        (``False``: 403 ``cross_origin``); default: every one.
    :param routes: paths the relay answers itself (exact match, query ignored).
    :param access_log: called once per answered request.
    :param forward_uri: the URI to ask the worker for, given the client's.
    """

    def __init__(
        self,
        settings: ProxySettings,
        *,
        max_connections: int | None = None,
        max_header_size: int = 64 * 1024,
        idle_connection_timeout: float | None = None,
        check_origin: Callable[[RequestHead], bool] | None = None,
        routes: Mapping[str, LocalRoute] | None = None,
        access_log: AccessLog | None = None,
        forward_uri: Callable[[str], str] | None = None,
        upstreams: RelayUpstreams | None = None,
    ) -> None:
        if max_connections is not None and max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, not {max_connections}")
        if max_header_size < 1:
            raise ValueError("max_header_size must be >= 1")
        self.settings = settings
        self.max_connections = max_connections
        self.max_header_size = max_header_size
        self.idle_connection_timeout = idle_connection_timeout or None
        self.check_origin = check_origin
        self.routes = dict(routes or {})
        self.access_log = access_log
        self.forward_uri = forward_uri or _same
        #: Kept connections to the workers.
        self.upstreams = upstreams if upstreams is not None else RelayUpstreams()
        #: Connections refused at the cap so far.
        self.refused = 0
        self._clients: set[_Client] = set()
        self._drained: asyncio.Event | None = None  # set once no client is left
        self._servers: list[asyncio.AbstractServer] = []
        self._sweeper: asyncio.TimerHandle | None = None
        self._stopping = False

    @property
    def open_connections(self) -> int:
        """Client connections open: HTTP ones, and the WebSocket tunnels."""
        return len(self._clients) + self.settings.tunnels.open

    async def start(self, sockets: Iterable[socket.socket]) -> None:
        """Serve on ``sockets`` (bound and listening, as from Tornado's ``bind_sockets``)."""
        loop = asyncio.get_running_loop()
        for sock in sockets:
            server = await loop.create_server(lambda: _Client(self), sock=sock)
            self._servers.append(server)
        self._schedule_sweep()

    def stop(self) -> None:
        """Stop accepting connections (those open are served on)."""
        for server in self._servers:
            server.close()
        self._servers.clear()

    async def close_all_connections(self, timeout: float = 5.0) -> None:
        """Close every client connection: idle ones now, busy ones once their answer is
        out (it says ``Connection: close``), whatever is left after ``timeout``."""
        self._stopping = True
        for client in list(self._clients):
            client.close_when_idle()
        if self._clients:
            self._drained = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), timeout)
        for client in list(self._clients):
            client.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self.upstreams.close()

    def _forget(self, client: _Client) -> None:
        self._clients.discard(client)
        if not self._clients and self._drained is not None:
            self._drained.set()

    def _schedule_sweep(self) -> None:
        timeout = self.idle_connection_timeout
        if timeout is not None and self._sweeper is None:
            loop = asyncio.get_running_loop()
            self._sweeper = loop.call_later(min(1.0, timeout / 4), self._sweep)

    def _sweep(self) -> None:
        """Close the connections that have waited for a request head too long."""
        self._sweeper = None
        timeout = self.idle_connection_timeout
        assert timeout is not None
        cutoff = asyncio.get_running_loop().time() - timeout
        for client in list(self._clients):
            since = client.waiting_since
            if since is not None and since < cutoff:
                client.abort()
        if not self._stopping:
            self._schedule_sweep()


def _same(uri: str) -> str:
    return uri


_REFUSED = _canned_error(
    b"503 Service Unavailable",
    "too_many_connections",
    "the gateway is at its connection limit",
    b"Retry-After: 1",
)


#: A closed client's parser: it is fed nothing, and has no callbacks to call.
_NO_PARSER = httptools.HttpRequestParser(None)


class _Client(asyncio.Protocol):
    """One client connection: parses its requests and answers them in order."""

    def __init__(self, server: RelayServer) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.remote_ip: str | None = None
        self.reading: _Request | None = None  # whose head or body is being parsed
        self.current: _Request | None = None  # whose answer is under way
        self.pipeline: deque[_Request] = deque()  # parsed, waiting for their turn
        self._last: _Request | None = None  # the last request whose head was parsed
        self.waiting_since: float | None = None  # waiting for a request head since
        self.write_paused = False  # our transport's buffer is full
        self.closed = False
        self.closing = False  # close once the current answer is out
        self._holds = 0  # reasons to stop reading the client (see hold/release)
        self._url: list[bytes] = []
        self._headers: list[tuple[bytes, bytes]] = []
        # The head's size, two ways, each a lower bound: the request line and the
        # headers llhttp has passed on, and the reads that were all head (llhttp
        # holds a field until it ends: a header without end is refused on these).
        self._head_size = 0
        self._head_reads = 0
        self._in_head = False
        self._began = 0  # requests begun in this read
        self._too_large = False
        self._upgrade_bytes: bytes | None = None  # after a WebSocket handshake
        self._corked: list[bytes] | None = None  # writes held (see cork)

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        server = self.server
        cap = server.max_connections
        if cap is not None and server.open_connections >= cap:
            server.refused += 1
            log.warning(
                "refusing a connection: %d open (max_connections %d)",
                server.open_connections,
                cap,
            )
            transport.write(_REFUSED)
            transport.close()
            self.closed = True
            return
        server._clients.add(self)
        peer = transport.get_extra_info("peername")
        self.remote_ip = peer[0] if isinstance(peer, tuple) else None
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.waiting_since = asyncio.get_running_loop().time()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self._upgrade_bytes is not None:  # a WebSocket handshake under way
            self._upgrade_bytes += data
            return
        # All of this read is head if it began none, or began one at its start.
        fresh = self.reading is None and not self._in_head
        self._began = 0
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._upgraded(data[upgrade.args[0] :])
            return
        except httptools.HttpParserError as exc:
            if self._too_large:
                self._head_too_large()
            else:
                self._malformed(exc)
            return
        if self._in_head and (self._began == 0 or (self._began == 1 and fresh)):
            self._head_reads += len(data)
            if self._head_reads > self.server.max_header_size:
                self._head_too_large()

    def _head_too_large(self) -> None:
        limit = self.server.max_header_size
        self.refuse(_Failure(431, "head_too_large", f"request line and headers over {limit} bytes"))

    def eof_received(self) -> bool | None:
        # The client is gone, as Tornado and nginx take it: a half-close cannot be
        # told from a close, and a request whose client left is not worth finishing.
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server._forget(self)
        requests = [self.current, self.reading, *self.pipeline]
        self.pipeline.clear()
        for request in dict.fromkeys(requests):
            if request is not None:
                request.client_gone()
        # Let go of what refers back to this protocol (the last request, the parser's
        # callbacks): freed by reference counting, not left to the garbage
        # collector's full collections, which pause the whole server.
        self._last = None
        self.parser = _NO_PARSER

    def pause_writing(self) -> None:
        self.write_paused = True
        request = self.current
        if request is not None and request.upstream is not None:
            request.upstream.hold()

    def resume_writing(self) -> None:
        self.write_paused = False
        request = self.current
        if request is not None and request.upstream is not None:
            request.upstream.release()

    # -- llhttp callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.waiting_since = self.waiting_since or asyncio.get_running_loop().time()
        self._in_head = True
        self._began += 1
        self._head_reads = 0

    def on_url(self, url: bytes) -> None:
        self._url.append(url)
        self._grow(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value.rstrip(b" \t")))
        self._grow(len(name) + len(value) + 4)

    def _grow(self, size: int) -> None:
        self._head_size += size
        if self._head_size > self.server.max_header_size:
            self._too_large = True
            raise _HeadTooLarge  # (llhttp stops: feed_data raises)

    def on_headers_complete(self) -> None:
        parser = self.parser
        url = b"".join(self._url).decode("latin-1")
        version = parser.get_http_version()
        head = RequestHead(
            parser.get_method().decode("latin-1"),
            url,
            Headers(self._headers),
            self.remote_ip,
            "HTTP/" + version,
        )
        self._url, self._headers, self._head_size = [], [], 0
        self._in_head = False
        self.waiting_since = None
        request = _Request(self, head, parser.should_keep_alive(), parser.should_upgrade())
        self._last = request
        if version not in ("1.1", "1.0"):
            request.refusal = _Failure(400, "bad_request", "only HTTP/1.0 and 1.1 are spoken here")
        self.reading = request
        if self.current is None:
            self.current = request
            request.begin()
        else:  # pipelined: answered once those before it are
            self.pipeline.append(request)
            self.hold()

    def on_body(self, body: bytes) -> None:
        if self.reading is not None:
            self.reading.body(body)

    def on_message_complete(self) -> None:
        request, self.reading = self.reading, None
        if request is not None:
            request.body_end()

    # -- flow ------------------------------------------------------------------------------

    def hold(self) -> None:
        """Stop reading the client (an upstream buffer full, a request in waiting)."""
        self._holds += 1
        if self._holds == 1 and self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def release(self) -> None:
        self._holds -= 1
        if self._holds == 0 and self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        corked = self._corked
        if corked is not None:
            corked.append(data)
            return
        assert self.transport is not None
        self.transport.write(data)

    def cork(self) -> None:
        """Hold what is written until :meth:`uncork`: an answer's head and body, parsed
        from one read of the worker, leave in one ``send``, not one each."""
        if self._corked is None:
            self._corked = []

    def uncork(self) -> None:
        corked, self._corked = self._corked, None
        if corked and not self.closed:
            assert self.transport is not None
            self.transport.write(corked[0] if len(corked) == 1 else b"".join(corked))

    def answered(self, request: _Request, *, close: bool) -> None:
        """``request``'s answer is out: on to the next one, or close."""
        if self.current is not request:
            return
        self.current = None
        if close or self.closing:
            self.linger()
            return
        if self.pipeline:
            nxt = self.current = self.pipeline.popleft()
            self.release()
            nxt.begin()
        elif self.reading is None:
            self.waiting_since = asyncio.get_running_loop().time()

    def refuse(self, failure: _Failure) -> None:
        """Answer a request that could not be parsed, and close."""
        self.pipeline.clear()
        if self.current is not None and self.current.answering:
            self.abort()  # a response is under way: nothing to answer with
            return
        self.reading = None
        self.write(_error_response(failure, close=True))
        self.linger()

    def _malformed(self, exc: Exception) -> None:
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, httptools.HttpParserInvalidMethodError):
            reason = "invalid method"
        self.refuse(_Failure(400, "bad_request", f"malformed request: {reason}"))

    def _upgraded(self, rest: bytes) -> None:
        """llhttp stopped after an Upgrade request (whose end it reported); ``rest`` is
        what followed it."""
        request = self._last
        if request is not None and _is_websocket(request.head):
            # Frames until the handshake is answered (a client waits for it: held
            # here, and no more read); then the tunnel's, or the connection closes.
            self._upgrade_bytes = rest
            self.hold()
            return
        # Any other upgrade (h2c): answered as an ordinary request, on a new parser.
        self.parser = httptools.HttpRequestParser(self)
        if rest and not self.closed:
            self.data_received(rest)

    def take_upgrade_bytes(self) -> bytes:
        rest, self._upgrade_bytes = self._upgrade_bytes or b"", None
        return rest

    def close_when_idle(self) -> None:
        """Close now if nothing is under way, else after the current answer."""
        self.closing = True
        if self.current is None and self.reading is None:
            self.abort()

    def linger(self) -> None:
        """End our side, discard what the client still sends, close once it closes
        (or after a few seconds): closing on unread bytes would reset the connection
        and could destroy the answer just written."""
        self.closing = True
        if self.closed or self.transport is None:
            return
        self.uncork()
        self.closed = True  # nothing more is parsed or answered
        self.server._forget(self)
        transport = self.transport
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        transport.set_protocol(_Discard(transport))
        if self._holds:
            transport.resume_reading()

    def abort(self) -> None:
        if self.transport is not None:
            self.uncork()
            self.transport.close()
        self.closed = True
        self.server._forget(self)


class _HeadTooLarge(Exception):
    pass


class _Discard(asyncio.Protocol):
    """The end of a connection: reads and drops until the peer closes, or a timeout."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.timer = asyncio.get_running_loop().call_later(_CLOSE_LINGER, transport.close)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        self.timer.cancel()
        return False  # close

    def connection_lost(self, exc: Exception | None) -> None:
        self.timer.cancel()


def _error_response(
    failure: _Failure, *, close: bool, session_id: str | None = None, head: bool = False
) -> bytes:
    """The JSON answer to ``failure``; ``head``: to a HEAD request (no body, its length)."""
    body = _error_body(failure.error, failure.message, session_id).encode()
    lines = [b"HTTP/1.1 %d %s" % (failure.status, _reason(failure.status))]
    lines.append(b"Content-Type: application/json")
    for name, value in failure.headers.items():
        lines.append(f"{name.replace('_', '-')}: {value}".encode("latin-1"))
    if close:
        lines.append(b"Connection: close")
    lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + (b"" if head else body)


def _reason(status: int) -> bytes:
    return http.client.responses.get(status, "Unknown").encode()


class _Request:
    """One request of a client connection, from its head to the end of its answer."""

    __slots__ = (
        "answering",
        "body_left",
        "buffered",
        "chunked_in",
        "chunked_out",
        "client",
        "close_after",
        "complete",
        "ended",
        "head",
        "keep_alive",
        "node",
        "received",
        "refusal",
        "reused",
        "route",
        "sent",
        "session",
        "started",
        "status",
        "task",
        "timer",
        "upgrade",
        "upstream",
        "websocket",
    )

    def __init__(self, client: _Client, head: RequestHead, keep_alive: bool, upgrade: bool) -> None:
        self.client = client
        self.head = head
        self.keep_alive = keep_alive
        self.upgrade = upgrade
        self.websocket = False
        self.refusal: _Failure | None = None
        self.route: Route | None = None
        self.session: Session[Any] | None = None
        self.node: Node | None = None  # the node the request is forwarded to, if any
        self.upstream: _Upstream | None = None
        self.reused = False
        self.chunked_in = False  # the client's body is chunked
        self.chunked_out = False  # our answer's body is chunked
        self.close_after = not keep_alive  # close the client connection after the answer
        self.buffered: list[bytes] | None = []  # body before an upstream is ready
        self.body_left = 0  # buffered bytes (for pausing)
        self.received = 0  # body bytes from the client
        self.sent = False  # the whole request went upstream
        self.ended = False  # the client's whole request has been read
        self.answering = False  # the answer's head is out
        self.complete = False  # the answer is out (or given up)
        self.status = 0
        self.started = asyncio.get_running_loop().time()
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None

    # -- from the client ----------------------------------------------------------------

    def begin(self) -> None:
        """Route, refuse or start forwarding; from the callbacks while possible."""
        try:
            self._route()
        except _Failure as failure:
            self.fail(failure)
            return
        except _Done:
            return
        if self.websocket:
            self._spawn(self._tunnel())
            return
        head = self.head
        if not self.ended and head.version == "HTTP/1.1":
            expect = head.headers.get("Expect")
            if expect is not None and expect.lower() == "100-continue":
                # The client waits for this before its body (curl: a second), as
                # Tornado answers it; refusals above go first, in its place.
                self.client.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        settings = self.client.server.settings
        assert self.route is not None
        pool = settings.pool
        session = pool.try_acquire(self.route.session_id)
        if session is not None:
            self.session = session
            upstream = self.client.server.upstreams.take(session.worker.address)
            if upstream is not None:
                self.reused = True
                self._send(upstream)
                return
        else:
            # Owned by another node, as the registry said before: forwarded there
            # (unless it was forwarded here: then the registry is asked afresh).
            owner = pool.remote_owner(self.route.session_id)
            if owner is not None and FORWARDED_HOPS not in self.head.headers:
                self.node = Node.of(owner.node, owner.address)
                upstream = self.client.server.upstreams.take(self.node.address)
                if upstream is not None:
                    self.reused = True
                    self._send(upstream)
                    return
        self._spawn(self._connect())

    def _route(self) -> None:
        head, server = self.head, self.client.server
        if self.refusal is not None:
            raise self.refusal
        local = server.routes.get(head.path)
        if local is not None:
            self._answer_locally(local)
            raise _Done
        settings = server.settings
        self.route = find_route(head, settings.prefix, settings.key, server.forward_uri)
        method = head.method
        headers = head.headers
        if self.upgrade and _is_websocket(head):
            self.close_after = True  # refused: what follows is not HTTP
            if method != "GET":
                raise _Failure(400, "bad_upgrade", f"a WebSocket handshake is a GET, not {method}")
            check = server.check_origin
            if check is not None and not check(head):
                raise _Failure(403, "cross_origin", "Cross origin websockets not allowed")
            self.websocket = True
            return
        if method not in _METHODS:
            raise _Failure(
                405, "method_not_allowed", f"{method} is not proxied", Allow=", ".join(_METHODS)
            )
        declared = headers.get("Content-Length")
        encoding = headers.get("Transfer-Encoding")
        if encoding is not None:  # (llhttp refused it alongside Content-Length)
            if encoding.lower() != "chunked":  # the only coding HTTP/1.1 requires
                raise _Failure(400, "bad_framing", f"unsupported Transfer-Encoding: {encoding!r}")
            self.chunked_in = True
        if self.upgrade and (self.chunked_in or (declared is not None and declared != "0")):
            # llhttp would take the body for the upgraded protocol's bytes.
            raise _Failure(400, "bad_upgrade", "an Upgrade other than websocket, with a body")
        limit = settings.max_body_size
        if limit is not None and declared is not None and int(declared) > limit:
            raise _Failure(413, "body_too_large", f"request body over {limit} bytes")

    def _answer_locally(self, route: LocalRoute) -> None:
        try:
            status, headers, body = route(self.head)
        except Exception as exc:  # a bug in the route: the client gets a 500, not a 400
            log.exception("the local route %s failed", self.head.path)
            raise _Failure(500, "internal_error", f"{type(exc).__name__}: {exc}") from None
        lines = [b"HTTP/1.1 %d %s" % (status, _reason(status))]
        lines += [f"{name}: {value}".encode("latin-1") for name, value in headers]
        if self.close_after:
            lines.append(b"Connection: close")
        lines.append(b"Content-Length: %d" % len(body))
        if self.head.method == "HEAD":
            body = b""
        self.status = status
        self.answering = True
        self.client.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        self.complete = True
        self._logged()
        if self.ended:
            self.client.answered(self, close=self.close_after)

    def body(self, chunk: bytes) -> None:
        self.received += len(chunk)
        limit = self.client.server.settings.max_body_size
        if limit is not None and self.received > limit:
            failure = _Failure(413, "body_too_large", f"request body over {limit} bytes")
            if self.client.current is not self:  # pipelined: refused in its turn
                self.refusal = self.refusal or failure
                self.buffered = []
                return
            self.fail(failure)
            return
        if self.complete or self.refusal is not None:
            return  # answered already, or to be refused: the body is dropped
        if self.chunked_in:
            chunk = b"%x\r\n%b\r\n" % (len(chunk), chunk)
        upstream = self.upstream
        if upstream is not None and self.buffered is None:
            upstream.write(chunk)
            return
        if self.buffered is not None:
            self.buffered.append(chunk)
            self.body_left += len(chunk)
            if self.body_left > _READ_HIGH and self.body_left - len(chunk) <= _READ_HIGH:
                self.client.hold()

    def body_end(self) -> None:
        self.ended = True
        if self.complete:
            if self.client.current is self:
                self.client.answered(self, close=self.close_after)
            return
        if self.upstream is not None and self.buffered is None:
            self._sent()

    def _sent(self) -> None:
        """The whole request is upstream: the worker's head is now awaited."""
        assert self.upstream is not None
        if self.chunked_in:
            self.upstream.write(b"0\r\n\r\n")
        self.sent = True
        timeout = self.client.server.settings.upstream_timeout
        if timeout is not None and not self.answering:
            self.timer = asyncio.get_running_loop().call_later(timeout, self._timed_out)

    # -- upstream ---------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        self.task = asyncio.ensure_future(coro)
        self.task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            self.fail(None)
            return
        exc = task.exception()
        if isinstance(exc, _Failure):
            self.fail(exc)
        elif exc is not None:
            log.error("proxying %s failed", self._where(), exc_info=exc)
            self.fail(_Failure(502, "proxy_error", f"{type(exc).__name__}: {exc}"))

    async def _connect(self) -> None:
        """Acquire the session (if the fast path could not), connect, send."""
        if self.session is None and self.node is None:
            await self._locate()
            if self.complete:  # the client left while we waited
                self._close_use()
                return
        for attempt in (1, 2):
            upstream = self.client.server.upstreams.take(self._address())
            self.reused = upstream is not None
            if upstream is None:
                try:
                    upstream = await self._open()
                except NodeUnreachable:
                    if attempt == 2:
                        raise
                    # The registry may know better (the node died: a live one takes
                    # the session over), or still name it (then: 503).
                    self._forget_node()
                    await self._locate()
                    continue
            if self.complete:
                upstream.close()
                return
            self._send(upstream)
            return

    async def _locate(self) -> None:
        """Acquire the session here, or find the node that owns it."""
        server = self.client.server
        settings, route = server.settings, self.route
        assert route is not None
        try:
            self.session = await acquire_or_fail(
                settings.pool, route.session_id, settings.acquire_timeout, forwards=True
            )
        except SessionElsewhereError as exc:
            self.node = forward_to(exc, hops(self.head.headers))

    def _address(self) -> str:
        if self.node is not None:
            return self.node.address
        assert self.session is not None
        return self.session.worker.address

    def _forget_node(self) -> None:
        node, self.node = self.node, None
        assert node is not None
        assert self.route is not None
        self.client.server.upstreams.forget(node.address)
        self.client.server.settings.pool.forget_remote_owner(self.route.session_id)

    async def _open(self) -> _Upstream:
        if self.node is not None:
            return await self._open_node(self.node)
        assert self.session is not None
        settings = self.client.server.settings
        worker = self.session.worker
        host, _, port = worker.address.rpartition(":")
        loop = asyncio.get_running_loop()
        upstream = _Upstream(worker.address)
        try:
            async with asyncio.timeout(settings.connect_timeout):
                sock = await connect_socket(host, int(port), _socket_maker(worker))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                await loop.create_connection(lambda: upstream, sock=sock)
        except TimeoutError:
            exc = OSError(errno.ETIMEDOUT, f"connecting to {worker.address} timed out")
            raise await self._worker_failed(exc) from None
        except OSError as exc:
            if exc.errno:  # asyncio's "Connect call failed (address)": the plain reason
                exc = OSError(exc.errno, os.strerror(exc.errno))
            raise await self._worker_failed(exc) from None
        return upstream

    async def _open_node(self, node: Node) -> _Upstream:
        host, _, port = node.address.rpartition(":")
        upstream = _Upstream(node.address)
        try:
            async with asyncio.timeout(self.client.server.settings.connect_timeout):
                sock = await connect_socket(host, int(port), None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                await asyncio.get_running_loop().create_connection(lambda: upstream, sock=sock)
        except (OSError, TimeoutError) as exc:
            assert self.route is not None
            raise node_unreachable(node, self.route.session_id, exc) from None
        return upstream

    async def _worker_failed(self, exc: BaseException) -> _Failure:
        """A connection to the worker failed: is the worker dead? 502 either way."""
        if self.node is not None:
            node = self.node
            self._forget_node()
            return _Failure(502, "node_failed", f"node {node.id} ({node.address}) failed: {exc}")
        session = self.session
        assert session is not None
        server = self.client.server
        server.upstreams.forget(session.worker.address)
        return await worker_failure(server.settings.pool, session, exc)

    def _send(self, upstream: _Upstream) -> None:
        """Write the request head (and any body so far) on ``upstream``."""
        self.upstream = upstream
        upstream.attach(self)
        if self.node is not None:
            self._send_to_node(upstream)
            return
        head, route = self.head, self.route
        assert route is not None
        lines = _request_lines(head, route.uri)
        lines.append(b"X-Forwarded-Proto: http")
        lines.append(b"X-Forwarded-Host: " + (head.headers.get("Host") or "").encode("latin-1"))
        self._send_rest(upstream, lines)

    def _send_to_node(self, upstream: _Upstream) -> None:
        """The request as the client sent it (its own URI, so the owner finds the
        session by the same key), for the node that owns the session."""
        head = self.head
        lines = _request_lines(head, head.uri)
        lines.append(b"%s: %d" % (FORWARDED_HOPS.encode(), hops(head.headers) + 1))
        self._send_rest(upstream, lines)

    def _send_rest(self, upstream: _Upstream, lines: list[bytes]) -> None:
        if self.chunked_in:
            lines.append(b"Transfer-Encoding: chunked")
        lines.append(b"\r\n")
        buffered, self.buffered = self.buffered, None
        upstream.write(b"\r\n".join(lines) + b"".join(buffered or ()))
        if self.body_left > _READ_HIGH:
            self.client.release()
        self.body_left = 0
        if self.ended:
            self._sent()

    def _timed_out(self) -> None:
        self.timer = None
        if self.answering or self.complete:
            return
        timeout = self.client.server.settings.upstream_timeout or 0
        self.fail(_Failure(504, "upstream_timeout", f"worker sent no response within {timeout:g}s"))

    # -- the answer ------------------------------------------------------------------------------

    def response_head(
        self, status: int, reason: bytes, raw: list[tuple[bytes, bytes]], framing: int
    ) -> None:
        """The worker's head: pass it on. ``framing``: _LENGTH, _CHUNKED, _UNTIL_CLOSE
        or _NONE (no body: HEAD, 1xx, 204, 304)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.status = status
        self.answering = True
        old_client = self.head.version == "HTTP/1.0"
        if framing == _UNTIL_CLOSE or (framing == _CHUNKED and old_client):
            # A body of unknown length: chunked for an HTTP/1.1 client, until close
            # for an HTTP/1.0 one.
            self.chunked_out = not old_client
            self.close_after = self.close_after or not self.chunked_out
        elif framing == _CHUNKED:
            self.chunked_out = True
        lines = [b"HTTP/1.1 %d %s" % (status, reason or _reason(status))]
        named = _connection_tokens(raw)
        for name, value in raw:
            lower = name.lower()
            if lower in _HOP or lower in named:
                continue
            if lower == b"location" and self.node is None:  # (a node rewrote it already)
                value = self._rewrite_location(value)
            lines.append(name + b": " + value)
        session = self.session
        if session is not None and session.restarted is not None:
            lines.append(b"Herd-Session-Restarted: " + _header_text(session.restarted))
        if self.chunked_out:
            lines.append(b"Transfer-Encoding: chunked")
        if self.close_after or self.client.closing:
            self.close_after = True
            lines.append(b"Connection: close")
        elif old_client:  # one that asked to keep its connection
            lines.append(b"Connection: keep-alive")
        lines.append(b"\r\n")
        self.client.write(b"\r\n".join(lines))

    def _rewrite_location(self, value: bytes) -> bytes:
        location = value.decode("latin-1")
        route, settings = self.route, self.client.server.settings
        assert route is not None
        assert self.upstream is not None
        origin = f"http://{self.upstream.address}"
        if location.startswith(origin):
            location = location[len(origin) :] or "/"
        if location.startswith("/") and not location.startswith("//"):
            location = settings.prefix + route.prefix + location
        return location.encode("latin-1")

    def response_body(self, chunk: bytes) -> None:
        if self.head.method == "HEAD" or self.client.closed:
            return
        if self.chunked_out:
            self.client.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        else:
            self.client.write(chunk)

    def response_end(self, *, reusable: bool) -> None:
        """The worker's answer is complete; ``reusable``: its connection may carry
        another request."""
        if self.chunked_out and not self.client.closed:
            self.client.write(b"0\r\n\r\n")
        upstream, self.upstream = self.upstream, None
        assert upstream is not None
        upstream.detach()
        if reusable and self.sent:
            self.client.server.upstreams.put(upstream.address, upstream)
        else:
            upstream.close()
        self._finish()

    def upstream_lost(self, exc: BaseException | None, *, answered: bool) -> None:
        """The worker's connection ended before its answer did."""
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.detach()
            upstream.close()
        if self.complete:
            return
        if self.answering:  # the body ended short: cut ours short too
            self.complete = True
            self._close_use()
            self.client.abort()
            return
        if self.reused and not answered and self.received == 0 and not self.chunked_in:
            # A kept connection the worker had closed: once more, on a new one.
            self.reused = False
            self._spawn(self._retry())
            return
        error = exc if exc is not None else ConnectionError("the worker closed the connection")
        self._spawn(self._raise_worker_failed(error))

    async def _retry(self) -> None:
        upstream = await self._open()
        if self.complete:
            upstream.close()
            return
        self.buffered = []
        self._send(upstream)

    async def _raise_worker_failed(self, exc: BaseException) -> None:
        raise await self._worker_failed(exc)

    def bad_response(self, message: str) -> None:
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.detach()
            upstream.close()
        if self.answering:
            self.complete = True
            self._close_use()
            self.client.abort()
            return
        self.fail(_Failure(502, "bad_response", f"the worker's answer is not HTTP: {message}"))

    # -- endings ----------------------------------------------------------------------------

    def fail(self, failure: _Failure | None) -> None:
        """Answer ``failure`` (``None``: nobody to answer), or cut the answer short."""
        if self.complete:
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.detach()
            upstream.close()
        if failure is None or self.client.closed:
            self.complete = True
            self._close_use()
            return
        if self.answering:
            self.complete = True
            self._close_use()
            self.client.abort()
            return
        self._log_failure(failure)
        # The connection stays open only if the whole request was read (a bodiless
        # one, say): else where the next one starts is unknown, or not worth reading.
        close = self.close_after or not self.ended or failure.status == 413
        if failure.error == "bad_framing":
            close = True
        self.close_after = close
        self.status = failure.status
        self.answering = True
        session_id = self.route.session_id if self.route is not None else None
        answer = _error_response(
            failure, close=close, session_id=session_id, head=self.head.method == "HEAD"
        )
        self.client.write(answer)
        self._finish()

    def _finish(self) -> None:
        self.complete = True
        self._close_use()
        self._logged()
        if self.ended or self.close_after:
            if self.client.current is self:
                self.client.answered(self, close=self.close_after)
            elif self.close_after:
                self.client.linger()

    def client_gone(self) -> None:
        if self.task is not None and not self.task.done() and not self.websocket:
            self.task.cancel()
        if not self.complete:
            self.fail(None)

    def _close_use(self) -> None:
        if self.session is not None:
            self.session.close_nowait()

    def _logged(self) -> None:
        access_log = self.client.server.access_log
        if access_log is not None:
            if self.session is not None:
                worker: str | None = self.session.worker.id
            else:  # forwarded: the node that owns the session
                worker = f"node:{self.node.id}" if self.node is not None else None
            took = asyncio.get_running_loop().time() - self.started
            access_log(self.head, self.status, self.route, worker, took)

    def _where(self) -> str:
        return f"{self.head.method} {logged_uri(self.route, self.head.uri)}"

    def _log_failure(self, failure: _Failure) -> None:
        if not log.isEnabledFor(logging.DEBUG):
            return
        route = self.route
        tag = session_tag(route.session_id) if route else "-"
        message = failure.message
        if route and route.session_id:
            message = message.replace(route.session_id, tag)
        uri = route.uri if route else "-"
        log.debug(
            "%s %s -> %d %s (session %s)", self.head.method, uri, failure.status, message, tag
        )

    # -- WebSocket --------------------------------------------------------------------------

    async def _tunnel(self) -> None:
        settings = self.client.server.settings
        route = self.route
        assert route is not None
        await self._locate()
        for attempt in (1, 2):
            node = self.node
            tunnel = _Tunnel(settings, self.session, route, node=node, uri=self.head.uri)
            try:
                answer = await tunnel.open(functools.partial(_websocket_headers, self.head, node))
                break
            except OSError as exc:  # refused, timed out, or closed before answering
                if node is None or attempt == 2:
                    raise await self._worker_failed(exc) from None
                self._forget_node()
                await self._locate()
        if self.client.closed:
            tunnel.close()
            self.fail(None)
            return
        self.status = 101
        self.answering = True
        self.complete = True
        self._logged()
        client = self.client
        client.closed = True  # the tunnel's from here
        client.server._forget(client)
        try:
            await tunnel.run(self._attach, answer)
        finally:
            self._close_use()

    async def _attach(self, pipe: _Pipe) -> None:
        transport = self.client.transport
        assert transport is not None
        transport.set_protocol(pipe)
        pipe.connection_made(transport)
        early = self.client.take_upgrade_bytes()
        if early:
            pipe.data_received(early)
        if self.client._holds:
            transport.resume_reading()


def _is_websocket(head: RequestHead) -> bool:
    upgrade = head.headers.get("Upgrade")
    return upgrade is not None and upgrade.lower() == "websocket"


class _Done(Exception):
    """The request was answered where it was routed (a local route)."""


def _websocket_headers(head: RequestHead, node: Node | None = None) -> httputil.HTTPHeaders:
    """The handshake's headers for the worker, or for the ``node`` that owns the session."""
    headers = httputil.HTTPHeaders()
    raw = head.headers.raw
    named = _connection_tokens(raw)
    previous = None
    for name, value in raw:
        lower = name.lower()
        if lower in _HOP or lower in named:
            continue
        if lower == b"x-forwarded-for":
            previous = value.decode("latin-1")
            continue
        headers.add(name.decode("latin-1"), value.decode("latin-1"))
    headers["Connection"] = "Upgrade"
    headers["Upgrade"] = head.headers.get("Upgrade") or "websocket"
    remote = head.remote_ip or ""
    headers["X-Forwarded-For"] = f"{previous}, {remote}" if previous else remote
    if node is not None:
        headers[FORWARDED_HOPS] = str(hops(head.headers) + 1)
        return headers
    headers["X-Forwarded-Proto"] = "ws"
    headers["X-Forwarded-Host"] = head.headers.get("Host") or ""
    return headers


def _header_text(text: str) -> bytes:
    """``text`` safe as a header value: one line of Latin-1."""
    return " ".join(text.split()).encode("latin-1", "replace")


def _request_lines(head: RequestHead, uri: str) -> list[bytes]:
    """The request line for ``uri`` and the client's end-to-end headers, the client
    last in ``X-Forwarded-For``."""
    lines = [b"%s %s HTTP/1.1" % (head.method.encode(), uri.encode("latin-1"))]
    raw = head.headers.raw
    named = _connection_tokens(raw)
    previous = None
    for name, value in raw:
        lower = name.lower()
        if lower in _HOP or lower in named or lower == b"expect":
            continue
        if lower == b"x-forwarded-for":
            previous = value if previous is None else previous + b"," + value
            continue
        lines.append(name + b": " + value)
    remote = (head.remote_ip or "").encode()
    lines.append(b"X-Forwarded-For: " + (previous + b", " + remote if previous else remote))
    return lines


def _connection_tokens(raw: list[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """The header names the ``Connection`` header lists (hop-by-hop too)."""
    tokens: set[bytes] = set()
    for name, value in raw:
        if name.lower() == b"connection":
            tokens.update(token.strip().lower() for token in value.split(b","))
    tokens.discard(b"")
    return frozenset(tokens)


# How a worker's response body is framed.
_NONE, _LENGTH, _CHUNKED, _UNTIL_CLOSE = range(4)


class _StrayAnswer(Exception):
    """A worker's bytes after the end of its answer."""


class _Upstream(asyncio.Protocol):
    """A connection to a worker: parses its answers and hands them to the request
    it is carrying (at most one at a time; none while it is kept idle)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.transport: asyncio.Transport | None = None
        self.request: _Request | None = None
        self.parser: httptools.HttpResponseParser | None = None
        self.open = True
        self._holds = 0
        self._paused = False  # our transport's write buffer is full
        self._headers: list[tuple[bytes, bytes]] = []
        self._reason = b""
        self._in_body = False  # past the head of the answer (trailers follow the body)
        self._framing = _NONE
        self._keep = False  # the worker keeps the connection open after this answer
        self._ended: bool | None = None  # the answer ended in this read: reusable?
        self._stray = False  # bytes came past the end of an answer
        self._answered = False  # a byte of an answer arrived

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    # -- the request's side --------------------------------------------------------------

    def attach(self, request: _Request) -> None:
        self.request = request
        self.parser = httptools.HttpResponseParser(self)
        self._headers, self._reason, self._in_body = [], b"", False
        self._answered = False
        if request.client.write_paused:
            self.hold()

    def detach(self) -> None:
        self.request = None
        self.parser = None
        while self._holds:
            self.release()
        if self._paused:  # a request ended while its body still waited to go
            self.open = False

    def write(self, data: bytes) -> None:
        if self.transport is not None and self.open:
            self.transport.write(data)

    def hold(self) -> None:
        self._holds += 1
        if self._holds == 1 and self.transport is not None and self.open:
            self.transport.pause_reading()

    def release(self) -> None:
        self._holds -= 1
        if self._holds == 0 and self.transport is not None and self.open:
            self.transport.resume_reading()

    def idle_and_open(self) -> bool:
        return self.open and self.request is None and self.transport is not None

    def close(self) -> None:
        self.open = False
        if self.transport is not None:
            self.transport.close()

    # -- asyncio.Protocol -----------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        if parser is None:  # bytes nobody asked for: never reused
            self.close()
            return
        self._answered = True
        client = self.request.client if self.request is not None else None
        if client is not None:
            client.cork()
        try:
            self._feed(parser, data)
        finally:
            if client is not None:
                client.uncork()

    def _feed(self, parser: httptools.HttpResponseParser, data: bytes) -> None:
        try:
            parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            if self._ended is None and self.request is not None:
                upgrade = isinstance(exc, httptools.HttpParserUpgrade)
                message = "an upgrade nobody asked for" if upgrade else str(exc)
                self.request.bad_response(message)
            else:  # bytes past the end of the answer
                self._stray = True
        # The answer's end is acted on once llhttp is done with this read: whatever
        # followed it in the read is a second answer nobody asked for, and must not
        # reach the next request, which could take this connection at once.
        reusable, self._ended = self._ended, None
        if reusable is not None and self.request is not None:
            self.request.response_end(reusable=reusable and not self._stray and self.open)

    def eof_received(self) -> bool | None:
        self._lost(None)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(exc)

    def _lost(self, exc: BaseException | None) -> None:
        self.open = False
        request = self.request
        if request is None:
            return
        if self._framing == _UNTIL_CLOSE and self._in_body:
            request.response_end(reusable=False)  # the end of such a body
            return
        request.upstream_lost(exc, answered=self._answered)

    def pause_writing(self) -> None:
        self._paused = True
        if self.request is not None:
            self.request.client.hold()

    def resume_writing(self) -> None:
        self._paused = False
        if self.request is not None:
            self.request.client.release()

    # -- llhttp callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._ended is not None:  # a second answer to one request: stop parsing
            self._stray = True
            raise _StrayAnswer

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_body:  # (not the trailers)
            self._headers.append((name, value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        request, parser = self.request, self.parser
        if request is None or parser is None:
            return
        status = parser.get_status_code()
        if 100 <= status < 200:  # 100 Continue, 103 Early Hints: the real answer follows
            self._headers, self._reason = [], b""
            return
        raw = self._headers
        self._in_body = True
        if request.head.method == "HEAD" or status in (204, 304):
            framing = _NONE
        elif any(name.lower() == b"transfer-encoding" for name, _ in raw):
            framing = _CHUNKED
        elif any(name.lower() == b"content-length" for name, _ in raw):
            framing = _LENGTH
        else:
            framing = _UNTIL_CLOSE
        self._framing = framing
        self._keep = parser.should_keep_alive()
        request.response_head(status, self._reason, raw, framing)
        if request.head.method == "HEAD":
            # llhttp would wait for a body of the Content-Length: none comes.
            self._in_body = False
            self._ended = False

    def on_body(self, body: bytes) -> None:
        if self.request is not None:
            self.request.response_body(body)

    def on_message_complete(self) -> None:
        request = self.request
        if request is None or not self._in_body:
            return  # an interim answer's end
        self._in_body = False
        self._ended = self._keep
