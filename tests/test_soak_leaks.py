"""Descriptors the gateway must not keep: issue 14's soak, in seconds.

The soak (``bench/soak.py``) SIGKILLs a worker every 5 s; each kill left the
gateway's idle keep-alive connections to that worker in ``CLOSE_WAIT`` for good,
since the worker's successor listens on another port and nobody asked for the
old one again. These tests kill a worker of a real ``herd serve`` and watch the
gateway's ``/proc/PID/fd``, and age out the keep-alive connections of a real
worker.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from herd.proxy import UpstreamPool
from tests.helpers import wait_until, wait_until_sync

WEB_WORKER = str(Path(__file__).parent / "helpers" / "web_worker.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str, session: str | None = None) -> bytes:
    request = urllib.request.Request(url)
    if session is not None:
        request.add_header("X-Session-ID", session)
    with urllib.request.urlopen(request, timeout=10) as response:
        data: bytes = response.read()
        return data


def answers(url: str) -> bool:
    try:
        get(url)
    except OSError:
        return False
    return True


def keep_alive_get(conn: http.client.HTTPConnection, path: str, session: str) -> bytes:
    """A GET on a connection the client keeps open (no ``Connection: close``)."""
    conn.request("GET", path, headers={"X-Session-ID": session})
    response = conn.getresponse()
    assert response.status == 200, response.status
    return response.read()


def sockets_to(pid: int, port: int) -> list[str]:
    """TCP states of ``pid``'s sockets whose peer is loopback port ``port``."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    states = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            next(rows)
            for row in rows:
                fields = row.split()
                if fields[9] in inodes and int(fields[2].rsplit(":", 1)[1], 16) == port:
                    states.append(fields[3])  # "01" ESTABLISHED, "08" CLOSE_WAIT
    return states


def stop(proc: subprocess.Popen[str]) -> str:
    """SIGTERM ``herd serve``; its output."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=15)
    return output


@pytest.fixture
def gateway() -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A ``herd serve`` of one web worker; killed after the test. No health checks:
    their connections would come and go among those the tests count."""
    port = free_port()
    argv = [sys.executable, "-m", "herd", "serve", "--port", str(port), "--min", "1"]
    argv += ["--max", "2", "--health-path", "/health", "--health-interval", "0"]
    # Process isolation: the gateway's /proc/PID/net/tcp shows the sockets of its
    # own network, and a tenant's upstream sockets live in the worker's.
    argv += ["--isolation", "process", "--", sys.executable, WEB_WORKER, "{port}"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_sync(lambda: answers(base + "/herd/stats"), timeout=20, what="herd serve")
        yield proc, base
    finally:
        try:
            stop(proc)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def open_uses(base: str) -> int:
    """The session's uses in flight, from the gateway's stats."""
    (worker,) = json.loads(get(base + "/herd/stats"))["workers"]
    return int(worker["open_uses"])


def test_connections_to_a_killed_worker_are_closed(
    gateway: tuple[subprocess.Popen[str], str],
) -> None:
    proc, base = gateway
    client = http.client.HTTPConnection(base.removeprefix("http://"), timeout=10)
    try:
        keep_alive_get(client, "/state", "s1")  # an upstream connection, kept alive
        (worker,) = json.loads(get(base + "/herd/stats"))["workers"]
        worker_port = int(worker["address"].rsplit(":", 1)[1])
        assert sockets_to(proc.pid, worker_port) == ["01"]  # idle in the keep-alive pool

        os.killpg(worker["pid"], signal.SIGKILL)  # as the soak does
        # The worker's end is closed: ours must not stay in CLOSE_WAIT (nor at all).
        wait_until_sync(
            lambda: sockets_to(proc.pid, worker_port) == [], timeout=5, what="a closed socket"
        )
        # The session gets a new worker, over a new connection.
        keep_alive_get(client, "/state", "s1")
    finally:
        client.close()
    assert "Traceback" not in stop(proc)


def test_a_client_that_leaves_mid_request_costs_no_other_connection(
    gateway: tuple[subprocess.Popen[str], str],
) -> None:
    proc, base = gateway
    clients = [
        http.client.HTTPConnection(base.removeprefix("http://"), timeout=10) for _ in range(2)
    ]
    try:
        # Two requests at once: two upstream connections, both kept alive after.
        threads = [
            threading.Thread(target=keep_alive_get, args=(client, "/sleep/0.3", "s1"))
            for client in clients
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        (worker,) = json.loads(get(base + "/herd/stats"))["workers"]
        worker_port = int(worker["address"].rsplit(":", 1)[1])
        assert sockets_to(proc.pid, worker_port) == ["01", "01"]

        # A third client takes one of them and leaves before the answer.
        with socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1]))) as leaver:
            leaver.sendall(b"GET /sleep/2 HTTP/1.1\r\nHost: x\r\nX-Session-ID: s1\r\n\r\n")
            wait_until_sync(lambda: open_uses(base) == 1, what="the request under way upstream")
        # Its upstream connection goes (its answer would come to nobody); the
        # other one stays: a client leaving says nothing about the worker.
        wait_until_sync(
            lambda: sockets_to(proc.pid, worker_port) == ["01"], timeout=5, what="one dropped"
        )
        wait_until_sync(lambda: open_uses(base) == 0, what="the leaver's use closed")
        assert sockets_to(proc.pid, worker_port) == ["01"]
        keep_alive_get(clients[0], "/state", "s1")
        assert sockets_to(proc.pid, worker_port) == ["01"]  # reused, not a new one
    finally:
        for client in clients:
            client.close()
    assert "Traceback" not in stop(proc)


@pytest.fixture
def web_worker() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """One ``web_worker.py`` process: its address, the process."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, WEB_WORKER, str(port)])
    try:
        wait_until_sync(
            lambda: answers(f"http://127.0.0.1:{port}/health"), timeout=20, what="the worker"
        )
        yield f"127.0.0.1:{port}", proc
    finally:
        proc.kill()
        proc.wait()


async def test_idle_upstream_connections_are_closed_after_max_idle(
    web_worker: tuple[str, subprocess.Popen[bytes]],
) -> None:
    address, _ = web_worker
    upstreams = UpstreamPool(max_idle=0.3, prune_interval=0.05)
    try:
        streams = [(await upstreams.connect(address, 5))[0] for _ in range(3)]
        for stream in streams:
            upstreams.put(address, stream)
        assert upstreams.idle_count() == 3
        # Without any request, the pruner closes them and forgets the address.
        await wait_until(lambda: upstreams.idle_count() == 0, timeout=3, what="a prune")
        assert all(stream.closed() for stream in streams)
        assert upstreams.addresses() == []
    finally:
        upstreams.close()


async def test_kept_connections_to_a_dead_worker_are_pruned_at_once(
    web_worker: tuple[str, subprocess.Popen[bytes]],
) -> None:
    address, proc = web_worker
    # max_idle is long: only the worker's death can explain the prune.
    upstreams = UpstreamPool(max_idle=60, prune_interval=0.05)
    try:
        stream, _ = await upstreams.connect(address, 5)
        upstreams.put(address, stream)
        proc.kill()  # its end of the connection closes: ours would sit in CLOSE_WAIT
        proc.wait()
        await wait_until(lambda: upstreams.idle_count() == 0, timeout=3, what="a prune")
        assert stream.closed()
        assert upstreams.addresses() == []
    finally:
        upstreams.close()
