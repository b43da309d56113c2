"""The proxy's two front ends, served the same way, so that one test runs on both:
``tornado`` (:class:`herd.proxy.ProxyHandler` in a :class:`herd.proxy.ProxyServer`,
what ``herd_nb`` and custom Tornado apps use) and ``relay``
(:class:`herd.proxy.RelayServer`, what ``herd serve`` runs)."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import tornado.web

from herd import proxy

ENGINES = ["tornado", "relay"]


@dataclass
class Served:
    port: int
    #: The kept connections to the workers (``idle``, ``idle_count``, ``close``).
    upstreams: Any
    stop: Callable[[], Awaitable[None]]


async def serve(
    engine: str,
    config: proxy.ProxySettings,
    route: str = r"(/.*)?",
    handler: type[proxy.ProxyHandler] = proxy.ProxyHandler,
    **server_options: Any,
) -> Served:
    """Serve ``config`` on a new loopback port with ``engine``; ``server_options`` are
    the server's (``max_header_size``, ``max_connections``, ``idle_connection_timeout``);
    ``handler``: the ``tornado`` engine's handler class."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    port = sock.getsockname()[1]
    if engine == "relay":
        relay = proxy.RelayServer(config, **server_options)
        await relay.start([sock])

        async def stop_relay() -> None:
            relay.stop()
            await relay.close_all_connections()

        return Served(port, relay.upstreams, stop_relay)
    assert engine == "tornado", engine
    app = tornado.web.Application(
        [(route, handler, {"settings": config})],
        websocket_max_message_size=config.max_message_size,
    )
    server = proxy.ProxyServer(app, max_body_size=2**62, **server_options)
    server.add_sockets([sock])

    async def stop_tornado() -> None:
        server.stop()
        await server.close_all_connections()
        config.upstreams.close()

    return Served(port, config.upstreams, stop_tornado)
