"""``POST herd/api/sessions/{id}/execute`` (the server side of ``%%herd``) in a real
``jupyter server``: code runs in sessions of the server's kernel pool, its output
streamed as NDJSON lines, with the interrupt, input and DELETE routes around it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.helpers import pid_alive, tagged_processes, wait_until, wait_until_sync
from tests.helpers.jupyter import TOKEN, Server
from tests.helpers.ndjson import Stream

API = "/herd/api/sessions"

_streams: list[Stream] = []  # every execute a test started, closed after it


def config(**herd: Any) -> str:
    """A ``jupyter_server_config.py`` text setting ``c.Herd.<key>``."""
    return "".join(f"c.Herd.{key} = {value!r}\n" for key, value in herd.items())


def kernel_pool(server: Server) -> dict[str, Any]:
    pool: dict[str, Any] = server.stats()["kernels:python3"]
    return pool


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the module's tests (a start costs seconds of the two cores).

    Its kernels come and go between tests (every session's kernel is replaced by
    a warm spare), so the per-test leak check below leaves them out; once it
    stops, no process of the tests may be left.
    """
    running = Server(tmp_path_factory.mktemp("root"), config(warm_kernels=1, max_workers=4))
    try:
        running.wait_ready(lambda pools: pools["kernels:python3"]["available_workers"] == 1)
        yield running
    finally:
        running.stop()
    assert running.proc.returncode == 0
    tag = os.environ["HERD_TEST_TAG"]
    wait_until_sync(lambda: tagged_processes(tag) == [], what="the server's kernels to exit")


def _tree(pid: int) -> set[int]:
    try:
        return {pid} | {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


@pytest.fixture(autouse=True)
def no_orphans(server: Server) -> Iterator[None]:
    """conftest's leak check, but for the module's server and its kernels (checked
    when it stops); the execute sessions a test leaves on it are ended."""
    tag = os.environ["HERD_TEST_TAG"]

    def ours() -> set[int]:
        children = {p.pid for p in psutil.Process().children(recursive=True)}
        return (children | set(tagged_processes(tag))) - _tree(server.proc.pid)

    before = ours()
    yield
    while _streams:
        _streams.pop().close()  # what a failed test left unread
    for session in server.json(API)["sessions"]:
        server.request(f"{API}/{session['id']}", method="DELETE")
    try:
        wait_until_sync(lambda: not ours() - before, timeout=5.0, what="processes to exit")
    except AssertionError:
        left = sorted(ours() - before)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        pytest.fail(f"test left processes running: {left}")


async def start(server: Server, session: str, code: str, **body: Any) -> Stream:
    """An execute whose answer is still to be read (status 200 checked)."""
    stream = await Stream.open(
        server.port, f"{API}/{session}/execute", {"code": code, **body}, token=TOKEN
    )
    _streams.append(stream)
    assert stream.status == 200, await stream.json()
    return stream


async def execute(server: Server, session: str, code: str, **body: Any) -> list[dict[str, Any]]:
    """Run a cell; every event, the last one ``done``."""
    events = await (await start(server, session, code, **body)).all()
    assert events[-1]["type"] == "done", events
    assert all(event["type"] != "done" for event in events[:-1]), events
    return events


def printed(events: list[dict[str, Any]]) -> str:
    return "".join(event["text"] for event in events if event["type"] == "stream")


def result(events: list[dict[str, Any]]) -> str:
    (found,) = (event for event in events if event["type"] == "execute_result")
    text: str = found["data"]["text/plain"]
    return text


def error_name(events: list[dict[str, Any]]) -> str:
    (found,) = (event for event in events if event["type"] == "error")
    name: str = found["ename"]
    return name


def worker_of(server: Server, session: str) -> dict[str, Any]:
    """The stats of the kernel pinned to ``session``."""
    workers = kernel_pool(server)["workers"]
    found: list[dict[str, Any]] = [w for w in workers if w["session_id"] == session]
    assert len(found) == 1, workers
    return found[0]


def message(body: bytes) -> str:
    text: str = json.loads(body)["message"]
    return text


async def test_output_is_streamed_as_it_happens(server: Server) -> None:
    code = "import time\nprint('first', flush=True)\ntime.sleep(1)\nprint('second')"
    stream = await start(server, "stream", code)
    assert stream.headers["content-type"] == "application/x-ndjson"
    got = [(at, event) async for at, event in stream.events()]
    assert [event["type"] for _, event in got] == ["stream", "stream", "done"]
    (first_at, first), (second_at, second), (done_at, done) = got
    assert (first["name"], first["text"]) == ("stdout", "first\n")
    assert second["text"] == "second\n"
    # Each line left the server when it was printed, not when the cell ended.
    assert second_at - first_at >= 0.8
    assert done_at - first_at >= 0.8
    assert done["status"] == "ok"
    assert done["execution_count"] == 1
    assert done["duration"] >= 1.0


async def test_results_displays_and_errors_are_events(server: Server) -> None:
    code = (
        "from IPython.display import display, clear_output\n"
        "display({'text/plain': 'shown', 'text/html': '<b>shown</b>'}, raw=True)\n"
        "handle = display('v1', display_id=True)\n"
        "handle.update('v2')\n"
        "clear_output(wait=True)\n"
        "6 * 7\n"
    )
    events = await execute(server, "outputs", code)
    kinds = [event["type"] for event in events]
    assert kinds == [
        "display_data",
        "display_data",
        "update_display_data",
        "clear_output",
        "execute_result",
        "done",
    ]
    assert events[0]["data"]["text/html"] == "<b>shown</b>"
    display_id = events[1]["transient"]["display_id"]
    assert events[2]["transient"]["display_id"] == display_id
    assert events[2]["data"]["text/plain"] == "'v2'"
    assert events[3]["wait"] is True
    assert result(events) == "42"
    assert events[4]["execution_count"] == events[5]["execution_count"] == 1

    events = await execute(server, "outputs", "raise ValueError('boom')")
    (error,) = (event for event in events if event["type"] == "error")
    assert (error["ename"], error["evalue"]) == ("ValueError", "boom")
    assert any("boom" in line for line in error["traceback"])
    assert (events[-1]["status"], events[-1]["execution_count"]) == ("error", 2)


async def test_a_session_keeps_its_kernel_and_state_other_sessions_do_not_see_it(
    server: Server,
) -> None:
    await execute(server, "alice", "secret = 'of alice'", kernel="python3")
    worker = worker_of(server, "alice")["id"]
    assert result(await execute(server, "alice", "secret")) == "'of alice'"
    assert error_name(await execute(server, "bob", "secret")) == "NameError"
    assert worker_of(server, "alice")["id"] == worker != worker_of(server, "bob")["id"]
    sessions = server.json(API)["sessions"]
    assert sorted((s["id"], s["pool"]) for s in sessions) == [
        ("alice", "kernels:python3"),
        ("bob", "kernels:python3"),
    ]
    # They are herd's sessions, not Jupyter kernels.
    assert server.json("/api/kernels") == []


async def test_cells_of_one_session_run_one_after_the_other(server: Server) -> None:
    await execute(server, "queue", "n = 0")
    slow = await start(server, "queue", "import time\ntime.sleep(1)\nn += 1")
    fast = await start(server, "queue", "n += 10\nn")

    async def stamped(stream: Stream) -> list[tuple[float, dict[str, Any]]]:
        return [item async for item in stream.events()]

    slow_events, fast_events = await asyncio.gather(stamped(slow), stamped(fast))
    assert slow_events[-1][1]["status"] == "ok"
    assert result([event for _, event in fast_events]) == "11"  # after the slow cell
    assert fast_events[0][0] >= slow_events[-1][0]


async def test_the_interrupt_route_stops_the_cell_and_keeps_the_state(server: Server) -> None:
    await execute(server, "intr", "kept = 'yes'")
    stream = await start(
        server, "intr", "import time\nprint('sleeping', flush=True)\ntime.sleep(30)"
    )
    events = stream.events()
    _, first = await anext(events)
    assert first["text"] == "sleeping\n"  # the cell is in its sleep
    began = time.monotonic()
    status, _ = server.request(f"{API}/intr/interrupt", method="POST")
    assert status == 204
    rest = [event async for _, event in events]
    assert time.monotonic() - began < 10
    assert error_name(rest) == "KeyboardInterrupt"
    assert rest[-1]["status"] == "error"
    assert result(await execute(server, "intr", "kept")) == "'yes'"
    status, body = server.request(f"{API}/nobody/interrupt", method="POST")
    assert status == 404
    assert "no session 'nobody'" in message(body)


async def test_a_client_that_goes_away_interrupts_its_cell(server: Server) -> None:
    await execute(server, "away", "kept = 1")
    code = "import time\nprint('go', flush=True)\ntime.sleep(30)\nfinished = True"
    stream = await start(server, "away", code)
    _, first = await anext(stream.events())
    assert first["text"] == "go\n"
    stream.close()
    began = time.monotonic()
    # Queued behind the interrupted cell, which ends at once.
    events = await execute(
        server, "away", "import sys\nprint(sys.last_type.__name__, kept, 'finished' in globals())"
    )
    assert printed(events) == "KeyboardInterrupt 1 False\n"
    assert time.monotonic() - began < 10


async def test_input_is_answered_through_the_input_route(server: Server) -> None:
    stream = await start(server, "ask", "name = input('who? ')\nprint('hi', name)", stdin=True)
    events = stream.events()
    _, request = await anext(events)
    assert request == {"type": "input_request", "prompt": "who? ", "password": False}
    status, _ = server.request(f"{API}/ask/input", method="POST", body={"value": "herd"})
    assert status == 204
    rest = [event async for _, event in events]
    assert printed(rest) == "hi herd\n"
    assert rest[-1]["status"] == "ok"

    status, body = server.request(f"{API}/ask/input", method="POST", body={"value": "late"})
    assert status == 409
    assert "no input() is pending" in message(body)
    status, _ = server.request(f"{API}/ask/input", method="POST", body={"value": 3})
    assert status == 400
    # Without "stdin": true the kernel is told there is no stdin.
    assert error_name(await execute(server, "ask", "input()")) == "StdinNotImplementedError"

    # An interrupt ends a pending input() too.
    stream = await start(server, "ask", "input('never answered')", stdin=True)
    events = stream.events()
    _, request = await anext(events)
    assert request["prompt"] == "never answered"
    assert server.request(f"{API}/ask/interrupt", method="POST")[0] == 204
    rest = [event async for _, event in events]
    assert error_name(rest) == "KeyboardInterrupt"
    assert result(await execute(server, "ask", "name")) == "'herd'"


async def test_authentication_and_xsrf(server: Server) -> None:
    for route, body in [
        ("execute", {"code": "ran = 1"}),
        ("interrupt", None),
        ("input", {"value": "v"}),
    ]:
        # No token and no cookie: Jupyter's XSRF check refuses an unsafe method.
        status, reply = server.request(f"{API}/auth/{route}", token=False, method="POST", body=body)
        assert status == 403, route
        assert "_xsrf" in message(reply)
    # An XSRF token that matches its cookie passes that check, not authentication.
    xsrf = "0123456789abcdef0123456789abcdef"
    status, reply = server.request(
        f"{API}/auth/execute",
        token=False,
        method="POST",
        body={"code": "ran = 1"},
        Cookie=f"_xsrf={xsrf}",
        **{"X-XSRFToken": xsrf},
    )
    assert status == 403
    assert "_xsrf" not in message(reply)
    status, _ = server.request(f"{API}/auth", token=False, method="DELETE")
    assert status == 403
    assert server.json(API)["sessions"] == []  # nothing ran


async def test_bad_requests_get_json_errors(server: Server) -> None:
    cases: list[tuple[str, Any, int, str]] = [
        ("a%20b", {"code": "1"}, 400, "invalid session ID 'a b'"),
        ("x" * 300, {"code": "1"}, 400, "at most 256"),
        ("ok", {"cod": "1"}, 400, '"code"'),
        ("ok", {"code": 1}, 400, '"code"'),
        ("ok", {"code": "1", "stdin": "yes"}, 400, '"stdin"'),
        ("ok", {"code": "1", "kernel": 7}, 400, '"kernel"'),
        ("ok", ["code"], 400, "JSON object"),
        ("ok", {"code": "1", "kernel": "no-such-kernel"}, 404, "no kernelspec 'no-such-kernel'"),
    ]
    for session, body, status, text in cases:
        stream = await Stream.open(server.port, f"{API}/{session}/execute", body, token=TOKEN)
        assert stream.status == status, (session, body)
        assert stream.headers["content-type"] == "application/json"
        assert text in (await stream.json())["message"], (session, body)
    stream = await Stream.open(server.port, f"{API}/ok/execute", raw=b"{'code':", token=TOKEN)
    assert (stream.status, (await stream.json())["message"]) == (
        400,
        "Invalid JSON in body of request",
    )
    assert server.json(API)["sessions"] == []

    # A Jupyter kernel's ID is not a session of the route, nor the reverse.
    kernel = server.json("/api/kernels", method="POST", body={"name": "python3"})
    status, body = server.request(
        f"{API}/{kernel['id']}/execute", method="POST", body={"code": "1"}
    )
    assert status == 409
    assert "is a Jupyter kernel" in message(body)
    server.json(f"/api/kernels/{kernel['id']}", method="DELETE")
    await execute(server, "taken", "1")
    status, body = server.request(
        "/api/kernels", method="POST", body={"name": "python3", "kernel_id": "taken"}
    )
    assert status == 409
    assert "session of herd's kernel pool" in message(body)
    assert server.json("/api/kernels") == []
    # A session runs one kernelspec.
    status, body = server.request(
        f"{API}/taken/execute", method="POST", body={"code": "1", "kernel": "other"}
    )
    assert status == 409
    assert "runs kernel 'python3'" in message(body)


async def test_delete_ends_the_session_and_its_kernel(server: Server) -> None:
    await execute(server, "gone", "x = 1")
    pid = worker_of(server, "gone")["pid"]
    status, _ = server.request(f"{API}/gone", method="DELETE")
    assert status == 204
    assert not pid_alive(pid)  # DELETE returns once the kernel has exited
    assert server.json(API)["sessions"] == []
    assert error_name(await execute(server, "gone", "x")) == "NameError"  # a new kernel
    assert server.request(f"{API}/gone", method="DELETE")[0] == 204
    assert server.request(f"{API}/gone", method="DELETE")[0] == 404

    # With a cell running and one queued behind it.
    running = await start(server, "busy", "import time\nprint('run', flush=True)\ntime.sleep(30)")
    events = running.events()
    await anext(events)
    queued = await start(server, "busy", "print('never')")
    pid = worker_of(server, "busy")["pid"]
    assert server.request(f"{API}/busy", method="DELETE")[0] == 204
    rest = [event async for _, event in events]
    assert error_name(rest) == "KeyboardInterrupt"
    assert rest[-1]["status"] == "error"
    assert await queued.all() == [
        {
            "type": "done",
            "status": "aborted",
            "execution_count": None,
            "duration": 0.0,
            "reason": "the session was ended",
        }
    ]
    assert not pid_alive(pid)


async def test_a_kernel_that_dies_mid_cell_ends_the_stream(server: Server) -> None:
    await execute(server, "crash", "kept = 1")
    pid = worker_of(server, "crash")["pid"]
    events = await execute(server, "crash", "import os, time\ntime.sleep(0.2)\nos._exit(3)")
    done = events[-1]
    assert (done["status"], done["execution_count"]) == ("dead", None), events
    assert "exited with code 3" in done["reason"]
    await wait_until(lambda: not pid_alive(pid), what="the dead kernel to be reaped")
    crashes = kernel_pool(server)["recent_crashes"]
    assert [c["session_id"] for c in crashes] == ["crash"]
    # The session starts afresh; the kernel manager took no notice.
    assert error_name(await execute(server, "crash", "kept")) == "NameError"
    assert server.json("/api/kernels") == []


async def test_a_full_pool_a_recycled_notebook_kernel_and_the_ttl(tmp_path: Path) -> None:
    server = Server(tmp_path, config(warm_kernels=1, max_workers=1, ttl=2, worker_reuse=True))
    try:
        server.wait_ready(lambda pools: pools["kernels:python3"]["available_workers"] == 1)
        (spare,) = (w["pid"] for w in kernel_pool(server)["workers"])
        # A notebook's kernel (its client stopped: the server has its own), shut
        # down and reset into the pool: the only kernel there is.
        kernel = server.json("/api/kernels", method="POST", body={"name": "python3"})
        server.json(f"/api/kernels/{kernel['id']}", method="DELETE")
        assert [w["pid"] for w in kernel_pool(server)["workers"] if w["state"] == "idle"] == [spare]
        assert printed(await execute(server, "one", "held = 1\nprint('ok')")) == "ok\n"
        assert worker_of(server, "one")["pid"] == spare

        # Every kernel is in use: another session waits acquire_timeout, then 503.
        running = await start(
            server, "one", "import time\nprint('busy', flush=True)\ntime.sleep(30)"
        )
        events = running.events()
        await anext(events)
        status, body = server.request(f"{API}/two/execute", method="POST", body={"code": "1"})
        assert status == 503
        assert "c.Herd.max_workers" in message(body)
        # That took longer than the TTL, but a running cell's session never ends.
        assert [s["id"] for s in server.json(API)["sessions"]] == ["one"]
        assert server.request(f"{API}/one/interrupt", method="POST")[0] == 204
        assert error_name([event async for _, event in events]) == "KeyboardInterrupt"

        # Unused for the TTL, the session ends; its kernel is reset for the next one.
        await wait_until(lambda: server.json(API)["sessions"] == [], what="the TTL to end it")
        assert error_name(await execute(server, "two", "held")) == "NameError"
        assert worker_of(server, "two")["pid"] == spare

        # A server stopping under a running cell stops cleanly, its kernel too.
        running = await start(
            server, "two", "import time\nprint('busy', flush=True)\ntime.sleep(30)"
        )
        events = running.events()
        await anext(events)
        server.stop()
        assert server.proc.returncode == 0
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            async for _, event in events:
                assert event["type"] != "done" or event["status"] == "dead"
        assert not pid_alive(spare)
    finally:
        server.stop()


def test_without_herd_kernel_pools_the_route_says_why(tmp_path: Path) -> None:
    server = Server(tmp_path, config(warm_kernels=0))
    try:
        server.wait_ready(lambda pools: pools == {})
        status, body = server.request(f"{API}/s/execute", method="POST", body={"code": "1"})
        assert status == 409
        assert "c.Herd.warm_kernels = 0" in message(body)
        assert server.request(f"{API}/s/interrupt", method="POST")[0] == 404
        assert server.request(f"{API}/s/input", method="POST", body={"value": ""})[0] == 409
        assert server.request(f"{API}/s", method="DELETE")[0] == 404
    finally:
        server.stop()
