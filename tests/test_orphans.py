"""No orphans, ever: a SIGKILLed pool process leaves no worker behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import TAG
from tests.helpers import WORKER, pid_alive, tagged_processes, wait_until_sync

POOL_PROGRAM = textwrap.dedent(
    """
    import asyncio, json, sys
    import herd

    async def main() -> None:
        factory = herd.ProcessFactory(
            [sys.executable, {worker!r}, "{{port}}"],
            env={env!r},
            sandbox={sandbox!r},
        )
        async with herd.Pool(factory, min_workers=2, max_workers=3) as pool:
            async with pool.acquire("pinned") as session:
                await session.worker.client.get("/daemon")
            print(json.dumps([w.pid for w in pool.workers()]), flush=True)
            await asyncio.Event().wait()

    asyncio.run(main())
    """
)


def run_pool_then_sigkill(env: dict[str, str], sandbox: bool) -> list[int]:
    """Start a pool in a child process, SIGKILL it; return its workers' PIDs."""
    program = POOL_PROGRAM.format(worker=WORKER, env=env, sandbox=sandbox)
    pool = subprocess.Popen(
        [sys.executable, "-c", program], stdout=subprocess.PIPE, text=True, cwd=os.getcwd()
    )
    try:
        assert pool.stdout is not None
        line = pool.stdout.readline()
        assert line, "the pool process died before it was ready"
        workers = json.loads(line)
        assert len(workers) >= 2
        # Workers, their PID-1 programs and the daemons all carry the test tag.
        assert len(tagged_processes(TAG)) >= 3 * len(workers) if sandbox else len(workers)
        os.kill(pool.pid, signal.SIGKILL)
        pool.wait(5)
    finally:
        if pool.poll() is None:
            pool.kill()
            pool.wait()
        if pool.stdout is not None:
            pool.stdout.close()
    return workers


@pytest.mark.timeout(30)
def test_sigkilled_pool_leaves_no_worker_even_when_workers_double_fork() -> None:
    run_pool_then_sigkill({"WORKER_DOUBLE_FORK": "1"}, sandbox=True)
    wait_until_sync(lambda: not tagged_processes(TAG), timeout=2.0, what="every worker to die")


@pytest.mark.timeout(30)
def test_sigkilled_pool_leaves_no_direct_worker_without_sandbox() -> None:
    # Without namespaces the parent-death signal still takes the workers
    # themselves (daemons that leave the tree need the sandbox, see above).
    workers = run_pool_then_sigkill({}, sandbox=False)
    wait_until_sync(
        lambda: not any(pid_alive(p) for p in workers), timeout=2.0, what="every worker to die"
    )
    wait_until_sync(lambda: not tagged_processes(TAG), timeout=2.0, what="no tagged process")
