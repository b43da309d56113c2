"""A real ipykernel driven as a notebook drives it: the host of ``%herd`` magics.

:class:`HostKernel` starts a python3 kernel with jupyter_client, executes cells
and collects what the notebook would show, each output with the time it
arrived (to tell streamed output from output delivered at the end).
"""

from __future__ import annotations

import dataclasses
import queue
import time
from pathlib import Path
from typing import Any

from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager, start_new_kernel


@dataclasses.dataclass
class Output:
    """One IOPub output message of a cell."""

    at: float  # seconds since the execute request
    type: str
    content: dict[str, Any]

    @property
    def text(self) -> str:
        if self.type == "stream":
            return str(self.content["text"])
        if self.type == "error":
            return f"{self.content['ename']}: {self.content['evalue']}"
        return str(self.content.get("data", {}).get("text/plain", ""))


@dataclasses.dataclass
class Cell:
    """What one executed cell showed."""

    status: str
    reply: dict[str, Any]
    outputs: list[Output]
    prompts: list[dict[str, Any]]

    def stream(self, name: str = "stdout") -> str:
        return "".join(
            o.text for o in self.outputs if o.type == "stream" and o.content["name"] == name
        )

    def of(self, kind: str) -> list[Output]:
        return [o for o in self.outputs if o.type == kind]


class HostKernel:
    """A python3 kernel, started in ``cwd``; ``run`` executes a cell."""

    def __init__(self, cwd: Path | str) -> None:
        self.manager: KernelManager
        self.client: BlockingKernelClient
        self.manager, self.client = start_new_kernel(kernel_name="python3", cwd=str(cwd))

    def run(
        self,
        code: str,
        *,
        stdin: list[str] | None = None,
        interrupt_after: float | None = None,
        timeout: float = 60.0,
    ) -> Cell:
        """Execute ``code`` as a notebook cell.

        :param stdin: answers to the cell's ``input()`` prompts, in order; the
            prompts beyond them go unanswered (``None``: the cell may not prompt,
            as under nbconvert).
        :param interrupt_after: press the stop button after this many seconds.
        """
        client = self.client
        start = time.monotonic()
        msg_id = client.execute(code, allow_stdin=stdin is not None)
        answers = list(stdin or [])
        outputs: list[Output] = []
        prompts: list[dict[str, Any]] = []
        interrupted = interrupt_after is None
        while True:
            elapsed = time.monotonic() - start
            if elapsed > timeout:
                raise AssertionError(f"cell did not finish in {timeout}s: {code!r}")
            if not interrupted and elapsed > interrupt_after:  # type: ignore[operator]
                self.manager.interrupt_kernel()
                interrupted = True
            if stdin is not None:
                try:
                    request = client.get_stdin_msg(timeout=0.005)
                except queue.Empty:
                    pass
                else:
                    prompts.append(request["content"])
                    if answers:  # else: never answered (until an interrupt)
                        client.input(answers.pop(0))
            try:
                msg = client.get_iopub_msg(timeout=0.02)
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind = msg["msg_type"]
            if kind == "status" and msg["content"]["execution_state"] == "idle":
                break
            if kind not in ("status", "execute_input"):
                outputs.append(Output(time.monotonic() - start, kind, msg["content"]))
        while True:  # the reply to this request (a timed-out earlier one may be queued)
            message = client.get_shell_msg(timeout=30)
            if message["parent_header"].get("msg_id") == msg_id:
                break
        reply = message["content"]
        return Cell(reply["status"], reply, outputs, prompts)

    def ok(self, code: str, **options: Any) -> Cell:
        """:meth:`run`, asserting the cell succeeded."""
        cell = self.run(code, **options)
        assert cell.status == "ok", (code, [o.text for o in cell.outputs])
        return cell

    def shutdown(self) -> None:
        """Shut the kernel down the way Jupyter does (a request, then a kill)."""
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=False)

    @property
    def pid(self) -> int:
        provisioner: Any = self.manager.provisioner
        return int(provisioner.process.pid)
