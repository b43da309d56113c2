"""Shared helpers for herd's tests: the worker command and deadline-based waiting."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import herd

WORKER = str(Path(__file__).with_name("worker.py"))
WORKER_CMD: Sequence[str] = (sys.executable, WORKER, "{port}")


def factory(**kwargs: object) -> herd.ProcessFactory:
    """A ProcessFactory of the test worker; ``env=`` configures its behaviour."""
    kwargs.setdefault("start_timeout", 15.0)
    return herd.ProcessFactory(list(WORKER_CMD), **kwargs)  # type: ignore[arg-type]


async def wait_until(
    predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition"
) -> None:
    """Poll ``predicate`` until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)


def wait_until_sync(
    predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition"
) -> None:
    """:func:`wait_until` for code outside an event loop."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def tagged_processes(tag: str) -> list[int]:
    """PIDs of live processes whose environment carries ``HERD_TEST_TAG=tag``."""
    needle = f"HERD_TEST_TAG={tag}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if needle in f.read().split(b"\0") and pid_alive(int(name)):
                    found.append(int(name))
        except OSError:
            continue
    return found


def stop_process(proc: subprocess.Popen[Any], sig: int, grace: float) -> None:
    """Send ``sig`` to ``proc`` if it runs, wait ``grace`` seconds, then SIGKILL it."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
