"""A pytest plugin that runs jupyter_server's and jupyter_client's own tests with herd in.

``run.py`` loads it into both of its runs (``-p herd_forced``); the environment says
which run this is and what it runs:

``HERD_UPSTREAM_MODE``
    ``stock``: change nothing. The plugin only watches (which kernel manager each
    server got, how many kernels were started), so the report can show that the
    stock run was stock.
    ``herd``: force herd in, as described below.
``HERD_UPSTREAM_SUITE``
    ``jupyter_server`` or ``jupyter_client``: the tests being run.
``HERD_UPSTREAM_REPORT``
    Where to write what the plugin saw (JSON), at the end of the session.

**jupyter_server, forced.** Installing herd makes ``herd_nb.HerdKernelManager`` the
server's kernel manager, unless the user chose another one. Upstream's tests
almost all choose one (``ServerApp.kernel_manager_class``), and pytest-jupyter's
``start_app()`` never starts extensions, so without help the run would be stock.
For every ``ServerApp`` (whichever fixture, or the test itself, builds it) the
plugin:

1. enables the ``herd_nb`` extension (``jpserver_extensions``), so that its
   ``_link_jupyter_server_extension``, ``initialize_settings`` and
   ``initialize_handlers`` run where the server runs them;
2. replaces the configured kernel manager class just before the server builds
   it (``init_configurables``): a stock ``MappingKernelManager`` or
   ``AsyncMappingKernelManager`` becomes ``HerdKernelManager``; a test's own
   ``AsyncMappingKernelManager`` subclass becomes ``(HerdKernelManager, that class)``,
   so the test's customisation (say its per-kernel class) stays under herd's
   manager. A gateway keeps its gateway manager, as with herd installed;
3. after ``start_app()``, starts the ``herd_nb`` extension as ``ServerApp._post_start``
   would (``_start_jupyter_server_extension``): its warm pools start and are full
   (``c.Herd.warm_kernels``, default 2) before the test goes on. If the test built
   the server inside a running event loop, the start is a task of that loop, and
   the server's first kernel start awaits it (a real server would start kernels
   the stock way until its pools are ready). A later ``_post_start`` does not start
   the extension twice.

Everything else is herd as installed: its default ``c.Herd`` options (sandbox
included), its WebSocket class, its culler settings.

**jupyter_client, forced.** ``TestAsyncKernelManager`` tests one kernel's
``AsyncKernelManager``; ``HerdKernelManager`` is a *mapping* manager and cannot
stand in for it. What herd puts in the server's place of that object is the
manager of each kernel: ``herd_nb.kernels._launch_class(ServerKernelManager)``
(herd's launcher and sandbox in front of the kernel command, restart callbacks
held by herd, restarts through the worker), built and started by
``KernelFactory.spawn`` (auto-restart off, output piped, cgroup and tag) and
watched by a ``KernelWorker``. So, forced, every ``AsyncKernelManager`` the tests
make (the ``async_km`` parameters, ``AsyncKMSubclass``, and ``start_new_async_kernel``
behind ``jp_start_kernel``) is herd's class for it, and its ``start_kernel`` is
``KernelFactory.spawn`` starting that very object. Keyword arguments herd does
not take (``stdout``/``stderr``: herd pipes the kernel's output itself) are
dropped, as ``HerdKernelManager`` does not pass them to a pool either. Each
test's workers are closed after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

# Bound now: the tests' run patches jupyter_client.manager.AsyncKernelManager.
from jupyter_client.manager import AsyncKernelManager

MODE = os.environ.get("HERD_UPSTREAM_MODE", "stock")
SUITE = os.environ.get("HERD_UPSTREAM_SUITE", "jupyter_server")

if MODE not in ("stock", "herd"):
    raise pytest.UsageError(f"HERD_UPSTREAM_MODE must be 'stock' or 'herd', not {MODE!r}")
if SUITE not in ("jupyter_server", "jupyter_client"):
    raise pytest.UsageError(f"HERD_UPSTREAM_SUITE: unknown suite {SUITE!r}")

#: What the plugin saw, written to HERD_UPSTREAM_REPORT at the end.
seen: Counter[str] = Counter()
_lock = threading.Lock()


def _count(what: str) -> None:
    with _lock:
        seen[what] += 1


# -- jupyter_server --------------------------------------------------------------------


def _patch_server() -> None:
    from jupyter_client.multikernelmanager import MultiKernelManager
    from jupyter_server.extension.manager import ExtensionManager
    from jupyter_server.gateway.gateway_client import GatewayClient
    from jupyter_server.serverapp import ServerApp
    from jupyter_server.services.kernels.kernelmanager import (
        AsyncMappingKernelManager,
        MappingKernelManager,
    )

    stock = (MappingKernelManager, AsyncMappingKernelManager)

    @functools.cache
    def herd_class(chosen: type) -> type:
        from herd_nb.kernelmanager import HerdKernelManager

        if issubclass(chosen, HerdKernelManager):
            return chosen
        if chosen in stock or not issubclass(chosen, AsyncMappingKernelManager):
            return HerdKernelManager
        return type(f"Herd{chosen.__name__}", (HerdKernelManager, chosen), {"__module__": __name__})

    init_server_extensions = ServerApp.init_server_extensions
    init_configurables = ServerApp.init_configurables
    start_app = ServerApp.start_app
    start_extension: Any = ExtensionManager.start_extension  # untyped upstream
    start_kernel = MultiKernelManager._async_start_kernel

    def forced_init_server_extensions(self: Any) -> None:
        if MODE == "herd":
            self.jpserver_extensions = {**self.jpserver_extensions, "herd_nb": True}
        init_server_extensions(self)

    def forced_init_configurables(self: Any) -> None:
        # As init_configurables does first: the kernel manager class's default reads it.
        self.gateway_config = GatewayClient.instance(parent=self)
        if MODE == "herd" and not self.gateway_config.gateway_enabled:
            self.kernel_manager_class = herd_class(self.kernel_manager_class)
        init_configurables(self)
        manager = type(self.kernel_manager)
        _count(f"server apps with {manager.__module__}.{manager.__qualname__}")
        if MODE == "stock" and any(c.__module__.startswith("herd") for c in manager.__mro__):
            raise RuntimeError("herd_forced: herd's kernel manager in the stock run")

    def forced_start_app(self: Any) -> None:
        start_app(self)
        if MODE == "herd":
            _start_herd(self)

    async def start_extension_once(self: Any, name: str) -> None:
        if name == "herd_nb":
            if getattr(self, "_herd_upstream_started", False):
                return
            self._herd_upstream_started = True
        await start_extension(self, name)

    async def counted_start_kernel(self: Any, *args: Any, **kwargs: Any) -> Any:
        _count("kernels started the stock way (jupyter_client's MultiKernelManager)")
        return await start_kernel(self, *args, **kwargs)

    ServerApp.init_server_extensions = forced_init_server_extensions  # type: ignore[method-assign]
    ServerApp.init_configurables = forced_init_configurables  # type: ignore[method-assign]
    ServerApp.start_app = forced_start_app  # type: ignore[method-assign]
    ExtensionManager.start_extension = start_extension_once  # type: ignore[method-assign]
    MultiKernelManager._async_start_kernel = counted_start_kernel  # type: ignore[method-assign]
    if MODE == "stock":
        return  # herd is not even imported
    from herd_nb.kernelmanager import HerdKernelManager

    # A server built inside a running loop starts its pools in the background
    # (_start_herd): its first kernel start waits for them.
    start_kernel_herd = HerdKernelManager.start_kernel

    async def start_kernel_when_started(self: Any, *args: Any, **kwargs: Any) -> Any:
        started = getattr(self, "_herd_upstream_start", None)
        if started is not None and not started.done():
            await asyncio.shield(started)
        return await start_kernel_herd(self, *args, **kwargs)

    HerdKernelManager.start_kernel = start_kernel_when_started  # type: ignore[method-assign]

    # Observation only (skipped if herd_nb renames them): kernel IDs that herd pins a
    # kernel of its pools to, and how many of those kernels were warm spares.
    adopt = getattr(HerdKernelManager, "_adopt", None)
    take_warm = getattr(HerdKernelManager, "_take_warm", None)
    if adopt is not None:

        def counted_adopt(self: Any, *args: Any, **kwargs: Any) -> Any:
            _count("kernels served by herd's pools (warm, or started for their session)")
            return adopt(self, *args, **kwargs)

        HerdKernelManager._adopt = counted_adopt  # type: ignore[method-assign]
    if take_warm is not None:

        async def counted_take_warm(self: Any, *args: Any, **kwargs: Any) -> Any:
            worker = await take_warm(self, *args, **kwargs)
            if worker is not None:
                _count("... of which warm spares, handed out")
            return worker

        HerdKernelManager._take_warm = counted_take_warm  # type: ignore[method-assign]


_background: set[asyncio.Task[None]] = set()


def _start_herd(app: Any) -> None:
    """Start the herd_nb extension of ``app``, as ``ServerApp._post_start`` would."""
    extensions = getattr(app, "extension_manager", None)
    if extensions is None or "herd_nb" not in extensions.extensions:
        _count("server apps without the herd_nb extension loaded")
        return
    loop = app.io_loop.asyncio_loop
    start = extensions.start_extension("herd_nb")
    if loop.is_running():
        _count("server apps whose herd pools started in the background")
        task = loop.create_task(start)
        _background.add(task)
        task.add_done_callback(_background.discard)
        # Awaited by the first kernel start (see _patch_server), which would otherwise
        # take the stock path while the pools start.
        app.kernel_manager._herd_upstream_start = task
    else:
        _count("server apps whose herd pools were started before the test")
        loop.run_until_complete(start)


# -- jupyter_client --------------------------------------------------------------------

#: Workers herd started during the current test (closed after it).
_workers: list[Any] = []


class _StartedByHerd:
    """Put in front of herd's kernel manager class: ``start_kernel`` is
    ``KernelFactory.spawn`` starting this very manager."""

    _herd_spawning = False

    async def start_kernel(self, **kwargs: Any) -> None:
        if self._herd_spawning:  # spawn's own call
            await super().start_kernel(**kwargs)  # type: ignore[misc]
            return
        from herd_nb.kernels import KernelFactory

        manager: Any = self
        factory = KernelFactory(
            manager.kernel_name,
            kernel_spec_manager=manager.kernel_spec_manager,
            manager_class=manager._herd_base,
        )
        self._herd_spawning = True
        try:
            with _spawning_into(manager):
                worker = await factory.spawn(cwd=kwargs.get("cwd"), environ=kwargs.get("env"))
        finally:
            self._herd_spawning = False
        _count("kernels started by herd's KernelFactory")
        _workers.append(worker)


@contextlib.contextmanager
def _spawning_into(manager: Any) -> Iterator[None]:
    """Make ``KernelFactory.spawn`` start ``manager`` instead of one it builds."""
    from herd_nb import kernels

    def configure(**options: Any) -> Any:
        for name, value in options.items():
            setattr(manager, name, value)  # kernel_name, autorestart=False, ...
        return manager

    launch_class = kernels._launch_class
    kernels._launch_class = lambda base: configure  # type: ignore[assignment]
    try:
        yield
    finally:
        kernels._launch_class = launch_class


@functools.cache
def _herd_kernel_manager(base: type) -> type:
    from herd_nb.kernels import _launch_class

    launch = _launch_class(base)
    return type(launch.__name__, (_StartedByHerd, launch), {"_herd_base": base})


def _is_kernel_manager_class(value: object) -> bool:
    return isinstance(value, type) and issubclass(value, AsyncKernelManager)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Forced: parametrized ``AsyncKernelManager`` classes become herd's (same test IDs)."""
    if MODE != "herd" or SUITE != "jupyter_client":
        return
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is None:
            continue
        for name, value in list(callspec.params.items()):
            if _is_kernel_manager_class(value):
                callspec.params[name] = _herd_kernel_manager(value)


@pytest.fixture(autouse=True)
def _herd_kernel_managers(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """Forced: the kernel managers that tests build by name are herd's."""
    if MODE != "herd" or SUITE != "jupyter_client":
        yield
        return
    import jupyter_client.manager

    loop = request.getfixturevalue("jp_asyncio_loop")  # torn down after this fixture
    module = getattr(request, "module", None)
    for name in ("AsyncKMSubclass",):
        value = getattr(module, name, None)
        if _is_kernel_manager_class(value):
            monkeypatch.setattr(module, name, _herd_kernel_manager(value))
    # What start_new_async_kernel (behind jp_start_kernel) builds.
    monkeypatch.setattr(
        jupyter_client.manager, "AsyncKernelManager", _herd_kernel_manager(AsyncKernelManager)
    )
    yield
    while _workers:
        worker = _workers.pop()
        try:
            loop.run_until_complete(worker.close())
        except Exception as exc:  # reported, but the test has its result already
            _count(f"worker close errors: {type(exc).__name__}")


# -- the results and the report --------------------------------------------------------

#: Test ID -> (outcome, first line of its error), across setup, call and teardown.
_outcomes: dict[str, tuple[str, str]] = {}


def _first_line(report: pytest.TestReport) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else ""
    where = "" if report.when == "call" else f"[{report.when}] "
    return (where + first)[:240]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    outcome, message = _outcomes.get(report.nodeid, ("passed", ""))
    if report.when == "call" or outcome == "passed":
        if hasattr(report, "wasxfail"):
            outcome = "xfailed" if report.skipped else "xpassed"
        elif report.failed:
            outcome, message = ("failed" if report.when == "call" else "error"), _first_line(report)
        elif report.skipped:
            outcome = "skipped"
    elif report.failed and outcome in ("skipped", "xfailed", "xpassed"):
        outcome, message = "error", _first_line(report)
    _outcomes[report.nodeid] = (outcome, message)


def pytest_runtest_logfinish(nodeid: str) -> None:
    path = os.environ.get("HERD_UPSTREAM_RESULTS")
    outcome, message = _outcomes.pop(nodeid, ("error", "no report"))
    if path:
        # Open file descriptors after the test: a leak shows as a climb across the run.
        row = {"id": nodeid, "outcome": outcome, "message": message, "fds": _open_fds()}
        with open(path, "a", encoding="utf-8") as file:
            file.write(json.dumps(row) + "\n")


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


def pytest_configure(config: pytest.Config) -> None:
    # pytest rewrites PYTEST_CURRENT_TEST in os.environ at every phase of every test,
    # so a server's environment would differ between the fixture that started it
    # (and herd's spares) and the test that asks for a kernel: herd would then,
    # rightly, start every kernel cold. No real server's environment changes like
    # that, so in both runs the variable is left alone (unset).
    import _pytest.runner

    _pytest.runner._update_current_test_var = lambda item, when: None
    os.environ.pop("PYTEST_CURRENT_TEST", None)
    if MODE == "herd":
        # Imported now, as a server imports them when it loads the extension: not
        # first inside a test, under upstream's ``filterwarnings = error``.
        import herd_nb.extension
        import herd_nb.kernelmanager
        import herd_nb.kernels  # noqa: F401
    if SUITE == "jupyter_server":
        _patch_server()


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = os.environ.get("HERD_UPSTREAM_REPORT")
    if not path:
        return
    report = {
        "mode": MODE,
        "suite": SUITE,
        "python": sys.version.split()[0],
        "seen": dict(sorted(seen.items())),
    }
    with open(path, "w", encoding="utf-8") as file:
        json.dump(report, file, indent=2)
