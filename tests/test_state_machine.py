"""A hypothesis state machine driving a real pool of subprocess workers.

Rules acquire sessions (one at a time, several at once, or enough to fill the
pool), end uses with ``close()`` or ``release()`` (old handles included), release
sessions by ID, SIGKILL pinned, idle and ending workers, free a worker while an
acquire waits at the cap, and move a fake clock (with or without a use held open)
then sweep. A model keeps the expected pins (session ID -> worker ID) and the open
uses of each pin; after every step the pool's own view (``sessions()``, ``stats()``,
``workers()``, the registry, the handles) must agree with it, and with the
processes really running.

One event loop per machine: hypothesis rules are synchronous, so each rule runs
its coroutine with ``loop.run_until_complete`` and ends once the pool is back to
``min_workers``; between steps the loop is stopped, so every invariant sees a
quiescent pool.

Two races the machine cannot hit by chance have their own tests at the end.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import herd
from herd.testing import FakeClock
from tests.helpers import factory, pid_alive, wait_until, wait_until_sync
from tests.helpers.pool_model import ModelMachine, Pin, Use

T = TypeVar("T")

SESSION_IDS = [f"s{i}" for i in range(5)]
TTL = 30.0  # fake seconds
# Steps of the fake clock: no sum of them is exactly TTL, so the model never has
# to know whether an idle time of exactly TTL evicts (it is unspecified).
CLOCK_STEPS = (7.0, 13.0, TTL + 1)
ACQUIRE_TIMEOUT = 0.25  # real seconds: the pool's default, what an exhausted acquire waits
# Real seconds for what takes ~50 ms (a spawn, noticing a death): generous, yet
# short enough that a failing example fails fast.
LONG = 5.0  # the timeout of acquires the model says must succeed
NOTICE = 5.0  # how long the pool may take to notice a killed worker, or to refill


class PoolMachine(ModelMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.min_workers = 0
        self.min_idle = 0
        self.max_workers = 2
        self.reuse = True
        self.ever_pinned: set[str] = set()  # worker IDs that ever served a session
        self.dead: set[str] = set()  # worker IDs we killed
        self.killed_from: dict[str, str] = {}  # sid -> the worker killed under it
        self.counters: dict[str, int] = {}  # worker ID -> its /state counter
        self.crash_reports: list[str] = []  # what on_crash was called with
        self.own = factory()  # workers started for one session (acquire(spawn=...))

    # -- plumbing -----------------------------------------------------------------------

    def wait(self, predicate: Callable[[], object], what: str) -> None:
        self.run(wait_until(predicate, timeout=NOTICE, what=what))

    def settle(self) -> None:
        """Let the pool finish refilling to min_workers, so that every step starts from
        the same state whatever the timing (hypothesis replays steps to shrink them)."""
        pool = self.p

        def settled() -> bool:
            stats = pool.stats()
            busy = stats.total_workers - stats.available_workers
            wanted = min(self.max_workers, max(self.min_workers, busy + self.min_idle))
            return stats.starting_workers == 0 and stats.total_workers >= wanted

        self.wait(settled, "the pool to refill to min_workers and its spares")

    async def on_crash(self, session_id: str) -> None:
        self.crash_reports.append(session_id)

    @initialize(
        min_workers=st.integers(0, 1),
        max_workers=st.integers(2, 3),
        worker_reuse=st.booleans(),
        min_idle=st.integers(0, 1),
    )
    def start(self, min_workers: int, max_workers: int, worker_reuse: bool, min_idle: int) -> None:
        self.min_workers, self.max_workers, self.reuse = min_workers, max_workers, worker_reuse
        self.min_idle = min_idle
        pool = herd.Pool(
            factory(),
            min_workers=min_workers,
            max_workers=max_workers,
            min_idle=min_idle,
            ttl=TTL,
            health_interval=None,
            worker_reuse=worker_reuse,
            on_crash=self.on_crash,
            acquire_timeout=ACQUIRE_TIMEOUT,
            idle_worker_timeout=None,
            clock=self.clock,
        )
        self.run(pool.start())
        self.pool = pool
        assert pool.stats().total_workers == max(min_workers, min_idle)

    def teardown(self) -> None:
        try:
            if self.pool is not None:
                pool = self.pool
                # Unstuck if need be: a herd bug, see the last test of this file.
                self.run(_shut_down(pool))
                assert pool.workers() == []
                assert all(h.session.ended for h in self.uses)
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    # -- the model ----------------------------------------------------------------------

    def free(self) -> int:
        return self.max_workers - len(self.held())

    def new_pin(self, sid: str, session: herd.Session[Any]) -> Pin:
        """Record the first use of a new pin, checking the worker it got."""
        worker = session.worker
        assert worker.id not in self.held(), f"{worker.id} given to two sessions"
        assert worker.id not in self.dead, f"{sid} pinned to killed worker {worker.id}"
        killed = self.killed_from.pop(sid, None)
        assert worker.id != killed, f"{sid} got its killed worker back"
        if not self.reuse:
            assert worker.id not in self.ever_pinned, f"worker_reuse=False reused {worker.id}"
        assert worker.pid is not None
        assert pid_alive(worker.pid)
        self.ever_pinned.add(worker.id)
        pin = Pin(sid, worker.id, last_active=self.clock())
        self.pins[sid] = pin
        return pin

    def acquired(self, sid: str, session: herd.Session[Any]) -> Pin:
        """Record a successful acquire of ``sid`` (affinity, or a new pin)."""
        assert session.session_id == sid
        assert not session.closed
        assert not session.ended
        pin = self.pins.get(sid)
        if pin is None:
            return self.new_pin(sid, session)
        assert session.worker.id == pin.worker_id, f"affinity broken for {sid}"
        return pin

    def worker_freed(self, worker_id: str) -> None:
        """A worker's session ended with no use open: recycled, or killed without reuse."""
        ids = [w.id for w in self.p.workers()]
        if self.reuse:
            assert worker_id in ids, f"{worker_id} not recycled"
            [row] = [r for r in self.p.stats().workers if r.id == worker_id]
            assert row.state == "idle"
            assert row.session_id is None
        else:
            assert worker_id not in ids, f"{worker_id} kept with worker_reuse=False"

    def end_pin(self, pin: Pin) -> None:
        """Model a release or eviction of a live pin."""
        del self.pins[pin.sid]
        pin.ended = True
        if self.open_uses(pin) == 0:
            self.worker_freed(pin.worker_id)

    def use_closed(self, handle: Use) -> None:
        """Model the end of one use (close, or the close part of release)."""
        self.uses.remove(handle)
        pin = handle.pin
        if pin.crashed or self.open_uses(pin):
            return
        pin.last_active = self.clock()
        if pin.ended:
            self.worker_freed(pin.worker_id)

    def killed(self, pin: Pin, worker_id: str) -> None:
        """Model the death of a pinned or ending worker."""
        if self.pins.get(pin.sid) is pin:
            del self.pins[pin.sid]
            self.killed_from[pin.sid] = worker_id
        pin.ended = pin.crashed = True
        for handle in self.uses:
            if handle.pin is pin:
                assert handle.session.ended
                with pytest.raises(herd.WorkerDeadError) as dead:
                    handle.session.check()
                assert dead.value.worker_id == worker_id
                assert dead.value.session_id == pin.sid

    def worker(self, worker_id: str) -> herd.Worker[Any]:
        return next(w for w in self.p.workers() if w.id == worker_id)

    def kill(self, worker_id: str) -> None:
        pid = self.worker(worker_id).pid
        assert pid is not None
        assert pid_alive(pid)
        os.kill(pid, signal.SIGKILL)
        self.dead.add(worker_id)

    async def bump(self, session: herd.Session[Any]) -> None:
        """Bump the worker's per-process counter: proof it is the same live process."""
        reply = await session.worker.client.get("/state")
        assert reply.code == 200
        expected = self.counters.get(session.worker.id, 0) + 1
        assert json.loads(reply.body)["count"] == expected, "a different process answered"
        self.counters[session.worker.id] = expected

    # -- rules --------------------------------------------------------------------------

    @rule(sid=st.sampled_from(SESSION_IDS), keep=st.booleans())
    def acquire(self, sid: str, keep: bool) -> None:
        """Await a use (kept open) or take one with ``async with`` (closed at once)."""
        pool = self.p
        if sid not in self.pins and self.free() == 0:
            # Every worker is held and none can be freed: the default timeout runs out.
            with pytest.raises(herd.PoolExhaustedError) as exhausted:
                self.run(pool.acquire(sid))
            assert exhausted.value.session_id == sid
            assert isinstance(exhausted.value, TimeoutError)
            return
        if keep:
            session = self.run(pool.acquire(sid, timeout=LONG))
            self.uses.append(Use(session, self.acquired(sid, session)))
            self.run(self.bump(session))
        else:

            async def use_once() -> herd.Session[Any]:
                async with pool.acquire(sid, timeout=LONG) as session:
                    self.acquired(sid, session)
                    await self.bump(session)
                return session

            session = self.run(use_once())
            assert session.closed
            assert not session.ended
            pin = self.pins[sid]
            if self.open_uses(pin) == 0:
                pin.last_active = self.clock()
        self.settle()

    @rule(sid=st.sampled_from(SESSION_IDS))
    def acquire_with_spawn(self, sid: str) -> None:
        """A new session with its own worker: started for it, within max_workers (an
        idle spare gives way at the cap)."""
        if sid in self.pins or self.free() == 0:
            return  # the same as a plain acquire: covered by that rule
        started: list[str] = []

        async def start() -> herd.ProcessWorker:
            worker = await self.own.spawn()
            started.append(worker.id)
            return worker

        session = self.run(self.p.acquire(sid, timeout=LONG, spawn=start))
        assert [session.worker.id] == started, "spawn= was not what served the new session"
        self.uses.append(Use(session, self.acquired(sid, session)))
        self.run(self.bump(session))
        assert self.p.stats().total_workers <= self.max_workers
        self.settle()

    @rule(calls=st.lists(st.sampled_from(SESSION_IDS), min_size=2, max_size=4))
    def acquire_concurrently(self, calls: list[str]) -> None:
        """Concurrent acquires: one pin per new ID, never above max_workers, FIFO at the cap."""
        pool = self.p
        new = list(dict.fromkeys(sid for sid in calls if sid not in self.pins))
        winners = set(new[: self.free()])  # first come, first served
        served = set(self.pins) | winners

        async def one(sid: str) -> herd.Session[Any]:
            if sid in served:
                return await pool.acquire(sid, timeout=LONG)
            return await pool.acquire(sid)

        async def all_of_them() -> list[herd.Session[Any] | BaseException]:
            return await asyncio.gather(*(one(sid) for sid in calls), return_exceptions=True)

        results = self.run(all_of_them())
        for sid, result in zip(calls, results, strict=True):
            if sid in served:
                assert isinstance(result, herd.Session), f"{sid}: {result!r}"
                self.uses.append(Use(result, self.acquired(sid, result)))
            else:
                assert isinstance(result, herd.PoolExhaustedError), f"{sid}: {result!r}"
        self.settle()

    @precondition(lambda self: self.pool is not None and self.free() > 0)
    @rule(data=st.data())
    def fill_up(self, data: st.DataObject) -> None:
        """New sessions for every free worker at once: the pool reaches max_workers."""
        pool = self.p
        new = [sid for sid in SESSION_IDS if sid not in self.pins]
        sids = data.draw(st.permutations(new))[: self.free()]

        async def all_of_them() -> list[herd.Session[Any]]:
            return await asyncio.gather(*(pool.acquire(sid, timeout=LONG) for sid in sids))

        for sid, session in zip(sids, self.run(all_of_them()), strict=True):
            self.uses.append(Use(session, self.new_pin(sid, session)))
        assert self.free() == 0
        self.settle()

    @precondition(lambda self: self.uses)
    @rule(data=st.data(), release=st.booleans())
    def end_use(self, data: st.DataObject, release: bool) -> None:
        """``session.close()`` ends the use; ``session.release()`` the session too.

        Both are idempotent, and an old handle never ends a newer pin of its ID.
        """
        handle = data.draw(st.sampled_from(self.uses))
        self.end_handle(handle, release)
        self.settle()

    def end_handle(self, handle: Use, release: bool) -> None:
        session, pin = handle.session, handle.pin
        for _ in range(2):  # idempotent
            self.run(session.release() if release else session.close())
        assert session.closed
        if release and self.pins.get(pin.sid) is pin:
            self.uses.remove(handle)
            self.end_pin(pin)
        else:
            self.use_closed(handle)
        if release:
            assert session.ended

    def stale_handles(self) -> list[Use]:
        return [h for h in self.uses if h.pin.ended and h.pin.sid in self.pins]

    @precondition(lambda self: self.stale_handles())
    @rule(data=st.data(), release=st.booleans())
    def end_stale_use(self, data: st.DataObject, release: bool) -> None:
        """End a use of an ended pin whose ID is pinned anew: the new pin is untouched."""
        handle = data.draw(st.sampled_from(self.stale_handles()))
        self.end_handle(handle, release)
        self.settle()

    @rule(sid=st.sampled_from(SESSION_IDS))
    def release(self, sid: str) -> None:
        """``pool.release(sid)``; idempotent, and unknown IDs are ignored."""
        self.run(self.p.release(sid))
        pin = self.pins.get(sid)
        if pin is not None:
            self.end_pin(pin)
        self.run(self.p.release(sid))
        self.settle()

    @precondition(lambda self: self.pins)
    @rule(data=st.data(), reacquire=st.booleans(), release_old=st.booleans())
    def kill_pinned_worker(self, data: st.DataObject, reacquire: bool, release_old: bool) -> None:
        """SIGKILL a pinned worker: the pool unpins it at once and calls on_crash.

        The next acquire of the session ID gets a fresh worker, which a handle of
        the dead one, released, leaves alone.
        """
        pool = self.p
        pin = self.pins[data.draw(st.sampled_from(sorted(self.pins)))]
        reports = self.crash_reports.count(pin.sid)
        self.kill(pin.worker_id)
        self.wait(lambda: pin.sid not in pool.sessions(), f"the pool to unpin {pin.sid}")
        assert pin.worker_id not in [w.id for w in pool.workers()]
        self.killed(pin, pin.worker_id)
        crash = pool.stats().recent_crashes[-1]
        assert (crash.worker_id, crash.session_id) == (pin.worker_id, pin.sid)
        self.wait(lambda: self.crash_reports.count(pin.sid) > reports, f"on_crash({pin.sid!r})")
        self.settle()
        if reacquire:  # never exhausted: the dead worker's place is free
            session = self.run(pool.acquire(pin.sid, timeout=LONG))
            self.uses.append(Use(session, self.acquired(pin.sid, session)))
            self.run(self.bump(session))
            old = [h for h in self.uses if h.pin is pin]
            if old and release_old:
                self.end_handle(old[0], release=True)
            self.settle()

    def unpinned_workers(self) -> list[str]:
        pinned = {p.worker_id for p in self.pins.values()}
        return [w.id for w in self.p.workers() if w.id not in pinned]

    @precondition(lambda self: self.pool is not None and self.unpinned_workers())
    @rule(data=st.data())
    def kill_unpinned_worker(self, data: st.DataObject) -> None:
        """SIGKILL an idle worker, or one still serving a use of an ended session."""
        pool = self.p
        worker_id = data.draw(st.sampled_from(self.unpinned_workers()))
        ending = [p for p in self.lingering() if p.worker_id == worker_id]
        sessions = pool.sessions()
        reports = len(self.crash_reports)
        self.kill(worker_id)
        self.wait(
            lambda: worker_id not in [w.id for w in pool.workers()],
            f"the pool to drop {worker_id}",
        )
        assert pool.sessions() == sessions, "a worker death touched another session"
        crash = pool.stats().recent_crashes[-1]
        assert crash.worker_id == worker_id
        self.run(asyncio.sleep(0.01))  # room for the on_crash task, if any, to run
        if ending:
            assert crash.session_id == ending[0].sid
            self.killed(ending[0], worker_id)
        else:
            assert crash.session_id is None
            assert len(self.crash_reports) == reports, "on_crash for an idle worker"
        self.settle()

    @rule(
        seconds=st.sampled_from(CLOCK_STEPS),
        hold=st.none() | st.sampled_from(SESSION_IDS),
    )
    def time_passes(self, seconds: float, hold: str | None) -> None:
        """Advance the fake clock and sweep: sessions unused for ttl are evicted.

        With ``hold``, a use of that session is open meanwhile: it is never evicted,
        and its idle time starts when the use closes (checked by a second, shorter
        step).
        """
        pool = self.p
        use = None
        if hold is not None and (hold in self.pins or self.free() > 0):
            session = self.run(pool.acquire(hold, timeout=LONG))
            use = Use(session, self.acquired(hold, session))
            self.uses.append(use)
        self.advance(seconds)
        if use is not None:
            assert pool.sessions().get(use.pin.sid) == use.pin.worker_id, "evicted while in use"
            self.run(use.session.close())
            self.use_closed(use)
            self.advance(CLOCK_STEPS[1])
        self.settle()

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.run(self.p.sweep())
        now = self.clock()
        for pin in list(self.pins.values()):
            if self.open_uses(pin) == 0 and now - pin.last_active > TTL:
                self.end_pin(pin)

    def freeable(self) -> dict[str, list[Any]]:
        """What, at the cap, would free a worker for a waiting acquire, by kind."""
        if self.pool is None or self.free() > 0:
            return {}
        lingering = self.lingering()
        sole_uses = [h for h in self.uses if self.open_uses(h.pin) == 1]
        kinds: dict[str, list[Any]] = {
            "release": [p for p in self.pins.values() if self.open_uses(p) == 0],
            "release_use": [h for h in sole_uses if self.pins.get(h.pin.sid) is h.pin],
            "close": [h for h in sole_uses if h.pin in lingering],
            "kill": list(self.pins.values()),
        }
        return {how: some for how, some in kinds.items() if some}

    @precondition(lambda self: self.freeable().keys() - {"kill"})
    @rule(data=st.data())
    def hand_a_freed_worker_to_a_waiter(self, data: st.DataObject) -> None:
        """At the cap an acquire waits; a worker freed meanwhile goes to it."""
        options = self.freeable()
        how = data.draw(st.sampled_from(sorted(options.keys() - {"kill"})))
        self.free_a_worker_for_a_waiter(data, how, data.draw(st.sampled_from(options[how])))

    @precondition(lambda self: "kill" in self.freeable())
    @rule(data=st.data())
    def kill_a_worker_under_a_waiter(self, data: st.DataObject) -> None:
        """At the cap an acquire waits; a pinned worker dies: the waiter gets a new one."""
        pin = data.draw(st.sampled_from(self.freeable()["kill"]))
        self.free_a_worker_for_a_waiter(data, "kill", pin)

    def free_a_worker_for_a_waiter(self, data: st.DataObject, how: str, what: Any) -> None:
        pool = self.p
        sid = data.draw(st.sampled_from([s for s in SESSION_IDS if s not in self.pins]))
        pin: Pin = what if isinstance(what, Pin) else what.pin
        freed = pin.worker_id

        async def acquire() -> herd.Session[Any]:
            return await pool.acquire(sid, timeout=LONG)

        async def scenario() -> herd.Session[Any]:
            waiter = asyncio.ensure_future(acquire())
            await wait_until(lambda: pool.stats().inflight_acquires == 1, what="the acquire")
            for _ in range(5):
                await asyncio.sleep(0)
            assert not waiter.done(), "acquired above max_workers"
            if how == "kill":
                self.kill(freed)
            elif how == "release":
                await pool.release(pin.sid)
            elif how == "release_use":
                await what.session.release()
            else:
                await what.session.close()
            return await waiter

        session = self.run(scenario())
        if how == "kill":
            self.killed(pin, freed)
        else:
            if isinstance(what, Use):
                self.uses.remove(what)
            if self.pins.get(pin.sid) is pin:
                del self.pins[pin.sid]
                pin.ended = True
        new = self.acquired(sid, session)
        self.uses.append(Use(session, new))
        if how != "kill" and self.reuse:
            assert new.worker_id == freed, "the freed worker did not go to the waiter"
        else:
            assert new.worker_id != freed
        self.settle()

    # -- invariants ---------------------------------------------------------------------

    @invariant()
    def one_worker_per_session_and_one_session_per_worker(self) -> None:
        if self.pool is None:
            return
        sessions = self.pool.sessions()
        assert sessions == {sid: p.worker_id for sid, p in self.pins.items()}
        assert len(set(sessions.values())) == len(sessions), "a worker pinned to two sessions"
        assert not set(sessions.values()) & {p.worker_id for p in self.lingering()}
        assert self.run(self.pool.registry.list()) == sessions

    @invariant()
    def stats_match_reality(self) -> None:
        if self.pool is None:
            return
        stats = self.pool.stats()
        assert stats.state == "ready"
        assert stats.total_workers + stats.starting_workers <= self.max_workers
        assert stats.active_sessions == len(self.pool.sessions())
        assert stats.inflight_acquires == 0
        rows = {row.id: row for row in stats.workers}
        assert len(rows) == stats.total_workers == len(self.pool.workers())
        assert stats.available_workers == sum(r.state == "idle" for r in rows.values())
        pinned = {r.session_id: r.id for r in rows.values() if r.state == "pinned"}
        assert pinned == self.pool.sessions()
        ending = {r.id: r.session_id for r in rows.values() if r.state == "ending"}
        assert ending == {p.worker_id: p.sid for p in self.lingering()}
        live = list(self.pins.values()) + self.lingering()
        assert {p.worker_id: self.open_uses(p) for p in live} == {
            r.id: r.open_uses for r in rows.values() if r.session_id is not None
        }
        assert not rows.keys() & self.dead, "stats list a killed worker"
        for row in rows.values():
            assert row.pid is not None
            assert pid_alive(row.pid), f"{row.id} is not running"
            assert (row.state == "idle") == (row.session_id is None)


# Shrinking replays a failing example step by step with real processes: minutes,
# beyond the test's timeout. A failure is reported with its steps unshrunk (and
# saved in the example database, so the next run replays it first); set
# HERD_TEST_SHRINK=1, with --timeout=0, to shrink it.
PHASES = tuple(p for p in Phase if p is not Phase.shrink or os.environ.get("HERD_TEST_SHRINK"))


def test_pool_state_machine() -> None:
    run_state_machine_as_test(  # type: ignore[no-untyped-call]
        PoolMachine,
        settings=settings(
            max_examples=int(os.environ.get("HERD_TEST_EXAMPLES", "15")),
            stateful_step_count=15,
            deadline=None,
            phases=PHASES,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


# -- races the machine cannot hit by chance -------------------------------------------------


async def _acquire(pool: herd.Pool[Any], session_id: str) -> herd.Session[Any]:
    return await pool.acquire(session_id, timeout=LONG)


async def _shut_down(pool: herd.Pool[Any]) -> bool:
    """``pool.shutdown()``; ``False`` if it hung (see the last test) and was unstuck."""
    closing = asyncio.ensure_future(pool.shutdown())
    done, _ = await asyncio.wait([closing], timeout=2.0)
    if not done:
        for task in asyncio.all_tasks():
            if task.get_coro().__qualname__ == "Pool._maintenance_loop":  # type: ignore[union-attr]
                task.cancel()  # a second cancellation is not lost
        await closing
    assert pool.state is herd.PoolState.CLOSED
    return bool(done)


async def _hand_a_dying_worker_to_a_waiter(delay: int) -> str | None:
    """Free a worker for a waiting acquire just as it dies; what went wrong, if anything."""
    pool = herd.Pool(factory(), min_workers=0, max_workers=1, ttl=None, health_interval=None)
    await pool.start()
    try:
        first = await pool.acquire("s1")
        dying, pid = first.worker, first.worker.pid
        assert pid is not None
        await first.close()
        waiter = asyncio.ensure_future(_acquire(pool, "s2"))
        await wait_until(lambda: pool.stats().inflight_acquires == 1, what="a waiter")
        for _ in range(5):
            await asyncio.sleep(0)
        assert not waiter.done()
        os.kill(pid, signal.SIGKILL)
        # The loop is blocked meanwhile: the exit is pending when it runs again.
        wait_until_sync(lambda: not pid_alive(pid), timeout=NOTICE, what="the exit")
        for _ in range(delay):
            await asyncio.sleep(0)
        await pool.release("s1")  # hands the worker to the waiter
        session = await waiter

        def sound() -> bool:
            if "s2" not in pool.sessions():
                return session.ended  # pinned to the dead worker, then unpinned
            return session.worker.id in [w.id for w in pool.workers()]

        try:
            await wait_until(sound, timeout=2.0, what="s2 on a live worker, or unpinned")
        except AssertionError:
            return (
                f"delay {delay}: s2 stays pinned to {session.worker.id} although "
                f"{dying.id} died: sessions {pool.sessions()}, "
                f"workers {[w.id for w in pool.workers()]}"
            )
        return None
    finally:
        await _shut_down(pool)


async def test_a_worker_dying_as_it_is_handed_to_a_waiter_is_never_pinned() -> None:
    """A waiting acquire must not pin its session to a worker that died meanwhile.

    At the cap, releasing a session hands its worker to the first waiter; if the
    worker's death is noticed after the hand-off but before the waiter runs, the
    pool retires the worker, yet the waiter pins it: the session stays pinned to a
    dead process that is in no ``workers()`` and no ``stats()`` row, every acquire of
    it returns that worker, ``check()`` passes and ``on_crash`` is never called.
    Which alignment of the exit and the release hits the window depends on how many
    loop iterations each path takes, so several are tried.
    """
    failures = [await _hand_a_dying_worker_to_a_waiter(delay) for delay in range(8)]
    assert [f for f in failures if f] == []


async def test_shutdown_right_after_a_worker_is_retired_returns() -> None:
    """``release`` with ``worker_reuse=False`` then leaving ``async with pool`` must not hang.

    Retiring the worker wakes the maintenance loop; the shutdown that follows at
    once cancels it while its ``asyncio.wait_for`` is about to return, and on
    Python 3.11 ``wait_for`` then returns the result and drops the cancellation: the
    loop runs on and ``shutdown()`` waits for it forever.
    """
    pool = herd.Pool(factory(), min_workers=0, max_workers=1, worker_reuse=False)
    await pool.start()
    async with pool.acquire("s"):
        pass
    await pool.release("s")  # the worker is retired: the maintenance loop is woken
    assert await _shut_down(pool), "pool.shutdown() hung"
