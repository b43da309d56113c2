"""The WebSocket tunnel: the handshake with the worker, then frames as bytes both ways.

A tunnel, as nginx does it: the client's handshake goes to the worker as it is
(its own Sec-WebSocket-Key, subprotocols and extensions), the worker's answer
comes back as it is (so the worker's subprotocol choice wins), and then frames
pass as bytes: client frames are already masked as a server expects, worker
frames unmasked as a client expects. Pings, pongs, close codes and reasons
pass untouched. _FrameMeter reads only frame headers, to enforce the message
size limit and to see whether a close frame went by.

The handler decides (the route, the session, the headers, the answer's default
headers); a :class:`_Tunnel` connects, shakes hands with the worker, takes the
client's socket over from Tornado and relays until either side closes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

from tornado import httputil

from .._client import connect_socket
from .._session import Session, session_tag
from ._errors import _Failure
from ._keys import Route
from ._settings import ProxySettings
from ._upstream import _socket_maker

log = logging.getLogger("herd.proxy")

_STATUS = re.compile(rb"[1-5][0-9][0-9]")  # a status code (RFC 9110 §15)


class _Tunnel:
    """One WebSocket connection from a client to the session's worker, or to the
    node of the fleet that owns the session.

    :param settings: the handler's settings (timeouts, message size, tunnel count).
    :param session: the use of the session the tunnel holds open for its whole life
        (``None``: the session is another node's).
    :param route: where the handshake goes.
    :param node: the node that owns the session (it has ``.id`` and ``.address``,
        ``host:port``), instead of a session here.
    :param uri: the URI to ask the node for (the client's own).
    """

    def __init__(
        self,
        settings: ProxySettings,
        session: Session[Any] | None,
        route: Route,
        *,
        node: Any = None,
        uri: str | None = None,
    ) -> None:
        self.settings = settings
        self.session = session
        self.route = route
        self.node = node
        self.uri = uri if node is not None and uri is not None else route.uri
        self.worker_side = _Pipe(_FrameMeter(None), expect_head=True)
        if session is not None:
            self.label = f"worker={session.worker.id}"
        else:
            self.label = f"node={node.id}"

    async def open(self, headers: Callable[[], httputil.HTTPHeaders]) -> bytes:
        """Connect to the worker and send it the handshake (with ``headers()``, made
        once connected); its answer's head, a ``101``. Closes the connection on failure.

        :raises OSError: connecting failed, or the worker closed the connection.
        :raises _Failure: 504 (no answer within ``upstream_timeout``), 502 (an answer
            other than 101, or not HTTP).
        """
        if self.session is not None:
            worker = self.session.worker
            address, opener = worker.address, _socket_maker(worker)
        else:
            address, opener = self.node.address, None
        host, _, port = address.rpartition(":")
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.settings.connect_timeout):
            connected = await connect_socket(host, int(port), opener)
            connected.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # frames go at once
            await loop.create_connection(lambda: self.worker_side, sock=connected)
        try:
            head = await self._handshake(headers())
        except BaseException:
            self.worker_side.close()
            raise
        status = int(head.split(b" ", 2)[1])
        if status != 101:
            self.worker_side.close()
            raise _Failure(
                502,
                "websocket_refused",
                f"worker answered the WebSocket handshake with HTTP {status}",
            )
        return head

    async def _handshake(self, headers: httputil.HTTPHeaders) -> bytes:
        lines = [f"GET {self.uri} HTTP/1.1"]
        lines += [f"{name}: {value}" for name, value in headers.get_all()]
        self.worker_side.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        try:
            async with asyncio.timeout(self.settings.upstream_timeout):
                head = await self.worker_side.head
        except TimeoutError:
            raise _Failure(
                504,
                "upstream_timeout",
                "worker did not answer the WebSocket "
                f"handshake within {self.settings.upstream_timeout:g}s",
            ) from None
        status = head.split(b" ", 2)
        if not head.startswith(b"HTTP/1.1 ") or len(status) < 3 or not _STATUS.fullmatch(status[1]):
            raise _Failure(502, "bad_handshake", "worker sent a malformed handshake answer")
        return head

    def close(self) -> None:
        """Close the connection to the worker (the tunnel will not run)."""
        self.worker_side.close()

    async def run(self, attach: Callable[[_Pipe], Awaitable[None]], answer: bytes) -> None:
        """Take the client's connection over (``attach(pipe)`` makes ``pipe`` its
        protocol, and gives it any bytes the client sent after its handshake), send
        it the handshake ``answer``, and relay until either side closes; then close
        both."""
        route, worker_side = self.route, self.worker_side
        client_side = _Pipe(_FrameMeter(self.settings.max_message_size))
        started = time.monotonic()
        # From here on, whatever fails (a dup at the fd limit, a transport that
        # cannot start, cancellation) releases the client's connection and the
        # worker's (and the caller the session's use: a use left open pins the
        # session forever).
        tunnels = self.settings.tunnels
        tunnels.open += 1  # no longer the HTTP server's to count: ours, until it closes
        try:
            await attach(client_side)
            client_side.peer, worker_side.peer = worker_side, client_side
            log.info(
                "websocket %s session=%s %s open",
                route.uri,
                session_tag(route.session_id),
                self.label,
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
            client_side.close()
            worker_side.close()
            log.info(
                "websocket %s session=%s %s closed after %.1fs",
                route.uri,
                session_tag(route.session_id),
                self.label,
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
        if not self.meter.feed(data):  # (a quarter of a microsecond for a small frame)
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
        if self._skip or self._header:
            return self._feed_slowly(data, 0)
        # Whole frame headers, read in place: a tunnel's usual case, small messages
        # that each arrive in one read.
        position, end = 0, len(data)
        while position + 2 <= end:
            first, second = data[position], data[position + 1]
            length = second & 0x7F
            size = 2 + (4 if second & 0x80 else 0)
            if length >= 126:  # the length in the next 2 or 8 bytes, then the mask
                extended = 2 if length == 126 else 8
                size += extended
                if position + size > end:
                    break
                length = int.from_bytes(data[position + 2 : position + 2 + extended], "big")
            elif position + size > end:
                break
            opcode = first & 0x0F
            if opcode == 0x8:
                self.saw_close = True
            elif opcode < 0x8:
                self._message += length
                limit = self.limit
                if limit is not None and self._message > limit and not self.too_big:
                    self.too_big = True
                    self.cut = position
                if first & 0x80:
                    self._message = 0
            position += size + length
        if position >= end:
            self._skip = position - end
            return not self.too_big
        return self._feed_slowly(data, position)

    def _feed_slowly(self, data: bytes, position: int) -> bool:
        """:meth:`feed` from ``position``, a frame header at a time, as bytes come."""
        end = len(data)
        start = position if not self._skip and not self._header else 0
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
