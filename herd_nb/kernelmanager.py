"""Pre-warmed notebook kernels: a Jupyter kernel manager that hands out started kernels.

:class:`HerdKernelManager` is what ``jupyter server`` runs as its kernel manager
when herd_nb is enabled. ``POST /api/sessions`` and ``POST /api/kernels`` take a
kernel that is already running from a warm :class:`herd.Pool` of
:class:`~herd_nb.KernelFactory` kernels and pin it to the new kernel ID; the pool
refills its spares in the background, one start at a time.

A handed-out kernel must look as if it had been started for its session:

* **Retargeting.** The working directory becomes the notebook's directory and
  the environment becomes what a cold start would get (``JPY_SESSION_NAME`` and
  IPython's ``__session__`` included). This is done in the kernel by a silent
  execute, so only IPython kernels (``ipykernel``, any Python) can be retargeted.
  A kernel of another kind is handed out only when it needs no retargeting;
  otherwise, and whenever the requested environment differs in anything but the
  session name, the kernel is started cold, never handed out in the wrong place.
* **Restarts** are cold starts of the kernel's own process, with the session's
  directory and environment, inside the same worker (same cgroup, same session).
* **Crashes** take the pool's crash path: the kernel is reported dead to its
  clients and removed, as when Jupyter's auto-restart gives up.
* **Culling** is Jupyter's culler, set from ``c.Herd.ttl``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jupyter_server._tz import utcnow
from jupyter_server.prometheus.metrics import KERNEL_CURRENTLY_RUNNING_TOTAL
from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager
from tornado import web
from traitlets.utils.importstring import import_item

import herd
from herd._process import TAG_VARIABLE

from .kernels import KernelFactory, KernelWorker

__all__ = ["HerdKernelManager"]

# Environment variables a running IPython kernel can take on after start-up.
# Anything else in a cold start's environment may be read at start-up (PYTHONPATH,
# LD_*, thread counts...), so a difference there means a cold start.
_RETARGETABLE_ENV = frozenset({"JPY_SESSION_NAME"})

# Runs in the kernel, in a namespace of its own: nothing lands in the user's.
_RETARGET = """
import importlib, os, pathlib
os.chdir({cwd!r})
for name in {unset!r}:
    os.environ.pop(name, None)
os.environ.update({set!r})
importlib.invalidate_caches()
shell = __import__("IPython").get_ipython()
shell.history_manager.dir_hist[:] = [pathlib.Path.cwd()]
if {session!r}:
    shell.user_ns["__session__"] = {session!r}
else:
    shell.user_ns.pop("__session__", None)
"""

_RESET = """
__import__("IPython").get_ipython().reset(new_session=True, aggressive=True)
"""


def _retargetable(worker: KernelWorker) -> bool:
    """Whether the kernel is IPython's (the retargeting code is Python + IPython)."""
    spec = worker.manager.kernel_spec
    if spec is None or not spec.language.lower().startswith("python"):
        return False
    return any("ipykernel" in str(arg) for arg in spec.argv)


class HerdKernelManager(AsyncMappingKernelManager):
    """Jupyter's kernel manager, with kernels taken from warm herd pools.

    Kernels of a kernelspec without a warm pool, and requests a warm kernel cannot
    serve, are started the stock way.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.herd_pools: dict[str, herd.Pool[Any]] = {}  # kernelspec name -> warm pool
        self._herd_kernels: dict[str, herd.Pool[Any]] = {}  # kernel ID -> its pool
        self._herd_reuse = False

    # -- set-up (by the herd_nb extension) ----------------------------------------------

    def add_warm_pool(
        self,
        kernel_name: str,
        *,
        warm: int,
        max_kernels: int,
        health_interval: float | None,
        worker_reuse: bool,
        sandbox: Any,
        cpu_limit: float | None,
        memory_limit: int | None,
        pids_limit: int | None,
    ) -> herd.Pool[Any]:
        """Keep ``warm`` started kernels of ``kernel_name`` ready; not started yet.

        :raises ValueError: a bad option (from :class:`herd.Pool` or the factory).
        """
        factory = KernelFactory(
            kernel_name,
            sandbox=sandbox,
            cpu_limit=cpu_limit,
            memory_limit=memory_limit,
            pids_limit=pids_limit,
            kernel_spec_manager=self.kernel_spec_manager,
            manager_class=import_item(self.kernel_manager_class),
            manager_options={"parent": self, "log": self.log},
            connection_dir=self.connection_dir,
        )
        pool: herd.Pool[Any] = herd.Pool(
            factory,
            min_workers=0,
            min_idle=warm,
            max_workers=max_kernels,
            ttl=None,  # Jupyter's culler ends idle kernels (see c.Herd.ttl)
            health_interval=health_interval,
            worker_reuse=worker_reuse,
            on_crash=self._herd_crashed,
            acquire_timeout=5.0,
            # A kernel start costs ~0.5 s of CPU: let the sessions that just took
            # warm kernels run their first cells before the refill starts.
            refill_delay=1.0,
        )
        self.herd_pools[kernel_name] = pool
        self._herd_reuse = worker_reuse
        return pool

    # -- start -------------------------------------------------------------------------

    async def start_kernel(  # type: ignore[override]
        self, *, kernel_id: str | None = None, path: Any = None, **kwargs: Any
    ) -> str:
        """Start a kernel for a session: a warm one when it can serve, else cold."""
        if kernel_id is not None and kernel_id in self:
            return await super().start_kernel(kernel_id=kernel_id, path=path, **kwargs)
        name = kwargs.get("kernel_name") or self.default_kernel_name
        pool = self.herd_pools.get(name)
        extra = set(kwargs) - {"kernel_name", "env"}
        if pool is None or pool.state is not herd.PoolState.READY or extra:
            return await super().start_kernel(kernel_id=kernel_id, path=path, **kwargs)
        kernel_id = kernel_id or self.new_kernel_id()
        cwd = self.cwd_for_path(path, env=kwargs.get("env", {})) if path is not None else None
        env = dict(kwargs.get("env") or os.environ)
        worker = await self._take_warm(pool, kernel_id, cwd, env)
        if worker is None:
            return await super().start_kernel(kernel_id=kernel_id, path=path, **kwargs)
        self._adopt(kernel_id, pool, worker, cwd, env)
        await self._finish_kernel_start(kernel_id)
        KERNEL_CURRENTLY_RUNNING_TOTAL.labels(type=worker.kernel_name).inc()
        self.log.info("Kernel started (warm, herd worker %s): %s", worker.id, kernel_id)
        if not self._initialized_culler:
            self.initialize_culler()
        return kernel_id

    async def _take_warm(
        self, pool: herd.Pool[Any], kernel_id: str, cwd: str | None, env: dict[str, str]
    ) -> KernelWorker | None:
        """Pin a warm kernel to ``kernel_id`` and retarget it; ``None``: start cold."""
        try:
            session = await pool.acquire(kernel_id)
        except herd.PoolExhaustedError as exc:
            raise web.HTTPError(
                503, f"herd: all {pool.config.max_workers} kernels are in use (c.Herd.max_workers)"
            ) from exc
        except herd.HerdError as exc:
            raise web.HTTPError(500, f"herd: cannot start a kernel: {exc}") from exc
        worker = session.worker
        assert isinstance(worker, KernelWorker)
        await session.close()  # the pin stays; the kernel manager owns it from here
        warm_env = {k: v for k, v in worker.launch_env.items() if k != TAG_VARIABLE}
        changed = {k for k in env.keys() | warm_env.keys() if env.get(k) != warm_env.get(k)}
        here = os.getcwd() if cwd is None else cwd
        if not changed and here == worker.cwd:
            return worker
        if changed <= _RETARGETABLE_ENV and _retargetable(worker):
            code = _RETARGET.format(
                cwd=here,
                unset=sorted((changed - env.keys()) | {TAG_VARIABLE}),
                set={k: env[k] for k in sorted(changed & env.keys())},
                session=env.get("JPY_SESSION_NAME", ""),
            )
            if await worker.run_silently(code, timeout=10):
                return worker
            self.log.warning("herd: retargeting kernel %s failed; starting cold", worker.id)
        else:
            self.log.debug(
                "herd: kernel %s cannot be retargeted (env %s); starting cold",
                worker.kernel_name,
                sorted(changed),
            )
        await pool.release(kernel_id)
        return None

    def _adopt(
        self,
        kernel_id: str,
        pool: herd.Pool[Any],
        worker: KernelWorker,
        cwd: str | None,
        env: dict[str, str],
    ) -> None:
        """Make the warm kernel's manager this kernel ID's, as a cold start would."""
        km: Any = worker.manager
        km.kernel_id = kernel_id
        # Restarts are cold starts: of the session's directory and environment.
        km._launch_args["cwd"] = cwd
        km._launch_args["env"] = {**env, TAG_VARIABLE: worker.tag}
        # `jupyter console --existing <kernel id>` looks for kernel-<id>.json.
        old = Path(km.connection_file)
        new = old.with_name(f"kernel-{kernel_id}.json")
        with contextlib.suppress(OSError):
            os.replace(old, new)
            km.connection_file = str(new)
        # The server talks to the kernel over its own sockets; a client nobody
        # reads would only queue the kernel's output.
        worker.client.stop_channels()
        km.execution_state = "idle"
        km.reason = ""
        km.last_activity = utcnow()
        self._kernels[kernel_id] = km
        self._kernel_connections[kernel_id] = 0
        self._herd_kernels[kernel_id] = pool

    # -- end ---------------------------------------------------------------------------

    async def _async_shutdown_kernel(  # type: ignore[override]
        self, kernel_id: str, now: bool = False, restart: bool = False
    ) -> None:
        pool = self._herd_kernels.get(kernel_id)
        if pool is None:
            await super()._async_shutdown_kernel(kernel_id, now=now, restart=restart)
            return
        self._check_kernel_id(kernel_id)
        km = self._kernels[kernel_id]
        KERNEL_CURRENTLY_RUNNING_TOTAL.labels(type=km.kernel_name).dec()
        self.stop_watching_activity(kernel_id)
        self.stop_buffering(kernel_id)
        del self._herd_kernels[kernel_id]
        self.remove_kernel(kernel_id)
        self._kernel_connections.pop(kernel_id, None)
        self._kernel_ports.pop(kernel_id, None)
        worker: KernelWorker | None = getattr(km, "herd_worker", None)
        if self._herd_reuse and worker is not None and worker.alive:
            if await worker.run_silently(_RESET, timeout=10) and await self._unretarget(worker):
                await pool.release(kernel_id)  # back to the warm pool
                return
        await pool.release(kernel_id)
        if worker is not None:
            await worker.close()  # the pool's own close of it: return once it is gone

    shutdown_kernel = _async_shutdown_kernel  # type: ignore[assignment]

    async def _unretarget(self, worker: KernelWorker) -> bool:
        """Put a reset kernel back where the warm pool started it."""
        km: Any = worker.manager
        km._launch_args["cwd"] = worker.cwd
        km._launch_args["env"] = dict(worker.launch_env)
        warm_env = {k: v for k, v in worker.launch_env.items() if k != TAG_VARIABLE}
        code = _RETARGET.format(
            cwd=worker.cwd,
            unset=["JPY_SESSION_NAME"] if "JPY_SESSION_NAME" not in warm_env else [],
            set={k: warm_env[k] for k in _RETARGETABLE_ENV & warm_env.keys()},
            session=warm_env.get("JPY_SESSION_NAME", ""),
        )
        return await worker.run_silently(code, timeout=10)

    async def _herd_crashed(self, kernel_id: str) -> None:
        """The pool's crash path: tell the kernel's clients it died, then forget it."""
        if self._herd_kernels.pop(kernel_id, None) is None:
            return
        km: Any = self._kernels.get(kernel_id)
        if km is None:
            return
        km.reason = "the kernel died"
        KERNEL_CURRENTLY_RUNNING_TOTAL.labels(type=km.kernel_name).dec()
        self.stop_watching_activity(kernel_id)
        self.stop_buffering(kernel_id)
        # As when auto-restart gives up: connections send status "dead", and the
        # server's own callback removes the kernel.
        km.herd_fire("dead")
        if kernel_id in self:
            self.remove_kernel(kernel_id)

    def herd_kernel_ids(self) -> Mapping[str, herd.Pool[Any]]:
        """Kernel IDs served by warm pools, with their pool."""
        return dict(self._herd_kernels)
