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

A kernel is healthy while its process runs: it is never probed for answers,
because a cell that holds the GIL keeps it from answering on any channel for
as long as it runs, and a busy kernel is not a dead one (stock Jupyter lets the
cell finish). Its death is its process's exit, which the exit watch sees at once.
Herd's own silent executes (retargeting, reset) go over a second client, so they
never consume replies meant for the session's client.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import queue
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import zmq
from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.manager import AsyncKernelManager
from jupyter_client.session import Session

from herd import Duration, SpawnError
from herd._config import required_seconds as _seconds
from herd._process import PORT_RACE_RETRIES, ProcessWorker
from herd.sandbox import WORKER_TAG_VARIABLE as TAG_VARIABLE
from herd.sandbox import Sandbox, SandboxMode, SandboxReport, WorkerCgroup

__all__ = ["KernelFactory", "KernelWorker"]

log = logging.getLogger("herd_nb")

_kernel_ids = itertools.count(1)


class _HerdLaunch:
    """Mixed into a kernel manager class for herd's workers.

    It puts herd's launcher in front of the kernelspec's command, lets the worker
    live through an in-place restart (same ports, same cgroup: a restart is not a
    crash), and never auto-restarts: a kernel that dies takes the pool's crash path.
    """

    herd_prefix: tuple[str, ...] = ()
    herd_worker: KernelWorker | None = None
    _herd_callbacks: dict[str, list[Callable[[], object]]] | None = None

    # With no auto-restarter, jupyter_client drops restart callbacks; the server's
    # "dead" callbacks (tell the clients, forget the kernel) are kept here instead.
    def add_restart_callback(self, callback: Callable[[], object], event: str = "restart") -> None:
        if self._herd_callbacks is None:
            self._herd_callbacks = {}
        self._herd_callbacks.setdefault(event, []).append(callback)

    def remove_restart_callback(
        self, callback: Callable[[], object], event: str = "restart"
    ) -> None:
        with contextlib.suppress(KeyError, ValueError, TypeError):
            self._herd_callbacks[event].remove(callback)  # type: ignore[index]

    def herd_fire(self, event: str) -> None:
        """Call the callbacks registered for ``event`` (``"dead"``); errors are logged."""
        for callback in list((self._herd_callbacks or {}).get(event, [])):
            try:
                callback()
            except Exception:
                log.exception("%s callback %r failed", event, callback)

    def format_kernel_cmd(self, extra_arguments: list[str] | None = None) -> list[str]:
        return [*self.herd_prefix, *super().format_kernel_cmd(extra_arguments)]  # type: ignore[misc]

    async def restart_kernel(self, now: bool = False, newports: bool = False, **kw: Any) -> None:
        restart = super().restart_kernel  # type: ignore[misc]
        worker = self.herd_worker
        if worker is None:
            await restart(now=now, newports=newports, **kw)
            return
        async with worker.restarting():
            await restart(now=now, newports=newports, **kw)


@functools.cache
def _launch_class(base: type[AsyncKernelManager]) -> type[AsyncKernelManager]:
    return type(f"Herd{base.__name__}", (_HerdLaunch, base), {})


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
        self._kernel_client, self._probe = self._new_clients()
        self._restart: asyncio.Future[None] | None = None
        #: Called with the reason when the kernel exits on its own (not closed, not
        #: restarted by its manager); returns once a new kernel process runs in the
        #: worker (an auto-restart in place) or it gave up. Set by herd_nb's kernel
        #: manager for notebook kernels: the pool sees no exit until it gave up.
        self.on_exit: Callable[[str], Awaitable[None]] | None = None
        # The exit being handled by on_exit, and the task handling it (one for all
        # the waiters of that exit).
        self._revival: tuple[asyncio.Future[str], asyncio.Task[None]] | None = None
        # Cgroup event counts when the current process started: a limit hit by an
        # earlier process of the worker is not this one's death.
        self._breaches_before = self._breach_counts()
        #: The environment the kernel was started with (before the kernelspec's own).
        self.launch_env: dict[str, str] = {}
        #: The directory the kernel was started in.
        self.cwd: str = os.getcwd()
        launched: Any = manager  # one of _launch_class()'s classes, from KernelFactory
        if isinstance(launched, _HerdLaunch):
            launched.herd_worker = self

    _owns_port = False

    @property
    def address(self) -> str:
        """``"ip:shell_port"`` of the kernel."""
        return self._kernel_address

    @property
    def client(self) -> AsyncKernelClient:  # type: ignore[override]
        """A ready async kernel client (channels started) for the session's use."""
        return self._kernel_client

    @property
    def alive(self) -> bool:
        """Whether the kernel is running (or being restarted in place, or about to be)."""
        if self._restart is not None or super().alive:
            return True
        if self.on_exit is None or self._closed_by_us:
            return False
        # Exited on its own: alive until on_exit has had its say on this exit.
        revival = self._revival
        return revival is None or revival[0] is not self._exited or not revival[1].done()

    async def wait(self) -> str:
        """Return when the kernel has exited for good (a restart is not an exit, and
        neither is an exit that :attr:`on_exit` restarted the kernel after)."""
        while True:
            exited = self._exited
            reason = await asyncio.shield(exited)
            if self._restart is not None:
                await asyncio.shield(self._restart)
            elif self._exited is exited and self.on_exit is not None and not self._closed_by_us:
                await asyncio.shield(self._revive(exited, reason))
            if self._exited is exited:  # no new process took over
                return reason

    def _revive(self, exited: asyncio.Future[str], reason: str) -> asyncio.Task[None]:
        """The task running :attr:`on_exit` for the exit ``exited`` (started once)."""
        if self._revival is None or self._revival[0] is not exited:
            hook = self.on_exit
            assert hook is not None

            async def run() -> None:
                try:
                    await hook(reason)
                except Exception:
                    log.exception("kernel %s: auto-restart failed", self.id)

            self._revival = (exited, self._loop.create_task(run()))
        return self._revival[1]

    def _breach_counts(self) -> tuple[int, int]:
        cgroup = self.cgroup
        if cgroup is None:
            return (0, 0)
        with contextlib.suppress(Exception):
            return (cgroup.oom_kills(), cgroup.pids_limit_hits())
        return (0, 0)

    def limit_breach(self) -> str | None:
        """The cgroup limit the current kernel process ran into, if any (limits hit
        by the processes before an in-place restart are theirs)."""
        cgroup = self.cgroup
        if cgroup is None or super().limit_breach() is None:
            return None
        oom, pids = self._breach_counts()
        if cgroup.limits.memory is not None and oom > self._breaches_before[0]:
            return f"killed: memory limit {cgroup.limits.describe_memory()}"
        if cgroup.limits.pids is not None and pids > self._breaches_before[1]:
            return f"at its PID limit ({cgroup.limits.pids})"
        return None

    @contextlib.asynccontextmanager
    async def restarting(self) -> AsyncIterator[None]:
        """Wrap an in-place restart by the kernel manager: the worker, its session
        and its cgroup carry over to the new kernel process.

        If no new process is running afterwards, the worker has died (the pool's
        crash path).
        """
        done: asyncio.Future[None] = self._loop.create_future()
        self._restart = done
        try:
            yield
        finally:
            try:
                process = getattr(self.manager.provisioner, "process", None)
                if process is not None and process is not self._proc and process.poll() is None:
                    # jupyter_client waited for the old process; its exit watch
                    # runs on the next loop turn.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(self._exited), 5)
                    self._stop_output()
                    self._breaches_before = self._breach_counts()
                    self._bind(process)
                    info = self.manager.get_connection_info()
                    self.port = int(info["shell_port"])
                    self._kernel_address = f"{info['ip']}:{info['shell_port']}"
            finally:
                self._restart = None
                done.set_result(None)

    async def renew_client(self, timeout: float = 10.0) -> AsyncKernelClient:
        """The session's client with its channels running: a new one if it was stopped.

        A kernel that served a notebook had its client stopped (the server talks
        to it over its own sockets), and a stopped client cannot start again. The
        new client is ready for output (IOPub has joined) and is stopped when the
        worker closes.

        :raises TimeoutError: the kernel did not answer within ``timeout``.
        """
        if self._kernel_client.channels_running:
            return self._kernel_client
        self._kernel_client = self.manager.client(context=self.manager.context)
        self._kernel_client.start_channels(hb=False)
        await self._nudge(timeout)
        return self._kernel_client

    async def _until_ready(self, timeout: float) -> None:
        # No heartbeat channel: a kernel's life is its process's (see healthy()), and
        # the channel is a thread per client, on a context the manager may destroy.
        self._kernel_client.start_channels(hb=False)
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

    def _lost_a_port_race(self) -> bool:
        """Whether the kernel exited during start-up because a port it was given
        was taken (the ports are free when chosen; the OS may hand them to any
        outgoing connection before the kernel binds them)."""
        return self.returncode is not None and any(
            "Address already in use" in line for line in self.logs(20)
        )

    async def _restart_on_new_ports(self) -> None:
        """Start the kernel again in this worker on newly chosen ports, as
        Jupyter's restarter does for a kernel that died at start-up."""
        for client in (self._kernel_client, self._probe):
            with contextlib.suppress(zmq.ZMQError):
                if client.channels_running:
                    client.stop_channels()
        manager = self.manager
        # New ports: a fresh connection file (jupyter_client would keep the old
        # one, and its ports, across a restart).
        manager.cleanup_connection_file()
        for name in ("shell_port", "iopub_port", "stdin_port", "hb_port", "control_port"):
            setattr(manager, name, 0)
        await manager.restart_kernel(now=True)
        if not super().alive:
            raise SpawnError(
                f"kernel {self.kernel_name!r} could not be started again on new ports",
                command=self.command,
                output_tail=self.logs(20),
                worker_id=self.id,
            )
        self._kernel_client, self._probe = self._new_clients()  # for the new ports

    def _new_clients(self) -> tuple[AsyncKernelClient, AsyncKernelClient]:
        """The session's client and herd's own, for the kernel's current ports.

        Both share the manager's ZMQ context (jupyter_client gives each client a
        context of its own otherwise: two threads each). herd's own has a session
        of its own: a shell socket's ZMQ identity is its session ID, so herd's
        executes on a client sharing the session's would have their replies
        routed to it."""
        manager = self.manager
        own = Session(key=manager.session.key, signature_scheme=manager.session.signature_scheme)
        return (
            manager.client(context=manager.context),
            manager.client(session=own, context=manager.context),
        )

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

    async def run_silently(self, code: str, timeout: float) -> bool:
        """Execute ``code`` without output, history or an execution count.

        On a channel of herd's own, so the session's clients see none of it but
        the kernel's busy/idle status.

        :returns: whether it ran without error within ``timeout``.
        """
        replied = asyncio.ensure_future(
            self._probe.execute(
                code,
                silent=True,
                store_history=False,
                user_expressions={},
                allow_stdin=False,
                stop_on_error=False,
                reply=True,
                timeout=timeout,
            )
        )
        died = asyncio.ensure_future(self.wait())
        try:
            # A kernel that dies meanwhile will never answer: don't wait for the timeout.
            await asyncio.wait([replied, died], return_when=asyncio.FIRST_COMPLETED)
        finally:
            died.cancel()
            answered = replied.done()
            if not answered:
                replied.cancel()
        if not answered or replied.exception() is not None:
            return False
        return bool(replied.result().get("content", {}).get("status") == "ok")

    async def healthy(self) -> bool:
        """Whether the kernel's process is running (or restarting in place).

        The kernel is not asked anything: a cell holding the GIL (a long
        ``list.sort()``, a C extension) keeps even ipykernel's control thread from
        answering until it ends, and a kernel is never killed for being busy.
        Only its process's exit is its death.
        """
        return self.alive

    async def _close(self) -> None:
        """Ask the kernel to shut down, then kill whatever is left, remove its files."""
        if self._restart is not None:
            await asyncio.shield(self._restart)
        if self._revival is not None and not self._revival[1].done():
            await asyncio.shield(self._revival[1])  # an auto-restart under way ends first
        self._closed_by_us = True
        if not self._exited.done():
            # A clean exit lets the kernel run its own shutdown (history, atexit).
            with contextlib.suppress(Exception):
                await self.manager.request_shutdown()
                await asyncio.wait_for(asyncio.shield(self._exited), self._stop_timeout)
        for client in (self._kernel_client, self._probe):
            # ZMQError: the manager's owner destroyed its context (shut the kernel
            # down itself): the sockets are gone already.
            with contextlib.suppress(zmq.ZMQError):
                if client.channels_running:
                    client.stop_channels()
        await super()._close()
        # Connection and IPC files, the control socket and the ZMQ context.
        with contextlib.suppress(Exception):
            await self.manager.cleanup_resources(restart=False)

    def __repr__(self) -> str:
        state = "alive" if self.alive else "dead"
        return f"<KernelWorker {self.id} {self.kernel_name} pid={self.pid} {state}>"


class KernelFactory:
    """Starts Jupyter kernels as :class:`herd.Pool` workers.

    :param kernel_name: any installed kernelspec (``jupyter kernelspec list``).
    :param cwd: the kernels' working directory.
    :param env: extra environment variables for the kernels.
    :param startup_timeout: seconds until the kernel answers ``kernel_info``.
    :param health_timeout: unused by kernels, which are never probed (a busy kernel
        is alive: see :meth:`KernelWorker.healthy`); kept for the signature.
    :param stop_timeout: seconds between SIGTERM and SIGKILL on close.
    :param sandbox: as for :class:`herd.ProcessFactory`.
    :param cpu_limit: cores per kernel.
    :param memory_limit: bytes per kernel (past it the kernel is killed: a crash).
    :param pids_limit: processes and threads per kernel (``-1``: no limit).
    :param kernel_spec_manager: where kernelspecs are looked up (jupyter_client's
        default when ``None``).
    :param manager_class: the kernel manager class to start kernels with (an
        :class:`~jupyter_client.manager.AsyncKernelManager`; a Jupyter server
        passes its ``ServerKernelManager``).
    :param manager_options: more keyword arguments for ``manager_class`` (say
        ``parent``, for its config).
    :param connection_dir: where connection files are written (a temporary file
        each when ``None``).
    :param echo_output: also copy what the kernels write to this process's stderr,
        as a kernel that inherits a Jupyter server's stderr writes into its log
        (the worker's log keeps it either way).
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
        manager_class: type[AsyncKernelManager] = AsyncKernelManager,
        manager_options: Mapping[str, Any] | None = None,
        connection_dir: str | os.PathLike[str] | None = None,
        echo_output: bool = False,
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
        if not (isinstance(manager_class, type) and issubclass(manager_class, AsyncKernelManager)):
            raise ValueError(f"manager_class must be an AsyncKernelManager, not {manager_class!r}")
        self.manager_class = manager_class
        self.manager_options = dict(manager_options or {})
        self.connection_dir = os.fspath(connection_dir) if connection_dir is not None else None
        self.echo_output = echo_output
        self._sandbox = Sandbox(
            sandbox, cpu_limit=cpu_limit, memory_limit=memory_limit, pids_limit=pids_limit
        )

    @property
    def sandbox_report(self) -> SandboxReport:
        """What isolation the kernels get here, and why not more."""
        return self._sandbox.report

    def __repr__(self) -> str:
        return f"KernelFactory({self.kernel_name!r})"

    def _check_command(self, manager: AsyncKernelManager, env: Mapping[str, str]) -> None:
        """Fail as a stock launch fails when the kernelspec's program does not exist
        (inside herd's sandbox the launcher would only exit with status 127).

        :raises herd.SpawnError: no such kernelspec, or no such program.
        """
        try:
            argv = list(manager.kernel_spec.argv) if manager.kernel_spec is not None else []
        except Exception as exc:  # NoSuchKernel, a broken kernel.json
            raise SpawnError(f"cannot start kernel {self.kernel_name!r}: {exc}") from exc
        program = argv[0] if argv else ""
        if not program or "{" in program:
            return  # jupyter_client fills it in (or refuses it) at launch
        found = (
            os.access(program, os.X_OK) and not os.path.isdir(program)
            if os.sep in program
            else shutil.which(program, path=env.get("PATH", os.defpath)) is not None
        )
        if not found:
            raise SpawnError(
                f"cannot start kernel {self.kernel_name!r}: "
                f"[Errno 2] No such file or directory: {program!r}",
                command=argv,
            )

    def new_manager(self) -> AsyncKernelManager:
        """A kernel manager for one kernel, not started: pass it to :meth:`spawn`.

        For a caller that must hold the kernel's manager before its kernel runs
        (Jupyter's pending kernels: clients wait on its ``ready`` future).
        """
        options: dict[str, Any] = {
            **self.manager_options,
            "kernel_name": self.kernel_name,
            "autorestart": False,  # a dead kernel is the pool's to handle
        }
        if self.kernel_spec_manager is not None:
            options["kernel_spec_manager"] = self.kernel_spec_manager
        if self.connection_dir is not None:
            options["connection_file"] = os.path.join(
                self.connection_dir, f"kernel-herd-{uuid.uuid4()}.json"
            )
        return _launch_class(self.manager_class)(**options)

    async def spawn(
        self,
        *,
        cwd: str | os.PathLike[str] | None = None,
        environ: Mapping[str, str] | None = None,
        manager: AsyncKernelManager | None = None,
    ) -> KernelWorker:
        """Start one kernel and return it once it answers ``kernel_info``.

        :param cwd: this kernel's working directory, instead of the factory's.
        :param environ: this kernel's whole base environment, instead of
            ``os.environ`` (the factory's ``env`` still applies on top).
        :param manager: the kernel's manager, from :meth:`new_manager` (a new one
            when ``None``).
        :raises herd.SpawnError: no such kernelspec, the kernel's command was not
            found, the kernel exited during start-up, or it was not ready within
            ``startup_timeout``.
        """
        directory = os.fspath(cwd) if cwd is not None else self.cwd
        if manager is None:
            manager = self.new_manager()
        launched: Any = manager
        if not isinstance(launched, _HerdLaunch):
            raise ValueError(f"manager must come from {self!r}.new_manager(), not {manager!r}")
        base = os.environ if environ is None else environ
        env = {**base, **self.env}
        self._check_command(manager, env)
        tag = f"{os.getpid()}-k-{time.monotonic_ns()}"
        launch = await self._sandbox.launch(tag, env)
        report, cgroup = launch.report, launch.cgroup
        launched.herd_prefix = launch.prefix
        if not report.prefix:
            # Without a PID namespace, a kernel's strays are found by this tag
            # when it closes; in one, the kernel's environment stays as given.
            env[TAG_VARIABLE] = tag
        try:
            await manager.start_kernel(
                cwd=directory,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        except BaseException as exc:
            # Failed or cancelled (a pool shutting down) after the launch, maybe:
            # nothing it started may outlive it.
            process = getattr(manager.provisioner, "process", None)
            if process is not None:
                with contextlib.suppress(OSError):
                    os.killpg(process.pid, signal.SIGKILL)
                await asyncio.get_running_loop().run_in_executor(None, process.wait)
                if process.stdout is not None:
                    process.stdout.close()  # the output pipe no worker will read
            await launch.discard()
            with contextlib.suppress(Exception):
                await manager.cleanup_resources(restart=False)
            if not isinstance(exc, Exception):
                raise
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
        worker.launch_env = env
        if self.echo_output:
            worker.echo_fd = 2
        worker.cwd = directory if directory is not None else os.getcwd()
        for attempt in range(PORT_RACE_RETRIES + 1):
            try:
                await worker._until_ready(self.startup_timeout)
                return worker
            except SpawnError as exc:
                if attempt == PORT_RACE_RETRIES or not worker._lost_a_port_race():
                    await worker.close()
                    raise
                log.info("%s: a port was taken; starting it again on new ports", exc.message)
                try:
                    await worker._restart_on_new_ports()
                except BaseException:
                    await worker.close()
                    raise
            except BaseException:
                await worker.close()
                raise
        raise AssertionError("unreachable")  # pragma: no cover
