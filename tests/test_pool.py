"""Pool behaviour over real subprocess workers."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import resource
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import herd
from herd.registry.memory import MemoryRegistry
from herd.testing import FakeClock, FakeFactory
from tests.helpers import factory, pid_alive, wait_until


class CountingFactory:
    """Wraps a factory and counts spawns (ours, not a mock: it delegates)."""

    def __init__(self, inner: herd.ProcessFactory) -> None:
        self.inner = inner
        self.spawns = 0

    async def spawn(self) -> herd.ProcessWorker:
        self.spawns += 1
        return await self.inner.spawn()


async def acquire(
    pool: herd.Pool[Any], session_id: str, timeout: float | None = None
) -> herd.Session[Any]:
    """A coroutine around pool.acquire, to run it as a task."""
    return await pool.acquire(session_id, timeout=timeout)


def kill_worker(worker: herd.Worker[Any]) -> None:
    """SIGKILL the worker's process group (launcher and program)."""
    assert worker.pid is not None
    os.killpg(worker.pid, signal.SIGKILL)


async def count(session: herd.Session[Any]) -> int:
    """Bump and read the worker's per-process counter."""
    return int(json.loads((await session.worker.client.get("/state")).body)["count"])


@pytest.fixture
async def pool() -> AsyncIterator[herd.Pool[Any]]:
    async with herd.Pool(factory(), min_workers=1, max_workers=3, health_interval=None) as p:
        yield p


# -- affinity ---------------------------------------------------------------------------


async def test_a_session_always_reaches_the_same_worker(pool: herd.Pool[Any]) -> None:
    seen = []
    for expected in (1, 2, 3):
        async with pool.acquire("alice") as session:
            seen.append(session.worker.id)
            assert await count(session) == expected  # state kept in the worker process
    assert len(set(seen)) == 1
    session = await pool.acquire("alice")  # the awaitable form
    assert session.worker.id == seen[0]
    await session.close()


async def test_different_sessions_never_share_a_worker(pool: herd.Pool[Any]) -> None:
    sessions = [await pool.acquire(sid) for sid in ("a", "b", "c")]
    assert len({s.worker.id for s in sessions}) == 3
    assert pool.sessions() == {s.session_id: s.worker.id for s in sessions}
    for session in sessions:
        await session.close()


async def test_concurrent_first_acquires_pin_exactly_one_worker() -> None:
    counting = CountingFactory(factory())
    async with herd.Pool(counting, min_workers=0, max_workers=3) as pool:
        sessions = await asyncio.gather(*(pool.acquire("new") for _ in range(50)))
        assert {s.worker.id for s in sessions} == {sessions[0].worker.id}
        assert counting.spawns == 1
        assert pool.stats().active_sessions == 1
        for session in sessions:
            await session.close()


async def test_try_acquire_takes_only_a_pinned_session_of_a_serving_pool() -> None:
    async with herd.Pool(FakeFactory(), min_workers=0, max_workers=2) as pool:
        assert pool.try_acquire("new") is None  # a new session: acquire's job
        assert not pool.sessions()  # nothing spawned, nothing pinned
        first = await pool.acquire("s")
        second = pool.try_acquire("s")
        assert second is not None
        assert second.worker.id == first.worker.id
        assert pool.stats().workers[0].open_uses == 2
        await first.close()
        await second.close()
        assert pool.stats().workers[0].open_uses == 0
    assert pool.try_acquire("s") is None  # shut down: never a use of a closed pool


async def test_singleflight_survives_the_first_caller_giving_up() -> None:
    async with herd.Pool(factory(), min_workers=0, max_workers=2) as pool:
        first = asyncio.ensure_future(acquire(pool, "s"))
        second = asyncio.ensure_future(acquire(pool, "s"))
        await wait_until(lambda: pool.stats().inflight_acquires == 2, what="both to join")
        first.cancel()
        session = await second
        assert pool.sessions() == {"s": session.worker.id}
        await session.close()
        with pytest.raises(asyncio.CancelledError):
            await first


# -- scaling --------------------------------------------------------------------------


async def test_min_workers_run_with_no_session() -> None:
    async with herd.Pool(factory(), min_workers=2, max_workers=4) as pool:
        stats = pool.stats()
        assert stats.total_workers == 2
        assert stats.available_workers == 2
        assert stats.active_sessions == 0
        assert all(await asyncio.gather(*(w.healthy() for w in pool.workers())))


async def test_min_idle_keeps_started_spares_ready_for_new_sessions() -> None:
    counting = CountingFactory(factory())
    async with herd.Pool(counting, min_workers=0, min_idle=2, max_workers=4) as pool:
        assert pool.stats().available_workers == 2  # started with the pool
        spares = {w.id for w in pool.workers()}
        a = await pool.acquire("a")
        assert a.worker.id in spares  # taken, not spawned for the session
        await wait_until(lambda: pool.stats().available_workers == 2, what="a spare refill")
        b = await pool.acquire("b")
        c = await pool.acquire("c")
        assert {b.worker.id, c.worker.id} <= {w.id for w in pool.workers()}
        # Three pinned + one spare = max_workers: the pool never spawns past it.
        await wait_until(lambda: pool.stats().total_workers == 4, what="the last spare")
        assert counting.spawns == 4
        for session in (a, b, c):
            await session.release()


async def test_refill_waits_for_refill_delay_after_the_last_take() -> None:
    counting = CountingFactory(factory())
    async with herd.Pool(
        counting, min_workers=0, min_idle=1, max_workers=3, refill_delay=0.4
    ) as pool:
        a = await pool.acquire("a")
        taken = time.monotonic()
        await wait_until(lambda: counting.spawns == 2, what="the refill spawn")
        assert time.monotonic() - taken >= 0.4  # not before the sessions had their turn
        await wait_until(lambda: pool.stats().available_workers == 1, what="the spare")
        await a.release()


async def test_acquire_with_spawn_pins_a_worker_made_for_the_session() -> None:
    special = factory(env={"MADE_FOR": "its session"})
    made: list[str] = []

    async def start() -> herd.ProcessWorker:
        worker = await special.spawn()
        made.append(worker.id)
        return worker

    async with herd.Pool(factory(), min_workers=0, min_idle=1, max_workers=2) as pool:
        (spare,) = (w.id for w in pool.workers())
        a = await pool.acquire("a", spawn=start)
        assert a.worker.id == made[0] != spare
        reply = json.loads((await a.worker.client.get("/env/MADE_FOR")).body)
        assert reply["value"] == "its session"
        # At max_workers the idle spare gives way to the next session's own worker.
        b = await pool.acquire("b", spawn=start)
        assert b.worker.id == made[1]
        assert {w.id for w in pool.workers()} == set(made)
        # An existing session keeps its worker; spawn is not called.
        again = await pool.acquire("a", spawn=start)
        assert again.worker.id == a.worker.id
        assert len(made) == 2
        for session in (a, b, again):
            await session.close()


async def test_spares_above_min_idle_are_retired_after_idle_timeout() -> None:
    clock = FakeClock()
    async with herd.Pool(
        factory(), min_workers=0, min_idle=1, max_workers=3, idle_worker_timeout=30, clock=clock
    ) as pool:
        a = await pool.acquire("a")
        await wait_until(lambda: pool.stats().available_workers == 1, what="a spare refill")
        await a.release()  # two idle now; one of them is a surplus spare
        clock.advance(31)
        await pool.sweep()
        assert pool.stats().total_workers == 1
        assert pool.stats().min_idle == 1


async def test_new_sessions_spawn_up_to_max_then_wait_and_time_out() -> None:
    # The short timeout is for the third session only: the first two spawn, and a
    # spawn on a loaded machine can take longer than 0.3 s.
    async with herd.Pool(factory(), min_workers=0, max_workers=2) as pool:
        a = await pool.acquire("a")
        b = await pool.acquire("b")
        assert pool.stats().total_workers == 2
        started = time.monotonic()
        with pytest.raises(herd.PoolExhaustedError) as caught:
            await pool.acquire("c", timeout=0.3)
        assert 0.3 <= time.monotonic() - started < 2
        assert caught.value.session_id == "c"
        assert "max 2" in str(caught.value)
        with pytest.raises(TimeoutError):  # PoolExhaustedError is a TimeoutError too
            await pool.acquire("c", timeout=0.05)
        await a.close()
        await b.close()


async def test_waiters_at_the_cap_are_served_in_fifo_order() -> None:
    async with herd.Pool(factory(), min_workers=0, max_workers=1, acquire_timeout=None) as pool:
        holder = await pool.acquire("holder")
        order: list[str] = []

        async def wait_for(sid: str) -> None:
            session = await pool.acquire(sid)
            order.append(sid)
            await session.release()

        waiters = []
        for sid in ("first", "second", "third"):
            waiters.append(asyncio.ensure_future(wait_for(sid)))
            queued = len(waiters)
            await wait_until(lambda: pool.stats().waiting_for_worker == queued, what="queued")  # noqa: B023
        await holder.release()
        await asyncio.wait_for(asyncio.gather(*waiters), 10)
        assert order == ["first", "second", "third"]


async def test_a_freed_worker_goes_to_a_waiter_with_its_state_reset_only_by_reuse() -> None:
    async with herd.Pool(factory(), min_workers=0, max_workers=1) as pool:
        a = await pool.acquire("a")
        waiting = asyncio.ensure_future(acquire(pool, "b", 5))
        await wait_until(lambda: pool.stats().waiting_for_worker == 1, what="b to queue")
        await a.release()
        b = await waiting
        assert b.worker.id == a.worker.id  # worker_reuse=True recycles it
        await b.close()


async def test_surplus_idle_workers_are_retired_after_idle_timeout() -> None:
    clock = FakeClock()
    async with herd.Pool(
        factory(), min_workers=1, max_workers=3, idle_worker_timeout=30, clock=clock
    ) as pool:
        sessions = [await pool.acquire(sid) for sid in ("a", "b", "c")]
        for session in sessions:
            await session.release()
        assert pool.stats().total_workers == 3
        clock.advance(29)
        await pool.sweep()
        assert pool.stats().total_workers == 3
        clock.advance(2)
        await pool.sweep()
        assert pool.stats().total_workers == 1  # min_workers stay
        await wait_until(
            lambda: all(
                not pid_alive(s.worker.pid)
                for s in sessions[1:]
                if s.worker.id not in {w.id for w in pool.workers()}
            ),
            what="retired workers to exit",
        )


# -- TTL ------------------------------------------------------------------------------


async def test_ttl_evicts_sessions_without_open_use() -> None:
    clock = FakeClock()
    async with herd.Pool(factory(), min_workers=0, max_workers=2, ttl=60, clock=clock) as pool:
        async with pool.acquire("s") as session:
            first = session.worker.id
            assert await count(session) == 1
        clock.advance(59)
        await pool.sweep()
        assert "s" in pool.sessions()
        clock.advance(1)
        await pool.sweep()
        assert "s" not in pool.sessions()
        assert await pool.registry.get("s") is None
        async with pool.acquire("s") as session:
            # Recycled (worker_reuse=True): same process, but a new session.
            assert session.worker.id == first


async def test_an_open_use_keeps_the_session_alive_and_the_clock_starts_at_close() -> None:
    clock = FakeClock()
    async with herd.Pool(factory(), min_workers=0, max_workers=2, ttl=60, clock=clock) as pool:
        session = await pool.acquire("websocket")
        clock.advance(3600)
        await pool.sweep()
        assert "websocket" in pool.sessions()
        await session.close()
        clock.advance(59)
        await pool.sweep()
        assert "websocket" in pool.sessions()
        clock.advance(1)
        await pool.sweep()
        assert "websocket" not in pool.sessions()


async def test_ttl_zero_disables_eviction() -> None:
    clock = FakeClock()
    async with herd.Pool(factory(), min_workers=0, max_workers=1, ttl=0, clock=clock) as pool:
        await (await pool.acquire("s")).close()
        clock.advance(10**9)
        await pool.sweep()
        assert "s" in pool.sessions()


async def test_ttl_runs_by_itself_on_the_real_clock() -> None:
    async with herd.Pool(factory(), min_workers=0, max_workers=1, ttl=0.2) as pool:
        await (await pool.acquire("s")).close()
        await wait_until(lambda: "s" not in pool.sessions(), timeout=5, what="eviction")


async def test_no_reuse_kills_the_worker_when_its_session_ends() -> None:
    clock = FakeClock()
    async with herd.Pool(
        factory(), min_workers=0, max_workers=2, ttl=10, worker_reuse=False, clock=clock
    ) as pool:
        async with pool.acquire("s") as session:
            first = session.worker
        await pool.release("s")
        await wait_until(lambda: not pid_alive(first.pid), what="worker to be killed")
        async with pool.acquire("t") as session:
            assert session.worker.id != first.id
            second = session.worker
        clock.advance(11)
        await pool.sweep()  # TTL eviction kills too
        await wait_until(lambda: not pid_alive(second.pid), what="evicted worker to be killed")


# -- crashes and health -------------------------------------------------------------


async def test_a_dead_worker_is_noticed_at_once_and_replaced() -> None:
    crashed: list[str] = []
    async with herd.Pool(
        factory(),
        min_workers=1,
        max_workers=2,
        health_interval=None,
        on_crash=crashed.append,
    ) as pool:
        async with pool.acquire("s") as session:
            dead = session.worker
            assert await count(session) == 1
        kill_worker(dead)
        await wait_until(lambda: "s" not in pool.sessions(), timeout=2, what="unpin")
        await wait_until(lambda: crashed == ["s"], what="on_crash")
        await wait_until(
            lambda: (
                pool.stats().total_workers >= 1 and dead.id not in {w.id for w in pool.workers()}
            ),
            what="replacement",
        )
        async with pool.acquire("s") as session:
            assert session.worker.id != dead.id
            assert await count(session) == 1  # a fresh process: state is gone


async def test_crash_while_a_use_is_open_unpins_and_the_old_handle_is_harmless() -> None:
    async with herd.Pool(factory(), min_workers=0, max_workers=2) as pool:
        old = await pool.acquire("s")
        old.check()
        kill_worker(old.worker)
        await wait_until(lambda: "s" not in pool.sessions(), what="unpin")
        assert old.ended
        with pytest.raises(herd.WorkerDeadError, match="killed by SIGKILL") as caught:
            old.check()
        assert (caught.value.session_id, caught.value.worker_id) == ("s", old.worker.id)
        new = await pool.acquire("s")
        assert new.worker.id != old.worker.id
        await old.release()  # must not end the new pin
        await old.close()
        assert pool.sessions() == {"s": new.worker.id}
        await new.close()


async def test_slow_or_raising_on_crash_does_not_stall_the_pool(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = threading.Event()

    def slow(session_id: str) -> None:
        release.wait(10)
        raise RuntimeError(f"callback failed for {session_id}")

    async with herd.Pool(factory(), min_workers=0, max_workers=3, on_crash=slow) as pool:
        victim = await pool.acquire("victim")
        kill_worker(victim.worker)
        await wait_until(lambda: "victim" not in pool.sessions(), what="unpin")
        started = time.monotonic()
        async with pool.acquire("other") as other:
            assert await count(other) == 1
        assert time.monotonic() - started < 2
        with caplog.at_level(logging.ERROR, logger="herd.pool"):
            release.set()
            await wait_until(lambda: "callback failed" in caplog.text, what="logged error")


async def test_async_on_crash_is_awaited() -> None:
    crashed: list[str] = []

    async def record(session_id: str) -> None:
        crashed.append(session_id)

    async with herd.Pool(factory(), min_workers=0, max_workers=2, on_crash=record) as pool:
        session = await pool.acquire("s")
        kill_worker(session.worker)
        await wait_until(lambda: crashed == ["s"], what="on_crash")


async def test_failing_health_check_goes_through_the_crash_path(tmp_path: Path) -> None:
    marker = tmp_path / "unhealthy"
    crashed: list[str] = []
    async with herd.Pool(
        factory(env={"WORKER_HEALTH_FILE": str(marker)}),
        min_workers=0,
        max_workers=2,
        health_interval=0.1,
        on_crash=crashed.append,
    ) as pool:
        async with pool.acquire("s") as session:
            sick = session.worker
        marker.touch()
        await wait_until(lambda: crashed == ["s"], timeout=3, what="health failure")
        await wait_until(lambda: not pid_alive(sick.pid), what="sick worker killed")
        marker.unlink()
        async with pool.acquire("s") as session:
            assert session.worker.id != sick.id


async def test_a_busy_worker_is_declared_dead_only_after_health_failures_in_a_row(
    tmp_path: Path,
) -> None:
    marker = tmp_path / "busy"  # /health answers 503 while it exists: a busy spell
    crashed: list[str] = []
    async with herd.Pool(
        factory(env={"WORKER_HEALTH_FILE": str(marker)}),
        min_workers=0,
        max_workers=1,
        health_interval=None,  # probes only when the test says (default health_failures=3)
        on_crash=crashed.append,
    ) as pool:
        async with pool.acquire("s") as session:
            busy = session.worker
            assert await count(session) == 1
        marker.touch()
        await pool.check_health()
        await pool.check_health()
        assert pool.sessions() == {"s": busy.id}  # two misses: busy, not dead
        marker.unlink()
        await pool.check_health()  # it answers again: the count starts over
        marker.touch()
        await pool.check_health()
        await pool.check_health()
        assert pool.sessions() == {"s": busy.id}
        async with pool.acquire("s") as session:
            assert await count(session) == 2  # its state survived the busy spells
        await pool.check_health()  # the third miss in a row
        await wait_until(lambda: crashed == ["s"], what="the crash path")
        assert "3 in a row" in pool.stats().recent_crashes[-1].reason
        await wait_until(lambda: not pid_alive(busy.pid), what="the dead worker killed")


async def test_a_fake_worker_can_fail_its_probe_on_the_pools_side() -> None:
    """herd.testing's FakeWorker raises the OSError it is given, as a probe the
    pool could not make does; the pool counts it as no answer, even at
    health_failures=1, and the worker keeps its session."""
    factory = FakeFactory()
    async with herd.Pool(
        factory, min_workers=0, max_workers=1, health_interval=None, health_failures=1
    ) as pool:
        async with pool.acquire("s") as session:
            worker = session.worker
        worker.healthy_answer = OSError(errno.EMFILE, "Too many open files")
        for _ in range(3):
            await pool.check_health()
        assert pool.sessions() == {"s": worker.id}
        worker.healthy_answer = False
        await pool.check_health()
        assert pool.sessions() == {}


async def test_failed_probes_count_only_over_a_window_longer_than_a_busy_spell(
    tmp_path: Path,
) -> None:
    marker = tmp_path / "busy"
    async with herd.Pool(
        factory(env={"WORKER_HEALTH_FILE": str(marker)}),
        min_workers=0,
        max_workers=1,
        health_interval=30,  # 3 failures must span 60 s
    ) as pool:
        async with pool.acquire("s") as session:
            busy = session.worker
        marker.touch()
        # A proxy's failed requests probe at once, many times a second: a burst of
        # failures is still one busy spell, not a dead worker.
        for _ in range(5):
            assert await pool.check_worker(busy.id)
        assert pool.sessions() == {"s": busy.id}
        assert pid_alive(busy.pid)


def _open_until_refused(held: list[int]) -> int | None:
    """Open descriptors into ``held`` until the OS refuses; the refusal's errno."""
    while True:
        try:
            held.append(os.open(os.devnull, os.O_RDONLY))
        except OSError as refused:
            return refused.errno


@contextlib.contextmanager
def no_free_file_descriptors() -> Iterator[None]:
    """Use up this process's file descriptors, as a gateway under load does."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, hard))
    try:
        assert _open_until_refused(held) == errno.EMFILE
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_a_probe_that_fails_on_the_pools_side_counts_for_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    crashed: list[str] = []
    async with herd.Pool(
        factory(), min_workers=0, max_workers=1, health_interval=None, on_crash=crashed.append
    ) as pool:
        async with pool.acquire("s") as session:
            worker = session.worker
        with caplog.at_level(logging.ERROR, logger="herd.pool"), no_free_file_descriptors():
            with pytest.raises(OSError, match="Too many open files"):
                await worker.healthy()  # raised, not "unhealthy"
            for _ in range(5):  # more than health_failures
                await pool.check_health()
            assert await pool.check_worker(worker.id)
        assert pool.sessions() == {"s": worker.id}
        assert crashed == []
        failures = [r for r in caplog.records if "Too many open files" in r.getMessage()]
        assert len(failures) == 1  # logged once, not once per probe
        assert await worker.healthy()


# -- registry failures ---------------------------------------------------------------


class FlakyRegistry(MemoryRegistry):
    """A MemoryRegistry whose next ``fail_releases`` releases raise, as a registry
    that is briefly down does."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_releases = 0
        self.failed = 0

    async def release(self, claim: herd.Claim) -> None:
        if self.fail_releases > 0:
            self.fail_releases -= 1
            self.failed += 1
            raise ConnectionError("registry unreachable")
        await super().release(claim)


async def test_a_failing_registry_does_not_stop_eviction_or_refill(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = FlakyRegistry()
    caplog.set_level(logging.ERROR, logger="herd.pool")
    async with herd.Pool(
        factory(), min_workers=1, max_workers=2, ttl=0.2, registry=registry
    ) as pool:
        registry.fail_releases = 3  # the clean-up after the first eviction fails, thrice
        await (await pool.acquire("a")).close()
        await wait_until(lambda: "a" not in pool.sessions(), what="the first eviction")
        await wait_until(lambda: registry.failed == 3, what="the failed clean-ups")
        await wait_until(lambda: not registry._claims, what="the retried clean-up")
        # The maintenance goes on: the next session is evicted by itself too...
        await (await pool.acquire("b")).close()
        await wait_until(lambda: "b" not in pool.sessions(), what="the next eviction")
        # ...and a dead worker is replaced to keep min_workers.
        (dead,) = pool.workers()
        kill_worker(dead)
        await wait_until(
            lambda: [w.id for w in pool.workers()] not in ([], [dead.id]), what="a refill"
        )
        await wait_until(lambda: pool.stats().available_workers == 1, what="the new worker")
    logged = [r for r in caplog.records if "registry unreachable" in r.getMessage()]
    assert len(logged) == 1  # once, not once per failed try
    assert "registry clean-up failed" in logged[0].getMessage()


# -- a client that gives up ----------------------------------------------------------


@pytest.mark.parametrize("leaves", ["while-queued", "as-the-worker-frees-up"])
async def test_a_cancelled_acquire_at_the_cap_leaves_the_queue_and_pins_nothing(
    leaves: str,
) -> None:
    async with herd.Pool(factory(), min_workers=0, max_workers=1, acquire_timeout=None) as pool:
        a = await pool.acquire("a")
        b = asyncio.ensure_future(acquire(pool, "b", None))
        await wait_until(lambda: pool.stats().waiting_for_worker == 1, what="b to queue")
        if leaves == "while-queued":
            b.cancel()  # the client disconnected
            with pytest.raises(asyncio.CancelledError):
                await b
            assert pool.stats().waiting_for_worker == 0
            await a.release()
        else:
            await a.release()  # hands the worker to b's queued acquire...
            await asyncio.sleep(0)  # ...which pins it in this loop turn...
            b.cancel()  # ...as the client goes, before b has seen its session
        started = time.monotonic()
        c = await pool.acquire("c", timeout=5)
        assert time.monotonic() - started < 2  # not a TTL later
        assert c.worker.id == a.worker.id
        with pytest.raises(asyncio.CancelledError):
            await b
        assert pool.sessions() == {"c": c.worker.id}
        registry = pool.registry
        assert isinstance(registry, MemoryRegistry)
        await wait_until(lambda: registry._workers == {"c": c.worker.id}, what="registry")
        await c.release()


# -- spawn failures -------------------------------------------------------------------


async def test_spawn_failure_raises_then_backs_off_without_spinning() -> None:
    counting = CountingFactory(factory(env={"WORKER_EXIT_AT_START": "2"}))
    async with herd.Pool(counting, min_workers=0, max_workers=2) as pool:
        with pytest.raises(herd.SpawnError) as caught:
            await pool.acquire("s")
        assert caught.value.exit_code == 2
        with pytest.raises(herd.SpawnError, match="not spawning for another"):
            await pool.acquire("s")
        assert counting.spawns == 1
        stats = pool.stats()
        assert stats.spawn_failures == 1
        assert stats.last_spawn_error is not None
        assert "s" not in pool.sessions()


async def test_pool_keeps_serving_its_sessions_while_spawns_fail(tmp_path: Path) -> None:
    async with herd.Pool(factory(), min_workers=0, max_workers=3) as pool:
        async with pool.acquire("kept") as session:
            kept = session.worker.id
        pool.factory = factory(env={"WORKER_EXIT_AT_START": "1"})
        with pytest.raises(herd.SpawnError):
            await pool.acquire("new")
        async with pool.acquire("kept") as session:
            assert session.worker.id == kept


async def test_start_fails_cleanly_when_min_workers_cannot_spawn() -> None:
    pool = herd.Pool(factory(env={"WORKER_EXIT_AT_START": "4"}), min_workers=2)
    with pytest.raises(herd.SpawnError, match="exited with code 4"):
        await pool.start()
    assert pool.state is herd.PoolState.CLOSED
    with pytest.raises(herd.PoolClosedError):
        await pool.acquire("s")


# -- release, close and shutdown ------------------------------------------------------


async def test_release_and_close_are_idempotent(pool: herd.Pool[Any]) -> None:
    session = await pool.acquire("s")
    await session.close()
    await session.close()
    await session.release()
    await session.release()
    await pool.release("s")
    await pool.release("never-seen")
    assert pool.sessions() == {}
    with pytest.raises(herd.InvalidSessionIdError):
        await pool.release("bad id")


async def test_release_with_an_open_use_keeps_the_worker_out_of_other_hands() -> None:
    async with herd.Pool(factory(), min_workers=0, max_workers=1) as pool:
        streaming = await pool.acquire("s")  # e.g. an open WebSocket
        await pool.release("s")
        assert "s" not in pool.sessions()
        with pytest.raises(herd.PoolExhaustedError):
            await pool.acquire("other", timeout=0.2)  # the only worker is still in use
        await streaming.close()
        async with pool.acquire("other") as other:
            assert other.worker.id == streaming.worker.id


async def test_shutdown_stops_everything_and_refuses_work() -> None:
    pool = herd.Pool(factory(), min_workers=2, max_workers=3, acquire_timeout=None)
    async with pool:
        a = await pool.acquire("a")
        b = await pool.acquire("b")
        c = await pool.acquire("c")
        waiting = asyncio.ensure_future(acquire(pool, "d", None))
        await wait_until(lambda: pool.stats().waiting_for_worker == 1, what="d to queue")
        pids = [s.worker.pid for s in (a, b, c)]
    assert pool.state is herd.PoolState.CLOSED
    with pytest.raises(herd.PoolClosedError):
        await waiting
    assert not any(pid_alive(pid) for pid in pids)
    with pytest.raises(herd.PoolClosedError):
        await pool.acquire("a")
    await a.close()  # harmless after shutdown
    await pool.shutdown()  # idempotent
    with pytest.raises(herd.PoolClosedError):
        await pool.start()


async def test_shutdown_during_a_first_acquire_raises_pool_closed() -> None:
    pool = herd.Pool(factory(start_health_check_delay=0.3), min_workers=0, max_workers=2)
    await pool.start()
    acquiring = asyncio.ensure_future(acquire(pool, "s", None))
    await wait_until(lambda: pool.stats().starting_workers == 1, what="spawn to start")
    await pool.shutdown()
    with pytest.raises(herd.PoolClosedError):
        await acquiring


async def test_acquire_before_start_says_how_to_start() -> None:
    pool = herd.Pool(factory())
    with pytest.raises(herd.PoolClosedError, match="async with pool"):
        await pool.acquire("s")


# -- validation and stats -------------------------------------------------------------


@pytest.mark.parametrize(
    "bad", ["", "has space", "a/b", "x" * 257, "new\nline", "tab\t", "é", 42, None]
)
async def test_invalid_session_ids_are_refused(pool: herd.Pool[Any], bad: Any) -> None:
    with pytest.raises(herd.InvalidSessionIdError):
        await pool.acquire(bad)
    assert pool.stats().active_sessions == 0


@pytest.mark.parametrize(
    "good", ["a", "user@example.com", "tenant:42", "0b3f-uuid_like.v1~x+y=z", "x" * 256]
)
def test_valid_session_ids(good: str) -> None:
    assert herd.validate_session_id(good) == good


def test_bad_pool_options_raise_value_error() -> None:
    from herd.testing import FakeFactory

    for kwargs in (
        {"min_workers": -1},
        {"max_workers": 0},
        {"min_workers": 3, "max_workers": 2},
        {"min_idle": -1},
        {"min_idle": 3, "max_workers": 2},
        {"refill_delay": -1},
        {"ttl": -1},
        {"health_interval": float("nan")},
        {"health_failures": 0},
        {"acquire_timeout": float("inf")},
    ):
        with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
            herd.Pool(FakeFactory(), **kwargs)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        herd.Pool(FakeFactory(), ttl="15m")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        herd.Pool(FakeFactory(), min_workers=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        herd.Pool(FakeFactory(), on_crash="print")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        herd.Pool(FakeFactory(), health_failures=2.5)  # type: ignore[arg-type]


async def test_stats_reflect_the_pool() -> None:
    clock = FakeClock()
    async with herd.Pool(factory(), min_workers=2, max_workers=4, clock=clock) as pool:
        open_use = await pool.acquire("open")
        await (await pool.acquire("idle")).close()
        clock.advance(5)
        stats = pool.stats()
        assert (stats.total_workers, stats.available_workers, stats.active_sessions) == (2, 0, 2)
        assert stats.state == "ready"
        rows = {row.session_id: row for row in stats.workers}
        assert rows["open"].open_uses == 1
        assert rows["open"].idle_seconds == 0
        assert rows["idle"].idle_seconds == pytest.approx(5)
        for row in stats.workers:
            assert row.state == "pinned"
            assert row.rss_bytes is not None
            assert row.rss_bytes > 1_000_000
            assert row.pid is not None
            assert pid_alive(row.pid)
            assert row.age_seconds >= 5
        assert stats.node.total_memory_bytes >= stats.node.available_memory_bytes > 0
        assert 0 <= stats.node.cpu_idle <= 100
        assert json.dumps(stats.as_dict())
        await open_use.close()


# -- configuration ----------------------------------------------------------------------


async def test_a_pool_takes_its_options_as_one_pool_config() -> None:
    config = herd.PoolConfig(min_workers=0, max_workers=2, ttl=None, spawn_backoff=2.0)
    async with herd.Pool(FakeFactory(), config=config) as pool:
        assert pool.config is config
        assert pool.stats().max_workers == 2
    with pytest.raises(TypeError, match=r"either in config or as keywords.*max_workers"):
        herd.Pool(FakeFactory(), config=config, max_workers=3)
    with pytest.raises(TypeError, match=r"must be a herd\.PoolConfig"):
        herd.Pool(FakeFactory(), config={"max_workers": 3})  # type: ignore[arg-type]


async def test_the_spawn_back_off_is_configurable() -> None:
    """After a failed spawn the pool waits spawn_backoff before the next (it was
    fixed at 0.5 s, doubling to 30 s); an acquire meanwhile gets the failure."""
    factory = FakeFactory()
    factory.fail_next = 1
    async with herd.Pool(
        factory, min_workers=0, max_workers=1, spawn_backoff=0.05, spawn_backoff_max=0.05
    ) as pool:
        with pytest.raises(herd.SpawnError):
            await pool.acquire("a")
        with pytest.raises(herd.SpawnError):  # within the back-off: refused at once
            await pool.acquire("a")
        await asyncio.sleep(0.06)
        session = await pool.acquire("a")  # after it: spawned
        await session.release()
    with pytest.raises(ValueError, match="spawn_backoff_max must be >= spawn_backoff"):
        herd.Pool(FakeFactory(), spawn_backoff=2, spawn_backoff_max=1)


# -- every deadline from the injected clock ---------------------------------------------
# Each of these waits a minute of the pool's clock and none of the wall's: before the
# deadlines moved to the injected clock (they read loop.time()), each test failed.


class FlakyDeletes(MemoryRegistry):
    """A MemoryRegistry whose next ``failures`` releases raise; counts every release."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = 0
        self.deletes = 0

    async def release(self, claim: herd.Claim) -> None:
        self.deletes += 1
        if self.failures:
            self.failures -= 1
            raise ConnectionError("registry down")
        await super().release(claim)


def quiet(**options: Any) -> dict[str, Any]:
    """Pool options with nothing timed but what a test sets."""
    return {"ttl": None, "idle_worker_timeout": None, "health_interval": None, **options}


async def test_spawn_back_off_runs_on_the_pools_clock() -> None:
    clock = FakeClock()
    factory = FakeFactory()
    factory.fail_next = 1
    async with herd.Pool(
        factory,
        min_workers=0,
        max_workers=1,
        clock=clock,
        **quiet(spawn_backoff=60, spawn_backoff_max=60),
    ) as pool:
        with pytest.raises(herd.SpawnError, match="fake spawn failure"):
            await pool.acquire("a")
        clock.advance(59)
        with pytest.raises(herd.SpawnError, match=r"not spawning for another 1\.0s"):
            await pool.acquire("a")
        clock.advance(1)
        session = await pool.acquire("a")
        await session.release()


async def test_refill_delay_runs_on_the_pools_clock() -> None:
    clock = FakeClock()
    factory = FakeFactory()
    options = quiet(min_workers=0, min_idle=1, max_workers=3, refill_delay=60)
    async with herd.Pool(factory, clock=clock, **options) as pool:
        session = await pool.acquire("a")  # takes the spare: its refill waits 60 s
        await pool.sweep()
        await asyncio.sleep(0.05)
        assert len(factory.spawned) == 1
        clock.advance(60)
        await pool.sweep()  # wakes the waiting refill: it looks at the clock again
        await wait_until(lambda: pool.stats().available_workers == 1, what="the refill")
        assert len(factory.spawned) == 2
        await session.release()


async def test_refill_backs_off_on_the_pools_clock() -> None:
    clock = FakeClock()
    factory = FakeFactory()
    options = quiet(min_workers=1, max_workers=2, spawn_backoff=60, spawn_backoff_max=60)
    async with herd.Pool(factory, clock=clock, **options) as pool:
        factory.fail_next = 1
        factory.spawned[0].crash()
        await wait_until(lambda: pool.stats().spawn_failures == 1, what="a failed refill")
        await pool.sweep()
        await asyncio.sleep(0.05)
        assert pool.stats().total_workers == 0  # backing off: no second try yet
        clock.advance(60)
        await pool.sweep()
        await wait_until(lambda: pool.stats().total_workers == 1, what="the refill")
        assert len(factory.spawned) == 2


async def test_registry_clean_up_retries_on_the_pools_clock() -> None:
    clock = FakeClock()
    registry = FlakyDeletes()
    async with herd.Pool(
        FakeFactory(), min_workers=0, max_workers=1, registry=registry, clock=clock, **quiet()
    ) as pool:
        session = await pool.acquire("a")
        registry.failures = 2
        with pytest.raises(ConnectionError):
            await session.release()  # the caller hears of it; the pool retries later
        await pool.sweep()  # the retry fails too: the next waits a back-off (a tick)
        assert registry.deletes == 2
        await pool.sweep()
        assert registry.deletes == 2  # not within the back-off
        clock.advance(1)
        await pool.sweep()
        assert registry.deletes == 3
        assert await registry.get("a") is None


async def test_the_health_window_runs_on_the_pools_clock() -> None:
    """health_failures=3 at health_interval=10: three misses within a moment of the
    pool's clock are a busy spell; the third miss 20 s after the first is death."""
    clock = FakeClock()
    options = quiet(min_workers=1, max_workers=1, health_failures=3)
    options["health_interval"] = 10  # the loop's first probe is 10 s of real time away
    async with herd.Pool(FakeFactory(), clock=clock, **options) as pool:
        (worker,) = pool.workers()
        assert isinstance(worker, herd.testing.FakeWorker)
        worker.healthy_answer = False
        for _ in range(3):
            await pool.check_health()
        assert pool.workers() == [worker]  # three misses in no time: busy, not dead
        clock.advance(20)
        await pool.check_health()
        assert worker not in pool.workers()
        assert "4 in a row over 20.0s" in pool.stats().recent_crashes[-1].reason
