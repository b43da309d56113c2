"""Forwarding between the nodes of a fleet (a shared registry): shared by both engines.

A request for a session that another node owns goes to that node's advertised
address, with the client's own URI (the owner finds the session by the same key)
and a ``Herd-Forwarded`` hop count, which stops a request that would go round
(each node asks the registry afresh for a forwarded request it does not own)
and never reaches a worker (it is hop-by-hop, see ``_headers.HOP_BY_HOP``).
"""

from __future__ import annotations

import os
import urllib.parse
from typing import ClassVar, Protocol

from .._exceptions import SessionElsewhereError
from .._session import session_tag
from ._errors import _Failure
from ._headers import FORWARDED_HOPS

#: Nodes a request may pass through before it reaches its session's owner.
MAX_HOPS = 2


class Node:
    """Another node of the fleet, to forward requests to: its ID and ``host:port``."""

    __slots__ = ("address", "id")

    _known: ClassVar[dict[tuple[str, str], Node]] = {}

    def __init__(self, node_id: str, address: str) -> None:
        self.id = node_id
        self.address = address

    @classmethod
    def of(cls, node_id: str, url: str) -> Node:
        """The node at ``url`` (``http://host:port``, as nodes advertise themselves)."""
        key = (node_id, url)
        node = cls._known.get(key)
        if node is None:
            if len(cls._known) > 1000:
                cls._known.clear()
            node = cls._known[key] = cls(node_id, node_address(url))
        return node


def node_address(url: str) -> str:
    """``host:port`` of a node's advertised ``http://host:port`` (port 80 if none).

    :raises ValueError: not an ``http://`` URL with a host.
    """
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
        raise ValueError(f"a node address is http://HOST:PORT, not {url!r}")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{parts.port or 80}"


class _Headers(Protocol):
    def get(self, name: str, /) -> str | None: ...


def hops(headers: _Headers) -> int:
    """The nodes a request came through (its ``Herd-Forwarded`` header); a value
    that is not a small number counts as too many (a client's, not a node's)."""
    value = headers.get(FORWARDED_HOPS)
    if value is None:
        return 0
    return int(value) if value.isdigit() and len(value) < 3 else MAX_HOPS


def forward_to(exc: SessionElsewhereError, came_through: int) -> Node:
    """The node to forward to, for a request that ``came_through`` nodes already.

    :raises _Failure: 502 ``forward_loop`` past :data:`MAX_HOPS`; 503
        ``session_elsewhere`` if the owner advertises no address.
    """
    tag = session_tag(exc.session_id or "")
    if came_through >= MAX_HOPS:
        raise _Failure(
            502,
            "forward_loop",
            f"session {tag} is owned by node {exc.node}, "
            f"but this request came through {came_through} node(s) already",
        )
    if not exc.address:
        raise _Failure(
            503,
            "session_elsewhere",
            f"session {tag} is owned by node {exc.node}, which advertises no address "
            "to forward to (--node-address)",
        )
    return Node.of(exc.node, exc.address)


class NodeUnreachable(_Failure):
    """The node that owns the session could not be reached."""


def node_unreachable(node: Node, session_id: str, exc: BaseException) -> NodeUnreachable:
    """The 503 for a request whose session's owner does not answer."""
    code = getattr(exc, "errno", None)
    reason = os.strerror(code) if code else "timed out"
    return NodeUnreachable(
        503,
        "node_unreachable",
        f"node {node.id} ({node.address}), which owns session {session_tag(session_id)}, "
        f"does not answer ({reason}); its sessions move to a live node once its lease in "
        "the registry lapses",
        Retry_After="1",
    )
