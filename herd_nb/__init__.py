"""herd_nb: herd for Jupyter.

- :class:`KernelFactory`: Jupyter kernels as pool workers (any kernelspec),
  sandboxed like any herd worker; ``worker.client`` is a ready async kernel client.
- the server extension (``herd_nb.extension.Herd``): pools that start and stop
  with ``jupyter server``, REST and proxy routes under ``{base_url}herd/``.
  Enable it with ``--ServerApp.jpserver_extensions=herd_nb=True``.

The server extension, pre-warmed notebook kernels, the ``%herd`` magics and the
ipywidgets dashboard build on this. ``herd`` (the core) never imports this package.
"""

from __future__ import annotations

from typing import Any

from .kernels import KernelFactory as KernelFactory
from .kernels import KernelWorker as KernelWorker

__all__ = ["KernelFactory", "KernelWorker"]


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    """Where jupyter_server finds the extension (imported only when it loads)."""
    from .extension import Herd

    return [{"module": "herd_nb", "app": Herd}]
