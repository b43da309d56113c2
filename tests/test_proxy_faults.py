"""herd.proxy against workers that misbehave: each fault over real sockets on 127.0.0.1.

The worker is an asyncio server in the test's own process, scripted per test (a
refused port, a connection closed mid-body, a handshake answered with garbage, a
fast sender), behind a real Pool, ProxyHandler and ProxyServer.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

import herd
from herd import proxy
from tests.helpers import proxies, wait_until
from tests.test_proxy import WS_HEADERS

Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
PATTERN = bytes(range(256)) * 4096  # 1 MiB


class LocalWorker:
    """A :class:`herd.Worker` whose "process" is a server in this process."""

    _ids = itertools.count(1)

    def __init__(self, address: str) -> None:
        self.id = f"local-{next(self._ids)}"
        self.address = address
        self.pid: int | None = None
        self.client: None = None
        self._closed = asyncio.Event()

    async def healthy(self) -> bool:
        return True

    async def wait(self) -> str:
        await self._closed.wait()
        return "closed"

    async def close(self) -> None:
        self._closed.set()


class LocalFactory:
    def __init__(self, address: str) -> None:
        self.address = address

    async def spawn(self) -> LocalWorker:
        return LocalWorker(self.address)


@dataclass
class Upstream:
    """The worker's side: how many connections it took, and what it was sent."""

    address: str
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)  # request heads, in order
    sent: int = 0  # bytes of a streamed body handed to the transport so far
    closed: asyncio.Event = field(default_factory=asyncio.Event)  # a connection ended
    stop: asyncio.Event = field(default_factory=asyncio.Event)  # the test is over


@dataclass
class Gateway:
    pool: herd.Pool[Any]
    port: int
    settings: proxy.ProxySettings
    upstream: Upstream
    upstreams: Any  # the proxy's kept connections to the worker
    engine: str


@pytest.fixture(params=proxies.ENGINES)
async def gateway(
    request: pytest.FixtureRequest,
) -> AsyncIterator[Callable[..., Awaitable[Gateway]]]:
    """``await gateway(serve)``: a proxy whose one worker runs ``serve`` for each connection
    (``serve=None``: a port that refuses connections); each test runs on both front ends."""
    engine: str = request.param
    cleanup: list[Callable[[], Awaitable[None]]] = []

    async def make(serve: Serve | None, **settings: Any) -> Gateway:
        if serve is None:
            refusing = socket.socket()  # bound, never listening: connections are refused
            refusing.bind(("127.0.0.1", 0))
            upstream = Upstream(f"127.0.0.1:{refusing.getsockname()[1]}")

            async def close_refusing() -> None:
                refusing.close()

            cleanup.append(close_refusing)
        else:
            upstream = Upstream("")
            serving: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}

            async def counted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                upstream.connections += 1
                task = asyncio.current_task()
                assert task is not None
                serving[task] = writer
                try:
                    await serve(reader, writer)
                except (ConnectionError, asyncio.IncompleteReadError):
                    pass
                finally:
                    del serving[task]
                    writer.close()
                    upstream.closed.set()

            server = await asyncio.start_server(counted, "127.0.0.1", 0)
            upstream.address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"

            async def stop_server() -> None:
                server.close()
                upstream.stop.set()
                for writer in list(serving.values()):
                    writer.close()
                if serving:
                    await asyncio.wait(list(serving), timeout=5)
                await server.wait_closed()

            cleanup.append(stop_server)
        pool: herd.Pool[Any] = herd.Pool(
            LocalFactory(upstream.address), min_workers=1, max_workers=1, health_interval=None
        )
        await pool.start()
        config = proxy.ProxySettings(pool=pool, **settings)
        served = await proxies.serve(engine, config)

        async def stop_gateway() -> None:
            await served.stop()
            await pool.shutdown()

        cleanup.append(stop_gateway)
        return Gateway(pool, served.port, config, upstream, served.upstreams, engine)

    yield make
    for step in reversed(cleanup):
        await step()


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)


def answer(status: str, body: bytes = b"", *headers: str) -> bytes:
    lines = [f"HTTP/1.1 {status}", *headers, f"Content-Length: {len(body)}", "", ""]
    return "\r\n".join(lines).encode() + body


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\nX-Session-ID: s1\r\n\r\n".encode()


@dataclass
class Response:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes


async def request(port: int, data: bytes) -> Response:
    """Send ``data`` on a new connection, read one response (by its Content-Length), close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        status_line, *lines = (await read_head(reader)).decode("latin-1").split("\r\n")
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines if line)
        }
        length = int(headers.get("content-length", "0"))
        body = await asyncio.wait_for(reader.readexactly(length), 5)
        return Response(int(status_line.split()[1]), headers, body)
    finally:
        writer.close()


async def exchange_ok(gw: Gateway, path: str = "/ok") -> None:
    """One request on a new client connection: a 200 with the worker's body."""
    response = await request(gw.port, get(path))
    assert (response.status, response.body) == (200, b"ok"), response


# -- connecting -----------------------------------------------------------------------


async def test_a_refused_connection_is_a_precise_502(gateway: Any) -> None:
    gw = await gateway(None)
    response = await request(gw.port, get("/ok"))
    assert response.status == 502
    assert response.headers["content-type"] == "application/json"
    worker = gw.pool.workers()[0]
    assert json.loads(response.body) == {
        "error": "worker_unavailable",
        "message": f"worker {worker.id} of session 's1' is alive but refusing: "
        "[Errno 111] Connection refused",
        "session_id": "s1",
    }
    assert gw.upstreams.idle_count() == 0
    await wait_until(lambda: gw.pool.stats().workers[0].open_uses == 0, what="use released")


async def test_an_idle_connection_the_worker_closed_is_replaced(gateway: Any) -> None:
    async def one_request_per_connection(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        gw.upstream.requests.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(answer("200 OK", b"ok"))  # kept alive, as far as the proxy knows
        await writer.drain()
        # ...then closed once idle, as a worker's keep-alive timeout does

    # No pruning: the connection must be found closed when it is taken.
    gw = await gateway(one_request_per_connection, upstreams=proxy.UpstreamPool(prune_interval=0))
    await exchange_ok(gw)
    await wait_until(lambda: gw.upstreams.idle_count() == 1, what="connection kept")
    await asyncio.wait_for(gw.upstream.closed.wait(), 5)
    await exchange_ok(gw)  # not a 502 from the dead connection
    assert gw.upstream.connections == 2
    assert len(gw.upstream.requests) == 2


async def test_a_connection_broken_unseen_is_retried_once_on_a_new_one(gateway: Any) -> None:
    async def keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (head := await reader.read(65536)) and head.endswith(b"\r\n\r\n"):
            writer.write(answer("200 OK", b"ok"))
            await writer.drain()
        # The proxy's end of the stream is not answered with ours: the
        # connection stays open, as far as the proxy can see.
        await gw.upstream.stop.wait()

    gw = await gateway(keep_alive, upstreams=proxy.UpstreamPool(prune_interval=0))
    await exchange_ok(gw)
    await wait_until(lambda: gw.upstreams.idle_count() == 1, what="connection kept")
    [stream] = gw.upstreams.idle(gw.upstream.address)
    # Broken in a way the check on taking it cannot see (nothing to read, no
    # error pending), so the request head's write is what fails: then once more.
    sock = stream.socket if gw.engine == "tornado" else stream.transport.get_extra_info("socket")
    sock.shutdown(socket.SHUT_WR)
    await exchange_ok(gw)
    assert gw.upstream.connections == 2
    await exchange_ok(gw)  # and the new connection was kept
    assert gw.upstream.connections == 2


# -- responses cut short --------------------------------------------------------------


CUT_BODY = 100_000  # bytes the worker announces; it sends 70,000 and closes


def dechunk(data: bytes) -> tuple[bytes, bool]:
    """A chunked body's bytes, and whether its last chunk came."""
    body, position = b"", 0
    while (end := data.find(b"\r\n", position)) >= 0:
        size = int(data[position:end], 16)
        if size == 0:
            return body, data[end + 2 :] == b"\r\n"
        piece = data[end + 2 : end + 2 + size]
        body += piece
        if len(piece) < size:
            break
        position = end + 2 + size + 2
    return body, False


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_worker_lost_mid_body_cuts_the_client_off(gateway: Any, framing: str) -> None:
    async def dies_mid_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (head := await reader.readuntil(b"\r\n\r\n")).startswith(b"GET /ok "):
            writer.write(answer("200 OK", b"ok"))
            await writer.drain()
        if framing == "content-length":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % CUT_BODY)
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            writer.write(b"%x\r\n" % CUT_BODY)
        writer.write(b"x" * 70_000)
        await writer.drain()  # then the connection closes, the body unfinished
        del head

    gw = await gateway(dies_mid_body)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(get("/partial"))
        head = await read_head(reader)
        rest = await asyncio.wait_for(reader.read(), 5)  # the end of the stream: no hang
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 200 ")
    if framing == "content-length":
        assert b"Content-Length: %d" % CUT_BODY in head
        body, complete = rest, len(rest) == CUT_BODY
    else:  # never the last chunk: the client must not take a cut body for a whole one
        assert b"Transfer-Encoding: chunked" in head
        body, complete = dechunk(rest)
    assert not complete
    assert body == b"x" * len(body)
    await wait_until(lambda: gw.pool.stats().workers[0].open_uses == 0, what="use released")
    assert gw.upstreams.idle_count() == 0
    await exchange_ok(gw)  # the proxy, the session and the worker serve on
    assert "s1" in gw.pool.sessions()


# -- WebSocket handshakes ---------------------------------------------------------------


def handshake_answered_with(
    data: bytes, *, then_close: bool = True
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """A worker that answers GET /ok with 200 "ok", and a WebSocket upgrade with ``data``."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if b"Upgrade: websocket" not in head:
                writer.write(answer("200 OK", b"ok"))
                await writer.drain()
                continue
            writer.write(data)
            await writer.drain()
            if then_close:
                return
            await reader.read()  # until the proxy closes its end

    return serve


@pytest.mark.parametrize(
    ("data", "status", "error", "message"),
    [
        (
            answer("400 Bad Request", b"no", "Content-Type: text/plain"),
            502,
            "websocket_refused",
            "worker answered the WebSocket handshake with HTTP 400",
        ),
        (
            answer("404 Not Found"),
            502,
            "websocket_refused",
            "worker answered the WebSocket handshake with HTTP 404",
        ),
        (
            b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
            502,
            "bad_handshake",
            "worker sent a malformed handshake answer",
        ),
        (
            b"HTTP/1.1 1O1 Switching Protocols\r\n\r\n",
            502,
            "bad_handshake",
            "worker sent a malformed handshake answer",
        ),
        (b"", 502, "worker_unavailable", "is alive but refusing: the worker closed"),
    ],
    ids=["400", "404", "not-http", "bad-status", "closed"],
)
async def test_a_refused_or_garbled_handshake_is_a_json_error(
    gateway: Any, data: bytes, status: int, error: str, message: str
) -> None:
    gw = await gateway(handshake_answered_with(data, then_close=not data))
    upgrade = b"GET /ws HTTP/1.1\r\nHost: x\r\nX-Session-ID: s1\r\n" + WS_HEADERS + b"\r\n"
    response = await request(gw.port, upgrade)
    assert response.status == status
    assert json.loads(response.body)["error"] == error
    assert message in json.loads(response.body)["message"]
    await wait_until(lambda: gw.pool.stats().workers[0].open_uses == 0, what="use released")
    await asyncio.wait_for(gw.upstream.closed.wait(), 5)  # the proxy let go of it
    await exchange_ok(gw)


async def test_a_handshake_answer_that_never_ends_is_cut_at_64_kib(gateway: Any) -> None:
    gw = await gateway(handshake_answered_with(b"HTTP/1.1 101 " + b"x" * 70_000, then_close=False))
    upgrade = b"GET /ws HTTP/1.1\r\nHost: x\r\nX-Session-ID: s1\r\n" + WS_HEADERS + b"\r\n"
    response = await request(gw.port, upgrade)
    assert response.status == 502
    assert "handshake answer over 64 KiB" in json.loads(response.body)["message"]
    await asyncio.wait_for(gw.upstream.closed.wait(), 5)
    await exchange_ok(gw)


# -- backpressure -----------------------------------------------------------------------


async def slow_reader(port: int, request: bytes) -> tuple[asyncio.StreamReader, Any]:
    """A client connection with a small receive buffer that reads nothing until told."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=64 * 1024)
    writer.write(request)
    return reader, writer


async def until_stalled(upstream: Upstream, total: int) -> int:
    """Wait until the worker's sending has stopped short of ``total``; what it sent."""
    deadline = time.monotonic() + 8
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        if upstream.sent != last:
            last, since = upstream.sent, time.monotonic()
        elif upstream.sent and time.monotonic() - since > 0.3:
            return last
        assert upstream.sent < total, "the worker sent everything to a client reading nothing"
        await asyncio.sleep(0.02)
    raise AssertionError(f"the worker never stopped sending ({upstream.sent} bytes)")


async def read_checked(reader: asyncio.StreamReader, piece: bytes, total: int) -> None:
    """Read ``total`` bytes: ``piece`` over and over, and nothing else."""
    count = 0
    while count < total:
        data = await asyncio.wait_for(reader.read(min(len(piece), total - count)), 5)
        assert data, f"the stream ended after {count} bytes"
        offset = count % len(piece)
        expected = (piece[offset:] + piece)[: len(data)]
        assert data == expected, f"the bytes differ after {count}"
        count += len(data)


BIG = 48  # MiB: more than every socket buffer on the way can hold


async def test_a_slow_http_client_slows_the_worker_and_loses_nothing(gateway: Any) -> None:
    total = BIG * len(PATTERN)

    async def fast_sender(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        for _ in range(BIG):
            writer.write(PATTERN)
            gw.upstream.sent += len(PATTERN)
            await writer.drain()

    gw = await gateway(fast_sender)
    reader, writer = await slow_reader(gw.port, get("/big"))
    try:
        sent = await until_stalled(gw.upstream, total)
        assert sent < total // 2, f"{sent} bytes sent to a client that read none"
        head = await read_head(reader)
        assert b"Content-Length: %d" % total in head
        await read_checked(reader, PATTERN, total)
    finally:
        writer.close()
    assert gw.upstream.sent == total


def accept_value(key: bytes) -> bytes:
    magic = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
    return base64.b64encode(hashlib.sha1(key + magic).digest())


def server_frame(payload: bytes) -> bytes:
    """A binary frame as a server sends it: unmasked, 8-byte length."""
    return bytes([0x82, 127]) + len(payload).to_bytes(8, "big") + payload


async def test_a_slow_websocket_client_pauses_the_worker_side_and_loses_nothing(
    gateway: Any,
) -> None:
    frame = server_frame(PATTERN)
    total = BIG * len(frame)

    async def fast_websocket(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        key = next(
            line.split(b":", 1)[1].strip()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        )
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept_value(key) + b"\r\n\r\n"
        )
        for _ in range(BIG):
            writer.write(frame)
            gw.upstream.sent += len(frame)
            await writer.drain()
        await reader.read()  # until the client's side closes

    gw = await gateway(fast_websocket)
    upgrade = b"GET /ws HTTP/1.1\r\nHost: x\r\nX-Session-ID: s1\r\n" + WS_HEADERS + b"\r\n"
    reader, writer = await slow_reader(gw.port, upgrade)
    try:
        sent = await until_stalled(gw.upstream, total)
        assert sent < total // 2, f"{sent} bytes sent to a client that read none"
        assert (await read_head(reader)).startswith(b"HTTP/1.1 101")
        await read_checked(reader, frame, total)  # every frame, whole and in order
        assert gw.upstream.sent == total
    finally:
        writer.close()
    await wait_until(lambda: gw.pool.stats().workers[0].open_uses == 0, what="use released")


# -- framing: what a request or an answer may not smuggle ---------------------------------


def recording(*answers: bytes) -> Serve:
    """A worker that records each request (head and body, by its framing, as bytes on
    the wire) and answers the n-th with ``answers[n]`` (the last one ever after)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while head := await reader.readuntil(b"\r\n\r\n"):
            lower = head.lower()
            raw = head
            if b"transfer-encoding: chunked" in lower:
                while True:
                    size_line = await reader.readuntil(b"\r\n")
                    raw += size_line
                    size = int(size_line.split(b";")[0], 16)
                    raw += await reader.readexactly(size + 2)
                    if size == 0:
                        break
            elif b"content-length:" in lower:
                length = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
                raw += await reader.readexactly(length)
            gw_upstream.requests.append(raw)
            n = len(gw_upstream.requests) - 1
            writer.write(answers[min(n, len(answers) - 1)])
            await writer.drain()

    gw_upstream = Upstream("")
    serve.upstream = gw_upstream  # type: ignore[attr-defined]
    return serve


async def exchange(port: int, data: bytes, responses: int = 1) -> bytes:
    """Send ``data`` on one connection; everything that comes back until ``responses``
    Content-Length answers are in, or the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        received = b""
        for _ in range(responses):
            head = await read_head(reader)
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            received += head + await asyncio.wait_for(reader.readexactly(length), 5)
        return received
    finally:
        writer.close()


async def test_pipelined_requests_are_answered_in_order(gateway: Any) -> None:
    serve = recording(answer("200 OK", b"one"), answer("201 Created", b"two"), answer("200 OK"))
    gw = await gateway(serve)
    post = b"POST /b HTTP/1.1\r\nHost: x\r\nX-Session-ID: s1\r\nContent-Length: 5\r\n\r\nhello"
    received = await exchange(gw.port, get("/a") + post + get("/c"), responses=3)
    assert received.count(b"HTTP/1.1 ") == 3
    first, second = received.index(b"one"), received.index(b"two")
    assert first < received.index(b"HTTP/1.1 201") < second
    requests = serve.upstream.requests
    assert [r.split(b" ")[1] for r in requests] == [b"/a", b"/b", b"/c"]
    assert requests[1].endswith(b"\r\n\r\nhello")


async def test_a_chunked_body_reaches_the_worker_framed_anew(gateway: Any) -> None:
    """Chunk extensions and trailers, which parsers disagree about, never pass (Tornado
    refuses extensions: 400; the relay drops them and the trailers)."""
    serve = recording(answer("200 OK", b"ok"))
    gw = await gateway(serve)
    chunked = (
        b"POST /up HTTP/1.1\r\nHost: x\r\nX-Session-ID: s1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3;name=value\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: smuggled\r\n\r\n"
    )
    if gw.engine == "tornado":
        assert (await request(gw.port, chunked)).status == 400
        assert serve.upstream.requests == []
        return
    assert b"200 OK" in await exchange(gw.port, chunked)
    [raw] = serve.upstream.requests
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    assert dechunk(body) == (b"abcde", True)
    assert b"name=value" not in raw
    assert b"smuggled" not in raw


H = b"POST /up HTTP/1.1\r\nHost: x\r\nX-Session-ID: s1\r\n"

# Requests whose framing parsers may read two ways. Tornado (ProxyHandler's server:
# Jupyter's, in herd_nb) takes the ones marked True and mends them: unfolds obs-fold,
# takes a bare LF for CRLF, strips a space before a colon, takes any HTTP/x.y, and
# forwards an h2c upgrade's body as a plain body (Upgrade is hop-by-hop). The worker
# then gets Tornado's own head and framing, so nothing is smuggled; the relay
# refuses them all, as RFC 9112 prefers.
AMBIGUOUS = {
    "gzip-chunked": (H + b"Transfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", False),
    "two-encodings": (
        H
        + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        False,
    ),
    "obs-fold": (H + b"Content-Length: 3\r\n 5\r\n\r\nabcde", True),
    "bare-lf": (b"POST /up HTTP/1.1\nHost: x\nX-Session-ID: s1\nContent-Length: 3\n\nabc", True),
    "space-colon": (H + b"Content-Length : 3\r\n\r\nabc", True),
    "http2": (b"GET /up HTTP/2.0\r\nHost: x\r\nX-Session-ID: s1\r\n\r\n", True),
    "h2c-body": (
        H + b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAAQAAP__\r\nContent-Length: 3\r\n\r\nabc",
        True,
    ),
}


@pytest.mark.parametrize("case", list(AMBIGUOUS))
async def test_ambiguous_framing_is_a_400_and_never_reaches_the_worker(
    gateway: Any, case: str
) -> None:
    raw, tornado_mends = AMBIGUOUS[case]
    serve = recording(answer("200 OK", b"ok"))
    gw = await gateway(serve)
    if gw.engine == "tornado" and tornado_mends:
        pytest.skip("Tornado mends this one, and forwards its own head and framing")
    response = await request(gw.port, raw)
    assert response.status == 400, response
    assert response.headers["content-type"] == "application/json"
    assert serve.upstream.requests == []


async def test_an_h2c_upgrade_without_a_body_is_an_ordinary_request(gateway: Any) -> None:
    serve = recording(answer("200 OK", b"ok"))
    gw = await gateway(serve)
    raw = (
        b"GET /plain HTTP/1.1\r\nHost: x\r\nX-Session-ID: s1\r\n"
        b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__"
        b"\r\n\r\n"
    )
    received = await exchange(gw.port, raw + get("/next"), responses=2)
    assert received.count(b"HTTP/1.1 200 OK") == 2
    first = serve.upstream.requests[0].lower()
    assert b"upgrade" not in first
    assert b"http2-settings" not in first  # named by Connection: hop-by-hop


async def test_a_worker_cannot_answer_twice_into_a_client_connection(gateway: Any) -> None:
    """A tenant's worker writes a second response after its first: a proxy that took
    it for the answer to the client's next request would hand one client's data to
    whoever asks next on a shared connection (a load balancer's, say)."""
    smuggled = answer("200 OK", b"ok") + answer("200 OK", b"SMUGGLED")
    serve = recording(smuggled, answer("200 OK", b"fresh"))
    gw = await gateway(serve)
    received = await exchange(gw.port, get("/one") + get("/two"), responses=2)
    assert b"SMUGGLED" not in received
    assert received.endswith(b"fresh")
    assert len(serve.upstream.requests) == 2
    assert gw.upstream.connections == 2  # the connection with stray bytes was not kept


async def test_a_worker_answer_with_length_and_chunked_is_a_502(gateway: Any) -> None:
    both = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n"
    )
    gw = await gateway(recording(both, answer("200 OK", b"ok")))
    response = await request(gw.port, get("/both"))
    assert response.status == 502
    # (Tornado's connection closes on it: the worker is then found alive but refusing)
    assert json.loads(response.body)["error"] in ("bad_response", "worker_unavailable")
    await exchange_ok(gw)


async def test_an_http10_client_gets_a_chunked_answer_whole_and_a_close(gateway: Any) -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    gw = await gateway(recording(chunked))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(b"GET /old HTTP/1.0\r\nHost: x\r\nX-Session-ID: s1\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 5)  # until the gateway closes
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.")
    assert b"chunked" not in head.lower()  # HTTP/1.0 knows no chunks
    assert body == b"hello"


async def test_a_worker_switching_protocols_unasked_is_a_502(gateway: Any) -> None:
    """A 101 to a request that asked for no upgrade: what follows is not HTTP, and must
    not be relayed as if it were (nor the connection kept)."""
    switch = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: raw\r\n\r\nXX"
    gw = await gateway(recording(switch, answer("200 OK", b"ok")))
    response = await request(gw.port, get("/plain"))
    assert response.status == 502
    assert response.headers["content-type"] == "application/json"
    await exchange_ok(gw)


async def test_expect_100_continue_is_answered_before_the_body(gateway: Any) -> None:
    serve = recording(answer("200 OK", b"ok"))
    gw = await gateway(serve)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(
            b"POST /up HTTP/1.1\r\nHost: x\r\nX-Session-ID: s1\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        assert (await read_head(reader)).startswith(b"HTTP/1.1 100 ")  # no body sent yet
        writer.write(b"hello")
        head = await read_head(reader)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert await asyncio.wait_for(reader.readexactly(2), 5) == b"ok"
    finally:
        writer.close()
    [raw] = serve.upstream.requests
    assert raw.endswith(b"\r\n\r\nhello")
    assert b"expect" not in raw.lower()  # answered here: the worker sends no 100 of its own


async def test_an_http10_keep_alive_client_keeps_its_connection(gateway: Any) -> None:
    gw = await gateway(recording(answer("200 OK", b"ok")))
    one = b"GET /a HTTP/1.0\r\nHost: x\r\nX-Session-ID: s1\r\nConnection: keep-alive\r\n\r\n"
    received = await exchange(gw.port, one + one.replace(b"/a", b"/b"), responses=2)
    assert received.count(b"ok") == 2
    assert received.lower().count(b"connection: keep-alive") == 2


async def test_a_local_route_that_raises_is_a_json_500() -> None:
    """A relay route's bug is the gateway's error (500), not a malformed request (400)."""

    def broken(request: proxy.RequestHead) -> tuple[int, list[tuple[str, str]], bytes]:
        raise RuntimeError("a bug")

    pool: herd.Pool[Any] = herd.Pool(
        LocalFactory("127.0.0.1:9"), min_workers=0, max_workers=1, health_interval=None
    )
    await pool.start()
    served = await proxies.serve("relay", proxy.ProxySettings(pool=pool), routes={"/boom": broken})
    try:
        response = await request(served.port, b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n")
    finally:
        await served.stop()
        await pool.shutdown()
    assert response.status == 500
    assert json.loads(response.body) == {
        "error": "internal_error",
        "message": "RuntimeError: a bug",
    }


async def test_a_pipelined_body_over_the_limit_is_refused_in_its_turn(gateway: Any) -> None:
    """The 413 of a request waiting behind another goes after that one's answer, never
    into the middle of it."""

    async def first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The relay has parsed the pipelined request (and gone over its limit) in the
        # read that brought the first one: this answer comes after, whatever its pace.
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789")
        await writer.drain()
        await gw.upstream.stop.wait()

    gw = await gateway(first, max_body_size=100)
    big = b"POST /big HTTP/1.1\r\nHost: x\r\nX-Session-ID: s1\r\nContent-Length: 500\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(get("/first") + big + b"x" * 500)
        first = await read_head(reader)
        assert first.startswith(b"HTTP/1.1 200 ")
        assert await asyncio.wait_for(reader.readexactly(10), 5) == b"0123456789"
        second = await read_head(reader)
        assert second.startswith(b"HTTP/1.1 413 ")
    finally:
        writer.close()
