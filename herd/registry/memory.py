"""The default, in-process :class:`~herd.SessionRegistry`."""

from __future__ import annotations

__all__ = ["MemoryRegistry"]


class MemoryRegistry:
    """A :class:`~herd.SessionRegistry` kept in a dict, for one process.

    >>> import asyncio
    >>> registry = MemoryRegistry()
    >>> asyncio.run(registry.put("s1", "w1"))
    >>> asyncio.run(registry.get("s1"))
    'w1'
    """

    def __init__(self) -> None:
        self._owners: dict[str, str] = {}

    async def get(self, session_id: str) -> str | None:
        """The worker that owns ``session_id``, or ``None``."""
        return self._owners.get(session_id)

    async def put(self, session_id: str, worker_id: str) -> None:
        """Record ``worker_id`` as the owner of ``session_id``."""
        self._owners[session_id] = worker_id

    async def delete(self, session_id: str) -> None:
        """Forget ``session_id``; unknown IDs are ignored."""
        self._owners.pop(session_id, None)

    async def list(self) -> dict[str, str]:
        """A copy of the whole map."""
        return dict(self._owners)

    async def len(self) -> int:
        """The number of recorded sessions."""
        return len(self._owners)

    def __repr__(self) -> str:
        return f"MemoryRegistry(sessions={len(self._owners)})"
