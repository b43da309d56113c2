"""``herd serve``: the standalone session-routing gateway.

::

    herd serve --port 8080 --min 1 --max 5 --ttl 15m --session-header X-Session-ID -- \\
        python -m http.server --bind 127.0.0.1 {port}

Starts a :class:`herd.Pool` of the command after ``--``, and a
:class:`herd.proxy.RelayServer` that routes every request to its session's worker.
SIGINT or SIGTERM stops the server, then every worker, then exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hmac
import json
import logging
import os
import re
import resource
import signal
import socket
import sys
import time
import urllib.parse
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from tornado.netutil import bind_sockets

from . import __version__
from ._pool import Pool
from ._process import ProcessFactory
from ._session import session_tag
from .proxy import (
    ProxySettings,
    RelayServer,
    RequestHead,
    Route,
    SessionKey,
    from_cookie,
    from_header,
    from_path,
    from_query,
)
from .proxy._fleet import node_address
from .proxy._keys import logged_uri
from .proxy._relay import LocalRoute

__all__ = ["add_limit_arguments", "add_pool_arguments", "main", "parse_duration", "parse_size"]

log = logging.getLogger("herd.serve")

_DURATION = re.compile(r"(?P<number>\d+(?:\.\d+)?)(?P<unit>ms|s|m|h|d)?")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>[kmgt]?)(?:i?b)?", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_duration(text: str) -> float:
    """``"15m"`` → 900.0; also ``ms``, ``s``, ``h``, ``d``, combinations (``1h30m``) and
    plain seconds. ``0`` is allowed (it disables what it times).

    :raises ValueError: not a duration.
    """
    text = text.strip().lower()
    total, position = 0.0, 0
    for match in _DURATION.finditer(text):
        if match.start() != position:
            break
        total += float(match["number"]) * _UNITS[match["unit"]]
        position = match.end()
    if not text or position != len(text):
        raise ValueError(f"not a duration: {text!r} (try 30s, 15m, 1h30m)")
    return total


def parse_size(text: str) -> int:
    """``"512M"`` → 536870912 (powers of 1024; ``k``, ``M``, ``G``, ``T``, optional ``B``/``iB``).

    :raises ValueError: not a size.
    """
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not a size: {text!r} (try 512M, 2G, 100k)")
    return int(float(match["number"]) * 1024 ** _POWERS[match["unit"].lower()])


def _arg(parse: Any) -> Any:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__.removeprefix("parse_")
    return convert


def _env(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, not {text!r}")
    return name, value


def add_pool_arguments(
    group: argparse._ActionsContainer, *, min_workers: int = 1, ttl: float = 300.0
) -> None:
    """Add the pool flags (``--min --max --ttl --health-interval --health-failures
    --idle-worker-timeout --no-reuse``) that ``herd serve`` and ``%herd start``
    share; they land as :class:`herd.Pool` keyword names (``min_workers``...).
    """
    group.add_argument(
        "--min", type=int, default=min_workers, dest="min_workers", help="workers kept running"
    )
    group.add_argument(
        "--max", type=int, default=10, dest="max_workers", help="most workers at once"
    )
    group.add_argument(
        "--ttl",
        type=_arg(parse_duration),
        default=ttl,
        metavar="DURATION",
        help="end sessions idle this long (0 = never)",
    )
    group.add_argument(
        "--health-interval",
        type=_arg(parse_duration),
        default=5.0,
        metavar="DURATION",
        help="health check period (0 = off)",
    )
    group.add_argument(
        "--health-failures",
        type=int,
        default=3,
        metavar="N",
        help="failed health checks in a row before a running worker is declared dead",
    )
    group.add_argument(
        "--idle-worker-timeout",
        type=_arg(parse_duration),
        default=60.0,
        metavar="DURATION",
        help="retire idle workers above --min after this",
    )
    group.add_argument(
        "--no-reuse",
        action="store_true",
        help="kill a worker when its session ends instead of reusing it",
    )


def add_limit_arguments(group: argparse._ActionsContainer) -> None:
    """Add the sandbox flags (``--cpu --memory --pids --no-sandbox``) that
    ``herd serve`` and ``%herd start`` share."""
    group.add_argument(
        "--cpu",
        type=float,
        default=None,
        metavar="CORES",
        help="CPU limit per worker, in cores (e.g. 0.5)",
    )
    group.add_argument(
        "--memory",
        type=_arg(parse_size),
        default=None,
        metavar="SIZE",
        help="memory limit per worker (e.g. 512M); past it the worker is "
        "killed and its session's next request gets a fresh one",
    )
    group.add_argument(
        "--pids",
        type=int,
        default=None,
        metavar="N",
        help="process/thread limit per worker (-1: none)",
    )
    group.add_argument(
        "--no-sandbox",
        action="store_true",
        help="run workers without namespaces (the Go WithInsecureSandbox)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="herd", description="Session-affine process pool and gateway."
    )
    parser.add_argument("--version", action="version", version=f"herd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="route HTTP and WebSocket requests by session to a pool of workers",
        description="Run COMMAND as a pool of workers (each gets its port through {port} "
        "and $PORT) and route every request to the worker pinned to its session.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    net = serve.add_argument_group("gateway")
    net.add_argument("--host", default="127.0.0.1", help="address to listen on")
    net.add_argument("--port", type=int, default=8080, help="port to listen on")
    key = net.add_mutually_exclusive_group()
    key.add_argument(
        "--session-header",
        metavar="NAME",
        help="session ID from this header (default X-Session-ID)",
    )
    key.add_argument("--session-cookie", metavar="NAME", help="session ID from this cookie")
    net.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="with --session-cookie, a site whose pages may open WebSockets here besides "
        "the gateway's own (e.g. https://app.example.com); repeatable",
    )
    key.add_argument("--session-query", metavar="NAME", help="session ID from this query parameter")
    key.add_argument(
        "--session-path",
        action="store_true",
        help="session ID is the first path segment (stripped before forwarding)",
    )
    net.add_argument(
        "--stats-path",
        metavar="PATH",
        default="/herd/stats",
        help="serve PoolStats as JSON here ('' to disable); session IDs show as tags "
        "unless an admin token is set and the request presents it",
    )
    net.add_argument(
        "--admin-token",
        default=None,
        metavar="TOKEN",
        help="the stats route's token (Authorization: Bearer TOKEN): with it, the stats "
        "show session IDs; $HERD_ADMIN_TOKEN keeps it out of the process list",
    )
    net.add_argument(
        "--acquire-timeout",
        type=_arg(parse_duration),
        default=30.0,
        metavar="DURATION",
        help="wait this long for a free worker, then 503",
    )
    net.add_argument(
        "--upstream-timeout",
        type=_arg(parse_duration),
        default=300.0,
        metavar="DURATION",
        help="wait this long for a worker's response head, then 504",
    )
    net.add_argument(
        "--max-body-size",
        type=_arg(parse_size),
        default=None,
        metavar="SIZE",
        help="largest request body (e.g. 512M; default: no limit)",
    )
    net.add_argument(
        "--max-header-size",
        type=_arg(parse_size),
        default=64 * 1024,
        metavar="SIZE",
        help="largest request head",
    )
    net.add_argument(
        "--max-connections",
        type=int,
        default=None,
        metavar="N",
        help="open client connections at most; beyond it a new one gets 503 and is "
        "closed, the others are served on (default: from the file descriptor limit)",
    )
    net.add_argument(
        "--idle-connection-timeout",
        type=_arg(parse_duration),
        default=60.0,
        metavar="DURATION",
        help="close a client connection that has not sent a whole request head for this "
        "long (idle keep-alive, or a head trickling in)",
    )
    net.add_argument(
        "--max-message-size",
        type=_arg(parse_size),
        default=64 * 1024 * 1024,
        metavar="SIZE",
        help="largest WebSocket message",
    )

    add_pool_arguments(serve.add_argument_group("pool"))

    fleet = serve.add_argument_group(
        "fleet", "several gateways sharing their sessions through Redis (pip install 'herd[redis]')"
    )
    fleet.add_argument(
        "--registry",
        metavar="URL",
        default=None,
        help="share sessions with the other nodes on this registry: redis://[:PASSWORD@]HOST:"
        "PORT[/DB], rediss://, unix://, redis+sentinel://HOST:PORT[,...]/SERVICE or "
        "redis+cluster://HOST:PORT ($HERD_REGISTRY keeps a password out of the process "
        "list); default: this node alone",
    )
    fleet.add_argument(
        "--node-address",
        metavar="URL",
        default=None,
        help="with --registry: where the other nodes reach this one, to forward requests "
        "for its sessions (http://10.0.0.2:8080)",
    )
    fleet.add_argument(
        "--node-id", metavar="ID", default=None, help="this node's name in the fleet"
    )
    fleet.add_argument(
        "--node-lease",
        type=_arg(parse_duration),
        default=10.0,
        metavar="DURATION",
        help="with --registry: how long the fleet waits for a silent node before its "
        "sessions start over on the live ones",
    )

    worker = serve.add_argument_group("workers")
    worker.add_argument(
        "--health-path",
        default="/",
        help="GET path that must answer 2xx (e.g. /api for jupyter server)",
    )
    worker.add_argument(
        "--start-timeout",
        type=_arg(parse_duration),
        default=30.0,
        metavar="DURATION",
        help="time for a worker to become healthy",
    )
    worker.add_argument(
        "--env",
        type=_env,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="environment variable for workers ({port} works); repeatable",
    )
    worker.add_argument("--cwd", default=None, help="working directory of workers")
    add_limit_arguments(worker)
    worker.add_argument(
        "--isolation",
        choices=("tenant", "process"),
        default="tenant",
        help="tenant: each worker sees only its own files (system directories, its "
        "program and the working directory read-only, a private /tmp and home), has no "
        "capabilities and its own network; process: namespaces and limits only (the "
        "workers share the host's files and network)",
    )
    worker.add_argument(
        "--network",
        choices=("private", "host"),
        default="private",
        help="a tenant's network: private (its own, loopback only) or host (the host's, "
        "to reach the outside; workers can then reach each other's ports)",
    )
    worker.add_argument(
        "--user",
        default=None,
        metavar="USER",
        help="run the workers as this user (a name or UID); needs root",
    )
    kernel = serve.add_argument_group(
        "kernel gateway",
        "herd serve --kernel NAME: REPL sessions over HTTP and the Jupyter Kernel Gateway "
        "protocol, on warm kernels (herd_nb; no worker command)",
    )
    kernel.add_argument(
        "--kernel",
        metavar="NAME",
        default=None,
        help="serve kernels of this kernelspec (python3, ...) instead of a command",
    )
    kernel.add_argument(
        "--warm", type=int, default=2, metavar="N", help="with --kernel: kernels kept ready"
    )
    kernel.add_argument(
        "--token",
        default=None,
        metavar="TOKEN",
        help="with --kernel: every request needs it (Authorization: token TOKEN); required "
        "beyond loopback; $HERD_TOKEN keeps it out of the process list",
    )
    kernel.add_argument(
        "--keep-session-dirs",
        action="store_true",
        help="with --kernel: keep a session's working directory when the session ends",
    )
    serve.add_argument(
        "--loop",
        default="auto",
        choices=["auto", "asyncio", "uvloop"],
        help="event loop (auto: uvloop if installed)",
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument(
        "worker_command",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND",
        help="the worker program and its arguments, after --",
    )
    return parser


def _session_key(args: argparse.Namespace) -> SessionKey:
    if args.session_cookie:
        return from_cookie(args.session_cookie)
    if args.session_query:
        return from_query(args.session_query)
    if args.session_path:
        return from_path()
    return from_header(args.session_header or "X-Session-ID")


_Answer = tuple[int, list[tuple[str, str]], bytes]


def _json_answer(status: int, document: object, *headers: tuple[str, str]) -> _Answer:
    head = [("Content-Type", "application/json"), ("Cache-Control", "no-store"), *headers]
    return status, head, json.dumps(document).encode()


def stats_route(pool: Pool[Any], admin_token: str | None = None) -> LocalRoute:
    """The ``--stats-path`` route: ``GET`` answers the pool's :class:`~herd.PoolStats`
    as JSON.

    Session IDs are bearer credentials: without ``admin_token`` every session ID
    in the answer is replaced by its :func:`~herd.session_tag` (the tag the logs
    show); with one, a request must present it (``Authorization: Bearer TOKEN``
    or ``token TOKEN``) and gets the IDs, each with its tag.
    """

    def answer(request: RequestHead) -> _Answer:
        if request.method not in ("GET", "HEAD"):
            message = f"{request.method} is not allowed here: the stats are read with GET"
            error = {"error": "method_not_allowed", "message": message}
            return _json_answer(405, error, ("Allow", "GET, HEAD"))
        if admin_token is None:
            return _json_answer(200, _without_session_ids(pool.stats().as_dict()))
        scheme, _, given = (request.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() not in ("bearer", "token") or not hmac.compare_digest(
            given.strip().encode(), admin_token.encode()
        ):
            error = {"error": "unauthorized", "message": "the stats need the gateway's admin token"}
            return _json_answer(401, error, ("WWW-Authenticate", 'Bearer realm="herd"'))
        return _json_answer(200, _with_session_tags(pool.stats().as_dict()))

    return answer


def _without_session_ids(stats: dict[str, Any]) -> dict[str, Any]:
    """``stats`` with every session ID replaced by its tag, and no node's internal
    address (a map of the private network is for the admin token's holder)."""
    for row in (*stats["workers"], *stats["recent_crashes"]):
        if row.get("session_id") is not None:
            row["session_id"] = session_tag(row["session_id"])
    for row in stats["fleet"]:
        row["address"] = ""
    return stats


def _with_session_tags(stats: dict[str, Any]) -> dict[str, Any]:
    """``stats`` with each session's tag beside its ID (to match the logs)."""
    for row in (*stats["workers"], *stats["recent_crashes"]):
        session_id = row.get("session_id")
        row["session_tag"] = session_tag(session_id) if session_id is not None else None
    return stats


def access_log(
    request: RequestHead, status: int, route: Route | None, worker: str | None, seconds: float
) -> None:
    """One line per answered request on ``herd.serve`` (INFO; WARNING from 500 on),
    with session IDs replaced by their tags."""
    level = logging.INFO if status < 500 else logging.WARNING
    if not log.isEnabledFor(level):
        return
    log.log(
        level,
        "%d %s %s session=%s worker=%s %.1fms",
        status,
        request.method,
        logged_uri(route, request.uri),
        session_tag(route.session_id) if route is not None else "-",
        worker or "-",
        1000.0 * seconds,
    )


def same_origin(allowed_origins: Sequence[str] = ()) -> Callable[[RequestHead], bool]:
    """The WebSocket origin check of a gateway that finds sessions by cookie: a
    browser sends a site's cookies with a WebSocket handshake that any other site's
    page opens, so such a handshake must come from a page of the gateway's own
    origin (as Tornado's ``WebSocketHandler.check_origin`` requires), or from one
    of ``allowed_origins``. A handshake with no ``Origin`` (not a browser) goes on."""
    allowed = frozenset(origin.lower().rstrip("/") for origin in allowed_origins)

    def check(request: RequestHead) -> bool:
        origin = request.headers.get("Origin")
        if origin is None or origin.lower() in allowed:
            return True
        host = request.headers.get("Host") or ""
        return urllib.parse.urlparse(origin).netloc.lower() == host.lower()

    return check


def raise_fd_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit (a gateway
    holds two per proxied connection); the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > _FD_CEILING:
        hard = max(soft, _FD_CEILING)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


#: Where :func:`raise_fd_limit` stops when the hard limit is unlimited or huge.
_FD_CEILING = 1 << 20


def default_max_connections(fd_limit: int, max_workers: int) -> int:
    """Client connections the gateway takes at most with ``fd_limit`` descriptors:
    two each (the client's and a worker's), after a reserve for the workers (a
    pidfd, an output pipe and an upstream connection each), health probes, logs
    and the listening sockets."""
    reserve = 64 + 4 * max_workers
    return max(1, (fd_limit - reserve) // 2)


class RepeatFilter(logging.Filter):
    """Lets a warning or error through at most once per ``interval`` seconds per
    logger and message template; the next one through says how many were dropped.

    A flood (a connection storm, a failing spawn) must not fill the disk with the
    same line; every distinct problem is still logged at once.
    """

    def __init__(self, interval: float = 1.0) -> None:
        super().__init__()
        self.interval = interval
        self._seen: dict[tuple[str, int, object], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.levelno, record.msg)
        now = time.monotonic()
        last, dropped = self._seen.get(key, (-float("inf"), 0))
        if now - last < self.interval:
            self._seen[key] = (last, dropped + 1)
            return False
        if len(self._seen) > 1000:  # templates, not values: only a bug grows it
            self._seen.clear()
        self._seen[key] = (now, 0)
        if dropped:
            record.msg = f"{record.msg} ({dropped} more like this in the last {now - last:.0f}s)"
        return True


def _registry(args: argparse.Namespace) -> Any:
    """The registry ``--registry`` names (``None``: this node alone)."""
    url = args.registry or os.environ.get("HERD_REGISTRY") or None
    if url is None:
        if args.node_address:
            raise ValueError("--node-address needs --registry (the fleet's Redis)")
        return None
    from . import registry

    if url.startswith("memory"):
        return registry.from_url(url)
    if not args.node_address:
        raise ValueError(
            "--registry needs --node-address: where the other nodes reach this one "
            "(http://HOST:PORT, this server's own port)"
        )
    node_address(args.node_address)  # a ValueError names what is wrong
    return registry.from_url(
        url, address=args.node_address, node_id=args.node_id, lease=args.node_lease
    )


def _close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


async def serve(args: argparse.Namespace) -> int:
    """Run the gateway until SIGINT or SIGTERM."""
    factory = ProcessFactory(
        args.worker_command,
        env=dict(args.env),
        health_path=args.health_path,
        start_timeout=args.start_timeout,
        sandbox=not args.no_sandbox,
        cwd=args.cwd,
        isolation=args.isolation,
        network=args.network,
        user=args.user,
        cpu_limit=args.cpu,
        memory_limit=args.memory,
        pids_limit=args.pids,
    )
    registry = _registry(args)
    pool: Pool[Any] = Pool(
        factory,
        registry=registry,
        min_workers=args.min_workers,
        max_workers=args.max_workers,
        ttl=args.ttl,
        health_interval=args.health_interval,
        health_failures=args.health_failures,
        idle_worker_timeout=args.idle_worker_timeout,
        worker_reuse=not args.no_reuse,
        acquire_timeout=args.acquire_timeout,
    )
    limit = raise_fd_limit()
    max_connections = args.max_connections or default_max_connections(limit, args.max_workers)
    if max_connections < 1:
        raise ValueError(f"--max-connections must be >= 1, not {max_connections}")
    log.info(
        "file descriptors: %d; at most %d client connections (--max-connections)",
        limit,
        max_connections,
    )
    # The port first: bound before any worker starts (a worker picking a free port
    # could otherwise take this one), and a port in use fails before any spawn.
    # Connections made before the pool is ready wait in the listen backlog.
    try:
        sockets = bind_sockets(args.port, address=args.host)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", args.host, args.port, exc)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    starting = asyncio.ensure_future(pool.start())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():  # a signal during start-up: stop spawning, kill what started
        log.info("stopping during start-up")
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        await pool.shutdown()
        _close_all(sockets)
        return 0
    stopping.cancel()
    try:
        starting.result()  # a SpawnError at start-up leaves here
    except BaseException:
        _close_all(sockets)
        raise
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(pool.shutdown)
        settings = ProxySettings(
            pool=pool,
            key=_session_key(args),
            acquire_timeout=args.acquire_timeout,
            upstream_timeout=args.upstream_timeout or None,
            max_body_size=args.max_body_size,
            max_message_size=args.max_message_size,
        )
        admin_token = args.admin_token or os.environ.get("HERD_ADMIN_TOKEN") or None
        routes = {args.stats_path: stats_route(pool, admin_token)} if args.stats_path else {}
        server = RelayServer(
            settings,
            max_connections=max_connections,
            max_header_size=args.max_header_size,
            idle_connection_timeout=args.idle_connection_timeout or None,
            check_origin=same_origin(args.allow_origin) if args.session_cookie else None,
            routes=routes,
            access_log=access_log,
        )
        await server.start(sockets)
        # What start-up made lives as long as the process: out of the collector's
        # sight, so that its full collections (pauses in the request path, seen in
        # the p99) scan only what requests make.
        gc.collect()
        gc.freeze()
        report = factory.sandbox_report
        log.info("sandbox: %s (%s)", report.level, report.reason)
        log.info(
            "herd serve listening on http://%s:%d (%d-%d workers of %s)",
            args.host,
            args.port,
            args.min_workers,
            args.max_workers,
            " ".join(args.worker_command),
        )
        if isinstance(getattr(registry, "address", None), str) and registry.address:
            log.info(
                "node %s of the fleet at %s; other nodes reach it at %s",
                registry.node,
                registry.shown_url,
                registry.address,
            )
        await stop.wait()
        log.info("stopping: closing the server and %d worker(s)", pool.stats().total_workers)
        server.stop()
        await server.close_all_connections(timeout=5)
    log.info("stopped")
    return 0


def _run(main: Coroutine[Any, Any, int], loop: str) -> int:
    if loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if loop == "uvloop":
                raise ValueError("--loop uvloop: uvloop is not installed") from None
        else:
            return uvloop.run(main)
    return asyncio.run(main)


def _kernel_gateway(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``herd serve --kernel``: herd_nb's kernel gateway (the only path of the core's
    command that loads Jupyter, and only when asked for)."""
    import importlib

    try:
        gateway = importlib.import_module("herd_nb.gateway")
    except ImportError as exc:
        log.error("--kernel needs herd_nb and Jupyter (pip install herd): %s", exc)
        return 1
    if args.warm < 1:
        # herd_nb leaves kernels to Jupyter with no warm spares: none here.
        parser.error(f"--warm must be >= 1 (kernels kept ready), not {args.warm}")
    try:
        code: int = gateway.main(args)
    except ValueError as exc:
        parser.error(str(exc))
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``herd`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command = list(args.worker_command)
    if command and command[0] == "--":
        command = command[1:]
    if args.kernel is not None:
        if command:
            parser.error("--kernel runs kernels: give no worker command after --")
        return _kernel_gateway(parser, args)
    if not command:
        parser.error(
            "give the worker command after --, e.g. "
            "herd serve -- python -m http.server --bind 127.0.0.1 {port}"
        )
    args.worker_command = command
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(RepeatFilter())
    try:
        return _run(serve(args), args.loop)
    except ValueError as exc:  # bad option values, from the pool or factory
        parser.error(str(exc))
    except Exception as exc:  # a SpawnError at start-up, most likely
        log.error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
