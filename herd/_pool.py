"""Pool: session-affine acquire and release over a fleet of workers.

The pool is the session table; its workers come from the supply
(:mod:`herd._supply`: idle queue, spawning, back-off, refill, health), which
knows workers and never sessions.

Data flow::

    acquire(sid) ──> _pins[sid]? ── yes ──> Session (fast path: a dict hit, no await)
                        │ no
                        v
               _pending[sid] (singleflight: one _pin_new task per new ID,
                        │     every concurrent caller awaits the same task)
                        v
               supply.take(): idle deque ──> spawn (below max_workers)
                        │                ──> FIFO wait (at max_workers)
                        │ (acquire(sid, spawn=f): supply.take_fresh(f): f() below
                        │  max_workers; at it an idle spare is retired for room)
                        v
               (first: registry.claim(sid): another node's? ──> SessionElsewhereError,
                        its owner kept in _remote for the proxy's next request)
               pin: _pins[sid] = _by_worker[worker.id] = _Pin ──> registry.bind(claim, worker.id)

    worker exits ──> the supply's exit watch ──> _worker_died: unpin, on_crash; refill
    maintenance loop (every tick, injected clock):
               ttl eviction of unused pins, retire surplus idle workers, refill to min,
               then registry releases of ended sessions (_unregistered; kept on failure)
    renew loop (every registry.renew_interval, a shared registry only): registry.renew()
               renews this node's claims in one batch; sessions lost to another node
               are unpinned
    health loop (every health_interval): Worker.healthy(); health_failures failed
               probes in a row (over (health_failures - 1) * health_interval) or an
               exited process ──> _worker_died

Background loops never die of an error: each logs a distinct error once and backs
off (:class:`_Trouble`). A registry that fails for a while delays only its own
clean-up (retried with a back-off), never eviction, retirement or refill.

Concurrency invariant: all state below lives on the event loop that started the
pool and is touched only from it, so code between two ``await`` points is a
critical section. The rules that keep the invariants true:

- a worker is in exactly one place: the supply's idle deque, pinned to one
  ``_Pin`` (``_by_worker``), handed to one waiter's future, or gone;
- ``_pins[sid]`` is set before the first ``await`` after a worker is taken, so a
  second acquire of ``sid`` sees the pin (fast path) or the pending task
  (singleflight) — never neither, so one ID never pins two workers;
- a released pin with open uses keeps its worker until the last use closes, so
  two sessions never share a worker at the same time.

Prior art: the Go original's pool (mutex + map + channel of idle workers) and
anyio's ``to_process`` worker pool (idle workers pruned after a maximum idle time).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import inspect
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Generic, Literal

from ._config import Duration, PoolConfig, duration_seconds, required_seconds
from ._exceptions import PoolClosedError, PoolExhaustedError, SessionElsewhereError
from ._protocols import C, Claim, SandboxReporting, SessionRegistry, Worker, WorkerFactory
from ._session import AcquireContext, Session, _Pin, session_tag, validate_session_id
from ._stats import CrashInfo, PoolStats, Sampler, worker_stats
from ._supply import WorkerState, _Supply, _Trouble
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

#: Sessions remembered at most in the pool's small maps (owners elsewhere, restarts).
_REMEMBERED = 10_000


class PoolState(enum.Enum):
    """Lifecycle of a :class:`Pool`; it never goes back to an earlier state."""

    UNOPENED = "unopened"  # built; start() not called yet
    STARTING = "starting"  # start() is spawning min_workers
    READY = "ready"  # serving acquires
    CLOSING = "closing"  # shutdown() running: refuses acquires, stopping workers
    CLOSED = "closed"  # every worker and task stopped


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
    :param registry: who owns which session: in memory by default (a fleet of
        one); ``herd.registry.RedisRegistry`` shares sessions among several nodes.
        The pool closes it when it shuts down.
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
        self.registry: SessionRegistry = registry if registry is not None else MemoryRegistry()
        self._on_crash = on_crash
        self._clock = clock
        self._state = PoolState.UNOPENED
        # The workers; see herd._supply for who moves them where.
        self._supply: _Supply[C] = _Supply(
            factory,
            self.config,
            clock=clock,
            tick=self._tick(),
            serving=self._serving,
            check_open=self._check_open,
            background=self._background,
            on_death=self._worker_died,
            on_closed=self._worker_closed,
            wake=self._wake_maintenance,
        )
        # The sessions.
        self._pins: dict[str, _Pin[C]] = {}  # by session ID
        self._by_worker: dict[str, _Pin[C]] = {}  # the same pins, by their worker's ID
        self._pending: dict[str, _Pending[C]] = {}
        # Ended sessions whose claims are still to release (ID -> the claim); the
        # maintenance loop does it, and keeps what failed for next time.
        self._unregistered: dict[str, Claim] = {}
        self._registry_trouble = _Trouble("registry clean-up", first=self._tick())
        # Sessions another node owns, as the registry last said (a shared registry
        # only): the proxy forwards to them without asking again. Bounded.
        self._remote: OrderedDict[str, Claim] = OrderedDict()
        # Sessions whose worker died: their next pin says so (Session.restarted). Bounded.
        self._restarts: OrderedDict[str, str] = OrderedDict()
        self._registry_retry_at = 0.0  # clock time; no clean-up before it after a failure
        # Releases in flight, by session ID: a new claim of the session waits for its
        # old one's release (a registry hands a claim it holds back to its node).
        self._releasing: dict[str, asyncio.Future[None]] = {}
        # Background work.
        self._tasks: set[asyncio.Task[Any]] = set()  # cancelled at shutdown
        self._wake = asyncio.Event()
        self._closed = asyncio.Event()
        self._sampler: Sampler | None = None
        self._crashes: deque[CrashInfo] = deque(maxlen=20)
        self._report: SandboxReport | Unset | None = _UNSET  # the factory's, read once

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def factory(self) -> WorkerFactory[C]:
        """What starts the pool's workers; may be replaced while the pool runs
        (workers already started are kept)."""
        return self._supply.factory

    @factory.setter
    def factory(self, factory: WorkerFactory[C]) -> None:
        self._supply.factory = factory

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
        # Background tasks, so that a shutdown() meanwhile cancels them and waits
        # for them as for any other: it never returns with a spawn in flight.
        spawns = [self._background(self._supply.spawn()) for _ in range(self._supply.wanted())]
        try:
            slots = await asyncio.gather(*spawns)
        except BaseException as exc:
            for spawn in spawns:
                spawn.cancel()
            await asyncio.gather(*spawns, return_exceptions=True)
            interrupted = self._state is not PoolState.STARTING  # shutdown() meanwhile
            await self.shutdown()
            me = asyncio.current_task()
            cancelled_here = me is not None and me.cancelling() > 0
            if interrupted and isinstance(exc, asyncio.CancelledError) and not cancelled_here:
                raise PoolClosedError("pool was shut down while it started") from None
            raise
        for slot in slots:
            self._supply.make_idle(slot)
        self._state = PoolState.READY
        self._background(self._maintenance_loop())
        if self.registry.renew_interval:
            self._background(self._renew_loop(self.registry.renew_interval))
        if self.config.health_interval:
            self._background(self._supply.health_loop(self.config.health_interval))
        # Detection runs probe processes if no spawn has done it yet: off the loop.
        report = await asyncio.to_thread(self._sandbox_report)
        log.info(
            "pool ready: %d worker(s), max %d; sandbox %s",
            len(self._supply.slots),
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
        self._supply.fail_waiters(PoolClosedError("pool is shutting down"))
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        sessions = list(self._pins)
        for pin in self._pins.values():
            pin.ended = True
        self._pins.clear()
        self._by_worker.clear()
        stopped = await self._supply.close()
        try:
            await self.registry.close()  # gives up every claim: other nodes may take them
        except Exception as exc:
            log.warning("%d session(s) left in the registry: %s", len(sessions), exc)
        self._unregistered.clear()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._state = PoolState.CLOSED
        self._closed.set()
        log.info("pool closed: %d worker(s) stopped", stopped)

    async def __aenter__(self) -> Pool[C]:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()

    def _serving(self) -> bool:
        return self._state is PoolState.READY or self._state is PoolState.STARTING

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

    def try_acquire(self, session_id: str) -> Session[C] | None:
        """A use of the session ``session_id`` if it is pinned already, else ``None``.

        The fast path of :meth:`acquire` without a coroutine: for callers on the
        loop that answer from a protocol callback (herd's relay) and only await
        :meth:`acquire` when this says ``None`` (a new session, or a pool that is
        not serving). Never waits, never spawns, never raises.
        """
        pin = self._pins.get(session_id)
        if pin is None or self._state is not PoolState.READY:
            return None
        pin.uses += 1  # a dict hit: no await, no validation needed
        pin.used = True
        return Session(pin)

    async def _acquire(
        self,
        session_id: str,
        timeout: Duration | Unset,
        spawn: Callable[[], Awaitable[Worker[C]]] | None = None,
    ) -> Session[C]:
        session = self.try_acquire(session_id)
        if session is not None:
            return session
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
            supply = self._supply
            raise PoolExhaustedError(
                f"no worker for session {session_id!r} within {limit:g}s: "
                f"{len(supply.slots)} of max {self.config.max_workers} workers busy, "
                f"{supply.spawning} starting, {supply.waiting()} acquire(s) waiting",
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
                session = Session(pin)
                session.restarted, pin.restarted = pin.restarted, None
                return session
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
        self._unregister(pin.session_id, pin.claim)

    async def _pin_new(
        self, session_id: str, spawn: Callable[[], Awaitable[Worker[C]]] | None = None
    ) -> _Pin[C]:
        try:
            # The claim first: a session another node owns must not take a worker here.
            releasing = self._releasing.get(session_id)
            if releasing is not None:
                await asyncio.shield(releasing)
            claim = await self.registry.claim(session_id)
            if self._unregistered.get(session_id) == claim:
                del self._unregistered[session_id]  # handed back: in use again, not released
            if not claim.mine:
                self._remember_remote(claim)
                raise SessionElsewhereError(
                    f"session {session_tag(session_id)} is owned by node {claim.node} "
                    f"({claim.address})",
                    session_id=session_id,
                    node=claim.node,
                    address=claim.address,
                )
            self._remote.pop(session_id, None)
            try:
                if spawn is None:
                    slot = await self._supply.take()
                else:
                    slot = await self._supply.take_fresh(spawn)
            except BaseException:
                self._unregister(session_id, claim)  # no worker: the claim goes
                raise
            worker = slot.worker
            if not self._serving():
                self._supply.retire(worker.id, "pool closing")
                raise PoolClosedError(f"pool is {self._state.value}", session_id=session_id)
            pin = _Pin(session_id, worker, self, self._clock())
            pin.claim = claim
            pin.restarted = claim.restarted or self._restarts.pop(session_id, None)
            self._by_worker[worker.id] = pin
            self._pins[session_id] = pin  # visible before the await below: singleflight holds
        finally:
            pending = self._pending.get(session_id)
            if pending is not None and pending.task is asyncio.current_task():
                del self._pending[session_id]
        if claim.restarted:  # taken over from a node that died: its on_crash runs here
            self._record_crash("-", session_id, claim.restarted)
            self._crashed(session_id)
        # Awaiting while pinned: concurrent acquires of this ID take the fast path.
        try:
            bound = await self.registry.bind(claim, worker.id)
        except Exception as exc:  # the claim stands; only the fleet's view lacks the worker
            log.debug(
                "session %s: naming its worker in the registry failed: %s",
                session_tag(session_id),
                exc,
            )
            bound = True
        if not bound:  # fenced out meanwhile: another node took the session
            self._end_pin(pin)
        else:
            log.debug("session %s pinned to worker %s", session_tag(session_id), worker.id)
        return pin

    def _remember_remote(self, claim: Claim) -> None:
        self._remote[claim.session_id] = claim
        self._remote.move_to_end(claim.session_id)
        while len(self._remote) > _REMEMBERED:
            self._remote.popitem(last=False)

    def remote_owner(self, session_id: str) -> Claim | None:
        """The node that owns ``session_id``, if another node does, as last heard
        from the registry (no I/O): :mod:`herd.proxy` forwards the request there.
        Always ``None`` with a registry of one node."""
        return self._remote.get(session_id)

    def forget_remote_owner(self, session_id: str) -> None:
        """A request forwarded to the owner :meth:`remote_owner` named failed, or it
        no longer owns the session: the next :meth:`acquire` asks the registry."""
        self._remote.pop(session_id, None)

    # The two methods a Session calls (herd._session._Owner).

    def _end_use(self, pin: _Pin[C]) -> None:
        pin.uses -= 1
        if pin.uses == 0:
            pin.last_active = self._clock()
            if pin.ended:
                self._recycle(pin)  # deferred from a release while in use

    async def _end_session(self, pin: _Pin[C]) -> None:
        if self._pins.get(pin.session_id) is pin:
            self._end_pin(pin)
            if pin.claim is None:
                return
            try:
                await self._release(pin.session_id, pin.claim)
            except Exception:
                self._unregister(pin.session_id, pin.claim)  # retried in the background
                raise

    async def _release(self, session_id: str, claim: Claim) -> None:
        """Release ``claim``; a new claim of the session waits until it is done."""
        done = asyncio.get_running_loop().create_future()
        previous = self._releasing.get(session_id)
        self._releasing[session_id] = done
        try:
            if previous is not None:
                await asyncio.shield(previous)
            await self.registry.release(claim)
        finally:
            if self._releasing.get(session_id) is done:
                del self._releasing[session_id]
            done.set_result(None)

    def _unregister(self, session_id: str, claim: Claim | None) -> None:
        """Have the maintenance loop release an ended session's claim."""
        if claim is not None:
            self._unregistered[session_id] = claim
            self._wake.set()

    def _wake_maintenance(self) -> None:
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
        if pin.uses == 0:
            self._recycle(pin)

    def _recycle(self, pin: _Pin[C]) -> None:
        """The worker of an ended pin with no open use serves the next session (or,
        with ``worker_reuse=False``, is retired)."""
        worker_id = pin.worker.id
        if self._by_worker.get(worker_id) is not pin:
            return  # recycled already, or its worker died
        del self._by_worker[worker_id]
        if self.config.worker_reuse and self._state is PoolState.READY:
            self._supply.free(worker_id)
        else:
            self._supply.retire(worker_id, "session ended (worker_reuse=False)")

    def _worker_closed(self, worker: Worker[C]) -> None:
        if self._sampler is not None:
            self._sampler.forget(worker.pid)

    # -- failure detection --------------------------------------------------------------

    def _worker_died(self, worker: Worker[C], reason: str) -> None:
        """The crash path, before the supply retires the worker: unpin, tell on_crash."""
        pin = self._by_worker.pop(worker.id, None)
        log.warning(
            "worker %s died (%s)%s",
            worker.id,
            reason,
            f" while pinned to session {session_tag(pin.session_id)}" if pin else "",
        )
        self._record_crash(worker.id, pin.session_id if pin else None, reason)
        if pin is not None:
            if self._pins.get(pin.session_id) is pin:
                del self._pins[pin.session_id]
            pin.ended = True
            pin.death = reason
            self._restarts[pin.session_id] = f"its worker died ({reason})"
            while len(self._restarts) > _REMEMBERED:
                self._restarts.popitem(last=False)
            self._unregister(pin.session_id, pin.claim)
            self._crashed(pin.session_id)

    def _record_crash(self, worker_id: str, session_id: str | None, reason: str) -> None:
        self._crashes.append(
            CrashInfo(worker_id=worker_id, session_id=session_id, reason=reason, at=time.time())
        )

    async def _forget(self, session_id: str, claim: Claim) -> None:
        # Not if a new pin holds the session now (a registry may hand the same
        # claim back to this node until it is released).
        if session_id not in self._pins:
            await self._release(session_id, claim)

    async def _forget_ended(self) -> None:
        """Delete ended sessions from the registry. A failure stops the round (the
        registry is likely down): it is logged once, and the rest is tried again by
        a later sweep, after a back-off."""
        if not self._unregistered or self._clock() < self._registry_retry_at:
            return
        try:
            for session_id, claim in list(self._unregistered.items()):
                if self._unregistered.get(session_id) != claim:
                    continue  # handed back to a new pin meanwhile
                await self._forget(session_id, claim)
                if self._unregistered.get(session_id) == claim:  # not ended again meanwhile
                    del self._unregistered[session_id]
        except Exception as exc:
            self._registry_retry_at = self._clock() + self._registry_trouble.failed(exc)
        else:
            self._registry_trouble.recovered()

    def _crashed(self, session_id: str) -> None:
        callback = self._on_crash
        if callback is None:
            return

        async def call() -> None:
            try:
                if inspect.iscoroutinefunction(callback) or inspect.iscoroutinefunction(
                    type(callback).__call__  # an object with an async __call__
                ):
                    await callback(session_id)
                else:
                    loop = asyncio.get_running_loop()
                    result = await loop.run_in_executor(None, callback, session_id)
                    if inspect.isawaitable(result):
                        await result
            except Exception:
                log.exception("on_crash(%s) raised", session_tag(session_id))

        self._background(call())

    async def check_health(self) -> None:
        """Probe every worker once now; count failures, and a worker that failed too
        many (``health_failures``) goes through the crash path.

        The pool does this every ``health_interval`` on its own.
        """
        await self._supply.check_health()

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
        return await self._supply.check_worker(worker_id)

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

    async def _renew_loop(self, interval: float) -> None:
        """Renew this node's claims every ``interval`` (one batch for all); unpin
        the sessions the registry says another node has taken. A failure is logged
        once and retried: the sessions keep being served meanwhile."""
        trouble = _Trouble("registry renewal", first=interval)
        while True:
            try:
                lost = await self.registry.renew()
            except Exception as exc:
                await asyncio.sleep(min(interval, trouble.failed(exc)))
                continue
            trouble.recovered()
            for session_id in lost:
                pin = self._pins.get(session_id)
                if pin is not None:
                    log.warning(
                        "session %s was taken over by another node while this one could "
                        "not renew its claim: unpinned here",
                        session_tag(session_id),
                    )
                    pin.claim = None  # not ours to release
                    self._end_pin(pin)
            await asyncio.sleep(interval)

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
                self._unregister(pin.session_id, pin.claim)
        self._supply.retire_idle(now)
        self._supply.refill()
        self._supply.nudge()  # a refill waiting out a back-off looks at the clock again
        # Last, so a failing registry holds up none of the above. Awaiting: a new
        # acquire of an evicted ID may pin it again meanwhile; _forget checks.
        await self._forget_ended()

    # -- introspection --------------------------------------------------------------------

    def sessions(self) -> dict[str, str]:
        """Every pinned session ID with its worker ID (this node's view; no I/O)."""
        return {sid: pin.worker.id for sid, pin in self._pins.items()}

    @property
    def idle_count(self) -> int:
        """Workers idle and ready for a new session now (no I/O)."""
        return len(self._supply.idle)

    def workers(self) -> list[Worker[C]]:
        """The live workers, idle and pinned."""
        return [slot.worker for slot in self._supply.slots.values()]

    def stats(self) -> PoolStats:
        """A snapshot of the pool; never blocks (OS figures are cached < 1 s)."""
        sampler = self._sampler or Sampler()
        self._sampler = sampler
        report = self._sandbox_report()
        now = self._clock()
        supply = self._supply
        rows = tuple(
            worker_stats(
                slot.worker,
                state=slot.state.value,
                created=slot.created,
                idle_since=slot.idle_since,
                pin=self._by_worker.get(worker_id),
                sampler=sampler,
                now=now,
            )
            for worker_id, slot in supply.slots.items()
        )
        return PoolStats(
            state=self._state.value,
            total_workers=len(supply.slots),
            available_workers=len(supply.idle),
            starting_workers=supply.spawning,
            active_sessions=len(self._pins),
            inflight_acquires=sum(p.callers for p in self._pending.values()),
            min_workers=self.config.min_workers,
            max_workers=self.config.max_workers,
            min_idle=self.config.min_idle,
            spawn_failures=supply.failures,
            last_spawn_error=supply.last_spawn_error.message if supply.last_spawn_error else None,
            node=sampler.node(),
            workers=rows,
            sandbox=report.level if report is not None else "unknown",
            sandbox_reason=report.reason if report is not None else "",
            recent_crashes=tuple(self._crashes),
            waiting_for_worker=supply.waiting(),
            fleet=self.registry.fleet(),
        )

    def _sandbox_report(self) -> SandboxReport | None:
        """The factory's ``sandbox_report`` (level and reason), computed once."""
        if self._report is _UNSET:
            factory = self.factory
            self._report = factory.sandbox_report if isinstance(factory, SandboxReporting) else None
        return self._report

    def __repr__(self) -> str:
        return (
            f"<Pool {self._state.value} workers={len(self._supply.slots)} "
            f"idle={len(self._supply.idle)} sessions={len(self._pins)}>"
        )
