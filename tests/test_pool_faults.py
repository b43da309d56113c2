"""The pool's fault paths, over fake workers: what no other test reaches.

A registry that fails, a client that leaves at the moment a worker is handed
to it, a spawn that ends after the pool closed, spawns failing while the pool
refills, the three answers of :meth:`herd.Pool.check_worker`, and the smaller
branches around them (a factory or a worker that raises where it should not).

Only the public API is used: ``herd.Pool``, :mod:`herd.testing`'s fakes (and
subclasses of them defined here), ``stats()``, ``sessions()``, ``workers()``.
Each test says in its docstring what it proves. Fakes make it quick: no test
here starts a process, and none sleeps longer than a back-off it measures.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest

import herd
from herd.registry import MemoryRegistry
from herd.testing import FakeClock, FakeFactory, FakeWorker
from tests.helpers import wait_until

# The pool's clients are FakeWorker clients: plain dicts.
FakePool = herd.Pool[dict[str, Any]]


# -- helpers ------------------------------------------------------------------------------


async def acquire(
    pool: FakePool, session_id: str, timeout: float | None = None
) -> herd.Session[dict[str, Any]]:
    """A coroutine around ``pool.acquire``, to run it as a task."""
    return await pool.acquire(session_id, timeout=timeout)


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 2.0) -> None:
    """:func:`wait_until` for a condition that must be awaited (a registry read)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.002)


def assert_stats_add_up(pool: FakePool) -> herd.PoolStats:
    """Check that a quiescent pool's figures agree with each other; return them."""
    stats = pool.stats()
    rows = stats.workers
    states = Counter(row.state for row in rows)
    assert set(states) <= {"idle", "pinned", "ending"}, states
    assert stats.total_workers == len(rows) == len(pool.workers())
    assert stats.total_workers == states["idle"] + states["pinned"] + states["ending"]
    assert stats.available_workers == states["idle"] == pool.idle_count
    assert stats.active_sessions == states["pinned"] == len(pool.sessions())
    assert {r.session_id: r.id for r in rows if r.state == "pinned"} == pool.sessions()
    assert stats.total_workers + stats.starting_workers <= stats.max_workers
    return stats


async def assert_no_leak(pool: FakePool, factory: FakeFactory) -> None:
    """Every worker the factory made is either in the pool (and open) or closed
    (retired workers are closed in the background: a moment is allowed)."""

    def leaked() -> list[str]:
        live = {worker.id for worker in pool.workers()}
        return [w.id for w in factory.spawned if (w.id in live) == w.closed]

    await wait_until(lambda: not leaked(), timeout=2, what="no worker leaked")


class Registry(MemoryRegistry):
    """A MemoryRegistry whose writes fail while told to, as a registry that is down."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_claims = False
        self.fail_releases = False
        self.claims = 0
        self.released: list[str] = []

    async def claim(self, session_id: str) -> herd.Claim:
        self.claims += 1
        if self.fail_claims:
            raise ConnectionError("registry down: claim refused")
        return await super().claim(session_id)

    async def release(self, claim: herd.Claim) -> None:
        if self.fail_releases:
            raise ConnectionError("registry down: release refused")
        self.released.append(claim.session_id)
        await super().release(claim)


# -- 1. a registry whose claim fails ------------------------------------------------------


@pytest.mark.parametrize("reuse", [True, False], ids=["reuse", "no-reuse"])
async def test_a_failing_registry_claim_fails_the_acquire_and_takes_no_worker(
    reuse: bool,
) -> None:
    """A registry ``claim`` that raises fails the first acquire of a session with the
    registry's own error (every concurrent caller of that ID gets it, after one
    claim); no worker is taken for it, nothing stays pinned or registered; once
    claims work the same ID is pinned, and the maintenance loop still evicts by TTL."""
    registry = Registry()
    factory = FakeFactory()
    async with herd.Pool(
        factory,
        min_workers=1,
        max_workers=2,
        ttl=0.2,  # real seconds: the maintenance loop must evict by itself
        health_interval=None,
        worker_reuse=reuse,
        registry=registry,
        spawn_backoff=0.01,
    ) as pool:
        (taken,) = factory.spawned
        registry.fail_claims = True
        results = await asyncio.gather(
            acquire(pool, "s", 2), acquire(pool, "s", 2), return_exceptions=True
        )
        for result in results:
            # The registry's error is raised as it is, not wrapped in a HerdError.
            assert isinstance(result, ConnectionError), result
            assert "claim refused" in str(result)
        assert registry.claims == 1  # singleflight: one claim was tried, for both callers
        assert pool.sessions() == {}
        assert await registry.list() == {}
        assert [w.id for w in pool.workers()] == [taken.id]
        assert not taken.closed
        stats = assert_stats_add_up(pool)
        assert (stats.total_workers, stats.available_workers, stats.active_sessions) == (1, 1, 0)
        assert stats.recent_crashes == ()  # a registry failure is no worker crash
        await assert_no_leak(pool, factory)

        registry.fail_claims = False
        async with pool.acquire("s", timeout=2) as session:
            pinned = session.worker.id
        assert await registry.list() == {"s": pinned}
        await wait_until(lambda: "s" not in pool.sessions(), what="the TTL eviction")
        await wait_until(lambda: "s" in registry.released, what="the registry clean-up")
        assert await registry.list() == {}
        assert_stats_add_up(pool)
        await assert_no_leak(pool, factory)


async def test_a_failing_registry_release_is_retried_in_the_background() -> None:
    """``release`` with a registry whose ``release`` raises: the call raises that
    error, but the session is ended and its worker freed at once, and the
    maintenance loop releases the claim once the registry works again."""
    registry = Registry()
    factory = FakeFactory()
    async with herd.Pool(
        factory, min_workers=0, max_workers=1, ttl=None, health_interval=None, registry=registry
    ) as pool:
        async with pool.acquire("s") as session:
            worker_id = session.worker.id
        registry.fail_releases = True
        with pytest.raises(ConnectionError, match="release refused"):
            await pool.release("s")
        assert pool.sessions() == {}
        assert [w.id for w in pool.workers()] == [worker_id]
        assert assert_stats_add_up(pool).available_workers == 1
        assert await registry.list() == {"s": worker_id}  # stale until the retry
        registry.fail_releases = False
        await wait_until(lambda: "s" in registry.released, timeout=5, what="the retried release")
        assert await registry.list() == {}


# -- 2. a client that leaves as a worker is handed to it ----------------------------------


@pytest.mark.parametrize("reuse", [True, False], ids=["reuse", "no-reuse"])
@pytest.mark.parametrize("order", ["cancel-then-free", "free-then-cancel"])
async def test_a_waiter_cancelled_at_hand_over_passes_the_worker_to_the_next(
    order: str, reuse: bool
) -> None:
    """At ``max_workers`` two acquires wait; the first one's caller is cancelled
    in the same loop turn as the release that frees a worker for it (just
    before, or just after it). What was freed goes to the second waiter: the
    worker itself, or with ``worker_reuse=False`` the room to spawn one; nothing
    is pinned or registered for the cancelled session, every worker is in the
    pool or closed, and the stats add up."""
    factory = FakeFactory()
    async with herd.Pool(
        factory,
        min_workers=0,
        max_workers=1,
        acquire_timeout=None,
        ttl=None,
        health_interval=None,
        worker_reuse=reuse,
    ) as pool:
        holder = await pool.acquire("a")
        worker_id = holder.worker.id
        first = asyncio.ensure_future(acquire(pool, "b"))
        await wait_until(lambda: pool.stats().waiting_for_worker == 1, what="b to queue")
        second = asyncio.ensure_future(acquire(pool, "c"))
        await wait_until(lambda: pool.stats().waiting_for_worker == 2, what="c to queue")
        # No await between the two lines of each order: the waiter has not run.
        if order == "cancel-then-free":
            first.cancel()
            await holder.release()
        else:
            await holder.release()  # frees the worker for b's waiter (no I/O: no yield)
            first.cancel()
        c = await asyncio.wait_for(second, 2)
        with pytest.raises(asyncio.CancelledError):
            await first
        served_by = c.worker.id
        assert pool.sessions() == {"c": served_by}
        assert [w.id for w in pool.workers()] == [served_by]
        if reuse:
            assert served_by == worker_id
            assert len(factory.spawned) == 1
        else:
            # b's waiter was handed room to spawn; cancelled before it ran, it
            # passes the room on; cancelled after, it had spawned and pinned a
            # worker, which is retired at once.
            assert len(factory.spawned) == (2 if order == "cancel-then-free" else 3)
            assert served_by == factory.spawned[-1].id

        async def registered_c_only() -> bool:
            return await pool.registry.list() == {"c": served_by}

        await eventually(registered_c_only, "b's registry entry, if any, to go")
        stats = assert_stats_add_up(pool)
        assert (stats.total_workers, stats.active_sessions, stats.available_workers) == (1, 1, 0)
        assert (stats.waiting_for_worker, stats.inflight_acquires, stats.starting_workers) == (
            0,
            0,
            0,
        )
        await assert_no_leak(pool, factory)
        await c.release()
        stats = assert_stats_add_up(pool)
        assert stats.available_workers == (1 if reuse else 0)


# -- 3. a spawn that ends after the pool closed -------------------------------------------


class UnstoppableFactory(FakeFactory):
    """Spawns that, once begun, run to the end even when cancelled (a start that
    cannot be stopped half-way), and end when the test sets :attr:`go`."""

    def __init__(self) -> None:
        super().__init__()
        self.go = asyncio.Event()
        self.begun = 0
        self.cancels = 0  # cancellations received and outlived

    async def spawn(self) -> FakeWorker:
        self.begun += 1
        while not self.go.is_set():
            try:
                await self.go.wait()
            except asyncio.CancelledError:
                self.cancels += 1  # finish the start regardless
        return await super().spawn()


@pytest.mark.parametrize("spawned_by", ["acquire", "refill"])
async def test_a_spawn_that_ends_after_shutdown_began_is_closed(spawned_by: str) -> None:
    """A spawn in flight when ``shutdown()`` starts, which ignores the cancellation
    and returns a worker anyway: shutdown waits for it, the late worker is closed
    (never added to the pool), and the acquire that wanted it gets
    :class:`herd.PoolClosedError`."""
    factory = UnstoppableFactory()
    min_workers = 1 if spawned_by == "refill" else 0
    pool = herd.Pool(factory, min_workers=min_workers, max_workers=2, health_interval=None)
    factory.go.set()
    await pool.start()
    factory.go.clear()
    waiting: asyncio.Future[herd.Session[dict[str, Any]]] | None = None
    if spawned_by == "refill":
        factory.spawned[0].crash()  # the pool refills to min_workers
    else:
        waiting = asyncio.ensure_future(acquire(pool, "s", 5))
    await wait_until(lambda: pool.stats().starting_workers == 1, what="the spawn to begin")
    closing = asyncio.ensure_future(pool.shutdown())
    await wait_until(lambda: factory.cancels == 1, what="the spawn to be cancelled")
    assert pool.stats().state == "closing"
    assert not closing.done()  # it waits for the spawn
    factory.go.set()
    await asyncio.wait_for(closing, 2)
    assert pool.state is herd.PoolState.CLOSED
    late = factory.spawned[-1]
    assert factory.begun == len(factory.spawned) == (2 if spawned_by == "refill" else 1)
    assert late.closed
    assert all(worker.closed for worker in factory.spawned)
    assert pool.workers() == []
    stats = pool.stats()
    assert (stats.total_workers, stats.starting_workers) == (0, 0)
    if waiting is not None:
        with pytest.raises(herd.PoolClosedError):
            await waiting


async def test_a_spawn_of_start_that_ends_after_shutdown_is_closed() -> None:
    """``shutdown()`` while ``start()`` spawns ``min_workers``: the worker that
    arrives afterwards is closed and ``start()`` raises
    :class:`herd.PoolClosedError`; nothing is left running."""
    factory = UnstoppableFactory()
    pool = herd.Pool(factory, min_workers=1, max_workers=1, health_interval=None)
    starting = asyncio.ensure_future(pool.start())
    await wait_until(lambda: factory.begun == 1, what="start to spawn")
    closing = asyncio.ensure_future(pool.shutdown())
    await asyncio.sleep(0.05)
    assert not closing.done()  # it waits for the spawn
    factory.go.set()
    await asyncio.wait_for(closing, 2)
    with pytest.raises(herd.PoolClosedError):
        await asyncio.wait_for(starting, 2)
    assert pool.state is herd.PoolState.CLOSED
    assert [w.closed for w in factory.spawned] == [True]
    assert pool.workers() == []


async def test_shutdown_during_start_returns_only_once_its_spawns_are_over() -> None:
    """``shutdown()`` says it stops every worker; called while ``start()`` spawns,
    it waits for that spawn (it returned at once, state ``closed``, while
    ``stats()`` still showed ``starting_workers == 1``)."""
    factory = UnstoppableFactory()
    pool = herd.Pool(factory, min_workers=1, max_workers=1, health_interval=None)
    starting = asyncio.ensure_future(pool.start())
    await wait_until(lambda: factory.begun == 1, what="start to spawn")
    closing = asyncio.ensure_future(pool.shutdown())
    try:
        await asyncio.wait([closing], timeout=0.2)
        still_starting = pool.stats().starting_workers
        returned = closing.done()
    finally:
        factory.go.set()
        await asyncio.wait_for(closing, 2)
        with pytest.raises(herd.PoolClosedError):
            await asyncio.wait_for(starting, 2)
    assert not (returned and still_starting), "shutdown() returned with a spawn in flight"


async def test_a_cancelled_start_closes_the_pool() -> None:
    """Cancelling ``start()`` while it spawns ``min_workers`` leaves the pool
    closed, refusing work, with no worker made."""
    factory = FakeFactory(spawn_delay=5)
    pool = herd.Pool(factory, min_workers=2, max_workers=2, health_interval=None)
    starting = asyncio.ensure_future(pool.start())
    await wait_until(lambda: pool.stats().starting_workers == 2, what="both spawns")
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting
    assert pool.state is herd.PoolState.CLOSED
    assert factory.spawned == []
    with pytest.raises(herd.PoolClosedError):
        await pool.acquire("s")


async def test_concurrent_shutdowns_both_wait_for_the_end() -> None:
    """A second ``shutdown()`` while the first runs returns only once the pool is
    closed, with its workers closed."""
    factory = UnstoppableFactory()
    factory.go.set()
    pool = herd.Pool(factory, min_workers=0, max_workers=1, health_interval=None)
    await pool.start()
    factory.go.clear()
    waiting = asyncio.ensure_future(acquire(pool, "s", 5))
    await wait_until(lambda: pool.stats().starting_workers == 1, what="a spawn")
    first = asyncio.ensure_future(pool.shutdown())
    second = asyncio.ensure_future(pool.shutdown())
    await wait_until(lambda: factory.cancels == 1, what="the spawn to be cancelled")
    assert not first.done()
    assert not second.done()  # waits for the first, not returning early
    factory.go.set()
    await asyncio.wait_for(asyncio.gather(first, second), 2)
    assert pool.state is herd.PoolState.CLOSED
    assert all(w.closed for w in factory.spawned)
    with pytest.raises(herd.PoolClosedError):
        await waiting


# -- 4. refill while spawns fail -----------------------------------------------------------


class TimedFactory(FakeFactory):
    """Records the loop time of every spawn attempt, failed or not."""

    def __init__(self) -> None:
        super().__init__()
        self.attempts: list[float] = []

    async def spawn(self) -> FakeWorker:
        self.attempts.append(asyncio.get_running_loop().time())
        return await super().spawn()


async def test_refill_backs_off_while_spawns_fail_then_reaches_min_workers() -> None:
    """Both workers of a ``min_workers=2`` pool die and the next 4 spawns fail: the
    refill tries exactly 4 + 2 times, waiting at least the doubling back-off after
    each failure (no busy loop), ``stats()`` shows the failures meanwhile, and the
    pool is back at ``min_workers`` with the error cleared once spawns work."""
    backoff, most, failing = 0.01, 0.04, 4
    factory = TimedFactory()
    async with herd.Pool(
        factory,
        min_workers=2,
        max_workers=3,
        ttl=None,
        health_interval=None,
        spawn_backoff=backoff,
        spawn_backoff_max=most,
    ) as pool:
        factory.attempts.clear()
        factory.fail_next = failing
        for worker in list(factory.spawned):
            worker.crash()
        await wait_until(lambda: pool.stats().spawn_failures >= 2, what="failed refills")
        troubled = pool.stats()
        assert troubled.total_workers < 2
        assert troubled.last_spawn_error is not None
        assert "fake spawn failure" in troubled.last_spawn_error
        await wait_until(
            lambda: pool.stats().available_workers == 2, timeout=5, what="min_workers again"
        )
        assert len(factory.attempts) == failing + 2
        gaps = [b - a for a, b in zip(factory.attempts, factory.attempts[1:], strict=False)]
        for n, gap in enumerate(gaps[:failing], start=1):  # the gap after failure n
            assert gap >= min(backoff * 2 ** (n - 1), most), (n, gaps)
        stats = assert_stats_add_up(pool)
        assert (stats.spawn_failures, stats.last_spawn_error) == (0, None)
        assert len(stats.recent_crashes) == 2
        await assert_no_leak(pool, factory)


async def test_spawns_failing_for_good_are_tried_at_a_bounded_rate() -> None:
    """With every spawn failing, a pool below ``min_workers`` tries at most once
    per back-off (capped at ``spawn_backoff_max``), an acquire that needs a spawn
    is refused at once with the last error, and a session already pinned is
    still served."""
    factory = TimedFactory()
    async with herd.Pool(
        factory,
        min_workers=2,
        max_workers=3,
        ttl=None,
        health_interval=None,
        spawn_backoff=0.02,
        spawn_backoff_max=0.02,
    ) as pool:
        kept = await pool.acquire("kept")
        factory.fail_next = 10**9
        factory.attempts.clear()
        victim = next(w for w in factory.spawned if w.id != kept.worker.id)
        victim.crash()
        await wait_until(lambda: factory.attempts, what="the first refill attempt")
        await asyncio.sleep(0.2)  # the window over which the attempts are counted
        assert 2 <= len(factory.attempts) <= 0.2 / 0.02 + 2, factory.attempts
        with pytest.raises(herd.SpawnError, match="fake spawn failure"):
            await pool.acquire("new", timeout=1)
        async with pool.acquire("kept") as again:
            assert again.worker.id == kept.worker.id
        await kept.close()
        assert pool.stats().spawn_failures >= 2
        factory.fail_next = 0
        await wait_until(lambda: pool.stats().total_workers == 2, what="the refill")


async def test_a_factory_raising_any_error_is_a_spawn_error() -> None:
    """A factory that raises something else than :class:`herd.SpawnError` fails
    the acquire with a ``SpawnError`` that names it (and chains it), counted in
    ``stats()`` like any failed spawn."""

    class BrokenFactory(FakeFactory):
        async def spawn(self) -> FakeWorker:
            raise RuntimeError("no more fakes")

    async with herd.Pool(BrokenFactory(), min_workers=0, max_workers=1) as pool:
        with pytest.raises(herd.SpawnError, match="worker factory raised") as caught:
            await pool.acquire("s")
        assert isinstance(caught.value.__cause__, RuntimeError)
        stats = pool.stats()
        assert stats.spawn_failures == 1
        assert stats.last_spawn_error is not None
        assert "no more fakes" in stats.last_spawn_error


# -- 5. check_worker ----------------------------------------------------------------------


class Crashes:
    """Records the session IDs ``on_crash`` (:meth:`record`) was called with."""

    def __init__(self) -> None:
        self.sessions: list[str] = []

    async def record(self, session_id: str) -> None:
        self.sessions.append(session_id)


async def pinned_pool(
    factory: FakeFactory, crashes: Crashes, health_failures: int = 2
) -> tuple[FakePool, FakeWorker]:
    """A started pool (``min_workers=1``) with session "s" pinned; and its worker."""
    pool: FakePool = herd.Pool(
        factory,
        min_workers=1,
        max_workers=2,
        ttl=None,
        health_interval=None,  # probes only when the test asks
        health_failures=health_failures,
        on_crash=crashes.record,
    )
    await pool.start()
    async with pool.acquire("s") as session:
        worker_id = session.worker.id
    worker = next(w for w in factory.spawned if w.id == worker_id)
    return pool, worker


async def test_check_worker_of_a_healthy_worker_keeps_it() -> None:
    """A healthy worker: ``True``, the session stays pinned, nothing closed; the
    good answer also resets an earlier failed probe's count."""
    factory, crashes = FakeFactory(), Crashes()
    pool, worker = await pinned_pool(factory, crashes, health_failures=2)
    try:
        assert await pool.check_worker(worker.id) is True
        worker.healthy_answer = False
        assert await pool.check_worker(worker.id) is True  # 1 of 2
        worker.healthy_answer = True
        assert await pool.check_worker(worker.id) is True  # the count starts over
        worker.healthy_answer = False
        assert await pool.check_worker(worker.id) is True  # 1 of 2 again, not 2
        assert pool.sessions() == {"s": worker.id}
        assert not worker.closed
        assert crashes.sessions == []
        assert_stats_add_up(pool)
    finally:
        await pool.shutdown()


async def test_check_worker_of_an_unhealthy_live_worker_waits_for_health_failures() -> None:
    """A worker that is alive but answers its probe badly is still in the pool
    (``True``) until ``health_failures`` probes in a row failed; then ``False``:
    it is closed, its session unpinned, ``on_crash`` told, the crash recorded,
    and a replacement spawned to keep ``min_workers``."""
    factory, crashes = FakeFactory(), Crashes()
    pool, worker = await pinned_pool(factory, crashes, health_failures=2)
    try:
        worker.healthy_answer = False
        assert await pool.check_worker(worker.id) is True
        assert pool.sessions() == {"s": worker.id}
        assert not worker.closed
        assert await pool.check_worker(worker.id) is False
        assert pool.sessions() == {}
        await wait_until(lambda: worker.closed, what="the dead worker closed")
        await wait_until(lambda: crashes.sessions == ["s"], what="on_crash")
        crash = pool.stats().recent_crashes[-1]
        assert (crash.worker_id, crash.session_id) == (worker.id, "s")
        assert "2 in a row" in crash.reason
        await wait_until(lambda: pool.stats().available_workers == 1, what="a replacement")
        assert worker.id not in {w.id for w in pool.workers()}
        assert await pool.check_worker(worker.id) is False  # gone: no longer in the pool
        assert_stats_add_up(pool)
        await assert_no_leak(pool, factory)
    finally:
        await pool.shutdown()


async def test_check_worker_of_a_dead_worker_runs_the_crash_path_once() -> None:
    """A worker whose process died (before the pool noticed): ``False`` at the
    first probe, the session unpinned, ``on_crash`` called once, a replacement."""
    factory, crashes = FakeFactory(), Crashes()
    pool, worker = await pinned_pool(factory, crashes)
    try:
        worker.crash("exited with code 3")
        assert await pool.check_worker(worker.id) is False  # no await in between
        assert pool.sessions() == {}
        await wait_until(lambda: pool.stats().available_workers == 1, what="a replacement")
        await asyncio.sleep(0.01)  # room for a second on_crash, if there were one
        assert crashes.sessions == ["s"]
        assert [c.reason for c in pool.stats().recent_crashes] == ["exited with code 3"]
        assert_stats_add_up(pool)
        await assert_no_leak(pool, factory)
    finally:
        await pool.shutdown()


async def test_check_worker_of_an_unknown_worker_is_false() -> None:
    """An ID the pool never had, or whose worker it retired: ``False``, no effect."""
    factory, crashes = FakeFactory(), Crashes()
    pool, worker = await pinned_pool(factory, crashes)
    try:
        assert await pool.check_worker("no-such-worker") is False
        assert pool.sessions() == {"s": worker.id}
        assert crashes.sessions == []
    finally:
        await pool.shutdown()


async def test_check_worker_counts_an_exception_from_the_probe_as_a_failure() -> None:
    """A probe that raises (not an ``OSError`` of the pool's side) is a failed
    probe; at ``health_failures=1`` the worker is dead, the error in the reason."""

    class RaisingWorker(FakeWorker):
        async def healthy(self) -> bool:
            raise RuntimeError("protocol garbage")

    factory, crashes = FakeFactory(worker_class=RaisingWorker), Crashes()
    pool, worker = await pinned_pool(factory, crashes, health_failures=1)
    try:
        assert await pool.check_worker(worker.id) is False
        await wait_until(lambda: crashes.sessions == ["s"], what="on_crash")
        assert "raised RuntimeError('protocol garbage')" in pool.stats().recent_crashes[-1].reason
    finally:
        await pool.shutdown()


async def test_a_worker_killed_at_its_limit_dies_for_that_reason() -> None:
    """A :class:`herd.LimitAware` worker whose breach starts with ``killed:`` is
    dead at its first failed probe, and that breach is the whole reason."""

    class KilledWorker(FakeWorker):
        def limit_breach(self) -> str | None:
            return "killed: memory limit 256 MiB"

    factory, crashes = FakeFactory(worker_class=KilledWorker), Crashes()
    pool, worker = await pinned_pool(factory, crashes, health_failures=3)
    try:
        worker.healthy_answer = False
        assert await pool.check_worker(worker.id) is False
        reason = pool.stats().recent_crashes[-1].reason
        assert reason == "killed: memory limit 256 MiB"
    finally:
        await pool.shutdown()


async def test_a_probe_answering_after_its_worker_died_says_it_is_gone() -> None:
    """``check_worker`` whose probe is still running when the worker dies: the late
    ``True`` does not bring it back; the answer is ``False``."""

    class SlowWorker(FakeWorker):
        def __init__(self) -> None:
            super().__init__()
            self.answer = asyncio.Event()
            self.probing = False

        async def healthy(self) -> bool:
            self.probing = True
            await self.answer.wait()
            return True

    factory, crashes = FakeFactory(worker_class=SlowWorker), Crashes()
    pool, worker = await pinned_pool(factory, crashes)
    assert isinstance(worker, SlowWorker)
    try:
        checking = asyncio.ensure_future(pool.check_worker(worker.id))
        await wait_until(lambda: worker.probing, what="the probe")
        worker.crash()
        await wait_until(lambda: "s" not in pool.sessions(), what="the exit to be noticed")
        worker.answer.set()
        assert await asyncio.wait_for(checking, 2) is False
    finally:
        await pool.shutdown()


async def test_a_probe_cancelled_on_its_own_counts_for_nothing() -> None:
    """A health probe that ends in :class:`asyncio.CancelledError` of its own
    (say its client's request task was cancelled) says nothing of the worker:
    even at ``health_failures=1`` the worker keeps its session."""

    class CancelledProbe(FakeWorker):
        async def healthy(self) -> bool:
            raise asyncio.CancelledError

    factory, crashes = FakeFactory(worker_class=CancelledProbe), Crashes()
    pool, worker = await pinned_pool(factory, crashes, health_failures=1)
    try:
        for _ in range(3):
            await pool.check_health()
        assert pool.sessions() == {"s": worker.id}
        assert not worker.closed
        assert crashes.sessions == []
    finally:
        await pool.shutdown()


# -- smaller branches ----------------------------------------------------------------------


async def test_a_worker_whose_close_raises_is_dropped_all_the_same(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A worker whose ``close()`` raises when retired: the error is logged, the
    worker is out of the pool and its place is free for a new one."""

    class StickyWorker(FakeWorker):
        async def close(self) -> None:
            await super().close()
            raise OSError("cannot close")

    factory = FakeFactory(worker_class=StickyWorker)
    async with herd.Pool(
        factory, min_workers=0, max_workers=1, worker_reuse=False, health_interval=None
    ) as pool:
        with caplog.at_level(logging.ERROR, logger="herd.pool"):
            async with pool.acquire("a") as a:
                first = a.worker.id
            await pool.release("a")  # retired: closed in the background
            await wait_until(lambda: "closing worker" in caplog.text, what="the logged error")
        assert pool.workers() == []
        async with pool.acquire("b", timeout=2) as b:
            assert b.worker.id != first


async def test_a_worker_whose_wait_raises_is_left_to_the_health_checks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A worker whose ``wait()`` raises cannot be watched: the pool logs it once
    and keeps the worker; a failed probe later finds it dead."""

    class Unwatchable(FakeWorker):
        async def wait(self) -> str:
            raise RuntimeError("no exit watch here")

    factory, crashes = FakeFactory(worker_class=Unwatchable), Crashes()
    with caplog.at_level(logging.ERROR, logger="herd.pool"):
        pool, worker = await pinned_pool(factory, crashes, health_failures=1)
        try:
            await wait_until(lambda: "watching worker" in caplog.text, what="the logged error")
            worker.crash()  # noticed by nobody...
            await asyncio.sleep(0.01)
            assert pool.sessions() == {"s": worker.id}
            await pool.check_health()  # ...until a probe fails
            assert pool.sessions() == {}
            await wait_until(lambda: crashes.sessions == ["s"], what="on_crash")
        finally:
            await pool.shutdown()


async def test_a_plain_on_crash_returning_an_awaitable_is_awaited() -> None:
    """A plain function as ``on_crash`` runs in a thread; if it returns an
    awaitable (a coroutine it made), the pool awaits it."""
    reported: list[str] = []

    async def report(session_id: str) -> None:
        reported.append(session_id)

    def on_crash(session_id: str) -> Coroutine[Any, Any, None]:
        return report(session_id)

    factory = FakeFactory()
    async with herd.Pool(
        factory, min_workers=0, max_workers=1, health_interval=None, on_crash=on_crash
    ) as pool:
        async with pool.acquire("s") as session:
            worker_id = session.worker.id
        next(w for w in factory.spawned if w.id == worker_id).crash()
        await wait_until(lambda: reported == ["s"], what="the awaited coroutine")


async def test_acquire_with_spawn_at_the_cap_waits_for_a_freed_worker_and_retires_it() -> None:
    """At ``max_workers`` with no idle spare, ``acquire(sid, spawn=f)`` waits in
    line; the worker freed for it is retired to make room, and ``f``'s worker
    serves the session."""
    factory = FakeFactory()
    own = FakeFactory()
    async with herd.Pool(
        factory, min_workers=0, max_workers=1, acquire_timeout=None, health_interval=None
    ) as pool:
        holder = await pool.acquire("a")
        freed = next(w for w in factory.spawned if w.id == holder.worker.id)
        waiting = asyncio.ensure_future(pool.acquire("b", spawn=own.spawn))
        await wait_until(lambda: pool.stats().waiting_for_worker == 1, what="b to queue")
        await holder.release()
        b = await asyncio.wait_for(waiting, 2)
        assert [b.worker.id] == [w.id for w in own.spawned]
        assert freed.closed
        assert [w.id for w in pool.workers()] == [b.worker.id]
        stats = assert_stats_add_up(pool)
        assert (stats.total_workers, stats.active_sessions) == (1, 1)
        await b.close()


async def test_a_session_handle_is_its_own_context_manager() -> None:
    """An awaited ``Session`` works with ``async with`` too (closing the use, not
    the session), and its repr says whether the use is open."""
    clock = FakeClock()
    async with herd.Pool(FakeFactory(), min_workers=0, max_workers=1, clock=clock) as pool:
        session = await pool.acquire("s")
        assert "(open)" in repr(session)
        async with session as same:
            assert same is session
        assert session.closed
        assert "(closed)" in repr(session)
        assert pool.sessions() == {"s": session.worker.id}
    with pytest.raises(herd.InvalidSessionIdError, match="relative path segment"):
        herd.validate_session_id("..")


async def test_the_maintenance_loop_outlives_a_pass_that_raises(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A maintenance pass that raises (here the injected clock) is logged once and
    backed off from; the loop goes on, and evicts by TTL once the pass works."""
    broken = False
    raised = 0

    def clock() -> float:
        nonlocal raised
        if broken:
            raised += 1
            raise RuntimeError("clock unavailable")
        return time.monotonic()

    caplog.set_level(logging.ERROR, logger="herd.pool")
    async with herd.Pool(
        FakeFactory(), min_workers=0, max_workers=1, ttl=0.2, health_interval=None, clock=clock
    ) as pool:
        async with pool.acquire("s"):
            pass
        broken = True
        await wait_until(lambda: raised >= 2, what="failed maintenance passes")
        assert "s" in pool.sessions()
        broken = False
        await wait_until(lambda: "s" not in pool.sessions(), what="the TTL eviction")
    failed = [r for r in caplog.records if "clock unavailable" in r.getMessage()]
    assert len(failed) == 1  # once, not once per pass
    assert "pool maintenance failed" in failed[0].getMessage()


async def test_the_health_loop_outlives_a_check_that_raises(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A health pass that raises (here the injected clock, read when a probe
    fails) is logged and backed off from; the loop goes on, and declares the
    worker dead once the pass works."""
    broken = False

    def clock() -> float:
        if broken:
            raise RuntimeError("clock unavailable")
        return time.monotonic()

    factory, crashes = FakeFactory(), Crashes()
    caplog.set_level(logging.ERROR, logger="herd.pool")
    async with herd.Pool(
        factory,
        min_workers=0,
        max_workers=1,
        ttl=None,
        health_interval=0.02,
        health_failures=1,
        on_crash=crashes.record,
        clock=clock,
    ) as pool:
        async with pool.acquire("s") as session:
            worker = next(w for w in factory.spawned if w.id == session.worker.id)
        broken = True
        worker.healthy_answer = False
        await wait_until(lambda: "health checks failed" in caplog.text, what="a failed pass")
        assert pool.sessions() == {"s": worker.id}
        broken = False
        await wait_until(lambda: crashes.sessions == ["s"], what="the crash path")


async def test_a_limit_breach_that_raises_ends_no_health_pass(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A worker whose ``limit_breach()`` raises while its probe fails is judged as
    one that cannot tell, and the pass goes on to the next worker (the error
    ended the whole pass, so no worker after it was counted)."""

    class BrokenLimits(FakeWorker):
        def limit_breach(self) -> str | None:
            raise RuntimeError("cgroup unreadable")

    factory, crashes = FakeFactory(worker_class=BrokenLimits), Crashes()
    caplog.set_level(logging.ERROR, logger="herd.pool")
    async with herd.Pool(
        factory,
        min_workers=0,
        max_workers=2,
        ttl=None,
        health_interval=None,
        health_failures=1,
        on_crash=crashes.record,
    ) as pool:
        for sid in ("a", "b"):
            async with pool.acquire(sid):
                pass
        for worker in factory.spawned:
            worker.healthy_answer = False
        await pool.check_health()
        await wait_until(lambda: sorted(crashes.sessions) == ["a", "b"], what="both deaths")
    assert "limit_breach() raised" in caplog.text


async def test_an_object_with_an_async_call_is_awaited_as_on_crash() -> None:
    """``on_crash`` may be an object whose ``__call__`` is a coroutine function: it
    is awaited on the loop, never sent to a thread (it was: the thread made the
    coroutine, awaited only after, and at shutdown never, with a "never
    awaited" warning)."""

    class Notifier:
        def __init__(self) -> None:
            self.sessions: list[str] = []

        async def __call__(self, session_id: str) -> None:
            self.sessions.append(session_id)

    class CountingExecutor(concurrent.futures.ThreadPoolExecutor):
        submitted = 0

        def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
            self.submitted += 1
            return super().submit(fn, *args, **kwargs)

    executor = CountingExecutor(max_workers=1)
    asyncio.get_running_loop().set_default_executor(executor)
    notifier = Notifier()
    async with herd.Pool(
        FakeFactory(), min_workers=0, max_workers=1, health_interval=None, on_crash=notifier
    ) as pool:
        async with pool.acquire("s") as session:
            worker = session.worker
        assert isinstance(worker, FakeWorker)
        before = executor.submitted
        worker.crash()
        await wait_until(lambda: notifier.sessions == ["s"], what="on_crash")
        assert executor.submitted == before


async def test_a_sessions_repr_shows_its_tag_not_its_id() -> None:
    """A session ID is a bearer credential, and a repr ends up in logs and
    tracebacks."""
    async with herd.Pool(FakeFactory(), min_workers=0, max_workers=1) as pool:
        async with pool.acquire("secret-id-42") as session:
            text = repr(session)
    assert "secret-id-42" not in text
    assert herd.session_tag("secret-id-42") in text


class SlowReleases(MemoryRegistry):
    """A MemoryRegistry whose releases take a while, as over a network."""

    async def release(self, claim: herd.Claim) -> None:
        await asyncio.sleep(0.05)
        await super().release(claim)


async def test_a_session_acquired_again_while_its_claim_is_released_keeps_a_claim() -> None:
    """A registry hands the claim it holds back to its node: a new acquire of a
    session whose release is on its way must not pin the session on that claim
    and then see it released under it (on a shared registry, another node could
    then take the session too)."""
    registry = SlowReleases()
    async with herd.Pool(
        FakeFactory(),
        min_workers=0,
        max_workers=2,
        ttl=None,
        health_interval=None,
        registry=registry,
    ) as pool:
        await (await pool.acquire("s")).close()
        releasing = asyncio.ensure_future(pool.release("s"))
        await asyncio.sleep(0)  # the release is under way
        session = await pool.acquire("s")
        await releasing
        await pool.sweep()
        assert await registry.list() == {"s": session.worker.id}
        await session.release()
        assert await registry.list() == {}
