"""The default, in-process :class:`~herd.SessionRegistry`: a fleet of one node."""

from __future__ import annotations

import itertools

from .._protocols import Claim, NodeInfo

__all__ = ["MemoryRegistry"]


class MemoryRegistry:
    """A :class:`~herd.SessionRegistry` kept in a dict, for one process.

    Every claim is this node's; nothing is renewed. It records which worker
    serves which session, for :meth:`get` and :meth:`list`.

    >>> import asyncio
    >>> registry = MemoryRegistry()
    >>> claim = asyncio.run(registry.claim("s1"))
    >>> claim.mine, asyncio.run(registry.bind(claim, "w1")), asyncio.run(registry.get("s1"))
    (True, True, 'w1')
    """

    renew_interval: float | None = None

    def __init__(self, node: str = "local") -> None:
        self.node = node
        self._claims: dict[str, Claim] = {}
        self._workers: dict[str, str] = {}  # session ID -> worker ID, once bound
        self._epochs = itertools.count(1)

    async def claim(self, session_id: str) -> Claim:
        """This node's claim of ``session_id`` (the one it holds, or a new one)."""
        claim = self._claims.get(session_id)
        if claim is None:
            claim = Claim(session_id, self.node, "", next(self._epochs), mine=True)
            self._claims[session_id] = claim
        return claim

    async def bind(self, claim: Claim, worker_id: str) -> bool:
        """Record ``worker_id`` as serving ``claim``; ``False`` if it was released."""
        if self._claims.get(claim.session_id) != claim:
            return False
        self._workers[claim.session_id] = worker_id
        return True

    async def release(self, claim: Claim) -> None:
        """Forget ``claim`` (not a newer claim of the same session)."""
        if self._claims.get(claim.session_id) == claim:
            del self._claims[claim.session_id]
            self._workers.pop(claim.session_id, None)

    async def renew(self) -> tuple[str, ...]:
        """Nothing to renew: a claim in memory never lapses."""
        return ()

    def fleet(self) -> tuple[NodeInfo, ...]:
        """This one node."""
        return (NodeInfo(self.node, "", len(self._claims), this=True),)

    async def close(self) -> None:
        """Forget every claim."""
        self._claims.clear()
        self._workers.clear()

    # Reading, for tests and tools.

    async def get(self, session_id: str) -> str | None:
        """The worker that serves ``session_id``, or ``None``."""
        return self._workers.get(session_id)

    async def list(self) -> dict[str, str]:
        """Every claimed session with its worker (``""`` while being bound)."""
        return {sid: self._workers.get(sid, "") for sid in self._claims}

    async def len(self) -> int:
        """The number of claimed sessions."""
        return len(self._claims)

    def __repr__(self) -> str:
        return f"MemoryRegistry(sessions={len(self._claims)})"
