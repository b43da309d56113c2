"""Session registries: who owns which session.

:class:`MemoryRegistry` is the default: a fleet of one node, in memory.
:class:`RedisRegistry` shares sessions among the nodes of a fleet through Redis
(``pip install 'herd[redis]'``; imported on first use, so that herd itself never
loads redis).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .memory import MemoryRegistry as MemoryRegistry

if TYPE_CHECKING:
    from .redis import RedisRegistry as RedisRegistry

__all__ = ["MemoryRegistry", "RedisRegistry", "from_url"]


def __getattr__(name: str) -> Any:
    if name == "RedisRegistry":
        try:
            from .redis import RedisRegistry
        except ImportError as exc:
            raise ImportError(
                f"herd.registry.RedisRegistry needs redis-py: pip install 'herd[redis]' ({exc})"
            ) from exc
        return RedisRegistry
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def from_url(url: str, **options: Any) -> Any:
    """The registry for ``url``: ``memory://`` (or ``""``) for :class:`MemoryRegistry`,
    ``redis://``, ``rediss://``, ``unix://``, ``redis+sentinel://`` or
    ``redis+cluster://`` for :class:`RedisRegistry` (``options`` go to it).

    :raises ValueError: an unknown scheme.
    """
    scheme = url.partition("://")[0].lower() if "://" in url else url.lower()
    if scheme in ("", "memory"):
        return MemoryRegistry()
    if scheme in ("redis", "rediss", "unix", "redis+sentinel", "redis+cluster"):
        return __getattr__("RedisRegistry")(url, **options)
    raise ValueError(
        f"unknown registry {url!r}: give redis://HOST:PORT (or rediss://, unix://, "
        "redis+sentinel://, redis+cluster://) or memory://"
    )
