"""Three ``herd serve`` nodes on one real ``redis-server``: one session, one worker,
in the whole fleet, whichever node a request reaches (issue 12).

Each node forwards a request for a session another node owns to that node; a
node that dies has its sessions started over on the live ones within its lease;
with Redis down, owned sessions go on and new ones get a 503 that names Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import random
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers import wait_until_sync
from tests.helpers.fleet import Fleet, Node
from tests.helpers.redis_server import redis_binary

LEASE = 2.0  # --node-lease in these tests: a dead node's sessions move within it

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    redis_binary()  # skip (or fail under CI) without redis-server
    made = Fleet(
        3, "--min", "0", "--max", "60", "--node-lease", f"{LEASE:g}s", "--log-level", "info"
    )
    try:
        yield made
    finally:
        made.close()


def count(node: Node, session: str) -> tuple[int, dict[str, str]]:
    """The session's worker's counter after one more request, through ``node``."""
    status, headers, body = node.request("/state", session)
    assert status == 200, (status, body)
    value: int = json.loads(body)["count"]
    return value, headers


def test_requests_to_random_nodes_reach_their_sessions_one_worker(fleet: Fleet) -> None:
    """1,000 requests over 100 sessions, each to a node picked at random: every
    session's counter goes 1, 2, ... 10 (one worker, never two), and the fleet
    holds 100 sessions on 100 workers in all."""
    sessions = [f"user-{i}" for i in range(100)]
    rng = random.Random(12)

    def run(session: str) -> list[int]:
        return [count(rng.choice(fleet.nodes), session)[0] for _ in range(10)]

    with ThreadPoolExecutor(16) as threads:
        counts = dict(zip(sessions, threads.map(run, sessions), strict=True))
    assert {sid: c for sid, c in counts.items() if c != list(range(1, 11))} == {}
    stats = [node.stats() for node in fleet.nodes]
    assert sum(s["active_sessions"] for s in stats) == 100
    pinned = sum(1 for s in stats for w in s["workers"] if w["session_id"] is not None)
    assert pinned == 100
    wait_until_sync(
        lambda: sum(row["sessions"] for row in fleet.nodes[0].stats()["fleet"]) == 100,
        timeout=10,
        what="the fleet's view to count every session",
    )
    # Every request was logged (at info), by its session's tag: never by its ID.
    for node in fleet.nodes:
        log = node.output()
        assert "session=s-" in log
        assert [sid for sid in sessions if f"{sid} " in log or f"{sid}'" in log] == []


def test_concurrent_first_requests_through_different_nodes_spawn_one_worker(
    fleet: Fleet,
) -> None:
    sessions = [f"race-{i}" for i in range(15)]
    work = [(node, sid) for sid in sessions for node in fleet.nodes]
    random.Random(3).shuffle(work)
    with ThreadPoolExecutor(len(work)) as threads:
        results = list(threads.map(lambda job: (job[1], count(*job)[0]), work))
    for sid in sessions:  # three first requests: one worker counted 1, 2, 3
        assert sorted(value for s, value in results if s == sid) == [1, 2, 3], sid
    stats = [node.stats() for node in fleet.nodes]
    assert sum(s["total_workers"] for s in stats) == len(sessions)  # --min 0: none spare


def owner_of(fleet: Fleet, session: str) -> Node:
    for node in fleet.nodes:
        if node.proc.poll() is None:
            rows = node.stats()["workers"]
            if any(row["session_id"] == session for row in rows):
                return node
    raise AssertionError(f"no node owns {session}")


def test_a_killed_node_s_sessions_start_over_on_live_nodes_within_its_lease(
    fleet: Fleet,
) -> None:
    sessions = [f"k-{i}" for i in range(12)]
    for i, sid in enumerate(sessions):
        count(fleet.nodes[i % 3], sid)
    dead = fleet.nodes[0]
    lost = [sid for sid in sessions if owner_of(fleet, sid) is dead]
    kept = [sid for sid in sessions if sid not in lost]
    assert lost
    assert kept
    dead.stop(signal.SIGKILL)
    killed = time.monotonic()
    live = fleet.nodes[1:]
    restarted: dict[str, str] = {}
    while len(restarted) < len(lost):
        for sid in lost:
            if sid in restarted:
                continue
            status, headers, body = live[len(restarted) % 2].request("/state", sid)
            if status == 200:
                assert json.loads(body)["count"] == 1  # a fresh worker
                restarted[sid] = headers.get("Herd-Session-Restarted", "")
            else:  # within the lease: the owner is named, but does not answer
                assert status == 503, (status, body)
                assert json.loads(body)["error"] == "node_unreachable"
        assert time.monotonic() - killed < LEASE + 5, "the sessions did not move in time"
        time.sleep(0.1)
    assert all("node n0" in why for why in restarted.values()), restarted
    for sid in kept:  # the live nodes' sessions were never disturbed
        assert count(live[0], sid)[0] == 2
        assert count(live[1], sid)[0] == 3
    for sid in lost:  # and the restarted ones are pinned anew, once
        _, headers = count(live[1], sid)
        assert "Herd-Session-Restarted" not in headers


def test_redis_down_owned_sessions_go_on_new_ones_get_503_then_all_recovers(
    fleet: Fleet,
) -> None:
    a, b, c = fleet.nodes
    count(a, "before")  # owned by a; b learns the owner (and forwards from then on)
    assert count(b, "before")[0] == 2
    fleet.redis.stop()
    assert count(a, "before")[0] == 3  # the owner needs no Redis
    assert count(b, "before")[0] == 4  # nor does a node that knows the owner
    started = time.monotonic()
    status, headers, body = c.request("/state", "new-while-down")
    assert time.monotonic() - started < 2  # fast, not a hang
    assert status == 503
    error = json.loads(body)
    assert error["error"] == "registry_unavailable"
    assert f"redis://127.0.0.1:{fleet.redis.port}" in error["message"]
    assert headers.get("Retry-After") == "1"
    fleet.redis.start()  # empty, as a Redis without persistence restarts
    # Within a renewal the nodes are back, "before" re-claimed by its owner; new
    # sessions wait for every node to have registered its sessions again.
    wait_until_sync(fleet.joined, timeout=10, what="the nodes to join again")

    def served() -> bool:
        return c.request("/state", "new-after")[0] == 200

    wait_until_sync(served, timeout=10, what="new sessions again")
    assert count(c, "before")[0] == 5  # c never saw it: Redis names a, as before
    assert count(a, "before")[0] == 6


def test_a_websocket_and_requests_through_a_node_that_does_not_own_the_session() -> None:
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    from tests.test_cli import WEB_WORKER

    redis_binary()
    fleet = Fleet(2, "--min", "0", "--max", "4", command=["python", WEB_WORKER, "{port}"])
    try:
        owner, other = fleet.nodes
        assert owner.request("/echo", "ws-session")[0] == 200  # owner pins it

        async def echo() -> tuple[object, object]:
            request = HTTPRequest(
                f"ws://127.0.0.1:{other.port}/ws", headers={"X-Session-ID": "ws-session"}
            )
            ws = await asyncio.wait_for(websocket_connect(request), 10)
            await ws.write_message("hello")
            text = await ws.read_message()
            await ws.write_message(b"\x01" * 200_000, binary=True)
            binary = await ws.read_message()
            ws.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    while await ws.read_message() is not None:
                        pass
            return text, len(binary or b"")

        assert asyncio.run(echo()) == ("hello", 200_000)
        # Every worker is the owner's: the tunnel went through other to owner.
        assert owner.stats()["total_workers"] == 1
        assert other.stats()["total_workers"] == 0
        # Forwarded HTTP: the worker sees the client's request, with the client
        # first in X-Forwarded-For, and never herd's hop header (nor a client's).
        for node in (owner, other):
            status, _, raw = node.request("/echo?x=1", "ws-session", **{"Herd-Forwarded": "1"})
            assert status == 200
            echoed = json.loads(raw)
            assert echoed["uri"] == "/echo?x=1"
            assert "Herd-Forwarded" not in echoed["headers"]
            assert echoed["headers"]["X-Forwarded-For"].startswith("127.0.0.1")
        # Bodies stream through both nodes: 8 MiB down, 8 MiB up (chunked).
        status, _, data = other.request("/download/8388608", "ws-session", timeout=30)
        assert (status, len(data)) == (200, 8388608)
        conn = http.client.HTTPConnection("127.0.0.1", other.port, timeout=30)
        try:
            conn.request(
                "POST",
                "/upload",
                body=iter([b"x" * 65536] * 128),
                headers={"X-Session-ID": "ws-session"},
                encode_chunked=True,
            )
            uploaded = json.loads(conn.getresponse().read())
        finally:
            conn.close()
        assert uploaded["bytes"] == 8388608
        # A client that claims to come through two nodes is not forwarded again.
        status, _, raw = other.request("/echo", "ws-session", **{"Herd-Forwarded": "2"})
        assert status == 502
        assert json.loads(raw)["error"] == "forward_loop"
    finally:
        fleet.close()
