"""herd.registry.RedisRegistry against a real redis-server: claims, leases, fencing.

Each test starts its own ``redis-server`` on a loopback port (tests/helpers/redis_server.py).
Two registries in one process stand for two nodes; the cluster tests
(tests/test_cluster.py) run whole ``herd serve`` processes.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import herd
from herd.cli import _with_session_tags, _without_session_ids
from herd.registry.redis import RedisRegistry
from tests.helpers import factory, wait_until
from tests.helpers.redis_server import Cluster, RedisServer, Sentinel


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
async def nodes(redis_server: RedisServer) -> AsyncIterator[list[RedisRegistry]]:
    made = [
        RedisRegistry(redis_server.url, node_id=name, address=f"http://127.0.0.1:{port}", lease=1)
        for name, port in (("a", 1001), ("b", 1002))
    ]
    try:
        yield made
    finally:
        for registry in made:
            try:
                await registry.close()
            except herd.RegistryUnavailableError:
                pass


async def test_two_nodes_racing_for_new_sessions_agree_on_one_owner(
    nodes: list[RedisRegistry],
) -> None:
    a, b = nodes
    ids = [f"s{i}" for i in range(30)]
    claims = await asyncio.gather(*(node.claim(sid) for sid in ids for node in (a, b)))
    for sid in ids:
        mine = [c for c in claims if c.session_id == sid and c.mine]
        other = [c for c in claims if c.session_id == sid and not c.mine]
        assert (len(mine), len(other)) == (1, 1), sid
        owner = mine[0].node
        assert other[0].node == owner
        assert other[0].epoch == mine[0].epoch
        assert (
            other[0].address == {"a": "http://127.0.0.1:1001", "b": "http://127.0.0.1:1002"}[owner]
        )
    # Asking again changes nothing, and epochs never repeat.
    again = await a.claim("s0")
    assert again.node == next(c.node for c in claims if c.session_id == "s0" and c.mine)
    assert len({c.epoch for c in claims if c.mine}) == len(ids)


async def test_a_lapsed_node_is_fenced_out(nodes: list[RedisRegistry]) -> None:
    """Node a stops renewing (a pause, a cut): after its lease, b takes its session
    over (with a fresh claim that says why), and a learns on its next renewal
    that the session is lost; a's old claim can neither bind nor release b's."""
    a, b = nodes
    old = await a.claim("s")
    assert old.mine
    assert old.restarted is None
    assert not (await b.claim("s")).mine
    await asyncio.sleep(a.lease + 0.2)  # a renews nothing: its lease lapses
    taken = await b.claim("s")
    assert taken.mine
    assert taken.epoch > old.epoch
    assert taken.restarted == "node a, which owned it, stopped"
    assert await a.renew() == ["s"]  # a joins again, without the session
    assert not await a.bind(old, "w1")
    await a.release(old)
    claim = await a.claim("s")
    assert not claim.mine
    assert claim.node == "b"


async def test_renewals_keep_a_node_the_owner(nodes: list[RedisRegistry]) -> None:
    a, b = nodes
    await a.claim("s")
    for _ in range(6):  # three leases, renewed every third of one
        await asyncio.sleep(a.renew_interval)
        assert await a.renew() == []
    assert (await b.claim("s")).node == "a"
    await b.renew()
    assert {(n.node, n.sessions, n.this) for n in b.fleet()} == {("a", 1, False), ("b", 0, True)}


async def test_released_and_closed_claims_are_free_at_once(nodes: list[RedisRegistry]) -> None:
    a, b = nodes
    first = await a.claim("s1")
    await a.claim("s2")
    await a.release(first)
    claim = await b.claim("s1")
    assert claim.mine
    assert claim.restarted is None
    await a.close()  # leaves the fleet: its sessions are free, no lease to wait out
    claim = await b.claim("s2")
    assert claim.mine
    assert claim.restarted is None


async def test_nothing_in_redis_shows_a_session_id(
    nodes: list[RedisRegistry], redis_server: RedisServer
) -> None:
    a, _ = nodes
    secret = "alice-4f1c2d8e9b"
    claim = await a.claim(secret)
    assert await a.bind(claim, "worker-7")
    await a.renew()
    stored = repr(redis_server.keys_and_values())
    assert "worker-7" in stored  # the claim is there...
    assert secret not in stored
    assert "alice" not in stored


async def test_redis_down_then_back(nodes: list[RedisRegistry], redis_server: RedisServer) -> None:
    """Down: a claim fails at once with the registry's address; back (empty, as a
    Redis without persistence restarts): the next renewal registers the node
    again and re-claims the sessions it holds, and new sessions wait a moment."""
    a, b = nodes
    await a.claim("kept")
    redis_server.stop()
    started = time.monotonic()
    with pytest.raises(herd.RegistryUnavailableError) as caught:
        await b.claim("new")
    assert time.monotonic() - started < 1.0
    assert f"127.0.0.1:{redis_server.port}" in str(caught.value)
    with pytest.raises(herd.RegistryUnavailableError):
        await a.renew()
    redis_server.start()
    assert await a.renew() == []  # back in, "kept" re-claimed
    claim = await b.claim("kept")
    assert not claim.mine
    assert claim.node == "a"
    # a found the counter gone back: new sessions wait until every live node has
    # renewed (and registered its sessions again), so none is claimed twice.
    with pytest.raises(herd.RegistryUnavailableError, match="lost its data"):
        await b.claim("new")
    await asyncio.sleep(a.grace)
    assert (await b.claim("new")).mine


async def test_a_password_is_used_and_never_shown() -> None:
    server = RedisServer(password="hunter2-secret").start()
    try:
        good = RedisRegistry(server.url, node_id="a")
        assert (await good.claim("s")).mine
        await good.close()
        wrong = RedisRegistry(f"redis://:wrong-pass@127.0.0.1:{server.port}/0", node_id="b")
        with pytest.raises(herd.RegistryUnavailableError) as caught:
            await wrong.claim("s")
        assert "wrong-pass" not in str(caught.value)
        assert "***" in str(caught.value)
        assert "wrong-pass" not in repr(wrong)
        await wrong.close()  # never joined: nothing to leave
    finally:
        server.close()


async def test_from_url_and_bad_options() -> None:
    assert isinstance(herd.registry.from_url("memory://"), herd.MemoryRegistry)
    with pytest.raises(ValueError, match="unknown registry"):
        herd.registry.from_url("mysql://x")
    with pytest.raises(ValueError, match="claim_ttl"):
        RedisRegistry("redis://127.0.0.1:1/0", lease=10, claim_ttl=5)
    with pytest.raises(ValueError, match="namespace"):
        RedisRegistry("redis://127.0.0.1:1/0", namespace="a}b")
    with pytest.raises(ValueError, match="Sentinel service"):
        RedisRegistry("redis+sentinel://127.0.0.1:26379")


# -- the pool on a shared registry ----------------------------------------------------


async def commands(server: RedisServer) -> int:
    """Commands Redis has run so far, the calls inside herd's scripts included."""
    return sum((await asyncio.to_thread(server.command_calls)).values())


async def test_a_pool_serves_what_it_owns_without_redis_and_points_elsewhere(
    redis_server: RedisServer,
) -> None:
    crashed: list[str] = []
    options: dict[str, Any] = {"min_workers": 0, "max_workers": 2, "health_interval": None}
    reg_a = RedisRegistry(redis_server.url, node_id="a", address="http://a.example:1", lease=30)
    reg_b = RedisRegistry(redis_server.url, node_id="b", address="http://b.example:2", lease=30)
    async with (
        herd.Pool(factory(), registry=reg_a, **options) as a,
        herd.Pool(factory(), registry=reg_b, on_crash=crashed.append, **options) as b,
    ):
        async with a.acquire("s") as session:
            worker = session.worker.id
        before = await commands(redis_server)
        for _ in range(200):
            async with a.acquire("s") as session:
                assert session.worker.id == worker
        assert await commands(redis_server) == before  # the fast path asks Redis nothing
        with pytest.raises(herd.SessionElsewhereError) as caught:
            await b.acquire("s")
        assert (caught.value.node, caught.value.address) == ("a", "http://a.example:1")
        owner = b.remote_owner("s")
        assert owner is not None
        assert owner.node == "a"
        assert b.stats().total_workers == 0  # no worker taken for a session owned elsewhere
        # herd serve's stats: the fleet, node addresses only for the admin token.
        await reg_b.renew()
        public = _without_session_ids(b.stats().as_dict())
        assert {(row["node"], row["address"]) for row in public["fleet"]} == {("a", ""), ("b", "")}
        admin = _with_session_tags(b.stats().as_dict())
        assert ("a", "http://a.example:1") in {(r["node"], r["address"]) for r in admin["fleet"]}
        await a.release("s")
        b.forget_remote_owner("s")
        async with b.acquire("s") as session:
            assert session.restarted is None
        assert crashed == []


ROOT = Path(__file__).resolve().parent.parent

NODE_A = """
import asyncio, herd
from herd.cli import _with_session_tags, _without_session_ids
from herd.registry.redis import RedisRegistry
from tests.helpers import factory

async def main():
    registry = RedisRegistry({url!r}, node_id="a", address="http://127.0.0.1:9", lease={lease})
    async with herd.Pool(factory(), min_workers=0, max_workers=1, registry=registry) as pool:
        await (await pool.acquire("s")).close()
        print("ready", flush=True)
        await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_a_dead_node_s_session_starts_over_on_the_node_that_notices(
    redis_server: RedisServer,
) -> None:
    """Node a (its own process) owns "s" and is SIGKILLed. Node b, asked for "s",
    names a until a's lease lapses, then takes the session over: a fresh worker,
    ``Session.restarted`` says why, and b's ``on_crash`` runs for it."""
    lease = 1.0
    code = NODE_A.format(url=redis_server.url, lease=lease)
    node_a = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=ROOT)
    try:
        assert node_a.stdout is not None
        assert await asyncio.to_thread(node_a.stdout.readline) == b"ready\n"
        crashed: list[str] = []
        registry = RedisRegistry(redis_server.url, node_id="b", lease=lease)
        async with herd.Pool(
            factory(), min_workers=0, max_workers=1, registry=registry, on_crash=crashed.append
        ) as b:
            with pytest.raises(herd.SessionElsewhereError, match="node a"):
                await b.acquire("s")
            node_a.kill()
            node_a.wait()
            killed = time.monotonic()
            while True:
                b.forget_remote_owner("s")  # as the proxy does when a's connection fails
                try:
                    session = await b.acquire("s")
                    break
                except herd.SessionElsewhereError:
                    assert time.monotonic() - killed < lease + 1, "a's lease did not lapse"
                    await asyncio.sleep(0.05)
            assert session.restarted == "node a, which owned it, stopped"
            await wait_until(lambda: crashed == ["s"], what="on_crash on the node that noticed")
            (crash,) = b.stats().recent_crashes
            assert crash.session_id == "s"
            await session.close()
            again = await b.acquire("s")
            assert again.restarted is None  # said once
            await again.close()
    finally:
        if node_a.poll() is None:
            node_a.kill()
            node_a.wait()
        if node_a.stdout is not None:
            node_a.stdout.close()


async def test_sentinel_finds_the_master(redis_server: RedisServer) -> None:
    sentinel = Sentinel(redis_server)
    try:
        url = f"redis+sentinel://127.0.0.1:{sentinel.port}/mymaster"
        a = RedisRegistry(url, node_id="a", address="http://127.0.0.1:1")
        b = RedisRegistry(redis_server.url, node_id="b")  # the master itself
        try:
            assert (await a.claim("s")).mine
            claim = await b.claim("s")
            assert not claim.mine
            assert claim.node == "a"
        finally:
            await a.close()
            await b.close()
    finally:
        sentinel.close()


async def test_tls_with_the_servers_certificate_and_not_without() -> None:
    server = RedisServer(tls=True).start()
    try:
        trusted = RedisRegistry(server.url, node_id="a")  # rediss://...?ssl_ca_certs=...
        assert (await trusted.claim("s")).mine
        await trusted.close()
        untrusted = RedisRegistry(f"rediss://127.0.0.1:{server.port}/0", node_id="b")
        with pytest.raises(herd.RegistryUnavailableError, match="CERTIFICATE_VERIFY_FAILED"):
            await untrusted.claim("s")
        await untrusted.close()
    finally:
        server.close()


async def test_a_redis_cluster_keeps_the_fleet_in_one_slot() -> None:
    """Every key shares one hash tag, so the scripts run on the one master that
    holds the slot, whichever master a node connects to first."""
    cluster = Cluster()
    try:
        a = RedisRegistry(cluster.url(0), node_id="a", address="http://127.0.0.1:1")
        b = RedisRegistry(cluster.url(1), node_id="b", address="http://127.0.0.1:2")
        try:
            claims = await asyncio.gather(*(n.claim(f"s{i}") for i in range(10) for n in (a, b)))
            assert sum(c.mine for c in claims) == 10
            assert await a.renew() == []
            assert {n.node for n in (await b.renew(), b.fleet())[1]} == {"a", "b"}
        finally:
            await a.close()
            await b.close()
    finally:
        cluster.close()


async def test_redis_down_stops_no_maintenance(redis_server: RedisServer) -> None:
    """With Redis gone, the pool still evicts idle sessions, replaces a dead worker
    and serves what it owns; the claims it could not release go once Redis is back."""
    registry = RedisRegistry(redis_server.url, node_id="a", lease=1)
    async with herd.Pool(
        factory(), min_workers=1, max_workers=3, ttl=0.5, registry=registry
    ) as pool:
        held = await pool.acquire("held")
        await (await pool.acquire("idle")).close()
        redis_server.stop()
        await wait_until(lambda: "idle" not in pool.sessions(), what="the TTL eviction")
        async with pool.acquire("held") as again:  # owned: served without Redis
            assert again.worker.id == held.worker.id
        with pytest.raises(herd.RegistryUnavailableError):
            await pool.acquire("new")
        await held.close()
        redis_server.start()
        await wait_until(lambda: not pool._unregistered, timeout=15, what="the released claims")
        await asyncio.sleep(registry.grace)  # (Redis came back empty: new sessions wait)
        assert (await pool.acquire("new")).worker is not None
