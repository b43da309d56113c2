"""herd.proxy over real workers and real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import hashlib
import http.client
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest, HTTPResponse
from tornado.websocket import WebSocketClientConnection, websocket_connect

import herd
from herd import proxy
from herd.proxy import _relay
from herd.testing import FakeClock
from tests.helpers import proxies, wait_until

WEB_WORKER = str(Path(__file__).parent / "helpers" / "web_worker.py")


def web_factory(**kwargs: Any) -> herd.ProcessFactory:
    kwargs.setdefault("start_timeout", 15.0)
    return herd.ProcessFactory([sys.executable, WEB_WORKER, "{port}"], **kwargs)


@dataclass
class Gateway:
    pool: herd.Pool[Any]
    base: str
    port: int
    settings: proxy.ProxySettings
    upstreams: Any  # the kept connections to the workers
    engine: str

    async def fetch(self, path: str, session: str | None = "s1", **kwargs: Any) -> HTTPResponse:
        headers = dict(kwargs.pop("headers", {}))
        if session is not None:
            headers.setdefault("X-Session-ID", session)
        kwargs.setdefault("raise_error", False)
        kwargs.setdefault("follow_redirects", False)
        kwargs.setdefault("request_timeout", 30)
        return await AsyncHTTPClient().fetch(self.base + path, headers=headers, **kwargs)

    async def ws(
        self, path: str = "/ws", session: str = "s1", **kwargs: Any
    ) -> WebSocketClientConnection:
        request = HTTPRequest(
            f"ws://127.0.0.1:{self.port}{path}", headers={"X-Session-ID": session}
        )
        return await websocket_connect(request, **kwargs)


@pytest.fixture(params=proxies.ENGINES)
async def make_gateway(request: pytest.FixtureRequest) -> AsyncIterator[Callable[..., Any]]:
    """Start a pool of web workers behind the proxy (each test runs on both front ends:
    ProxyHandler and the relay); everything stops after the test."""
    engine: str = request.param
    stack: list[tuple[herd.Pool[Any], proxies.Served]] = []

    async def make(
        key: proxy.SessionKey | None = None,
        prefix: str = "",
        pool_options: dict[str, Any] | None = None,
        factory: herd.ProcessFactory | None = None,
        server_options: dict[str, Any] | None = None,
        handler: type[proxy.ProxyHandler] = proxy.ProxyHandler,
        **settings: Any,
    ) -> Gateway:
        options = {"min_workers": 1, "max_workers": 3, "health_interval": None}
        options.update(pool_options or {})
        pool: herd.Pool[Any] = herd.Pool(factory or web_factory(), **options)
        await pool.start()
        config = proxy.ProxySettings(
            pool=pool, key=key or proxy.from_header(), prefix=prefix, **settings
        )
        served = await proxies.serve(
            engine, config, (prefix or "") + r"(/.*)?", handler, **(server_options or {})
        )
        stack.append((pool, served))
        port = served.port
        return Gateway(pool, f"http://127.0.0.1:{port}", port, config, served.upstreams, engine)

    yield make
    for pool, served in reversed(stack):
        await served.stop()
        await pool.shutdown()


def body(response: HTTPResponse) -> Any:
    return json.loads(response.body)


# -- routing and affinity -------------------------------------------------------------


async def test_requests_of_a_session_reach_the_same_worker(make_gateway: Any) -> None:
    gw = await make_gateway()
    counts = [body(await gw.fetch("/state", "alice"))["count"] for _ in range(5)]
    assert counts == [1, 2, 3, 4, 5]
    assert body(await gw.fetch("/state", "bob"))["count"] == 1
    sessions = gw.pool.sessions()
    assert sessions["alice"] != sessions["bob"]


async def test_concurrent_requests_of_many_sessions_stay_pinned(make_gateway: Any) -> None:
    gw = await make_gateway(pool_options={"max_workers": 3})

    async def burst(sid: str) -> list[int]:
        return [body(await gw.fetch("/state", sid))["count"] for _ in range(10)]

    results = await asyncio.gather(*(burst(f"user{i}") for i in range(3)))
    assert all(counts == list(range(1, 11)) for counts in results)


@pytest.mark.parametrize(
    ("key", "request_kwargs", "path"),
    [
        (proxy.from_cookie("sid"), {"headers": {"Cookie": "sid=carol; other=1"}}, "/echo"),
        (proxy.from_query("sid"), {}, "/echo?sid=carol&x=1"),
        (
            proxy.from_callable(lambda r: r.headers.get("X-User")),
            {"headers": {"X-User": "carol"}},
            "/echo",
        ),
    ],
)
async def test_session_keys(
    make_gateway: Any, key: proxy.SessionKey, request_kwargs: dict[str, Any], path: str
) -> None:
    gw = await make_gateway(key=key)
    response = await gw.fetch(path, session=None, **request_kwargs)
    assert response.code == 200
    assert "carol" in gw.pool.sessions()
    missing = await gw.fetch("/echo", session=None)
    assert missing.code == 400
    assert body(missing)["error"] == "no_session"


async def test_path_segment_key_strips_the_segment_and_rewrites_location(make_gateway: Any) -> None:
    gw = await make_gateway(key=proxy.from_path(), prefix="/gw")
    echoed = body(await gw.fetch("/gw/dave/echo/x%2Fy?q=1", session=None))
    assert echoed["uri"] == "/echo/x%2Fy?q=1"
    assert "dave" in gw.pool.sessions()
    redirect = await gw.fetch("/gw/dave/redirect?to=/login", session=None)
    assert redirect.code == 302
    assert redirect.headers["Location"] == "/gw/dave/login"
    absolute = await gw.fetch("/gw/dave/redirect?to=https://example.org/x", session=None)
    assert absolute.headers["Location"] == "https://example.org/x"
    outside = await gw.fetch("/elsewhere", session=None)
    assert outside.code == 404


@pytest.mark.parametrize("bad", ["has space", "a/b", "x" * 300])
async def test_invalid_session_id_is_a_400_json(make_gateway: Any, bad: str) -> None:
    gw = await make_gateway()
    response = await gw.fetch("/echo", session=None, headers={"X-Session-ID": bad})
    assert response.code == 400
    assert body(response)["error"] == "invalid_session"
    assert response.headers["Content-Type"] == "application/json"


# -- HTTP semantics -------------------------------------------------------------------


async def test_methods_query_strings_and_encoded_paths_pass_through(make_gateway: Any) -> None:
    gw = await make_gateway()
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        kwargs = {"body": b"abc"} if method in ("POST", "PUT", "PATCH") else {}
        if method in ("DELETE", "OPTIONS"):
            kwargs = {"allow_nonstandard_methods": True}
        echoed = body(await gw.fetch("/echo/a%20b/%C3%A9?x=1&y=%2F", method=method, **kwargs))
        assert echoed["method"] == method
        assert echoed["uri"] == "/echo/a%20b/%C3%A9?x=1&y=%2F"
        assert echoed["body_length"] == (3 if "body" in kwargs else 0)
    head = await gw.fetch("/echo", method="HEAD")
    assert head.code == 200
    assert head.body == b""
    assert int(head.headers["Content-Length"]) > 0


async def test_headers_host_forwarding_and_hop_by_hop(make_gateway: Any) -> None:
    gw = await make_gateway()
    response = await gw.fetch(
        "/echo",
        headers={
            "Host": "public.example:8443",
            "Connection": "keep-alive, X-Secret-Hop",
            "X-Secret-Hop": "must not pass",
            "Keep-Alive": "timeout=5",
            "Proxy-Authorization": "Basic xxx",
            "X-Forwarded-For": "10.0.0.1",
            "X-Custom": "kept",
        },
    )
    headers = body(response)["headers"]
    assert headers["Host"] == "public.example:8443"
    assert headers["X-Custom"] == "kept"
    for dropped in ("X-Secret-Hop", "Keep-Alive", "Proxy-Authorization"):
        assert dropped not in headers
    assert headers["X-Forwarded-For"] == "10.0.0.1, 127.0.0.1"
    assert headers["X-Forwarded-Proto"] == "http"
    assert headers["X-Forwarded-Host"] == "public.example:8443"
    assert response.headers.get_list("Set-Cookie") == ["a=1", "b=2"]
    assert response.headers["X-Worker-Pid"]
    assert "Server" not in response.headers or "Tornado" in response.headers["Server"]


async def test_statuses_pass_through(make_gateway: Any) -> None:
    gw = await make_gateway()
    for code in (201, 204, 304, 404, 418, 500, 503):
        response = await gw.fetch(f"/status/{code}")
        assert response.code == code


async def test_upstream_connections_are_kept_alive(make_gateway: Any) -> None:
    gw = await make_gateway()
    await gw.fetch("/echo")
    address = gw.pool.workers()[0].address
    [stream] = gw.upstreams.idle(address)
    for _ in range(5):
        await gw.fetch("/echo")
    assert gw.upstreams.idle(address) == [stream]


# -- streaming ------------------------------------------------------------------------


async def test_large_upload_streams_with_content_length(make_gateway: Any) -> None:
    gw = await make_gateway()
    size = 64 * 1024 * 1024
    chunk = os.urandom(1024 * 1024)
    digest = hashlib.sha256()

    async def producer(write: Callable[[bytes], Any]) -> None:
        for _ in range(size // len(chunk)):
            digest.update(chunk)
            await write(chunk)

    response = await gw.fetch(
        "/upload", method="POST", body_producer=producer, headers={"Content-Length": str(size)}
    )
    assert response.code == 200, response.body
    assert body(response) == {"bytes": size, "sha256": digest.hexdigest()}


async def test_chunked_upload_streams(make_gateway: Any) -> None:
    gw = await make_gateway()
    chunks = [os.urandom(100_000) for _ in range(30)]

    async def producer(write: Callable[[bytes], Any]) -> None:
        for piece in chunks:
            await write(piece)

    response = await gw.fetch("/upload", method="PUT", body_producer=producer)
    assert response.code == 200, response.body
    expected = hashlib.sha256(b"".join(chunks)).hexdigest()
    assert body(response) == {"bytes": 3_000_000, "sha256": expected}


@pytest.mark.parametrize("length", ["yes", "no"])
async def test_large_download_streams(make_gateway: Any, length: str) -> None:
    gw = await make_gateway()
    size = 64 * 1024 * 1024
    received = 0
    digest = hashlib.sha256()

    def on_chunk(chunk: bytes) -> None:
        nonlocal received
        received += len(chunk)
        digest.update(chunk)

    response = await gw.fetch(f"/download/{size}?length={length}", streaming_callback=on_chunk)
    assert response.code == 200
    assert received == size
    pattern = bytes(range(256)) * 256
    assert digest.hexdigest() == hashlib.sha256(pattern * (size // len(pattern))).hexdigest()


async def test_server_sent_events_arrive_as_they_are_produced(make_gateway: Any) -> None:
    gw = await make_gateway()
    arrivals: list[float] = []
    started = time.monotonic()
    response = await gw.fetch(
        "/sse/4", streaming_callback=lambda c: arrivals.append(time.monotonic() - started)
    )
    total = time.monotonic() - started
    assert response.code == 200
    assert response.headers["Content-Type"] == "text/event-stream"
    assert arrivals
    assert arrivals[0] < total - 0.4  # the first event came long before the end


# -- errors ---------------------------------------------------------------------------


_HANDLER: contextvars.ContextVar[Any] = contextvars.ContextVar("handler")
_OURS = ("herd", "tornado", "httptools")  # modules whose objects must not be left in cycles


class _NamedInContext(proxy.ProxyHandler):
    """Names itself in a context variable, as Jupyter's handlers do (``JUPYTER_HANDLER``):
    every task and timer started while it runs then holds it through its context."""

    async def prepare(self) -> None:
        _HANDLER.set(self)
        await super().prepare()


async def test_requests_leave_no_reference_cycles(make_gateway: Any) -> None:
    """A proxied request, and a client's connection, are freed by reference counting
    once they are over.

    Garbage in cycles is left to the collector's full collections, and each one
    pauses the whole server: in a Jupyter server under proxied load they took
    100-300 ms every few seconds while each request left 40 objects in a cycle.
    """
    # Short timeouts: their timers (cancelled, still scheduled until they are due)
    # hold the handlers through their context until then.
    gw = await make_gateway(
        handler=_NamedInContext,
        upstream_timeout=1.0,
        connect_timeout=1.0,
        acquire_timeout=1.0,
        server_options={"idle_connection_timeout": 1.0},
    )
    port = gw.port

    def client() -> None:  # (http.client in a thread: a client that leaves no cycles)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            for method, path, data in [
                ("GET", "/state", None),
                ("POST", "/upload", b"x" * 100_000),
                ("GET", "/download/300000", None),
                ("GET", "/status/404", None),
                ("GET", "/redirect?to=/state", None),
            ] * 4:
                conn.request(method, path, body=data, headers={"X-Session-ID": "s1"})
                response = conn.getresponse()
                response.read()
                assert response.status < 500, (method, path, response.status)
        finally:
            conn.close()

    def settled() -> bool:
        """Every request's handler and every client connection is either freed or
        garbage: none is still held (by a timer not yet due, a close not yet seen),
        where it would be neither, and the check could not fail."""
        gc.collect()
        garbage = {id(o) for o in gc.garbage}
        return all(
            id(o) in garbage
            for o in gc.get_objects()
            if isinstance(o, (proxy.ProxyHandler, _relay._Client))
        )

    await asyncio.to_thread(client)  # the session, the worker's kept connection
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds stays in gc.garbage
    try:
        await asyncio.to_thread(client)
        # The connections kept to the worker stay registered with the loop in the
        # context of the last request that used each: one handler apiece, held
        # until the connection is used again or closed.
        gw.upstreams.close()
        await wait_until(settled, what="the requests and the connection to be over")
        found = list(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    # asyncio's own selector transports hold a bound method of their own (uvloop's,
    # which herd serve runs on, do not): what counts is nothing of herd's or Tornado's.
    ours = {type(o).__qualname__ for o in found if type(o).__module__.startswith(_OURS)}
    assert ours == set(), f"{len(found)} objects in cycles"


async def test_pool_exhausted_is_503_with_retry_after(make_gateway: Any) -> None:
    # The only worker is started with the pool: a cold spawn under load can take
    # longer than the short acquire timeout, which is for the second session only.
    gw = await make_gateway(pool_options={"min_workers": 1, "max_workers": 1}, acquire_timeout=0.3)
    holding = await gw.ws(session="holder")  # an open use keeps the only worker
    response = await gw.fetch("/echo", session="other")
    assert response.code == 503
    assert response.headers["Retry-After"] == "1"
    assert body(response)["error"] == "pool_exhausted"
    holding.close()


async def test_slow_worker_is_504(make_gateway: Any) -> None:
    gw = await make_gateway(upstream_timeout=0.3)
    response = await gw.fetch("/sleep/3")
    assert response.code == 504
    assert body(response)["error"] == "upstream_timeout"
    assert (await gw.fetch("/echo")).code == 200  # the session still works


async def test_worker_killed_mid_request_is_502_then_a_fresh_worker(make_gateway: Any) -> None:
    crashed: list[str] = []
    gw = await make_gateway(pool_options={"on_crash": crashed.append})
    assert body(await gw.fetch("/state"))["count"] == 1
    assert body(await gw.fetch("/state"))["count"] == 2
    victim = gw.pool.workers()[0]
    pending = asyncio.ensure_future(gw.fetch("/sleep/5"))
    await wait_until(lambda: gw.pool.stats().workers[0].open_uses == 1, what="request in flight")
    assert victim.pid is not None
    os.killpg(victim.pid, signal.SIGKILL)
    response = await pending
    assert response.code == 502
    assert body(response)["error"] == "worker_unavailable"
    await wait_until(lambda: crashed == ["s1"], what="crash path")
    fresh = await gw.fetch("/state")
    assert body(fresh)["count"] == 1  # a fresh process, and the answer says so, once
    assert fresh.headers["Herd-Session-Restarted"].startswith("its worker died (")
    assert "Herd-Session-Restarted" not in (await gw.fetch("/state")).headers


async def test_worker_exit_without_response_is_502(make_gateway: Any) -> None:
    gw = await make_gateway()
    response = await gw.fetch("/exit/3")
    assert response.code == 502
    assert (await gw.fetch("/echo")).code == 200


async def test_client_disconnect_cancels_upstream_and_frees_the_use(make_gateway: Any) -> None:
    gw = await make_gateway()
    await gw.fetch("/echo")
    _, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /sleep/3 HTTP/1.1\r\nHost: x\r\nX-Session-ID: s1\r\n\r\n")
    await writer.drain()
    await wait_until(lambda: gw.pool.stats().workers[0].open_uses == 1, what="use open")
    writer.close()
    await wait_until(
        lambda: gw.pool.stats().workers[0].open_uses == 0,
        timeout=2,
        what="use freed after the client left",
    )


@pytest.mark.parametrize("path", ["/download/50000000", "/sse/50"])
async def test_a_client_that_leaves_mid_answer_leaves_nothing_in_the_log(
    make_gateway: Any, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A big download or an event stream that the client stops reading (a tab closed,
    a page left) is the client's choice, not an error: no traceback in the log, the
    use freed, the worker still serving."""
    gw = await make_gateway()
    await gw.fetch("/echo")
    caplog.set_level(logging.INFO)
    for _ in range(5):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nX-Session-ID: s1\r\n\r\n".encode())
        await reader.readuntil(b"\r\n\r\n")
        await reader.read(1000)  # some of the body: the answer is streaming
        writer.close()
        with contextlib.suppress(OSError):  # (reset: unread bytes were left)
            await writer.wait_closed()
        await wait_until(
            lambda: gw.pool.stats().workers[0].open_uses == 0, timeout=5, what="use freed"
        )
    # Until the reads of the worker's answers have ended (the Tornado engine's:
    # what the worker still sends would meet a closed client there).
    await wait_until(
        lambda: (
            not any(
                task.get_coro().__qualname__ == "HTTP1Connection._read_message"  # type: ignore[union-attr]
                for task in asyncio.all_tasks()
            )
        ),
        what="the reads of the answers to end",
    )
    assert (await gw.fetch("/echo")).code == 200
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_body_limit_by_content_length_and_while_streaming(make_gateway: Any) -> None:
    gw = await make_gateway(max_body_size=1000)
    declared = await gw.fetch("/upload", method="POST", body=b"x" * 2000)
    assert declared.code == 413
    assert body(declared)["error"] == "body_too_large"

    async def producer(write: Callable[[bytes], Any]) -> None:
        for _ in range(10):
            await write(b"y" * 500)

    try:
        streamed = await gw.fetch("/upload", method="POST", body_producer=producer)
    except HTTPClientError as exc:  # the connection may be cut while we still send
        streamed = exc.response  # type: ignore[assignment]
    assert streamed is None or streamed.code in (413, 599)
    ok = await gw.fetch("/upload", method="POST", body=b"z" * 1000)
    assert ok.code == 200


async def test_malformed_requests_get_4xx_never_500(make_gateway: Any) -> None:
    gw = await make_gateway()
    for raw in (
        b"NONSENSE\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Header Line\r\n\r\n",
        b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n",
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(raw)
        await writer.drain()
        status = await asyncio.wait_for(reader.read(100), 5)
        writer.close()
        assert not status.startswith(b"HTTP/1.1 5"), status
    assert (await gw.fetch("/echo")).code == 200


# -- WebSocket ------------------------------------------------------------------------


async def test_websocket_echo_text_and_binary(make_gateway: Any) -> None:
    gw = await make_gateway()
    ws = await gw.ws()
    await ws.write_message("hello")
    assert await ws.read_message() == "hello"
    payload = os.urandom(3 * 1024 * 1024)
    await ws.write_message(payload, binary=True)
    assert await ws.read_message() == payload
    ws.close()


async def test_websocket_subprotocol_is_the_workers_choice(make_gateway: Any) -> None:
    gw = await make_gateway()
    ws = await gw.ws(subprotocols=["herd.v1", "herd.v2"])
    assert ws.selected_subprotocol == "herd.v2"
    ws.close()
    plain = await gw.ws()
    assert plain.selected_subprotocol is None
    plain.close()


async def test_websocket_close_codes_pass_both_ways(make_gateway: Any) -> None:
    gw = await make_gateway()
    ws = await gw.ws()
    await ws.write_message("close:4001:worker says bye")
    assert await ws.read_message() is None
    assert (ws.close_code, ws.close_reason) == (4001, "worker says bye")
    ws.close()

    ws = await gw.ws()
    ws.close(4002, "client says bye")
    await wait_until_async(
        lambda: gw.fetch("/last-close"),
        lambda r: body(r) == {"code": 4002, "reason": "client says bye"},
    )


async def wait_until_async(
    fetch: Callable[[], Any], check: Callable[[Any], bool], timeout: float = 5.0
) -> None:
    deadline = time.monotonic() + timeout
    while not check(await fetch()):
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_websocket_keeps_its_session_alive_past_the_ttl(make_gateway: Any) -> None:
    clock = FakeClock()
    gw = await make_gateway(pool_options={"ttl": 60, "clock": clock})
    ws = await gw.ws()
    await wait_until(lambda: "s1" in gw.pool.sessions(), what="pinned")
    clock.advance(3600)
    await gw.pool.sweep()
    assert "s1" in gw.pool.sessions()
    await ws.write_message("still here")
    assert await ws.read_message() == "still here"
    ws.close()
    await wait_until(lambda: gw.pool.stats().workers[0].open_uses == 0, what="use closed")
    clock.advance(61)
    await gw.pool.sweep()
    assert "s1" not in gw.pool.sessions()


async def test_websocket_message_size_limit(make_gateway: Any) -> None:
    gw = await make_gateway(max_message_size=1024)
    ws = await gw.ws()
    await ws.write_message("x" * 2048)
    assert await ws.read_message() is None
    assert ws.close_code == 1009
    ws.close()


async def test_websocket_to_a_dying_worker_closes_cleanly(make_gateway: Any) -> None:
    gw = await make_gateway()
    ws = await gw.ws()
    await ws.write_message("ping")
    assert await ws.read_message() == "ping"
    worker = gw.pool.workers()[0]
    assert worker.pid is not None
    os.killpg(worker.pid, signal.SIGKILL)
    assert await asyncio.wait_for(ws.read_message(), 5) is None
    assert ws.close_code == 1011
    ws.close()


def test_settings_validation() -> None:
    from herd.testing import FakeFactory

    pool: herd.Pool[Any] = herd.Pool(FakeFactory())
    with pytest.raises(ValueError, match="prefix"):
        proxy.ProxySettings(pool=pool, prefix="gw/")
    with pytest.raises(ValueError, match="max_body_size"):
        proxy.ProxySettings(pool=pool, max_body_size=-1)


def frame(payload: bytes, opcode: int = 0x2, fin: bool = True, masked: bool = True) -> bytes:
    """One WebSocket frame as a client (masked) or server sends it."""
    first = (0x80 if fin else 0) | opcode
    length = len(payload)
    mask_bit = 0x80 if masked else 0
    if length < 126:
        head = bytes([first, mask_bit | length])
    elif length < 65536:
        head = bytes([first, mask_bit | 126]) + length.to_bytes(2, "big")
    else:
        head = bytes([first, mask_bit | 127]) + length.to_bytes(8, "big")
    if not masked:
        return head + payload
    key = b"\x01\x02\x03\x04"
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


@pytest.mark.parametrize("split", [1, 3, 7, 1000])
def test_frame_meter_follows_frames_split_anywhere(split: int) -> None:
    stream = (
        frame(b"a" * 10)
        + frame(b"b" * 300, fin=False)
        + frame(b"", opcode=0x9)  # a ping inside a fragmented message
        + frame(b"c" * 70_000, opcode=0x0)
        + frame(b"\x03\xe8bye", opcode=0x8, masked=False)
    )
    meter = proxy._FrameMeter(limit=70_300)
    for i in range(0, len(stream), split):
        assert meter.feed(stream[i : i + split])
    assert meter.saw_close
    assert not meter.too_big
    over = proxy._FrameMeter(limit=70_299)
    results = [over.feed(stream[i : i + split]) for i in range(0, len(stream), split)]
    assert False in results
    assert over.too_big


def test_frame_meter_marks_where_the_frame_over_the_limit_starts_and_follows_on() -> None:
    small, big = frame(b"a" * 10), frame(b"b" * 2000)
    meter = proxy._FrameMeter(limit=1000)
    assert not meter.feed(small + big[:20])  # the frames before the big one may still go
    assert meter.cut == len(small)
    assert not meter.feed(big[20:] + frame(b"\x03\xf1", opcode=0x8))
    assert meter.saw_close  # the client's answer to our 1009 is seen past the big frame


async def test_websocket_ping_reaches_the_worker_and_its_pong_comes_back(make_gateway: Any) -> None:
    gw = await make_gateway()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nX-Session-ID: s1\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101")
    # The worker computed the accept value from the client's own key.
    assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head
    writer.write(frame(b"are you there", opcode=0x9))  # a masked ping
    pong = await asyncio.wait_for(reader.readexactly(2 + len(b"are you there")), 5)
    assert pong == bytes([0x8A, 13]) + b"are you there"  # the worker's pong, as it sent it
    writer.close()


# -- malformed requests, raw ------------------------------------------------------------


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes
    closed: bool  # the server closed the connection after the response


async def raw_exchange(port: int, data: bytes, *, head_only: bool = False) -> RawResponse:
    """Send ``data`` as it is; read one response and whether the server then closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines if line)
        }
        length = 0 if head_only else int(headers.get("content-length", "0"))
        payload = await asyncio.wait_for(reader.readexactly(length), 5)
        try:
            closed = await asyncio.wait_for(reader.read(1), 1) == b""
        except TimeoutError:
            closed = False
        return RawResponse(int(status_line.split()[1]), headers, payload, closed)
    finally:
        writer.close()


def assert_json_error(response: RawResponse, status: int, *, head: bool = False) -> None:
    assert response.status == status, response
    assert response.headers["content-type"] == "application/json"
    if not head:
        assert json.loads(response.body)["error"]
    # Whoever closes the connection after a response says so in it (RFC 9112 §9.6).
    assert response.closed == ("close" in response.headers.get("connection", "")), response


WS_HEADERS = (
    b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
)


@pytest.mark.parametrize(
    "raw",
    [
        b"POST /state HTTP/1.1\r\nHost: x\r\nX-Session-ID: s1\r\n"
        b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
        b"POST /state HTTP/1.1\r\nHost: x\r\nX-Session-ID: s1\r\n"
        b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        b"POST /state HTTP/1.1\r\nHost: x\r\nX-Session-ID: s1\r\nContent-Length: +3\r\n\r\nabc",
        b"POST /state HTTP/1.1\r\nHost: x\r\nX-Session-ID: s1\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        b"POST /state HTTP/1.1\r\nHost: x\r\nX-Session-ID: s1\r\n" + WS_HEADERS + b"\r\n",
        b"DELETE /state HTTP/1.1\r\nHost: x\r\nX-Session-ID: s1\r\n" + WS_HEADERS + b"\r\n",
        b"HEAD /state HTTP/1.1\r\nHost: x\r\nX-Session-ID: s1\r\n" + WS_HEADERS + b"\r\n",
    ],
    ids=[
        "two-equal-lengths",
        "two-lengths",
        "plus-length",
        "length-and-chunked",
        "websocket-post",
        "websocket-delete",
        "websocket-head",
    ],
)
async def test_malformed_requests_are_json_400s_and_never_reach_a_worker(
    make_gateway: Any, raw: bytes
) -> None:
    gw = await make_gateway()
    response = await raw_exchange(gw.port, raw, head_only=raw.startswith(b"HEAD"))
    assert_json_error(response, 400, head=raw.startswith(b"HEAD"))
    assert "s1" not in gw.pool.sessions()  # never acquired: the worker saw nothing
    assert body(await gw.fetch("/state", "s2"))["count"] == 1


@pytest.mark.parametrize("bad", [".", ".."])
async def test_dot_segments_are_invalid_session_ids(make_gateway: Any, bad: str) -> None:
    gw = await make_gateway()
    by_header = await gw.fetch("/echo", session=bad)
    assert by_header.code == 400
    assert body(by_header)["error"] == "invalid_session"
    assert "relative path segment" in body(by_header)["message"]
    with pytest.raises(herd.InvalidSessionIdError):
        herd.validate_session_id(bad)
    assert herd.validate_session_id("...") == "..."  # only the path segments themselves

    path_gw = await make_gateway(key=proxy.from_path())
    for segment in (bad, bad.replace(".", "%2e")):
        raw = f"GET /{segment}/echo HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        assert_json_error(await raw_exchange(path_gw.port, raw), 400)
    assert not path_gw.pool.sessions()


async def test_request_head_over_the_limit_is_431(make_gateway: Any) -> None:
    gw = await make_gateway(server_options={"max_header_size": 4096})
    raw = b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Session-ID: s1\r\nX-Big: " + b"a" * 8192
    response = await raw_exchange(gw.port, raw + b"\r\n\r\n")
    assert_json_error(response, 431)
    assert response.closed
    assert "s1" not in gw.pool.sessions()
    # A request line alone over the limit, still being sent when the answer comes.
    response = await raw_exchange(gw.port, b"GET /" + b"a" * 100_000)
    assert_json_error(response, 431)
    assert (await gw.fetch("/echo", headers={"X-Fits": "b" * 2000})).code == 200


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_503_says_connection_close_when_the_connection_closes(
    make_gateway: Any, method: str
) -> None:
    gw = await make_gateway(pool_options={"min_workers": 1, "max_workers": 1}, acquire_timeout=0.2)
    holding = await gw.ws(session="holder")
    raw = f"{method} /echo HTTP/1.1\r\nHost: x\r\nX-Session-ID: other\r\n".encode()
    if method == "POST":
        raw += b"Content-Length: 5\r\n\r\nhello"
    else:
        raw += b"\r\n"
    response = await raw_exchange(gw.port, raw)
    assert_json_error(response, 503)
    assert response.headers["retry-after"] == "1"
    holding.close()


# -- WebSocket faults ---------------------------------------------------------------------


async def test_websocket_two_mib_frame_over_the_limit_closes_with_1009(make_gateway: Any) -> None:
    gw = await make_gateway(max_message_size=1024 * 1024)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\nX-Session-ID: s1\r\n" + WS_HEADERS + b"\r\n")
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 101")
    writer.write(frame(b"x" * (2 * 1024 * 1024)))
    with contextlib.suppress(ConnectionError):  # the proxy may stop reading before the end
        await writer.drain()
    # A close frame, then the end of the stream: no reset (ConnectionResetError) first.
    received = await asyncio.wait_for(reader.read(), 10)
    assert received[:4] == b"\x88" + bytes([len(received) - 2]) + (1009).to_bytes(2, "big")
    assert received[4:] == b"message too big"
    writer.close()
    await wait_until(lambda: gw.pool.stats().workers[0].open_uses == 0, what="use released")
    await wait_until_async(  # the worker was told, with a close frame of its own
        lambda: gw.fetch("/last-close"), lambda r: body(r).get("code") == 1009
    )


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_websocket_detach_failure_releases_socket_worker_connection_and_use(
    make_gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    gw = await make_gateway(pool_options={"ttl": 60, "clock": clock})
    if gw.engine == "relay":
        pytest.skip("the relay's client connection is an asyncio transport already: no detach")
    assert (await gw.fetch("/echo")).code == 200  # the worker is up; s1 pinned
    gw.upstreams.close()
    before = open_fds()
    real_dup = os.dup

    def dup_fails_once(fd: int) -> int:
        monkeypatch.setattr(os, "dup", real_dup)
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(os, "dup", dup_fails_once)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\nX-Session-ID: s1\r\n" + WS_HEADERS + b"\r\n")
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, no hang
    writer.close()
    await writer.wait_closed()
    await wait_until(lambda: gw.pool.stats().workers[0].open_uses == 0, what="use released")
    await wait_until(lambda: open_fds() <= before, what=f"fds back to {before}")
    clock.advance(61)
    await gw.pool.sweep()
    assert "s1" not in gw.pool.sessions()  # evictable again
    ws = await gw.ws()  # and the next WebSocket works
    await ws.write_message("ok")
    assert await ws.read_message() == "ok"
    ws.close()
