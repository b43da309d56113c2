"""Process-tree lookups straight from /proc, cheap enough for every stats call."""

from __future__ import annotations

import os

__all__ = ["children", "descendants"]


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (of all its threads); empty if it is gone."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    found: list[int] = []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found.extend(int(k) for k in f.read().split())
        except (OSError, ValueError):
            continue
    return found


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, depth first."""
    found: list[int] = []
    stack = [pid]
    while stack:
        kids = children(stack.pop())
        found.extend(kids)
        stack.extend(kids)
    return found


def with_environ(entry: str) -> list[int]:
    """PIDs of processes whose environment holds ``entry`` (``"NAME=value"``).

    Finds what a worker started even after it double-forked out of the worker's
    tree and process group, as long as it kept the environment it inherited.
    """
    needle = entry.encode()
    me = os.getpid()
    found: list[int] = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(name))
        except OSError:
            continue
    return found
