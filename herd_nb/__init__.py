"""herd_nb: herd for Jupyter.

- :class:`KernelFactory`: Jupyter kernels as pool workers (any kernelspec),
  sandboxed like any herd worker; ``worker.client`` is a ready async kernel client.

The server extension, pre-warmed notebook kernels, the ``%herd`` magics and the
ipywidgets dashboard build on this. ``herd`` (the core) never imports this package.
"""

from __future__ import annotations

from .kernels import KernelFactory as KernelFactory
from .kernels import KernelWorker as KernelWorker

__all__ = ["KernelFactory", "KernelWorker"]
