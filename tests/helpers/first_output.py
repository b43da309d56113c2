"""A notebook's very first cell, as a client that does not wait for the kernel.

JupyterLab opens a session and sends its first ``execute_request`` as soon as the
kernel's WebSocket is open, without a ``kernel_info_request`` of its own first:
the server nudges the kernel when the WebSocket opens, so that IOPub is
subscribed before the cell runs. A kernel whose IOPub is not yet connected
replies ``ok`` on the shell channel, but what the cell printed is lost.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

from jupyter_client.session import Session
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from tests.helpers.jupyter import TOKEN, Server
from tests.helpers.kernel_ws import KernelWS

CELL = "print('hello')"


@dataclass
class FirstCell:
    """What a client saw of a new notebook's first cell."""

    status: str | None  # the execute_reply's status; None: no reply in time
    execution_count: int | None
    printed: str  # stream output of the cell on IOPub before its idle status
    idle: bool  # whether IOPub said idle for the cell
    seconds: float  # from the session's POST to the idle status (or the timeout)
    session_id: str  # the session opened, for the caller to shut down

    @property
    def output_lost(self) -> bool:
        """The reply came back ``ok``, but not what the cell printed."""
        return self.status == "ok" and "hello" not in self.printed


async def connect(server: Server, kernel_id: str, timeout: float) -> KernelWS:
    """:meth:`KernelWS.connect`, with ``timeout`` for the upgrade: a stock server
    answers it once the kernel it just started is up, which on a busy machine
    takes longer than ``KernelWS``'s 10 s."""
    session = Session(session=uuid.uuid4().hex, username="herd-test")
    url = server.base.replace("http", "ws", 1) + (
        f"/api/kernels/{kernel_id}/channels?session_id={session.session}"
    )
    request = HTTPRequest(
        url,
        headers={"Authorization": f"token {TOKEN}"},
        connect_timeout=timeout,
        request_timeout=timeout,
    )
    return KernelWS(await websocket_connect(request), session)


async def first_cell(server: Server, path: str, *, timeout: float = 60) -> FirstCell:
    """Open ``path`` as a notebook, run :data:`CELL` as the first message over its
    kernel's WebSocket (the session is left open).

    ``timeout`` bounds the upgrade (a server answers it once the kernel is up) and
    the cell: what is measured is lost output, not speed. In CI, beside the upstream
    suites, a stock server once took over 30 s to start a kernel."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    body = {"path": path, "name": path, "type": "notebook", "kernel": {"name": "python3"}}
    model = await asyncio.to_thread(server.json, "/api/sessions", method="POST", body=body)
    seen = FirstCell(None, None, "", False, 0.0, model["id"])
    ws = await connect(server, model["kernel"]["id"], timeout)
    try:
        msg_id = ws.send(
            "shell",
            "execute_request",
            {"code": CELL, "silent": False, "store_history": True, "allow_stdin": False},
        )
        printed: list[str] = []
        deadline = started + timeout
        while seen.status is None or not seen.idle:
            try:
                msg = await ws.recv(max(deadline - loop.time(), 0.01))
            except TimeoutError:
                break
            if msg is None:
                break
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind = msg["msg_type"]
            if kind == "stream" and not seen.idle:
                printed.append(msg["content"]["text"])
            elif kind == "status" and msg["content"]["execution_state"] == "idle":
                seen.idle = True
            elif kind == "execute_reply":
                seen.status = msg["content"]["status"]
                seen.execution_count = msg["content"].get("execution_count")
                # A reply without an idle status (IOPub lost): not for long.
                deadline = min(deadline, loop.time() + 5)
        seen.printed = "".join(printed)
        seen.seconds = loop.time() - started
    finally:
        await ws.close()
    return seen
