"""herd_nb: herd for Jupyter.

- :class:`KernelFactory`: Jupyter kernels as pool workers (any kernelspec),
  sandboxed like any herd worker; ``worker.client`` is a ready async kernel client.
- the server extension (``herd_nb.extension.Herd``): pools that start and stop
  with ``jupyter server``, REST and proxy routes under ``{base_url}herd/``.
  Enabled on install; explicitly: ``--ServerApp.jpserver_extensions=herd_nb=True``.
- :class:`HerdKernelManager`: the server's kernel manager under the extension;
  notebook and console sessions get pre-warmed kernels.

- ``%load_ext herd_nb``: the ``%herd`` / ``%%herd`` magics (:mod:`herd_nb.magics`);
- :class:`Dashboard`: a live ipywidgets panel of pools (:mod:`herd_nb.dashboard`).

``herd`` (the core) never imports this package; this package imports IPython,
ipywidgets and jupyter_server only in the modules that need them.
"""

from __future__ import annotations

from typing import Any

from .kernels import KernelFactory as KernelFactory
from .kernels import KernelWorker as KernelWorker

__all__ = [
    "Dashboard",
    "HerdKernelManager",
    "KernelFactory",
    "KernelWorker",
    "load_ipython_extension",
    "unload_ipython_extension",
]


def __getattr__(name: str) -> Any:
    # jupyter_server and ipywidgets are imported only when asked for.
    if name == "HerdKernelManager":
        from .kernelmanager import HerdKernelManager

        return HerdKernelManager
    if name == "Dashboard":
        from .dashboard import Dashboard

        return Dashboard
    raise AttributeError(f"module 'herd_nb' has no attribute {name!r}")


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext herd_nb``: the ``%herd`` and ``%%herd`` magics."""
    from .magics import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext herd_nb``."""
    from .magics import unload_ipython_extension as unload

    unload(ipython)


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    """Where jupyter_server finds the extension (imported only when it loads)."""
    from .extension import Herd

    return [{"module": "herd_nb", "app": Herd}]
