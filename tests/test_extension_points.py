"""The optional abilities a worker or factory may have, as public protocols.

A worker that says it has exited (:class:`herd.ExitAware`) or hit a limit
(:class:`herd.LimitAware`) is declared dead on its first failed probe, with the
limit in the reason; a factory that reports its sandbox
(:class:`herd.SandboxReporting`) has it in the pool's stats. Matching the method
is enough: nothing here subclasses a herd class.
"""

from __future__ import annotations

import socket

import herd
import herd.sandbox
from herd.testing import FakeFactory, FakeWorker
from tests.helpers import factory, wait_until


class ExitingWorker(FakeWorker):
    """A fake worker that knows whether its (imaginary) process runs."""

    def __init__(self) -> None:
        super().__init__()
        self.alive = True


class LimitedWorker(FakeWorker):
    """A fake worker stuck at a cgroup limit it can name."""

    def __init__(self) -> None:
        super().__init__()
        self.breach: str | None = None

    def limit_breach(self) -> str | None:
        return self.breach


class OwnNetworkWorker(FakeWorker):
    def open_socket(self) -> socket.socket:
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM)


class Factory(FakeFactory):
    """Makes workers of a given class; reports a sandbox."""

    def __init__(self, kind: type[FakeWorker]) -> None:
        super().__init__()
        self.kind = kind

    async def spawn(self) -> FakeWorker:
        worker = self.kind()
        self.spawned.append(worker)
        return worker

    @property
    def sandbox_report(self) -> herd.sandbox.SandboxReport:
        return herd.sandbox.SandboxReport("partial", "a test's own words")


async def test_the_shipped_process_worker_has_every_ability() -> None:
    made = factory()
    assert isinstance(made, herd.SandboxReporting)
    worker = await made.spawn()
    try:
        for protocol in (herd.ExitAware, herd.LimitAware, herd.SocketOpener):
            assert isinstance(worker, protocol), protocol
    finally:
        await worker.close()


async def test_fake_workers_have_none_of_the_optional_abilities() -> None:
    assert not isinstance(FakeFactory(), herd.SandboxReporting)
    assert isinstance(Factory(FakeWorker), herd.SandboxReporting)
    worker = FakeWorker()
    for protocol in (herd.ExitAware, herd.LimitAware, herd.SocketOpener):
        assert not isinstance(worker, protocol), protocol
    assert isinstance(ExitingWorker(), herd.ExitAware)
    assert isinstance(LimitedWorker(), herd.LimitAware)
    assert isinstance(OwnNetworkWorker(), herd.SocketOpener)


async def probe_failing(kind: type[FakeWorker], worker_setup: str) -> tuple[bool, str]:
    """One failed probe of a pinned worker of ``kind``: is it dead, and why."""
    crashed: list[str] = []
    async with herd.Pool(
        Factory(kind), min_workers=0, max_workers=1, health_interval=None, on_crash=crashed.append
    ) as pool:
        async with pool.acquire("s") as session:
            worker = session.worker
        assert isinstance(worker, FakeWorker)
        worker.healthy_answer = False
        if worker_setup == "exited":
            assert isinstance(worker, ExitingWorker)
            worker.alive = False
        elif worker_setup == "breach":
            assert isinstance(worker, LimitedWorker)
            worker.breach = "throttled: cpu limit 0.5"
        alive = await pool.check_worker(worker.id)
        if not alive:
            await wait_until(lambda: crashed == ["s"], what="the crash path")
            return False, pool.stats().recent_crashes[-1].reason
        return True, ""


async def test_a_plain_worker_failing_one_probe_is_given_time() -> None:
    """Without either ability one miss may be a busy spell (health_failures=3)."""
    assert await probe_failing(FakeWorker, "") == (True, "")


async def test_an_exit_aware_worker_that_exited_is_dead_at_its_first_failed_probe() -> None:
    alive, _ = await probe_failing(ExitingWorker, "exited")
    assert not alive


async def test_a_limit_aware_worker_at_its_limit_is_dead_with_the_limit_named() -> None:
    alive, reason = await probe_failing(LimitedWorker, "breach")
    assert not alive
    assert "throttled: cpu limit 0.5" in reason


async def test_a_sandbox_reporting_factory_shows_in_the_stats() -> None:
    async with herd.Pool(Factory(FakeWorker), min_workers=0, max_workers=1) as pool:
        stats = pool.stats()
    assert (stats.sandbox, stats.sandbox_reason) == ("partial", "a test's own words")
    async with herd.Pool(FakeFactory(), min_workers=0, max_workers=1) as pool:
        assert pool.stats().sandbox == "unknown"
