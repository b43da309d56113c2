"""The server's kernel WebSocket: without Nagle's delay, and watching which cells run.

jupyter_server writes a kernel's replies to the browser as several small
WebSocket frames (status, output, reply, status). Without ``TCP_NODELAY`` each
frame after the first waits for the client's ACK of the one before, and a
client that delays its ACKs (Linux does, for up to 40 ms) adds ~40 ms to every
execute round trip. herd_nb sets ``TCP_NODELAY`` on kernel WebSockets.

It also keeps, on the kernel's manager, the ``execute_request`` headers its
clients sent that have no ``execute_reply`` yet (:func:`unanswered`): when a
kernel dies, herd says why as output of the cell that was running, which is
the oldest of them (a kernel that dies at once may never say it was busy).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from jupyter_server.services.kernels.connection.channels import ZMQChannelsWebsocketConnection

__all__ = ["NoDelayWebsocketConnection", "unanswered"]

_V1 = "v1.kernel.websocket.jupyter.org"
_KEPT = 1000  # requests kept per kernel (Run All on a long notebook stays well below)


def unanswered(km: Any) -> dict[str, dict[str, Any]]:
    """The kernel's execute requests without a reply yet, oldest first (by message ID)."""
    requests: dict[str, dict[str, Any]] | None = getattr(km, "herd_unanswered", None)
    if requests is None:
        requests = {}
        km.herd_unanswered = requests
    return requests


class NoDelayWebsocketConnection(ZMQChannelsWebsocketConnection):
    """Jupyter's kernel WebSocket connection with ``TCP_NODELAY`` on its socket, which
    records the cells its kernel is running (:func:`unanswered`)."""

    def connect(self) -> asyncio.Future[None] | None:  # type: ignore[override]
        """Connect to the kernel's channels (the WebSocket handshake is done)."""
        self.websocket_handler.set_nodelay(True)
        return super().connect()

    def handle_incoming_message(self, incoming_msg: str) -> None:
        """Forward a client's message to the kernel (stock), noting execute requests."""
        super().handle_incoming_message(incoming_msg)
        try:
            header = self._execute_request_header(incoming_msg)
        except Exception:
            return  # stock's handling said what was wrong with it
        if header is not None:
            requests = unanswered(self.kernel_manager)
            requests[str(header["msg_id"])] = header
            while len(requests) > _KEPT:
                del requests[next(iter(requests))]

    def _execute_request_header(self, incoming: Any) -> dict[str, Any] | None:
        """The header of ``incoming`` if it is a shell ``execute_request`` (parsed only
        then: the cheap test comes first)."""
        if self.subprotocol == _V1:
            if not isinstance(incoming, bytes) or b"execute_request" not in incoming:
                return None
            from jupyter_server.services.kernels.connection.base import (
                deserialize_msg_from_ws_v1,
            )

            channel, parts = deserialize_msg_from_ws_v1(incoming)
            header: dict[str, Any] = self.session.unpack(parts[0])
        else:
            if not isinstance(incoming, str) or "execute_request" not in incoming:
                return None
            msg = json.loads(incoming)
            channel, header = msg.get("channel"), msg.get("header") or {}
        if channel not in (None, "shell") or header.get("msg_type") != "execute_request":
            return None
        return header

    def handle_outgoing_message(self, stream: str, outgoing_msg: list[Any]) -> None:
        """Forward a kernel's message to the client (stock), noting execute replies."""
        channel = stream if isinstance(stream, str) else getattr(stream, "channel", None)
        if channel == "shell":
            self._answered(outgoing_msg)
        super().handle_outgoing_message(stream, outgoing_msg)

    def _answered(self, msg_list: list[Any]) -> None:
        with_identities = [bytes(part) for part in msg_list]
        try:
            _, fed = self.session.feed_identities(with_identities)
            parts: list[Any] = list(fed)
            # [signature, header, parent header, metadata, content, buffers...]
            if b"execute_reply" not in parts[1]:
                return
            parent = self.session.unpack(parts[2])
        except Exception:
            return
        unanswered(self.kernel_manager).pop(str(parent.get("msg_id")), None)
