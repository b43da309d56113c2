"""Work that may block runs off the event loop: the loop keeps serving while a
pool detects its sandbox, sweeps stale cgroups, starts workers and closes them.

Each test makes one such step slow on purpose (a sleep in front of the real
thing) and watches the loop's longest stall while the pool goes through it: on
the loop, the stall would be the whole sleep. (The stalls themselves, without
the sleeps, are measured by ``bench/core.py``: timing is not asserted here.)
"""

from __future__ import annotations

import asyncio
import functools
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest

import herd
from herd import _cgroups
from herd import _sandbox as herd_sandbox
from herd._procfs import with_environ
from tests.helpers import factory

SLOW = 0.4  # seconds each slowed step sleeps
STALL = 0.15  # the longest stall allowed: well under SLOW, well over the machine's noise

T = TypeVar("T")
GROUPS = _cgroups.detect()
needs_cgroups = pytest.mark.skipif(
    GROUPS.version is None, reason=f"no usable cgroups here: {GROUPS.reason}"
)


def slowed(function: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(function)
    def slow(*args: Any, **kwargs: Any) -> T:
        time.sleep(SLOW)
        return function(*args, **kwargs)

    return slow


async def longest_stall(work: Awaitable[object]) -> float:
    """Run ``work``; the longest time (s) the loop ran nothing else meanwhile."""
    longest = 0.0

    async def ticker() -> None:
        nonlocal longest
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.005)
            now = time.monotonic()
            longest = max(longest, now - last)
            last = now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    try:
        await work
    finally:
        task.cancel()
    return longest


async def stall_of_a_start(spawner: herd.ProcessFactory, min_workers: int) -> float:
    """The longest stall while a pool of ``spawner`` starts (it is shut down after)."""
    pool = herd.Pool(spawner, min_workers=min_workers, max_workers=1)
    try:
        return await longest_stall(pool.start())
    finally:
        await pool.shutdown()


@pytest.fixture
def fresh_detection() -> Iterator[None]:
    """Forget what this process detected, before and after the test."""
    caches = (herd_sandbox.detect, herd_sandbox.launcher_tools, _cgroups.detect)
    for cache in caches:
        cache.cache_clear()
    yield
    for cache in caches:
        cache.cache_clear()


@pytest.mark.usefixtures("fresh_detection")
@pytest.mark.parametrize("min_workers", [0, 1])
async def test_sandbox_detection_does_not_block_the_loop(
    monkeypatch: pytest.MonkeyPatch, min_workers: int
) -> None:
    """Detection runs probe processes (``unshare``, ``setpriv``); a pool with no
    worker to start still reports its sandbox level, so it detects too."""
    monkeypatch.setattr(herd_sandbox, "_probe", slowed(herd_sandbox._probe))
    monkeypatch.setattr(subprocess, "run", slowed(subprocess.run))
    assert await stall_of_a_start(factory(sandbox=True), min_workers) < STALL


@needs_cgroups
async def test_the_stale_cgroup_sweep_does_not_block_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_cgroups, "sweep_stale", slowed(_cgroups.sweep_stale))
    assert await stall_of_a_start(factory(memory_limit=256 << 20), 1) < STALL


@needs_cgroups
async def test_creating_a_workers_cgroup_does_not_block_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(herd_sandbox.Sandbox, "cgroup", slowed(herd_sandbox.Sandbox.cgroup))
    spawner = factory(memory_limit=256 << 20)

    async def spawn_and_close() -> None:
        await (await spawner.spawn()).close()

    assert await longest_stall(spawn_and_close()) < STALL


async def test_the_scan_for_a_closed_workers_strays_does_not_block_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without a PID namespace a close scans /proc for processes with the
    worker's tag (a daemon that left its process group)."""
    worker = await factory(sandbox=False).spawn()
    monkeypatch.setattr("herd._process.with_environ", slowed(with_environ))
    assert await longest_stall(worker.close()) < STALL
