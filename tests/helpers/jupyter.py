"""A real ``jupyter server`` with herd_nb, in a subprocess, for the tests."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tests.helpers import stop_process, wait_until_sync
from tests.test_cli import free_port

TOKEN = "herd-test-token"

# jupyter_server's own race, stock and herd alike: a kernel message written to a
# WebSocket the browser has just closed ("Starting buffering ..."), whose failed write
# asyncio reports at exit. Upstream: jupyter/notebook#5867, tornadoweb/tornado#3565.
_UPSTREAM_CLOSED_WRITE = re.compile(
    r"^Task exception was never retrieved\n"
    r"future: <Task finished [^\n]*WebSocketProtocol13\.write_message[^\n]*"
    r"exception=WebSocketClosedError\(\)>\n"
    r"(?:.*\n)*?tornado\.websocket\.WebSocketClosedError$",
    re.MULTILINE,
)


def server_errors(log: str) -> list[str]:
    """The error lines and tracebacks of a server's log, but for upstream's known race."""
    log = _UPSTREAM_CLOSED_WRITE.sub("", log)
    return [line for line in log.splitlines() if line.startswith("[E ") or "Traceback" in line]


# Runs the command that follows with SIGINT at its default action (same PID, by
# exec), as a terminal starts it. A suite started in the background (`pytest &`)
# has SIGINT ignored, children inherit that, and jupyter_server, without a TTY,
# keeps whatever it inherited: a SIGINT would then do nothing.
SIGINT_DEFAULT = (
    sys.executable,
    "-c",
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execvp(sys.argv[1], sys.argv[1:])",
)


class Server:
    """``python -m jupyter_server`` with herd_nb, token auth and ``config`` (a
    ``jupyter_server_config.py`` text), rooted at ``tmp``."""

    def __init__(
        self,
        tmp: Path,
        config: str,
        argv: Sequence[str] = (),
        *,
        command: Sequence[str] | None = None,
    ) -> None:
        """Start it; ``command`` replaces the launch form (``jupyter server ...``),
        to which only the port, the token and ``--allow-root`` are added."""
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.root = tmp
        path = tmp / "jupyter_server_config.py"
        path.write_text(config)
        if command is None:
            command = [
                sys.executable,
                "-m",
                "jupyter_server",
                "--ServerApp.jpserver_extensions=herd_nb=True",
                f"--ServerApp.root_dir={tmp}",
                f"--config={path}",
                *argv,
            ]
        command = [
            *command,
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={self.port}",
            "--port-retries=0",
            f"--IdentityProvider.token={TOKEN}",
        ]
        if os.geteuid() == 0:
            command.append("--allow-root")
        # The log goes to a file, not a pipe nobody reads until the end: a server
        # that logs more than a pipe holds (64 KiB) would block on its next line.
        self.log_path = tmp / "jupyter-server.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [*SIGINT_DEFAULT, *command], stdout=subprocess.DEVNULL, stderr=log, cwd=tmp
            )

    def request(
        self,
        path: str,
        *,
        token: bool = True,
        method: str = "GET",
        body: Any = None,
        **headers: str,
    ) -> tuple[int, bytes]:
        data = json.dumps(body).encode() if body is not None else None
        if method in ("POST", "PUT", "PATCH") and data is None:
            data = b""
        request = urllib.request.Request(
            self.base + path, method=method, headers=headers, data=data
        )
        if token:
            request.add_header("Authorization", f"token {TOKEN}")
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                return reply.status, reply.read()
        except urllib.error.HTTPError as error:
            with error:
                return error.code, error.read()

    def json(self, path: str, **options: Any) -> Any:
        """The JSON body of a request that must succeed."""
        status, body = self.request(path, **options)
        assert 200 <= status < 300, (path, status, body[:500])
        return json.loads(body) if body else None

    def stats(self) -> dict[str, Any]:
        pools: dict[str, Any] = self.json("/herd/api/stats")["pools"]
        return pools

    def wait_ready(self, ready: Callable[[dict[str, Any]], bool]) -> None:
        """Until ``ready(pool stats)`` holds; fails with the server's log if it exits."""

        def check() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(self.log()[-3000:])
            try:
                status, body = self.request("/herd/api/stats")
            except OSError:
                return False
            return status == 200 and ready(json.loads(body)["pools"])

        wait_until_sync(check, timeout=60, what="jupyter server with herd_nb")

    def log(self) -> str:
        """Everything the server has logged so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop the server (``sig``; SIGKILL after 20 s)."""
        stop_process(self.proc, sig, 20)
