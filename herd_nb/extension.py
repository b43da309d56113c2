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
import math
from typing import Any

from jupyter_server.extension.application import ExtensionApp
from jupyter_server.gateway.gateway_client import GatewayClient
from prometheus_client import REGISTRY
from traitlets import Bool, Float, Integer, List, Unicode, Union
from traitlets import Enum as TEnum

import herd
from herd import proxy
from herd._config import duration_seconds

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

    min_workers = Integer(
        1, config=True, help="Process workers kept running, even with no session."
    )
    max_workers = Integer(
        10, config=True, help="The most workers alive at once (per pool: per kernelspec)."
    )
    ttl = Float(
        None,
        allow_none=True,
        config=True,
        help="Seconds a session may go unused before it ends; 0 disables. Default: 300 "
        "for the process pool; 3600 for kernels, where unused means idle with no client "
        "connected (it sets Jupyter's culler, unless that is configured).",
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
        5.0, config=True, help="Seconds between worker health checks; 0 disables."
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
        except (ValueError, TypeError) as exc:
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
            )
            pool: herd.Pool[Any] = herd.Pool(
                factory,
                min_workers=self.min_workers,
                max_workers=self.max_workers,
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

    def _build_kernel_pools(self) -> None:
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
        names = list(self.kernel_names) or [manager.default_kernel_name]
        specs = self.serverapp.kernel_spec_manager
        installed = specs.find_kernel_specs() if specs is not None else {}
        for name in names:
            if name not in installed:
                raise ValueError(f"kernel_names: no kernelspec {name!r} is installed")
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
        ttl = 3600.0 if self.ttl is None else self.ttl
        if ttl and not manager.cull_idle_timeout:
            # Jupyter's culler knows what idle means for a kernel: not busy, and
            # (by default) no client connected.
            manager.cull_idle_timeout = math.ceil(ttl)
            manager.cull_interval = max(1, min(manager.cull_interval, math.ceil(ttl / 4)))

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
        ttl = 3600.0 if self.ttl is None else self.ttl  # as for notebook kernels
        if isinstance(manager, HerdKernelManager) and manager.herd_pools:
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
        for name, pool in list(self.pools.items()):
            try:
                await pool.start()
            except herd.HerdError as exc:
                fallback = "they start the stock way" if name.startswith("kernels:") else ""
                self.log.error("herd: the %s pool could not start: %s. %s", name, exc, fallback)
                continue
            self.log.info("herd: %s pool ready (sandbox %s)", name, pool.stats().sandbox)

    async def stop_extension(self) -> None:
        """Stop every pool: no worker outlives the server."""
        if self.executions is not None:
            await self.executions.aclose()
        if self.proxy_settings is not None:
            self.proxy_settings.upstreams.close()
        for pool in self.pools.values():
            await pool.shutdown()
        with contextlib.suppress(KeyError):
            REGISTRY.unregister(self.collector)
