"""Pool metrics in the Jupyter server's Prometheus ``/metrics``.

A collector reads every pool's :meth:`herd.Pool.stats` when Prometheus scrapes,
so the numbers are never stale and nothing runs between scrapes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric

import herd

__all__ = ["PoolCollector"]

STATES = ("idle", "pinned", "ending")  # what WorkerStats.state can say


class PoolCollector:
    """``herd_workers{pool,state}``, ``herd_sessions{pool}``, ``herd_spawn_failures{pool}``."""

    def __init__(self, pools: Mapping[str, herd.Pool[Any]]) -> None:
        self.pools = pools

    def describe(self) -> list[Metric]:
        return []  # registering must not call collect() before the pools run

    def collect(self) -> Iterator[Metric]:
        workers = GaugeMetricFamily(
            "herd_workers", "Workers by pool and state", labels=["pool", "state"]
        )
        sessions = GaugeMetricFamily("herd_sessions", "Pinned sessions", labels=["pool"])
        failures = GaugeMetricFamily(
            "herd_spawn_failures", "Consecutive failed spawns", labels=["pool"]
        )
        for name, pool in self.pools.items():
            stats = pool.stats()
            counts = Counter(row.state for row in stats.workers)
            for state in STATES:
                workers.add_metric([name, state], counts.get(state, 0))
            workers.add_metric([name, "starting"], stats.starting_workers)
            sessions.add_metric([name], stats.active_sessions)
            failures.add_metric([name], stats.spawn_failures)
        yield workers
        yield sessions
        yield failures
