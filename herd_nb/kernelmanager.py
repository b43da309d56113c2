"""Pre-warmed notebook kernels: a Jupyter kernel manager that hands out started kernels.

:class:`HerdKernelManager` is what ``jupyter server`` runs as its kernel manager
when herd_nb is enabled. ``POST /api/sessions`` and ``POST /api/kernels`` take a
kernel that is already running from a warm :class:`herd.Pool` of
:class:`~herd_nb.KernelFactory` kernels and pin it to the new kernel ID; the pool
refills its spares in the background, one start at a time.

Every kernel of the server is a herd worker: a kernel that cannot be served warm
is started for its session inside the same pool (its sandbox, limits, crash
path and ``max_workers``), and the request is answered once it is launched, as
stock answers it (clients then wait for it to answer, as on stock; herd adopts
the worker once it does); kernelspecs without warm kernels get a pool of their
own on first use, with no spares. The server's ``transport_encryption`` policy,
``use_pending_kernels`` and ZMQ context (``shared_context``) apply to every
kernel, spares included.

A handed-out kernel must look as if it had been started for its session:

* **Retargeting.** The working directory becomes the notebook's directory and
  the environment becomes what a cold start would get (``JPY_SESSION_NAME`` and
  IPython's ``__session__`` included). This is done in the kernel by a silent
  execute in a namespace of its own (no name, history entry or execution count
  is left for the user to see), so only IPython kernels (``ipykernel``, any
  Python) can be retargeted. A kernel of another kind is handed out only when it
  needs no retargeting; otherwise, and whenever the requested environment
  differs in anything but the session name, a kernel is started for the
  session, never one handed out in the wrong place. The log says why spares are
  passed over, once per kernelspec and reason.
* **Restarts** are cold starts of the kernel's own process, with the session's
  directory and environment, inside the same worker (same cgroup, same session).
* **Crashes** are restarted in place, as Jupyter's auto-restart does: same kernel
  ID, session, worker (cgroup, limits), directory and environment; the clients get
  status ``restarting`` from the server's own restart callbacks, and first, on
  IOPub, a ``stream`` to stderr saying why the kernel died where herd knows
  (``killed: memory limit 2 GiB``, ``at its PID limit (512)``, the signal or exit
  code). The restart runs inside :meth:`KernelWorker.wait`, before the pool sees
  an exit: the pin, and the session, never drop. After ``restart_limit``
  (``c.KernelRestarter``) deaths in a row, each within ``stable_start_time`` of the
  last restart, the kernel takes the pool's crash path: reported ``dead`` to its
  clients and removed, as when Jupyter's auto-restart gives up.
* **Culling** is Jupyter's culler, set from ``c.Herd.ttl`` only if the user set
  that: as on stock Jupyter, nothing is culled and no kernel is refused (no cap)
  unless configured.
* **Busy is alive.** A kernel is never probed for answers (a cell holding the GIL
  cannot answer): it dies when its process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from jupyter_client.jsonutil import json_default
from jupyter_client.restarter import KernelRestarter
from jupyter_server._tz import utcnow
from jupyter_server.prometheus.metrics import KERNEL_CURRENTLY_RUNNING_TOTAL
from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager
from tornado import web
from traitlets import Bool
from traitlets.utils.importstring import import_item

import herd
from herd.sandbox import WORKER_TAG_VARIABLE as TAG_VARIABLE

from .kernels import KernelFactory, KernelWorker
from .websocket import unanswered

__all__ = ["HerdKernelManager", "ServesHerdKernels"]

# Environment variables a running IPython kernel can take on after start-up.
# Anything else in a cold start's environment may be read at start-up (PYTHONPATH,
# LD_*, thread counts...), so a difference there means a cold start.
_RETARGETABLE_ENV = frozenset({"JPY_SESSION_NAME"})

# Runs in the kernel through _isolated(): every name it binds stays out of the
# user's namespace.
_RETARGET = """
import importlib, os, pathlib
os.chdir({cwd!r})
for name in {unset!r}:
    os.environ.pop(name, None)
os.environ.update({set!r})
importlib.invalidate_caches()
shell = __import__("IPython").get_ipython()
shell.history_manager.dir_hist[:] = [pathlib.Path.cwd()]
# As ipykernel sets it at start-up, before IPython hides the initial names.
if {session!r}:
    shell.user_ns["__session__"] = shell.user_ns_hidden["__session__"] = {session!r}
else:
    shell.user_ns.pop("__session__", None)
    shell.user_ns_hidden.pop("__session__", None)
"""

# %reset leaves less than a fresh kernel has; the rest is put back as IPython
# sets it at start-up, so that the next session sees a stock kernel's namespace.
_RESET = """
shell = __import__("IPython").get_ipython()
module = ("__doc__", "__loader__", "__package__", "__spec__")  # of the __main__ module
kept = {name: shell.user_ns[name] for name in module if name in shell.user_ns}
shell.reset(new_session=True, aggressive=True)
shell.user_ns.update(kept)
if shell.displayhook.do_full_cache:
    shell.displayhook.flush()  # `_`, `__`, `___`: reset() drops them after its own flush
shell.user_ns_hidden.update(shell.user_ns)  # a fresh kernel's names are hidden from %who
"""


def _isolated(code: str) -> str:
    """``code`` made to run in a fresh namespace of its own in an IPython kernel.

    IPython runs every execute, silent ones included, in the user's namespace:
    what herd's code binds there (``os``, loop variables) would show in ``%who``
    and ``dir()`` and work without an import, unlike on a stock kernel. The
    wrapper binds nothing itself, and takes ``exec`` from ``builtins`` so that a
    user's own ``exec`` cannot shadow it.
    """
    return f"__import__('builtins').exec({code!r}, {{}})\n"


def _changed(one: Mapping[str, str], other: Mapping[str, str]) -> set[str]:
    """Names whose values differ between two environments (herd's tag aside)."""
    names = (one.keys() | other.keys()) - {TAG_VARIABLE}
    return {name for name in names if one.get(name) != other.get(name)}


def _move_code(cwd: str, changed: set[str], target: Mapping[str, str]) -> str:
    """The code that moves a running IPython kernel to ``cwd`` and to the environment
    ``target`` (``changed``: where its own environment differs from it)."""
    code = _RETARGET.format(
        cwd=cwd,
        unset=sorted((changed - target.keys()) | {TAG_VARIABLE}),
        set={k: target[k] for k in sorted(changed & target.keys())},
        session=target.get("JPY_SESSION_NAME", ""),
    )
    return _isolated(code)


def _declares_curve(spec: Any) -> bool:
    """Whether a kernelspec declares CurveZMQ transport encryption support
    (``metadata.supported_encryption``), as jupyter_client reads it."""
    declared = (getattr(spec, "metadata", None) or {}).get("supported_encryption")
    if isinstance(declared, str):
        return declared.strip().lower() == "curve"
    if isinstance(declared, list | tuple | set):
        return "curve" in {str(item).strip().lower() for item in declared}
    return False


def _retargetable(spec: Any) -> bool:
    """Whether kernels of ``spec`` are IPython's (the retargeting code is Python + IPython)."""
    if spec is None or not spec.language.lower().startswith("python"):
        return False
    return any("ipykernel" in str(arg) for arg in spec.argv)


@runtime_checkable
class ServesHerdKernels(Protocol):
    """A kernel manager some of whose kernels are herd's (:class:`HerdKernelManager`,
    or one of your own that delegates to herd's pools): herd's routes ask it which."""

    def herd_kernel_ids(self) -> Mapping[str, herd.Pool[Any]]:
        """Kernel IDs served by herd's pools, with their pool."""
        ...


class HerdKernelManager(AsyncMappingKernelManager):
    """Jupyter's kernel manager, with every kernel a herd worker, warm when it can be.

    Until :meth:`configure_herd` is called (the herd_nb extension does), it is the
    stock manager.
    """

    herd_only = Bool(
        False,
        config=True,
        help="Start every kernel in herd's pools (its sandbox, limits and cap), never "
        "the stock way: a start while the pool is still starting waits for it, one it "
        "cannot serve is refused. For a gateway of untrusted code (herd serve --kernel); "
        "False (the default): such starts are stock, as a notebook user expects.",
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.herd_pools: dict[str, herd.Pool[Any]] = {}  # kernelspec name -> its pool
        self._herd_kernels: dict[str, herd.Pool[Any]] = {}  # kernel ID -> its pool
        self._herd_reuse = False
        self._herd_options: dict[str, Any] | None = None
        self._herd_registry: dict[str, herd.Pool[Any]] = {}
        self._new_pool_lock = asyncio.Lock()
        self._herd_acquiring: dict[herd.Pool[Any], int] = {}  # starts under way, per pool
        self._movable_specs: dict[str, bool] = {}
        # Why spares were passed over, as logged: each reason once per kernelspec,
        # not once per kernel (a drifted environment would make it every start).
        self._skip_reasons: set[tuple[str, str]] = set()
        # Kernel ID -> (auto-restarts in a row, monotonic time of the last one).
        self._herd_restarts: dict[str, tuple[int, float]] = {}
        # Kernel ID -> the start of a kernel started for its session, until adopted.
        self._herd_pending: dict[str, asyncio.Task[None]] = {}
        # ... and stock's _finish_kernel_start for it (a task, as stock's).
        self._herd_finishing: dict[str, asyncio.Task[None]] = {}
        # Kernels started for their session that died during start-up: dead, kept
        # until shut down (stock's restarter would retry, then give up).
        self._herd_failed: set[str] = set()

    # -- set-up (by the herd_nb extension) ----------------------------------------------

    def configure_herd(
        self,
        registry: dict[str, herd.Pool[Any]],
        *,
        kernel_names: list[str],
        warm: int,
        max_kernels: int | None,
        health_interval: float | None,
        worker_reuse: bool,
        sandbox: Any,
        cpu_limit: float | None,
        memory_limit: int | None,
        pids_limit: int | None,
    ) -> None:
        """Build a pool keeping ``warm`` kernels ready for each of ``kernel_names``
        (not started yet); other kernelspecs get a pool without spares when first
        used. Every pool is added to ``registry`` as ``"kernels:<name>"``.

        ``max_kernels`` caps each pool (spares included); ``None``: no cap, as stock
        Jupyter has none.

        :raises ValueError: a bad option (from :class:`herd.Pool` or the factory).
        """
        self._herd_registry = registry
        self._herd_reuse = worker_reuse
        self._herd_options = {
            "max_kernels": max_kernels,
            "health_interval": health_interval,
            "sandbox": sandbox,
            "cpu_limit": cpu_limit,
            "memory_limit": memory_limit,
            "pids_limit": pids_limit,
        }
        for name in kernel_names:
            if self._encryption_refused(name):
                self.log.warning(
                    "herd: no warm %s kernels: transport_encryption is 'required' and the "
                    "kernelspec does not declare CurveZMQ support (metadata."
                    "supported_encryption); its kernels are refused, as on stock",
                    name,
                )
                continue
            self._new_pool(name, warm)

    def _new_pool(self, kernel_name: str, warm: int) -> herd.Pool[Any]:
        options = self._herd_options
        assert options is not None
        factory = KernelFactory(
            kernel_name,
            sandbox=options["sandbox"],
            cpu_limit=options["cpu_limit"],
            memory_limit=options["memory_limit"],
            pids_limit=options["pids_limit"],
            kernel_spec_manager=self.kernel_spec_manager,
            manager_class=import_item(self.kernel_manager_class),
            manager_options=self._kernel_manager_options(),
            connection_dir=self.connection_dir,
            echo_output=True,  # into the server's log, as a stock kernel's stderr
        )
        pool: herd.Pool[Any] = herd.Pool(
            factory,
            min_workers=0,
            min_idle=warm,
            # No cap unless the user set one: stock Jupyter never refuses a kernel.
            max_workers=sys.maxsize if options["max_kernels"] is None else options["max_kernels"],
            ttl=None,  # Jupyter's culler ends idle kernels (see c.Herd.ttl)
            health_interval=options["health_interval"],
            worker_reuse=self._herd_reuse,
            on_crash=self._herd_crashed,
            # With a cap, a start waits 5 s for a kernel to free up, then 503. Without
            # one, as stock, a start waits for its kernel however slow the launch
            # (startup_timeout bounds it): 5 s cut starts short under load with 503s.
            acquire_timeout=5.0 if options["max_kernels"] is not None else None,
            # A kernel start costs ~0.5 s of CPU: let the sessions that just took
            # warm kernels run their first cells before the refill starts.
            refill_delay=1.0,
        )
        self.herd_pools[kernel_name] = pool
        self._herd_registry[f"kernels:{kernel_name}"] = pool
        return pool

    def _kernel_manager_options(self) -> dict[str, Any]:
        """What each kernel's manager is made with, as stock makes it: the server's
        config, its ZMQ context (``shared_context``) and transport encryption policy.

        With its own context, each kernel would destroy it on shutdown under the
        server's live streams on it (activity watch, WebSocket channels)."""
        options: dict[str, Any] = {"parent": self, "log": self.log}
        if self.shared_context:
            if self.context.closed:
                self.context = self._context_default()
            options["context"] = self.context
        policy = getattr(self, "transport_encryption", "disabled")
        if policy != "disabled":
            options["transport_encryption"] = policy
        return options

    async def herd_pool(self, kernel_name: str | None = None) -> herd.Pool[Any] | None:
        """The pool that runs kernels of ``kernel_name`` (default: the default kernelspec),
        made and started on first use.

        For sessions that are not kernels of this manager (``POST
        {base_url}herd/api/sessions/{id}/execute``); end them with
        :meth:`end_herd_session`.

        :returns: ``None`` if herd does not run this manager's kernels
            (:meth:`configure_herd` was not called: ``c.Herd.warm_kernels = 0``) or
            no such kernelspec is installed.
        """
        return await self._pool_for(kernel_name or self.default_kernel_name)

    async def _pool_for(self, kernel_name: str) -> herd.Pool[Any] | None:
        """The kernelspec's pool, made and started on first use; ``None``: stock."""
        if self._herd_options is None:
            return None
        async with self._new_pool_lock:
            pool = self.herd_pools.get(kernel_name)
            if pool is None:
                specs: Any = self.kernel_spec_manager
                if kernel_name not in specs.find_kernel_specs():
                    return None  # the stock path says "no such kernel"
                pool = self._new_pool(kernel_name, warm=0)
                await pool.start()  # no spares: nothing starts now
        return pool

    # -- start -------------------------------------------------------------------------

    async def start_kernel(  # type: ignore[override]
        self, *, kernel_id: str | None = None, path: Any = None, **kwargs: Any
    ) -> str:
        """Start a kernel for a session: a warm one when it can serve, else one started
        for the session in the kernelspec's pool."""
        if kernel_id is not None and kernel_id in self:
            return await super().start_kernel(kernel_id=kernel_id, path=path, **kwargs)
        pools = self.herd_pools.values()
        if kernel_id is not None and any(kernel_id in pool.sessions() for pool in pools):
            # A client-chosen ID (POST /api/kernels {"kernel_id": ...}) naming a session
            # of herd's own routes: adopting its kernel would give it two owners.
            raise web.HTTPError(409, f"herd: {kernel_id!r} is a session of herd's kernel pool")
        name = kwargs.get("kernel_name") or self.default_kernel_name
        extra = set(kwargs) - {"kernel_name", "env"}
        if extra and self._herd_options is not None:
            self._skipping(
                name,
                f"a start with options herd does not handle ({', '.join(sorted(extra))}) "
                "is a stock start, outside herd's pool",
            )
        if self._encryption_refused(name):
            extra.add("transport_encryption")  # stock refuses it, with its own error
        pool = None if extra else await self._pool_for(name)
        if self.herd_only:
            pool = await self._herd_pool_ready(pool, name, extra)
        if pool is None or pool.state is not herd.PoolState.READY:
            return await super().start_kernel(kernel_id=kernel_id, path=path, **kwargs)
        kernel_id = kernel_id or self.new_kernel_id()
        cwd = self.cwd_for_path(path, env=kwargs.get("env", {})) if path is not None else None
        env = dict(kwargs.get("env") or os.environ)
        worker = await self._take_warm(pool, kernel_id, cwd, env)
        if worker is not None:
            self._adopt(kernel_id, pool, worker, cwd, env)
            # Stock's line first (log readers grep for it), then herd's own words.
            self.log.info(
                "Kernel started: %s (herd: a warm spare, worker %s)", kernel_id, worker.id
            )
            await self._finish_kernel_start(kernel_id)
        else:
            ready = self._start_cold(kernel_id, pool, cwd, env)
            if not self.use_pending_kernels:
                # As stock: answered once the kernel is launched (a launch that fails
                # is this request's error); its clients wait for it to answer.
                try:
                    await asyncio.shield(ready)
                except Exception:  # not launched (a cancelled request leaves it starting)
                    self._kernels.pop(kernel_id, None)
                    self._kernel_connections.pop(kernel_id, None)
                    self._herd_failed.discard(kernel_id)
                    raise
            self.log.info("Kernel started: %s (herd: started for its session)", kernel_id)
        if not self._initialized_culler:
            self.initialize_culler()
        return kernel_id

    async def _herd_pool_ready(
        self, pool: herd.Pool[Any] | None, name: str, extra: set[str]
    ) -> herd.Pool[Any]:
        """With :attr:`herd_only`: the pool, once it serves; never a stock start.

        :raises tornado.web.HTTPError: 409 (options herd does not handle, no pool
            for the kernelspec), 503 (the pool did not come up within a minute).
        """
        if extra:
            raise web.HTTPError(
                409, f"herd: kernels start only in herd's pool here, not with {sorted(extra)}"
            )
        if pool is None:
            raise web.HTTPError(409, f"herd: no kernel pool for {name!r} here")
        deadline = time.monotonic() + 60
        # The pool's state has no event to wait on; its start takes a kernel's start.
        while pool.state is herd.PoolState.STARTING and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        if pool.state is not herd.PoolState.READY:
            raise web.HTTPError(503, f"herd: the {name} kernel pool is {pool.state.value}")
        return pool

    def _start_cold(
        self, kernel_id: str, pool: herd.Pool[Any], cwd: str | None, env: dict[str, str]
    ) -> asyncio.Future[None]:
        """Start a kernel for its session in ``pool``, as stock starts one: its manager
        is registered now and its ``ready`` (returned) resolves once the kernel is
        launched, or carries the launch's error. The wait for the kernel to answer,
        and its adoption as a herd worker, go on in the background; clients wait on
        ``ready`` and then for the kernel to answer, as on stock (so JupyterLab's
        requests after the session's overlap the kernel's start)."""
        factory = pool.factory
        assert isinstance(factory, KernelFactory)
        km: Any = factory.new_manager()
        km.kernel_id = kernel_id
        ready: asyncio.Future[None] = km.ready
        km.execution_state = "starting"
        km.reason = ""
        km.last_activity = utcnow()
        self._kernels[kernel_id] = km
        self._kernel_connections[kernel_id] = 0

        async def start() -> None:
            try:
                spawn = functools.partial(factory.spawn, cwd=cwd, environ=env, manager=km)
                worker = await self._acquire(pool, kernel_id, spawn=spawn)
            except Exception as exc:
                km.execution_state = "dead"
                km.reason = str(exc)
                self._herd_failed.add(kernel_id)
                if not ready.done():
                    ready.set_exception(exc)
                if ready.exception() is None:
                    self.log.warning("herd: kernel %s died during start-up: %s", kernel_id, exc)
                # Else not launched: as stock, the request fails or (pending kernels)
                # the kernel stays, dead, until it is shut down.
                return
            finally:
                self._herd_pending.pop(kernel_id, None)
            self._adopt(kernel_id, pool, worker, cwd, env, fresh=False)
            self.log.info("herd: kernel %s ready (worker %s)", kernel_id, worker.id)

        self._herd_pending[kernel_id] = asyncio.create_task(start())

        async def finish() -> None:
            """Stock's own steps once launched: ports, activity watch, "dead" callback."""
            try:
                await ready
            except Exception:
                return  # not launched: start() said why
            await self._finish_kernel_start(kernel_id)

        finishing = asyncio.create_task(finish())
        self._herd_finishing[kernel_id] = finishing
        finishing.add_done_callback(lambda _: self._herd_finishing.pop(kernel_id, None))
        return ready

    async def _acquire(self, pool: herd.Pool[Any], kernel_id: str, **options: Any) -> KernelWorker:
        """Pin a kernel of ``pool`` to ``kernel_id``, with Jupyter's errors.

        The pool's ``acquire_timeout`` (5 s under a cap) is for waiting at the cap
        for a kernel to free up. A start with room below the cap (counting the
        starts under way here) may take up to the kernel's ``startup_timeout``:
        many at once on a busy machine take longer than 5 s, and are no 503.
        """
        acquiring = self._herd_acquiring.get(pool, 0)
        if len(pool.workers()) + acquiring < pool.config.max_workers:
            factory = pool.factory
            options.setdefault("timeout", getattr(factory, "startup_timeout", None))
        self._herd_acquiring[pool] = acquiring + 1
        try:
            session = await pool.acquire(kernel_id, **options)
        except herd.PoolExhaustedError as exc:
            raise web.HTTPError(
                503, f"herd: all {pool.config.max_workers} kernels are in use (c.Herd.max_workers)"
            ) from exc
        except herd.InvalidSessionIdError as exc:
            raise web.HTTPError(400, f"herd: kernel ID {kernel_id!r}: {exc}") from exc
        except herd.HerdError as exc:
            raise web.HTTPError(500, f"herd: cannot start a kernel: {exc}") from exc
        finally:
            self._herd_acquiring[pool] -= 1
        worker = session.worker
        assert isinstance(worker, KernelWorker)
        await session.close()  # the pin stays; the kernel manager owns it from here
        return worker

    def _encryption_refused(self, kernel_name: str) -> bool:
        """Whether ``transport_encryption = "required"`` refuses kernels of
        ``kernel_name``: its kernelspec does not declare CurveZMQ support."""
        if getattr(self, "transport_encryption", "disabled") != "required":
            return False
        specs: Any = self.kernel_spec_manager
        try:
            spec = specs.get_kernel_spec(kernel_name)
        except Exception:
            return False  # no such kernelspec: the caller finds out
        return not _declares_curve(spec)

    def _movable(self, factory: KernelFactory) -> bool:
        """Whether the factory's kernels can be retargeted (read once per kernelspec)."""
        name = factory.kernel_name
        if name not in self._movable_specs:
            specs: Any = self.kernel_spec_manager
            self._movable_specs[name] = _retargetable(specs.get_kernel_spec(name))
        return self._movable_specs[name]

    def _skipping(self, kernel_name: str, why: str) -> None:
        """Log why a ``kernel_name`` kernel is not a warm spare: once per kernelspec and
        reason, not once per kernel (a drifted environment would make it every start)."""
        if (kernel_name, why) in self._skip_reasons:
            return
        self._skip_reasons.add((kernel_name, why))
        self.log.info("herd: %s: %s (logged once)", kernel_name, why)

    async def _take_warm(
        self, pool: herd.Pool[Any], kernel_id: str, cwd: str | None, env: dict[str, str]
    ) -> KernelWorker | None:
        """Pin a spare kernel to ``kernel_id`` and retarget it; ``None``: no spare can
        serve (none is idle, or they cannot be retargeted to this session)."""
        factory = pool.factory
        assert isinstance(factory, KernelFactory)
        name = factory.kernel_name
        cold = "kernels are started for their sessions"
        if not pool.idle_count:
            if pool.config.min_idle:
                self._skipping(name, f"no spare was ready (all taken, refilling): {cold}")
            return None  # a kernelspec without spares (not in c.Herd.kernel_names)
        # Judged first on what spares are started with, so that the spares are
        # left for sessions they can serve; then on the spare actually taken.
        changed = _changed({**os.environ, **factory.env}, env)
        here = os.getcwd() if cwd is None else cwd
        moved = here != (factory.cwd or os.getcwd())
        foreign = (
            "not an IPython kernel (only those can be moved to a session's directory and "
            f"environment): {cold} unless a spare already matches"
        )
        if not changed <= _RETARGETABLE_ENV:
            names = ", ".join(sorted(changed - _RETARGETABLE_ENV))
            self._skipping(
                name,
                f"requests ask for an environment that differs from the spares' in {names} "
                f"(a running kernel can only take a new JPY_SESSION_NAME): {cold}",
            )
            return None
        if (changed or moved) and not self._movable(factory):
            self._skipping(name, foreign)
            return None
        worker = await self._acquire(pool, kernel_id)
        changed = _changed(worker.launch_env, env)
        if not changed and here == worker.cwd:
            return worker
        if not changed <= _RETARGETABLE_ENV:
            names = ", ".join(sorted(changed - _RETARGETABLE_ENV))
            self._skipping(
                name,
                f"the server's environment changed after the spares started ({names}): "
                f"{cold}, and spares are replaced as they are taken",
            )
        elif not self._movable(factory):
            self._skipping(name, foreign)
            await pool.release(kernel_id)  # fine as it is for a session it can serve
            return None
        elif await worker.run_silently(_move_code(here, changed, env), timeout=10):
            return worker
        else:
            self.log.warning("herd: kernel %s could not be retargeted; starting one", worker.id)
        # Closed, not put back (even with worker_reuse): the refill starts a spare in
        # the environment of now.
        await pool.release(kernel_id)
        await worker.close()
        return None

    def _adopt(
        self,
        kernel_id: str,
        pool: herd.Pool[Any],
        worker: KernelWorker,
        cwd: str | None,
        env: dict[str, str],
        *,
        fresh: bool = True,
    ) -> None:
        """Make the kernel's manager this kernel ID's, as a cold start would (``fresh``:
        a warm spare's, not yet registered under the ID; else a kernel started for
        it, registered and watched since its launch)."""
        km: Any = worker.manager
        km.kernel_id = kernel_id
        # Restarts are cold starts: of the session's directory and environment.
        km._launch_args["cwd"] = cwd
        provisioner = getattr(km, "provisioner", None)
        if provisioner is not None and hasattr(provisioner, "cwd"):
            # What /api/resolvePath?kernel= resolves against, as a cold start sets it.
            provisioner.cwd = cwd if cwd is not None else os.getcwd()
        tag = {TAG_VARIABLE: worker.tag} if TAG_VARIABLE in worker.launch_env else {}
        km._launch_args["env"] = {**env, **tag}
        # `jupyter console --existing <kernel id>` looks for kernel-<id>.json.
        old = Path(km.connection_file)
        new = old.with_name(f"kernel-{kernel_id}.json")
        with contextlib.suppress(OSError):
            os.replace(old, new)
            km.connection_file = str(new)
        # The server talks to the kernel over its own sockets; a client nobody
        # reads would only queue the kernel's output.
        worker.client.stop_channels()
        if fresh:
            km.execution_state = "idle"
            km.reason = ""
            km.last_activity = utcnow()
            self._kernels[kernel_id] = km
            self._kernel_connections[kernel_id] = 0
        self._herd_kernels[kernel_id] = pool
        KERNEL_CURRENTLY_RUNNING_TOTAL.labels(type=worker.kernel_name).inc()
        worker.on_exit = functools.partial(self._herd_restart, kernel_id, worker)

    # -- end ---------------------------------------------------------------------------

    async def _async_shutdown_kernel(  # type: ignore[override]
        self, kernel_id: str, now: bool = False, restart: bool = False
    ) -> None:
        pending = self._herd_pending.get(kernel_id)
        if pending is not None:
            await asyncio.shield(pending)  # as stock: a kernel's start ends first
        finishing = self._herd_finishing.get(kernel_id)
        if finishing is not None:
            await asyncio.shield(finishing)
        pool = self._herd_kernels.get(kernel_id)
        failed = kernel_id in self._herd_failed
        if pool is None and not failed:
            await super()._async_shutdown_kernel(kernel_id, now=now, restart=restart)
            return
        self._check_kernel_id(kernel_id)
        self.log.info("Kernel shutdown: %s", kernel_id)  # stock's line (jupyter_client)
        km = self._kernels[kernel_id]
        self.stop_watching_activity(kernel_id)
        self.stop_buffering(kernel_id)
        self.remove_kernel(kernel_id)
        self._kernel_connections.pop(kernel_id, None)
        self._kernel_ports.pop(kernel_id, None)
        self._herd_restarts.pop(kernel_id, None)
        self._herd_failed.discard(kernel_id)
        if pool is None:
            return  # it never ran as a herd worker: nothing else is left of it
        KERNEL_CURRENTLY_RUNNING_TOTAL.labels(type=km.kernel_name).dec()
        del self._herd_kernels[kernel_id]
        worker: KernelWorker | None = getattr(km, "herd_worker", None)
        if worker is not None:
            worker.on_exit = None  # shut down by its user: no auto-restart
        await self._end_session(pool, kernel_id, worker)

    shutdown_kernel = _async_shutdown_kernel  # type: ignore[assignment]

    async def _async_restart_kernel(self, kernel_id: str, now: bool = False) -> None:
        """Stock's restart; the cells the old kernel was running will get no reply."""
        km = self._kernels.get(kernel_id)
        if km is not None:
            unanswered(km).clear()
        await super()._async_restart_kernel(kernel_id, now=now)

    restart_kernel = _async_restart_kernel  # type: ignore[assignment]

    async def shutdown_herd_kernels(self) -> None:
        """Shut down every kernel of herd's pools that is a kernel of this manager, as
        ``shutdown_all`` would (the herd_nb extension's stop, before its pools stop)."""
        kernel_ids = list({*self._herd_pending, *self._herd_kernels, *self._herd_failed})
        results = await asyncio.gather(
            *(self._async_shutdown_kernel(kid, now=True) for kid in kernel_ids),
            return_exceptions=True,
        )
        for kernel_id, result in zip(kernel_ids, results, strict=True):
            if isinstance(result, Exception):
                self.log.error("herd: kernel %s: shutdown failed: %s", kernel_id, result)

    async def _end_session(
        self, pool: herd.Pool[Any], session_id: str, worker: KernelWorker | None
    ) -> None:
        """Unpin ``session_id``: its kernel is reset and goes back to the pool (with
        ``worker_reuse``), or is shut down; returns once it is gone."""
        if self._herd_reuse and worker is not None and worker.alive:
            reset = _isolated(_RESET)
            if await worker.run_silently(reset, timeout=10) and await self._unretarget(worker):
                await pool.release(session_id)  # back to the warm pool
                return
        await pool.release(session_id)
        if worker is not None:
            await worker.close()  # the pool's own close of it: return once it is gone

    async def end_herd_session(self, session_id: str) -> bool:
        """End a session of herd's kernel pools that is not a kernel of this manager
        (one made through :meth:`herd_pool`), as :meth:`shutdown_kernel` ends a kernel:
        its kernel is reset for reuse (``c.Herd.worker_reuse``) or shut down.

        Close the session's open uses first: the kernel is shut down (or reset)
        at once, under any cell still running in it.

        :returns: whether a pool had the session.
        :raises ValueError: ``session_id`` is one of this manager's kernels.
        """
        if session_id in self._herd_kernels:
            raise ValueError(f"{session_id!r} is a kernel: end it with shutdown_kernel")
        for pool in self.herd_pools.values():
            worker_id = pool.sessions().get(session_id)
            if worker_id is None:
                continue
            found = [w for w in pool.workers() if w.id == worker_id]
            worker = found[0] if found and isinstance(found[0], KernelWorker) else None
            await self._end_session(pool, session_id, worker)
            return True
        return False

    async def _unretarget(self, worker: KernelWorker) -> bool:
        """Put a reset kernel back where it was started."""
        km: Any = worker.manager
        changed = _changed(km._launch_args["env"], worker.launch_env)
        km._launch_args["cwd"] = worker.cwd
        km._launch_args["env"] = dict(worker.launch_env)
        code = _move_code(worker.cwd, changed, worker.launch_env)
        return await worker.run_silently(code, timeout=10)

    async def _herd_restart(self, kernel_id: str, worker: KernelWorker, reason: str) -> None:
        """``worker``'s kernel exited on its own (:attr:`KernelWorker.on_exit`):
        restart it in place, as jupyter_client's ``KernelRestarter`` does, unless it
        died ``restart_limit`` times in a row (then the pool's crash path follows).

        Runs before the pool sees the exit, so the session stays pinned."""
        km: Any = worker.manager
        # (By identity; an `is` test would narrow `km` for mypy.)
        if id(self._kernels.get(kernel_id)) != id(km) or kernel_id not in self._herd_kernels:
            return  # no longer this kernel ID's kernel
        if getattr(km, "shutting_down", False):
            return
        # The user's KernelRestarter settings, as stock's restarter would read them.
        policy = getattr(km, "restarter_class", KernelRestarter)
        if not (isinstance(policy, type) and issubclass(policy, KernelRestarter)):
            policy = KernelRestarter
        restarter = policy(parent=km, kernel_manager=km)
        limit, stable = restarter.restart_limit, restarter.stable_start_time
        count, last = self._herd_restarts.get(kernel_id, (0, -float("inf")))
        now = time.monotonic()
        # As stock: deaths count as "in a row" until a restart has run stable_start_time.
        count = count + 1 if now - last < stable else 1
        if count > limit:
            self.log.warning(
                "herd: kernel %s died (%s) %d times in a row: not restarting it",
                kernel_id,
                reason,
                count,
            )
            self._herd_tell(
                km, f"herd: the kernel died ({reason}), {count} times in a row: not restarting it\n"
            )
            km.reason = f"the kernel died ({reason})"
            return
        self.log.warning(
            "herd: kernel %s died (%s); restarting it in place (%d/%d)",
            kernel_id,
            reason,
            count,
            limit,
        )
        # Before "restarting": JupyterLab drops a kernel's pending requests on it.
        self._herd_tell(km, f"herd: the kernel died ({reason}); restarting it\n")
        km.herd_fire("restart")  # the server's callbacks: status "restarting"
        self._herd_restarts[kernel_id] = (count, time.monotonic())
        try:
            # Stock restarts with the same ports (new ones only if the first start
            # never came up), so the server's ZMQ sockets just reconnect.
            await km.restart_kernel(now=True)
        except Exception as exc:
            self.log.error("herd: kernel %s could not be restarted: %s", kernel_id, exc)
            return
        self._herd_restarts[kernel_id] = (count, time.monotonic())
        km.reason = ""

    def start_watching_activity(self, kernel_id: str) -> None:
        """Stock's IOPub watch (activity, execution state), which for herd's kernels
        also keeps the header of the last execute request the kernel ran: the
        message saying why the kernel died is sent as output of that request, so
        that JupyterLab shows it in the cell that was running."""
        super().start_watching_activity(kernel_id)
        km: Any = self._kernels[kernel_id]
        stream = getattr(km, "_activity_stream", None)
        # pyzmq's ZMQStream keeps one receive callback, stock's: it is called first.
        record = getattr(stream, "_recv_callback", None)
        ours = kernel_id in self._herd_kernels or kernel_id in self._herd_pending
        if not ours or stream is None or record is None:
            return
        session = km.session

        def watch(msg_list: list[Any]) -> None:
            record(msg_list)
            try:
                _, fed = session.feed_identities(msg_list)
                msg = session.deserialize(fed, content=False)
            except Exception:
                return
            parent = msg.get("parent_header") or {}
            if msg["header"].get("msg_type") == "status" and (
                parent.get("msg_type") == "execute_request"
            ):
                km.herd_last_execute = parent

        stream.on_recv(watch)

    @staticmethod
    def _running_cell(km: Any) -> dict[str, Any] | None:
        """The header of the execute request the kernel was running: the oldest one
        its clients sent without a reply (herd_nb's WebSocket keeps them), else the
        last one the kernel said it was busy with."""
        requests = unanswered(km)
        if requests:
            return next(iter(requests.values()))
        last: dict[str, Any] | None = getattr(km, "herd_last_execute", None)
        return last

    def _herd_tell(self, km: Any, text: str) -> None:
        """Send ``text`` as an IOPub ``stream`` (stderr) to the kernel's WebSocket
        clients, as the server sends its own status messages, as output of the last
        execute request the kernel ran (if any).

        The connections are found through the restart callbacks they registered
        (jupyter_server's ``ZMQChannelsWebsocketConnection.on_kernel_restarted``).
        """
        seen: set[int] = set()
        for callback in list((km._herd_callbacks or {}).get("restart", [])):
            conn = getattr(callback, "__self__", None)
            session = getattr(conn, "session", None)
            write = getattr(conn, "write_message", None)
            if conn is None or id(conn) in seen or session is None or write is None:
                continue
            seen.add(id(conn))
            try:
                iopub = getattr(conn, "channels", {}).get("iopub")
                if iopub is not None and not iopub.closed():
                    iopub.flush()  # the dead kernel's last output first
                parent = self._running_cell(km)
                msg = session.msg("stream", {"name": "stderr", "text": text}, parent=parent)
                if getattr(conn, "subprotocol", None) == "v1.kernel.websocket.jupyter.org":
                    from jupyter_server.services.kernels.connection.base import (
                        serialize_msg_to_ws_v1,
                    )

                    write(serialize_msg_to_ws_v1(msg, "iopub", session.pack), binary=True)
                else:
                    msg["channel"] = "iopub"
                    write(json.dumps(msg, default=json_default))
            except Exception:
                self.log.debug("herd: cannot tell a client of %s", km.kernel_id, exc_info=True)
        unanswered(km).clear()  # the dead kernel answers none of them

    async def _herd_crashed(self, kernel_id: str) -> None:
        """The pool's crash path (auto-restart gave up, or the kernel was not a
        notebook's): tell the kernel's clients it died, then forget it."""
        self._herd_restarts.pop(kernel_id, None)
        if self._herd_kernels.pop(kernel_id, None) is None:
            return
        km: Any = self._kernels.get(kernel_id)
        if km is None:
            return
        km.reason = km.reason or "the kernel died"
        KERNEL_CURRENTLY_RUNNING_TOTAL.labels(type=km.kernel_name).dec()
        self.stop_watching_activity(kernel_id)
        self.stop_buffering(kernel_id)
        # As when auto-restart gives up: connections send status "dead", and the
        # server's own callback removes the kernel.
        km.herd_fire("dead")
        if kernel_id in self:
            self.remove_kernel(kernel_id)

    def herd_kernel_ids(self) -> Mapping[str, herd.Pool[Any]]:
        """Kernel IDs served by herd's pools, with their pool."""
        return dict(self._herd_kernels)
