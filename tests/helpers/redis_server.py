"""A real ``redis-server`` on a loopback port, for the registry and cluster tests.

Never a mock: herd's claims are Lua scripts, and only Redis runs them as Redis
does. ``.ci/run`` installs the server (Debian's ``redis-server``); a machine
without it skips these tests, except under ``CI=true``, where that is a failure.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Any

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def redis_binary() -> str:
    """The ``redis-server`` path; skips (fails under CI) if there is none."""
    found = shutil.which("redis-server")
    if found is None:
        message = "redis-server is not installed (apt-get install redis-server)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


class RedisServer:
    """One ``redis-server`` process; :meth:`stop` and :meth:`start` again on the same
    port (its data gone, as a Redis without persistence restarts)."""

    def __init__(self, password: str | None = None) -> None:
        self.binary = redis_binary()
        self.port = free_port()
        self.password = password
        self.dir = tempfile.mkdtemp(prefix="herd-redis-")
        self.process: subprocess.Popen[bytes] | None = None
        self._stats_client: Any = None
        self._info_calls = 0

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no", "--dir", self.dir]
        if self.password:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    answer = sock.recv(64)
                    if answer.startswith((b"+PONG", b"-NOAUTH")):
                        return self
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.01)

    def stop(self) -> None:
        if self._stats_client is not None:
            self._stats_client.close()
            self._stats_client = None
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def command_calls(self) -> dict[str, int]:
        """How many times Redis has run each command (``INFO commandstats``; the
        calls inside Lua scripts included), for differences between two calls:
        the queries' own (one kept connection, an ``INFO`` each) are taken out."""
        import redis

        if self._stats_client is None:
            self._stats_client = redis.Redis(
                host="127.0.0.1", port=self.port, password=self.password
            )
        stats = self._stats_client.info("commandstats")
        self._info_calls += 1
        calls = {name.removeprefix("cmdstat_"): int(row["calls"]) for name, row in stats.items()}
        calls["info"] = calls.get("info", 0) - self._info_calls
        return calls

    def keys_and_values(self) -> dict[bytes, object]:
        """Every key with its value (hashes as dicts), to look for leaks."""
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, password=self.password)
        try:
            found: dict[bytes, object] = {}
            for key in client.scan_iter():
                kind = client.type(key)
                if kind == b"hash":
                    found[key] = client.hgetall(key)
                elif kind == b"set":
                    found[key] = client.smembers(key)
                else:
                    found[key] = client.get(key)
            return found
        finally:
            client.close()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
