"""A hypothesis state machine driving a pool of fake workers through its faults.

``tests/test_state_machine.py`` drives real processes through acquires, releases,
kills and waiters at the cap, a few examples at a time. This machine runs on
:mod:`herd.testing`'s fakes, so it affords hundreds of examples, and its rules
are the pool's fault paths: spawns that fail (the next one, whichever task makes
it), workers that crash (pinned, idle, or still serving a use of an ended
session), workers that answer their health probe badly until the pool gives up
on them, and ``check_worker`` on healthy, dead and unknown workers; with them,
acquires (kept open or closed at once, two at once of one ID), ends of uses and
of sessions, and a fake clock that evicts idle sessions.

A model keeps the pins (session ID -> worker ID), the open uses and what each
worker answers its probes. After every step the pool is let settle (refills
done, registry clean-up done), then checked: each live session maps to exactly
one worker and no worker serves two, the pool holds at most ``max_workers``,
``stats()`` adds up, no pinned worker is closed or dead, every worker the
factory made is in the pool or closed, and ``on_crash`` was called exactly for
the sessions whose worker died.

One event loop per example: hypothesis rules are synchronous, so each runs its
coroutine with ``loop.run_until_complete``; between steps the loop is stopped.
Only the public API is used (no private attribute of the pool, no task names).
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import herd
from herd.testing import FakeClock, FakeFactory, FakeWorker
from tests.helpers.pool_model import ModelMachine, Pin, Use

T = TypeVar("T")
Client = dict[str, Any]  # a FakeWorker's client

SESSION_IDS = ["s0", "s1", "s2", "s3"]
TTL = 30.0  # fake seconds
# No sum of these is exactly TTL, so the model never depends on whether an idle
# time of exactly TTL evicts (unspecified).
CLOCK_STEPS = (7.0, 13.0, TTL + 1)
BACKOFF = 0.001  # fake seconds after a failed spawn (spawn_backoff = spawn_backoff_max)
EXHAUSTED = 0.005  # real seconds an acquire the model says must time out waits
# Real seconds for what takes a few loop turns: generous, yet short enough that
# shrinking an example that fails by timing out stays within the test's timeout.
NOTICE = 0.5


class FaultMachine(ModelMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.factory = FakeFactory()
        self.min_workers = self.max_workers = self.min_idle = self.health_failures = 0
        self.reuse = True
        self.unhealthy: set[str] = set()  # workers told to fail their probes
        self.failed_probes: Counter[str] = Counter()  # failed probes in a row, by worker
        self.dead: list[str] = []  # workers that crashed or were declared dead, in order
        self.ever_pinned: set[str] = set()
        self.reports: list[str] = []  # what on_crash was called with
        self.expected_reports: list[str] = []

    # -- plumbing -----------------------------------------------------------------------

    async def on_crash(self, session_id: str) -> None:
        self.reports.append(session_id)

    def fake(self, worker_id: str) -> FakeWorker:
        return next(w for w in self.factory.spawned if w.id == worker_id)

    def live_ids(self) -> list[str]:
        """The pool's workers, oldest first: the same order whenever an example is
        replayed (worker IDs come from a counter shared by all examples)."""
        live = {w.id for w in self.p.workers()}
        return [w.id for w in self.factory.spawned if w.id in live]

    def wanted(self, stats: herd.PoolStats) -> int:
        busy = stats.total_workers - stats.available_workers
        return min(self.max_workers, max(self.min_workers, busy + self.min_idle))

    async def quiet(self) -> str | None:
        """What the pool has still to do before a step may be checked, if anything."""
        pool = self.p
        stats = pool.stats()
        if stats.starting_workers or stats.total_workers < self.wanted(stats):
            return "refill to min_workers and the spares"
        live = set(self.live_ids())
        if any((w.id in live) == w.closed for w in self.factory.spawned):
            return "retired workers to be closed"
        if await pool.registry.list() != pool.sessions():
            return "the registry to match the pins"
        if Counter(self.reports) != Counter(self.expected_reports):
            return f"on_crash: {self.reports} called, {self.expected_reports} expected"
        return None

    def settle(self) -> None:
        """Let the pool finish what a step set off (refills, closes, registry
        clean-up, on_crash), within NOTICE real seconds."""

        async def wait() -> None:
            deadline = self.loop.time() + NOTICE
            turns = 0
            while (busy := await self.quiet()) is not None:
                if self.loop.time() > deadline:
                    raise AssertionError(f"the pool did not settle: waiting for {busy}")
                if busy.startswith("refill") and self.p.stats().spawn_failures:
                    # The refill waits out its back-off on the pool's clock.
                    self.clock.advance(2 * BACKOFF)
                    await self.p.sweep()
                turns += 1
                await asyncio.sleep(0 if turns < 20 else 0.001)

        self.run(wait())

    @initialize(data=st.data())
    def start(self, data: st.DataObject) -> None:
        self.max_workers = data.draw(st.integers(1, 3), label="max_workers")
        self.min_workers = data.draw(st.integers(0, min(2, self.max_workers)), label="min")
        self.min_idle = data.draw(st.integers(0, 1), label="min_idle")
        self.reuse = data.draw(st.booleans(), label="worker_reuse")
        self.health_failures = data.draw(st.integers(1, 2), label="health_failures")
        pool: herd.Pool[Client] = herd.Pool(
            self.factory,
            min_workers=self.min_workers,
            max_workers=self.max_workers,
            min_idle=self.min_idle,
            ttl=TTL,
            health_interval=None,  # probes only when a rule says
            health_failures=self.health_failures,
            worker_reuse=self.reuse,
            on_crash=self.on_crash,
            acquire_timeout=None,
            idle_worker_timeout=None,
            spawn_backoff=BACKOFF,
            spawn_backoff_max=BACKOFF,
            clock=self.clock,
        )
        self.run(pool.start())
        self.pool = pool
        self.settle()

    def teardown(self) -> None:
        try:
            if self.pool is not None:
                self.run(asyncio.wait_for(self.pool.shutdown(), NOTICE))
                assert self.pool.workers() == []
                assert all(w.closed for w in self.factory.spawned), "a worker outlived the pool"
                assert all(u.session.ended for u in self.uses)
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    # -- the model ----------------------------------------------------------------------

    def predict(self, sid: str) -> str:
        """What an acquire of ``sid`` must do now: "ok", "exhausted" or "spawn-error"."""
        if sid in self.pins:
            return "ok"
        stats = self.p.stats()
        if stats.available_workers:
            return "ok"  # an idle worker is taken: no spawn
        if stats.total_workers + stats.starting_workers >= self.max_workers:
            return "exhausted"
        return "spawn-error" if self.factory.fail_next else "ok"

    def acquired(self, sid: str, session: herd.Session[Client]) -> Pin:
        """Check and record a successful acquire of ``sid``."""
        assert session.session_id == sid
        assert not session.closed
        assert not session.ended
        worker_id = session.worker.id
        pin = self.pins.get(sid)
        if pin is not None:
            assert worker_id == pin.worker_id, f"affinity broken for {sid}"
            return pin
        assert worker_id not in self.held(), f"{worker_id} given to two sessions"
        assert worker_id not in self.dead, f"{sid} pinned to dead worker {worker_id}"
        assert not self.fake(worker_id).closed, f"{sid} pinned to closed worker {worker_id}"
        if not self.reuse:
            assert worker_id not in self.ever_pinned, f"worker_reuse=False reused {worker_id}"
        self.ever_pinned.add(worker_id)
        pin = Pin(sid, worker_id, last_active=self.clock())
        self.pins[sid] = pin
        return pin

    def freed(self, worker_id: str) -> None:
        """A worker whose session ended with no use open: recycled, or retired."""
        rows = {row.id: row for row in self.p.stats().workers}
        if self.reuse:
            assert worker_id in rows, f"{worker_id} not recycled"
            assert rows[worker_id].state == "idle"
        else:
            assert worker_id not in rows, f"{worker_id} kept with worker_reuse=False"

    def end_pin(self, pin: Pin) -> None:
        """A release or an eviction of a live pin."""
        del self.pins[pin.sid]
        pin.ended = True
        if not self.open_uses(pin):
            self.freed(pin.worker_id)

    def use_closed(self, use: Use) -> None:
        self.uses.remove(use)
        pin = use.pin
        if pin.crashed or self.open_uses(pin):
            return
        pin.last_active = self.clock()
        if pin.ended:
            self.freed(pin.worker_id)

    def died(self, worker_id: str) -> None:
        """A worker died (crash, or declared dead): check and record the crash path."""
        self.dead.append(worker_id)
        assert worker_id not in self.live_ids(), f"{worker_id} still in the pool"
        assert worker_id not in self.p.sessions().values()
        pins = [p for p in self.pins.values() if p.worker_id == worker_id]
        pins += [p for p in self.lingering() if p.worker_id == worker_id]
        for pin in pins:
            if self.pins.get(pin.sid) is pin:
                del self.pins[pin.sid]
            pin.ended = pin.crashed = True
            self.expected_reports.append(pin.sid)
            for use in self.uses:
                if use.pin is pin:
                    assert use.session.ended
                    with pytest.raises(herd.WorkerDeadError) as dead:
                        use.session.check()
                    assert dead.value.worker_id == worker_id
        [crash] = [c for c in self.p.stats().recent_crashes if c.worker_id == worker_id]
        assert crash.session_id == (pins[0].sid if pins else None)

    # -- rules: sessions ----------------------------------------------------------------

    @rule(sid=st.sampled_from(SESSION_IDS), keep=st.booleans())
    def acquire(self, sid: str, keep: bool) -> None:
        """Await a use (kept open) or take one with ``async with`` (closed at once)."""
        pool = self.p
        expected = self.predict(sid)
        if expected == "exhausted":
            with pytest.raises(herd.PoolExhaustedError) as exhausted:
                self.run(pool.acquire(sid, timeout=EXHAUSTED))
            assert exhausted.value.session_id == sid
        elif expected == "spawn-error":
            with pytest.raises(herd.SpawnError, match="fake spawn failure"):
                self.run(pool.acquire(sid, timeout=NOTICE))
            stats = pool.stats()
            assert stats.spawn_failures >= 1
            assert stats.last_spawn_error is not None
            assert sid not in pool.sessions()
            self.clock.advance(2 * BACKOFF)  # past the back-off: spawns work again
        elif keep:
            session = self.run(pool.acquire(sid, timeout=NOTICE))
            self.uses.append(Use(session, self.acquired(sid, session)))
        else:

            async def use_once() -> herd.Session[Client]:
                async with pool.acquire(sid, timeout=NOTICE) as session:
                    self.acquired(sid, session)
                return session

            session = self.run(use_once())
            assert session.closed
            pin = self.pins[sid]
            if not self.open_uses(pin):
                pin.last_active = self.clock()
        self.settle()

    @rule(sid=st.sampled_from(SESSION_IDS))
    def acquire_twice_at_once(self, sid: str) -> None:
        """Two concurrent acquires of one ID get one worker (singleflight)."""
        if self.predict(sid) != "ok":
            return  # failures are the plain acquire's business

        async def both() -> tuple[herd.Session[Client], herd.Session[Client]]:
            got = await asyncio.gather(
                self.p.acquire(sid, timeout=NOTICE), self.p.acquire(sid, timeout=NOTICE)
            )
            return got[0], got[1]

        first, second = self.run(both())
        assert first.worker.id == second.worker.id
        pin = self.acquired(sid, first)
        self.uses += [Use(first, pin), Use(second, pin)]
        self.settle()

    @precondition(lambda self: self.uses)
    @rule(data=st.data(), release=st.booleans())
    def end_use(self, data: st.DataObject, release: bool) -> None:
        """``session.close()`` ends a use; ``session.release()`` its session too
        (unless the ID was pinned anew since: an old handle leaves that pin alone)."""
        use = data.draw(st.sampled_from(self.uses))
        self.run(use.session.release() if release else use.session.close())
        assert use.session.closed
        pin = use.pin
        if release and self.pins.get(pin.sid) is pin:
            self.uses.remove(use)
            self.end_pin(pin)
        else:
            self.use_closed(use)
        if release:
            assert use.session.ended
        self.settle()

    @rule(sid=st.sampled_from(SESSION_IDS))
    def release(self, sid: str) -> None:
        """``pool.release(sid)``: the session ends, its worker is freed once unused."""
        self.run(self.p.release(sid))
        pin = self.pins.get(sid)
        if pin is not None:
            self.end_pin(pin)
        assert sid not in self.p.sessions()
        self.settle()

    @rule(seconds=st.sampled_from(CLOCK_STEPS))
    def time_passes(self, seconds: float) -> None:
        """Advance the fake clock and sweep: sessions unused for ``ttl`` are evicted,
        sessions with an open use never."""
        self.clock.advance(seconds)
        self.run(self.p.sweep())
        now = self.clock()
        for pin in list(self.pins.values()):
            if not self.open_uses(pin) and now - pin.last_active > TTL:
                self.end_pin(pin)
        self.settle()

    # -- rules: faults ------------------------------------------------------------------

    @precondition(lambda self: self.pool is not None and self.pool.workers())
    @rule(data=st.data())
    def crash_a_worker(self, data: st.DataObject) -> None:
        """A worker dies (pinned, idle or ending): the pool notices at once."""
        worker_id = data.draw(st.sampled_from(self.live_ids()))
        self.fake(worker_id).crash("crashed by the machine")

        async def noticed() -> None:
            deadline = self.loop.time() + NOTICE
            while worker_id in self.live_ids():
                assert self.loop.time() < deadline, f"the death of {worker_id} went unnoticed"
                await asyncio.sleep(0)

        self.run(noticed())
        self.died(worker_id)
        self.settle()

    @precondition(lambda self: self.pool is not None and not self.factory.fail_next)
    @rule()
    def next_spawn_fails(self) -> None:
        """The next spawn, whoever asks for it (an acquire, a refill), fails."""
        self.factory.fail_next = 1
        self.settle()

    @precondition(lambda self: self.pool is not None and self.pool.workers())
    @rule(data=st.data(), healthy=st.booleans())
    def set_health(self, data: st.DataObject, healthy: bool) -> None:
        """A worker starts (or stops) answering its health probe badly."""
        worker_id = data.draw(st.sampled_from(self.live_ids()))
        self.fake(worker_id).healthy_answer = healthy
        if healthy:
            self.unhealthy.discard(worker_id)
        else:
            self.unhealthy.add(worker_id)

    @precondition(lambda self: self.pool is not None)
    @rule()
    def check_health(self) -> None:
        """Probe every worker: a bad answer counts, ``health_failures`` in a row is
        death (no interval: no minimum spell); a good answer starts the count over."""
        live = self.live_ids()
        self.run(self.p.check_health())
        dying = []
        for worker_id in live:
            if worker_id in self.unhealthy:
                self.failed_probes[worker_id] += 1
                if self.failed_probes[worker_id] >= self.health_failures:
                    dying.append(worker_id)
            else:
                self.failed_probes[worker_id] = 0
        for worker_id in dying:
            self.died(worker_id)
        assert set(self.live_ids()) >= set(live) - set(dying), "a worker died of nothing"
        self.settle()

    @precondition(lambda self: self.pool is not None)
    @rule(data=st.data(), case=st.sampled_from(["healthy", "dead", "unknown"]))
    def check_worker(self, data: st.DataObject, case: str) -> None:
        """``check_worker``: ``True`` for a healthy worker (its failure count starts
        over), ``False`` for a dead one (crash path at once) or one not in the pool.

        (An alive but unhealthy worker costs a 0.25 s grace wait per call: the
        ``check_health`` rule probes those.)
        """
        pool = self.p
        healthy = [w for w in self.live_ids() if w not in self.unhealthy]
        if case == "healthy" and healthy:
            worker_id = data.draw(st.sampled_from(healthy))
            assert self.run(pool.check_worker(worker_id)) is True
            self.failed_probes[worker_id] = 0
            assert worker_id in self.live_ids()
        elif case == "dead" and self.live_ids():
            worker_id = data.draw(st.sampled_from(self.live_ids()))
            self.fake(worker_id).crash("died before the probe")
            assert self.run(pool.check_worker(worker_id)) is False
            self.died(worker_id)
        else:
            gone = self.dead or ["no-such-worker"]
            sessions = pool.sessions()
            assert self.run(pool.check_worker(data.draw(st.sampled_from(gone)))) is False
            assert pool.sessions() == sessions
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
        live = set(self.live_ids())
        for sid, worker_id in sessions.items():
            assert worker_id in live, f"{sid} pinned to {worker_id}, not in the pool"
            assert worker_id not in self.dead, f"{sid} pinned to dead {worker_id}"
            assert not self.fake(worker_id).closed, f"{sid} pinned to closed {worker_id}"
        assert self.run(self.pool.registry.list()) == sessions

    @invariant()
    def stats_add_up(self) -> None:
        if self.pool is None:
            return
        pool = self.pool
        stats = pool.stats()
        rows = {row.id: row for row in stats.workers}
        states = Counter(row.state for row in rows.values())
        assert stats.state == "ready"
        assert set(states) <= {"idle", "pinned", "ending"}, states
        assert stats.total_workers == len(rows) == len(pool.workers())
        assert stats.total_workers == states["idle"] + states["pinned"] + states["ending"]
        assert stats.total_workers + stats.starting_workers <= self.max_workers
        assert stats.available_workers == states["idle"] == pool.idle_count
        assert stats.active_sessions == states["pinned"] == len(pool.sessions())
        assert (stats.starting_workers, stats.inflight_acquires, stats.waiting_for_worker) == (
            0,
            0,
            0,
        )
        assert stats.total_workers >= self.wanted(stats), "below min_workers after settling"
        assert {r.session_id: r.id for r in rows.values() if r.state == "pinned"} == (
            pool.sessions()
        )
        ending = {r.id: r.session_id for r in rows.values() if r.state == "ending"}
        assert ending == {p.worker_id: p.sid for p in self.lingering()}
        held = list(self.pins.values()) + self.lingering()
        assert {p.worker_id: self.open_uses(p) for p in held} == {
            r.id: r.open_uses for r in rows.values() if r.session_id is not None
        }
        assert not rows.keys() & set(self.dead), "stats list a dead worker"
        if not self.reuse:
            idle = {r.id for r in rows.values() if r.state == "idle"}
            assert not idle & self.ever_pinned, "worker_reuse=False kept a used worker"

    @invariant()
    def no_worker_is_leaked(self) -> None:
        if self.pool is None:
            return
        live = set(self.live_ids())
        for worker in self.factory.spawned:
            assert (worker.id in live) != worker.closed, f"{worker.id}: leaked or closed"

    @invariant()
    def on_crash_was_told_of_every_death_of_a_session_worker(self) -> None:
        assert Counter(self.reports) == Counter(self.expected_reports)


# ~15 s on an idle 2-core machine; the default 60 s timeout is too tight when the
# machine is busy (3 times slower with both cores taken by other work).
@pytest.mark.timeout(180)
def test_pool_fault_machine() -> None:
    run_state_machine_as_test(  # type: ignore[no-untyped-call]
        FaultMachine,
        settings=settings(
            max_examples=int(os.environ.get("HERD_TEST_EXAMPLES", "300")),
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
