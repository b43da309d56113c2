"""herd_nb.KernelFactory: real ipykernel kernels as pool workers."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.kernelspec import KernelSpecManager

import herd
import herd_nb
from herd import _cgroups
from tests.helpers import pid_alive, wait_until


async def run(worker: Any, code: str) -> tuple[str, str]:
    """Execute ``code``; the reply status and everything printed."""
    printed: list[str] = []

    def hook(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "stream":
            printed.append(msg["content"]["text"])

    reply = await worker.client.execute_interactive(code, output_hook=hook, timeout=20)
    return reply["content"]["status"], "".join(printed)


async def test_a_kernel_worker_executes_code_and_answers_health_checks() -> None:
    worker = await herd_nb.KernelFactory("python3").spawn()
    try:
        assert await run(worker, "print(6 * 7)") == ("ok", "42\n")
        assert await worker.healthy()
        assert worker.kernel_name == "python3"
        assert worker.address.startswith("127.0.0.1:")
        assert pid_alive(worker.pid)
    finally:
        await worker.close()
    assert not worker.alive
    assert not await worker.healthy()


async def test_sessions_keep_their_own_kernel() -> None:
    async with herd.Pool(herd_nb.KernelFactory(), min_workers=1, max_workers=2) as pool:
        async with pool.acquire("alice") as session:
            assert (await run(session.worker, "secret = 'alice'"))[0] == "ok"
        async with pool.acquire("bob") as session:
            status, _ = await run(session.worker, "print(secret)")
            assert status == "error"  # bob's kernel never saw alice's variable
        async with pool.acquire("alice") as session:
            assert await run(session.worker, "print(secret)") == ("ok", "alice\n")
        await pool.check_health()
        assert pool.stats().active_sessions == 2


async def test_a_dead_kernel_goes_through_the_crash_path() -> None:
    crashed: list[str] = []
    async with herd.Pool(
        herd_nb.KernelFactory(), min_workers=0, max_workers=2, on_crash=crashed.append
    ) as pool:
        async with pool.acquire("nb") as session:
            dead = session.worker
            await run(dead, "x = 1")
        assert dead.pid is not None
        os.killpg(dead.pid, signal.SIGKILL)
        await wait_until(lambda: crashed == ["nb"], timeout=10, what="crash path")
        async with pool.acquire("nb") as session:
            assert session.worker.id != dead.id
            assert (await run(session.worker, "print(x)"))[0] == "error"  # a fresh kernel


async def test_a_busy_kernel_still_passes_health_checks() -> None:
    worker = await herd_nb.KernelFactory(health_timeout=1).spawn()
    try:
        worker.client.execute("import time; time.sleep(3)")
        reply = await worker.client.get_iopub_msg(timeout=5)
        while reply["content"].get("execution_state") != "busy":
            reply = await worker.client.get_iopub_msg(timeout=5)
        # The probe goes to the control channel: a long cell is not a dead kernel.
        assert await worker.healthy()
    finally:
        await worker.close()


async def test_run_silently_returns_when_the_kernel_dies_instead_of_waiting() -> None:
    worker = await herd_nb.KernelFactory().spawn()
    try:
        assert await worker.run_silently("x = 1", timeout=20)
        started = time.monotonic()
        assert not await worker.run_silently("import os; os._exit(3)", timeout=60)
        assert time.monotonic() - started < 30  # the exit, not the 60 s timeout
        assert not worker.alive
    finally:
        await worker.close()


async def test_an_in_place_restart_keeps_the_worker_and_its_session() -> None:
    crashed: list[str] = []
    async with herd.Pool(
        herd_nb.KernelFactory(), min_workers=0, max_workers=1, on_crash=crashed.append
    ) as pool:
        async with pool.acquire("nb") as session:
            worker = session.worker
            assert isinstance(worker, herd_nb.KernelWorker)
            await run(worker, "x = 1")
            old_pid = worker.pid
            await worker.manager.restart_kernel(now=True)
            assert worker.alive
            assert worker.pid != old_pid
            assert not pid_alive(old_pid)
            await worker.client.wait_for_ready(timeout=30)
            assert (await run(worker, "print(x)"))[0] == "error"  # a fresh interpreter
            assert await run(worker, "print(2)") == ("ok", "2\n")
            assert await worker.healthy()
        await pool.check_health()
        assert crashed == []
        assert pool.sessions() == {"nb": worker.id}
        # The restarted process is the one watched: killing it is a crash.
        assert worker.pid is not None
        os.killpg(worker.pid, signal.SIGKILL)
        await wait_until(lambda: crashed == ["nb"], timeout=10, what="crash path")


@pytest.mark.skipif(
    _cgroups.detect().version is None, reason=f"no usable cgroups here: {_cgroups.detect().reason}"
)
async def test_kernels_get_the_sandbox_limits() -> None:
    crashed: list[str] = []
    factory = herd_nb.KernelFactory(memory_limit=160 << 20)
    async with herd.Pool(factory, min_workers=0, max_workers=1, on_crash=crashed.append) as pool:
        assert pool.stats().sandbox in ("full", "partial")
        session = await pool.acquire("greedy")
        worker = session.worker
        assert isinstance(worker, herd_nb.KernelWorker)
        assert worker.cgroup is not None
        worker.client.execute("hoard = bytearray(600 << 20)")
        await wait_until(lambda: crashed == ["greedy"], timeout=20, what="OOM crash")
        assert pool.stats().recent_crashes[-1].reason == "killed: memory limit 160 MiB"
        await session.close()


async def test_any_installed_kernelspec_works(tmp_path: Path) -> None:
    spec = tmp_path / "herd-test-kernel"
    spec.mkdir()
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "herd test kernel",
                "language": "python",
                "env": {"HERD_TEST_KERNEL": "yes"},
            }
        )
    )
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path)])
    factory = herd_nb.KernelFactory("herd-test-kernel", kernel_spec_manager=specs)
    worker = await factory.spawn()
    try:
        code = "import os; print(os.environ['HERD_TEST_KERNEL'])"
        assert await run(worker, code) == ("ok", "yes\n")
    finally:
        await worker.close()


async def test_unknown_kernelspec_is_a_spawn_error() -> None:
    with pytest.raises(herd.SpawnError, match="no-such-kernel"):
        await herd_nb.KernelFactory("no-such-kernel").spawn()


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="kernel_name"):
        herd_nb.KernelFactory("")
    with pytest.raises(ValueError, match="pids_limit"):
        herd_nb.KernelFactory(pids_limit=0)
    with pytest.raises(ValueError, match="startup_timeout"):
        herd_nb.KernelFactory(startup_timeout=-1)


async def test_a_kernel_whose_port_was_taken_starts_again_on_new_ports(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The first port chosen for the kernel is taken by another process before
    the kernel binds it (as any outgoing connection may take it): the kernel
    exits with ZMQ's "Address already in use", and is started again on new
    ports, as Jupyter's restarter does, instead of failing the spawn."""
    from jupyter_client.provisioning.local_provisioner import LocalPortCache

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    taken = listener.getsockname()[1]
    handed = []
    find = LocalPortCache.find_available_port

    def find_taken_first(self: LocalPortCache, ip: str) -> int:
        port = taken if not handed else find(self, ip)
        handed.append(port)
        return port

    monkeypatch.setattr(LocalPortCache, "find_available_port", find_taken_first)
    caplog.set_level("INFO", logger="herd_nb")
    try:
        worker = await herd_nb.KernelFactory("python3").spawn()
        try:
            assert handed[0] == taken
            info = worker.manager.get_connection_info()
            assert taken not in {info[f"{c}_port"] for c in ("shell", "iopub", "stdin", "control")}
            assert await run(worker, "print(6 * 7)") == ("ok", "42\n")
            assert "a port was taken; starting it again on new ports" in caplog.text
        finally:
            await worker.close()
    finally:
        listener.close()
