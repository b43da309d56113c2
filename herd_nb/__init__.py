"""herd_nb: herd for Jupyter.

- :class:`KernelFactory`: Jupyter kernels as pool workers (any kernelspec),
  sandboxed like any herd worker; ``worker.client`` is a ready async kernel client.
- the server extension (``herd_nb.extension.Herd``): pools that start and stop
  with ``jupyter server``, REST and proxy routes under ``{base_url}herd/``.
  Enabled on install; explicitly: ``--ServerApp.jpserver_extensions=herd_nb=True``.
- :class:`HerdKernelManager`: the server's kernel manager under the extension;
  notebook and console sessions get pre-warmed kernels.

The ``%herd`` magics and the ipywidgets dashboard build on this. ``herd`` (the
core) never imports this package.
"""

from __future__ import annotations

from typing import Any

from .kernels import KernelFactory as KernelFactory
from .kernels import KernelWorker as KernelWorker

__all__ = ["HerdKernelManager", "KernelFactory", "KernelWorker"]


def __getattr__(name: str) -> Any:
    # The kernel manager needs jupyter_server; import it only when asked for.
    if name == "HerdKernelManager":
        from .kernelmanager import HerdKernelManager

        return HerdKernelManager
    raise AttributeError(f"module 'herd_nb' has no attribute {name!r}")


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    """Where jupyter_server finds the extension (imported only when it loads)."""
    from .extension import Herd

    return [{"module": "herd_nb", "app": Herd}]
