"""``herd serve`` started as a subprocess, the way the README says."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from herd.cli import parse_duration, parse_size
from tests.helpers import wait_until_sync

WEB_WORKER = str(Path(__file__).parent / "helpers" / "web_worker.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Serve:
    """A running ``herd serve`` process."""

    def __init__(self, *flags: str, command: list[str] | None = None) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        if command is None:  # the web worker answers on /health, not on /
            command = [sys.executable, WEB_WORKER, "{port}"]
            flags = ("--health-path", "/health", *flags)
        argv = [sys.executable, "-m", "herd", "serve", "--port", str(self.port), *flags]
        argv += ["--", *command]
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

    def wait_ready(self) -> None:
        def up() -> bool:
            assert self.proc.poll() is None, self.output()
            return _answers(self.base + "/herd/stats")

        wait_until_sync(up, timeout=20, what="herd serve to listen")

    def get(
        self, path: str, session: str | None = "s1", **headers: str
    ) -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(self.base + path, headers=headers)
        if session is not None:
            request.add_header("X-Session-ID", session)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            with error:
                return error.code, dict(error.headers), error.read()

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(15)

    def output(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        assert self.proc.stdout is not None
        return self.proc.stdout.read()


@pytest.fixture
def serve() -> Iterator[type[Serve]]:
    started: list[Serve] = []

    class Tracked(Serve):
        def __init__(self, *flags: str, command: list[str] | None = None) -> None:
            super().__init__(*flags, command=command)
            started.append(self)

    yield Tracked
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()
        if server.proc.stdout is not None:
            server.proc.stdout.close()


def test_readme_command_routes_sessions_and_stops_cleanly(serve: type[Serve]) -> None:
    server = serve("--min", "1", "--max", "5", "--ttl", "15m", "--session-header", "X-Session-ID")
    server.wait_ready()
    counts = [json.loads(server.get("/state")[2])["count"] for _ in range(3)]
    assert counts == [1, 2, 3]
    assert json.loads(server.get("/state", "other")[2])["count"] == 1
    status, _, body = server.get("/state", session=None)
    assert status == 400
    assert json.loads(body)["error"] == "no_session"
    stats = json.loads(server.get("/herd/stats", session=None)[2])
    assert stats["active_sessions"] == 2
    assert stats["max_workers"] == 5
    workers = [row["pid"] for row in stats["workers"]]
    assert server.stop() == 0
    output = server.output()
    assert "session=s-" in output  # logs tag the session and name the worker
    assert "session=s1" not in output
    assert "stopped" in output
    assert not any(
        psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie" for pid in workers
    )


def test_the_issue_example_with_python_http_server(serve: type[Serve]) -> None:
    server = serve(
        "--min",
        "1",
        "--max",
        "5",
        "--ttl",
        "15m",
        "--session-header",
        "X-Session-ID",
        command=["python", "-m", "http.server", "--bind", "127.0.0.1", "{port}"],
    )
    server.wait_ready()
    status, _, body = server.get("/")
    assert status == 200
    assert b"Directory listing" in body
    assert server.stop() == 0


SECRET_ID = "3f9c2b7e8a1d4c6f9e0b5a7d2c8f1e4b"  # a session ID as the README says: random


@pytest.mark.parametrize("routing", ["header", "path", "query"])
def test_session_ids_stay_out_of_logs_and_unauthenticated_stats(
    serve: type[Serve], routing: str
) -> None:
    """Whoever presents a session's ID reaches its worker: an ID read from the
    log or from the stats route is a stolen session."""
    flags = {"header": [], "path": ["--session-path"], "query": ["--session-query", "sid"]}
    server = serve("--min", "1", *flags[routing])
    server.wait_ready()
    path = {"header": "/state", "path": f"/{SECRET_ID}/state", "query": f"/state?sid={SECRET_ID}"}
    assert server.get(path[routing], session=SECRET_ID)[0] == 200
    stats = server.get("/herd/stats", session=None)[2].decode()
    assert SECRET_ID not in stats
    (pinned,) = [w["session_id"] for w in json.loads(stats)["workers"] if w["session_id"]]
    assert pinned.startswith("s-")
    assert server.stop() == 0
    output = server.output()
    assert SECRET_ID not in output
    assert f"session={pinned}" in output  # the log's tag is the stats' tag


def test_the_admin_token_shows_the_stats_with_session_ids(serve: type[Serve]) -> None:
    os.environ["HERD_ADMIN_TOKEN"] = "t0ken"
    try:
        server = serve("--min", "1")
    finally:
        del os.environ["HERD_ADMIN_TOKEN"]
    server.wait_ready()
    assert server.get("/state", session=SECRET_ID)[0] == 200
    for wrong in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "t0ken"}):
        status, _, body = server.get("/herd/stats", session=None, **wrong)
        assert status == 401
        assert json.loads(body)["error"] == "unauthorized"
        assert SECRET_ID.encode() not in body
    status, _, body = server.get("/herd/stats", session=None, Authorization="Bearer t0ken")
    assert status == 200
    (row,) = [w for w in json.loads(body)["workers"] if w["session_id"]]
    assert row["session_id"] == SECRET_ID
    assert row["session_tag"].startswith("s-")
    assert server.stop() == 0
    assert f"session={row['session_tag']}" in server.output()


def test_sigint_stops_cleanly_too(serve: type[Serve]) -> None:
    server = serve("--min", "2")
    server.wait_ready()
    assert server.stop(signal.SIGINT) == 0


def test_python_dash_m_and_flags_for_path_routing_and_limits(serve: type[Serve]) -> None:
    server = serve(
        "--session-path",
        "--max-body-size",
        "1k",
        "--stats-path",
        "/_stats",
        "--env",
        "GREETING=hi {port}",
        "--no-reuse",
        "--health-interval",
        "0",
    )
    server.base_stats = server.base + "/_stats"
    wait_until_sync(lambda: _answers(server.base + "/_stats"), timeout=20, what="listen")
    status, _, body = server.get("/alice/echo?x=1", session=None)
    assert status == 200
    assert json.loads(body)["uri"] == "/echo?x=1"
    big = urllib.request.Request(server.base + "/alice/upload", data=b"x" * 4096, method="POST")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(big, timeout=10)
    assert caught.value.code == 413
    caught.value.close()
    assert server.stop() == 0


def _answers(url: str) -> bool:
    """Whether an HTTP server answers at ``url`` (any status: a 401 is an answer)."""
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            response.read()
    except urllib.error.HTTPError as error:
        error.close()
        return True
    except OSError:
        return False
    return True


def test_memory_stays_flat_for_large_transfers(serve: type[Serve]) -> None:
    server = serve("--log-level", "warning")
    server.wait_ready()
    gateway = psutil.Process(server.proc.pid)
    server.get("/echo")  # warm up: imports, first worker connection
    before = gateway.memory_info().rss
    size = 256 * 1024 * 1024
    chunk = os.urandom(1 << 20)
    digest = hashlib.sha256()

    def body() -> Iterator[bytes]:
        for _ in range(size // len(chunk)):
            digest.update(chunk)
            yield chunk

    upload = urllib.request.Request(
        server.base + "/upload",
        data=body(),
        method="POST",
        headers={"X-Session-ID": "s1", "Content-Length": str(size)},
    )
    with urllib.request.urlopen(upload, timeout=60) as response:
        assert json.loads(response.read()) == {"bytes": size, "sha256": digest.hexdigest()}
    peak_upload = gateway.memory_info().rss
    request = urllib.request.Request(
        server.base + f"/download/{size}", headers={"X-Session-ID": "s1"}
    )
    received = 0
    with urllib.request.urlopen(request, timeout=60) as response:
        while piece := response.read(1 << 20):
            received += len(piece)
    assert received == size
    growth = max(peak_upload, gateway.memory_info().rss) - before
    assert growth < 64 * 1024 * 1024, f"gateway RSS grew by {growth >> 20} MiB"
    assert server.stop() == 0


def test_missing_worker_binary_exits_with_a_clear_error(serve: type[Serve]) -> None:
    server = serve(command=["/no/such/herd-worker", "{port}"])
    assert server.proc.wait(20) == 1
    assert "herd-worker" in server.output()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ([], "give the worker command after --"),
        (["--ttl", "banana", "--", "x"], "not a duration"),
        (["--max-body-size", "lots", "--", "x"], "not a size"),
        (["--min", "3", "--max", "2", "--", "x"], "max_workers (2) must be >= min_workers (3)"),
        (["--env", "NOVALUE", "--", "x"], "expected NAME=VALUE"),
    ],
)
def test_bad_flags_exit_2_with_a_message(flags: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "herd", "serve", *flags],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert message in done.stderr


def test_a_port_in_use_fails_before_any_worker_starts() -> None:
    # herd serve binds its port before the pool starts: a worker that picks a free
    # port cannot take it meanwhile, and a port in use costs no spawn.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = [sys.executable, "-m", "herd", "serve", "--port", str(port), "--min", "2"]
        argv += ["--health-path", "/health", "--", sys.executable, WEB_WORKER, "{port}"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "pool ready" not in done.stderr  # no worker was started


def test_version() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "herd", "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert done.stdout.startswith("herd ")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("15m", 900),
        ("30s", 30),
        ("1h30m", 5400),
        ("500ms", 0.5),
        ("2", 2),
        ("0", 0),
        ("1.5h", 5400),
        ("1d", 86400),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "m", "15x", "-1s", "1 h", "s15"])
def test_parse_duration_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512M", 512 << 20),
        ("1k", 1024),
        ("2G", 2 << 30),
        ("100", 100),
        ("1.5KiB", 1536),
        ("3mb", 3 << 20),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_time_is_bounded() -> None:
    # parse_* are pure; this guards against a catastrophic regex on long input.
    started = time.monotonic()
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("1" * 10_000 + "x")
    assert time.monotonic() - started < 1


@pytest.mark.parametrize("loop", ["auto", "asyncio"])
def test_websocket_through_herd_serve_on_each_loop(serve: type[Serve], loop: str) -> None:
    import asyncio

    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    server = serve("--loop", loop)
    server.wait_ready()

    async def echo() -> tuple[object, object, int | None]:
        request = HTTPRequest(f"ws://127.0.0.1:{server.port}/ws", headers={"X-Session-ID": "s1"})
        ws = await asyncio.wait_for(websocket_connect(request, subprotocols=["herd.v2"]), 10)
        await ws.write_message("hello")
        text = await ws.read_message()
        await ws.write_message(b"\x00" * 100_000, binary=True)
        binary = await ws.read_message()
        await ws.write_message("close:4003:done")
        assert await ws.read_message() is None
        ws.close()
        return text, len(binary or b""), ws.close_code

    assert asyncio.run(echo()) == ("hello", 100_000, 4003)
    assert server.stop() == 0


def test_limit_flags_reach_the_workers(serve: type[Serve]) -> None:
    from herd import _cgroups

    if _cgroups.detect().version is None:
        pytest.skip(f"no usable cgroups here: {_cgroups.detect().reason}")
    from tests.helpers import WORKER

    server = serve(
        "--cpu",
        "0.5",
        "--memory",
        "96M",
        "--pids",
        "64",
        "--health-path",
        "/health",
        command=[sys.executable, WORKER, "{port}"],
    )
    server.wait_ready()
    stats = json.loads(server.get("/herd/stats", session=None)[2])
    assert stats["sandbox"] in ("full", "partial")
    assert "limits by cgroup" in stats["sandbox_reason"]
    status, _, _ = server.get("/alloc/300")  # over --memory: the worker is killed
    assert status == 502
    stats = json.loads(server.get("/herd/stats", session=None)[2])
    assert stats["recent_crashes"][-1]["reason"] == "killed: memory limit 96 MiB"
    assert server.get("/state")[0] == 200  # the session's next request: a fresh worker
    assert server.stop() == 0
    assert "sandbox: " in server.output()


@pytest.mark.parametrize("flags", [["--pids", "0"], ["--cpu", "-1"], ["--memory", "10"]])
def test_bad_limit_flags_exit_2(flags: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "herd", "serve", *flags, "--", "x"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "limit" in done.stderr


# -- floods: connections past the cap, descriptors, repeated log lines ---------------------


def http_get(sock: socket.socket, path: str, session: str) -> bytes:
    """One keep-alive GET on an open connection; the whole response (Content-Length)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nX-Session-ID: {session}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[
            1
        ]
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_connections_past_the_cap_get_503_and_the_rest_are_served_on(
    serve: type[Serve],
) -> None:
    server = serve("--min", "1", "--max", "2", "--max-connections", "8")
    server.wait_ready()
    before = {w["pid"] for w in json.loads(server.get("/herd/stats", session=None)[2])["workers"]}
    held, refused = [], []
    try:
        for _ in range(8):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            answer = http_get(sock, "/state", "s1")
            # (The connections of wait_ready() may not have been seen closed yet.)
            (held if answer.startswith(b"HTTP/1.1 200") else refused).append(sock)
        assert len(held) >= 6, len(held)
        # The 9th and later: a canned 503 and closed, without a request read.
        for _ in range(20):
            extra = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            refused.append(extra)
            reply = extra.recv(65536)
            assert reply.startswith(b"HTTP/1.1 503"), reply
            assert b"Connection: close" in reply
            assert b"too_many_connections" in reply
            assert extra.recv(65536) == b""  # closed
        # The connections already open are served on, by the same workers.
        for sock in held:
            assert http_get(sock, "/state", "s1").startswith(b"HTTP/1.1 200")
    finally:
        for sock in held + refused:
            sock.close()

    # Freed: new connections are taken again.
    def served() -> bool:
        return server.get("/state")[0] == 200

    wait_until_sync(served, timeout=10, what="a new connection served")
    after = {w["pid"] for w in json.loads(server.get("/herd/stats", session=None)[2])["workers"]}
    assert before <= after  # no worker was killed for it
    assert server.stop() == 0
    output = server.output()
    # 20 refusals, but the warning is not repeated 20 times.
    assert 1 <= output.count("refusing a connection") < 5, output


def test_websocket_tunnels_count_against_the_connection_cap(serve: type[Serve]) -> None:
    """Tornado lets go of a connection once it is a tunnel: without counting them
    a client could hold any number of descriptors through WebSockets."""
    import asyncio

    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    server = serve("--min", "1", "--max", "2", "--max-connections", "4")
    server.wait_ready()

    async def tunnels_then_one_more() -> bytes:
        open_ = []
        request = HTTPRequest(f"ws://127.0.0.1:{server.port}/ws", headers={"X-Session-ID": "s1"})
        for _ in range(4):
            ws = await asyncio.wait_for(websocket_connect(request), 10)
            await ws.write_message("hello")
            assert await ws.read_message() == "hello"
            open_.append(ws)
        try:
            loop = asyncio.get_running_loop()
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as extra:
                return await loop.run_in_executor(None, http_get, extra, "/state", "s1")
        finally:
            for ws in open_:
                ws.close()

    assert asyncio.run(tunnels_then_one_more()).startswith(b"HTTP/1.1 503")
    wait_until_sync(lambda: server.get("/state")[0] == 200, timeout=10, what="served again")
    assert server.stop() == 0


def test_the_soft_descriptor_limit_is_raised_and_sets_the_cap() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = ["prlimit", "--nofile=256:4096", sys.executable, "-m", "herd", "serve"]
    argv += ["--port", str(port), "--min", "0", "--", sys.executable, WEB_WORKER, "{port}"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_sync(
            lambda: _answers(f"http://127.0.0.1:{port}/herd/stats"), timeout=20, what="herd serve"
        )
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        (line,) = [row for row in limits.splitlines() if row.startswith("Max open files")]
        assert line.split()[3:5] == ["4096", "4096"]
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=15)
    assert "file descriptors: 4096; at most 1996 client connections" in output


def test_repeated_warnings_are_let_through_once_a_second() -> None:
    import logging

    from herd.cli import RepeatFilter

    records = []

    def make(msg: str, *args: object) -> logging.LogRecord:
        return logging.LogRecord("herd", logging.WARNING, __file__, 1, msg, args, None)

    repeat = RepeatFilter(interval=0.2)
    for i in range(100):
        record = make("spawn failed: %s", i)
        if repeat.filter(record):
            records.append(record.getMessage())
    assert records == ["spawn failed: 0"]
    assert repeat.filter(make("another problem"))  # a distinct line goes through at once
    info = logging.LogRecord("herd", logging.INFO, __file__, 1, "request", (), None)
    assert all(repeat.filter(info) for _ in range(10))  # access lines are never dropped
    time.sleep(0.25)
    record = make("spawn failed: %s", 100)
    assert repeat.filter(record)
    assert record.getMessage() == "spawn failed: 100 (99 more like this in the last 0s)"


def test_a_request_head_over_the_limit_gets_431(serve: type[Serve]) -> None:
    server = serve("--min", "0", "--max-header-size", "1K")
    server.wait_ready()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Session-ID: s\r\nX-Pad: " + b"a" * 4096)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 431"), reply
    assert b"Connection: close" in reply


def test_a_head_that_trickles_in_is_cut_off_after_the_idle_connection_timeout(
    serve: type[Serve],
) -> None:
    server = serve("--min", "0", "--idle-connection-timeout", "1s")
    server.wait_ready()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(b"GET / HTTP/1.1\r\nX-Pad: ")  # a slowloris: the head never ends
        for _ in range(20):
            time.sleep(0.1)
            try:
                sock.sendall(b"a")
            except OSError:
                break
        sock.settimeout(10)
        try:
            rest = sock.recv(65536)
        except ConnectionResetError:
            rest = b""
    assert rest == b""  # closed
    assert 0.9 < time.monotonic() - started < 5


def websocket_handshake(port: int, origin: str | None, cookie: str) -> bytes:
    """Send a browser's WebSocket handshake with ``cookie``; the answer's head."""
    lines = [
        "GET /ws-request HTTP/1.1",  # a worker that leaves Origin to the gateway
        f"Host: 127.0.0.1:{port}",
        f"Cookie: {cookie}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
    ]
    if origin is not None:
        lines.append(f"Origin: {origin}")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
    return head.split(b"\r\n\r\n", 1)[0]


def test_a_cookie_routed_gateway_refuses_cross_site_websockets(serve: type[Serve]) -> None:
    """A page of another site can open a WebSocket to the gateway, and the browser
    sends the gateway's cookies with it: with sessions found by cookie, that page
    would drive the victim's session (cross-site WebSocket hijacking)."""
    server = serve("--min", "1", "--session-cookie", "sid", "--allow-origin", "https://app.example")
    server.wait_ready()
    port, cookie = server.port, "sid=victim-3f9c2b7e"
    refused = websocket_handshake(port, "http://evil.example", cookie)
    assert refused.startswith(b"HTTP/1.1 403"), refused
    for origin in (f"http://127.0.0.1:{port}", "https://app.example", None):
        accepted = websocket_handshake(port, origin, cookie)
        assert accepted.startswith(b"HTTP/1.1 101"), (origin, accepted)
    assert server.stop() == 0


def test_without_the_origin_check_a_cross_site_page_drives_the_session(serve: type[Serve]) -> None:
    """The attack the check stops: let the evil site's origin in, and its page's
    handshake, with the victim's cookie, reaches the victim's worker."""
    server = serve("--min", "1", "--session-cookie", "sid", "--allow-origin", "http://evil.example")
    server.wait_ready()
    hijacked = websocket_handshake(server.port, "http://evil.example", "sid=victim-3f9c2b7e")
    assert hijacked.startswith(b"HTTP/1.1 101"), hijacked
    assert server.stop() == 0
