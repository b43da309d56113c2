"""A Jupyter kernel client over the server's kernel WebSocket, as JupyterLab talks.

Messages are made and signed by jupyter_client's own :class:`Session`; the wire
format is the server's JSON WebSocket protocol (no subprotocol requested).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from typing import Any

from jupyter_client.jsonutil import json_default
from jupyter_client.session import Session
from tornado.httpclient import HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect


class KernelWS:
    """One WebSocket connection to ``/api/kernels/{id}/channels``."""

    def __init__(self, conn: WebSocketClientConnection, session: Session) -> None:
        self.conn = conn
        self.session = session
        self.statuses: list[str] = []  # every execution_state seen on IOPub

    @classmethod
    async def connect(cls, base: str, kernel_id: str, token: str | None) -> KernelWS:
        """Connect (``base`` is ``http://host:port``); raises on a refused upgrade."""
        session = Session(session=uuid.uuid4().hex, username="herd-test")
        url = base.replace("http", "ws", 1) + (
            f"/api/kernels/{kernel_id}/channels?session_id={session.session}"
        )
        headers = {"Authorization": f"token {token}"} if token else {}
        request = HTTPRequest(url, headers=headers, connect_timeout=10)
        conn = await websocket_connect(request)
        return cls(conn, session)

    def send(self, channel: str, msg_type: str, content: dict[str, Any]) -> str:
        msg = self.session.msg(msg_type, content)
        msg["channel"] = channel
        self.conn.write_message(json.dumps(msg, default=json_default))
        return str(msg["header"]["msg_id"])

    async def recv(self, timeout: float = 20) -> dict[str, Any] | None:
        """The next message, or ``None`` once the server closed the connection."""
        raw = await asyncio.wait_for(self.conn.read_message(), timeout)
        if raw is None:
            return None
        msg: dict[str, Any] = json.loads(raw)
        if msg.get("msg_type") == "status":
            self.statuses.append(msg["content"]["execution_state"])
        return msg

    async def execute(self, code: str, timeout: float = 30) -> tuple[dict[str, Any], str]:
        """Run ``code``; its ``execute_reply`` content and everything it printed."""
        msg_id = self.send(
            "shell",
            "execute_request",
            {"code": code, "silent": False, "store_history": True, "allow_stdin": False},
        )
        return await self.reply_to(msg_id, timeout)

    async def reply_to(self, msg_id: str, timeout: float = 30) -> tuple[dict[str, Any], str]:
        """Wait for the reply to ``msg_id`` and for the kernel to go idle after it."""
        printed: list[str] = []
        reply: dict[str, Any] | None = None
        idle = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while reply is None or not idle:
            msg = await self.recv(max(deadline - loop.time(), 0.01))
            if msg is None:
                raise ConnectionError("the server closed the kernel WebSocket")
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind = msg["msg_type"]
            if kind == "stream":
                printed.append(msg["content"]["text"])
            elif kind == "status" and msg["content"]["execution_state"] == "idle":
                idle = True
            elif kind.endswith("_reply"):
                reply = msg["content"]
        return reply, "".join(printed)

    async def wait_for_status(self, state: str, timeout: float = 20) -> None:
        """Read until IOPub says ``state`` (``"dead"``, ``"restarting"``...)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while state not in self.statuses:
            msg = await self.recv(max(deadline - loop.time(), 0.01))
            if msg is None:
                raise ConnectionError(f"closed before status {state!r}")

    async def wait_for_output(self, msg_id: str, text: str, timeout: float = 20) -> None:
        """Read until the request ``msg_id`` prints something containing ``text``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            msg = await self.recv(max(deadline - loop.time(), 0.01))
            if msg is None:
                raise ConnectionError(f"closed before {text!r} was printed")
            if (
                msg.get("parent_header", {}).get("msg_id") == msg_id
                and msg["msg_type"] == "stream"
                and text in msg["content"]["text"]
            ):
                return

    async def close(self) -> None:
        """Close, and wait (briefly) for the server's close so no socket is left open."""
        self.conn.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                while await self.conn.read_message() is not None:
                    pass
        if self.conn.protocol is not None and self.conn.protocol.stream is not None:
            self.conn.protocol.stream.close()
