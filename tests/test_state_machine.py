"""A hypothesis state machine driving a real pool with random operations.

Rules acquire, close, release, SIGKILL workers and advance a fake clock past
the TTL; after every step the invariants are checked against a model and
against the pool's own view (one worker per session, never a worker shared,
never more than ``max_workers``, stats consistent with live processes).
"""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import herd
from herd.testing import FakeClock
from tests.helpers import factory, pid_alive, wait_until

SESSION_IDS = st.sampled_from([f"s{i}" for i in range(5)])
TTL = 30.0


@dataclass
class Handle:
    session: herd.Session[Any]
    generation: int  # which pin of the session ID this use belongs to


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = FakeClock()
        self.pool: herd.Pool[Any] | None = None
        self.pins: dict[str, tuple[str, int]] = {}  # model: sid -> (worker id, generation)
        self.handles: list[Handle] = []
        self.generation = 0
        self.crashed: set[int] = set()  # generations whose worker was killed
        self.max_workers = 2

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    @initialize(
        min_workers=st.integers(0, 1),
        max_workers=st.integers(2, 3),
        worker_reuse=st.booleans(),
    )
    def start(self, min_workers: int, max_workers: int, worker_reuse: bool) -> None:
        self.max_workers = max_workers

        async def make() -> herd.Pool[Any]:
            pool = herd.Pool(
                factory(),
                min_workers=min_workers,
                max_workers=max_workers,
                ttl=TTL,
                health_interval=None,
                idle_worker_timeout=None,
                worker_reuse=worker_reuse,
                acquire_timeout=0.3,
                clock=self.clock,
            )
            await pool.start()
            return pool

        self.pool = self.run(make())

    def teardown(self) -> None:
        if self.pool is not None:
            self.run(self.pool.shutdown())
        self.loop.close()

    # -- the model --------------------------------------------------------------------

    def held_workers(self) -> int:
        """Workers nobody else may take: pinned, or released but with a use still open."""
        lingering = {
            (h.session.session_id, h.generation)
            for h in self.handles
            if self.pins.get(h.session.session_id, (None, -1))[1] != h.generation
            and h.generation not in self.crashed
        }
        return len(self.pins) + len(lingering)

    def open_uses(self, sid: str) -> int:
        generation = self.pins[sid][1]
        return sum(
            1 for h in self.handles if h.session.session_id == sid and h.generation == generation
        )

    # -- rules ------------------------------------------------------------------------

    @rule(sid=SESSION_IDS)
    def acquire(self, sid: str) -> None:
        assert self.pool is not None
        if sid in self.pins or self.held_workers() < self.max_workers:
            session = self.run(self.pool.acquire(sid))
            if sid in self.pins:
                assert session.worker.id == self.pins[sid][0], "affinity broken"
            else:
                assert session.worker.id not in {w for w, _ in self.pins.values()}
                self.generation += 1
                self.pins[sid] = (session.worker.id, self.generation)
            self.handles.append(Handle(session, self.pins[sid][1]))
        else:
            with pytest.raises(herd.PoolExhaustedError):
                self.run(self.pool.acquire(sid))

    @precondition(lambda self: self.handles)
    @rule(data=st.data())
    def close(self, data: st.DataObject) -> None:
        handle = self.handles.pop(data.draw(st.integers(0, len(self.handles) - 1)))
        self.run(handle.session.close())

    @rule(sid=SESSION_IDS)
    def release(self, sid: str) -> None:
        assert self.pool is not None
        self.run(self.pool.release(sid))
        self.pins.pop(sid, None)

    @precondition(lambda self: self.handles)
    @rule(data=st.data())
    def release_handle(self, data: st.DataObject) -> None:
        handle = self.handles.pop(data.draw(st.integers(0, len(self.handles) - 1)))
        self.run(handle.session.release())
        sid = handle.session.session_id
        if self.pins.get(sid, (None, -1))[1] == handle.generation:
            del self.pins[sid]  # an old handle never ends a newer pin

    @precondition(lambda self: self.pins)
    @rule(data=st.data())
    def kill_worker(self, data: st.DataObject) -> None:
        assert self.pool is not None
        sid = data.draw(st.sampled_from(sorted(self.pins)))
        worker_id, generation = self.pins.pop(sid)
        worker = next(w for w in self.pool.workers() if w.id == worker_id)
        os.killpg(worker.pid, signal.SIGKILL)
        pool = self.pool
        self.run(wait_until(lambda: sid not in pool.sessions(), timeout=5, what="unpin"))
        self.crashed.add(generation)
        for handle in self.handles:
            if handle.generation == generation:
                assert handle.session.ended
                with pytest.raises(herd.WorkerDeadError):
                    handle.session.check()

    @rule()
    def ttl_passes(self) -> None:
        assert self.pool is not None
        self.clock.advance(TTL + 1)
        self.run(self.pool.sweep())
        for sid in list(self.pins):
            if self.open_uses(sid) == 0:
                del self.pins[sid]  # evicted; an open use keeps a session

    # -- invariants -------------------------------------------------------------------

    @invariant()
    def pool_matches_model(self) -> None:
        if self.pool is None:
            return
        sessions = self.pool.sessions()
        assert sessions == {sid: worker for sid, (worker, _) in self.pins.items()}
        assert len(set(sessions.values())) == len(sessions), "a worker pinned to two sessions"

    @invariant()
    def stats_match_reality(self) -> None:
        if self.pool is None:
            return
        stats = self.pool.stats()
        assert stats.total_workers + stats.starting_workers <= self.max_workers
        assert stats.active_sessions == len(self.pool.sessions())
        pinned = {row.session_id: row.id for row in stats.workers if row.state == "pinned"}
        assert pinned == self.pool.sessions()
        ending = [row for row in stats.workers if row.state == "ending"]
        assert len(ending) == self.held_workers() - len(self.pins)
        for row in stats.workers:
            assert row.pid is not None
            assert pid_alive(row.pid), f"stats list dead worker {row.id}"
            assert (row.state in ("pinned", "ending")) == (row.session_id is not None)


PoolMachine.TestCase.settings = settings(
    max_examples=30,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.timeout(240)
def test_pool_state_machine() -> None:
    PoolMachine.TestCase().runTest()
