"""Routes under ``{base_url}herd/``; every one requires Jupyter's authentication.

- ``GET api/stats``: ``{"pools": {name: PoolStats}}`` for every pool the
  extension runs;
- ``GET api/sessions``: every pinned session; ``DELETE api/sessions/{id}``: end
  one (a warm kernel's session is its kernel ID: the kernel is shut down; a
  session of the execute route: its cells are interrupted, then its kernel is
  shut down, or reset for reuse with ``c.Herd.worker_reuse``);
- ``POST api/sessions/{id}/execute``, ``.../interrupt``, ``.../input``: run code in
  a session of the server's kernel pools, streamed (the server side of ``%%herd``;
  see :class:`ExecuteHandler`);
- ``proxy/...``: the process pool behind :class:`herd.proxy.ProxyHandler`, HTTP and
  WebSocket, after Jupyter's authentication (a WebSocket upgrade is a GET, so it
  passes the same check before anything reaches a worker), with Jupyter's
  ``Origin`` check on WebSocket upgrades and its security headers on every
  answer; the worker never sees the server's token or login cookie (see
  :class:`HerdProxyHandler`).

Unsafe methods (POST, DELETE) pass Jupyter's XSRF check, as its own API does:
token authentication (``Authorization: token ...``) needs nothing more; a
browser's cookie login also needs the ``_xsrf`` cookie echoed in ``X-XSRFToken``.

The execute route::

    POST sessions/{id}/execute  {"code", "kernel"?, "stdin"?}
        -> ExecuteSessions.submit()  one job per request, a task:
             pool.acquire(id)          the session: a warm kernel, pinned from now on
             async with cells.lock     cells of one session run one after the other
               run_cell(worker.client) events -> one NDJSON line each, flushed
        <- 200 application/x-ndjson, the last line {"type": "done", ...}
    client disconnects   -> the job is cancelled: run_cell interrupts the kernel
    POST .../interrupt   -> SIGINT to the kernel (and a pending input() withdrawn)
    POST .../input       -> answers the running cell's input()
    DELETE sessions/{id} -> jobs cancelled, then the session ended
    every ttl / 4        -> sessions with no job for ttl seconds are ended
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import json
import logging
import time
import urllib.parse
from collections.abc import Callable
from typing import Any, Protocol

import tornado
from jupyter_server.base.handlers import APIHandler, JupyterHandler
from jupyter_server.base.websocket import WebSocketMixin
from tornado import httputil, web

import herd
from herd.proxy import ProxyHandler, ProxySettings

from ._execute import Event, InterruptIgnoredError, KernelDiedError, run_cell
from .kernelmanager import HerdKernelManager, ServesHerdKernels
from .kernels import KernelWorker

__all__ = [
    "ExecuteHandler",
    "ExecuteSessions",
    "HerdProxyHandler",
    "InputHandler",
    "InterruptHandler",
    "SessionHandler",
    "SessionsHandler",
    "StatsHandler",
]

log = logging.getLogger("herd_nb")

# Seconds a kernel client restarted for a session may take to hear from the kernel.
_CLIENT_READY = 10.0

# The proxy route's protections (HerdProxyHandler). Always on, but for the tests
# that show what a page or a worker could do without each one.
#: Refuse a WebSocket upgrade from another site, as Jupyter's own WebSockets do.
CHECK_ORIGIN = True
#: Jupyter's security headers (CSP, ``X-Content-Type-Options``, ``headers``) on
#: every answer of the route.
SECURITY_HEADERS = True
#: Keep the server's token, login cookie and XSRF token from the workers.
STRIP_CREDENTIALS = True

# Where Jupyter (and Tornado's XSRF check) read credentials from a request.
_CREDENTIAL_HEADERS = ("Authorization", "X-XSRFToken", "X-CSRFToken")
_CREDENTIAL_QUERY = frozenset({"token", "_xsrf"})


class _PoolsHandler(APIHandler):
    @property
    def pools(self) -> dict[str, herd.Pool[Any]]:
        return dict(self.settings.get("herd_pools", {}))


def _session_id(session_id: str) -> str:
    try:
        return herd.validate_session_id(session_id)
    except herd.InvalidSessionIdError as exc:
        raise web.HTTPError(400, str(exc)) from None


class StatsHandler(_PoolsHandler):
    """``GET``: the stats of every pool."""

    @web.authenticated
    async def get(self) -> None:
        stats = {name: pool.stats().as_dict() for name, pool in self.pools.items()}
        self.finish(json.dumps({"pools": stats}))


class SessionsHandler(_PoolsHandler):
    """``GET``: every pinned session with its pool and worker."""

    @web.authenticated
    async def get(self) -> None:
        sessions = [
            {"id": sid, "pool": name, "worker": worker}
            for name, pool in self.pools.items()
            for sid, worker in pool.sessions().items()
        ]
        self.finish(json.dumps({"sessions": sessions}))


class SessionHandler(_PoolsHandler):
    """``DELETE``: end one session (204; 404 if no pool has it)."""

    def initialize(self, sessions: ExecuteSessions | None = None) -> None:
        self.executions = sessions

    @web.authenticated
    async def delete(self, session_id: str) -> None:
        session_id = _session_id(session_id)
        manager = self.kernel_manager
        kernels = manager.herd_kernel_ids() if isinstance(manager, ServesHerdKernels) else {}
        if session_id in kernels:
            # A warm kernel's session is its kernel: end both, as Jupyter would.
            await self.kernel_manager.shutdown_kernel(session_id)
            self.set_status(204)
            self.finish()
            return
        if self.executions is not None and await self.executions.end(session_id):
            self.set_status(204)
            self.finish()
            return
        for pool in self.pools.values():
            if session_id in pool.sessions():
                await pool.release(session_id)
                self.set_status(204)
                self.finish()
                return
        raise web.HTTPError(404, f"no session {session_id!r}")


# -- running code in sessions of the kernel pools ----------------------------------------


@dataclasses.dataclass(eq=False)
class _Cells:
    """The execute route's side of one session; touched on the loop thread only."""

    # Held while a cell runs: the session's cells run one after the other, in
    # arrival order (asyncio.Lock is FIFO), as in a kernel's own queue.
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    # Executes of the session not finished yet: acquiring, queued on the lock, or
    # running. Added by submit() before its first await, removed when done.
    jobs: set[asyncio.Task[None]] = dataclasses.field(default_factory=set)
    # The running cell's unanswered input(): set by its on_input, resolved by the
    # input route (or withdrawn by an interrupt, with None).
    prompt: asyncio.Future[str | None] | None = None
    # When the session was last used (clock time): the TTL counts from here.
    last_used: float = 0.0


class _Stream(Protocol):
    """What a job needs of its HTTP response (an :class:`ExecuteHandler`)."""

    def start(self) -> None:
        """The session is acquired and the cell is accepted: send the headers."""

    def emit(self, event: Event) -> None:
        """Send one event as one line, now."""


def _done(status: str, started: float | None, reason: str) -> Event:
    """A ``done`` event for a cell that the kernel did not finish itself (``started``:
    its ``time.perf_counter()`` start; ``None``: it never ran)."""
    duration = 0.0 if started is None else round(time.perf_counter() - started, 6)
    return {
        "type": "done",
        "status": status,
        "execution_count": None,
        "duration": duration,
        "reason": reason,
    }


class ExecuteSessions:
    """The sessions of herd's kernel pools that the execute route runs code in.

    A session ID names one kernel of one kernelspec's pool (the first execute
    takes a warm spare, or starts one) until the session ends: by ``DELETE
    api/sessions/{id}``, after ``ttl`` seconds without an execute, or when its
    kernel dies (the next execute starts afresh). The kernel manager never sees
    these sessions: they are not Jupyter kernels (no ``/api/kernels`` entry, no
    culling by Jupyter; the TTL here does that), and an ID that is one of
    Jupyter's kernel IDs is refused.

    :param manager: the server's kernel manager, if it is herd's.
    :param unavailable: why herd runs no kernels on this server (the message of
        the route's 409), or ``None``.
    :param ttl: seconds a session may go without an execute before it ends;
        ``0``/``None``: never. A session with an execute in progress never ends
        by TTL.
    :param clock: monotonic seconds (for tests).
    """

    def __init__(
        self,
        manager: HerdKernelManager | None,
        *,
        unavailable: str | None = None,
        ttl: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.manager = manager
        self.unavailable = unavailable
        self.ttl = ttl or None
        self._clock = clock
        self._cells: dict[str, _Cells] = {}  # session ID -> its state; loop thread only
        self._sweeper: asyncio.Task[None] | None = None  # started with the first session

    # -- where a session lives ---------------------------------------------------------

    def _pinned(self, session_id: str) -> tuple[str, herd.Pool[Any]] | None:
        """The kernelspec and pool that have ``session_id`` pinned, if any."""
        if self.manager is None:
            return None
        for name, pool in self.manager.herd_pools.items():
            if session_id in pool.sessions():
                return name, pool
        return None

    def worker_of(self, session_id: str) -> KernelWorker | None:
        """The kernel pinned to ``session_id`` (any session of the kernel pools)."""
        found = self._pinned(session_id)
        if found is None:
            return None
        worker_id = found[1].sessions()[session_id]
        for worker in found[1].workers():
            if worker.id == worker_id and isinstance(worker, KernelWorker):
                return worker
        return None

    async def pool_for(self, session_id: str, kernel_name: str | None) -> herd.Pool[Any]:
        """The pool to run ``session_id`` in: where it is pinned, else ``kernel_name``'s
        (default: the server's default kernelspec).

        :raises tornado.web.HTTPError: 409 (no herd kernel pools here; the ID is a
            Jupyter kernel's; the session runs another kernelspec), 404 (no such
            kernelspec), 503 (the pool is not running).
        """
        manager = self.manager
        if manager is None or self.unavailable is not None:
            raise web.HTTPError(409, f"herd: no kernel pool on this server: {self.unavailable}")
        if session_id in manager:
            raise web.HTTPError(
                409,
                f"herd: {session_id!r} is a Jupyter kernel of this server; "
                "run code in it through /api/kernels",
            )
        pinned = self._pinned(session_id)
        if pinned is not None:
            if kernel_name is not None and kernel_name != pinned[0]:
                raise web.HTTPError(
                    409,
                    f"herd: session {session_id!r} runs kernel {pinned[0]!r}, "
                    f"not {kernel_name!r}; end it first",
                )
            pool = pinned[1]
        else:
            name = kernel_name or manager.default_kernel_name
            specs: Any = manager.kernel_spec_manager
            if name not in specs.find_kernel_specs():
                raise web.HTTPError(404, f"herd: no kernelspec {name!r} is installed")
            found = await manager.herd_pool(name)
            if found is None:
                raise web.HTTPError(409, f"herd: no kernel pool for {name!r} on this server")
            pool = found
        if pool.state is not herd.PoolState.READY:
            raise web.HTTPError(503, f"herd: the kernel pool is {pool.state.value}")
        return pool

    # -- running cells -----------------------------------------------------------------

    def submit(
        self, session_id: str, pool: herd.Pool[Any], code: str, *, stdin: bool, stream: _Stream
    ) -> asyncio.Task[None]:
        """Run ``code`` in the session, after the session's earlier cells.

        Cancelling the task before the cell runs drops it; while it runs, interrupts
        the kernel and lets the cell end (the stream still ends with ``done``).

        :returns: the job; it raises :class:`tornado.web.HTTPError` if the session
            cannot be acquired (before ``stream.start()``).
        """
        cells = self._cells.get(session_id)
        if cells is None:
            cells = self._cells[session_id] = _Cells(last_used=self._clock())
        job = asyncio.ensure_future(self._execute(session_id, cells, pool, code, stdin, stream))
        cells.jobs.add(job)
        job.add_done_callback(cells.jobs.discard)
        if self.ttl and self._sweeper is None:
            self._sweeper = asyncio.ensure_future(self._sweep_loop(self.ttl))
        return job

    async def _execute(
        self,
        session_id: str,
        cells: _Cells,
        pool: herd.Pool[Any],
        code: str,
        stdin: bool,
        stream: _Stream,
    ) -> None:
        session = await self._acquire(pool, session_id)
        # The use is held to the end of the cell: nothing ends the session's kernel
        # under a running cell, and the TTL counts from when it ends.
        try:
            stream.start()
            async with cells.lock:
                try:
                    session.check()
                except herd.WorkerDeadError as exc:
                    # It died under the cell before this one; the next execute of
                    # the ID starts a new kernel, but this cell was meant for that one.
                    stream.emit(_done("dead", None, exc.reason or "the kernel died"))
                    return
                if session.ended:
                    stream.emit(_done("aborted", None, "the session was ended"))
                    return
                worker = session.worker
                assert isinstance(worker, KernelWorker)
                await self._run(cells, worker, code, stdin, stream)
        finally:
            await session.close()
            cells.last_used = self._clock()

    async def _acquire(self, pool: herd.Pool[Any], session_id: str) -> herd.Session[Any]:
        try:
            return await pool.acquire(session_id)
        except herd.PoolExhaustedError as exc:
            raise web.HTTPError(
                503,
                f"herd: all {pool.config.max_workers} kernels are in use (c.Herd.max_workers)",
            ) from exc
        except herd.PoolClosedError as exc:
            raise web.HTTPError(503, f"herd: the kernel pool is closed: {exc}") from exc
        except herd.InvalidSessionIdError as exc:
            raise web.HTTPError(400, str(exc)) from exc
        except herd.HerdError as exc:
            raise web.HTTPError(500, f"herd: cannot start a kernel: {exc}") from exc

    async def _run(
        self, cells: _Cells, worker: KernelWorker, code: str, stdin: bool, stream: _Stream
    ) -> None:
        started = time.perf_counter()
        loop = asyncio.get_running_loop()

        async def on_input(prompt: str, password: bool) -> str | None:
            answer: asyncio.Future[str | None] = loop.create_future()
            cells.prompt = answer
            died = asyncio.ensure_future(worker.wait())
            try:
                # A kernel that dies at the prompt will never read the answer.
                waits: list[asyncio.Future[Any]] = [answer, died]
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                died.cancel()
                if cells.prompt is answer:
                    cells.prompt = None
                answer.cancel()  # no-op once answered
            if answer.cancelled():
                raise KernelDiedError("the kernel died while it waited for input")
            return answer.result()

        try:
            client = await worker.renew_client(_CLIENT_READY)
            await run_cell(
                client,
                code,
                on_event=stream.emit,
                on_input=on_input if stdin else None,
                interrupt=worker.manager.interrupt_kernel,
                alive=lambda: worker.alive,
            )
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if me is not None and me.cancelling():
                raise  # this job was cancelled (run_cell has interrupted the cell)
            # Not this job: the cell's wait on the client's sockets, cancelled when
            # the worker closed them (the pool saw the kernel exit, or is stopping).
            reason = "the kernel was shut down" if worker.alive else await worker.wait()
            stream.emit(_done("dead", started, reason))
        except InterruptIgnoredError as exc:
            # The kernel lives on, still running the cell: not a death.
            stream.emit(_done("error", started, str(exc)))
        except KernelDiedError as exc:
            reason = await worker.wait() if not worker.alive else str(exc)
            stream.emit(_done("dead", started, reason))

    # -- the other routes --------------------------------------------------------------

    async def interrupt(self, session_id: str) -> bool:
        """Interrupt the session's kernel; a pending ``input()`` is withdrawn.

        :returns: whether the session exists.
        """
        worker = self.worker_of(session_id)
        if worker is None:
            return False
        await worker.manager.interrupt_kernel()
        cells = self._cells.get(session_id)
        if cells is not None and cells.prompt is not None and not cells.prompt.done():
            # The kernel's input() ends with its KeyboardInterrupt, but run_cell
            # waits for an answer before it reads on: withdraw the prompt (None:
            # no reply is sent; a reply could reach input() before the signal).
            cells.prompt.set_result(None)
        return True

    def answer(self, session_id: str, value: str) -> bool:
        """Answer the running cell's ``input()``.

        :returns: whether one was pending.
        """
        cells = self._cells.get(session_id)
        if cells is None or cells.prompt is None or cells.prompt.done():
            return False
        cells.prompt.set_result(value)
        return True

    async def end(self, session_id: str) -> bool:
        """End a session of the kernel pools (not a Jupyter kernel): its queued cells
        are dropped, the running one is interrupted and ends, then the kernel
        manager ends the session (its kernel is gone when this returns).

        :returns: whether there was such a session.
        """
        if self.manager is None or session_id in self.manager:
            return False
        # The state stays while its jobs end: an execute arriving meanwhile queues
        # on the same lock instead of running beside the interrupted cell.
        cells = self._cells.get(session_id)
        if cells is not None and cells.jobs:
            jobs = set(cells.jobs)
            for job in jobs:
                job.cancel()
            # Not bounded here: run_cell gives an interrupted cell 10 s, then gives
            # up on it. The kernel goes after the last use of it, not under it.
            await asyncio.wait(jobs)
        ended = await self.manager.end_herd_session(session_id)
        if cells is not None and not cells.jobs and self._cells.get(session_id) is cells:
            del self._cells[session_id]
        return ended

    # -- TTL -------------------------------------------------------------------------

    async def sweep(self) -> list[str]:
        """End the sessions unused for ``ttl`` seconds; forget those that ended
        otherwise (their kernel died).

        :returns: the IDs of the sessions it ended.
        """
        now = self._clock()
        ended = []
        for session_id, cells in list(self._cells.items()):
            if cells.jobs:
                continue
            if self._pinned(session_id) is None:
                self._cells.pop(session_id, None)
            elif self.ttl and now - cells.last_used >= self.ttl:
                tag = herd.session_tag(session_id)
                log.info("herd: session %s unused for %gs: ending it", tag, self.ttl)
                await self.end(session_id)
                ended.append(session_id)
        return ended

    async def _sweep_loop(self, ttl: float) -> None:
        every = min(60.0, max(0.5, ttl / 4))
        while True:
            await asyncio.sleep(every)
            try:
                await self.sweep()
            except Exception:
                log.exception("herd: ending idle sessions failed")

    async def aclose(self) -> None:
        """Stop the TTL sweeps (the pools' shutdown ends the kernels)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper


class _ExecuteBase(APIHandler):
    def initialize(self, sessions: ExecuteSessions) -> None:
        self.executions = sessions

    def json_body(self) -> dict[str, Any]:
        body = self.get_json_body()
        if not isinstance(body, dict):
            raise web.HTTPError(400, "the body must be a JSON object")
        return body


class ExecuteHandler(_ExecuteBase):
    """``POST``: run code in a session of the server's kernel pools, streamed.

    Body: ``{"code": str, "kernel": kernelspec name (optional: the session's,
    else the server's default), "stdin": bool (optional, false)}``.

    Answer: ``200``, ``Content-Type: application/x-ndjson``, sent once the
    session has its kernel (a cell queued behind the session's running one
    waits after that), then one JSON object per line, each sent as it happens:
    the cell's output as events (a Jupyter message's content, its type as
    ``"type"``: ``stream``, ``display_data``, ``update_display_data``,
    ``clear_output``, ``execute_result``, ``error``, and ``input_request`` when
    ``stdin`` is true: answer it with :class:`InputHandler`). The last line is
    always ``{"type": "done", "status", "execution_count", "duration"}``,
    ``status`` being the kernel's (``ok``, ``error``, ``aborted``), or one with a
    ``reason`` and no ``execution_count``: ``"dead"`` (the kernel died or was
    shut down during the cell; the session's state is gone, its next execute
    starts a new kernel), ``"aborted"`` (the session was ended before the cell
    ran), ``"error"`` (herd failed; logged).

    A client that closes the connection interrupts its cell (a queued one is
    dropped); the session and its state stay.

    Errors before the stream starts are Jupyter's JSON errors: 400 (session ID,
    body), 404 (kernelspec), 409 (no herd kernel pool here, the ID is a Jupyter
    kernel's, the session runs another kernelspec), 503 (every kernel in use
    after ``acquire_timeout``), 500 (a kernel could not start).
    """

    _job: asyncio.Task[None] | None = None
    _gone = False  # the client closed the connection
    _streaming = False  # headers sent: errors can no longer be HTTP statuses

    @web.authenticated
    async def post(self, session_id: str) -> None:
        session_id = _session_id(session_id)
        body = self.json_body()
        code, kernel, stdin = body.get("code"), body.get("kernel"), body.get("stdin", False)
        if not isinstance(code, str):
            raise web.HTTPError(400, 'the body needs "code": a string')
        if kernel is not None and not (isinstance(kernel, str) and kernel):
            raise web.HTTPError(400, '"kernel" must be a kernelspec name')
        if not isinstance(stdin, bool):
            raise web.HTTPError(400, '"stdin" must be true or false')
        pool = await self.executions.pool_for(session_id, kernel)
        if self.gone():
            return
        job = self._job = self.executions.submit(session_id, pool, code, stdin=stdin, stream=self)
        await asyncio.wait([job])  # its outcome is read below, not raised here
        if job.cancelled():
            if self.gone():
                return
            if not self._streaming:
                raise web.HTTPError(409, f"herd: session {session_id!r} was ended")
            self.emit(_done("aborted", None, "the session was ended"))
        elif (error := job.exception()) is not None:
            if not self._streaming:
                raise error
            log.error(
                "herd: execute in session %s failed", herd.session_tag(session_id), exc_info=error
            )
            self.emit(_done("error", None, f"herd: {error!r}"))
        self.finish(set_content_type="application/x-ndjson")

    def gone(self) -> bool:
        """Whether the client has closed the connection."""
        return self._gone

    def start(self) -> None:
        self._streaming = True
        self.set_header("Content-Type", "application/x-ndjson")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")  # a proxy in front must not buffer it
        self._send()

    def emit(self, event: Event) -> None:
        if self._gone:
            return
        self.write(json.dumps(event, default=str) + "\n")
        self._send()

    def _send(self) -> None:
        # Not awaited: events come from synchronous callbacks, and tornado keeps
        # writes in order. A closed connection fails the future; that is seen
        # by on_connection_close, so the failure is only retrieved here.
        self.flush().add_done_callback(lambda sent: sent.exception())

    def on_connection_close(self) -> None:
        # The client went away: a queued cell is dropped, a running one is
        # interrupted (the session and its state stay).
        self._gone = True
        if self._job is not None:
            self._job.cancel()
        super().on_connection_close()


class InterruptHandler(_ExecuteBase):
    """``POST``: interrupt the session's kernel (204; 404 if no such session).

    The running cell ends with ``KeyboardInterrupt`` (unless it catches it); a
    pending ``input()`` ends with it too. The session and its state stay.
    """

    @web.authenticated
    async def post(self, session_id: str) -> None:
        session_id = _session_id(session_id)
        if not await self.executions.interrupt(session_id):
            raise web.HTTPError(404, f"no session {session_id!r} in herd's kernel pools")
        self.set_status(204)
        self.finish()


class InputHandler(_ExecuteBase):
    """``POST {"value": str}``: answer the ``input()`` the running cell of the session
    waits on (204; 409 if it waits on none; 400 for a bad body)."""

    @web.authenticated
    async def post(self, session_id: str) -> None:
        session_id = _session_id(session_id)
        value = self.json_body().get("value")
        if not isinstance(value, str):
            raise web.HTTPError(400, 'the body needs "value": a string')
        if not self.executions.answer(session_id, value):
            raise web.HTTPError(409, f"herd: no input() is pending in session {session_id!r}")
        self.set_status(204)
        self.finish()


@web.stream_request_body
class HerdProxyHandler(JupyterHandler, ProxyHandler):
    """:class:`herd.proxy.ProxyHandler` behind Jupyter's authentication and XSRF check.

    The workers are served from the Jupyter server's own origin, so the route
    keeps Jupyter's rules for its own pages and sockets:

    - a WebSocket upgrade passes Jupyter's ``Origin`` check
      (:meth:`check_websocket_origin`): another site's page cannot open one with
      the user's cookie; ``ServerApp.allow_origin`` / ``allow_origin_pat`` are
      honoured, and a token-authenticated upgrade is not checked, as on
      Jupyter's kernel WebSocket;
    - every answer carries Jupyter's security headers (``Content-Security-Policy``
      with ``frame-ancestors``, ``X-Content-Type-Options: nosniff``, and
      ``tornado_settings["headers"]``): herd's JSON errors, and the worker's
      responses, whose own headers pass but do not replace these (a worker's
      CSP goes alongside Jupyter's);
    - the worker gets no credential of the server (:meth:`forward_headers`,
      :meth:`forward_uri`): not the token, nor the login cookie, nor the XSRF
      token. Its other headers, cookies and query parameters pass.
    """

    def initialize(self, settings: ProxySettings | None = None, **fields: Any) -> None:
        ProxyHandler.initialize(self, settings, **fields)

    async def prepare(self) -> None:  # type: ignore[override]
        # Jupyter's checks first: identity (403 or a login redirect when
        # missing), and XSRF for unsafe methods. Nothing reaches a worker before.
        # JupyterHandler.prepare ends with ``return super().prepare()``, which, by
        # this class's MRO, is ProxyHandler.prepare's coroutine: awaited here, once.
        proxy_step = await JupyterHandler.prepare(self)
        if self.current_user is None:
            if inspect.iscoroutine(proxy_step):
                proxy_step.close()
            raise web.HTTPError(403)
        if inspect.isawaitable(proxy_step):
            await proxy_step
        else:  # a jupyter_server whose prepare no longer goes on up the MRO
            await ProxyHandler.prepare(self)

    def on_finish(self) -> None:
        ProxyHandler.on_finish(self)
        JupyterHandler.on_finish(self)

    def set_default_headers(self) -> None:
        """Jupyter's headers for its own pages; :meth:`ProxyHandler.clear` keeps them
        on herd's JSON errors and over the worker's responses."""
        if SECURITY_HEADERS:
            JupyterHandler.set_default_headers(self)

    def check_websocket_origin(self) -> bool:
        """Jupyter's check for its own WebSockets (the kernel's, say): Tornado's
        ``WebSocketHandler`` algorithm with :meth:`WebSocketMixin.check_origin
        <jupyter_server.base.websocket.WebSocketMixin.check_origin>`.

        Allowed: no ``Origin`` (not a browser), an ``Origin`` whose host is the
        ``Host``, one that ``ServerApp.allow_origin`` (or ``allow_origin_pat``)
        allows, any with ``allow_origin = "*"``, and token-authenticated requests
        (Jupyter's identity provider skips the check for them); with Tornado 6.6 or
        later, also what the browser itself calls same-origin (``Sec-Fetch-Site``).
        Runs after :meth:`prepare` authenticated the user, which the identity
        provider needs.
        """
        if not CHECK_ORIGIN:
            return True

        def allowed(origin: str) -> bool:
            # Called unbound: it reads only what JupyterHandler has (settings,
            # request, skip_check_origin, log), and it is Jupyter's rule verbatim.
            return bool(WebSocketMixin.check_origin(self, origin))

        headers = self.request.headers
        origin = headers.get("Origin")
        if tornado.version_info < (6, 6):  # WebSocketHandler.get before Tornado 6.6
            origin = origin if origin is not None else headers.get("Sec-Websocket-Origin")
            return origin is None or allowed(origin)
        # Tornado 6.6's cross-origin algorithm, which its WebSocketHandler.get runs:
        # the browser's own word (Sec-Fetch-Site) first, the Origin after.
        fetch_site = headers.get("Sec-Fetch-Site")
        if fetch_site in ("same-origin", "none"):  # same origin, or typed in
            return True
        if fetch_site is None:  # an older browser, plain HTTP, or not a browser
            host = headers.get("Host", "").lower()
            return (
                origin is None
                or urllib.parse.urlsplit(origin).netloc.lower() == host
                or allowed(origin)
            )
        return origin is not None and origin != "" and allowed(origin)  # cross-/same-site

    def forward_headers(self, headers: httputil.HTTPHeaders) -> None:
        """Remove the server's credentials: ``Authorization`` (where Jupyter reads
        its token), the XSRF token headers, and the login and ``_xsrf`` cookies
        from ``Cookie`` (the other cookies pass, in their order)."""
        if not STRIP_CREDENTIALS:
            return
        for name in _CREDENTIAL_HEADERS:
            if name in headers:
                del headers[name]
        if "Cookie" not in headers:
            return
        secret = {
            self.identity_provider.get_cookie_name(self),
            self.settings.get("xsrf_cookie_name", "_xsrf"),
        }
        kept = [
            crumb.strip()
            for value in headers.get_list("Cookie")
            for crumb in value.split(";")
            if crumb.strip() and crumb.partition("=")[0].strip() not in secret
        ]
        del headers["Cookie"]
        if kept:
            headers["Cookie"] = "; ".join(kept)

    def forward_uri(self, uri: str) -> str:
        """``uri`` without the ``token`` and ``_xsrf`` query parameters (Jupyter
        reads its token from the first, Tornado its XSRF token from the second);
        the others pass as they are, in their order."""
        if not STRIP_CREDENTIALS:
            return uri
        path, sep, query = uri.partition("?")
        if not sep:
            return uri
        params = query.split("&")
        # Names decoded as Tornado decodes them (so "%74oken" is "token" too).
        kept = [
            param
            for param in params
            if urllib.parse.unquote_plus(param.partition("=")[0], encoding="latin-1")
            not in _CREDENTIAL_QUERY
        ]
        if len(kept) == len(params):
            return uri
        return path + ("?" + "&".join(kept) if kept else "")
