"""Test helpers for code that uses herd: in-process fake workers and a fake clock.

Use them in your own tests where starting real processes is not the point::

    from herd.testing import FakeClock, FakeFactory

    clock = FakeClock()
    factory = FakeFactory()
    async with herd.Pool(factory, ttl=60, clock=clock) as pool:
        async with pool.acquire("s1") as session:
            session.worker.client["answer"] = 42   # each fake worker's client is a dict
        clock.advance(61)
        await pool.sweep()                          # the session is evicted

herd's own tests run real subprocesses; these fakes are for benchmarks of the
pool's bookkeeping at scales no machine can run as processes (10,000 sessions),
and for users' unit tests.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from ._exceptions import SpawnError

__all__ = ["FakeClock", "FakeFactory", "FakeWorker"]


class FakeClock:
    """A monotonic clock that moves only when told to: pass it as ``Pool(clock=...)``."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds``."""
        if seconds < 0:
            raise ValueError("a monotonic clock cannot go back")
        self.now += seconds


class FakeWorker:
    """A :class:`herd.Worker` with no process: its ``client`` is a plain dict.

    :meth:`crash` makes it die as a real worker would (the pool's exit watch
    fires); :attr:`healthy_answer` decides what health checks see: ``True``,
    ``False``, or an :class:`OSError` to raise, as a probe that could not be
    made on the pool's side does (``OSError(errno.EMFILE, ...)``: no descriptor
    left), which the pool counts as no answer at all.
    """

    _ids = itertools.count(1)

    def __init__(self) -> None:
        self.id = f"fake-{next(self._ids)}"
        self.address = ""
        self.pid: int | None = None
        self.client: dict[str, Any] = {}
        self.healthy_answer: bool | OSError = True
        self.closed = False
        self._dead: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def healthy(self) -> bool:
        """:attr:`healthy_answer` (raised if an :class:`OSError`), or ``False`` once dead."""
        if self._dead.done():
            return False
        if isinstance(self.healthy_answer, OSError):
            raise self.healthy_answer
        return self.healthy_answer

    async def wait(self) -> str:
        """Return when :meth:`crash` or :meth:`close` is called."""
        return await asyncio.shield(self._dead)

    def crash(self, reason: str = "crashed") -> None:
        """Die now, as if the process had exited."""
        if not self._dead.done():
            self._dead.set_result(reason)

    async def close(self) -> None:
        """Mark closed; idempotent."""
        self.closed = True
        self.crash("closed")

    def __repr__(self) -> str:
        return f"<FakeWorker {self.id}>"


class FakeFactory:
    """A :class:`herd.WorkerFactory` of :class:`FakeWorker`.

    :param spawn_delay: seconds each spawn takes (``0``: no await at all).
    :param worker_class: what each spawn makes: :class:`FakeWorker` or a subclass
        that misbehaves as a test needs (a probe that raises, a ``limit_breach``).
    :ivar spawned: every worker made so far, in order.
    :ivar fail_next: how many upcoming spawns raise :class:`herd.SpawnError`.
    """

    def __init__(
        self, *, spawn_delay: float = 0.0, worker_class: type[FakeWorker] = FakeWorker
    ) -> None:
        self.spawn_delay = spawn_delay
        self.worker_class = worker_class
        self.spawned: list[FakeWorker] = []
        self.fail_next = 0

    async def spawn(self) -> FakeWorker:
        """Make a worker (after ``spawn_delay``), or fail if ``fail_next`` says so."""
        if self.spawn_delay:
            await asyncio.sleep(self.spawn_delay)
        if self.fail_next > 0:
            self.fail_next -= 1
            raise SpawnError("fake spawn failure", command=["fake"])
        worker = self.worker_class()
        self.spawned.append(worker)
        return worker
