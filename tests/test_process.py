"""ProcessFactory and ProcessWorker over the real test worker."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator

import psutil
import pytest

import herd
from herd import _process
from herd._process import OutputLog
from tests.helpers import WORKER, factory, pid_alive, wait_until


async def test_spawn_serves_on_its_port_with_port_in_args_and_env() -> None:
    worker = await factory(env={"ADDR": "127.0.0.1:{port}", "MODE": "x"}).spawn()
    try:
        assert worker.address == f"127.0.0.1:{worker.port}"
        assert worker.client.base_url == f"http://127.0.0.1:{worker.port}"
        reply = json.loads((await worker.client.get("/pid")).body)
        assert reply["port"] == worker.port
        for name, expected in [
            ("PORT", str(worker.port)),
            ("ADDR", f"127.0.0.1:{worker.port}"),
            ("MODE", "x"),
        ]:
            body = json.loads((await worker.client.get(f"/env/{name}")).body)
            assert body["value"] == expected
        assert await worker.healthy()
        assert any("listening" in line for line in worker.logs())
    finally:
        await worker.close()
    assert not worker.alive
    assert not pid_alive(worker.pid)
    assert await worker.wait() == "closed"


async def test_workers_listen_on_loopback_only() -> None:
    worker = await factory().spawn()
    try:
        conns = [
            c
            for c in psutil.net_connections("tcp")
            if c.laddr and c.laddr.port == worker.port and c.status == "LISTEN"
        ]
        assert conns
        assert all(c.laddr.ip == "127.0.0.1" for c in conns)
    finally:
        await worker.close()


async def test_missing_binary_is_a_spawn_error_naming_the_command() -> None:
    spawner = herd.ProcessFactory(["/nonexistent/herd-no-such-binary", "{port}"])
    with pytest.raises(herd.SpawnError) as caught:
        await spawner.spawn()
    assert "herd-no-such-binary" in str(caught.value)
    assert caught.value.command[0] == "/nonexistent/herd-no-such-binary"


async def test_exit_during_start_reports_exit_code_and_stderr_tail() -> None:
    with pytest.raises(herd.SpawnError) as caught:
        await factory(env={"WORKER_EXIT_AT_START": "3"}).spawn()
    error = caught.value
    assert error.exit_code == 3
    assert any("refusing to start" in line for line in error.output_tail)
    assert "exited with code 3" in str(error)
    assert WORKER in error.command


async def test_never_healthy_times_out_and_kills_the_process() -> None:
    started = time.monotonic()
    with pytest.raises(herd.SpawnError) as caught:
        await factory(env={"WORKER_NEVER_HEALTHY": "1"}, start_timeout=0.6).spawn()
    assert 0.6 <= time.monotonic() - started < 5
    assert "not healthy after 0.6s" in str(caught.value)
    assert "HTTP 503" in str(caught.value)
    # the no_orphans fixture checks that the process is gone


async def test_start_health_check_delay_is_respected() -> None:
    started = time.monotonic()
    worker = await factory(start_health_check_delay=0.4).spawn()
    try:
        assert time.monotonic() - started >= 0.4
    finally:
        await worker.close()


async def test_concurrent_spawns_get_distinct_ports() -> None:
    workers = await asyncio.gather(*(factory().spawn() for _ in range(6)))
    try:
        assert len({w.port for w in workers}) == 6
        assert all(await asyncio.gather(*(w.healthy() for w in workers)))
    finally:
        await asyncio.gather(*(w.close() for w in workers))


async def test_exit_is_noticed_at_once_with_the_reason() -> None:
    worker = await factory().spawn()
    try:
        await worker.client.get("/exit/7")
        reason = await asyncio.wait_for(worker.wait(), 5)
        assert reason == "exited with code 7"
        assert worker.returncode == 7
        assert not await worker.healthy()
    finally:
        await worker.close()


@pytest.mark.parametrize("sandbox", [True, False])
async def test_sigkill_of_the_worker_is_reported(sandbox: bool) -> None:
    worker = await factory(sandbox=sandbox).spawn()
    try:
        from herd._procfs import children

        target = children(worker.pid)[0] if worker.sandbox.prefix else worker.pid
        os.kill(target, signal.SIGKILL)
        assert await asyncio.wait_for(worker.wait(), 5) == "killed by SIGKILL"
    finally:
        await worker.close()


@pytest.mark.parametrize("sandbox", [True, False])
async def test_close_takes_the_whole_tree_including_daemons(sandbox: bool) -> None:
    worker = await factory(env={"WORKER_DOUBLE_FORK": "1"}, sandbox=sandbox).spawn()
    daemon = json.loads((await worker.client.get("/daemon")).body)["pid"]
    assert daemon is not None
    await worker.close()
    # The daemon's PID is namespace-local when sandboxed; the no_orphans fixture
    # finds it by its environment tag either way.
    assert not worker.alive


async def test_close_is_idempotent_and_survives_cancellation() -> None:
    worker = await factory().spawn()
    closing = asyncio.ensure_future(worker.close())
    await asyncio.sleep(0)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    await worker.close()
    await worker.close()
    assert not pid_alive(worker.pid)


def inline_worker(prelude: str) -> list[str]:
    """A one-file HTTP worker that first runs ``prelude`` (output is flushed)."""
    program = (
        "import http.server, os, signal, sys, functools\n"
        "print = functools.partial(print, flush=True)\n"
        f"{prelude}\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(200); self.end_headers()\n"
        "    def log_message(self, *a): pass\n"
        "http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n"
    )
    return [sys.executable, "-c", program, "{port}"]


async def test_sigterm_grace_for_workers_that_handle_it() -> None:
    graceful = "signal.signal(signal.SIGTERM, lambda *a: (print('graceful'), os._exit(0)))"
    worker = await herd.ProcessFactory(inline_worker(graceful)).spawn()
    started = time.monotonic()
    await worker.close()
    assert time.monotonic() - started < 1.5
    assert "graceful" in worker.logs()


async def test_worker_that_ignores_sigterm_is_killed_after_stop_timeout() -> None:
    stubborn = "signal.signal(signal.SIGTERM, lambda *a: None)"
    spawner = herd.ProcessFactory(inline_worker(stubborn), stop_timeout=0.3)
    worker = await spawner.spawn()
    await worker.close()
    assert not pid_alive(worker.pid)


async def test_output_goes_to_a_bounded_log_and_never_blocks_the_worker() -> None:
    chatty = "for i in range(20000): print('line', i, 'x' * 100)"
    spawner = herd.ProcessFactory(inline_worker(chatty), log_lines=50)
    worker = await spawner.spawn()  # 2 MB of output: a blocked pipe would never get healthy
    try:
        await wait_until(lambda: worker.logs(1) == ["line 19999 " + "x" * 100], what="output")
        assert len(worker.logs()) == 50
    finally:
        await worker.close()


def test_output_log_cuts_endless_lines() -> None:
    output = OutputLog(maxlen=3, max_line=10)
    assert output.feed(b"a" * 25) == ["a" * 10, "a" * 10]
    output.feed(b"b\nc\r\nd")
    output.flush()
    assert output.tail() == ["aaaaab", "c", "d"]


def test_bad_factory_options_raise_at_construction() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        herd.ProcessFactory([])
    with pytest.raises(ValueError, match="non-empty"):
        herd.ProcessFactory("python -m http.server")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="health_path"):
        herd.ProcessFactory(["x"], health_path="health")
    with pytest.raises(ValueError, match="start_timeout"):
        herd.ProcessFactory(["x"], start_timeout=-1)
    with pytest.raises(ValueError, match="start_timeout"):
        herd.ProcessFactory(["x"], start_timeout=0)
    with pytest.raises(ValueError, match="sandbox"):
        herd.ProcessFactory(["x"], sandbox="maybe")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="environment"):
        herd.ProcessFactory(["x"], env={"A=B": "c"})


async def test_sandboxed_workers_cannot_see_each_other() -> None:
    workers = await asyncio.gather(factory().spawn(), factory().spawn())
    try:
        if workers[0].sandbox.level != "full":
            pytest.skip(f"needs the full sandbox (root): {workers[0].sandbox.reason}")
        for worker in workers:
            seen = json.loads((await worker.client.get("/ps")).body)["pids"]
            # Only its own namespace: herd's init (1), its parent (2) and itself.
            assert seen == [1, 2, 3]
    finally:
        await asyncio.gather(*(w.close() for w in workers))


# -- a port taken between herd's pick and the worker's bind ---------------------------


@pytest.fixture
def first_port_taken(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The first port herd picks is taken at once by another process's listener,
    as the OS may give it to anyone once herd's probe socket is closed."""
    taken: list[int] = []
    listeners: list[socket.socket] = []
    allocate = _process._PORTS.allocate

    def allocate_then_take() -> int:
        port = allocate()
        if not taken:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.bind(("127.0.0.1", port))
            listener.listen()
            listeners.append(listener)
            taken.append(port)
        return port

    monkeypatch.setattr(_process._PORTS, "allocate", allocate_then_take)
    yield taken
    for listener in listeners:
        listener.close()


async def test_a_worker_whose_port_was_taken_starts_again_on_a_new_one(
    first_port_taken: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="herd")
    worker = await factory().spawn()
    try:
        assert first_port_taken
        assert worker.port != first_port_taken[0]
        assert (await worker.client.get("/health")).code == 200
        assert f"its port {first_port_taken[0]} was taken by another process" in caplog.text
    finally:
        await worker.close()


async def test_a_worker_that_fails_on_its_own_is_not_started_again(
    first_port_taken: list[int],
) -> None:
    """Only a port that another process holds is a race: an exit with the port
    free is the worker's failure, reported at once."""
    first_port_taken.append(0)  # take nothing: the worker fails by itself
    with pytest.raises(herd.SpawnError, match="exited with code 3") as caught:
        await factory(env={"WORKER_EXIT_AT_START": "3"}).spawn()
    assert "was taken" not in str(caught.value)
