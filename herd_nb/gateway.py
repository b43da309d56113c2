"""``herd serve --kernel NAME``: a session-pinned kernel gateway on herd's warm kernels.

One process serves two APIs on the same kernels:

- **The REPL API**, keyed by session ID (a session is made on first use, in a
  working directory of its own; its kernel is a warm spare moved there)::

      POST   /sessions/{id}/execute     {"code", "timeout"?}: the execution, streamed
                                        (NDJSON; SSE with Accept: text/event-stream;
                                        one JSON document with ?wait=1)
      POST   /sessions/{id}/interrupt   POST /sessions/{id}/restart
      DELETE /sessions/{id}             GET /sessions, GET /sessions/{id}
      PUT    /sessions/{id}/files/PATH  GET /sessions/{id}/files/PATH (streamed,
                                        confined to the session's directory)

- **The Jupyter Kernel Gateway protocol** (``/api/kernelspecs``, ``/api/kernels``,
  ``/api/kernels/{id}/channels``): jupyter_server's own kernel services, which
  ``jupyter lab --gateway-url`` and every Kernel Gateway client speak. A REPL
  session's kernel is a kernel there too (its ID derived from the session's).

The server is a :class:`jupyter_server.serverapp.ServerApp` with only those
services and herd_nb's kernel manager (:class:`~herd_nb.HerdKernelManager`: warm
spares, the sandbox and limits, restarts in place, death reasons). Every route,
WebSocket upgrades included, needs the token (``--token`` or ``HERD_TOKEN``,
compared in constant time) unless the server listens on loopback only and none
was given; a WebSocket handshake from a browser page must come from the server's
own origin (or ``--allow-origin``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import inspect
import json
import os
import re
import shutil
import stat
import time
import urllib.parse
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from jupyter_client.session import Session
from jupyter_server.auth.identity import IdentityProvider, User
from jupyter_server.base.handlers import APIHandler
from jupyter_server.serverapp import ServerApp
from tornado import web
from tornado.ioloop import PeriodicCallback
from traitlets import Bool, List, Unicode
from traitlets.config import Config

import herd

from ._execute import Event, InterruptIgnoredError, KernelDiedError, _next, run_cell
from .kernelmanager import HerdKernelManager

__all__ = ["GatewayApp", "ReplSessions", "main"]

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_KERNEL_IDS = uuid.UUID("6f0c1d1e-8a53-4c4e-9e0b-2f7d1b0b4d11")  # session ID -> kernel ID
_CHUNK = 64 * 1024
_DIR_KEY = os.urandom(16)  # sessions' directory names (see ReplSessions._dir)


def kernel_id_of(session_id: str) -> str:
    """The Jupyter kernel ID of a REPL session's kernel."""
    return str(uuid.uuid5(_KERNEL_IDS, session_id))


# -- authentication -----------------------------------------------------------------


class TokenIdentityProvider(IdentityProvider):
    """The gateway's token, and nothing else: no login page, no cookies.

    ``Authorization: token T`` or ``Bearer T`` (or ``?token=T``), compared in
    constant time; every WebSocket handshake's ``Origin`` is checked, token or not.
    Without a token (a gateway on loopback), every request is let in, but a
    request that changes something and comes from another site's page (an
    ``Origin`` that is not the ``Host``) is refused: no other site can make a
    browser run code here; and jupyter_server refuses a ``Host`` that is not
    local (a DNS-rebound name).
    """

    async def get_user(self, handler: web.RequestHandler) -> User | None:
        request = handler.request
        origin = request.headers.get("Origin")
        if request.method not in ("GET", "HEAD", "OPTIONS") and origin is not None:
            allowed = {o.rstrip("/").lower() for o in handler.settings.get("herd_origins", ())}
            host = (request.headers.get("Host") or "").lower()
            if urllib.parse.urlsplit(origin).netloc.lower() != host and (
                origin.rstrip("/").lower() not in allowed
            ):
                return None
        if not self.token:
            handler._token_authenticated = True  # type: ignore[attr-defined]  # (no XSRF)
            return self.generate_anonymous_user(handler)
        user = super().get_user(handler)
        return await user if inspect.isawaitable(user) else user

    async def get_user_token(self, handler: web.RequestHandler) -> User | None:
        token: str = self.token
        if not token:
            return None
        given = self.get_token(handler) or ""
        if hmac.compare_digest(given.encode(), token.encode()):
            return self.generate_anonymous_user(handler)
        return None

    def get_user_cookie(self, handler: web.RequestHandler) -> None:
        return None

    def set_login_cookie(self, handler: web.RequestHandler, user: User) -> None:
        return None

    def should_check_origin(self, handler: web.RequestHandler) -> bool:
        return True


# -- the REPL sessions ------------------------------------------------------------------


class _Session:
    """One REPL session: its kernel, directory, client and cells."""

    def __init__(self, session_id: str, cwd: Path) -> None:
        self.id = session_id
        self.kernel_id = kernel_id_of(session_id)
        self.cwd = cwd
        self.lock = asyncio.Lock()  # one cell at a time
        self.client: Any = None
        self.pid: int | None = None  # the kernel process the session last ran in
        self.lost = False  # its kernel died: the next execution says so
        self.last_activity = time.time()
        self.busy = False


class ReplSessions:
    """The REPL API's sessions, each a kernel of the server's kernel manager.

    :param manager: the server's kernel manager.
    :param root: where sessions' directories are made (``root/sessions/<hash>``).
    :param kernel_name: the kernelspec of every session.
    :param keep_dirs: keep a session's directory when it ends.
    """

    def __init__(
        self, manager: HerdKernelManager, root: Path, kernel_name: str, *, keep_dirs: bool
    ) -> None:
        self.manager = manager
        self.root = root
        self.kernel_name = kernel_name
        self.keep_dirs = keep_dirs
        self._sessions: dict[str, _Session] = {}
        self._starting: dict[str, asyncio.Future[_Session]] = {}

    def _dir(self, session_id: str) -> Path:
        # Hashed with this process's key: a session ID is a secret, a directory
        # name is easy to list, and an ID that is easy to guess must not be
        # confirmed by hashing the guess.
        name = hashlib.blake2b(session_id.encode(), key=_DIR_KEY, digest_size=12).hexdigest()
        return self.root / "sessions" / name

    def get(self, session_id: str) -> _Session | None:
        """The live session ``session_id`` (its kernel still exists), or ``None``."""
        session = self._sessions.get(session_id)
        if session is not None and session.kernel_id not in self.manager:
            self._forget(session)  # its kernel is gone (culled, or shut down)
            return None
        return session

    async def open(self, session_id: str) -> _Session:
        """The session, made on first use (its kernel a warm spare moved to its directory)."""
        session = self.get(session_id)
        if session is not None:
            return session
        starting = self._starting.get(session_id)
        if starting is None:
            starting = asyncio.ensure_future(self._start(session_id))
            self._starting[session_id] = starting
            starting.add_done_callback(lambda _: self._starting.pop(session_id, None))
        return await asyncio.shield(starting)

    def _make_dir(self, session_id: str) -> tuple[Path, str]:
        """The session's directory, made, and its path relative to the server's root."""
        cwd = self._dir(session_id)
        cwd.mkdir(parents=True, exist_ok=True)
        return cwd, os.path.relpath(cwd, self.manager.root_dir)

    async def _start(self, session_id: str) -> _Session:
        cwd, path = self._make_dir(session_id)
        session = _Session(session_id, cwd)
        try:
            await self.manager.start_kernel(
                kernel_id=session.kernel_id, path=path, kernel_name=self.kernel_name
            )
        except BaseException:
            if not self.keep_dirs:
                shutil.rmtree(cwd, ignore_errors=True)
            raise
        self._sessions[session_id] = session
        return session

    def _forget(self, session: _Session) -> None:
        if self._sessions.get(session.id) is session:
            del self._sessions[session.id]
        if session.client is not None:
            session.client.stop_channels()
            session.client = None
        if not self.keep_dirs:
            shutil.rmtree(session.cwd, ignore_errors=True)

    def _kernel_pid(self, session: _Session) -> int | None:
        km: Any = self.manager.get_kernel(session.kernel_id)
        process = getattr(getattr(km, "provisioner", None), "process", None)
        pid = getattr(process, "pid", None)
        return pid if isinstance(pid, int) else None

    async def execute(
        self, session: _Session, code: str, timeout: float | None, emit: Callable[[Event], None]
    ) -> None:
        """Run ``code`` in the session, ``emit`` each event; the last is ``done``."""
        async with session.lock:
            session.busy = True
            session.last_activity = time.time()
            try:
                await self._execute(session, code, timeout, emit)
            finally:
                session.busy = False
                session.last_activity = time.time()

    async def _execute(
        self, session: _Session, code: str, timeout: float | None, emit: Callable[[Event], None]
    ) -> None:
        km: Any = self.manager.get_kernel(session.kernel_id)
        started = time.perf_counter()
        if session.client is not None and self._kernel_pid(session) != session.pid:
            session.client.stop_channels()  # another process since: a new client
            session.client = None
        if session.client is None:
            try:
                session.client = await self._ready_client(km)
            except RuntimeError as exc:
                session.lost = True
                emit(_error("KernelUnavailable", str(exc)))
                emit(_done("dead", started))
                return
        pid = self._kernel_pid(session)
        if session.lost or (session.pid is not None and pid != session.pid):
            emit(
                {
                    "type": "restarted",
                    "message": "the session's kernel died and was started afresh since "
                    "its last execution: its variables are gone",
                }
            )
        session.lost = False
        session.pid = pid

        def passed(event: Event) -> None:
            if event.get("type") == "error":
                traceback = [str(line) for line in event.get("traceback", [])]
                event = {
                    **event,
                    "name": event.get("ename"),
                    "value": event.get("evalue"),
                    "traceback_text": [_ANSI.sub("", line) for line in traceback],
                }
            emit(event)

        cell = asyncio.ensure_future(
            run_cell(
                session.client,
                code,
                on_event=passed,
                interrupt=lambda: km.interrupt_kernel(),
                alive=_same_process(km),
            )
        )
        try:
            if timeout:
                done, _ = await asyncio.wait([cell], timeout=timeout)
                if not done:
                    emit({"type": "timeout", "after": timeout, "message": "interrupted"})
                    cell.cancel()  # run_cell interrupts the kernel and lets the cell end
            await cell
        except KernelDiedError as exc:
            if session.client is not None:
                session.client.stop_channels()
                session.client = None
            session.lost = True
            emit(_error("KernelDied", f"the kernel died: {exc}"))
            emit(_done("dead", started))
        except InterruptIgnoredError as exc:
            emit(_error("InterruptIgnored", str(exc)))
            emit(_done("error", started))
        except asyncio.CancelledError:
            if not cell.done():
                cell.cancel()
            raise

    async def _ready_client(self, km: Any, timeout: float = 60.0) -> Any:
        """A client of ``km``'s kernel once it answers; waits out a restart under way
        (a kernel that died is restarted in place by the kernel manager).

        :raises RuntimeError: it did not answer within ``timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # A session of its own: with the manager's (as km.client() would), the
        # client's shell socket would have the same ZMQ identity as any other
        # client made so (herd's start-up probe among them), and the kernel's
        # replies would go to one of them only.
        session = Session(
            key=km.session.key, signature_scheme=km.session.signature_scheme, username="herd"
        )
        client = km.client(session=session)
        client.start_channels()
        try:
            while True:
                if await _answers(client, loop.time() + 0.5):
                    return client
                if loop.time() > deadline or getattr(km, "execution_state", "") == "dead":
                    why = getattr(km, "reason", "") or "no answer to kernel_info"
                    raise RuntimeError(f"the kernel did not come back: {why}")
                if not await km.is_alive():
                    await asyncio.sleep(0.2)  # restarting in place: not yet running
        except BaseException:
            client.stop_channels()
            raise

    async def interrupt(self, session: _Session) -> None:
        manager: Any = self.manager
        interrupted = manager.interrupt_kernel(session.kernel_id)
        if inspect.isawaitable(interrupted):
            await interrupted

    async def restart(self, session: _Session) -> None:
        async with session.lock:
            await self.manager.restart_kernel(session.kernel_id)
            if session.client is not None:
                session.client.stop_channels()
                session.client = None
            session.pid = self._kernel_pid(session)

    async def end(self, session: _Session) -> None:
        if session.kernel_id in self.manager:
            await self.manager.shutdown_kernel(session.kernel_id)
        self._forget(session)

    def describe(self, session: _Session) -> dict[str, Any]:
        km: Any = self.manager.get_kernel(session.kernel_id)
        return {
            "id": session.id,
            "kernel_id": session.kernel_id,
            "kernel": self.kernel_name,
            "state": "busy" if session.busy else getattr(km, "execution_state", "unknown"),
            "cwd": str(session.cwd),
            "last_activity": session.last_activity,
        }

    def sweep(self) -> None:
        """Forget the sessions whose kernels went."""
        self.all()

    def all(self) -> list[_Session]:
        """The live sessions (those whose kernel went are forgotten, their directories
        removed)."""
        return [s for sid in list(self._sessions) if (s := self.get(sid)) is not None]

    async def aclose(self) -> None:
        for session in list(self._sessions.values()):
            self._forget(session)


async def _answers(client: Any, until: float) -> bool:
    """Whether the kernel answers ``client`` before the loop time ``until``: a
    ``kernel_info`` reply on shell, and on IOPub a message of the same request,
    so that IOPub is subscribed (what a ZMQ subscriber misses before it is
    connected, the next cell's output, cannot be lost). jupyter_client's
    ``wait_for_ready`` does the same, then waits 0.2 s more for IOPub to fall
    silent: most of a warm session's first result."""
    loop = asyncio.get_running_loop()
    poller = zmq.asyncio.Poller()
    channels = (client.shell_channel, client.iopub_channel)
    for channel in channels:
        poller.register(channel.socket, zmq.POLLIN)
    while loop.time() < until:
        msg_id = client.kernel_info()
        seen: set[Any] = set()
        again = min(loop.time() + 0.1, until)  # (a subscriber that joined late: ask again)
        while loop.time() < again:
            ready = dict(await poller.poll(max(int((again - loop.time()) * 1000), 1)))
            for channel in channels:
                if channel.socket in ready:
                    while (msg := await _next(channel)) is not None:
                        if msg["parent_header"].get("msg_id") == msg_id:
                            seen.add(channel)
            if len(seen) == 2:
                # The reply's own idle status may still come: read on it in the
                # cell (run_cell skips what is not its own).
                return True
    return False


def _same_process(km: Any) -> Callable[[], bool]:
    """Whether the kernel process of now still runs: a kernel that died and was
    restarted in place (a new process) is not the one the cell ran in."""
    process = getattr(getattr(km, "provisioner", None), "process", None)

    def alive() -> bool:
        now = getattr(getattr(km, "provisioner", None), "process", None)
        return now is process and (process is None or process.poll() is None)

    return alive


def _error(name: str, value: str) -> Event:
    """An error event of herd's own (not the kernel's)."""
    return {"type": "error", "name": name, "value": value, "traceback": [], "traceback_text": []}


def _done(status: str, started: float) -> Event:
    return {
        "type": "done",
        "status": status,
        "execution_count": None,
        "duration": round(time.perf_counter() - started, 6),
    }


# -- the REPL routes ----------------------------------------------------------------------


class _ReplHandler(APIHandler):
    @property
    def repl(self) -> ReplSessions:
        sessions: ReplSessions = self.settings["herd_repl"]
        return sessions

    def check_session_id(self, session_id: str) -> str:
        try:
            return herd.validate_session_id(session_id)
        except herd.InvalidSessionIdError as exc:
            raise web.HTTPError(400, str(exc)) from None

    def existing(self, session_id: str) -> _Session:
        session = self.repl.get(self.check_session_id(session_id))
        if session is None:
            raise web.HTTPError(404, "no such session (it is made by its first execute)")
        return session

    def json_body(self) -> dict[str, Any]:
        try:
            body = json.loads(self.request.body or b"{}")
        except ValueError as exc:
            raise web.HTTPError(400, f"the body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise web.HTTPError(400, "the body must be a JSON object")
        return body


class ExecuteHandler(_ReplHandler):
    """``POST /sessions/{id}/execute``: run code, the events streamed as they happen."""

    _gone = False  # the client closed the connection: the cell runs on, unread

    @web.authenticated
    async def post(self, session_id: str) -> None:
        self.check_session_id(session_id)
        body = self.json_body()
        code = body.get("code")
        if not isinstance(code, str):
            raise web.HTTPError(400, 'the body needs "code": a string')
        limit = self.settings.get("herd_max_code", 1 << 20)
        if len(code) > limit:
            raise web.HTTPError(413, f"code over {limit} characters")
        timeout = body.get("timeout")
        if timeout is not None and (
            not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0
        ):
            raise web.HTTPError(400, '"timeout" must be a positive number of seconds')
        session = await self.repl.open(session_id)
        wait = self.get_argument("wait", "") not in ("", "0", "false")
        sse = "text/event-stream" in (self.request.headers.get("Accept") or "")
        events: list[Event] = []
        if wait:
            await self.repl.execute(session, code, timeout, events.append)
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps({"session": session_id, "events": events}, default=str))
            return
        self.set_header("Content-Type", "text/event-stream" if sse else "application/x-ndjson")
        self.set_header("Cache-Control", "no-cache")

        def emit(event: Event) -> None:
            if self._gone:  # the cell runs on (its session keeps it); nobody reads it
                return
            line = json.dumps(event, default=str)
            self.write(f"event: {event['type']}\ndata: {line}\n\n" if sse else line + "\n")
            self.flush()

        await self.repl.execute(session, code, timeout, emit)
        if not self._gone:
            self.finish()

    def on_connection_close(self) -> None:
        self._gone = True


class InterruptHandler(_ReplHandler):
    @web.authenticated
    async def post(self, session_id: str) -> None:
        await self.repl.interrupt(self.existing(session_id))
        self.set_status(204)
        self.finish()


class RestartHandler(_ReplHandler):
    @web.authenticated
    async def post(self, session_id: str) -> None:
        session = self.existing(session_id)
        await self.repl.restart(session)
        self.finish(json.dumps(self.repl.describe(session)))


class SessionHandler(_ReplHandler):
    @web.authenticated
    async def get(self, session_id: str) -> None:
        self.finish(json.dumps(self.repl.describe(self.existing(session_id))))

    @web.authenticated
    async def delete(self, session_id: str) -> None:
        await self.repl.end(self.existing(session_id))
        self.set_status(204)
        self.finish()


class SessionsHandler(_ReplHandler):
    @web.authenticated
    async def get(self) -> None:
        self.finish(json.dumps([self.repl.describe(s) for s in self.repl.all()]))


def confined(cwd: Path, relative: str) -> Path:
    """``relative`` under ``cwd``, or a 400: no ``..``, no absolute path, and no
    symbolic link on the way that leads out."""
    parts = [p for p in relative.split("/") if p not in ("", ".")]
    if not parts or ".." in parts or "\x00" in relative:
        raise web.HTTPError(400, f"a file path inside the session's directory, not {relative!r}")
    path = cwd.joinpath(*parts)
    root = cwd.resolve()
    parent = path.parent.resolve()
    if parent != root and root not in parent.parents:
        raise web.HTTPError(400, f"{relative!r} leads out of the session's directory")
    return parent / path.name


@web.stream_request_body
class FilesHandler(_ReplHandler):
    """``PUT`` and ``GET /sessions/{id}/files/{path}``, streamed, in the session's directory."""

    def initialize(self) -> None:
        self._file: Any = None
        self._written = 0

    async def prepare(self) -> None:  # type: ignore[override]  # (as APIHandler.prepare)
        # Before the body: authenticated, and the path checked, so that a refused
        # upload is answered at once (never a byte of it written).
        await super().prepare()
        if self.request.method == "PUT":
            if self.current_user is None:
                raise web.HTTPError(403)
            await self._open(*self.path_args)

    @web.authenticated
    async def put(self, session_id: str, relative: str) -> None:
        self._file.close()
        os.replace(self._tmp, self._target)
        self.set_status(201)
        self.finish(json.dumps({"path": relative, "bytes": self._written}))

    async def _open(self, session_id: str, relative: str) -> None:
        session = await self.repl.open(self.check_session_id(session_id))
        self._target = confined(session.cwd, relative)
        self._target.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self._target.with_name(f".{self._target.name}.herd-upload")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
        self._file = os.fdopen(os.open(self._tmp, flags, 0o644), "wb")

    def data_received(self, chunk: bytes) -> None:
        if self._file is None:  # not an upload (or refused already)
            return
        self._file.write(chunk)
        self._written += len(chunk)

    def on_finish(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)

    @web.authenticated
    async def get(self, session_id: str, relative: str) -> None:
        session = self.existing(session_id)
        path = confined(session.cwd, relative)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise web.HTTPError(404, f"no file {relative!r} in the session's directory") from None
        except OSError as exc:
            raise web.HTTPError(400, f"{relative!r}: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                raise web.HTTPError(400, f"{relative!r} is not a file")
            self.set_header("Content-Type", "application/octet-stream")
            while chunk := file.read(_CHUNK):
                self.write(chunk)
                await self.flush()
        self.finish()


# -- the application ----------------------------------------------------------------


class GatewayApp(ServerApp):
    """jupyter_server as herd's kernel gateway: the kernel services only, herd's
    kernel manager, the token, and the REPL routes."""

    name = "herd-gateway"
    description = "herd serve --kernel: a session-pinned kernel gateway"
    default_services = ("api", "kernels", "kernelspecs")  # type: ignore[assignment]

    kernel_name = Unicode("python3", config=True, help="The kernelspec of REPL sessions.")
    keep_session_dirs = Bool(False, config=True, help="Keep a session's directory when it ends.")
    allow_origins = List(Unicode(), config=True, help="Origins whose pages may open WebSockets.")

    def find_server_extensions(self) -> None:
        # herd_nb only: none of the user's other extensions (JupyterLab's pages...).
        self.jpserver_extensions = {"herd_nb": True}

    def init_webapp(self) -> None:
        super().init_webapp()
        manager = self.kernel_manager
        if not isinstance(manager, HerdKernelManager):
            raise RuntimeError("the gateway needs herd_nb's kernel manager")
        repl = ReplSessions(
            manager, Path(self.root_dir), self.kernel_name, keep_dirs=self.keep_session_dirs
        )
        self.web_app.settings["herd_repl"] = repl
        self._repl = repl
        # Sessions whose kernels went (culled after c.Herd.ttl idle, shut down
        # through /api/kernels) lose their directories within half a minute.
        self._sweeper = PeriodicCallback(repl.sweep, 30_000)
        self._sweeper.start()
        self.web_app.settings["herd_origins"] = list(self.allow_origins)
        sid = r"([^/]+)"
        self.web_app.add_handlers(
            ".*$",
            [
                (r"/sessions", SessionsHandler),
                (rf"/sessions/{sid}", SessionHandler),
                (rf"/sessions/{sid}/execute", ExecuteHandler),
                (rf"/sessions/{sid}/interrupt", InterruptHandler),
                (rf"/sessions/{sid}/restart", RestartHandler),
                (rf"/sessions/{sid}/files/(.+)", FilesHandler),
            ],
        )

    async def cleanup_extensions(self) -> None:
        sweeper = getattr(self, "_sweeper", None)
        if sweeper is not None:
            sweeper.stop()
        repl = getattr(self, "_repl", None)
        if repl is not None:
            await repl.aclose()  # the sessions' directories go with the gateway
        await super().cleanup_extensions()


def gateway_config(args: Any, token: str | None, root: str) -> Config:
    """The server's config from ``herd serve --kernel``'s flags."""
    config = Config()
    server = config.ServerApp
    server.ip = args.host
    server.port = args.port
    server.port_retries = 0
    server.open_browser = False
    server.root_dir = root
    server.kernel_manager_class = "herd_nb.kernelmanager.HerdKernelManager"
    # Untrusted code: every kernel in herd's pool (sandbox, limits, cap), none the
    # stock way (as a notebook server falls back to while its pool starts).
    config.HerdKernelManager.herd_only = True
    server.identity_provider_class = "herd_nb.gateway.TokenIdentityProvider"
    server.allow_root = True
    config.GatewayApp.allow_origins = list(args.allow_origin)
    if args.allow_origin:
        server.allow_origin_pat = "|".join(re.escape(o.rstrip("/")) for o in args.allow_origin)
    config.IdentityProvider.token = token or ""
    config.GatewayApp.kernel_name = args.kernel
    config.GatewayApp.keep_session_dirs = args.keep_session_dirs
    herd = config.Herd
    herd.kernel_names = [args.kernel]
    herd.warm_kernels = args.warm
    herd.max_workers = args.max_workers
    herd.ttl = args.ttl or 0.0
    herd.health_interval = args.health_interval or 0.0
    herd.cpu_limit = args.cpu
    herd.memory_limit = args.memory
    herd.pids_limit = args.pids
    herd.sandbox = not args.no_sandbox
    herd.worker_reuse = False
    return config


def _loopback(host: str) -> bool:
    return host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")


def main(args: Any) -> int:
    """Run the gateway for ``herd serve --kernel`` until SIGINT or SIGTERM."""
    if args.user is not None or args.env or args.network != "private":
        raise ValueError(
            "--user, --env and --network are for worker commands; kernels of --kernel run "
            "as the gateway's user, with its environment (their sandbox and limits: "
            "--no-sandbox, --cpu, --memory, --pids)"
        )
    token = args.token or os.environ.get("HERD_TOKEN") or None
    if token is None and not _loopback(args.host):
        raise ValueError(
            f"--host {args.host} listens beyond loopback: give --token (or $HERD_TOKEN)"
        )
    root = args.cwd or os.path.join(os.getcwd(), ".herd-gateway")
    os.makedirs(root, exist_ok=True)
    GatewayApp.launch_instance(argv=[], config=gateway_config(args, token, root))
    return 0
