"""How a proxy handler forwards: :class:`ProxySettings`, and the tunnel counter it
shares with :class:`~herd.proxy.ProxyServer`."""

from __future__ import annotations

import dataclasses
from typing import Any

from .._pool import Pool
from ._keys import SessionKey, from_header
from ._upstream import UpstreamPool


class TunnelCount:
    """How many WebSocket tunnels are open: shared by :class:`ProxySettings` (whose
    handlers count them) and :class:`ProxyServer` (whose connection cap includes them).
    """

    def __init__(self) -> None:
        self.open = 0

    def __repr__(self) -> str:
        return f"<TunnelCount open={self.open}>"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProxySettings:
    """How a :class:`ProxyHandler` forwards requests.

    :param pool: the pool whose workers serve the sessions.
    :param key: finds the session of a request (default: ``X-Session-ID`` header).
    :param prefix: the path the handler is mounted under, removed before forwarding.
    :param acquire_timeout: seconds to wait for a worker before 503.
    :param connect_timeout: seconds to connect to a worker before 502.
    :param upstream_timeout: seconds for the worker to send its response head
        before 504 (a streaming body may then take as long as it likes).
    :param max_body_size: the largest request body in bytes (``None``: no limit);
        checked against ``Content-Length`` at once and while a body streams.
    :param max_message_size: the largest WebSocket message from a client, in bytes
        (a bigger one closes the connection with 1009).
    :param upstreams: the keep-alive connection pool (one is made if omitted).
    :param tunnels: counts the open WebSocket tunnels; give the same counter to
        :class:`ProxyServer` so that they count against its ``max_connections``
        (Tornado lets go of a connection once it is a tunnel).
    """

    pool: Pool[Any]
    key: SessionKey = dataclasses.field(default_factory=from_header)
    prefix: str = ""
    acquire_timeout: float | None = 30.0
    connect_timeout: float = 10.0
    upstream_timeout: float | None = 300.0
    max_body_size: int | None = None
    max_message_size: int = 64 * 1024 * 1024
    upstreams: UpstreamPool = dataclasses.field(default_factory=lambda: UpstreamPool())
    tunnels: TunnelCount = dataclasses.field(default_factory=lambda: TunnelCount())

    def __post_init__(self) -> None:
        if self.prefix and (not self.prefix.startswith("/") or self.prefix.endswith("/")):
            raise ValueError(f"prefix must look like '/a/b' (no trailing slash): {self.prefix!r}")
        if self.max_body_size is not None and self.max_body_size < 0:
            raise ValueError("max_body_size must be >= 0 or None")
        if self.max_message_size < 1:
            raise ValueError("max_message_size must be >= 1")
