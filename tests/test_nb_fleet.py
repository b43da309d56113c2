"""Two real ``jupyter server`` processes whose herd_nb process pools share a real
``redis-server`` (``c.Herd.registry_url``): a session of ``{base_url}herd/proxy/``
has one worker in the fleet, whichever server a request reaches (issue 12)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.jupyter import TOKEN, Server
from tests.helpers.redis_server import RedisServer
from tests.test_extension import CONFIG

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[Server, Server]]:
    redis = RedisServer().start()
    config = CONFIG.replace("c.Herd.min_workers = 1", "c.Herd.min_workers = 0") + (
        f"c.Herd.registry_url = {redis.url!r}\nc.Herd.node_lease = 2.0\n"
    )
    started: list[Server] = []
    try:
        for name in ("a", "b"):
            root = tmp_path / name
            root.mkdir()
            started.append(Server(root, config, [f"--Herd.node_id={name}"]))
        for server in started:
            server.wait_ready(lambda pools: "process" in pools)
        yield started[0], started[1]
    finally:
        for server in started:
            server.stop()
        redis.close()


def test_a_session_has_one_worker_across_jupyter_servers(fleet: tuple[Server, Server]) -> None:
    a, b = fleet
    session = {"X-Session-ID": "tenant-1"}
    assert a.json("/herd/proxy/state", **session)["count"] == 1  # a pins it
    assert b.json("/herd/proxy/state", **session)["count"] == 2  # b forwards to a
    assert b.json("/herd/proxy/state", **session)["count"] == 3
    assert a.stats()["process"]["active_sessions"] == 1
    assert b.stats()["process"]["active_sessions"] == 0
    # The worker gets no credential of either server (a strips what b forwarded),
    # and the client first in X-Forwarded-For.
    echoed = b.json("/herd/proxy/echo?token=" + TOKEN, **session, Cookie="x=1")
    headers = {name.lower(): value for name, value in echoed["headers"].items()}
    assert "authorization" not in headers
    assert "herd-forwarded" not in headers
    assert TOKEN not in json.dumps(echoed)
    assert headers["x-forwarded-for"].startswith("127.0.0.1")
    # Without the token, b refuses before forwarding anything.
    status, _ = b.request("/herd/proxy/state", token=False, **session)
    assert status == 403
    assert a.json("/herd/proxy/state", **session)["count"] == 4
    for server in (a, b):
        assert [line for line in server.log().splitlines() if "Traceback" in line] == []


def test_a_websocket_through_the_jupyter_server_that_does_not_own_the_session(
    fleet: tuple[Server, Server],
) -> None:
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    a, b = fleet
    session = {"X-Session-ID": "tenant-ws"}
    assert a.json("/herd/proxy/state", **session)["count"] == 1

    async def echo() -> object:
        request = HTTPRequest(
            f"ws://127.0.0.1:{b.port}/herd/proxy/ws",
            headers={**session, "Authorization": f"token {TOKEN}"},
        )
        ws = await asyncio.wait_for(websocket_connect(request), 10)
        await ws.write_message("through b")
        answer = await ws.read_message()
        ws.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                while await ws.read_message() is not None:
                    pass
        return answer

    assert asyncio.run(echo()) == "through b"
    assert a.stats()["process"]["total_workers"] == 1
    assert b.stats()["process"]["total_workers"] == 0
