"""The Jupyter server extension: herd pools that start and stop with the server.

Configured with traitlets the Jupyter way (``c.Herd.max_workers = 8`` in
``jupyter_server_config.py``, or ``--Herd.max_workers=8``). ``jupyter server
--help-all`` prints its help before any extension is loaded, so the options are
listed by ``Herd().print_help(True)``. Values are checked when the server
starts; a bad one stops start-up with a message naming it.

Notebook and console kernels come pre-warmed: the server's kernel manager
becomes :class:`herd_nb.HerdKernelManager`, which keeps ``c.Herd.warm_kernels``
started kernels of each of ``c.Herd.kernel_names`` ready (see
:mod:`herd_nb.kernelmanager`). With ``c.Herd.command`` set, a process pool of that
command runs behind ``{base_url}herd/proxy/``, routed by ``c.Herd.session_header``
(as ``herd serve``). Every route under ``{base_url}herd/`` requires Jupyter's
authentication.
"""

from __future__ import annotations

import contextlib
import gc
import math
import signal
import threading
from typing import Any

from jupyter_server.extension.application import ExtensionApp
from jupyter_server.gateway.gateway_client import GatewayClient
from prometheus_client import REGISTRY
from traitlets import Bool, Float, Integer, List, Unicode, Union
from traitlets import Enum as TEnum

import herd
from herd import proxy
from herd._config import duration_seconds
from herd.sandbox import Sandbox

from .handlers import (
    ExecuteHandler,
    ExecuteSessions,
    HerdProxyHandler,
    InputHandler,
    InterruptHandler,
    SessionHandler,
    SessionsHandler,
    StatsHandler,
)
from .kernelmanager import HerdKernelManager
from .metrics import PoolCollector
from .websocket import NoDelayWebsocketConnection

__all__ = ["Herd"]


class Herd(ExtensionApp):
    """herd inside a Jupyter server."""

    name = "herd_nb"

    #: The sessions of the execute route (set with the routes).
    executions: ExecuteSessions | None = None
    # Set with the pools: the kernelspecs kept warm (None: herd does not run the
    # server's kernels), and whether c.Herd.ttl turned Jupyter's culler on.
    _warm_names: list[str] | None = None
    _culls_by_ttl = False

    min_workers = Integer(
        1,
        config=True,
        help="Process workers kept running, even with no session (the process pool; "
        "kernels: see warm_kernels).",
    )
    max_workers = Integer(
        None,
        allow_none=True,
        config=True,
        help="The most workers alive at once, per pool. Default: 10 for the process pool; "
        "no cap for kernels, as in stock Jupyter (set, it caps each kernelspec's kernels, "
        "spares included, and a kernel past it is refused).",
    )
    ttl = Float(
        None,
        allow_none=True,
        config=True,
        help="Seconds a session may go unused before it ends; 0 disables. Default: 300 "
        "for the process pool; for notebook kernels none, as in stock Jupyter: set, it "
        "culls kernels idle that long with no client connected (it sets Jupyter's "
        "culler, unless that is configured); 3600 for sessions of the execute route.",
    )
    warm_kernels = Integer(
        2,
        config=True,
        help="Started kernels kept ready per kernelspec in kernel_names, handed to new "
        "notebook and console sessions (every kernel runs in herd's pools, sandbox and "
        "limits); 0 leaves kernels to Jupyter.",
    )
    kernel_names = List(
        Unicode(),
        config=True,
        help="Kernelspecs to keep warm; empty: the server's default kernel.",
    )
    health_interval = Float(
        5.0,
        config=True,
        help="Seconds between worker health checks; 0 disables. A kernel passes while its "
        "process runs (a busy kernel is never killed); a process worker must answer "
        "health_path.",
    )
    worker_reuse = Bool(
        None,
        allow_none=True,
        config=True,
        help="Reuse a worker whose session ended (False: kill it). Default: True for the "
        "process pool; False for kernels (a reused kernel is reset, but keeps its imports).",
    )
    cpu_limit = Float(None, allow_none=True, config=True, help="CPU cores per worker.")
    memory_limit = Integer(
        None,
        allow_none=True,
        config=True,
        help="Memory per worker, in bytes (past it the worker is killed).",
    )
    pids_limit = Integer(
        None,
        allow_none=True,
        config=True,
        help="Processes and threads per worker; -1 for no limit.",
    )
    sandbox = Union(
        [Bool(), TEnum(["required"])],
        default_value=True,
        config=True,
        help="Isolate workers (True), not (False), or refuse without ('required').",
    )
    isolation = TEnum(
        ["process", "tenant"],
        default_value="process",
        config=True,
        help="Isolation of the process pool's workers (c.Herd.command): 'tenant' gives "
        "each a filesystem view and a network of its own, no capabilities. Kernels get "
        "'process' (a notebook works on the user's files, as on stock Jupyter).",
    )
    user = Unicode(
        None,
        allow_none=True,
        config=True,
        help="Run the process pool's workers (c.Herd.command) as this user (a name or a "
        "UID); needs root.",
    )
    session_header = Unicode(
        "X-Session-ID",
        config=True,
        help="Request header that names the session on the proxy route.",
    )
    command = List(
        Unicode(),
        config=True,
        help="A program serving HTTP on {port}, run as a process pool behind "
        "{base_url}herd/proxy/; empty: no process pool.",
    )
    health_path = Unicode("/", config=True, help="GET path a process worker must answer with 2xx.")
    freeze_startup = Bool(
        True,
        config=True,
        help="Once the server has started, keep what its start-up made (some 200,000 "
        "objects in a JupyterLab server: modules, classes, configuration) out of the "
        "garbage collector's full collections (gc.freeze). Each full collection scans "
        "them all and pauses the whole server, every request and kernel message, for "
        "100-300 ms; frozen, it scans only what came after. False: Python's default, "
        "as on stock Jupyter.",
    )
    registry_url = Unicode(
        "",
        config=True,
        help="Share the process pool's sessions with other Jupyter servers (the nodes "
        "of a fleet behind one load balancer) through this Redis: redis://[:PASSWORD@]"
        "HOST:PORT[/DB], rediss://, redis+sentinel://... or redis+cluster://... "
        "(pip install 'herd[redis]'). Each node serves the sessions it owns and forwards "
        "requests for the others' to them; all nodes need the same base_url, session "
        "header and token. Empty: this server alone.",
    )
    node_address = Unicode(
        "",
        config=True,
        help="With registry_url: where the other nodes reach this server "
        "(http://10.0.0.2:8888); default: the address and port it listens on.",
    )
    node_id = Unicode("", config=True, help="With registry_url: this server's name in the fleet.")
    node_lease = Float(
        10.0,
        config=True,
        help="With registry_url: seconds the fleet waits for a silent node before its "
        "sessions start over on the live ones.",
    )

    def _link_jupyter_server_extension(self, serverapp: Any) -> None:
        super()._link_jupyter_server_extension(serverapp)
        # Before the server builds its kernel manager: make it herd's, unless
        # the user chose one (or a gateway serves the kernels).
        chosen = serverapp.config.get("ServerApp", {})
        if GatewayClient.instance(parent=serverapp).gateway_enabled:
            return
        if self.warm_kernels and "kernel_manager_class" not in chosen:
            serverapp.kernel_manager_class = HerdKernelManager
        if "kernel_websocket_connection_class" not in chosen:
            serverapp.kernel_websocket_connection_class = NoDelayWebsocketConnection

    def initialize_settings(self) -> None:
        """Build the pools from the config (checked here: bad values stop start-up)."""
        try:
            self._build_pools()
        except (ValueError, TypeError, ImportError) as exc:
            # jupyter_server logs an extension's exceptions and serves on without
            # it; a misconfigured pool must stop the server instead.
            self.log.critical("herd_nb: invalid configuration (c.Herd.*): %s", exc)
            raise SystemExit(1) from exc
        self.settings.update({"herd_pools": self.pools})
        self.collector = PoolCollector(self.pools)
        with contextlib.suppress(ValueError):  # already registered (a second server app)
            REGISTRY.register(self.collector)

    def _build_pools(self) -> None:
        self.pools: dict[str, herd.Pool[Any]] = {}
        self.proxy_settings: proxy.ProxySettings | None = None
        duration_seconds("ttl", self.ttl)  # checked here too: kernels use it without a pool
        self._build_kernel_pools()
        if self.command:
            factory = herd.ProcessFactory(
                list(self.command),
                health_path=self.health_path,
                sandbox=self.sandbox,
                cpu_limit=self.cpu_limit,
                memory_limit=self.memory_limit,
                pids_limit=self.pids_limit,
                isolation="tenant" if self.isolation == "tenant" else "process",
                user=self.user,
            )
            pool: herd.Pool[Any] = herd.Pool(
                factory,
                registry=self._registry(),
                min_workers=self.min_workers,
                max_workers=10 if self.max_workers is None else self.max_workers,
                ttl=300.0 if self.ttl is None else self.ttl,
                health_interval=self.health_interval,
                worker_reuse=True if self.worker_reuse is None else self.worker_reuse,
            )
            self.pools["process"] = pool
            assert self.serverapp is not None  # set before initialize_settings runs
            base = self.serverapp.base_url.rstrip("/")
            self.proxy_settings = proxy.ProxySettings(
                pool=pool,
                key=proxy.from_header(self.session_header),
                prefix=f"{base}/herd/proxy",
            )

    def _registry(self) -> Any:
        """The process pool's registry (``registry_url``); ``None``: this server alone."""
        if not self.registry_url:
            return None
        from herd import registry
        from herd.proxy._fleet import node_address

        address = self.node_address
        if not address:
            assert self.serverapp is not None
            ip = self.serverapp.ip
            if ip in ("", "0.0.0.0", "::", "*"):
                raise ValueError(
                    "registry_url: the server listens on every interface; set "
                    "c.Herd.node_address to where the other nodes reach it"
                )
            host = f"[{ip}]" if ":" in ip else ip
            address = f"http://{host}:{self.serverapp.port}"
        node_address(address)  # a ValueError says what is wrong
        return registry.from_url(
            self.registry_url, address=address, node_id=self.node_id or None, lease=self.node_lease
        )

    def _build_kernel_pools(self) -> None:
        self._warm_names = None
        if self.warm_kernels < 0:
            raise ValueError(f"warm_kernels must be >= 0, not {self.warm_kernels}")
        if not self.warm_kernels:
            return
        assert self.serverapp is not None
        manager = self.serverapp.kernel_manager
        if not isinstance(manager, HerdKernelManager):
            self.log.warning(
                "herd: kernels are not pre-warmed: the kernel manager is %s "
                "(ServerApp.kernel_manager_class); use herd_nb.HerdKernelManager",
                type(manager).__name__,
            )
            return
        specs = self.serverapp.kernel_spec_manager
        installed = specs.find_kernel_specs() if specs is not None else {}
        names = list(self.kernel_names)
        for name in names:
            if name not in installed:
                raise ValueError(f"kernel_names: no kernelspec {name!r} is installed")
        default = manager.default_kernel_name
        if not names and default in installed:
            names = [default]
        elif not names:
            # Not the user's c.Herd.* but the server's default, which stock starts
            # without: serve on, as stock does (a start without a name fails there).
            self.log.warning(
                "herd_nb: no warm kernels: the default kernelspec %r is not installed "
                "(MappingKernelManager.default_kernel_name); kernels of installed "
                "kernelspecs still start in herd's pools",
                default,
            )
        self._warm_names = names
        manager.configure_herd(
            self.pools,
            kernel_names=names,
            warm=self.warm_kernels,
            max_kernels=self.max_workers,
            health_interval=self.health_interval,
            worker_reuse=bool(self.worker_reuse),
            sandbox=self.sandbox,
            cpu_limit=self.cpu_limit,
            memory_limit=self.memory_limit,
            pids_limit=self.pids_limit,
        )
        # Stock Jupyter culls nothing unless told, and neither does herd: only a
        # c.Herd.ttl the user set turns the culler on (if they did not configure it).
        self._culls_by_ttl = bool(self.ttl) and not manager.cull_idle_timeout
        if self._culls_by_ttl:
            assert self.ttl is not None
            # Jupyter's culler knows what idle means for a kernel: not busy, and
            # (by default) no client connected.
            manager.cull_idle_timeout = math.ceil(self.ttl)
            manager.cull_interval = max(1, min(manager.cull_interval, math.ceil(self.ttl / 4)))

    def initialize_handlers(self) -> None:
        """Routes under ``{base_url}herd/``."""
        self.executions = self._execute_sessions()
        cells = {"sessions": self.executions}
        self.handlers.extend(
            [
                (r"/herd/api/stats", StatsHandler),
                (r"/herd/api/sessions", SessionsHandler),
                (r"/herd/api/sessions/([^/]+)", SessionHandler, cells),
                (r"/herd/api/sessions/([^/]+)/execute", ExecuteHandler, cells),
                (r"/herd/api/sessions/([^/]+)/interrupt", InterruptHandler, cells),
                (r"/herd/api/sessions/([^/]+)/input", InputHandler, cells),
            ]
        )
        if self.proxy_settings is not None:
            self.handlers.append(
                (r"/herd/proxy(/.*)?", HerdProxyHandler, {"settings": self.proxy_settings})
            )

    def _execute_sessions(self) -> ExecuteSessions:
        """The execute route's sessions, in the kernel pools if herd runs the kernels."""
        assert self.serverapp is not None
        manager = self.serverapp.kernel_manager
        # Sessions of herd's own route, which stock has not: ended after an hour unused.
        ttl = 3600.0 if self.ttl is None else self.ttl
        if isinstance(manager, HerdKernelManager) and self._warm_names is not None:
            return ExecuteSessions(manager, ttl=ttl)
        if GatewayClient.instance(parent=self.serverapp).gateway_enabled:
            why = "its kernels run on a gateway (GatewayClient.url)"
        elif not self.warm_kernels:
            why = "c.Herd.warm_kernels = 0 leaves the server's kernels to Jupyter"
        else:
            why = (
                f"the kernel manager is {type(manager).__name__}, not "
                "herd_nb.HerdKernelManager (ServerApp.kernel_manager_class)"
            )
        return ExecuteSessions(None, unavailable=why)

    async def _start_jupyter_server_extension(self, serverapp: Any) -> None:
        self._stop_on_sigint()
        for name, pool in list(self.pools.items()):
            try:
                await pool.start()
            except herd.HerdError as exc:
                fallback = "they start the stock way" if name.startswith("kernels:") else ""
                self.log.error("herd: the %s pool could not start: %s. %s", name, exc, fallback)
                continue
            if name == "process":
                self.log.info("herd: %s pool ready (sandbox %s)", name, pool.stats().sandbox)
        if self._warm_names is not None:
            self.log.info("%s", self._kernel_changes(self._warm_names))
        if self.freeze_startup:
            gc.collect()
            gc.freeze()
            self.log.info(
                "herd_nb: %d objects of the server's start-up kept out of the garbage "
                "collector's full collections (c.Herd.freeze_startup)",
                gc.get_freeze_count(),
            )

    def _kernel_changes(self, names: list[str]) -> str:
        """What herd changes about the server's kernels compared with stock Jupyter, in
        one line for the log at start."""
        assert self.serverapp is not None
        manager: Any = self.serverapp.kernel_manager
        ready = [n for n in names if self.pools[f"kernels:{n}"].state is herd.PoolState.READY]
        spares = (
            f"{self.warm_kernels} warm spare{'s' * (self.warm_kernels != 1)} kept per "
            f"kernelspec ({', '.join(ready)})"
            if ready
            else "no warm spares"
        )
        if ready:
            stats = self.pools[f"kernels:{ready[0]}"].stats()
            level, reason = stats.sandbox, stats.sandbox_reason
        else:  # no pool yet: the first kernel makes one, with this sandbox
            report = Sandbox(
                self.sandbox,
                cpu_limit=self.cpu_limit,
                memory_limit=self.memory_limit,
                pids_limit=self.pids_limit,
            ).report
            level, reason = report.level, report.reason
        sandbox = level if level == "full" else f"{level}: {reason}"
        limits = [
            f"{label} {value}"
            for label, value in (
                ("cpu", None if self.cpu_limit is None else f"{self.cpu_limit:g}"),
                ("memory", _size(self.memory_limit)),
                ("pids", self.pids_limit if self.pids_limit != -1 else None),
            )
            if value is not None
        ]
        cap = (
            "no cap on kernels"
            if self.max_workers is None
            else f"at most {self.max_workers} kernels per kernelspec (c.Herd.max_workers)"
        )
        timeout = manager.cull_idle_timeout
        if not timeout:
            culling = "no culling"
        elif self._culls_by_ttl:
            culling = f"idle kernels culled after {timeout}s (c.Herd.ttl)"
        else:
            culling = f"idle kernels culled after {timeout}s (Jupyter's culler, as configured)"
        return (
            f"herd_nb: kernels: {spares}; sandbox {sandbox}; limits per kernel: "
            f"{', '.join(limits) or 'none'}; {cap}, {culling}"
        )

    def _stop_on_sigint(self) -> None:
        """Without a terminal, make SIGINT stop the server as SIGTERM does.

        jupyter_server handles SIGINT itself only on a TTY (a confirmation
        prompt); elsewhere Python's default raises ``KeyboardInterrupt`` wherever
        the main thread is, and a handler that catches every exception (Tornado's,
        around a request being streamed) can swallow it: the server, its kernels
        and herd's workers then run on. An ignored SIGINT (a server started in the
        background) stays ignored, and a handler someone installed stays.
        """
        serverapp: Any = self.serverapp
        stop = getattr(serverapp, "_signal_stop", None)
        if (
            stop is None
            or threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
        ):
            return
        signal.signal(signal.SIGINT, stop)
        self._sigint_was = signal.default_int_handler

    _sigint_was: Any = None  # the SIGINT handler before _stop_on_sigint's, if it ran

    async def stop_extension(self) -> None:
        """Stop every pool: no worker outlives the server.

        Also runs after a start that failed part-way (``initialize_settings`` may
        not have run): it stops what exists.
        """
        stop = getattr(self.serverapp, "_signal_stop", None)
        if self._sigint_was is not None and signal.getsignal(signal.SIGINT) == stop:
            with contextlib.suppress(ValueError):  # (not the main thread)
                signal.signal(signal.SIGINT, self._sigint_was)  # as before the server
        executions = getattr(self, "executions", None)
        if executions is not None:
            await executions.aclose()
        proxy_settings = getattr(self, "proxy_settings", None)
        if proxy_settings is not None:
            proxy_settings.upstreams.close()
        manager = getattr(self.serverapp, "kernel_manager", None)
        if isinstance(manager, HerdKernelManager):
            # Through the kernel manager first, as its cleanup would: the server's
            # own streams on those kernels close before the kernels do.
            await manager.shutdown_herd_kernels()
        for pool in getattr(self, "pools", {}).values():
            await pool.shutdown()
        collector = getattr(self, "collector", None)
        if collector is not None:
            with contextlib.suppress(KeyError):
                REGISTRY.unregister(collector)


def _size(count: int | None) -> str | None:
    """``count`` bytes, the way a person would write it (``2 GiB``)."""
    if count is None:
        return None
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if count >= 1 << shift and count % (1 << shift) == 0:
            return f"{count >> shift} {unit}"
    return f"{count} bytes"
