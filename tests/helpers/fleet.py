"""A fleet of ``herd serve`` nodes sharing a real ``redis-server``, for the cluster
tests and ``bench/cluster.py``.

Each node is a real process on its own loopback port, started as the README
says (``--registry``, ``--node-address``), with the tiny test worker.
"""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.helpers import WORKER, wait_until_sync
from tests.helpers.redis_server import RedisServer, free_port

ADMIN_TOKEN = "fleet-admin-token"


class Node:
    """One ``herd serve --registry ...`` process."""

    def __init__(self, name: str, redis_url: str, *flags: str, command: list[str] | None) -> None:
        self.name = name
        self.port = free_port()
        self.address = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "herd", "serve", "--port", str(self.port)]
        argv += ["--registry", redis_url, "--node-address", self.address, "--node-id", name]
        argv += ["--admin-token", ADMIN_TOKEN, "--health-path", "/health", "--log-level", "warning"]
        argv += [*flags, "--", *(command or [sys.executable, WORKER, "{port}"])]
        self.log = Path(f"/tmp/herd-fleet-{name}-{self.port}.log")
        self._log_file = self.log.open("w")
        self.proc = subprocess.Popen(
            argv, stdout=self._log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )

    def request(
        self, path: str, session: str | None, *, timeout: float = 15.0, **headers: str
    ) -> tuple[int, dict[str, str], bytes]:
        """One GET; ``(status, headers, body)``."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            if session is not None:
                headers["X-Session-ID"] = session
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def stats(self) -> dict[str, Any]:
        status, _, body = self.request("/herd/stats", None, Authorization=f"Bearer {ADMIN_TOKEN}")
        assert status == 200, body
        stats: dict[str, Any] = json.loads(body)
        return stats

    def ready(self) -> bool:
        assert self.proc.poll() is None, self.output()
        try:
            return self.request("/herd/stats", None, timeout=2)[0] == 401  # (no token)
        except OSError:
            return False

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(20)
        self._log_file.close()
        return code

    def output(self) -> str:
        self._log_file.flush()
        return self.log.read_text()


class Fleet:
    """A ``redis-server`` and ``size`` nodes; :meth:`close` stops them all."""

    def __init__(self, size: int = 3, *flags: str, command: list[str] | None = None) -> None:
        self.redis = RedisServer().start()
        self.nodes: list[Node] = []
        try:
            for index in range(size):
                self.nodes.append(Node(f"n{index}", self.redis.url, *flags, command=command))
            for node in self.nodes:
                wait_until_sync(node.ready, timeout=30, what=f"node {node.name} to listen")
            wait_until_sync(self.joined, timeout=20, what="every node to see the fleet")
        except BaseException:
            self.close()
            raise

    def joined(self) -> bool:
        """Whether every live node sees every live node."""
        live = {n.name for n in self.nodes if n.proc.poll() is None}
        for node in self.nodes:
            if node.proc.poll() is None:
                seen = {row["node"] for row in node.stats()["fleet"]}
                if seen != live:
                    return False
        return True

    def close(self) -> None:
        for node in self.nodes:
            if node.proc.poll() is None:
                node.proc.kill()
            node.proc.wait(20)
            node._log_file.close()
            node.log.unlink(missing_ok=True)
        self.redis.close()


def wait_for(predicate: Any, timeout: float, what: str) -> float:
    """Seconds until ``predicate()`` held; fails after ``timeout``."""
    started = time.monotonic()
    wait_until_sync(predicate, timeout=timeout, what=what)
    return time.monotonic() - started
