"""Run one cell on a kernel and hand its output on as events, as it happens.

Shared by ``%%herd`` (events become the cell's own output) and the server's
``POST herd/api/sessions/{id}/execute`` route (events become NDJSON lines)::

    client (AsyncKernelClient) --execute_request--> kernel
        shell:  execute_reply ----------+
        iopub:  stream, display_data,   +--> run_cell() --> on_event({"type": ...})
                execute_result, error,  |
                status idle ------------+
        stdin:  input_request ----------+--> on_input(prompt, password) -> input_reply

An event is the Jupyter message's content with its ``msg_type`` as ``"type"``
(``stream``, ``display_data``, ``update_display_data``, ``clear_output``,
``execute_result``, ``error``, ``input_request``), and the last one is
``{"type": "done", "status": "ok" | "error" | "aborted", "execution_count": N,
"duration": seconds}``. The cell is over when the kernel has both replied on
shell and said ``idle`` on IOPub for it, so no output arrives after ``done``.

Cancelling :func:`run_cell` (the notebook's stop button cancels the running
cell; a client of the route that goes away) interrupts the kernel instead of
abandoning it: the cell ends with the kernel's own ``KeyboardInterrupt`` and
the session's state is kept. A kernel that dies during the cell ends it with
:class:`KernelDiedError`, never a hang.
"""

from __future__ import annotations

import asyncio
import queue
import time
from collections.abc import Awaitable, Callable
from typing import Any

import zmq
import zmq.asyncio
from jupyter_client.asynchronous.client import AsyncKernelClient

__all__ = ["OUTPUT_TYPES", "Event", "InterruptIgnoredError", "KernelDiedError", "run_cell"]

Event = dict[str, Any]

#: IOPub message types that are output of the cell (everything else is ignored).
OUTPUT_TYPES = frozenset(
    {"stream", "display_data", "update_display_data", "clear_output", "execute_result", "error"}
)

# How often a silent kernel is checked for being alive (seconds); also the
# longest a stop button waits in a kernel whose signal landed on another thread.
_ALIVE_EVERY = 0.1
# How long an interrupted cell may take to end before it is abandoned.
_INTERRUPT_GRACE = 10.0


class KernelDiedError(RuntimeError):
    """The kernel died while the cell ran (or its client's channels were closed)."""


class InterruptIgnoredError(RuntimeError):
    """The cell went on after an interrupt (it caught ``KeyboardInterrupt``); it is
    still running in the kernel, and its output is no longer passed on."""


async def run_cell(
    client: AsyncKernelClient,
    code: str,
    *,
    on_event: Callable[[Event], object],
    on_input: Callable[[str, bool], Awaitable[str | None]] | None = None,
    interrupt: Callable[[], Awaitable[object]] | None = None,
    alive: Callable[[], bool] | None = None,
    store_history: bool = True,
) -> Event:
    """Execute ``code`` with ``client`` and pass each output event to ``on_event``.

    ``client`` must be the only user of its channels meanwhile (a session runs
    one cell at a time; callers serialise).

    :param on_event: called with each event, ``done`` included, in order.
    :param on_input: answers the kernel's ``input()`` (an answer of ``None``
        sends none: the prompt was withdrawn, as by an interrupt); ``None``: the
        kernel is told there is no stdin (``StdinNotImplementedError`` in the cell).
    :param interrupt: interrupts the kernel when this call is cancelled; without
        it, cancelling abandons the cell.
    :param alive: whether the kernel still runs (checked while it is silent).
    :returns: the ``done`` event.
    :raises KernelDiedError: the kernel died before the cell ended.
    :raises InterruptIgnoredError: the cell went on after an interrupt.
    """
    started = time.perf_counter()
    msg_id = client.execute(
        code,
        silent=False,
        store_history=store_history,
        allow_stdin=on_input is not None,
        stop_on_error=True,
    )
    cell = _Cell(client, msg_id, on_event, on_input, alive)
    task = asyncio.ensure_future(cell.run())
    try:
        # Shielded: a cancel interrupts the kernel instead of abandoning the cell.
        # (The read below wakes the loop every _ALIVE_EVERY, which is also what
        # lets ipykernel's SIGINT handler, the stop button, run promptly.)
        reply = await asyncio.shield(task)
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if task.cancelled() and (current is None or not current.cancelling()):
            # Not our cancel: the read was cancelled under us, when the worker
            # closed the client's sockets (the pool saw the kernel exit).
            raise KernelDiedError("the kernel's channels were closed") from None
        if interrupt is None or task.done():
            task.cancel()
            raise
        try:
            # The stop button: interrupt the cell, then let it end on its own
            # (the kernel's KeyboardInterrupt is its last output). A second
            # cancel abandons it.
            cell.interrupted()
            await interrupt()
            async with asyncio.timeout(_INTERRUPT_GRACE):
                reply = await asyncio.shield(task)
        except TimeoutError:
            raise InterruptIgnoredError(
                f"the cell did not stop within {_INTERRUPT_GRACE:g}s of an interrupt"
            ) from None
        finally:
            task.cancel()
        if current is not None:
            current.uncancel()  # handled: the session's task goes on
    done: Event = {
        "type": "done",
        "status": reply.get("status", "error"),
        "execution_count": reply.get("execution_count"),
        "duration": round(time.perf_counter() - started, 6),
    }
    on_event(done)
    return done


class _Cell:
    """The receiving side of one execute request (see :func:`run_cell`)."""

    def __init__(
        self,
        client: AsyncKernelClient,
        msg_id: str,
        on_event: Callable[[Event], object],
        on_input: Callable[[str, bool], Awaitable[str | None]] | None,
        alive: Callable[[], bool] | None,
    ) -> None:
        self.client = client
        self.msg_id = msg_id
        self.on_event = on_event
        self.on_input = on_input
        self.alive = alive
        self._input: asyncio.Task[str | None] | None = None  # a prompt being answered
        self._stopping = asyncio.Event()  # set once the cell is interrupted

    def interrupted(self) -> None:
        """The cell is being interrupted: a pending prompt is withdrawn."""
        self._stopping.set()
        if self._input is not None:
            self._input.cancel()

    async def run(self) -> dict[str, Any]:
        """Pass on the cell's output until it ends; return the shell reply's content."""
        client = self.client
        channels = [client.iopub_channel, client.shell_channel]
        if self.on_input is not None:
            channels.append(client.stdin_channel)
        poller = zmq.asyncio.Poller()
        for channel in channels:
            poller.register(channel.socket, zmq.POLLIN)
        reply: dict[str, Any] | None = None
        idle = False
        while reply is None or not idle:
            ready = dict(await poller.poll(int(_ALIVE_EVERY * 1000)))
            if not ready:
                if self.alive is not None and not self.alive():
                    raise KernelDiedError("the kernel died while the cell ran")
                continue
            for channel in channels:
                if channel.socket not in ready:
                    continue
                while (msg := await _next(channel)) is not None:
                    if msg["parent_header"].get("msg_id") != self.msg_id:
                        continue  # a stale message of an earlier, abandoned cell
                    kind = msg["header"]["msg_type"]
                    content = msg["content"]
                    if channel is client.shell_channel:
                        reply = content
                    elif channel is client.stdin_channel:
                        await self._answer(content)
                    elif kind == "status":
                        idle = content.get("execution_state") == "idle"
                    elif kind in OUTPUT_TYPES:
                        self.on_event({"type": kind, **content})
        return reply

    async def _answer(self, request: dict[str, Any]) -> None:
        assert self.on_input is not None
        if self._stopping.is_set():
            return
        self.on_event({"type": "input_request", **request})
        prompt = self.on_input(request.get("prompt", ""), bool(request.get("password", False)))
        self._input = asyncio.ensure_future(prompt)
        try:
            value = await self._input
        except asyncio.CancelledError:
            if not self._stopping.is_set():
                raise
            return  # the kernel's input() ends with its KeyboardInterrupt
        finally:
            self._input = None
        if value is not None:  # None: the prompt was withdrawn (an interrupt ends it)
            self.client.input(value)


async def _next(channel: Any) -> dict[str, Any] | None:
    """The next message already received on ``channel``, or ``None``."""
    try:
        msg: dict[str, Any] = await channel.get_msg(timeout=0)
    except queue.Empty:
        return None
    return msg
