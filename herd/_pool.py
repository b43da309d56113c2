"""Pool: session-affine acquire and release over a fleet of workers.

Data flow::

    acquire(sid) ──> _pins[sid]? ── yes ──> Session (fast path: a dict hit, no await)
                        │ no
                        v
               _pending[sid] (singleflight: one _pin_new task per new ID,
                        │     every concurrent caller awaits the same task)
                        v
               _obtain_worker(): idle deque ──> spawn (below max_workers)
                        │                    ──> FIFO wait (at max_workers)
                        │ (acquire(sid, spawn=f): _obtain_fresh(): f() below
                        │  max_workers; at it an idle spare is retired for room)
                        v
               pin: _pins[sid] = _Pin(slot) ──> registry.put(sid, worker.id)

    worker exits ──> _watch task (Worker.wait) ──> _worker_died: unpin, on_crash, refill
    maintenance loop (every tick, injected clock):
               ttl eviction of unused pins, retire surplus idle workers, refill to min,
               then registry deletes of ended sessions (_unregistered; kept on failure)
    health loop (every health_interval): Worker.healthy(); health_failures failed
               probes in a row (over (health_failures - 1) * health_interval) or an
               exited process ──> _worker_died

Background loops never die of an error: each logs a distinct error once and backs
off (:class:`_Trouble`). A registry that fails for a while delays only its own
clean-up (retried with a back-off), never eviction, retirement or refill.

Concurrency invariant: all state below lives on the event loop that started the
pool and is touched only from it, so code between two ``await`` points is a
critical section. The rules that keep the invariants true:

- a slot is in exactly one place: ``_idle`` (unpinned, ready), pinned to one
  ``_Pin``, handed to one waiter's future, or gone from ``_slots``;
- ``_pins[sid]`` is set before the first ``await`` after a worker is taken, so a
  second acquire of ``sid`` sees the pin (fast path) or the pending task
  (singleflight) — never neither, so one ID never pins two workers;
- capacity is ``len(_slots) + _spawning``; a spawn increments ``_spawning``
  before its first await, so concurrent acquires never overshoot ``max_workers``;
- a released pin with open uses keeps its slot until the last use closes, so
  two sessions never share a worker at the same time.

Prior art: the Go original's pool (mutex + map + channel of idle workers) and
anyio's ``to_process`` worker pool (idle workers pruned after a maximum idle time).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import errno
import inspect
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Generic, Literal

from ._config import Duration, PoolConfig, duration_seconds, required_seconds
from ._exceptions import (
    PoolClosedError,
    PoolExhaustedError,
    SpawnError,
)
from ._protocols import (
    C,
    ExitAware,
    LimitAware,
    SandboxReporting,
    SessionRegistry,
    Worker,
    WorkerFactory,
)
from ._session import AcquireContext, Session, session_tag, validate_session_id
from ._stats import CrashInfo, PoolStats, Sampler, WorkerStats
from .registry.memory import MemoryRegistry

if TYPE_CHECKING:
    from ._sandbox import SandboxReport

__all__ = ["Pool", "PoolState", "WorkerState"]

log = logging.getLogger("herd.pool")

CrashCallback = Callable[[str], Any]


class _Unset(enum.Enum):
    """The type of :data:`_UNSET`: "not given" where ``None`` means something."""

    UNSET = "unset"


_UNSET = _Unset.UNSET
Unset = Literal[_Unset.UNSET]

# A health probe that raised OSError with one of these could not be made on the
# pool's side (out of file descriptors, buffers or local ports): it says nothing
# of the worker, so it counts neither for nor against it.
_LOCAL_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL}
)


#: How long :meth:`Pool.check_worker` waits for a failing worker's exit to be seen.
_EXIT_GRACE = 0.25


def _failed_locally(result: object) -> bool:
    return isinstance(result, OSError) and result.errno in _LOCAL_ERRNOS


class _Trouble:
    """The failures in a row of one background job: a distinct error is logged
    once, and the job is told how long to back off (``first`` seconds, doubling up
    to ``most``), so a registry down for an hour neither stops the pool nor floods
    its log."""

    __slots__ = ("_first", "_most", "_seen", "failures", "what")

    def __init__(self, what: str, *, first: float, most: float = 30.0) -> None:
        self.what = what
        self._first = first
        self._most = max(most, first)
        self._seen: set[tuple[type[BaseException], str]] = set()  # errors logged this streak
        self.failures = 0

    def failed(self, exc: BaseException) -> float:
        """Note one failure; the seconds to wait before the next try."""
        self.failures += 1
        delay = min(self._first * 2.0 ** min(self.failures - 1, 20), self._most)
        key = (type(exc), str(exc))
        if key in self._seen or len(self._seen) >= 16:
            log.debug("%s failed again (%d in a row): %r", self.what, self.failures, exc)
        else:
            self._seen.add(key)
            retry = f"; next try in {delay:.2g}s" if delay else ""
            log.error(
                "%s failed (%d in a row%s; each distinct error is logged once): %r",
                self.what,
                self.failures,
                retry,
                exc,
                exc_info=exc,
            )
        return delay

    def recovered(self) -> None:
        """The job succeeded: the next failure is news again."""
        if self.failures:
            log.info("%s works again after %d failure(s)", self.what, self.failures)
        self.failures = 0
        self._seen.clear()


def _with_breach(worker: Worker[Any], reason: str) -> str:
    """``reason``, plus the cgroup limit the worker ran into if it can tell."""
    found = worker.limit_breach() if isinstance(worker, LimitAware) else None
    if found and found.startswith("killed:"):
        return str(found)  # the worker is dead for that reason, however we noticed
    return f"{reason} ({found})" if found else reason


class PoolState(enum.Enum):
    """Lifecycle of a :class:`Pool`; it never goes back to an earlier state."""

    UNOPENED = "unopened"  # built; start() not called yet
    STARTING = "starting"  # start() is spawning min_workers
    READY = "ready"  # serving acquires
    CLOSING = "closing"  # shutdown() running: refuses acquires, stopping workers
    CLOSED = "closed"  # every worker and task stopped


class WorkerState(enum.Enum):
    """Lifecycle of one worker inside the pool."""

    IDLE = "idle"  # ready, pinned to no session, in _idle (or handed to a waiter)
    PINNED = "pinned"  # serving exactly one session
    DRAINING = "draining"  # removed from the pool, being closed
    CLOSED = "closed"  # gone


class _Slot(Generic[C]):
    """The pool's record of one live worker."""

    __slots__ = (
        "created",
        "failing_since",
        "idle_since",
        "pin",
        "probe_failures",
        "state",
        "watch",
        "worker",
    )

    def __init__(self, worker: Worker[C], now: float) -> None:
        self.worker = worker
        self.state = WorkerState.IDLE
        self.pin: _Pin[C] | None = None  # set iff state is PINNED
        self.created = now
        self.idle_since = now
        self.watch: asyncio.Task[None] | None = None
        self.probe_failures = 0  # failed health probes in a row
        self.failing_since = 0.0  # loop time of the first of them


class _Pin(Generic[C]):
    """A session pinned to a slot."""

    __slots__ = ("death", "ended", "last_active", "session_id", "slot", "used", "uses")

    def __init__(self, session_id: str, slot: _Slot[C], now: float) -> None:
        self.session_id = session_id
        self.slot = slot
        self.uses = 0  # open Session objects; > 0 means never evicted
        self.used = False  # a caller got a Session of it (else every caller gave up)
        self.last_active = now  # when the last use ended (or the pin was made)
        self.ended = False  # released, evicted or crashed: no new uses
        self.death: str | None = None  # why the worker died, if that ended the pin


class _Pending(Generic[C]):
    """A first acquire of a session ID in flight, shared by all its callers."""

    __slots__ = ("callers", "task")

    def __init__(self, task: asyncio.Task[_Pin[C]]) -> None:
        self.task = task
        self.callers = 0  # when the last caller gives up, the task is cancelled


class Pool(Generic[C]):
    """A pool of workers where every session ID is pinned to one worker.

    :param factory: starts workers (:class:`herd.ProcessFactory`, or your own
        :class:`herd.WorkerFactory`).
    :param min_workers: workers kept running and healthy, even with no session.
    :param max_workers: the most workers alive at once.
    :param min_idle: idle workers kept ready on top of the pinned ones, so a new
        session takes a started worker instead of waiting for a spawn; the pool
        refills them in the background, one spawn at a time (within ``max_workers``).
    :param refill_delay: seconds to wait after a spare was last taken before
        starting its replacement, so a burst of new sessions does not share the
        CPU with spawns; ``0``/``None`` refills at once.
    :param ttl: seconds a session may go unused (no open use) before it is ended;
        ``0``/``None`` never evicts.
    :param health_interval: seconds between health checks; ``0``/``None`` disables
        them (a worker's exit is noticed at once regardless).
    :param health_failures: failed health probes in a row, over at least
        ``(health_failures - 1) * health_interval`` seconds, before a worker whose
        process still runs is declared dead (default 3: a worker busy in a
        blocking handler for a few seconds is not killed with its session's
        state). A worker whose process exited, or that failed a probe while at a
        cgroup limit, is dead at once. A probe the pool could not make on its own
        side (``healthy()`` raising :class:`OSError` ``EMFILE``, ``ENFILE``,
        ``ENOBUFS``, ``ENOMEM`` or ``EADDRNOTAVAIL``) counts for nothing.
    :param worker_reuse: ``False``: a worker whose session ended is killed instead of
        being handed to another session.
    :param on_crash: called with the session ID when a worker dies while pinned.
        A coroutine function runs as a task; a plain function runs in a thread, so
        a slow callback never stalls the pool. Exceptions are logged.
    :param registry: where session owners are recorded; in memory by default.
    :param acquire_timeout: default seconds :meth:`acquire` waits for a worker;
        ``0``/``None`` waits as long as the caller does.
    :param idle_worker_timeout: seconds before an idle worker above
        ``min_workers`` is retired; ``0``/``None`` keeps them.
    :param spawn_backoff: seconds to wait after a failed spawn before the next;
        doubles with each failure in a row.
    :param spawn_backoff_max: the longest wait between spawn attempts.
    :param clock: monotonic seconds for TTL and idle times; inject a fake clock in
        tests, then call :meth:`sweep`.
    :param config: all of the above but ``factory``, ``on_crash``, ``registry``
        and ``clock``, as one :class:`herd.PoolConfig` (then give none of them as
        keywords).
    :raises ValueError: a bad option (``min_workers < 0``, ``max_workers < 1``,
        ``max_workers < min_workers``, a negative duration).
    :raises TypeError: ``config`` together with keywords it covers.

    Use it as an async context manager::

        async with herd.Pool(factory, min_workers=1, max_workers=4) as pool:
            async with pool.acquire("user-42") as session:
                reply = await session.worker.client.get("/")
    """

    def __init__(
        self,
        factory: WorkerFactory[C],
        *,
        min_workers: int = 1,
        max_workers: int = 10,
        min_idle: int = 0,
        ttl: Duration = 300.0,
        health_interval: Duration = 5.0,
        health_failures: int = 3,
        worker_reuse: bool = True,
        on_crash: CrashCallback | None = None,
        registry: SessionRegistry | None = None,
        acquire_timeout: Duration = 30.0,
        idle_worker_timeout: Duration = 60.0,
        refill_delay: Duration = None,
        spawn_backoff: Duration = 0.5,
        spawn_backoff_max: Duration = 30.0,
        clock: Callable[[], float] = time.monotonic,
        config: PoolConfig | None = None,
    ) -> None:
        given = PoolConfig(
            min_workers=min_workers,
            max_workers=max_workers,
            min_idle=min_idle,
            ttl=duration_seconds("ttl", ttl),
            health_interval=duration_seconds("health_interval", health_interval),
            health_failures=health_failures,
            worker_reuse=worker_reuse,
            acquire_timeout=duration_seconds("acquire_timeout", acquire_timeout),
            idle_worker_timeout=duration_seconds("idle_worker_timeout", idle_worker_timeout),
            refill_delay=duration_seconds("refill_delay", refill_delay),
            spawn_backoff=required_seconds("spawn_backoff", spawn_backoff),
            spawn_backoff_max=required_seconds("spawn_backoff_max", spawn_backoff_max),
        )
        if config is not None:
            if not isinstance(config, PoolConfig):
                raise TypeError(f"config must be a herd.PoolConfig, not {config!r}")
            if given != PoolConfig():
                changed = [
                    field.name
                    for field in dataclasses.fields(PoolConfig)
                    if getattr(given, field.name) != getattr(PoolConfig(), field.name)
                ]
                raise TypeError(
                    f"give the pool's options either in config or as keywords, not both "
                    f"(keywords given: {', '.join(changed)})"
                )
            given = config
        self.config = given
        if on_crash is not None and not callable(on_crash):
            raise TypeError(f"on_crash must be callable, not {on_crash!r}")
        self.factory = factory
        self.registry: SessionRegistry = registry if registry is not None else MemoryRegistry()
        self._on_crash = on_crash
        self._clock = clock
        self._state = PoolState.UNOPENED
        # Worker bookkeeping; see the module docstring for who moves slots where.
        self._slots: dict[str, _Slot[C]] = {}  # every live worker, by worker ID
        self._idle: deque[_Slot[C]] = deque()  # IDLE slots; oldest first
        self._spawning = 0  # spawns in flight (they count against max_workers)
        self._waiters: deque[asyncio.Future[_Slot[C] | None]] = deque()  # FIFO at the cap
        # Session bookkeeping.
        self._pins: dict[str, _Pin[C]] = {}
        self._pending: dict[str, _Pending[C]] = {}
        # Ended sessions still to delete from the registry (ID -> the worker they
        # had); the maintenance loop does it, and keeps what failed for next time.
        self._unregistered: dict[str, str] = {}
        self._registry_trouble = _Trouble("registry clean-up", first=self._tick())
        self._registry_retry_at = 0.0  # loop time; no clean-up before it after a failure
        self._probe_trouble = _Trouble("health probes on the pool's side", first=0.0)
        self._refill_trouble = _Trouble("refill", first=0.0)
        # Spawn failure back-off: no spawn before _backoff_until (loop time).
        self._failures = 0
        self._backoff_until = 0.0
        self._last_spawn_error: SpawnError | None = None
        # Background work.
        self._tasks: set[asyncio.Task[Any]] = set()  # cancelled at shutdown
        self._closing: set[asyncio.Task[None]] = set()  # worker closes: awaited, never cancelled
        self._wake = asyncio.Event()
        self._refilling = False
        self._last_take = 0.0  # loop time a spare was last taken (for refill_delay)
        self._closed = asyncio.Event()
        self._sampler: Sampler | None = None
        self._crashes: deque[CrashInfo] = deque(maxlen=20)
        self._report: SandboxReport | Unset | None = _UNSET  # the factory's, read once

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def state(self) -> PoolState:
        """Where the pool is in its lifecycle."""
        return self._state

    async def start(self) -> None:
        """Spawn ``min_workers`` (or ``min_idle``, if more) and start the background tasks.

        Called by ``async with pool``. A pool starts once; a closed pool cannot be
        restarted.

        :raises herd.SpawnError: the first workers could not be started (the pool
            is then closed, with nothing left running).
        :raises herd.PoolClosedError: the pool was already started or closed.
        """
        if self._state is not PoolState.UNOPENED:
            raise PoolClosedError(f"pool cannot be started: it is {self._state.value}")
        self._state = PoolState.STARTING
        self._sampler = Sampler()
        try:
            async with asyncio.TaskGroup() as group:
                spawns = [group.create_task(self._spawn_slot()) for _ in range(self._wanted())]
        except BaseExceptionGroup as failed:
            await self.shutdown()
            raise failed.exceptions[0] from None
        except BaseException:
            await self.shutdown()
            raise
        for spawn in spawns:
            self._make_idle(spawn.result())
        self._state = PoolState.READY
        self._background(self._maintenance_loop())
        if self.config.health_interval:
            self._background(self._health_loop(self.config.health_interval))
        # Detection runs probe processes if no spawn has done it yet: off the loop.
        report = await asyncio.to_thread(self._sandbox_report)
        log.info(
            "pool ready: %d worker(s), max %d; sandbox %s",
            len(self._slots),
            self.config.max_workers,
            f"{report.level} ({report.reason})" if report is not None else "unknown",
        )

    async def shutdown(self) -> None:
        """Stop every worker and background task; idempotent.

        Pending and waiting acquires fail with :class:`~herd.PoolClosedError`;
        later acquires too. The stop runs to completion even if the awaiting
        task is cancelled.
        """
        if self._state is PoolState.CLOSED:
            return
        if self._state is PoolState.CLOSING:
            await self._closed.wait()
            return
        self._state = PoolState.CLOSING
        closing = asyncio.get_running_loop().create_task(self._shutdown())
        await asyncio.shield(closing)

    aclose = shutdown

    async def _shutdown(self) -> None:
        current = asyncio.current_task()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(PoolClosedError("pool is shutting down"))
        self._waiters.clear()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        slots = list(self._slots.values())
        sessions = list(self._pins)
        self._slots.clear()
        self._idle.clear()
        for pin in self._pins.values():
            pin.ended = True
        self._pins.clear()
        for slot in slots:
            slot.state = WorkerState.DRAINING
        await asyncio.gather(*(self._close_worker(slot) for slot in slots))
        for session_id in {*sessions, *self._unregistered}:
            with contextlib.suppress(Exception):
                await self.registry.delete(session_id)
        self._unregistered.clear()
        await asyncio.gather(*self._tasks, *self._closing, return_exceptions=True)
        self._state = PoolState.CLOSED
        self._closed.set()
        log.info("pool closed: %d worker(s) stopped", len(slots))

    async def __aenter__(self) -> Pool[C]:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()

    def _check_open(self) -> None:
        if self._state is PoolState.READY or self._state is PoolState.STARTING:
            return
        if self._state is PoolState.UNOPENED:
            raise PoolClosedError(
                "pool is not started: use 'async with pool' or 'await pool.start()'"
            )
        raise PoolClosedError(f"pool is {self._state.value}")

    def _background(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- acquire / release --------------------------------------------------------------

    def acquire(
        self,
        session_id: str,
        *,
        timeout: Duration | Unset = _UNSET,
        spawn: Callable[[], Awaitable[Worker[C]]] | None = None,
    ) -> AcquireContext[C]:
        """Get a use of the session ``session_id``, pinning it to a worker if new.

        Await it (``session = await pool.acquire(sid)``, then ``await
        session.close()``) or use it as ``async with pool.acquire(sid) as session``.

        Concurrent first acquires of one new ID pin exactly one worker and all get
        it. At ``max_workers`` the call waits, in FIFO order, for a worker to free up.

        :param timeout: seconds to wait for a worker (default ``acquire_timeout``;
            ``None`` waits as long as the caller does).
        :param spawn: if the session is new, pin it to a worker started by this
            coroutine function instead of an idle one (a worker made for the
            session, say started in its directory). It counts against
            ``max_workers``; at the cap an idle spare is retired to make room. An
            existing session ignores it.
        :raises herd.InvalidSessionIdError: the ID is malformed.
        :raises herd.PoolExhaustedError: no worker became free within ``timeout``
            (also a :class:`TimeoutError`).
        :raises herd.SpawnError: a worker had to be started for the session and
            could not be (or spawning is backing off after failures).
        :raises herd.PoolClosedError: the pool is not running.
        """
        return AcquireContext(lambda: self._acquire(session_id, timeout, spawn))

    async def _acquire(
        self,
        session_id: str,
        timeout: Duration | Unset,
        spawn: Callable[[], Awaitable[Worker[C]]] | None = None,
    ) -> Session[C]:
        pin = self._pins.get(session_id)
        if pin is not None and self._state is PoolState.READY:
            pin.uses += 1  # fast path: a dict hit, no await, no validation needed
            pin.used = True
            return Session(pin, self)
        validate_session_id(session_id)
        self._check_open()
        if timeout is _UNSET:
            limit = self.config.acquire_timeout
        else:
            limit = duration_seconds("timeout", timeout)
        try:
            async with asyncio.timeout(limit):
                return await self._acquire_slow(session_id, spawn)
        except TimeoutError:
            raise PoolExhaustedError(
                f"no worker for session {session_id!r} within {limit:g}s: "
                f"{len(self._slots)} of max {self.config.max_workers} workers busy, "
                f"{self._spawning} starting, {len(self._waiters)} acquire(s) waiting",
                session_id=session_id,
                timeout=limit,
            ) from None

    async def _acquire_slow(
        self, session_id: str, spawn: Callable[[], Awaitable[Worker[C]]] | None
    ) -> Session[C]:
        while True:
            self._check_open()
            pin = self._pins.get(session_id)
            if pin is None:
                pending = self._pending.get(session_id)
                if pending is None:
                    pending = _Pending(self._background(self._pin_new(session_id, spawn)))
                    self._pending[session_id] = pending
                pending.callers += 1
                try:
                    # Shielded: one caller's timeout must not cancel the others' pin.
                    pin = await asyncio.shield(pending.task)
                except asyncio.CancelledError:
                    me = asyncio.current_task()
                    if pending.task.cancelled() and me is not None and not me.cancelling():
                        # Not our cancellation but the shared task's (shutdown): the
                        # loop's _check_open() says so, or we start over.
                        continue
                    if pending.callers == 1:
                        # The last caller leaves (a client gone, a timeout): a pin
                        # made as it left must not hold a worker for a departed client.
                        self._abandon(pending.task)
                    raise
                finally:
                    pending.callers -= 1
                    if pending.callers == 0 and not pending.task.done():
                        pending.task.cancel()  # nobody wants this session any more
                        if self._pending.get(session_id) is pending:
                            del self._pending[session_id]  # a newcomer starts afresh
            if not pin.ended:
                pin.uses += 1
                pin.used = True
                return Session(pin, self)
            # The pin ended (crash, release) between its making and our turn: retry.

    def _abandon(self, task: asyncio.Task[_Pin[C]]) -> None:
        """Every caller of a first acquire gave up: end the pin if it was made anyway.

        The pin task may have finished in the same loop turn as the last caller's
        cancellation (a worker freed up just as the client left); unless someone
        got a use of it since, the session is ended at once, not a TTL later.
        """
        if not task.done() or task.cancelled() or task.exception() is not None:
            return
        pin = task.result()
        if pin.used or pin.ended or self._pins.get(pin.session_id) is not pin:
            return
        log.debug(
            "session %s: every acquire gave up; unpinned at once", session_tag(pin.session_id)
        )
        self._end_pin(pin)
        self._unregister(pin.session_id, pin.slot.worker.id)

    async def _pin_new(
        self, session_id: str, spawn: Callable[[], Awaitable[Worker[C]]] | None = None
    ) -> _Pin[C]:
        try:
            if spawn is None:
                slot = await self._obtain_worker()
            else:
                slot = await self._obtain_fresh(spawn)
            if self._state is not PoolState.READY and self._state is not PoolState.STARTING:
                self._retire(slot, "pool closing")
                raise PoolClosedError(f"pool is {self._state.value}", session_id=session_id)
            pin = _Pin(session_id, slot, self._clock())
            slot.state = WorkerState.PINNED
            slot.pin = pin
            self._pins[session_id] = pin  # visible before the await below: singleflight holds
        finally:
            pending = self._pending.get(session_id)
            if pending is not None and pending.task is asyncio.current_task():
                del self._pending[session_id]
        try:
            # Awaiting while pinned: concurrent acquires of this ID take the fast path.
            await self.registry.put(session_id, slot.worker.id)
        except BaseException:
            self._end_pin(pin)
            raise
        log.debug("session %s pinned to worker %s", session_tag(session_id), slot.worker.id)
        return pin

    async def _obtain_worker(self) -> _Slot[C]:
        """An IDLE slot, taken off the idle deque; may spawn, or wait at the cap."""
        may_jump = False  # a woken waiter goes before those still queued behind it
        while True:
            self._check_open()
            first = may_jump or not self._waiters
            if self._idle and first:
                if self.config.min_idle:
                    self._last_take = asyncio.get_running_loop().time()
                    self._wake.set()  # a spare was taken: start its refill (after refill_delay)
                return self._idle.popleft()
            if self._capacity() > 0 and first:
                return await self._spawn_slot()
            slot = await self._wait_in_line()
            if slot is not None and slot.state is WorkerState.IDLE:
                return slot
            if slot is not None:  # it died between the hand-over and our turn
                may_jump = True
                continue
            may_jump = True

    async def _wait_in_line(self) -> _Slot[C] | None:
        """Wait at the cap, in FIFO order, for a freed worker (or ``None``: room to spawn)."""
        waiter: asyncio.Future[_Slot[C] | None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                handed = waiter.result()
                if handed is not None:
                    self._make_idle(handed)  # pass it on to the next in line
                else:
                    self._capacity_freed()
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    async def _obtain_fresh(self, spawn: Callable[[], Awaitable[Worker[C]]]) -> _Slot[C]:
        """A worker started by ``spawn`` for one session; at the cap an idle spare, or
        the next worker freed, is retired to make room."""
        may_jump = False
        while True:
            self._check_open()
            first = may_jump or not self._waiters
            if first and self._capacity() <= 0 and self._idle:
                self._retire(self._idle[0], "made room for a worker started for a session")
            if first and self._capacity() > 0:
                return await self._spawn_slot(spawn)
            handed = await self._wait_in_line()
            if handed is not None:
                self._retire(handed, "made room for a worker started for a session")
            may_jump = True

    def _capacity(self) -> int:
        return self.config.max_workers - len(self._slots) - self._spawning

    def _wanted(self) -> int:
        """How many workers should be alive: ``min_workers``, or the busy ones plus
        ``min_idle`` spares, within ``max_workers``."""
        busy = len(self._slots) - len(self._idle)
        wanted = max(self.config.min_workers, busy + self.config.min_idle)
        return min(wanted, self.config.max_workers)

    def _capacity_freed(self) -> None:
        """A worker went away: let the first waiter spawn one."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _make_idle(self, slot: _Slot[C]) -> None:
        """Hand a free worker to the first waiter, or park it in the idle deque."""
        if slot.state is WorkerState.DRAINING or slot.state is WorkerState.CLOSED:
            return  # a dead worker is never handed out again
        if self._state is not PoolState.READY and self._state is not PoolState.STARTING:
            self._retire(slot, "pool closing")
            return
        slot.state = WorkerState.IDLE
        slot.pin = None
        slot.idle_since = self._clock()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(slot)
                return
        self._idle.append(slot)

    def _end_use(self, pin: _Pin[C]) -> None:
        pin.uses -= 1
        if pin.uses == 0:
            pin.last_active = self._clock()
            if pin.ended and pin.slot.state is WorkerState.PINNED and pin.slot.pin is pin:
                self._recycle(pin.slot)  # deferred from a release while in use

    async def _end_session(self, pin: _Pin[C]) -> None:
        if self._pins.get(pin.session_id) is pin:
            self._end_pin(pin)
            try:
                await self.registry.delete(pin.session_id)
            except Exception:
                self._unregister(pin.session_id, pin.slot.worker.id)  # retried in the background
                raise

    def _unregister(self, session_id: str, worker_id: str) -> None:
        """Have the maintenance loop delete an ended session from the registry."""
        self._unregistered[session_id] = worker_id
        self._wake.set()

    async def release(self, session_id: str) -> None:
        """End the session ``session_id``: unpin it from its worker. Idempotent.

        The worker goes back to the pool (or is killed with ``worker_reuse=False``)
        once the session's open uses, if any, have closed. Unknown IDs are ignored.

        :raises herd.InvalidSessionIdError: the ID is malformed.
        """
        validate_session_id(session_id)
        pin = self._pins.get(session_id)
        if pin is not None:
            await self._end_session(pin)

    def _end_pin(self, pin: _Pin[C]) -> None:
        """Unpin; recycle the worker now, or when its last open use closes."""
        if self._pins.get(pin.session_id) is pin:
            del self._pins[pin.session_id]
        pin.ended = True
        if pin.uses == 0 and pin.slot.pin is pin and pin.slot.state is WorkerState.PINNED:
            self._recycle(pin.slot)

    def _recycle(self, slot: _Slot[C]) -> None:
        if self.config.worker_reuse and self._state is PoolState.READY:
            self._make_idle(slot)
        else:
            self._retire(slot, "session ended (worker_reuse=False)")

    def _retire(self, slot: _Slot[C], why: str) -> None:
        """Take a worker out of the pool and close it in the background."""
        if slot.state is WorkerState.DRAINING or slot.state is WorkerState.CLOSED:
            return
        if slot.state is WorkerState.IDLE:
            with contextlib.suppress(ValueError):
                self._idle.remove(slot)
        slot.state = WorkerState.DRAINING
        slot.pin = None
        self._slots.pop(slot.worker.id, None)
        log.info("retiring worker %s: %s", slot.worker.id, why)
        closing = asyncio.ensure_future(self._close_worker(slot))
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)
        self._capacity_freed()
        self._wake.set()

    async def _close_worker(self, slot: _Slot[C]) -> None:
        try:
            await slot.worker.close()
        except Exception:
            log.exception("closing worker %s failed", slot.worker.id)
        slot.state = WorkerState.CLOSED
        if slot.watch is not None:
            slot.watch.cancel()
        if self._sampler is not None:
            self._sampler.forget(slot.worker.pid)

    # -- spawning -------------------------------------------------------------------------

    async def _spawn_slot(
        self, spawn: Callable[[], Awaitable[Worker[C]]] | None = None
    ) -> _Slot[C]:
        """Start one worker (with ``spawn``, else the factory) and register it (state
        IDLE, in no deque yet)."""
        loop = asyncio.get_running_loop()
        if self._last_spawn_error is not None and loop.time() < self._backoff_until:
            wait = self._backoff_until - loop.time()
            raise SpawnError(
                f"not spawning for another {wait:.1f}s after {self._failures} failed "
                f"spawn(s); last error: {self._last_spawn_error.message}",
                command=self._last_spawn_error.command,
                exit_code=self._last_spawn_error.exit_code,
                output_tail=self._last_spawn_error.output_tail,
            )
        self._spawning += 1  # before the first await: capacity is reserved
        try:
            worker = await (spawn or self.factory.spawn)()
        except BaseException as exc:
            self._spawning -= 1
            self._capacity_freed()
            if isinstance(exc, SpawnError):
                self._spawn_failed(exc)
            elif isinstance(exc, Exception):
                error = SpawnError(f"worker factory raised {exc!r}")
                self._spawn_failed(error)
                raise error from exc
            raise
        self._spawning -= 1
        self._failures = 0
        self._last_spawn_error = None
        if self._state is not PoolState.READY and self._state is not PoolState.STARTING:
            await worker.close()
            raise PoolClosedError(f"pool is {self._state.value}")
        slot = _Slot(worker, self._clock())
        self._slots[worker.id] = slot
        slot.watch = self._background(self._watch(slot))
        return slot

    def _spawn_failed(self, error: SpawnError) -> None:
        self._failures += 1
        self._last_spawn_error = error
        delay = min(
            self.config.spawn_backoff * 2 ** (self._failures - 1), self.config.spawn_backoff_max
        )
        self._backoff_until = asyncio.get_running_loop().time() + delay
        log.error("spawn failed (%d in a row; next try in %.1fs): %s", self._failures, delay, error)

    async def _refill(self) -> None:
        """Spawn one worker at a time until ``min_workers`` (and ``min_idle`` spares)
        are alive."""
        self._refilling = True
        try:
            while (
                self._state is PoolState.READY
                and len(self._slots) + self._spawning < self._wanted()
            ):
                loop = asyncio.get_running_loop()
                if loop.time() < self._backoff_until:
                    await asyncio.sleep(self._backoff_until - loop.time())
                    continue
                quiet_at = self._last_take + (self.config.refill_delay or 0.0)
                if loop.time() < quiet_at:
                    await asyncio.sleep(quiet_at - loop.time())  # sessions just started
                    continue
                try:
                    slot = await self._spawn_slot()
                except (SpawnError, PoolClosedError):
                    continue  # spawn failures back off by themselves
                self._make_idle(slot)
                self._refill_trouble.recovered()
        except Exception as exc:
            self._refill_trouble.failed(exc)  # the next maintenance pass starts over
        finally:
            self._refilling = False

    # -- failure detection --------------------------------------------------------------

    async def _watch(self, slot: _Slot[C]) -> None:
        try:
            reason = await slot.worker.wait()
        except Exception:
            # A broken Worker.wait(): health checks are left to notice this one's death.
            log.exception("watching worker %s failed", slot.worker.id)
            return
        self._worker_died(slot, reason)

    def _worker_died(self, slot: _Slot[C], reason: str) -> None:
        """The crash path: unpin, tell on_crash, close the remains, refill."""
        if slot.state is WorkerState.DRAINING or slot.state is WorkerState.CLOSED:
            return  # we closed it ourselves
        pin = slot.pin
        log.warning(
            "worker %s died (%s)%s",
            slot.worker.id,
            reason,
            f" while pinned to session {session_tag(pin.session_id)}" if pin else "",
        )
        self._retire(slot, f"died: {reason}")
        self._crashes.append(
            CrashInfo(
                worker_id=slot.worker.id,
                session_id=pin.session_id if pin else None,
                reason=reason,
                at=time.time(),
            )
        )
        if pin is not None:
            if self._pins.get(pin.session_id) is pin:
                del self._pins[pin.session_id]
            pin.ended = True
            pin.death = reason
            self._unregister(pin.session_id, slot.worker.id)
            self._crashed(pin.session_id)

    async def _forget(self, session_id: str, worker_id: str) -> None:
        # Only if no new pin has claimed the session in the meantime.
        if session_id not in self._pins and await self.registry.get(session_id) == worker_id:
            await self.registry.delete(session_id)

    async def _forget_ended(self) -> None:
        """Delete ended sessions from the registry. A failure stops the round (the
        registry is likely down): it is logged once, and the rest is tried again by
        a later sweep, after a back-off."""
        loop = asyncio.get_running_loop()
        if not self._unregistered or loop.time() < self._registry_retry_at:
            return
        try:
            for session_id, worker_id in list(self._unregistered.items()):
                await self._forget(session_id, worker_id)
                if self._unregistered.get(session_id) == worker_id:  # not ended again meanwhile
                    del self._unregistered[session_id]
        except Exception as exc:
            self._registry_retry_at = loop.time() + self._registry_trouble.failed(exc)
        else:
            self._registry_trouble.recovered()

    def _crashed(self, session_id: str) -> None:
        callback = self._on_crash
        if callback is None:
            return

        async def call() -> None:
            try:
                if inspect.iscoroutinefunction(callback):
                    await callback(session_id)
                else:
                    loop = asyncio.get_running_loop()
                    result = await loop.run_in_executor(None, callback, session_id)
                    if inspect.isawaitable(result):
                        await result
            except Exception:
                log.exception("on_crash(%s) raised", session_tag(session_id))

        self._background(call())

    async def _health_loop(self, interval: float) -> None:
        trouble = _Trouble("health checks", first=interval, most=max(interval, 30.0))
        delay = interval
        while True:
            await asyncio.sleep(delay)
            try:
                await self.check_health()
            except Exception as exc:
                delay = trouble.failed(exc)
            else:
                trouble.recovered()
                delay = interval

    async def check_health(self) -> None:
        """Probe every worker once now; count failures, and a worker that failed too
        many (``health_failures``) goes through the crash path.

        The pool does this every ``health_interval`` on its own.
        """
        live = (WorkerState.IDLE, WorkerState.PINNED)
        slots = [slot for slot in self._slots.values() if slot.state in live]
        results = await asyncio.gather(
            *(slot.worker.healthy() for slot in slots), return_exceptions=True
        )
        for slot, result in zip(slots, results, strict=True):
            self._probed(slot, result, "health check")

    async def check_worker(self, worker_id: str) -> bool:
        """Probe one worker now, for callers that saw it fail (a proxy whose
        connection was refused); the probe counts as a health check's would.

        A worker whose process exited goes through the crash path at once, so its
        session is unpinned now instead of at the next health check; one that is
        alive but does not answer is declared dead only after ``health_failures``
        failed probes (it may only be busy).

        :returns: whether the worker is still in the pool (healthy, or not failing
            for long enough to be declared dead).
        """
        slot = self._slots.get(worker_id)
        if slot is None or slot.state not in (WorkerState.IDLE, WorkerState.PINNED):
            return False
        result: bool | BaseException
        try:
            result = await slot.worker.healthy()
        except Exception as exc:
            result = exc
        if result is not True and not _failed_locally(result):
            # A worker that dropped a connection is often exiting: its exit watch
            # fires a moment after its sockets close. Wait for that moment, so that
            # the session is unpinned now (the crash path) and the next request
            # gets a new worker instead of this one.
            with contextlib.suppress(TimeoutError, Exception):
                await asyncio.wait_for(asyncio.shield(slot.worker.wait()), _EXIT_GRACE)
        return self._probed(slot, result, "health check after a failed request")

    def _probed(self, slot: _Slot[C], result: object, what: str) -> bool:
        """Count one probe of ``slot``; whether the worker is still in the pool after it."""
        if slot.state is not WorkerState.IDLE and slot.state is not WorkerState.PINNED:
            return False  # gone while the probe ran
        if result is True:
            slot.probe_failures = 0
            self._probe_trouble.recovered()
            return True
        if _failed_locally(result):
            assert isinstance(result, OSError)
            self._probe_trouble.failed(result)  # counts for nothing: the fault is ours
            return True
        if isinstance(result, BaseException) and not isinstance(result, Exception):
            return True  # a cancelled probe tells nothing
        self._probe_trouble.recovered()
        reason = f"{what} raised {result!r}" if isinstance(result, BaseException) else None
        worker = slot.worker
        exited = isinstance(worker, ExitAware) and not worker.alive
        if exited or (isinstance(worker, LimitAware) and worker.limit_breach()):
            # Exited (the exit watch is about to say so), or stuck at a cgroup limit:
            # no busy spell to wait out.
            self._worker_died(slot, _with_breach(worker, reason or f"{what} failed"))
            return False
        now = asyncio.get_running_loop().time()
        if slot.probe_failures == 0:
            slot.failing_since = now
        slot.probe_failures += 1
        most = self.config.health_failures
        window = (most - 1) * (self.config.health_interval or 0.0)
        spell = now - slot.failing_since
        if slot.probe_failures >= most and spell >= window:
            why = reason or f"{what} failed"
            self._worker_died(
                slot,
                _with_breach(worker, f"{why} ({slot.probe_failures} in a row over {spell:.1f}s)"),
            )
            return False
        log.warning(
            "worker %s: %s (%d of %d failures before it is declared dead)",
            worker.id,
            reason or f"{what} failed",
            slot.probe_failures,
            most,
        )
        return True

    # -- maintenance ----------------------------------------------------------------------

    def _tick(self) -> float:
        candidates = [1.0]
        for value in (self.config.ttl, self.config.idle_worker_timeout):
            if value:
                candidates.append(value / 4)
        return max(min(candidates), 0.01)

    async def _maintenance_loop(self) -> None:
        tick = self._tick()
        trouble = _Trouble("pool maintenance", first=tick)
        while True:
            with contextlib.suppress(TimeoutError):
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
                # cancel that lands as the wait completes, and shutdown would hang.
                async with asyncio.timeout(tick):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.sweep()
            except Exception as exc:
                # Whatever it was (registry errors are handled in sweep): log it
                # once, back off, and keep maintaining.
                await asyncio.sleep(trouble.failed(exc))
            else:
                trouble.recovered()

    async def sweep(self) -> None:
        """Run one maintenance pass now, with the pool's clock.

        Ends sessions unused for ``ttl``, retires idle workers above ``min_workers``
        (and the ``min_idle`` spares) after ``idle_worker_timeout``, starts
        refilling to that number, and last deletes ended sessions from the
        registry (a registry error is logged once and the deletes are tried again
        later, with a back-off; it never holds up the rest).
        The pool does this by itself several times a second; call it in tests with
        an injected clock to skip waiting.
        """
        if self._state is not PoolState.READY:
            return
        now = self._clock()
        ttl = self.config.ttl
        if ttl:
            expired = [p for p in self._pins.values() if p.uses == 0 and now - p.last_active >= ttl]
            for pin in expired:
                log.info(
                    "session %s idle for %.0fs: evicted",
                    session_tag(pin.session_id),
                    now - pin.last_active,
                )
                self._end_pin(pin)
                self._unregistered[pin.session_id] = pin.slot.worker.id
        idle_timeout = self.config.idle_worker_timeout
        if idle_timeout:
            surplus = len(self._slots) - self._wanted()
            for slot in list(self._idle):
                if surplus <= 0:
                    break
                if now - slot.idle_since >= idle_timeout:
                    self._retire(slot, f"idle for {now - slot.idle_since:.0f}s above the minimum")
                    surplus -= 1
        if not self._refilling and len(self._slots) + self._spawning < self._wanted():
            self._background(self._refill())
        # Last, so a failing registry holds up none of the above. Awaiting: a new
        # acquire of an evicted ID may pin it again meanwhile; _forget checks.
        await self._forget_ended()

    # -- introspection --------------------------------------------------------------------

    def sessions(self) -> dict[str, str]:
        """Every pinned session ID with its worker ID (this node's view; no I/O)."""
        return {sid: pin.slot.worker.id for sid, pin in self._pins.items()}

    @property
    def idle_count(self) -> int:
        """Workers idle and ready for a new session now (no I/O)."""
        return len(self._idle)

    def workers(self) -> list[Worker[C]]:
        """The live workers, idle and pinned."""
        return [slot.worker for slot in self._slots.values()]

    def stats(self) -> PoolStats:
        """A snapshot of the pool; never blocks (OS figures are cached < 1 s)."""
        sampler = self._sampler or Sampler()
        self._sampler = sampler
        report = self._sandbox_report()
        now = self._clock()
        rows = []
        for slot in self._slots.values():
            rss, cpu = sampler.tree(slot.worker.pid)
            pin = slot.pin
            busy = pin is not None and pin.uses > 0
            idle_since = pin.last_active if pin is not None else slot.idle_since
            rows.append(
                WorkerStats(
                    id=slot.worker.id,
                    pid=slot.worker.pid,
                    address=slot.worker.address,
                    state="ending" if pin is not None and pin.ended else slot.state.value,
                    session_id=pin.session_id if pin is not None else None,
                    open_uses=pin.uses if pin is not None else 0,
                    rss_bytes=rss,
                    cpu_percent=cpu,
                    age_seconds=max(now - slot.created, 0.0),
                    idle_seconds=0.0 if busy else max(now - idle_since, 0.0),
                )
            )
        return PoolStats(
            state=self._state.value,
            total_workers=len(self._slots),
            available_workers=len(self._idle),
            starting_workers=self._spawning,
            active_sessions=len(self._pins),
            inflight_acquires=sum(p.callers for p in self._pending.values()),
            min_workers=self.config.min_workers,
            max_workers=self.config.max_workers,
            min_idle=self.config.min_idle,
            spawn_failures=self._failures,
            last_spawn_error=self._last_spawn_error.message if self._last_spawn_error else None,
            node=sampler.node(),
            workers=tuple(rows),
            sandbox=report.level if report is not None else "unknown",
            sandbox_reason=report.reason if report is not None else "",
            recent_crashes=tuple(self._crashes),
            waiting_for_worker=sum(1 for waiter in self._waiters if not waiter.done()),
        )

    def _sandbox_report(self) -> SandboxReport | None:
        """The factory's ``sandbox_report`` (level and reason), computed once."""
        if self._report is _UNSET:
            factory = self.factory
            self._report = factory.sandbox_report if isinstance(factory, SandboxReporting) else None
        return self._report

    def __repr__(self) -> str:
        return (
            f"<Pool {self._state.value} workers={len(self._slots)} "
            f"idle={len(self._idle)} sessions={len(self._pins)}>"
        )
