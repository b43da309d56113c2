"""Per-worker cgroups: CPU, memory and PID limits on cgroup v2 or v1.

Layout: one ``herd`` folder under this process's own cgroup in every hierarchy
used (so workers stay inside whatever limits the pool itself runs under), and a
folder per worker in it, named ``<pool pid>-<pool start time>-<worker tag>``::

    v2: <mount>/<our cgroup>/herd/<name>/{cpu.max, memory.max, pids.max, cgroup.procs}
    v1: <memory mount>/<our cgroup>/herd/<name>/memory.limit_in_bytes ...
        <cpu mount>/...  cpu.cfs_quota_us / cpu.cfs_period_us
        <cpuacct mount>/... cpuacct.usage (for accounting only)
        <pids mount>/...  pids.max

The worker joins its cgroups between fork and exec (it writes ``0``, "myself", to
each ``cgroup.procs``), so its program never runs outside its limits. A folder
whose pool process is gone (by PID and start time) is stale: :func:`sweep_stale`
kills what is left in it and removes it.

v2 is used when the needed controllers are enabled for our cgroup's children,
else v1; detection runs once per process (:func:`detect`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import signal
import time

__all__ = ["Cgroups", "Limits", "WorkerCgroup", "detect", "sweep_stale"]

PERIOD_US = 100_000  # the CFS period the CPU quota is a share of


@dataclasses.dataclass(frozen=True)
class Limits:
    """What a worker may use; ``None`` means no limit."""

    cpu: float | None = None  # cores
    memory: int | None = None  # bytes
    pids: int | None = None  # processes and threads

    @classmethod
    def validated(cls, cpu: object, memory: object, pids: object) -> Limits:
        """Limits from user options (``pids=-1``: none).

        :raises ValueError: a limit that is not a positive number of its kind.
        """
        if cpu is not None and (
            isinstance(cpu, bool) or not isinstance(cpu, int | float) or not 0 < cpu < 1e6
        ):
            raise ValueError(f"cpu_limit must be a number of cores > 0, not {cpu!r}")
        if memory is not None and (
            isinstance(memory, bool) or not isinstance(memory, int) or memory < 1 << 20
        ):
            raise ValueError(f"memory_limit must be bytes (an int) >= 1 MiB, not {memory!r}")
        if pids is not None and (
            isinstance(pids, bool) or not isinstance(pids, int) or pids == 0 or pids < -1
        ):
            raise ValueError(f"pids_limit must be >= 1 or -1 (no limit), not {pids!r}")
        return cls(
            cpu=float(cpu) if cpu is not None else None,
            memory=memory,
            pids=None if pids == -1 else pids,
        )

    def __bool__(self) -> bool:
        return self.cpu is not None or self.memory is not None or self.pids is not None

    def describe_memory(self) -> str:
        assert self.memory is not None
        mib = self.memory / 2**20
        return f"{mib:.0f} MiB" if mib >= 1 else f"{self.memory} bytes"


@dataclasses.dataclass(frozen=True)
class Cgroups:
    """Where herd can create worker cgroups, or why it cannot.

    :param version: ``"v2"``, ``"v1"`` or ``None``.
    :param roots: controller → the ``herd`` folder for it (v2: one folder for all).
    :param reason: what was found, in words.
    """

    version: str | None
    roots: dict[str, str]
    reason: str


def _own_cgroups() -> dict[str, str]:
    """Controller (or ``""`` for v2) → this process's cgroup path."""
    paths: dict[str, str] = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                paths[controller] = path
    return paths


def _mounts() -> list[tuple[str, str, set[str]]]:
    """(mount point, fs type, options) of every cgroup mount."""
    found = []
    with open("/proc/self/mounts") as f:
        for line in f:
            _, point, fstype, options, *_ = line.split()
            if fstype in ("cgroup", "cgroup2"):
                found.append((point, fstype, set(options.split(","))))
    return found


def _writable(path: str) -> bool:
    return os.access(path, os.W_OK)


@functools.cache
def detect() -> Cgroups:
    """Find out once where worker cgroups can go (v2 preferred, then v1)."""
    try:
        own, mounts = _own_cgroups(), _mounts()
    except OSError as exc:
        return Cgroups(None, {}, f"cannot read cgroups: {exc}")
    reasons = []
    for point, fstype, _ in mounts:
        if fstype != "cgroup2":
            continue
        base = os.path.join(point, own.get("", "/").lstrip("/"))
        try:
            with open(os.path.join(base, "cgroup.subtree_control")) as f:
                enabled = set(f.read().split())
            with open(os.path.join(base, "cgroup.controllers")) as f:
                available = set(f.read().split())
        except OSError:
            continue
        wanted = {"cpu", "memory", "pids"}
        if wanted <= enabled and _writable(base):
            return Cgroups("v2", {"": os.path.join(base, "herd")}, f"cgroup v2 at {base}")
        missing = wanted - enabled
        reasons.append(
            f"cgroup v2 at {point}: {', '.join(sorted(missing))} not enabled for children"
            + ("" if wanted <= available else f" (available: {', '.join(sorted(available))})")
        )
    roots: dict[str, str] = {}
    for controller in ("memory", "cpu", "cpuacct", "pids"):
        for point, fstype, options in mounts:
            if fstype == "cgroup" and controller in options:
                base = os.path.join(point, own.get(controller, "/").lstrip("/"))
                if _writable(base):
                    roots[controller] = os.path.join(base, "herd")
                break
    if {"memory", "cpu", "pids"} <= set(roots):
        return Cgroups("v1", roots, "cgroup v1 (memory, cpu, pids hierarchies)")
    if roots:
        reasons.append(f"cgroup v1: only {', '.join(sorted(roots))} writable")
    elif os.geteuid() != 0:
        reasons.append("not root: cgroups are not writable")
    else:
        reasons.append("no writable cgroup v1 memory/cpu/pids hierarchy")
    return Cgroups(None, {}, "; ".join(reasons))


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def owner_prefix() -> str:
    """The name prefix of this process's worker cgroups."""
    return f"{os.getpid()}-{_start_time(os.getpid())}-"


def _kill_and_remove(path: str, timeout: float = 2.0) -> bool:
    """Kill every process left in ``path`` and remove the folder; True if gone."""
    deadline = time.monotonic() + timeout
    while os.path.isdir(path):
        try:
            with open(os.path.join(path, "cgroup.procs")) as f:
                pids = [int(p) for p in f.read().split()]
        except OSError:
            pids = []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        try:
            os.rmdir(path)
        except FileNotFoundError:
            return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)  # the kernel frees a killed task's cgroup shortly after
    return True


def sweep_stale(groups: Cgroups | None = None) -> list[str]:
    """Remove worker cgroups whose pool process is gone; returns what was removed."""
    groups = groups or detect()
    removed = []
    for root in set(groups.roots.values()):
        try:
            names = os.listdir(root)
        except OSError:
            continue
        for name in names:
            path = os.path.join(root, name)
            if not os.path.isdir(path):
                continue
            pid_text, _, rest = name.partition("-")
            start, _, _ = rest.partition("-")
            if pid_text.isdigit() and _start_time(int(pid_text)) == start:
                continue  # its pool is alive
            if _kill_and_remove(path):
                removed.append(path)
    return removed


class WorkerCgroup:
    """One worker's cgroups in every hierarchy used, with its limits set."""

    def __init__(self, groups: Cgroups, name: str, limits: Limits) -> None:
        self.groups = groups
        self.limits = limits
        # Each hierarchy joined costs a migration (a global lock in the kernel): join
        # only those whose limit is set (cpuacct with cpu, for accounting).
        needed = {
            "": bool(limits),
            "memory": limits.memory is not None,
            "cpu": limits.cpu is not None,
            "cpuacct": limits.cpu is not None,
            "pids": limits.pids is not None,
        }
        self.paths = {c: os.path.join(root, name) for c, root in groups.roots.items() if needed[c]}
        for root in {os.path.dirname(path) for path in self.paths.values()}:
            os.makedirs(root, exist_ok=True)
            if groups.version == "v2":
                with contextlib.suppress(OSError):
                    _write(os.path.join(root, "cgroup.subtree_control"), "+cpu +memory +pids")
        created = []
        try:
            for path in set(self.paths.values()):
                os.mkdir(path)
                created.append(path)
            self._apply(limits)
        except OSError:
            for path in created:
                _kill_and_remove(path)
            raise
        #: the files the worker writes itself into before exec
        self.procs_files = [os.path.join(p, "cgroup.procs") for p in set(self.paths.values())]

    def _path(self, controller: str) -> str | None:
        return self.paths.get("" if self.groups.version == "v2" else controller)

    def _apply(self, limits: Limits) -> None:
        v2 = self.groups.version == "v2"
        memory, cpu, pids = self._path("memory"), self._path("cpu"), self._path("pids")
        if limits.memory is not None and memory:
            if v2:
                _write(os.path.join(memory, "memory.max"), str(limits.memory))
                with contextlib.suppress(OSError):
                    _write(os.path.join(memory, "memory.swap.max"), "0")
            else:
                _write(os.path.join(memory, "memory.limit_in_bytes"), str(limits.memory))
                with contextlib.suppress(OSError):  # without swap accounting there is none
                    _write(os.path.join(memory, "memory.memsw.limit_in_bytes"), str(limits.memory))
        if limits.cpu is not None and cpu:
            quota = max(int(limits.cpu * PERIOD_US), 1000)
            if v2:
                _write(os.path.join(cpu, "cpu.max"), f"{quota} {PERIOD_US}")
            else:
                _write(os.path.join(cpu, "cpu.cfs_period_us"), str(PERIOD_US))
                _write(os.path.join(cpu, "cpu.cfs_quota_us"), str(quota))
        if limits.pids is not None and pids:
            _write(os.path.join(pids, "pids.max"), str(limits.pids))

    def _events(self, controller: str, filename: str, key: str) -> int:
        path = self._path(controller)
        if path is None:
            return 0
        try:
            with open(os.path.join(path, filename)) as f:
                for line in f:
                    name, _, value = line.partition(" ")
                    if name == key:
                        return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def oom_kills(self) -> int:
        """How many processes the OOM killer took for the memory limit."""
        return self._events(
            "memory",
            "memory.events" if self.groups.version == "v2" else "memory.oom_control",
            "oom_kill",
        )

    def pids_limit_hits(self) -> int:
        """How many forks failed at the PID limit."""
        return self._events("pids", "pids.events", "max")

    def cpu_seconds(self) -> float | None:
        """CPU time used by the worker's processes so far."""
        if self.groups.version == "v2":
            path = self._path("cpu")
            micros = self._events("cpu", "cpu.stat", "usage_usec") if path else 0
            return micros / 1e6 if path else None
        path = self.paths.get("cpuacct")
        if path is None:
            return None
        try:
            with open(os.path.join(path, "cpuacct.usage")) as f:
                return int(f.read()) / 1e9
        except (OSError, ValueError):
            return None

    def breach(self) -> str | None:
        """The limit a worker ran into, in words, or ``None``."""
        if self.limits.memory is not None and self.oom_kills():
            return f"killed: memory limit {self.limits.describe_memory()}"
        if self.limits.pids is not None and self.pids_limit_hits():
            return f"at its PID limit ({self.limits.pids})"
        return None

    def remove(self) -> None:
        """Kill anything left and remove the cgroups (the worker is gone)."""
        for path in set(self.paths.values()):
            _kill_and_remove(path)


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)
