"""The server's kernel WebSocket, without Nagle's delay.

jupyter_server writes a kernel's replies to the browser as several small
WebSocket frames (status, output, reply, status). Without ``TCP_NODELAY`` each
frame after the first waits for the client's ACK of the one before, and a
client that delays its ACKs (Linux does, for up to 40 ms) adds ~40 ms to every
execute round trip. herd_nb sets ``TCP_NODELAY`` on kernel WebSockets.
"""

from __future__ import annotations

import asyncio

from jupyter_server.services.kernels.connection.channels import ZMQChannelsWebsocketConnection

__all__ = ["NoDelayWebsocketConnection"]


class NoDelayWebsocketConnection(ZMQChannelsWebsocketConnection):
    """Jupyter's kernel WebSocket connection with ``TCP_NODELAY`` on its socket."""

    def connect(self) -> asyncio.Future[None] | None:  # type: ignore[override]
        """Connect to the kernel's channels (the WebSocket handshake is done)."""
        self.websocket_handler.set_nodelay(True)
        return super().connect()
