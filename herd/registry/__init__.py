"""Session registries: where the pool records which worker owns which session.

:class:`MemoryRegistry` is the default. A Redis registry for several nodes will
live in ``herd.registry.redis`` (the only module that imports redis).
"""

from __future__ import annotations

from .memory import MemoryRegistry as MemoryRegistry

__all__ = ["MemoryRegistry"]
