"""The herd_nb server extension inside a real ``jupyter server``."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import wait_until_sync
from tests.helpers.jupyter import TOKEN, Server
from tests.test_cli import free_port

WEB_WORKER = str(Path(__file__).parent / "helpers" / "web_worker.py")


CONFIG = (
    f"c.Herd.command = [{sys.executable!r}, {WEB_WORKER!r}, '{{port}}']\n"
    "c.Herd.health_path = '/health'\n"
    "c.Herd.min_workers = 1\n"
    "c.Herd.max_workers = 3\n"
    "c.Herd.warm_kernels = 0\n"  # kernels have their own tests (test_warm_kernels)
)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    running = Server(tmp_path, CONFIG)
    try:
        running.wait_ready(lambda pools: pools["process"]["total_workers"] >= 1)
        yield running
    finally:
        running.stop()


FROZEN = re.compile(r"herd_nb: (\d+) objects of the server's start-up kept out")


def test_the_start_up_is_kept_out_of_full_collections_unless_turned_off(
    server: Server, tmp_path: Path
) -> None:
    """gc.freeze once started (what start-up made, the 200,000 objects of a
    JupyterLab server, is scanned by no full collection), said in the log;
    ``c.Herd.freeze_startup = False`` keeps Python's default, as stock."""
    # (Said once the pools have started: the fixture waits for a worker only.)
    wait_until_sync(lambda: FROZEN.search(server.log()), timeout=30, what="the freeze")
    frozen = FROZEN.findall(server.log())
    assert len(frozen) == 1, server.log()[-3000:]
    assert int(frozen[0]) > 50_000  # jupyter_server's own import makes ~165,000
    (tmp_path / "off").mkdir()
    stock_gc = Server(tmp_path / "off", CONFIG + "c.Herd.freeze_startup = False\n")
    try:
        stock_gc.wait_ready(lambda pools: pools["process"]["total_workers"] >= 1)
        # The freeze would come in the same step as this line; an answer after it
        # means the server's loop has gone past that step.
        wait_until_sync(lambda: "herd: process pool ready" in stock_gc.log(), timeout=30)
        assert stock_gc.request("/api/status")[0] == 200
        assert FROZEN.findall(stock_gc.log()) == []
    finally:
        stock_gc.stop()


def test_routes_refuse_unauthenticated_requests(server: Server) -> None:
    for path in ("/herd/api/stats", "/herd/api/sessions", "/herd/proxy/state"):
        status, body = server.request(path, token=False, **{"X-Session-ID": "s1"})
        assert status in (302, 403), (path, status)
        assert b"count" not in body
    status, _ = server.request("/herd/api/sessions/s1", token=False, method="DELETE")
    assert status in (302, 403)
    sessions = json.loads(server.request("/herd/api/sessions")[1])["sessions"]
    assert sessions == []  # nothing reached a worker


def test_websocket_upgrade_needs_authentication_too(server: Server) -> None:
    async def handshake(token: bool) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        auth = f"Authorization: token {TOKEN}\r\n" if token else ""
        writer.write(
            (
                f"GET /herd/proxy/ws HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                f"X-Session-ID: ws\r\n{auth}Upgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "\r\n"
            ).encode()
        )
        try:
            return await asyncio.wait_for(reader.readline(), 10)
        finally:
            writer.close()
            await writer.wait_closed()  # or the socket is left to the garbage collector

    assert b" 403 " in asyncio.run(handshake(token=False))
    assert b" 101 " in asyncio.run(handshake(token=True))


def test_proxy_pins_sessions_and_the_api_lists_and_ends_them(server: Server) -> None:
    counts = [
        json.loads(server.request("/herd/proxy/state", **{"X-Session-ID": "alice"})[1])["count"]
        for _ in range(3)
    ]
    assert counts == [1, 2, 3]
    sessions = json.loads(server.request("/herd/api/sessions")[1])["sessions"]
    assert [(s["id"], s["pool"]) for s in sessions] == [("alice", "process")]
    status, _ = server.request("/herd/api/sessions/alice", method="DELETE")
    assert status == 204
    assert json.loads(server.request("/herd/api/sessions")[1])["sessions"] == []
    assert server.request("/herd/api/sessions/nobody", method="DELETE")[0] == 404
    stats = json.loads(server.request("/herd/api/stats")[1])["pools"]["process"]
    assert stats["max_workers"] == 3


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "api/shutdown"])
def test_workers_stop_with_the_server(server: Server, how: str) -> None:
    server.request("/herd/proxy/state", **{"X-Session-ID": "bob"})
    if how == "api/shutdown":
        assert server.request("/api/shutdown", method="POST")[0] == 200
    else:
        server.proc.send_signal(getattr(signal, how))
    assert server.proc.wait(20) == 0
    # the no_orphans fixture fails the test if any worker is left


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("--Herd.min_workers=-1", "min_workers must be >= 0"),
        ("--Herd.max_workers=0", "max_workers must be >= 1"),
        ("--Herd.pids_limit=0", "pids_limit must be >= 1 or -1"),
        ("--Herd.ttl=-5", "ttl must be a finite number of seconds >= 0"),
        ("--Herd.warm_kernels=-1", "warm_kernels must be >= 0"),
        ("--Herd.kernel_names=no-such-kernel", "no kernelspec 'no-such-kernel'"),
    ],
)
def test_bad_configuration_stops_start_up_with_a_clear_message(
    tmp_path: Path, option: str, message: str
) -> None:
    argv = [
        sys.executable,
        "-m",
        "jupyter_server",
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={free_port()}",
        "--ServerApp.jpserver_extensions=herd_nb=True",
        f"--ServerApp.root_dir={tmp_path}",
        option,
        f"--Herd.command=[{sys.executable!r}, {WEB_WORKER!r}, '{{port}}']",
    ]
    if os.geteuid() == 0:
        argv.append("--allow-root")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert "invalid configuration (c.Herd.*)" in done.stderr
    assert message in done.stderr


def test_pool_metrics_in_prometheus(server: Server) -> None:
    server.request("/herd/proxy/state", **{"X-Session-ID": "carol"})
    status, body = server.request("/metrics")
    assert status == 200
    text = body.decode()
    assert 'herd_workers{pool="process",state="pinned"} 1.0' in text
    assert 'herd_sessions{pool="process"} 1.0' in text
    assert 'herd_spawn_failures{pool="process"} 0.0' in text


def test_installed_enabled_and_documented() -> None:
    import re

    listed = subprocess.run(
        [sys.executable, "-m", "jupyter", "server", "extension", "list"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    plain = re.sub(r"\x1b\[[0-9;]*m", "", listed.stdout + listed.stderr)
    assert re.search(r"herd_nb\s+enabled", plain), plain
    assert re.search(r"herd_nb\s+OK", plain), plain
    # jupyter_server prints --help-all before it loads any extension, so each
    # trait is checked in the extension's own help (the same text).
    from herd_nb.extension import Herd

    helped = Herd.class_get_help()
    for trait in (
        "min_workers",
        "max_workers",
        "ttl",
        "health_interval",
        "worker_reuse",
        "cpu_limit",
        "memory_limit",
        "pids_limit",
        "sandbox",
        "session_header",
        "command",
        "warm_kernels",
        "kernel_names",
    ):
        assert f"--Herd.{trait}" in helped, trait


def test_the_extension_installs_its_kernel_manager_and_websocket_classes(tmp_path: Path) -> None:
    from jupyter_server.serverapp import ServerApp

    from herd_nb import HerdKernelManager
    from herd_nb.websocket import NoDelayWebsocketConnection

    def configured(*argv: str) -> ServerApp:
        app = ServerApp()
        app.initialize(
            argv=[
                "--ServerApp.jpserver_extensions=herd_nb=True",
                f"--ServerApp.root_dir={tmp_path}",
                f"--ServerApp.runtime_dir={tmp_path}",
                *argv,
            ],
            new_httpserver=False,
        )
        return app

    app = configured()
    assert isinstance(app.kernel_manager, HerdKernelManager)
    assert app.web_app.settings["kernel_websocket_connection_class"] is NoDelayWebsocketConnection
    assert list(app.kernel_manager.herd_pools) == ["python3"]  # not started: no process
    # The user's own choices win.
    app = configured(
        "--ServerApp.kernel_manager_class="
        "jupyter_server.services.kernels.kernelmanager.AsyncMappingKernelManager",
        "--ServerApp.kernel_websocket_connection_class="
        "jupyter_server.services.kernels.connection.channels.ZMQChannelsWebsocketConnection",
    )
    assert type(app.kernel_manager).__name__ == "AsyncMappingKernelManager"
    assert app.web_app.settings["kernel_websocket_connection_class"] is not (
        NoDelayWebsocketConnection
    )


def test_kernels_get_no_cap_and_no_culling_unless_configured(tmp_path: Path) -> None:
    from jupyter_server.serverapp import ServerApp

    def pools(*argv: str) -> tuple[Any, dict[str, Any]]:
        """A server app configured by ``argv`` (not started: no process), and its pools."""
        app = ServerApp()
        command = f"--Herd.command=[{sys.executable!r}, {WEB_WORKER!r}, '{{port}}']"
        app.initialize(
            argv=[
                "--ServerApp.jpserver_extensions=herd_nb=True",
                f"--ServerApp.root_dir={tmp_path}",
                f"--ServerApp.runtime_dir={tmp_path}",
                command,
                *argv,
            ],
            new_httpserver=False,
        )
        return app.kernel_manager, app.web_app.settings["herd_pools"]

    # Nothing configured: kernels as stock (no cap, no culling); the process pool
    # keeps its documented defaults.
    manager, made = pools()
    assert made["kernels:python3"].config.max_workers == sys.maxsize
    assert manager.cull_idle_timeout == 0
    assert (made["process"].config.max_workers, made["process"].config.ttl) == (10, 300.0)
    # Set by the user: c.Herd.max_workers caps both, c.Herd.ttl culls idle kernels.
    manager, made = pools("--Herd.max_workers=3", "--Herd.ttl=60")
    assert made["kernels:python3"].config.max_workers == made["process"].config.max_workers == 3
    assert manager.cull_idle_timeout == 60
    # Jupyter's own culler, configured, wins over c.Herd.ttl.
    manager, _ = pools("--Herd.ttl=60", "--MappingKernelManager.cull_idle_timeout=600")
    assert manager.cull_idle_timeout == 600


HOSTILE = str(Path(__file__).parent / "helpers" / "hostile.py")


def test_the_process_pool_can_isolate_its_workers_as_tenants_and_as_a_user(
    tmp_path: Path,
) -> None:
    """``c.Herd.isolation = "tenant"`` and ``c.Herd.user`` reach the process pool."""
    import pwd
    import tempfile
    import urllib.request

    if os.geteuid() != 0:
        pytest.skip("running workers as another user needs root")
    outside = Path(tempfile.mkdtemp())  # not the server's: no worker may read it
    (outside / "secret.txt").write_text("server-secret")
    config = (
        f"c.Herd.command = [{sys.executable!r}, {HOSTILE!r}, '{{port}}']\n"
        "c.Herd.health_path = '/health'\n"
        "c.Herd.min_workers = 1\n"
        "c.Herd.warm_kernels = 0\n"
        "c.Herd.isolation = 'tenant'\n"
        "c.Herd.user = 'nobody'\n"
    )
    server = Server(tmp_path, config)
    try:
        server.wait_ready(lambda pools: pools["process"]["total_workers"] >= 1)
        code = (
            "import os\n"
            f"print(os.getuid(), os.path.exists('/sys'), os.path.exists({str(outside)!r}))"
        )
        request = urllib.request.Request(
            server.base + "/herd/proxy/run",
            data=code.encode(),
            method="POST",
            headers={"Authorization": f"token {TOKEN}", "X-Session-ID": "t"},
        )
        with urllib.request.urlopen(request, timeout=30) as reply:
            answer = json.loads(reply.read())
        assert answer["out"].split() == [str(pwd.getpwnam("nobody").pw_uid), "False", "False"]
        stats = server.json("/herd/api/stats")["pools"]["process"]
        assert "a filesystem view of its own" in stats["sandbox_reason"]
        assert "as user nobody" in stats["sandbox_reason"]
    finally:
        server.stop()
        (outside / "secret.txt").unlink()
        outside.rmdir()
