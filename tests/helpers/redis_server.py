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
from pathlib import Path
from typing import Any

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def required(program: str, package: str) -> str:
    """The path of ``program``; skips the test (fails it under CI) if there is none."""
    found = shutil.which(program)
    if found is None:
        message = f"{program} is not installed (apt-get install {package})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def redis_binary() -> str:
    """The ``redis-server`` path; skips (fails under CI) if there is none."""
    return required("redis-server", "redis-server")


class RedisServer:
    """One ``redis-server`` process; :meth:`stop` and :meth:`start` again on the same
    port (its data gone, as a Redis without persistence restarts)."""

    def __init__(self, password: str | None = None, *, tls: bool = False) -> None:
        self.binary = redis_binary()
        self.port = free_port()
        self.password = password
        self.tls = tls
        self.dir = tempfile.mkdtemp(prefix="herd-redis-")
        self.process: subprocess.Popen[bytes] | None = None
        self._stats_client: Any = None
        self._info_calls = 0

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.dir}/cert.pem"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        if self.tls:
            return self._start_tls()
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

    def _start_tls(self) -> RedisServer:
        """TLS only (``rediss://``), with a certificate made here for 127.0.0.1."""
        openssl = required("openssl", "openssl")
        cert, key = f"{self.dir}/cert.pem", f"{self.dir}/key.pem"
        subprocess.run(
            [
                *(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
                *("-keyout", key, "-out", cert, "-subj", "/CN=127.0.0.1"),
                *("-addext", "subjectAltName=IP:127.0.0.1"),
            ],
            check=True,
            capture_output=True,
        )
        args = [self.binary, "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--tls-cert-file", cert, "--tls-key-file", key, "--tls-ca-cert-file", cert]
        args += ["--tls-auth-clients", "no", "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server (TLS) did not start on {self.port}") from None
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


class Sentinel:
    """A Redis Sentinel (``redis-server --sentinel``) watching ``master`` as ``mymaster``."""

    def __init__(self, master: RedisServer) -> None:
        self.port = free_port()
        self.config = Path(master.dir) / f"sentinel-{self.port}.conf"
        self.config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {master.dir}\n"
            f"sentinel monitor mymaster 127.0.0.1 {master.port} 1\n"
            "sentinel down-after-milliseconds mymaster 1000\n"
        )
        self.process = subprocess.Popen(
            [master.binary, str(self.config), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"SENTINEL get-master-addr-by-name mymaster\r\n")
                    if str(master.port).encode() in sock.recv(256):
                        return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"redis sentinel did not start on port {self.port}")
            time.sleep(0.05)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


class Cluster:
    """A Redis Cluster of three masters on loopback ports (``redis-cli --cluster create``)."""

    def __init__(self) -> None:
        cli = required("redis-cli", "redis-tools")
        self.binary = redis_binary()
        self.dir = tempfile.mkdtemp(prefix="herd-redis-cluster-")
        # A cluster node also listens on its port + 10000 (the cluster bus).
        self.ports = [_cluster_port() for _ in range(3)]
        self.processes: list[subprocess.Popen[bytes]] = []
        try:
            for port in self.ports:
                self.processes.append(
                    subprocess.Popen(
                        [
                            *(self.binary, "--port", str(port), "--bind", "127.0.0.1"),
                            *("--cluster-enabled", "yes"),
                            *("--cluster-config-file", f"nodes-{port}.conf"),
                            *("--save", "", "--appendonly", "no", "--dir", self.dir),
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                        stdin=subprocess.DEVNULL,
                    )
                )
            for port in self.ports:
                _wait_for_pong(port, self.processes[0])
            subprocess.run(
                [
                    *(cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports)),
                    *("--cluster-replicas", "0", "--cluster-yes"),
                ],
                check=True,
                capture_output=True,
                timeout=30,
            )
            deadline = time.monotonic() + 15
            while (
                b"cluster_state:ok"
                not in subprocess.run(
                    [cli, "-p", str(self.ports[0]), "cluster", "info"],
                    capture_output=True,
                    check=True,
                ).stdout
            ):
                if time.monotonic() > deadline:
                    raise RuntimeError("the Redis Cluster did not become ready")
                time.sleep(0.1)
        except BaseException:
            self.close()
            raise

    def url(self, index: int = 0) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[index]}"

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def _cluster_port() -> int:
    while True:
        port = free_port()
        if port + 10000 <= 65535:
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port


def _wait_for_pong(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"redis-server did not start on port {port}")
        time.sleep(0.01)
