"""``%herd`` and ``%%herd``: herd pools from a notebook (``%load_ext herd_nb``).

::

    %load_ext herd_nb
    %herd start --warm 2 --memory 1G        # a pool of python3 kernels in this kernel

    %%herd alice                            # runs in alice's own kernel, output here
    x = 6 * 7
    print(x)

    %herd sessions                          # a table: session, worker, RSS, idle...
    %herd dashboard                         # the live ipywidgets Dashboard
    %herd release alice                     # end the session: its kernel goes

``%herd connect`` attaches to the pools of the Jupyter server that runs this
notebook instead (found without a URL or token), and ``%%herd`` then runs
cells in sessions of the server's kernel pool.

How it runs. Everything runs on the kernel's own event loop: a ``%herd`` line
and a ``%%herd`` cell are rewritten (an IPython input transformer) into an
``await`` of the command, so IPython runs the cell as a coroutine on ipykernel's
loop. Nothing blocks the kernel, nothing patches the loop (no nest_asyncio),
and the pool's background tasks (health, refill, TTL) run between cells too.
The stop button reaches ``%%herd`` as a cancellation, which interrupts the
remote cell (see :mod:`herd_nb._execute`). A ``%herd`` used inside an
expression (``pool = %herd pool``) runs as an ordinary magic; commands that
must wait say so there.

Output of a ``%%herd`` cell is replayed as this cell's own: stdout and stderr
as they are printed, displays (with their IDs, so ``update_display_data``
works), the result as this cell's ``Out``, and an error as the remote
traceback alone. ``input()`` in the remote cell prompts in the notebook.
"""

from __future__ import annotations

import argparse
import asyncio
import builtins
import contextlib
import contextvars
import ctypes
import getpass
import json
import os
import re
import shlex
import signal
import sys
import threading
import urllib.parse
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, ClassVar, Protocol

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

import herd
from herd.cli import add_limit_arguments, add_pool_arguments, parse_duration

from ._execute import Event, InterruptIgnoredError, KernelDiedError, run_cell
from .sources import PoolSource, ServerSource, Source, SourceError

__all__ = ["HerdMagics", "RemoteError", "load_ipython_extension", "unload_ipython_extension"]

USAGE = """\
%herd start [--kernel NAME] [--min N] [--max N] [--warm N] [--ttl 10m] [--no-reuse]
            [--cpu C] [--memory 1G] [--pids N] [--no-sandbox] [-- CMD ... {port}]
                              start a pool in this kernel: kernels, or CMD's processes
%herd connect [URL] [--token T]  use the pools of the Jupyter server running this notebook
%%herd SESSION                run the cell in SESSION's own kernel (made on first use)
%herd stats                   the pools, their workers and the host
%herd sessions                the pinned sessions
%herd release SESSION         end a session (its worker is killed or reused)
%herd dashboard [--interval 1s]  a live dashboard (ipywidgets)
%herd pool                    the local herd.Pool (pool = %herd pool)
%herd stop                    stop the local pool (or forget the server)
%herd help                    this text

$name in a %herd line is replaced by the value of that variable; {port} is
left for herd to fill in."""

# How often the loop wakes while a cell waits on the server (see _awake).
_WAKE_EVERY = 0.1
# How long a kernel shutting down waits for its pool to stop cleanly.
_STOP_TIMEOUT = 10.0

_MODULE = "__import__('herd_nb.magics', fromlist=['_'])"
_LINE = re.compile(r"^(?P<target>[A-Za-z_][\w.]*\s*=\s*)?%herd(?:[ \t](?P<args>.*))?$")
_VARIABLE = re.compile(r"\$(\w+)|\$\{(\w+)\}")


class RemoteError(Exception):
    """An error raised by the remote cell; shown as its own traceback.

    Raised as a subclass named after the remote exception (``ZeroDivisionError``),
    so the notebook shows the remote error's name, and IPython renders
    :meth:`_render_traceback_` (the remote traceback) instead of a local one.

    :ivar ename: the remote exception's name.
    :ivar evalue: its message.
    :ivar traceback: the remote traceback lines (with ANSI colours).
    """

    def __init__(self, ename: str, evalue: str, traceback: list[str]) -> None:
        super().__init__(evalue)
        self.ename = ename
        self.evalue = evalue
        self.traceback = traceback

    def _render_traceback_(self) -> list[str]:
        return list(self.traceback) or [f"{self.ename}: {self.evalue}"]

    @classmethod
    def named(cls, ename: str, evalue: str, traceback: list[str]) -> RemoteError:
        """A :class:`RemoteError` whose class name is ``ename``."""
        name = ename if ename.isidentifier() else "RemoteError"
        kind = type(name, (cls,), {"__module__": "herd_nb.remote"})
        return kind(ename, evalue, traceback)


class _Result:
    """The remote cell's result, shown as this cell's ``Out``."""

    def __init__(self, data: dict[str, Any], metadata: dict[str, Any]) -> None:
        self.data = data
        self.metadata = metadata

    def _repr_mimebundle_(self, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        return self.data, self.metadata

    def __repr__(self) -> str:
        return str(self.data.get("text/plain", ""))


class _Backend(Protocol):
    """Where ``%%herd`` cells run: a pool of this kernel, or a Jupyter server."""

    @property
    def source(self) -> Source:
        """What ``%herd stats``, ``sessions``, ``release`` and ``dashboard`` read."""
        ...

    async def execute(
        self,
        session_id: str,
        code: str,
        on_event: Callable[[Event], object],
        on_input: Callable[[str, bool], Awaitable[str]] | None,
    ) -> Event: ...

    async def close(self) -> None: ...


class _LocalBackend:
    """A pool started by ``%herd start`` in this kernel."""

    def __init__(self, pool: herd.Pool[Any], *, kernels: bool, describe: str) -> None:
        self.pool = pool
        self.kernels = kernels
        self.describe = describe
        self.source: Source = PoolSource(pool)

    async def execute(
        self,
        session_id: str,
        code: str,
        on_event: Callable[[Event], object],
        on_input: Callable[[str, bool], Awaitable[str]] | None,
    ) -> Event:
        if not self.kernels:
            raise UsageError(
                f"this pool runs {self.describe}, not kernels: %%herd needs "
                "%herd start [--kernel NAME] (or %herd connect); reach a process "
                "worker with `pool = %herd pool` and pool.acquire(session)"
            )
        from .kernels import KernelWorker

        async with self.pool.acquire(session_id) as session:
            worker = session.worker
            assert isinstance(worker, KernelWorker)
            try:
                return await run_cell(
                    worker.client,
                    code,
                    on_event=on_event,
                    on_input=on_input,
                    interrupt=worker.manager.interrupt_kernel,
                    alive=lambda: worker.alive,
                )
            except KernelDiedError:
                raise UsageError(
                    f"session {session_id!r}: its kernel died ({self._why(worker.id)}); "
                    "the next %%herd cell of the session starts a new one"
                ) from None
            except InterruptIgnoredError as exc:
                raise UsageError(
                    f"session {session_id!r}: {exc}; it runs on in its kernel "
                    f"(%herd release {session_id} ends the session)"
                ) from None

    def _why(self, worker_id: str) -> str:
        for crash in reversed(self.pool.stats().recent_crashes):
            if crash.worker_id == worker_id:
                return crash.reason
        return "it exited"

    async def close(self) -> None:
        await self.pool.shutdown()


class _ServerBackend:
    """The kernel pool of a Jupyter server with herd_nb (``%herd connect``)."""

    def __init__(self, source: ServerSource) -> None:
        self.source = source
        self.server = source

    def _request(self, path: str, body: object, **options: Any) -> HTTPRequest:
        return HTTPRequest(
            urllib.parse.urljoin(self.server.url, path),
            method="POST",
            headers={
                "Authorization": f"token {self.server.token}",
                "Content-Type": "application/json",
            },
            body=json.dumps(body),
            **options,
        )

    async def _post(self, path: str, body: object) -> None:
        try:
            await AsyncHTTPClient().fetch(self._request(path, body, request_timeout=30))
        except HTTPClientError as exc:
            if exc.code != 409:  # nothing to answer or interrupt any more
                raise

    async def execute(
        self,
        session_id: str,
        code: str,
        on_event: Callable[[Event], object],
        on_input: Callable[[str, bool], Awaitable[str]] | None,
    ) -> Event:
        base = f"herd/api/sessions/{urllib.parse.quote(session_id)}"
        pending = bytearray()
        done: list[Event] = []
        prompts: set[asyncio.Task[None]] = set()

        async def answer(prompt: str, password: bool) -> None:
            assert on_input is not None
            value = await on_input(prompt, password)
            await self._post(f"{base}/input", {"value": value})

        def received(chunk: bytes) -> None:
            pending.extend(chunk)
            while (end := pending.find(b"\n")) >= 0:
                line = bytes(pending[:end])
                del pending[: end + 1]
                if not line.strip():
                    continue
                event = json.loads(line)
                if event["type"] == "input_request" and on_input is not None:
                    task = asyncio.ensure_future(
                        answer(event.get("prompt", ""), bool(event.get("password")))
                    )
                    prompts.add(task)
                    task.add_done_callback(prompts.discard)
                    continue
                if event["type"] == "done":
                    done.append(event)
                on_event(event)

        request = self._request(
            f"{base}/execute",
            {"code": code, "stdin": on_input is not None},
            streaming_callback=received,
            request_timeout=0,  # a cell runs as long as it runs
            connect_timeout=10,
        )
        fetch = asyncio.ensure_future(AsyncHTTPClient().fetch(request, raise_error=False))
        try:
            try:
                response = await _awake(fetch)
            except asyncio.CancelledError:
                # The stop button: interrupt the remote cell and let it end.
                for task in prompts:
                    task.cancel()
                await self._post(f"{base}/interrupt", {})
                response = await _awake(fetch)
                current = asyncio.current_task()
                if current is not None:
                    current.uncancel()
        finally:
            if not fetch.done():
                fetch.cancel()
        if response.code != 200 or not done:
            message = _message(response.body) if response.body else str(response.error)
            raise UsageError(f"%%herd {session_id}: the server said {response.code}: {message}")
        last = done[-1]
        if last.get("status") == "dead":
            raise UsageError(
                f"session {session_id!r}: its kernel died ({last.get('reason', 'it exited')}); "
                "the next %%herd cell of the session starts a new one"
            )
        if last.get("reason"):  # ended by herd, not by the cell (say, it ignored an interrupt)
            raise UsageError(f"session {session_id!r}: {last['reason']}")
        return last

    async def close(self) -> None:
        pass


async def _awake(future: asyncio.Future[Any]) -> Any:
    """Await ``future`` (not cancelled with the caller), waking the loop often.

    The stop button is a SIGINT whose handler (ipykernel's) is Python code: it
    runs when the main thread next runs Python, and a signal that lands on
    another of the kernel's threads does not wake a loop asleep in epoll. A
    loop woken every 0.1 s runs it within 0.1 s.
    """
    while not future.done():
        await asyncio.wait([future], timeout=_WAKE_EVERY)
    return future.result()


def _message(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body[:300].decode(errors="replace")
    return str(data.get("message") or data.get("reason") or data) if isinstance(data, dict) else ""


class _Output:
    """Replays a remote cell's events as this cell's own output."""

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self.result: _Result | None = None
        self.error: RemoteError | None = None

    def __call__(self, event: Event) -> None:
        kind = event["type"]
        if kind == "stream":
            stream = sys.stderr if event.get("name") == "stderr" else sys.stdout
            stream.write(event.get("text", ""))
        elif kind in ("display_data", "update_display_data"):
            self._publish(event, update=kind == "update_display_data")
        elif kind == "clear_output":
            from IPython.display import clear_output

            clear_output(wait=bool(event.get("wait")))
        elif kind == "execute_result":
            self.result = _Result(event.get("data", {}), event.get("metadata", {}))
        elif kind == "error":
            self.error = RemoteError.named(
                event.get("ename", "Error"), event.get("evalue", ""), event.get("traceback", [])
            )

    def _publish(self, event: Event, *, update: bool) -> None:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()  # keep prints and displays in the order they happened
        publisher = getattr(self.shell, "display_pub", None)
        data, metadata = event.get("data", {}), event.get("metadata", {})
        transient = event.get("transient") or {}
        try:
            publisher.publish(data, metadata, transient=transient, update=update)  # type: ignore[union-attr]
        except TypeError:  # a plain IPython's publisher: no transient, no update
            from IPython.display import publish_display_data

            publish_display_data(data, metadata)


class _Parser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` (shown without a traceback)."""

    def error(self, message: str) -> Any:
        raise UsageError(f"{message}\n\n{self.format_usage().strip()}\n(%herd help for more)")

    def exit(self, status: int = 0, message: str | None = None) -> Any:
        raise UsageError(message or self.format_usage())


def _start_parser() -> _Parser:
    parser = _Parser(prog="%herd start", add_help=False)
    parser.add_argument("--kernel", default="python3", help="kernelspec of the workers")
    parser.add_argument(
        "--warm", type=int, default=1, help="started workers kept ready for new sessions"
    )
    # Nothing is evicted unless asked: a notebook's session keeps its state.
    add_pool_arguments(parser, min_workers=0, ttl=0.0)
    add_limit_arguments(parser)
    parser.add_argument("--health-path", default="/", help="GET path process workers answer")
    parser.add_argument("--cwd", default=None, help="working directory of the workers")
    return parser


class _Herd:
    """The state behind the magics of one IPython shell."""

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self.backend: _Backend | None = None
        self._unhook: Callable[[], None] | None = None
        self._deferred: asyncio.Task[Any] | None = None  # see defer()

    @property
    def busy(self) -> bool:
        """Whether a deferred command is still running (see :meth:`defer`)."""
        return self._deferred is not None

    def answers_now(self, command: str) -> bool:
        """Whether ``command`` completes without waiting (local pool, nothing deferred)."""
        local = isinstance(self.backend, _LocalBackend) and self._deferred is None
        return local and command in ("stats", "sessions", "dashboard")

    def defer(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a command that cannot be awaited where it was called as a task;
        its error is printed, and the next command waits for it."""
        previous = self._deferred

        async def run() -> None:
            if previous is not None:
                await asyncio.wait([previous])
            try:
                result = await coro
            except UsageError as exc:
                print(f"UsageError: {exc}", file=sys.stderr)
            except Exception as exc:
                print(f"herd: {type(exc).__name__}: {exc}", file=sys.stderr)
            else:
                if result is not None:
                    from IPython.display import display

                    display(result)
            finally:
                if self._deferred is task:
                    self._deferred = None

        task = asyncio.ensure_future(run())
        self._deferred = task

    async def _settle(self) -> None:
        """Wait for a deferred command (see :meth:`defer`)."""
        if self._deferred is not None:
            await asyncio.wait([self._deferred])

    # -- commands ----------------------------------------------------------------------

    async def line(self, line: str, *, settle: bool = True) -> Any:
        """Run a ``%herd`` line (``$name`` is replaced by that variable's value).

        :param settle: wait for a deferred command first (see :meth:`defer`).
        """
        if settle:
            await self._settle()
        try:
            words = shlex.split(self._expand(line))
        except ValueError as exc:
            raise UsageError(f"%herd {line}: {exc}") from None
        if not words:
            return self.help()
        command, args = words[0], words[1:]
        handler = self.COMMANDS.get(command)
        if handler is None:
            raise UsageError(f"%herd: no command {command!r}\n\n{USAGE}")
        return await handler(self, args)

    def _expand(self, line: str) -> str:
        # As IPython expands $name in magics; {...} is left alone: {port} is herd's.
        namespace = getattr(self.shell, "user_ns", {})

        def value(match: re.Match[str]) -> str:
            name = match[1] or match[2]
            return shlex.quote(str(namespace[name])) if name in namespace else match[0]

        return _VARIABLE.sub(value, line)

    async def cell(self, line: str, code: str, *, settle: bool = True) -> Any:
        """Run a ``%%herd SESSION`` cell in that session's kernel (``settle``: as
        for :meth:`line`)."""
        if settle:
            await self._settle()
        words = shlex.split(self._expand(line))
        if len(words) != 1:
            raise UsageError("usage: %%herd SESSION (then the cell's code)")
        try:
            session_id = herd.validate_session_id(words[0])
        except herd.InvalidSessionIdError as exc:
            raise UsageError(str(exc)) from None
        backend = self._backend()
        output = _Output(self.shell)
        kernel = getattr(self.shell, "kernel", None)
        # The remote input() prompts here only when this cell may prompt itself.
        can_prompt = kernel is None or bool(getattr(kernel, "_allow_stdin", False))
        try:
            await backend.execute(session_id, code, output, self._prompt if can_prompt else None)
        except (herd.HerdError, SourceError) as exc:
            raise UsageError(f"%%herd {session_id}: {exc}") from None
        finally:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
        if output.error is not None:
            raise output.error
        return output.result

    async def _prompt(self, prompt: str, password: bool) -> str:
        """Ask in the notebook, as the remote ``input()`` asked.

        ipykernel's ``input()`` blocks until the notebook answers, so it runs in a
        thread of its own while the loop (and the pool) go on. The stop button
        cancels this call: the waiting thread then gets a ``KeyboardInterrupt``,
        as ``input()`` does in a cell interrupted the stock way.
        """
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[str] = loop.create_future()
        ask = getpass.getpass if password else builtins.input
        context = contextvars.copy_context()  # ipykernel 7 finds the cell's parent there

        def settle(value: str | None, error: BaseException | None) -> None:
            if answer.done():
                return
            if error is None:
                answer.set_result(value or "")
            elif isinstance(error, EOFError):
                answer.set_result("\x04")  # an EOF there too: the kernel's EOF mark
            else:
                answer.set_exception(error)

        def run() -> None:
            try:
                value = context.run(ask, prompt)
            except BaseException as exc:
                loop.call_soon_threadsafe(settle, None, exc)
            else:
                loop.call_soon_threadsafe(settle, value, None)

        thread = threading.Thread(target=run, name="herd-input", daemon=True)
        thread.start()
        try:
            return await answer
        except asyncio.CancelledError:
            _interrupt_thread(thread)
            raise

    def _backend(self) -> _Backend:
        if self.backend is None:
            raise UsageError("no pool: run %herd start (or %herd connect) first")
        return self.backend

    async def start(self, args: list[str]) -> None:
        if self.backend is not None:
            raise UsageError("a pool is already in use: %herd stop first")
        command: list[str] = []
        if "--" in args:
            at = args.index("--")
            args, command = args[:at], args[at + 1 :]
        options = _start_parser().parse_args(args)
        limits = {
            "sandbox": not options.no_sandbox,
            "cpu_limit": options.cpu,
            "memory_limit": options.memory,
            "pids_limit": options.pids,
        }
        factory: herd.WorkerFactory[Any]
        try:
            if command:
                factory = herd.ProcessFactory(
                    command, health_path=options.health_path, cwd=options.cwd, **limits
                )
                describe = " ".join(command)
            else:
                from .kernels import KernelFactory

                factory = KernelFactory(options.kernel, cwd=options.cwd, **limits)
                describe = f"{options.kernel} kernels"
            pool: herd.Pool[Any] = herd.Pool(
                factory,
                min_workers=options.min_workers,
                max_workers=options.max_workers,
                min_idle=options.warm,
                ttl=options.ttl,
                health_interval=options.health_interval,
                health_failures=options.health_failures,
                idle_worker_timeout=options.idle_worker_timeout,
                worker_reuse=not options.no_reuse,
            )
        except (ValueError, TypeError) as exc:
            raise UsageError(f"%herd start: {exc}") from None
        try:
            await pool.start()
        except herd.HerdError as exc:
            await pool.shutdown()
            raise UsageError(f"%herd start: {exc}") from None
        self.backend = _LocalBackend(pool, kernels=not command, describe=describe)
        self._stop_with_kernel()
        stats = pool.stats()
        print(
            f"herd: pool of {describe} ready: {stats.total_workers} started, "
            f"{options.min_workers}-{options.max_workers} workers, "
            f"{options.warm} kept warm, sandbox {stats.sandbox}"
        )

    async def connect(self, args: list[str]) -> None:
        parser = _Parser(prog="%herd connect", add_help=False)
        parser.add_argument("url", nargs="?")
        parser.add_argument("--token", default=None)
        options = parser.parse_args(args)
        if self.backend is not None:
            raise UsageError("a pool is already in use: %herd stop first")
        url, token = await find_server(options.url, options.token)
        source = ServerSource(url, token)
        try:
            pools = await source.pools()
        except SourceError as exc:
            raise UsageError(f"%herd connect: {url} does not serve herd_nb: {exc}") from None
        self.backend = _ServerBackend(source)
        names = ", ".join(pools) or "no pools"
        print(f"herd: connected to {url} ({names})")

    async def stop(self, args: list[str]) -> None:
        backend, self.backend = self.backend, None
        if backend is None:
            print("herd: no pool to stop")
            return
        await backend.close()
        print("herd: stopped" if isinstance(backend, _LocalBackend) else "herd: disconnected")

    async def stats(self, args: list[str]) -> None:
        from .dashboard import render_html, render_text

        pools = await self._pools()
        _display_table(render_html(pools), render_text(pools))

    async def sessions(self, args: list[str]) -> None:
        pools = await self._pools()
        rows = [
            (name, w.session_id or "", w.id, w.state, w.open_uses, w.idle_seconds)
            for name, stats in pools.items()
            for w in stats.workers
            if w.session_id
        ]
        header = ("pool", "session", "worker", "state", "open uses", "idle s")
        _display_table(_html_table(header, rows), _text_table(header, rows) or "no sessions")

    async def release(self, args: list[str]) -> None:
        if len(args) != 1:
            raise UsageError("usage: %herd release SESSION")
        source = self._backend().source
        try:
            await source.release(herd.validate_session_id(args[0]))
        except (herd.HerdError, SourceError) as exc:
            raise UsageError(f"%herd release: {exc}") from None
        print(f"herd: session {args[0]!r} ended")

    async def dashboard(self, args: list[str]) -> Any:
        parser = _Parser(prog="%herd dashboard", add_help=False)
        parser.add_argument("--interval", default="1s")
        options = parser.parse_args(args)
        try:
            interval = parse_duration(options.interval)
        except ValueError as exc:
            raise UsageError(f"%herd dashboard: {exc}") from None
        source = self._backend().source
        from .dashboard import Dashboard

        dashboard = Dashboard(source, interval=interval)
        # A first reading now, so that the text shown where widgets cannot
        # render (nbconvert, a terminal) has figures, not "waiting".
        await dashboard.refresh()
        return dashboard

    async def pool_command(self, args: list[str]) -> herd.Pool[Any]:
        backend = self._backend()
        if not isinstance(backend, _LocalBackend):
            raise UsageError("%herd pool: the pools run in the server (%herd connect)")
        return backend.pool

    async def help_command(self, args: list[str]) -> None:
        print(self.help())

    def help(self) -> str:
        return USAGE

    COMMANDS: ClassVar[dict[str, Callable[[_Herd, list[str]], Awaitable[Any]]]] = {
        "start": start,
        "connect": connect,
        "stop": stop,
        "stats": stats,
        "sessions": sessions,
        "release": release,
        "dashboard": dashboard,
        "pool": pool_command,
        "help": help_command,
    }

    async def _pools(self) -> dict[str, herd.PoolStats]:
        try:
            return await self._backend().source.pools()
        except SourceError as exc:
            raise UsageError(str(exc)) from None

    # -- lifecycle ---------------------------------------------------------------------

    def _stop_with_kernel(self) -> None:
        """Stop the local pool when the kernel shuts down or restarts."""
        kernel = getattr(self.shell, "kernel", None)
        if kernel is None or self._unhook is not None:
            return
        original = kernel.do_shutdown
        loop = asyncio.get_running_loop()

        async def do_shutdown(restart: bool) -> Any:
            # ipykernel handles shutdown on its control thread; the pool lives on
            # the main loop, which may be busy with a cell: wait a while, then kill.
            backend = self.backend
            if isinstance(backend, _LocalBackend):
                future = asyncio.run_coroutine_threadsafe(backend.close(), loop)
                try:
                    await asyncio.wait_for(asyncio.wrap_future(future), _STOP_TIMEOUT)
                except Exception:
                    _kill(backend.pool)
            result = original(restart)
            if asyncio.iscoroutine(result):
                result = await result
            return result

        kernel.do_shutdown = do_shutdown

        def unhook() -> None:
            kernel.do_shutdown = original

        self._unhook = unhook

    def unload(self) -> None:
        """Undo :meth:`_stop_with_kernel` (the pool is stopped by the caller)."""
        if self._unhook is not None:
            self._unhook()
            self._unhook = None


def _interrupt_thread(thread: threading.Thread) -> None:
    """Raise ``KeyboardInterrupt`` in ``thread`` (ipykernel's input() polls, so it
    arrives within ~10 ms)."""
    if thread.ident is not None and thread.is_alive():
        ctypes.pythonapi.PyThreadState_SetAsyncExc(
            ctypes.c_ulong(thread.ident), ctypes.py_object(KeyboardInterrupt)
        )


def _kill(pool: herd.Pool[Any]) -> None:
    """Kill every worker's process group now (no loop needed)."""
    for worker in pool.workers():
        pid = getattr(worker, "pid", None)
        if pid:
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)


class _Table:
    def __init__(self, html: str, text: str) -> None:
        self.html = html
        self.text = text

    def _repr_html_(self) -> str:
        return self.html

    def __repr__(self) -> str:
        return self.text


def _display_table(html: str, text: str) -> None:
    from IPython.display import display

    display(_Table(html, text))


def _text_table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    if not rows:
        return ""
    cells = [tuple(_cell(v) for v in row) for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells
    )


def _html_table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    import html

    if not rows:
        return "<p>no sessions</p>"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value: object) -> str:
    return f"{value:.1f}" if isinstance(value, float) else str(value)


# -- finding the server (``%herd connect``) ------------------------------------------------


async def find_server(url: str | None = None, token: str | None = None) -> tuple[str, str]:
    """The base URL and token of the Jupyter server to connect to.

    With no ``url``: the server that started this kernel (``JPY_PARENT_PID``
    names it, and its runtime file ``jpserver-<pid>.json`` has its URL and
    token), else the only running server found in the runtime directory (as
    ``jupyter server list`` finds them). A ``url`` without ``token`` takes the
    token from a matching runtime file, or ``$JUPYTER_TOKEN``.

    :raises UsageError: no server, or several and no way to choose.
    """
    servers = _runtime_servers()
    if url is not None:
        base = url if url.endswith("/") else url + "/"
        if token is None:
            match = [s for s in servers if s.get("url") == base]
            token = str(match[0].get("token", "")) if match else os.environ.get("JUPYTER_TOKEN")
        return base, token or ""
    parent = os.environ.get("JPY_PARENT_PID")
    for server in servers:
        if parent and str(server.get("pid")) == parent:
            return str(server["url"]), str(server.get("token", ""))
    alive = [s for s in servers if await _answers(s)]
    if len(alive) > 1:
        here = Path.cwd().resolve()
        inside = [s for s in alive if here.is_relative_to(Path(str(s.get("root_dir", "/"))))]
        alive = inside if len(inside) == 1 else alive
    if len(alive) == 1:
        return str(alive[0]["url"]), str(alive[0].get("token", ""))
    if not alive:
        raise UsageError(
            "%herd connect: no running Jupyter server found (jupyter server list); "
            "give its URL: %herd connect http://127.0.0.1:8888/ --token TOKEN"
        )
    urls = ", ".join(str(s["url"]) for s in alive)
    raise UsageError(f"%herd connect: several servers run ({urls}); give the URL of one")


def _runtime_servers() -> list[dict[str, Any]]:
    from jupyter_core.paths import jupyter_runtime_dir

    found = []
    for path in sorted(Path(jupyter_runtime_dir()).glob("jpserver-*.json")):
        with contextlib.suppress(OSError, ValueError):
            info = json.loads(path.read_text())
            if isinstance(info, dict) and info.get("url"):
                found.append(info)
    return found


async def _answers(server: dict[str, Any]) -> bool:
    request = HTTPRequest(
        urllib.parse.urljoin(str(server["url"]), "api/status"),
        headers={"Authorization": f"token {server.get('token', '')}"},
        request_timeout=3,
    )
    try:
        await AsyncHTTPClient().fetch(request)
    except Exception:
        return False
    return True


# -- IPython glue ------------------------------------------------------------------------------


_STATE: dict[int, _Herd] = {}


def _herd(shell: Any) -> _Herd:
    state = _STATE.get(id(shell))
    if state is None:
        state = _STATE[id(shell)] = _Herd(shell)
    return state


async def run_line(line: str) -> Any:
    """Run ``%herd LINE`` (what a ``%herd`` line of a cell becomes)."""
    from IPython.core.getipython import get_ipython

    return await _herd(get_ipython()).line(line)


async def run_cell_magic(line: str, cell: str) -> Any:
    """Run a ``%%herd LINE`` cell (what such a cell becomes)."""
    from IPython.core.getipython import get_ipython

    return await _herd(get_ipython()).cell(line, cell)


def transform(lines: list[str]) -> list[str]:
    """IPython input transformer: ``%%herd`` cells and top-level ``%herd`` lines
    (``pool = %herd pool`` too) become awaits of :func:`run_cell_magic` /
    :func:`run_line`, so they run on the kernel's loop as the cell's coroutine."""
    if not lines:
        return lines
    first = lines[0].rstrip("\r\n")
    if first == "%%herd" or first.startswith(("%%herd ", "%%herd\t")):
        body = "".join(lines[1:])
        return [f"await {_MODULE}.run_cell_magic({first[6:].strip()!r}, {body!r})\n"]
    out = []
    for line in lines:
        match = _LINE.match(line.rstrip("\r\n"))
        if match is None:
            out.append(line)
        else:
            target = match["target"] or ""
            args = (match["args"] or "").strip()
            out.append(f"{target}await {_MODULE}.run_line({args!r})\n")
    return out


@magics_class
class HerdMagics(Magics):
    """``%herd``/``%%herd`` where they are not rewritten into awaits (inside an
    expression, or called with ``run_line_magic``)."""

    @line_cell_magic  # type: ignore[untyped-decorator, unused-ignore]  # untyped before IPython 9
    def herd(self, line: str, cell: str | None = None) -> Any:
        """herd pools from a notebook; ``%herd help`` lists the commands."""
        state = _herd(self.shell)
        words = line.split()
        command = words[0] if words else "help"
        # Deferred commands wait for each other in defer(), never in _settle();
        # the others below run only when nothing is deferred.
        if cell is None:
            coro = state.line(line, settle=False)
        else:
            coro = state.cell(line, cell, settle=False)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            # A terminal IPython between cells: run it on IPython's own loop.
            shell: Any = self.shell
            return shell.loop_runner(coro)
        if cell is None and command == "pool" and state.busy:
            coro.close()
            raise UsageError("%herd pool: the pool is still starting; ask in the next cell")
        if cell is None and (command in ("pool", "help") or state.answers_now(command)):
            return _run_now(coro)
        # Inside a running loop, as in the cell that ran %load_ext herd_nb before
        # the transformer existed: the command runs as a task of this cell (its
        # output lands here), and the next %herd command waits for it.
        state.defer(coro)
        return None


def _run_now(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never suspends (a local command) to its end."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise UsageError("%herd: this command must run on a line of its own")


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext herd_nb``: the magics and the input transformer."""
    ipython.register_magics(HerdMagics)
    transforms = ipython.input_transformers_cleanup
    if transform not in transforms:
        transforms.append(transform)


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext herd_nb``: remove the transformer (a running pool keeps running)."""
    with contextlib.suppress(ValueError):
        ipython.input_transformers_cleanup.remove(transform)
    state = _STATE.get(id(ipython))
    if state is not None:
        state.unload()
