"""The proxy's HTTP server: a 431 for an over-long head, a cap on connections."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable
from typing import Any

from tornado import iostream
from tornado.httpserver import HTTPServer

from ._errors import _canned_error
from ._settings import TunnelCount

log = logging.getLogger("herd.proxy")


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
        # HTTPServer's own set of open connections: no public count (Tornado 6.3-6.6.1).
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


_REFUSED = _canned_error(
    b"503 Service Unavailable",
    "too_many_connections",
    "the gateway is at its connection limit",
    b"Retry-After: 1",
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
    return _canned_error(
        b"431 Request Header Fields Too Large",
        "head_too_large",
        f"request line and headers over {limit} bytes",
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
