"""Pool statistics as frozen dataclasses, and the sampler behind them.

:meth:`herd.Pool.stats` must never block: the Go original sleeps ~100 ms to
measure CPU. Here counts come from the pool's own state, and everything read
from the OS (node memory, CPU idle, per-worker RSS and CPU) comes from
:class:`Sampler`, which uses psutil's non-blocking forms (CPU percentages since
the previous sample) and caches a reading for ``max_age`` seconds, so a
dashboard polling ``stats()`` many times a second costs almost nothing.

This is the only module that imports psutil.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

import psutil

from ._procfs import descendants
from ._protocols import NodeInfo

if TYPE_CHECKING:
    from ._protocols import Worker
    from ._session import _Pin

__all__ = ["CrashInfo", "NodeStats", "PoolStats", "Sampler", "WorkerStats"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class CrashInfo:
    """A worker that died on its own.

    :param worker_id: the worker.
    :param session_id: the session pinned to it then, if any.
    :param reason: why (``"killed: memory limit 256 MiB"``, ``"exited with code 1"``).
    :param at: :func:`time.time` of the death.
    """

    worker_id: str
    session_id: str | None
    reason: str
    at: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class NodeStats:
    """The machine the pool runs on.

    :param total_memory_bytes: physical memory.
    :param available_memory_bytes: memory available to new processes.
    :param cpu_idle: percent of all CPUs idle since the previous sample (0-100).
    :param cpu_count: logical CPUs.
    """

    total_memory_bytes: int
    available_memory_bytes: int
    cpu_idle: float
    cpu_count: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorkerStats:
    """One worker.

    :param id: the worker's ID.
    :param pid: its process ID, if it has one.
    :param address: where it listens.
    :param state: ``"idle"``, ``"pinned"``, ``"ending"`` (its session was released
        but a use of it is still open: the worker is freed when that use closes).
    :param session_id: the session pinned to it (or ending on it), if any.
    :param open_uses: open :class:`~herd.Session` uses of that session.
    :param rss_bytes: resident memory of the worker's processes (``None``: unknown).
    :param cpu_percent: CPU use of its processes since the previous sample
        (100 = one full core).
    :param age_seconds: since it started.
    :param idle_seconds: since its last use ended (0 while a use is open).
    """

    id: str
    pid: int | None
    address: str
    state: str
    session_id: str | None
    open_uses: int
    rss_bytes: int | None
    cpu_percent: float | None
    age_seconds: float
    idle_seconds: float


def worker_stats(
    worker: Worker[Any],
    *,
    state: str,
    created: float,
    idle_since: float,
    pin: _Pin[Any] | None,
    sampler: Sampler,
    now: float,
) -> WorkerStats:
    """The row of one live worker: the pool's view (``state``, its session's
    ``pin`` if any), the sampler's figures, times against the pool's clock."""
    rss, cpu = sampler.tree(worker.pid)
    busy = pin is not None and pin.uses > 0
    if pin is not None:
        idle_since = pin.last_active
        if pin.ended:
            state = "ending"
    return WorkerStats(
        id=worker.id,
        pid=worker.pid,
        address=worker.address,
        state=state,
        session_id=pin.session_id if pin is not None else None,
        open_uses=pin.uses if pin is not None else 0,
        rss_bytes=rss,
        cpu_percent=cpu,
        age_seconds=max(now - created, 0.0),
        idle_seconds=0.0 if busy else max(now - idle_since, 0.0),
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class PoolStats:
    """A snapshot of a pool, from :meth:`herd.Pool.stats`.

    :param state: the pool's lifecycle state (``"ready"``, ``"closed"``, ...).
    :param total_workers: live workers, idle and pinned (not counting starting ones).
    :param available_workers: idle workers ready for a new session.
    :param starting_workers: workers being spawned.
    :param active_sessions: pinned sessions.
    :param inflight_acquires: acquires of new sessions still waiting for a worker.
    :param min_workers: the configured minimum.
    :param max_workers: the configured maximum.
    :param min_idle: the configured number of ready spares.
    :param spawn_failures: consecutive failed spawns (0 after a success).
    :param last_spawn_error: the message of the last failed spawn, if any.
    :param node: the machine.
    :param workers: one row per worker.
    :param sandbox: the workers' isolation: ``"full"``, ``"partial"`` or ``"none"``
        (``"unknown"`` for factories that do not say).
    :param sandbox_reason: what that level consists of, and why not more.
    :param recent_crashes: the last workers that died on their own, oldest first.
    :param waiting_for_worker: acquires queued at ``max_workers`` until a worker
        is free (served first come, first served).
    :param fleet: the nodes that share the pool's registry, with the sessions each
        owns, as the registry last saw them (one node for an in-memory registry).
    """

    state: str
    total_workers: int
    available_workers: int
    starting_workers: int
    active_sessions: int
    inflight_acquires: int
    min_workers: int
    max_workers: int
    min_idle: int
    spawn_failures: int
    last_spawn_error: str | None
    node: NodeStats
    workers: tuple[WorkerStats, ...]
    sandbox: str = "unknown"
    sandbox_reason: str = ""
    recent_crashes: tuple[CrashInfo, ...] = ()
    waiting_for_worker: int = 0
    fleet: tuple[NodeInfo, ...] = ()

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready dict (nested dataclasses become dicts)."""
        return dataclasses.asdict(self)


class Sampler:
    """Reads OS figures without blocking and caches them for ``max_age`` seconds."""

    def __init__(self, max_age: float = 0.5) -> None:
        self.max_age = max_age
        self._procs: dict[int, psutil.Process] = {}  # keeps cpu_percent's baseline per pid
        self._node: tuple[float, NodeStats] | None = None
        self._trees: dict[int, tuple[float, int | None, float | None]] = {}
        self._members: dict[int, list[int]] = {}  # worker pid -> pids sampled with it
        psutil.cpu_times_percent(interval=None)  # set the baseline of the first reading

    def node(self) -> NodeStats:
        """Memory and CPU idle of the machine."""
        now = time.monotonic()
        if self._node is None or now - self._node[0] > self.max_age:
            memory = psutil.virtual_memory()
            idle = psutil.cpu_times_percent(interval=None).idle
            self._node = (
                now,
                NodeStats(
                    total_memory_bytes=memory.total,
                    available_memory_bytes=memory.available,
                    cpu_idle=idle,
                    cpu_count=psutil.cpu_count() or 1,
                ),
            )
        return self._node[1]

    def tree(self, pid: int | None) -> tuple[int | None, float | None]:
        """RSS bytes and CPU percent of ``pid`` and every process below it (in a
        sandbox the worker is the launcher's great-grandchild, under the init)."""
        if pid is None:
            return None, None
        now = time.monotonic()
        cached = self._trees.get(pid)
        if cached is not None and now - cached[0] <= self.max_age:
            return cached[1], cached[2]
        rss, cpu = 0, 0.0
        pids = [pid, *descendants(pid)]
        for gone in set(self._members.get(pid, ())) - set(pids):
            self._procs.pop(gone, None)
        self._members[pid] = pids
        for member in pids:
            proc = self._procs.get(member)
            try:
                if proc is None:
                    proc = self._procs[member] = psutil.Process(member)
                with proc.oneshot():
                    rss += proc.memory_info().rss
                    cpu += proc.cpu_percent(interval=None)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                self._procs.pop(member, None)
                if member == pid:
                    return None, None
        self._trees[pid] = (now, rss, cpu)
        return rss, cpu

    def forget(self, pid: int | None) -> None:
        """Drop cached state of a worker that is gone."""
        if pid is not None:
            self._trees.pop(pid, None)
            for member in self._members.pop(pid, [pid]):
                self._procs.pop(member, None)
