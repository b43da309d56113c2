"""The pool's worker supply: live workers, the idle queue, spawning and health.

The supply knows workers, never sessions. :class:`herd.Pool` takes a worker from
it for a new session (:meth:`_Supply.take`), gives it back when the session ends
(:meth:`_Supply.free`) or has it retired; the supply tells the pool when a worker
dies (``on_death``), whether it was taken or idle.

Where a worker is (each slot in exactly one place)::

    spawn ──> _slots + idle deque ──take()──> handed out (PINNED, the pool's)
                 ^      │                          │
                 │      └──> a waiter's future ────┘ (FIFO at max_workers)
                 └──────────────── free() ─────────┘
    retire() / death / close() ──> out of _slots (CLOSED), closed in the background

Capacity is ``len(_slots) + _spawning``; a spawn counts before its first await,
so concurrent takes never overshoot ``max_workers``. Refill keeps ``min_workers``
(and ``min_idle`` spares) alive, one spawn at a time, backing off after failed
spawns. Every deadline (back-off, ``refill_delay``, health windows) comes from
the injected clock; waits are cut into ticks, and :meth:`_Supply.nudge` makes a
waiting refill look at the clock again at once (what :meth:`herd.Pool.sweep` does).

Same concurrency invariant as the pool: touched only from its event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Generic

from ._config import PoolConfig
from ._exceptions import PoolClosedError, SpawnError
from ._protocols import C, ExitAware, LimitAware, Worker, WorkerFactory

__all__ = ["WorkerState"]

log = logging.getLogger("herd.pool")

# A health probe that raised OSError with one of these could not be made on the
# pool's side (out of file descriptors, buffers or local ports): it says nothing
# of the worker, so it counts neither for nor against it.
_LOCAL_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL}
)

#: How long :meth:`_Supply.check_worker` waits for a failing worker's exit to be seen.
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


def _breach(worker: Worker[Any]) -> str | None:
    """The cgroup limit the worker ran into, if it can tell; a ``limit_breach()``
    that raises tells nothing (and must not end the caller's health pass)."""
    if not isinstance(worker, LimitAware):
        return None
    try:
        return worker.limit_breach()
    except Exception:
        log.exception("worker %s: limit_breach() raised", worker.id)
        return None


def _with_breach(worker: Worker[Any], reason: str) -> str:
    """``reason``, plus the cgroup limit the worker ran into if it can tell."""
    found = _breach(worker)
    if found and found.startswith("killed:"):
        return str(found)  # the worker is dead for that reason, however we noticed
    return f"{reason} ({found})" if found else reason


class WorkerState(enum.Enum):
    """Lifecycle of one worker inside the pool."""

    IDLE = "idle"  # ready, pinned to no session: in the idle deque (or handed to a waiter)
    PINNED = "pinned"  # taken for exactly one session
    CLOSED = "closed"  # out of the pool: being closed, or gone


class _Slot(Generic[C]):
    """The supply's record of one live worker."""

    __slots__ = (
        "created",
        "failing_since",
        "idle_since",
        "probe_failures",
        "state",
        "watch",
        "worker",
    )

    def __init__(self, worker: Worker[C], now: float) -> None:
        self.worker = worker
        self.state = WorkerState.IDLE
        self.created = now
        self.idle_since = now
        self.probe_failures = 0  # failed health probes in a row
        self.failing_since = 0.0  # clock time of the first of them
        self.watch: asyncio.Task[Any] | None = None  # waits for the worker's exit


class _Supply(Generic[C]):
    """Workers for a :class:`herd.Pool`; see the module docstring.

    :param serving: whether the pool takes requests (starting or ready): free
        workers are kept and late spawns welcome only then.
    :param check_open: raises the pool's :class:`~herd.PoolClosedError` if it is
        not open.
    :param background: runs a coroutine as one of the pool's tasks (cancelled at
        shutdown).
    :param on_death: a live worker died on its own or failed its health checks;
        called before it is retired.
    :param on_closed: a worker has been closed.
    :param wake: something changed that the pool's maintenance should look at.
    """

    def __init__(
        self,
        factory: WorkerFactory[C],
        config: PoolConfig,
        *,
        clock: Callable[[], float],
        tick: float,
        serving: Callable[[], bool],
        check_open: Callable[[], None],
        background: Callable[[Awaitable[Any]], asyncio.Task[Any]],
        on_death: Callable[[Worker[C], str], None],
        on_closed: Callable[[Worker[C]], None],
        wake: Callable[[], None],
    ) -> None:
        self.factory = factory
        self.config = config
        self._clock = clock
        self._tick = tick
        self._serving = serving
        self._check_open = check_open
        self._background = background
        self._on_death = on_death
        self._on_closed = on_closed
        self._wake = wake
        self.slots: dict[str, _Slot[C]] = {}  # every live worker, by worker ID
        self.idle: deque[_Slot[C]] = deque()  # IDLE slots; oldest first
        self.spawning = 0  # spawns in flight (they count against max_workers)
        self._waiters: deque[asyncio.Future[_Slot[C] | None]] = deque()  # FIFO at the cap
        # Spawn failure back-off: no spawn before _backoff_until (clock time).
        self.failures = 0
        self._backoff_until = 0.0
        self.last_spawn_error: SpawnError | None = None
        self._refilling = False
        self._last_take = 0.0  # clock time a spare was last taken (for refill_delay)
        self._nudged = asyncio.Event()
        self._closing: set[asyncio.Task[None]] = set()  # worker closes: awaited, never cancelled
        self._probe_trouble = _Trouble("health probes on the pool's side", first=0.0)
        self._refill_trouble = _Trouble("refill", first=0.0)

    # -- counts ---------------------------------------------------------------------------

    def capacity(self) -> int:
        """Workers that may still be started within ``max_workers``."""
        return self.config.max_workers - len(self.slots) - self.spawning

    def wanted(self) -> int:
        """How many workers should be alive: ``min_workers``, or the busy ones plus
        ``min_idle`` spares, within ``max_workers``."""
        busy = len(self.slots) - len(self.idle)
        wanted = max(self.config.min_workers, busy + self.config.min_idle)
        return min(wanted, self.config.max_workers)

    def waiting(self) -> int:
        """Takes queued at ``max_workers``."""
        return sum(1 for waiter in self._waiters if not waiter.done())

    # -- taking and giving back -----------------------------------------------------------

    async def take(self) -> _Slot[C]:
        """A worker for a new session (state PINNED): an idle one, else a spawn, else
        a FIFO wait at the cap."""
        may_jump = False  # a woken waiter goes before those still queued behind it
        while True:
            self._check_open()
            first = may_jump or not self._waiters
            if self.idle and first:
                if self.config.min_idle:
                    self._last_take = self._clock()
                    self._wake()  # a spare was taken: start its refill (after refill_delay)
                return self._taken(self.idle.popleft())
            if self.capacity() > 0 and first:
                return self._taken(await self._spawn_slot())
            slot = await self._wait_in_line()
            may_jump = True
            if slot is not None and slot.state is WorkerState.IDLE:
                return self._taken(slot)
            # None: room to spawn; a CLOSED slot died between the hand-over and now.

    async def take_fresh(self, spawn: Callable[[], Awaitable[Worker[C]]]) -> _Slot[C]:
        """A worker started by ``spawn`` for one session (state PINNED); at the cap an
        idle spare, or the next worker freed, is retired to make room."""
        may_jump = False
        why = "made room for a worker started for a session"
        while True:
            self._check_open()
            first = may_jump or not self._waiters
            if first and self.capacity() <= 0 and self.idle:
                self._retire(self.idle[0], why)
            if first and self.capacity() > 0:
                return self._taken(await self._spawn_slot(spawn))
            handed = await self._wait_in_line()
            if handed is not None:
                self._retire(handed, why)
            may_jump = True

    def _taken(self, slot: _Slot[C]) -> _Slot[C]:
        slot.state = WorkerState.PINNED
        return slot

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
                    self.make_idle(handed)  # pass it on to the next in line
                else:
                    self._capacity_freed()
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def _capacity_freed(self) -> None:
        """A worker went away: let the first waiter spawn one."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def free(self, worker_id: str) -> None:
        """The session on this worker ended: it serves the next one."""
        slot = self.slots.get(worker_id)
        if slot is not None:
            self.make_idle(slot)

    def make_idle(self, slot: _Slot[C]) -> None:
        """Hand a free worker to the first waiter, or park it in the idle deque."""
        if slot.state is WorkerState.CLOSED:
            return  # a dead worker is never handed out again
        if not self._serving():
            self._retire(slot, "pool closing")
            return
        slot.state = WorkerState.IDLE
        slot.idle_since = self._clock()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(slot)
                return
        self.idle.append(slot)

    def fail_waiters(self, error: BaseException) -> None:
        """Every take waiting at the cap fails with ``error`` (the pool is closing)."""
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(error)
        self._waiters.clear()

    # -- retiring and closing -------------------------------------------------------------

    def retire(self, worker_id: str, why: str) -> None:
        """Take a worker out of the pool and close it in the background."""
        slot = self.slots.get(worker_id)
        if slot is not None:
            self._retire(slot, why)

    def _retire(self, slot: _Slot[C], why: str) -> None:
        if slot.state is WorkerState.CLOSED:
            return
        if slot.state is WorkerState.IDLE:
            with contextlib.suppress(ValueError):
                self.idle.remove(slot)
        slot.state = WorkerState.CLOSED
        self.slots.pop(slot.worker.id, None)
        log.info("retiring worker %s: %s", slot.worker.id, why)
        closing = asyncio.ensure_future(self._close_worker(slot))
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)
        self._capacity_freed()
        self._wake()

    def retire_idle(self, now: float) -> None:
        """Retire idle workers above what is wanted after ``idle_worker_timeout``."""
        idle_timeout = self.config.idle_worker_timeout
        if not idle_timeout:
            return
        surplus = len(self.slots) - self.wanted()
        for slot in list(self.idle):
            if surplus <= 0:
                break
            if now - slot.idle_since >= idle_timeout:
                self._retire(slot, f"idle for {now - slot.idle_since:.0f}s above the minimum")
                surplus -= 1

    async def _close_worker(self, slot: _Slot[C]) -> None:
        try:
            await slot.worker.close()
        except Exception:
            log.exception("closing worker %s failed", slot.worker.id)
        if slot.watch is not None:
            slot.watch.cancel()
        self._on_closed(slot.worker)

    async def close(self) -> int:
        """Close every worker now (the pool is closing), and wait for every close,
        those retired earlier included; how many were live."""
        slots = list(self.slots.values())
        self.slots.clear()
        self.idle.clear()
        for slot in slots:
            slot.state = WorkerState.CLOSED
        await asyncio.gather(*(self._close_worker(slot) for slot in slots))
        await asyncio.gather(*self._closing, return_exceptions=True)
        return len(slots)

    # -- spawning -------------------------------------------------------------------------

    async def spawn(self) -> _Slot[C]:
        """Start one worker with the factory (state IDLE, in no deque yet)."""
        return await self._spawn_slot()

    async def _spawn_slot(
        self, spawn: Callable[[], Awaitable[Worker[C]]] | None = None
    ) -> _Slot[C]:
        """Start one worker (with ``spawn``, else the factory) and register it (state
        IDLE, in no deque yet)."""
        if self.last_spawn_error is not None and self._clock() < self._backoff_until:
            wait = self._backoff_until - self._clock()
            raise SpawnError(
                f"not spawning for another {wait:.1f}s after {self.failures} failed "
                f"spawn(s); last error: {self.last_spawn_error.message}",
                command=self.last_spawn_error.command,
                exit_code=self.last_spawn_error.exit_code,
                output_tail=self.last_spawn_error.output_tail,
            )
        self.spawning += 1  # before the first await: capacity is reserved
        try:
            worker = await (spawn or self.factory.spawn)()
        except BaseException as exc:
            self.spawning -= 1
            self._capacity_freed()
            if isinstance(exc, SpawnError):
                self._spawn_failed(exc)
            elif isinstance(exc, Exception):
                error = SpawnError(f"worker factory raised {exc!r}")
                self._spawn_failed(error)
                raise error from exc
            raise
        self.spawning -= 1
        self.failures = 0
        self.last_spawn_error = None
        slot = _Slot(worker, self._clock())
        if not self._serving():  # the pool closed while this one started
            slot.state = WorkerState.CLOSED
            await self._close_worker(slot)
            self._check_open()
            raise PoolClosedError("pool is not serving")  # (not reached: check_open raised)
        self.slots[worker.id] = slot
        slot.watch = self._background(self._watch(slot))
        return slot

    def _spawn_failed(self, error: SpawnError) -> None:
        self.failures += 1
        self.last_spawn_error = error
        delay = min(
            self.config.spawn_backoff * 2 ** (self.failures - 1), self.config.spawn_backoff_max
        )
        self._backoff_until = self._clock() + delay
        log.error("spawn failed (%d in a row; next try in %.1fs): %s", self.failures, delay, error)

    def refill(self) -> None:
        """Start refilling to :meth:`wanted` in the background, unless it runs or
        nothing is missing."""
        if not self._refilling and len(self.slots) + self.spawning < self.wanted():
            self._refilling = True
            self._background(self._refill())

    def nudge(self) -> None:
        """Have a waiting refill look at the clock again now."""
        self._nudged.set()

    async def _pause(self, seconds: float) -> None:
        """Wait ``seconds`` of the clock, a tick at most (or until nudged): the
        caller looks at the clock again after."""
        self._nudged.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(seconds, self._tick)):
                await self._nudged.wait()

    async def _refill(self) -> None:
        """Spawn one worker at a time until ``min_workers`` (and ``min_idle`` spares)
        are alive."""
        try:
            while self._serving() and len(self.slots) + self.spawning < self.wanted():
                now = self._clock()
                if now < self._backoff_until:
                    await self._pause(self._backoff_until - now)
                    continue
                quiet_at = self._last_take + (self.config.refill_delay or 0.0)
                if now < quiet_at:
                    await self._pause(quiet_at - now)  # sessions just started
                    continue
                try:
                    slot = await self._spawn_slot()
                except (SpawnError, PoolClosedError):
                    continue  # spawn failures back off by themselves
                self.make_idle(slot)
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
        self._died(slot, reason)

    def _died(self, slot: _Slot[C], reason: str) -> None:
        if slot.state is WorkerState.CLOSED:
            return  # we closed it ourselves
        self._on_death(slot.worker, reason)
        self._retire(slot, f"died: {reason}")

    async def health_loop(self, interval: float) -> None:
        """Probe every worker every ``interval`` seconds, for ever."""
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
        """Probe every live worker once; see :meth:`herd.Pool.check_health`."""
        live = (WorkerState.IDLE, WorkerState.PINNED)
        slots = [slot for slot in self.slots.values() if slot.state in live]
        results = await asyncio.gather(
            *(slot.worker.healthy() for slot in slots), return_exceptions=True
        )
        for slot, result in zip(slots, results, strict=True):
            self._probed(slot, result, "health check")

    async def check_worker(self, worker_id: str) -> bool:
        """Probe one worker now; see :meth:`herd.Pool.check_worker`."""
        slot = self.slots.get(worker_id)
        if slot is None or slot.state is WorkerState.CLOSED:
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
        if slot.state is WorkerState.CLOSED:
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
        if exited or _breach(worker):
            # Exited (the exit watch is about to say so), or stuck at a cgroup limit:
            # no busy spell to wait out.
            self._died(slot, _with_breach(worker, reason or f"{what} failed"))
            return False
        now = self._clock()
        if slot.probe_failures == 0:
            slot.failing_since = now
        slot.probe_failures += 1
        most = self.config.health_failures
        window = (most - 1) * (self.config.health_interval or 0.0)
        spell = now - slot.failing_since
        if slot.probe_failures >= most and spell >= window:
            why = reason or f"{what} failed"
            self._died(
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
