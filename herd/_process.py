"""ProcessFactory and ProcessWorker: any HTTP binary as a pool worker.

Data flow of one spawn::

    ProcessFactory.spawn()
      -> port = _PORTS.allocate()               (never handed out twice while held)
      -> Popen([sandbox prefix..., *command.format(port)], setsid, PDEATHSIG)
           stdout+stderr -> pipe -> loop reader -> OutputLog (bounded ring of lines)
           pidfd          -> loop reader -> ProcessWorker._exited (the exit watch)
      -> poll GET health_path until 2xx        (start_timeout; exit during start = SpawnError)
      -> ProcessWorker, ready

The exit watch is a pidfd registered with the event loop, so the pool learns of a
worker's death on the loop iteration after it happens, with no thread per child
and no polling. Closing sends SIGTERM to the worker's process group, waits
``stop_timeout`` and then sends SIGKILL; that cleanup runs in its own task so a
cancelled ``close()`` cannot leave a process half-killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence

from ._cgroups import WorkerCgroup
from ._client import HTTPWorkerClient, probe
from ._config import Duration, duration_seconds, required_seconds
from ._exceptions import SpawnError
from ._netns import NetNamespace
from ._procfs import descendants, with_environ
from ._sandbox import Isolation, Network, Sandbox, SandboxMode, SandboxReport, init_ready
from ._sandbox import returncode as sandbox_returncode

__all__ = ["OutputLog", "ProcessFactory", "ProcessWorker"]

log = logging.getLogger("herd.process")

HOST = "127.0.0.1"
TAG_VARIABLE = "HERD_WORKER_TAG"  # in every worker's environment: finds its daemons on close
_worker_ids = itertools.count(1)


class _PortAllocator:
    """Hands out loopback ports; a port stays reserved until its worker is gone.

    The OS picks a free port (bind to port 0); the reservation set makes sure two
    concurrent spawns of this process never get the same one even though the
    probe socket is closed before the worker binds.
    """

    def __init__(self) -> None:
        self._reserved: set[int] = set()  # guarded by _lock: spawns may run on several loops
        self._lock = threading.Lock()

    def allocate(self) -> int:
        with self._lock:
            for _ in range(100):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    sock.bind((HOST, 0))
                    port: int = sock.getsockname()[1]
                if port not in self._reserved:
                    self._reserved.add(port)
                    return port
        raise SpawnError("no free loopback port found after 100 tries")

    def release(self, port: int) -> None:
        with self._lock:
            self._reserved.discard(port)


_PORTS = _PortAllocator()


class OutputLog:
    """The last ``maxlen`` lines a worker wrote to stdout and stderr.

    Lines longer than ``max_line`` bytes are cut, so a worker that never writes
    a newline cannot grow it without bound either.
    """

    def __init__(self, maxlen: int = 1000, max_line: int = 16384) -> None:
        self.lines: deque[str] = deque(maxlen=maxlen)
        self._partial = bytearray()
        self._max_line = max_line

    def feed(self, data: bytes) -> list[str]:
        """Add raw output; returns the complete lines it finished."""
        self._partial += data
        done: list[str] = []
        while True:
            cut = self._partial.find(b"\n")
            skip = 1  # the newline
            if cut < 0 or cut > self._max_line:
                if cut < 0 and len(self._partial) <= self._max_line:
                    break
                cut, skip = self._max_line, 0
            line = bytes(self._partial[:cut]).rstrip(b"\r").decode("utf-8", "replace")
            del self._partial[: cut + skip]
            done.append(line)
        self.lines.extend(done)
        return done

    def flush(self) -> None:
        """Keep a last line that had no newline."""
        if self._partial:
            self.lines.append(bytes(self._partial).decode("utf-8", "replace"))
            self._partial.clear()

    def tail(self, n: int | None = None) -> list[str]:
        """The last ``n`` lines (all kept lines if ``None``)."""
        lines = list(self.lines)
        return lines if n is None else lines[-n:]


def describe_exit(returncode: int) -> str:
    """``"exited with code 3"`` or ``"killed by SIGKILL"``."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exited with code {returncode}"


class ProcessWorker:
    """A running worker process that answers HTTP on ``127.0.0.1:port``.

    Made by :meth:`ProcessFactory.spawn`; users get it as ``session.worker``.

    :ivar id: unique among the workers of this Python process (``"w-7"``).
    :ivar port: the loopback port the worker listens on.
    :ivar command: the command line as run (``{port}`` filled in).
    :ivar started_at: :func:`time.time` when the process was started.
    """

    _owns_port = True  # the port came from _PORTS (a kernel's ports are its own)

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        *,
        port: int,
        command: list[str],
        health_path: str,
        health_timeout: float,
        stop_timeout: float,
        log_lines: int,
        sandbox: SandboxReport,
        tag: str,
        cgroup: WorkerCgroup | None = None,
        netns: NetNamespace | None = None,
    ) -> None:
        self.id = f"w-{next(_worker_ids)}"
        self.tag = tag
        self.cgroup = cgroup
        #: The worker's own network namespace (tenant isolation), or ``None``.
        self.netns = netns
        self.port = port
        self.command = command
        self.started_at = time.time()
        self.sandbox = sandbox
        self._health_path = health_path
        self._health_timeout = health_timeout
        self._stop_timeout = stop_timeout
        self._client = HTTPWorkerClient(
            f"{HOST}:{port}", open_socket=self.open_socket if netns is not None else None
        )
        self._output = OutputLog(log_lines)
        #: A file descriptor that gets a copy of everything the worker writes (say
        #: ``2``, the parent's stderr, as an inherited stderr would), or ``None``.
        self.echo_fd: int | None = None
        self._loop = asyncio.get_running_loop()
        self._close_task: asyncio.Task[None] | None = None
        self._closed_by_us = False
        self._bind(proc)

    def _bind(self, proc: subprocess.Popen[bytes]) -> None:
        """Watch ``proc``: its output into the log, its exit into ``_exited``.

        Called once per process; a worker whose program is restarted in place
        (a kernel restart) binds the new process after the old one has exited.
        """
        self._proc = proc
        self._exited: asyncio.Future[str] = self._loop.create_future()
        self.exit_code: int | None = None
        self._out_fd: int | None = None
        if proc.stdout is not None:
            self._out_fd = proc.stdout.fileno()
            os.set_blocking(self._out_fd, False)
            self._loop.add_reader(self._out_fd, self._read_output)
        self._pidfd: int | None = None
        try:
            self._pidfd = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):  # pragma: no cover - kernels before 5.3
            self._poll_task = self._loop.create_task(self._poll_exit())
        else:
            self._loop.add_reader(self._pidfd, self._on_exit)

    # -- public surface (the Worker protocol) ------------------------------------------

    def open_socket(self) -> socket.socket:
        """A new TCP socket from which the worker's ``address`` is reachable: in
        its network namespace if it has one of its own (then only from here).

        :raises OSError: its namespace is not there yet (the worker is starting)
            or could not be entered.
        """
        if self.netns is not None:
            return self.netns.socket()
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM)

    @property
    def address(self) -> str:
        """``"127.0.0.1:PORT"``."""
        return self._client.address

    @property
    def client(self) -> HTTPWorkerClient:
        """An HTTP client bound to ``http://127.0.0.1:PORT``."""
        return self._client

    @property
    def pid(self) -> int:
        """PID of the process herd started (with a sandbox: the namespace's launcher)."""
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """The worker's exit code once it has exited (negative: killed by that signal)."""
        return self.exit_code

    @property
    def alive(self) -> bool:
        """Whether the process is still running."""
        return not self._exited.done()

    def limit_breach(self) -> str | None:
        """The cgroup limit the worker ran into (``"killed: memory limit 256 MiB"``), if any."""
        return self.cgroup.breach() if self.cgroup is not None else None

    def cpu_seconds(self) -> float | None:
        """CPU time its processes used, from its cgroup (``None`` without limits)."""
        return self.cgroup.cpu_seconds() if self.cgroup is not None else None

    def logs(self, n: int | None = None) -> list[str]:
        """The last ``n`` lines of the worker's stdout and stderr (all kept if ``None``).

        At most ``log_lines`` lines (a :class:`ProcessFactory` option) are kept.
        """
        return self._output.tail(n)

    async def healthy(self) -> bool:
        """``GET health_path`` answers 2xx within ``health_timeout``.

        :raises OSError: the probe could not be made on this side (the pool's
            process is out of file descriptors, ``EMFILE``/``ENFILE``, or of
            buffers or local ports): that says nothing of the worker, and the pool
            counts such a probe neither for nor against it.
        """
        if self._exited.done():
            return False
        status = await probe(
            HOST,
            self.port,
            self._health_path,
            self._health_timeout,
            open_socket=self.open_socket,
            raise_local=True,
        )
        return status is not None and 200 <= status < 300

    async def wait(self) -> str:
        """Return when the process has exited, with the reason."""
        return await asyncio.shield(self._exited)

    async def close(self) -> None:
        """SIGTERM the worker's process group, SIGKILL after ``stop_timeout``. Idempotent.

        In a sandbox the SIGTERM goes to the launcher's group and the init
        forwards it to the worker's; the SIGKILL takes the init, and with it
        the whole PID namespace.

        The kill runs to completion even if the awaiting task is cancelled.
        """
        if self._close_task is None:
            self._close_task = self._loop.create_task(self._close())
        await asyncio.shield(self._close_task)

    def __repr__(self) -> str:
        state = "alive" if self.alive else self._exited.result()
        return f"<ProcessWorker {self.id} {self.address} pid={self.pid} {state}>"

    # -- internals -------------------------------------------------------------------------

    def _read_output(self) -> bool:
        """Read one chunk of output if there is one; ``False`` at EOF or nothing to read."""
        if self._out_fd is None:
            return False
        try:
            data = os.read(self._out_fd, 65536)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            self._stop_output()
            return False
        if self.echo_fd is not None:
            self._echo(data)
        for line in self._output.feed(data):
            log.debug("[%s] %s", self.id, line)
        return True

    def _echo(self, data: bytes) -> None:
        """Copy ``data`` to :attr:`echo_fd`; a copy that cannot be written is dropped
        (the log keeps it)."""
        view = memoryview(data)
        while view and self.echo_fd is not None:
            try:
                view = view[os.write(self.echo_fd, view) :]
            except BlockingIOError:
                return
            except OSError:
                self.echo_fd = None

    def _drain_output(self) -> None:
        """Read what the pipe still holds (the process has exited; don't wait for EOF)."""
        while self._read_output():
            pass
        self._output.flush()

    def _stop_output(self) -> None:
        if self._out_fd is not None:
            self._loop.remove_reader(self._out_fd)
            self._out_fd = None
            self._output.flush()
            if self._proc.stdout is not None:
                self._proc.stdout.close()

    def _on_exit(self) -> None:
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        launcher = self._proc.wait()  # the pidfd is readable: the child has exited
        if self.netns is not None:
            self.netns.close()
            self._client.close()
        self._drain_output()
        if self._owns_port:
            _PORTS.release(self.port)
        returncode = sandbox_returncode(self.sandbox, launcher, self._output.tail(3))
        self.exit_code = returncode
        reason = "closed" if self._closed_by_us else describe_exit(returncode)
        breach = self.limit_breach()
        if breach is not None and not self._closed_by_us:
            reason = breach
        if not self._exited.done():
            self._exited.set_result(reason)

    async def _poll_exit(self) -> None:  # pragma: no cover - fallback without pidfd
        while self._proc.poll() is None:  # noqa: ASYNC110 - nothing to wait on but time
            await asyncio.sleep(0.05)
        self._on_exit()

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)

    def _stops_on_sigterm(self) -> bool:
        """Whether SIGTERM can stop the worker, so a grace period makes sense.

        In a PID namespace, the init forwards the SIGTERM to the worker (whose
        default action is to die), but only once it is up: until then the
        kernel drops signals to PID 1, and ``unshare`` itself only waits.
        """
        return not self.sandbox.prefix or init_ready(self._proc.pid)

    async def _close(self) -> None:
        self._closed_by_us = True
        # Without a PID namespace a daemon may have left the process group: note
        # the tree now, while it is linked, and whatever carries the worker's tag.
        strays: list[int] = []
        if not self.sandbox.prefix:  # a scan of /proc: off the loop
            strays = await asyncio.to_thread(_strays, self._proc.pid, self.tag)
        if not self._exited.done() and self._stops_on_sigterm():
            self._signal_group(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(self._exited), self._stop_timeout)
            except TimeoutError:
                log.warning(
                    "worker %s ignored SIGTERM for %.1fs; killing", self.id, self._stop_timeout
                )
        self._signal_group(signal.SIGKILL)  # sweep group members the leader left behind
        for pid in strays:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if not self._exited.done():
            await asyncio.shield(self._exited)
        self._stop_output()
        if self.cgroup is not None:  # rmdir may wait a moment for the kernel: off the loop
            await self._loop.run_in_executor(None, self.cgroup.remove)


# A worker that lost the race for its port (another process bound it between our
# pick and its bind) is started again, up to this many times.
PORT_RACE_RETRIES = 2
# Start-up probes: the longest pause between two, while the start is younger than
# _PROBE_YOUNG seconds, and after.
_PROBE_YOUNG, _PROBE_PAUSE_YOUNG, _PROBE_PAUSE_MAX = 2.0, 0.02, 0.1


class _PortTaken(SpawnError):
    """The worker exited during start-up and another process holds its port."""


def _taken(port: int) -> bool:
    """Whether some socket holds ``port`` on the loopback address (a worker that
    exited holds none): binding it, as a listening worker would, fails."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def _strays(pid: int, tag: str) -> list[int]:
    """What a worker started: its process tree, and whatever carries its tag."""
    return descendants(pid) + with_environ(f"{TAG_VARIABLE}={tag}")


class ProcessFactory:
    """Starts any program that serves HTTP on a loopback port as a pool worker.

    :param command: the program and its arguments; ``{port}`` in any argument is
        replaced by the worker's port.
    :param env: extra environment variables (over the pool process's own unless
        ``inherit_env=False``); ``{port}`` works in values too. ``PORT`` is always set.
    :param health_path: ``GET`` this path must answer 2xx for the worker to count
        as healthy, at start and on every health check.
    :param start_timeout: seconds the worker has to become healthy; after that the
        spawn fails with :class:`~herd.SpawnError` and the process is killed.
    :param start_health_check_delay: seconds to wait before the first health probe.
    :param health_timeout: seconds one health probe may take.
    :param stop_timeout: seconds between SIGTERM and SIGKILL when a worker is closed.
    :param sandbox: ``True`` (default): isolate workers as far as the machine allows;
        ``False``: no namespaces (the Go ``WithInsecureSandbox``); ``"required"``:
        refuse to spawn without a sandbox.
    :param isolation: ``"process"`` (default): each worker is contained in its
        namespaces and limits, which it cannot undo; ``"tenant"``: it also sees
        only its own files (system directories, its program, interpreter and
        working directory read-only, a private ``/tmp`` and home), has no
        capabilities and cannot gain any (``no_new_privs``). For workers that
        run other people's code; needs namespaces (root, or user namespaces).
    :param user: run the workers as this user (a name or a UID, with its primary
        group); needs root.
    :param network: with ``isolation="tenant"``: ``"private"`` (default), each
        worker has a network of its own, loopback only; ``"host"``: the host's,
        for workers that must reach the outside (an API), at the price of
        reaching each other's ports (``sandbox_reason`` says so).
    :param cwd: working directory of the workers.
    :param inherit_env: start from this process's environment.
    :param log_lines: how many lines of output each worker keeps (``worker.logs()``).
    :param cpu_limit: cores each worker may use (``0.5`` = half a core), enforced by
        its cgroup.
    :param memory_limit: bytes each worker may use; past it the OOM killer takes the
        worker, which goes through the pool's crash path.
    :param pids_limit: processes and threads each worker may have (``-1``: no limit).
    :raises ValueError: a bad option (``pids_limit=0``, a negative limit, ...).

    >>> factory = ProcessFactory(
    ...     ["python", "-m", "http.server", "--bind", "127.0.0.1", "{port}"],
    ...     health_path="/",
    ... )
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        health_path: str = "/health",
        start_timeout: Duration = 30.0,
        start_health_check_delay: Duration = 0.0,
        health_timeout: Duration = 2.0,
        stop_timeout: Duration = 2.0,
        sandbox: SandboxMode = True,
        cwd: str | os.PathLike[str] | None = None,
        inherit_env: bool = True,
        log_lines: int = 1000,
        cpu_limit: float | None = None,
        memory_limit: int | None = None,
        pids_limit: int | None = None,
        isolation: Isolation = "process",
        user: str | int | None = None,
        network: Network = "private",
    ) -> None:
        if isinstance(command, str) or not command:
            raise ValueError("command must be a non-empty list of strings, e.g. ['python', ...]")
        if not all(isinstance(arg, str) for arg in command):
            raise TypeError(f"every command argument must be a str: {command!r}")
        if not health_path.startswith("/"):
            raise ValueError(f"health_path must start with '/', not {health_path!r}")
        if isinstance(log_lines, bool) or not isinstance(log_lines, int) or log_lines < 1:
            raise ValueError(f"log_lines must be an int >= 1, not {log_lines!r}")
        for key, value in (env or {}).items():
            if not isinstance(key, str) or not isinstance(value, str) or "=" in key or not key:
                raise ValueError(f"bad environment variable {key!r}={value!r}")
        self.command = list(command)
        self.env = dict(env or {})
        self.health_path = health_path
        self.start_timeout = required_seconds("start_timeout", start_timeout)
        self.start_health_check_delay = (
            duration_seconds("start_health_check_delay", start_health_check_delay) or 0.0
        )
        self.health_timeout = required_seconds("health_timeout", health_timeout)
        self.stop_timeout = required_seconds("stop_timeout", stop_timeout)
        self.sandbox: SandboxMode = sandbox
        self.cwd = os.fspath(cwd) if cwd is not None else None
        self.inherit_env = inherit_env
        self.log_lines = log_lines
        self._sandbox = Sandbox(
            sandbox,
            cpu_limit=cpu_limit,
            memory_limit=memory_limit,
            pids_limit=pids_limit,
            isolation=isolation,
            user=user,
            network=network,
        )
        self.limits = self._sandbox.limits

    def __repr__(self) -> str:
        return f"ProcessFactory({self.command!r}, health_path={self.health_path!r})"

    @property
    def sandbox_report(self) -> SandboxReport:
        """What isolation this factory's workers get here, and why not more."""
        return self._sandbox.report

    def _environment(self, port: int, tag: str) -> dict[str, str]:
        env = dict(os.environ) if self.inherit_env else {}
        env.update({k: v.replace("{port}", str(port)) for k, v in self.env.items()})
        env["PORT"] = str(port)
        env[TAG_VARIABLE] = tag
        return env

    async def spawn(self) -> ProcessWorker:
        """Start one worker and return it once ``GET health_path`` answers 2xx.

        A worker that exits during start-up because another process took its
        port first (the port is free when herd picks it, but the OS may hand it
        to any outgoing connection before the worker binds it) is started again
        on a new port, up to twice: that is a race, not the worker's failure.

        :raises herd.SpawnError: the binary is missing, the process exited during
            start-up, or it was not healthy within ``start_timeout``; nothing is
            left running.
        """
        for attempt in range(PORT_RACE_RETRIES + 1):
            try:
                return await self._spawn_on_a_new_port()
            except _PortTaken as taken:
                if attempt == PORT_RACE_RETRIES:
                    raise
                log.info("%s; starting it again on a new port", taken.message)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _spawn_on_a_new_port(self) -> ProcessWorker:
        port = _PORTS.allocate()
        argv = [arg.replace("{port}", str(port)) for arg in self.command]
        tag = f"{os.getpid()}-{port}-{time.monotonic_ns()}"
        env = self._environment(port, tag)
        if shutil.which(argv[0], path=env.get("PATH")) is None:
            _PORTS.release(port)
            raise SpawnError(
                f"cannot start worker: {argv[0]!r} not found or not executable", command=argv
            )
        try:
            launch = await self._sandbox.launch(
                f"{port}-{time.monotonic_ns()}", env, argv=argv, cwd=self.cwd
            )
        except BaseException:
            _PORTS.release(port)
            raise
        report, cgroup = launch.report, launch.cgroup
        try:
            proc = subprocess.Popen(
                [*launch.prefix, *argv],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.cwd,
                start_new_session=True,
                close_fds=True,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            _PORTS.release(port)
            await launch.discard()
            why = errno.errorcode.get(getattr(exc, "errno", None) or 0, "error")
            raise SpawnError(f"cannot start worker ({why}): {exc}", command=argv) from exc
        worker = ProcessWorker(
            proc,
            port=port,
            command=argv,
            health_path=self.health_path,
            health_timeout=self.health_timeout,
            stop_timeout=self.stop_timeout,
            log_lines=self.log_lines,
            sandbox=report,
            tag=tag,
            cgroup=cgroup,
            netns=NetNamespace(proc.pid) if launch.own_network else None,
        )
        try:
            await self._until_healthy(worker)
        except SpawnError as exc:
            await worker.close()
            if worker.returncode is not None and _taken(port):
                raise _PortTaken(
                    f"{exc.message}; its port {port} was taken by another process",
                    command=exc.command,
                    exit_code=exc.exit_code,
                    output_tail=exc.output_tail,
                    worker_id=exc.worker_id,
                ) from None
            raise
        except BaseException:
            await worker.close()
            raise
        log.info("worker %s started: pid %d, %s", worker.id, worker.pid, worker.address)
        return worker

    async def _until_healthy(self, worker: ProcessWorker) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout
        exited = worker._exited
        if self.start_health_check_delay:
            await asyncio.wait([exited], timeout=self.start_health_check_delay)
        pause = 0.005
        started = loop.time()
        last: int | None = None
        while not exited.done():
            remaining = deadline - loop.time()
            if remaining <= 0:
                answer = f"last answer: HTTP {last}" if last else "no answer"
                raise SpawnError(
                    f"worker {worker.id} not healthy after {self.start_timeout:g}s "
                    f"(GET {self.health_path}: {answer})",
                    command=worker.command,
                    output_tail=worker.logs(20),
                    worker_id=worker.id,
                )
            status = await probe(
                HOST,
                worker.port,
                self.health_path,
                min(self.health_timeout, remaining),
                open_socket=worker.open_socket,
            )
            if status is not None and 200 <= status < 300:
                return
            # The last answer there was: a probe cut short by the deadline says
            # nothing, and must not hide the 503s before it.
            last = status if status is not None else last
            await asyncio.wait([exited], timeout=min(pause, max(deadline - loop.time(), 0)))
            # Every 20 ms at most while a start is young (most workers are up
            # within a second or two: a longer pause is latency added to a
            # session's first request), then every 100 ms at most.
            young = loop.time() - started < _PROBE_YOUNG
            pause = min(pause * 1.5, _PROBE_PAUSE_YOUNG if young else _PROBE_PAUSE_MAX)
        raise SpawnError(
            f"worker {worker.id} {exited.result()} during start-up",
            command=worker.command,
            exit_code=worker.returncode,
            output_tail=worker.logs(20),
            worker_id=worker.id,
        )
