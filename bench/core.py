"""Benchmark of herd's core pool: prints one table of results against targets.

    python bench/core.py            # full run (~30 s)
    python bench/core.py --quick    # fewer repetitions
    python bench/core.py --json out.json

What it measures (issue #2's targets):

1. fast-path ``acquire`` + ``close`` of a pinned session at 10, 1,000 and 10,000
   live sessions (in-process fake workers: 10,000 processes cannot run here);
   the floor is a dict lookup plus an awaited no-op coroutine;
2. 1,000 concurrent first acquires of one new session ID: spawns counted;
3. a new session when an idle warm worker is ready (real process workers);
4. ``pool.stats()`` with real workers;
5. the event loop's longest stall while a sandboxed pool (namespaces and
   cgroup limits, where the machine has them) starts, spawns and closes
   (issue 14: target ≤ 5 ms). Measured first, in a fresh process, so that the
   start includes the sandbox's detection and the sweep of stale cgroups.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

import herd
from herd.testing import FakeFactory

HTTP_WORKER = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "{port}"]


@dataclass
class Row:
    name: str
    result: float
    unit: str
    target: float | None = None
    better: str = "lower"  # or "equal"

    @property
    def ratio(self) -> float | None:
        if self.target is None or self.target == 0:
            return None
        return self.result / self.target

    @property
    def verdict(self) -> str:
        if self.target is None:
            return ""
        if self.better == "equal":
            return "ok" if self.result == self.target else "MISS"
        return "ok" if self.result <= self.target else "MISS"


class CountingFactory:
    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.spawns = 0

    async def spawn(self) -> Any:
        self.spawns += 1
        return await self.inner.spawn()


def quiet_pool(factory: Any, **kwargs: Any) -> herd.Pool[Any]:
    options: dict[str, Any] = {
        "min_workers": 0,
        "max_workers": 10_000,
        "ttl": None,
        "health_interval": None,
        "idle_worker_timeout": None,
    }
    options.update(kwargs)
    return herd.Pool(factory, **options)


async def median_us(op: Callable[[], Awaitable[None]], reps: int) -> float:
    samples = []
    for _ in range(reps):
        started = time.perf_counter_ns()
        await op()
        samples.append(time.perf_counter_ns() - started)
    return statistics.median(samples) / 1000


async def fast_path(sessions: int, reps: int) -> tuple[float, float]:
    async with quiet_pool(FakeFactory()) as pool:
        ids = [f"s{i}" for i in range(sessions)]
        for sid in ids:
            await (await pool.acquire(sid)).close()
        pick = random.Random(sessions).choice

        async def awaited() -> None:
            session = await pool.acquire(pick(ids))
            await session.close()

        async def context() -> None:
            async with pool.acquire(pick(ids)):
                pass

        await median_us(awaited, reps // 10)  # warm up
        return await median_us(awaited, reps), await median_us(context, reps)


async def floor(reps: int) -> float:
    table = {f"s{i}": i for i in range(1000)}
    ids = list(table)
    pick = random.Random(0).choice

    async def noop() -> int | None:
        return table.get(pick(ids))

    async def op() -> None:
        await noop()

    return await median_us(op, reps)


async def singleflight(factory: Any) -> tuple[int, int, float]:
    counting = CountingFactory(factory)
    async with quiet_pool(counting, max_workers=4) as pool:
        started = time.perf_counter()
        sessions = await asyncio.gather(*(pool.acquire("one-id") for _ in range(1000)))
        elapsed = time.perf_counter() - started
        workers = {s.worker.id for s in sessions}
        for session in sessions:
            await session.close()
    return counting.spawns, len(workers), elapsed


async def warm_new_session(factory: Any, reps: int) -> float:
    async with quiet_pool(factory, min_workers=1, max_workers=2) as pool:
        samples = []
        for i in range(reps):
            deadline = time.monotonic() + 10
            while pool.stats().available_workers < 1:
                if time.monotonic() > deadline:
                    raise RuntimeError("no idle worker came back")
                await asyncio.sleep(0.001)
            started = time.perf_counter_ns()
            session = await pool.acquire(f"new-{i}")
            samples.append(time.perf_counter_ns() - started)
            await session.release()
    return statistics.median(samples) / 1e6


async def stats_cost(pool: herd.Pool[Any], reps: int) -> float:
    async def op() -> None:
        pool.stats()

    return await median_us(op, reps)


def _runqueue_wait() -> float:
    """Seconds this thread has waited for a CPU, runnable but not running."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


class StallMonitor:
    """The event loop's longest stall: a ticker asks to run every ``tick``
    seconds; the longest gap between two of its runs, less ``tick``, is the
    longest time the loop could run nothing else (resolution: a fraction of a ms).

    On a shared 2-core machine the loop's thread also waits for a CPU while the
    workers it starts run Python's start-up; that is the machine's, not the
    code's, so each gap is counted less the time the thread spent runnable but
    not running (``/proc/thread-self/schedstat``). ``raw`` keeps the whole gap.
    """

    def __init__(self, tick: float = 0.0005) -> None:
        self.tick = tick
        self.longest = 0.0
        self.raw = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        last, waited = time.perf_counter(), _runqueue_wait()
        while True:
            await asyncio.sleep(self.tick)
            now, now_waited = time.perf_counter(), _runqueue_wait()
            gap = now - last - self.tick
            self.raw = max(self.raw, gap)
            self.longest = max(self.longest, gap - (now_waited - waited))
            last, waited = now, now_waited

    async def phase(self, work: Awaitable[Any]) -> tuple[float, float]:
        """Run ``work`` under watch; the longest stall during it, in ms, less
        and with the waits for a CPU."""
        self.longest = self.raw = 0.0
        self._task = asyncio.create_task(self._run())
        await asyncio.sleep(0)  # the ticker's first run: it starts counting
        try:
            await work
        finally:
            self._task.cancel()
        return self.longest * 1000, self.raw * 1000


async def stalls() -> list[Row]:
    """Longest loop stalls of a pool's start, spawns and close: sandboxed, then
    not (a close then scans /proc for what the workers left)."""
    rows = []
    for sandbox in (True, False):
        factory = herd.ProcessFactory(
            HTTP_WORKER,
            health_path="/",
            sandbox=sandbox,
            memory_limit=256 << 20,
            pids_limit=64,
            cpu_limit=1.0,
        )
        pool = quiet_pool(factory, min_workers=2, max_workers=6)
        monitor = StallMonitor()
        started = await monitor.phase(pool.start())

        async def spawns(pool: herd.Pool[Any] = pool) -> None:
            sessions = await asyncio.gather(*(pool.acquire(f"stall-{i}") for i in range(4)))
            for session in sessions:
                await session.close()

        spawned = await monitor.phase(spawns())
        closed = await monitor.phase(pool.shutdown())
        kind = f"sandbox {factory.sandbox_report.level}" if sandbox else "no sandbox"
        rows += [
            Row(f"loop stall: Pool.start, 2 workers ({kind})", started[0], "ms", 5),
            Row(f"loop stall: 4 spawns at once ({kind})", spawned[0], "ms", 5),
            Row(f"loop stall: Pool.shutdown, 6 workers ({kind})", closed[0], "ms", 5),
            Row(
                "  the same three, with waits for a CPU (max)",
                max(started[1], spawned[1], closed[1]),
                "ms",
            ),
        ]
    return rows


async def run(quick: bool) -> list[Row]:
    reps = 2_000 if quick else 20_000
    rows: list[Row] = await stalls()
    base = await floor(reps)
    rows.append(Row("floor: dict.get + awaited no-op coroutine", base, "µs"))
    fast: dict[int, float] = {}
    for n in (10, 1_000, 10_000):
        awaited, context = await fast_path(n, reps)
        fast[n] = awaited
        rows.append(Row(f"fast path acquire+close, {n:,} sessions (await)", awaited, "µs", 20))
        rows.append(Row(f"fast path acquire+close, {n:,} sessions (async with)", context, "µs", 20))
    rows.append(Row("fast path 10,000 / 10 sessions", fast[10_000] / fast[10], "x", 1.5))
    rows.append(Row("fast path vs floor (10 sessions)", fast[10] / base, "x"))

    http = herd.ProcessFactory(HTTP_WORKER, health_path="/")
    spawns, workers, elapsed = await singleflight(http)
    rows.append(Row("1,000 concurrent first acquires: spawns (process)", spawns, "", 1, "equal"))
    rows.append(Row("1,000 concurrent first acquires: workers seen", workers, "", 1, "equal"))
    rows.append(Row("1,000 concurrent first acquires: wall time", elapsed * 1000, "ms"))
    spawns, workers, _ = await singleflight(FakeFactory(spawn_delay=0.05))
    rows.append(
        Row("1,000 concurrent first acquires: spawns (fake, 50 ms)", spawns, "", 1, "equal")
    )

    warm_reps = 50 if quick else 300
    rows.append(
        Row(
            "new session, idle warm worker (process)",
            await warm_new_session(http, warm_reps),
            "ms",
            2,
        )
    )
    rows.append(
        Row(
            "new session, idle warm worker (fake)",
            await warm_new_session(FakeFactory(), warm_reps),
            "ms",
            2,
        )
    )

    stat_reps = 500 if quick else 5_000
    async with quiet_pool(http, min_workers=4, max_workers=4) as pool:
        for sid in ("a", "b"):
            await (await pool.acquire(sid)).close()
        rows.append(
            Row("stats(), 4 process workers", await stats_cost(pool, stat_reps), "µs", 1000)
        )
        assert pool._sampler is not None
        pool._sampler.max_age = 0  # every call reads /proc: the worst case
        cost = await stats_cost(pool, stat_reps)
        rows.append(Row("stats(), 4 process workers, no sampler cache", cost, "µs", 1000))
    for count, target in ((100, 1000.0), (1000, None)):
        async with quiet_pool(FakeFactory()) as pool:
            for i in range(count):
                await (await pool.acquire(f"s{i}")).close()
            cost = await stats_cost(pool, stat_reps)
            rows.append(Row(f"stats(), {count:,} fake workers (per-row cost)", cost, "µs", target))
    return rows


def table(rows: list[Row]) -> str:
    header = f"{'measurement':<56} {'result':>12} {'target':>10} {'ratio':>7}  verdict"
    lines = [header, "-" * len(header)]
    for row in rows:
        target = (
            "" if row.target is None else f"{'=' if row.better == 'equal' else '≤'}{row.target:g}"
        )
        ratio = "" if row.ratio is None else f"{row.ratio:.2f}"
        result = f"{row.result:.2f} {row.unit}".strip() if row.unit else f"{row.result:g}"
        lines.append(f"{row.name:<56} {result:>12} {target:>10} {ratio:>7}  {row.verdict}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args()
    rows = asyncio.run(run(args.quick))
    print(f"herd {herd.__version__} core benchmark, Python {sys.version.split()[0]}")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                [asdict(r) | {"ratio": r.ratio, "verdict": r.verdict} for r in rows], f, indent=2
            )


if __name__ == "__main__":
    main()
