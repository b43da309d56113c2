"""Jupyter kernels as herd workers: ``KernelFactory`` and ``KernelWorker``.

A kernel worker is a process worker whose client is a ready
:class:`jupyter_client.asynchronous.AsyncKernelClient` instead of an HTTP client::

    async with herd.Pool(herd_nb.KernelFactory("python3"), min_workers=2) as pool:
        async with pool.acquire("notebook-1") as session:
            reply = await session.worker.client.execute_interactive("x = 42")

Kernels start through jupyter_client's own machinery (any installed kernelspec),
with herd's sandbox around them: the kernel command runs under the same launcher
as any :class:`herd.ProcessFactory` worker (its own PID namespace, parent-death
signal, cgroup limits joined before exec), and everything else a process worker
does comes with it: the exit watch, bounded logs, whole-tree kill on close.

Health is a ``kernel_info`` round trip on a second client of its own, so a
probe never consumes replies meant for the session's client.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import queue
import subprocess
import time
from collections.abc import Mapping
from typing import Any

from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.manager import AsyncKernelManager
from jupyter_client.session import Session

from herd import SpawnError
from herd._cgroups import WorkerCgroup
from herd._config import Duration
from herd._process import TAG_VARIABLE, ProcessWorker
from herd._process import _required as _seconds
from herd._sandbox import Sandbox, SandboxMode, SandboxReport

__all__ = ["KernelFactory", "KernelWorker"]

_kernel_ids = itertools.count(1)


class _SandboxedKernelManager(AsyncKernelManager):
    """Puts herd's launcher in front of the kernelspec's command."""

    herd_prefix: tuple[str, ...] = ()

    def format_kernel_cmd(self, extra_arguments: list[str] | None = None) -> list[str]:
        return [*self.herd_prefix, *super().format_kernel_cmd(extra_arguments)]


class KernelWorker(ProcessWorker):
    """A running Jupyter kernel, pinned to sessions by a :class:`herd.Pool`.

    :ivar manager: the kernel's :class:`~jupyter_client.manager.AsyncKernelManager`.
    :ivar kernel_name: the kernelspec it was started from.
    """

    def __init__(
        self,
        manager: AsyncKernelManager,
        proc: subprocess.Popen[bytes],
        *,
        health_timeout: float,
        stop_timeout: float,
        log_lines: int,
        sandbox: SandboxReport,
        tag: str,
        cgroup: WorkerCgroup | None,
    ) -> None:
        info = manager.get_connection_info()
        super().__init__(
            proc,
            port=int(info["shell_port"]),
            command=[str(arg) for arg in proc.args],  # type: ignore[union-attr]
            health_path="",
            health_timeout=health_timeout,
            stop_timeout=stop_timeout,
            log_lines=log_lines,
            sandbox=sandbox,
            tag=tag,
            cgroup=cgroup,
        )
        self.id = f"k-{next(_kernel_ids)}"
        self.manager = manager
        self.kernel_name: str = manager.kernel_name
        self._kernel_address = f"{info['ip']}:{info['shell_port']}"
        self._kernel_client: AsyncKernelClient = manager.client()
        # A shell socket's ZMQ identity is its session ID: a probe sharing the
        # session's would have its replies routed to the session's client.
        own = Session(key=manager.session.key, signature_scheme=manager.session.signature_scheme)
        self._probe: AsyncKernelClient = manager.client(session=own)

    @property
    def address(self) -> str:
        """``"ip:shell_port"`` of the kernel."""
        return self._kernel_address

    @property
    def client(self) -> AsyncKernelClient:  # type: ignore[override]
        """A ready async kernel client (channels started) for the session's use."""
        return self._kernel_client

    async def _until_ready(self, timeout: float) -> None:
        self._kernel_client.start_channels()
        self._probe.start_channels(shell=True, iopub=False, stdin=False, hb=False, control=False)
        ready = asyncio.ensure_future(self._kernel_client.wait_for_ready(timeout=timeout))
        died = asyncio.ensure_future(self.wait())
        done, _ = await asyncio.wait([ready, died], return_when=asyncio.FIRST_COMPLETED)
        if died in done:
            ready.cancel()
            raise SpawnError(
                f"kernel {self.kernel_name!r} {died.result()} during start-up",
                command=self.command,
                exit_code=self.returncode,
                output_tail=self.logs(20),
                worker_id=self.id,
            )
        died.cancel()
        try:
            ready.result()
            await self._nudge(timeout)
        except (RuntimeError, TimeoutError) as exc:
            raise SpawnError(
                f"kernel {self.kernel_name!r} not ready after {timeout:g}s: {exc}",
                command=self.command,
                output_tail=self.logs(20),
                worker_id=self.id,
            ) from None

    async def _nudge(self, timeout: float) -> None:
        """Ask ``kernel_info`` until IOPub carries an answer too.

        A ZMQ subscription takes a moment to join: messages published before
        that are lost, and a first ``execute`` would wait forever for its
        status. Jupyter's server nudges kernels the same way.
        """
        client = self._kernel_client
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            client.kernel_info()
            try:
                await client.iopub_channel.get_msg(timeout=0.2)
                break
            except queue.Empty:
                if loop.time() > deadline:
                    raise TimeoutError("no IOPub message from the kernel") from None
        for channel in (client.iopub_channel, client.shell_channel):
            with contextlib.suppress(queue.Empty):  # what the nudges left behind
                while True:
                    await channel.get_msg(timeout=0.05)

    async def healthy(self) -> bool:
        """A ``kernel_info`` round trip within ``health_timeout``."""
        if not self.alive:
            return False
        try:
            reply = await self._probe.kernel_info(reply=True, timeout=self._health_timeout)
        except Exception:
            return False
        return bool(reply.get("content", {}).get("status") == "ok")

    async def close(self) -> None:
        """Stop the channels, kill the kernel's whole tree, remove its files. Idempotent."""
        for client in (self._kernel_client, self._probe):
            if client.channels_running:
                client.stop_channels()
        await super().close()
        # Connection and IPC files, the control socket and the ZMQ context. The
        # public cleanup_resources() is a sync wrapper of this coroutine.
        with contextlib.suppress(Exception):
            await self.manager._async_cleanup_resources(restart=False)

    def __repr__(self) -> str:
        state = "alive" if self.alive else "dead"
        return f"<KernelWorker {self.id} {self.kernel_name} pid={self.pid} {state}>"


class KernelFactory:
    """Starts Jupyter kernels as :class:`herd.Pool` workers.

    :param kernel_name: any installed kernelspec (``jupyter kernelspec list``).
    :param cwd: the kernels' working directory.
    :param env: extra environment variables for the kernels.
    :param startup_timeout: seconds until the kernel answers ``kernel_info``.
    :param health_timeout: seconds one ``kernel_info`` health probe may take.
    :param stop_timeout: seconds between SIGTERM and SIGKILL on close.
    :param sandbox: as for :class:`herd.ProcessFactory`.
    :param cpu_limit: cores per kernel.
    :param memory_limit: bytes per kernel (past it the kernel is killed: a crash).
    :param pids_limit: processes and threads per kernel (``-1``: no limit).
    :param kernel_spec_manager: where kernelspecs are looked up (jupyter_client's
        default when ``None``).
    :raises ValueError: a bad option.
    """

    def __init__(
        self,
        kernel_name: str = "python3",
        *,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        startup_timeout: Duration = 60.0,
        health_timeout: Duration = 5.0,
        stop_timeout: Duration = 1.0,
        sandbox: SandboxMode = True,
        cpu_limit: float | None = None,
        memory_limit: int | None = None,
        pids_limit: int | None = None,
        log_lines: int = 1000,
        kernel_spec_manager: Any = None,
    ) -> None:
        if not isinstance(kernel_name, str) or not kernel_name:
            raise ValueError(f"kernel_name must be a kernelspec name, not {kernel_name!r}")
        self.kernel_name = kernel_name
        self.cwd = os.fspath(cwd) if cwd is not None else None
        self.env = dict(env or {})
        self.startup_timeout = _seconds("startup_timeout", startup_timeout)
        self.health_timeout = _seconds("health_timeout", health_timeout)
        self.stop_timeout = _seconds("stop_timeout", stop_timeout)
        self.log_lines = log_lines
        self.kernel_spec_manager = kernel_spec_manager
        self._sandbox = Sandbox(
            sandbox, cpu_limit=cpu_limit, memory_limit=memory_limit, pids_limit=pids_limit
        )

    @property
    def sandbox_report(self) -> SandboxReport:
        """What isolation the kernels get here, and why not more."""
        return self._sandbox.report

    def __repr__(self) -> str:
        return f"KernelFactory({self.kernel_name!r})"

    async def spawn(self) -> KernelWorker:
        """Start one kernel and return it once it answers ``kernel_info``.

        :raises herd.SpawnError: no such kernelspec, the kernel exited during
            start-up, or it was not ready within ``startup_timeout``.
        """
        report = self._sandbox.check()
        tag = f"{os.getpid()}-k-{time.monotonic_ns()}"
        cgroup = self._sandbox.cgroup(tag)
        prefix, preexec = self._sandbox.launch_plan(cgroup)
        options: dict[str, Any] = {"kernel_name": self.kernel_name}
        if self.kernel_spec_manager is not None:
            options["kernel_spec_manager"] = self.kernel_spec_manager
        manager = _SandboxedKernelManager(**options)
        manager.herd_prefix = prefix
        env = {**os.environ, **self.env, TAG_VARIABLE: tag}
        try:
            await manager.start_kernel(
                cwd=self.cwd,
                env=env,
                preexec_fn=preexec,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        except Exception as exc:
            if cgroup is not None:
                cgroup.remove()
            with contextlib.suppress(Exception):
                await manager._async_cleanup_resources(restart=False)
            raise SpawnError(f"cannot start kernel {self.kernel_name!r}: {exc}") from exc
        worker = KernelWorker(
            manager,
            manager.provisioner.process,  # type: ignore[union-attr]
            health_timeout=self.health_timeout,
            stop_timeout=self.stop_timeout,
            log_lines=self.log_lines,
            sandbox=report,
            tag=tag,
            cgroup=cgroup,
        )
        try:
            await worker._until_ready(self.startup_timeout)
        except BaseException:
            await worker.close()
            raise
        return worker
