"""One HTTP request forwarded to a worker, and its response streamed back.

The handler decides (the route, the limits, which error to answer); an
:class:`_Exchange` moves the bytes::

    start()   take a keep-alive connection (or make one), write the request head,
              start reading the response through a _Response delegate
    write()   a piece of the request body (awaited: backpressure)
    end()     the end of the request; wait for the response head, then for its body,
              each chunk handed to the handler as it arrives
    keep() / discard()
              the connection back to the UpstreamPool, or closed

Tornado's own HTTP client opens a connection per request, so this drives
:class:`tornado.http1connection.HTTP1Connection` in client mode directly.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from tornado import httputil, iostream
from tornado.http1connection import HTTP1Connection, HTTP1ConnectionParameters

from .._protocols import Worker
from ._headers import _tokens
from ._settings import ProxySettings
from ._upstream import _socket_maker

# Bodies stream through, so no size limit on responses (Tornado's default is 100 MB).
_UPSTREAM_PARAMETERS = HTTP1ConnectionParameters(
    no_keep_alive=False, decompress=False, max_body_size=2**62
)

_OnHead = Callable[[httputil.ResponseStartLine, httputil.HTTPHeaders], None]
_OnChunk = Callable[[bytes], "Awaitable[None] | None"]


def _no_head(start_line: httputil.ResponseStartLine, headers: httputil.HTTPHeaders) -> None:
    """A released :class:`_Response`'s ``on_head``: the client has its answer, or left."""


def _no_chunk(chunk: bytes) -> None:
    """A released :class:`_Response`'s ``on_chunk``."""


class _Response(httputil.HTTPMessageDelegate):
    """Streams the worker's response to the client: the head to ``on_head``, each
    piece of the body to ``on_chunk`` (whose awaitable, if any, paces the read)."""

    def __init__(self, on_head: _OnHead, on_chunk: _OnChunk) -> None:
        self.on_head = on_head
        self.on_chunk = on_chunk
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
        if start_line.code == 101:  # (a WebSocket's goes through the tunnel, not here)
            raise httputil.HTTPInputError("the worker switched protocols unasked")
        if 100 <= start_line.code < 200:
            return  # 100 Continue: Tornado reads on to the real response
        if "Content-Length" in headers and "Transfer-Encoding" in headers:
            # Tornado refuses it too, but only once the head has gone to the client.
            raise httputil.HTTPInputError("a response with Content-Length and Transfer-Encoding")
        self.keep_alive = start_line.version == "HTTP/1.1" and "close" not in _tokens(
            headers.get("Connection", "")
        )
        self.started = True
        self.on_head(start_line, headers)
        if not self.head.done():
            self.head.set_result(None)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        return self.on_chunk(chunk)

    def finish(self) -> None:
        self.complete = True
        if not self.head.done():
            self.head.set_result(None)

    def on_connection_close(self) -> None:
        if not self.head.done():
            self.head.set_exception(iostream.StreamClosedError())

    def release(self) -> None:
        """Let go of the handler's callbacks, once nothing more is to go to the client.

        They are its bound methods, and the handler holds this delegate through its
        exchange: a reference cycle per request, which only the garbage collector's
        full collections free, each one a pause of the whole server.
        """
        self.on_head = _no_head
        self.on_chunk = _no_chunk

    def reading_done(self, reading: asyncio.Task[bool]) -> None:
        """The read ended; if no head came (the worker died first), say so.

        Tornado tells the delegate of a closed connection only after a head.
        """
        error = None if reading.cancelled() else reading.exception()
        if not self.head.done():
            self.head.set_exception(error or iostream.StreamClosedError())
        if not self.head.cancelled():
            self.head.exception()  # mark it retrieved: no "never retrieved" log noise


class _Exchange:
    """One request to the session's worker and its response back: owns the upstream
    connection, from :meth:`start` until :meth:`keep` or :meth:`discard`.

    :param settings: the handler's settings (the keep-alive pool, the timeouts).
    :param worker: the session's worker (``None``: ``address`` is another node's).
    :param start_line: the request line to send (the method and the worker's URI).
    :param chunked: frame the request body in chunks here (Tornado's client does it
        by itself for a POST, PUT or PATCH body of unknown length).
    :param on_head: gets the response's status line and headers.
    :param on_chunk: gets each piece of the response body.
    :param address: ``host:port`` of the node of the fleet that owns the session,
        when ``worker`` is ``None``.
    """

    def __init__(
        self,
        settings: ProxySettings,
        worker: Worker[Any] | None,
        start_line: httputil.RequestStartLine,
        *,
        chunked: bool,
        on_head: _OnHead,
        on_chunk: _OnChunk,
        address: str = "",
    ) -> None:
        self.settings = settings
        self.worker = worker
        self.address = worker.address if worker is not None else address
        self.start_line = start_line
        self.chunked = chunked
        self.response = _Response(on_head, on_chunk)
        self.sent = False  # the whole request went upstream (end() called)
        self.reading: asyncio.Task[bool] | None = None  # read_response, from start()
        self._upstream: HTTP1Connection | None = None
        self._stream: iostream.IOStream | None = None  # None once kept or closed

    async def start(self, headers: Callable[[], httputil.HTTPHeaders]) -> None:
        """Connect and send the request head (``headers()``, made for each try).

        A kept-alive connection that the worker closed after it was checked fails
        the write: the head goes once more, on another connection.

        :raises OSError: the worker refused, or did not answer in time.
        :raises tornado.iostream.StreamClosedError: the worker closed the connection.
        """
        retry = True
        while True:
            stream, reused = await self.settings.upstreams.connect(
                self.address,
                self.settings.connect_timeout,
                _socket_maker(self.worker) if self.worker is not None else None,
            )
            self._stream = stream
            self._upstream = HTTP1Connection(stream, True, _UPSTREAM_PARAMETERS)
            # A write that fails closes the stream, but HTTP1Connection resolves
            # write_headers all the same (it leaves the error to the read).
            with contextlib.suppress(iostream.StreamClosedError):
                await self._upstream.write_headers(self.start_line, headers())
            if not stream.closed():
                break
            if not (reused and retry):
                raise iostream.StreamClosedError(real_error=stream.error)
            retry = False  # the worker closed an idle connection: once more, fresh
        self.reading = asyncio.ensure_future(self._upstream.read_response(self.response))
        self.reading.add_done_callback(self.response.reading_done)

    def write(self, chunk: bytes) -> Awaitable[None]:
        """Send a piece of the request body."""
        assert self._upstream is not None
        if self.chunked:
            chunk = b"%x\r\n%b\r\n" % (len(chunk), chunk)
        return self._upstream.write(chunk)

    async def end(self) -> bool:
        """End the request, then wait for the whole response to have gone through.

        :returns: whether the worker left the connection open.
        :raises TimeoutError: no response head within ``upstream_timeout``.
        :raises tornado.iostream.StreamClosedError: the connection closed first.
        :raises tornado.httputil.HTTPInputError: the worker's answer is not HTTP.
        """
        upstream, reading = self._upstream, self.reading
        assert upstream is not None
        assert reading is not None
        if self.chunked:
            await upstream.write(b"0\r\n\r\n")
        upstream.finish()
        self.sent = True
        async with asyncio.timeout(self.settings.upstream_timeout):
            await self.response.head  # 504 only while waiting for the head
        return await reading

    def keep(self, open_after: bool) -> None:
        """The response is through: keep the connection for the next request, if the
        worker left it open and meant to, else close it."""
        stream = self._stream
        # Bytes past the answer already read into the stream's buffer are a second
        # answer nobody asked for: never to be taken for the next request's.
        stray = stream is not None and stream._read_buffer_size > 0
        if open_after and self.response.keep_alive and stream is not None and not stray:
            assert self._upstream is not None
            self.settings.upstreams.put(self.address, self._upstream.detach())
            self._stream = None
        else:
            self.discard()

    def discard(self) -> None:
        """Close the connection: the response's read, if it is still on, ends with
        :class:`~tornado.iostream.StreamClosedError` at its next read.

        Not by cancelling it: the read may be waiting for a piece of the body to be
        written to the client, and Tornado logs any error raised there, a
        cancellation too, as an uncaught exception.
        """
        if self._upstream is not None:
            self._upstream.close()
        if self._stream is not None:
            self._stream.close()
            self._stream = None
