"""``herd serve --kernel python3``, a real process: the REPL API and the Kernel
Gateway protocol on herd's warm kernels (issue 13)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.helpers import stop_process, wait_until_sync
from tests.helpers.ndjson import Stream
from tests.test_cli import free_port

TOKEN = "gateway-test-token"

pytestmark = pytest.mark.timeout(120)


class Gateway:
    """A running ``herd serve --kernel python3``."""

    def __init__(self, root: Path, *flags: str, token: str | None = TOKEN) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.root = root
        self.token = token
        argv = [sys.executable, "-m", "herd", "serve", "--kernel", "python3"]
        argv += ["--port", str(self.port), "--warm", "1", "--cwd", str(root), *flags]
        if token is not None:
            argv += ["--token", token]
        self.log_path = root / "gateway.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=root)

    def wait_ready(self) -> None:
        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(self.log())
            try:
                return self.request("GET", "/api/kernelspecs")[0] == 200
            except OSError:
                return False

        wait_until_sync(up, timeout=60, what="the gateway to answer")

    def request(
        self, method: str, path: str, body: Any = None, *, token: str | None = "", **headers: str
    ) -> tuple[int, bytes]:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, method=method, data=data)
        token = self.token if token == "" else token
        if token:
            request.add_header("Authorization", f"token {token}")
        for name, value in headers.items():
            request.add_header(name.replace("_", "-"), value)
        try:
            with urllib.request.urlopen(request, timeout=60) as reply:
                return reply.status, reply.read()
        except urllib.error.HTTPError as error:
            with error:
                return error.code, error.read()

    def run(self, session: str, code: str, **options: Any) -> list[dict[str, Any]]:
        """Execute ``code`` (``?wait=1``); the events."""
        status, body = self.request(
            "POST", f"/sessions/{session}/execute?wait=1", {"code": code, **options}
        )
        assert status == 200, body
        events: list[dict[str, Any]] = json.loads(body)["events"]
        return events

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        stop_process(self.proc, sig, 30)


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    running = Gateway(tmp_path)
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


def result(events: list[dict[str, Any]]) -> Any:
    """The text of the execute_result among ``events``."""
    found = [e["data"]["text/plain"] for e in events if e["type"] == "execute_result"]
    return found[0] if found else None


def printed(events: list[dict[str, Any]]) -> str:
    return "".join(e["text"] for e in events if e["type"] == "stream")


# -- sessions ------------------------------------------------------------------------


def test_state_persists_in_a_session_and_never_crosses_sessions(gateway: Gateway) -> None:
    gateway.run("alice", "x = 'alice'; import os")
    gateway.run("bob", "x = 'bob'")
    assert result(gateway.run("alice", "x")) == "'alice'"
    assert result(gateway.run("bob", "x")) == "'bob'"
    alice_cwd = printed(gateway.run("alice", "print(os.getcwd())")).strip()
    bob_cwd = printed(gateway.run("bob", "import os; print(os.getcwd())")).strip()
    assert alice_cwd != bob_cwd
    sessions = (gateway.root / "sessions").resolve()  # both under the gateway's --cwd
    assert Path(alice_cwd).resolve().parent == Path(bob_cwd).resolve().parent == sessions
    assert "alice" not in alice_cwd  # the directory does not show the ID
    status, body = gateway.request("GET", "/sessions")
    assert status == 200
    listed = {row["id"]: row for row in json.loads(body)}
    assert set(listed) == {"alice", "bob"}
    assert listed["alice"]["cwd"] == alice_cwd
    assert listed["alice"]["kernel"] == "python3"
    assert listed["alice"]["state"] in ("idle", "busy")
    # Every session's kernel is a kernel of the Kernel Gateway protocol too.
    status, body = gateway.request("GET", "/api/kernels")
    assert {k["id"] for k in json.loads(body)} >= {listed["alice"]["kernel_id"]}
    assert gateway.request("DELETE", "/sessions/alice")[0] == 204
    assert not Path(alice_cwd).exists()
    assert gateway.request("GET", "/sessions/alice")[0] == 404
    assert result(gateway.run("alice", "'x' in dir()")) == "False"  # a new session


def test_events_arrive_in_order_as_ndjson_sse_or_one_document(gateway: Gateway) -> None:
    code = (
        "import sys\nprint('one')\nprint('two', file=sys.stderr)\n"
        "from IPython.display import display, HTML\ndisplay(HTML('<b>hi</b>'))\n40 + 2"
    )

    async def streamed(headers: dict[str, str]) -> tuple[str, bytes]:
        stream = await Stream.open(
            gateway.port, "/sessions/s/execute", {"code": code}, token=TOKEN, headers=headers
        )
        data = b""
        while chunk := await stream._chunk():
            data += chunk
        stream.close()
        return stream.headers["content-type"], data

    kind, data = asyncio.run(streamed({}))
    assert kind == "application/x-ndjson"
    events = [json.loads(line) for line in data.splitlines()]
    assert [(e["type"], e.get("name")) for e in events] == [
        ("stream", "stdout"),
        ("stream", "stderr"),
        ("display_data", None),
        ("execute_result", None),
        ("done", None),
    ]
    assert events[2]["data"]["text/html"] == "<b>hi</b>"
    assert result(events) == "42"
    assert events[-1]["status"] == "ok"
    assert events[-1]["execution_count"] == 1
    assert events[-1]["duration"] > 0
    kind, data = asyncio.run(streamed({"Accept": "text/event-stream"}))
    assert kind == "text/event-stream"
    blocks = [b for b in data.decode().split("\n\n") if b]
    assert blocks[0].startswith("event: stream\ndata: {")
    assert blocks[-1].startswith("event: done\n")
    # An error: name, value, traceback with its colours and without.
    (error,) = [e for e in gateway.run("s", "1 / 0") if e["type"] == "error"]
    assert (error["name"], error["value"]) == ("ZeroDivisionError", "division by zero")
    assert any("\x1b[" in line for line in error["traceback"])
    assert not any("\x1b[" in line for line in error["traceback_text"])
    assert "ZeroDivisionError" in "".join(error["traceback_text"])


def test_a_long_cell_streams_while_it_runs_and_an_interrupt_keeps_the_session(
    gateway: Gateway,
) -> None:
    gateway.run("long", "kept = 7")
    code = "import time\nfor i in range(60):\n    print(i, flush=True)\n    time.sleep(1)"

    async def run() -> tuple[float, list[dict[str, Any]]]:
        stream = await Stream.open(
            gateway.port, "/sessions/long/execute", {"code": code}, token=TOKEN
        )
        started = time.monotonic()
        events: list[dict[str, Any]] = []
        first = 0.0
        async for stamp, event in stream.events(timeout=70):
            events.append(event)
            if event["type"] == "stream" and event["text"].startswith("1\n"):
                first = stamp - started
                status, _ = await asyncio.to_thread(
                    gateway.request, "POST", "/sessions/long/interrupt"
                )
                assert status == 204
        return first, events

    first, events = asyncio.run(run())
    assert 0 < first < 10  # the second line, a second in: streamed, not at the end
    assert events[-1]["type"] == "done"
    assert events[-1]["status"] == "error"
    assert [e["name"] for e in events if e["type"] == "error"] == ["KeyboardInterrupt"]
    assert result(gateway.run("long", "kept")) == "7"


def test_a_client_that_leaves_mid_cell_leaves_the_cell_and_the_session_running(
    gateway: Gateway,
) -> None:
    code = (
        "import time\nfor i in range(15):\n    print(i, flush=True)\n    time.sleep(0.1)\nran = i"
    )

    async def leave_after_the_first_line() -> None:
        stream = await Stream.open(
            gateway.port, "/sessions/left/execute", {"code": code}, token=TOKEN
        )
        async for _, event in stream.events(timeout=30):
            if event["type"] == "stream":
                break
        stream.close()

    asyncio.run(leave_after_the_first_line())
    # The cell runs to its end in the session's kernel; the next one waits for it.
    assert result(gateway.run("left", "ran")) == "14"
    log = gateway.log()
    assert "Traceback" not in log, log
    assert "StreamClosedError" not in log, log


def test_a_timeout_interrupts_the_cell_and_keeps_the_session(gateway: Gateway) -> None:
    gateway.run("t", "kept = 'yes'")
    started = time.monotonic()
    events = gateway.run("t", "import time; time.sleep(30)", timeout=1)
    assert time.monotonic() - started < 10
    kinds = [e["type"] for e in events]
    assert "timeout" in kinds
    assert kinds[-1] == "done"
    assert [e["name"] for e in events if e["type"] == "error"] == ["KeyboardInterrupt"]
    assert result(gateway.run("t", "kept")) == "'yes'"


def test_a_kernel_killed_mid_execute_ends_the_stream_and_the_next_gets_a_fresh_one(
    gateway: Gateway,
) -> None:
    gateway.run("k", "lost = 1")
    events = gateway.run("k", "import os, time; time.sleep(0.5); os.kill(os.getpid(), 9)")
    assert events[-1]["type"] == "done"
    assert events[-1]["status"] in ("dead", "error")
    assert any(e["type"] == "error" for e in events)
    again = gateway.run("k", "'lost' in dir()")
    assert again[0]["type"] == "restarted"  # the response says the state is gone
    assert result(again) == "False"
    assert result(gateway.run("k", "1 + 1")) == "2"


def test_input_is_a_clear_error_not_a_hang(gateway: Gateway) -> None:
    started = time.monotonic()
    events = gateway.run("i", "input('name? ')")
    assert time.monotonic() - started < 10
    (error,) = [e for e in events if e["type"] == "error"]
    assert error["name"] == "StdinNotImplementedError"


# -- files --------------------------------------------------------------------------


def test_files_round_trip_and_refuse_escapes(gateway: Gateway) -> None:
    data = os.urandom(300_000)
    status, body = gateway.request("PUT", "/sessions/f/files/data/in.bin", data)
    assert status == 201, body
    assert json.loads(body)["bytes"] == len(data)
    assert result(gateway.run("f", "len(open('data/in.bin', 'rb').read())")) == str(len(data))
    gateway.run("f", "open('out.txt', 'w').write('from the kernel')")
    assert gateway.request("GET", "/sessions/f/files/out.txt") == (200, b"from the kernel")
    assert gateway.request("GET", "/sessions/f/files/missing")[0] == 404
    for bad in ("../gateway.log", "data/../../x", "%2e%2e/x"):
        assert gateway.request("GET", f"/sessions/f/files/{bad}")[0] in (400, 404), bad
        assert gateway.request("PUT", f"/sessions/f/files/{bad}", b"x")[0] in (400, 404), bad
    # A symbolic link the kernel made, out of its directory, is not followed.
    gateway.run("f", "import os; os.symlink('/etc', 'etc'); os.symlink('/etc/passwd', 'pw')")
    assert gateway.request("GET", "/sessions/f/files/etc/passwd")[0] == 400
    assert gateway.request("GET", "/sessions/f/files/pw")[0] == 400
    assert gateway.request("PUT", "/sessions/f/files/etc/evil", b"x")[0] == 400
    assert not Path("/etc/evil").exists()


# -- bad input ----------------------------------------------------------------------


def test_bad_requests_get_clear_4xx_in_json(gateway: Gateway) -> None:
    cases = [
        ("POST", "/sessions/s/execute", b"{not json", 400),
        ("POST", "/sessions/s/execute", json.dumps({"code": 3}).encode(), 400),
        ("POST", "/sessions/s/execute", json.dumps({"code": "1", "timeout": -1}).encode(), 400),
        ("POST", "/sessions/s/execute", json.dumps({"code": "x" * (2 << 20)}).encode(), 413),
        ("POST", "/sessions/nobody/interrupt", b"", 404),
        ("POST", "/sessions/nobody/restart", b"", 404),
        ("DELETE", "/sessions/nobody", b"", 404),
        ("POST", "/sessions/bad%20id/execute", json.dumps({"code": "1"}).encode(), 400),
    ]
    for method, path, body, expected in cases:
        status, answer = gateway.request(method, path, body)
        assert status == expected, (method, path, status, answer[:200])
        assert "message" in json.loads(answer)


def test_restart_clears_the_session_and_keeps_it(gateway: Gateway) -> None:
    gateway.run("r", "gone = 1")
    status, body = gateway.request("POST", "/sessions/r/restart")
    assert status == 200
    assert json.loads(body)["id"] == "r"
    assert result(gateway.run("r", "'gone' in dir()")) == "False"


# -- authentication -----------------------------------------------------------------


def test_every_route_needs_the_token_websockets_too(gateway: Gateway) -> None:
    from tornado.httpclient import HTTPClientError, HTTPRequest
    from tornado.websocket import websocket_connect

    for method, path in (
        ("GET", "/sessions"),
        ("POST", "/sessions/a/execute"),
        ("GET", "/api/kernels"),
        ("POST", "/api/kernels"),
        ("GET", "/sessions/a/files/x"),
    ):
        assert gateway.request(method, path, b"{}", token=None)[0] == 403, path
        assert gateway.request(method, path, b"{}", token="wrong")[0] == 403, path
    gateway.run("w", "1")
    kernel_id = json.loads(gateway.request("GET", "/sessions/w")[1])["kernel_id"]
    url = f"ws://127.0.0.1:{gateway.port}/api/kernels/{kernel_id}/channels"

    async def upgrade(headers: dict[str, str]) -> int:
        try:
            conn = await websocket_connect(HTTPRequest(url, headers=headers))
        except HTTPClientError as exc:
            return exc.code
        conn.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                while await conn.read_message() is not None:
                    pass
        return 101

    good = {"Authorization": f"token {TOKEN}"}
    assert asyncio.run(upgrade({})) == 403
    assert asyncio.run(upgrade({"Authorization": "token wrong"})) == 403
    assert asyncio.run(upgrade({**good, "Origin": "http://evil.example"})) in (403, 404)
    assert asyncio.run(upgrade(good)) == 101


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--host", "0.0.0.0"], "give --token"),
        (["--user", "nobody"], "--user, --env and --network are for worker commands"),
        (["--warm", "0"], "--warm must be >= 1"),
        (["--", "python", "-m", "http.server"], "give no worker command"),
    ],
)
def test_bad_gateway_flags_exit_2_with_a_message(
    tmp_path: Path, flags: list[str], message: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "herd", "serve", "--kernel", "python3", *flags],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "HERD_TOKEN"},
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert message in done.stderr


# -- processes ----------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_no_process_is_left_after_the_gateway_stops(tmp_path: Path, sig: signal.Signals) -> None:
    gateway = Gateway(tmp_path)
    try:
        gateway.wait_ready()
        gateway.run("p", "1")
        kernels = [p.pid for p in psutil.Process(gateway.proc.pid).children(recursive=True)]
        assert kernels
    finally:
        gateway.stop(sig)
    wait_until_sync(
        lambda: (
            not [
                pid
                for pid in kernels
                if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
            ]
        ),
        timeout=15,
        what="the kernels to go",
    )


# -- the Kernel Gateway protocol ----------------------------------------------------


def test_a_jupyter_server_with_gateway_url_runs_its_notebook_cells_here(
    gateway: Gateway, tmp_path: Path
) -> None:
    """A stock ``jupyter server --gateway-url`` (as ``jupyter lab --gateway-url``)
    starts its kernel here and runs a cell over its own kernel WebSocket."""
    from tests.helpers.jupyter import TOKEN as SERVER_TOKEN
    from tests.helpers.jupyter import Server
    from tests.helpers.kernel_ws import KernelWS

    root = tmp_path / "lab"
    root.mkdir()
    (root / "nb.ipynb").write_text(
        json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5})
    )
    argv = [f"--gateway-url={gateway.base}", f"--GatewayClient.auth_token={TOKEN}"]
    server = Server(root, "", argv)
    try:
        server.wait_ready(lambda pools: True)
        session = server.json(
            "/api/sessions",
            method="POST",
            body={"path": "nb.ipynb", "type": "notebook", "kernel": {"name": "python3"}},
        )
        kernel_id = session["kernel"]["id"]
        # The kernel is the gateway's.
        _, body = gateway.request("GET", "/api/kernels")
        assert kernel_id in {k["id"] for k in json.loads(body)}

        async def cell() -> tuple[dict[str, Any], str]:
            ws = await KernelWS.connect(server.base, kernel_id, SERVER_TOKEN)
            try:
                return await ws.execute("import os; print('pid', os.getpid()); 6 * 7", 60)
            finally:
                await ws.close()

        reply, out = asyncio.run(cell())
        assert reply["status"] == "ok"
        assert out.startswith("pid ")
        assert server.request(f"/api/sessions/{session['id']}", method="DELETE")[0] == 204
        _status, body = gateway.request("GET", "/api/kernels")
        assert kernel_id not in {k["id"] for k in json.loads(body)}
    finally:
        server.stop()


def test_a_kernel_gateway_client_talks_to_the_gateway_directly(gateway: Gateway) -> None:
    """Kernel Gateway's own protocol, as its clients speak it: create a kernel with
    ``POST /api/kernels`` and run code over ``/api/kernels/{id}/channels``."""
    from tests.helpers.kernel_ws import KernelWS

    status, body = gateway.request("GET", "/api/kernelspecs")
    assert status == 200
    assert "python3" in json.loads(body)["kernelspecs"]
    status, body = gateway.request("POST", "/api/kernels", {"name": "python3"})
    assert status == 201, body
    kernel_id = json.loads(body)["id"]

    async def cell() -> tuple[dict[str, Any], str]:
        ws = await KernelWS.connect(gateway.base, kernel_id, TOKEN)
        try:
            return await ws.execute("print(sum(range(10)))", 60)
        finally:
            await ws.close()

    reply, out = asyncio.run(cell())
    assert (reply["status"], out) == ("ok", "45\n")
    assert gateway.request("POST", f"/api/kernels/{kernel_id}/interrupt")[0] == 204
    assert gateway.request("DELETE", f"/api/kernels/{kernel_id}")[0] == 204


def test_many_new_sessions_at_once_all_get_their_first_result(gateway: Gateway) -> None:
    """More new sessions than warm spares, all at once: each gets a kernel (warm or
    started for it) and its result. (Each client of a session has a ZMQ identity
    of its own: with the kernel manager's, the kernel's replies went to herd's
    start-up probe of a kernel started for it, and the session waited a minute.)"""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as threads:  # (8 sessions and a spare: within --max 10)
        answers = list(threads.map(lambda i: gateway.run(f"many-{i}", f"{i} * 2"), range(8)))
    assert [result(events) for events in answers] == [str(i * 2) for i in range(8)]


def test_without_a_token_on_loopback_no_other_site_can_run_code(tmp_path: Path) -> None:
    """No token (loopback only): a program may run code, but a page of another
    site may not (a cross-site POST is a "simple request", no preflight), nor
    one reached through a DNS-rebound name."""
    gateway = Gateway(tmp_path, token=None)
    try:
        gateway.wait_ready()
        assert result(gateway.run("open", "1 + 1")) == "2"
        code = json.dumps({"code": "open('pwned', 'w')"}).encode()
        path = "/sessions/open/execute?wait=1"
        status, _ = gateway.request("POST", path, code, Origin="http://evil.example")
        assert status in (403, 404)
        status, _ = gateway.request("POST", path, code, Host=f"evil.example:{gateway.port}")
        assert status == 403
        assert result(gateway.run("open", "import os; os.path.exists('pwned')")) == "False"
    finally:
        gateway.stop()


def test_sessions_opened_while_the_pool_starts_are_sandboxed_and_capped(
    tmp_path: Path,
) -> None:
    """Requests that arrive as soon as the gateway answers, before its kernel pool
    is ready, still get kernels of herd's pool: sandboxed (in a PID namespace of
    their own), and within --max (a notebook server would start those the stock
    way, outside the pool)."""
    from concurrent.futures import ThreadPoolExecutor

    gateway = Gateway(tmp_path, "--max", "3")
    try:
        gateway.wait_ready()  # the server answers; its pool may still be starting

        def run(i: int) -> tuple[int, Any]:
            status, body = gateway.request(
                "POST", f"/sessions/early-{i}/execute?wait=1", {"code": "import os; os.getpid()"}
            )
            return status, json.loads(body)

        with ThreadPoolExecutor(5) as threads:
            answers = list(threads.map(run, range(5)))
        served = [body for status, body in answers if status == 200]
        assert sorted(status for status, _ in answers) == [200, 200, 200, 503, 503]
        stats = json.loads(gateway.request("GET", "/herd/api/stats")[1])["pools"]
        pool = stats["kernels:python3"]
        assert (pool["total_workers"], pool["active_sessions"]) == (3, 3)
        if pool["sandbox"] == "full":  # a PID namespace: the kernel is a low PID in it
            assert all(int(result(body["events"])) < 100 for body in served)
    finally:
        gateway.stop()
