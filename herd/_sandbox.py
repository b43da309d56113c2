"""Process isolation for workers: what the machine allows, detected once.

Every worker, sandboxed or not, gets

- its own process group (``setsid``), so closing it signals its whole group;
- a parent-death signal (``PR_SET_PDEATHSIG`` = SIGKILL), so it dies with the
  thread that spawned it even if the pool's process is SIGKILLed.

A parent-death signal covers only the direct child. A worker that double-forks
a daemon would leave the daemon behind, so with ``sandbox=True`` the worker also
runs as PID 1 of its own PID namespace (util-linux ``unshare --pid --fork
--kill-child``): when PID 1 dies the kernel kills every process of the
namespace, and ``--kill-child`` ties PID 1 to the ``unshare`` process that
carries the parent-death signal. So::

    pool process --(PDEATHSIG)--> unshare --(--kill-child)--> worker = PID 1 of its namespace
                                                                 \\-- anything it forks, daemons too

As root the worker also gets a mount namespace with its own ``/proc``, so it
cannot see other workers' processes. Without root the namespaces come from an
unprivileged user namespace where the kernel allows it.

The detected level is ``full`` (PID + mount namespaces), ``partial`` (a PID
namespace through a user namespace) or ``none`` (process group and parent-death
signal only), each with the reason; :func:`detect` caches it per process.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from ._cgroups import WorkerCgroup

__all__ = [
    "Sandbox",
    "SandboxLevel",
    "SandboxMode",
    "SandboxReport",
    "detect",
    "launcher",
    "namespaces",
]

log = logging.getLogger("herd.sandbox")

SandboxMode = bool | Literal["required"]
SandboxLevel = Literal["full", "partial", "none"]

_PR_SET_PDEATHSIG = 1


@dataclasses.dataclass(frozen=True)
class SandboxReport:
    """What isolation workers get on this machine, and why not more.

    :param level: ``"full"``, ``"partial"`` or ``"none"``.
    :param reason: a sentence a user can act on.
    :param prefix: the argv prefix that puts a worker into its namespaces.
    """

    level: SandboxLevel
    reason: str
    prefix: tuple[str, ...] = ()


def _probe(prefix: list[str]) -> str | None:
    """Run ``true`` under ``prefix``; ``None`` if it worked, else why not."""
    try:
        done = subprocess.run(
            [*prefix, "true"], capture_output=True, timeout=10, check=False, text=True
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    if done.returncode != 0:
        return done.stderr.strip() or f"exit code {done.returncode}"
    return None


@functools.cache
def detect() -> SandboxReport:
    """Find out once which namespaces this process can give its workers."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return SandboxReport("none", "util-linux 'unshare' is not installed")
    base = [unshare, "--pid", "--fork", "--kill-child"]
    if os.geteuid() == 0:
        full = [*base, "--mount-proc"]
        why = _probe(full)
        if why is None:
            return SandboxReport("full", "PID and mount namespaces (root)", tuple(full))
        root_why = f"PID namespace refused as root: {why}"
    else:
        root_why = "not root"
    user = [*base, "--user", "--map-root-user", "--mount-proc"]
    why = _probe(user)
    if why is None:
        return SandboxReport(
            "partial", f"{root_why}; PID namespace through a user namespace", tuple(user)
        )
    return SandboxReport("none", f"{root_why}; user namespaces refused: {why}")


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - every Linux libc has prctl
        return None


def namespaces(sandbox: SandboxMode) -> SandboxReport:
    """The namespaces a worker gets in this mode (none with ``sandbox=False``)."""
    if sandbox is False:
        return SandboxReport("none", "disabled (sandbox=False)")
    return detect()


def launcher(
    sandbox: SandboxMode, join: Sequence[str] = ()
) -> tuple[tuple[str, ...], Callable[[], None], SandboxReport]:
    """The argv prefix, the ``preexec_fn`` and the report for one spawn.

    :param join: ``cgroup.procs`` files the child writes itself into before exec,
        so that its program never runs outside its limits.
    :raises herd.SpawnError: ``sandbox="required"`` and no namespace is possible.
    """
    from ._exceptions import SpawnError

    report = namespaces(sandbox)
    if report.level == "none" and sandbox == "required":
        raise SpawnError(f"sandbox='required' but no sandbox is possible: {report.reason}")
    libc = _libc()
    parent = os.getpid()
    files = [os.fsencode(path) for path in join]

    def preexec() -> None:
        # Runs in the child between fork and exec: plain system calls only.
        if libc is not None:
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
        for path in files:  # "0" moves the writing process itself
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)

    return report.prefix, preexec, report


def warn_once(report: SandboxReport) -> None:
    """Log the sandbox level once per process when workers run without namespaces."""
    if report.level != "full" and not _warned.get(report.reason):
        _warned[report.reason] = True
        log.warning("herd sandbox: %s (%s)", report.level, report.reason)


_warned: dict[str, bool] = {}


class Sandbox:
    """The isolation plan shared by every worker of one factory.

    Namespaces and the parent-death signal from :func:`launcher`, cgroup limits
    from :mod:`herd._cgroups`. Factories of any kind of worker (processes,
    Jupyter kernels) use it the same way::

        report = sandbox.check()                # once per spawn: raises or warns
        cgroup = sandbox.cgroup(tag)            # None without limits
        prefix, preexec = sandbox.launch_plan(cgroup)
        Popen([*prefix, *argv], preexec_fn=preexec, start_new_session=True)

    :param mode: ``True``, ``False`` or ``"required"``.
    :raises ValueError: a bad mode or limit.
    """

    def __init__(
        self,
        mode: SandboxMode = True,
        *,
        cpu_limit: float | None = None,
        memory_limit: int | None = None,
        pids_limit: int | None = None,
    ) -> None:
        from ._cgroups import Limits

        if mode not in (True, False, "required"):
            raise ValueError(f"sandbox must be True, False or 'required', not {mode!r}")
        self.mode: SandboxMode = mode
        self.limits = Limits.validated(cpu_limit, memory_limit, pids_limit)
        self._swept = False

    @property
    def report(self) -> SandboxReport:
        """``full``: namespaces, and cgroups for the configured limits; ``partial``:
        part of that; ``none``: process group and parent-death signal only."""
        from ._cgroups import detect as detect_cgroups

        found = namespaces(self.mode)
        level, reasons = found.level, [found.reason]
        if self.limits:
            groups = detect_cgroups()
            if groups.version is None:
                level = "partial" if level == "full" else level
                reasons.append(f"limits NOT enforced: {groups.reason}")
            else:
                reasons.append(f"limits by {groups.reason}")
        return SandboxReport(level, "; ".join(reasons), found.prefix)

    def check(self) -> SandboxReport:
        """The report; raises for ``"required"`` short of full, else warns once.

        :raises herd.SpawnError: ``mode="required"`` and the sandbox is not full.
        """
        from ._exceptions import SpawnError

        report = self.report
        if self.mode == "required" and report.level != "full":
            raise SpawnError(f"sandbox='required' but it is {report.level}: {report.reason}")
        if self.mode is not False:
            warn_once(report)
        return report

    def cgroup(self, tag: str) -> WorkerCgroup | None:
        """A new worker cgroup with the limits (``None`` without limits or cgroups).

        The first call also sweeps the cgroups of pools that were killed.
        """
        from ._cgroups import WorkerCgroup, owner_prefix, sweep_stale
        from ._cgroups import detect as detect_cgroups
        from ._exceptions import SpawnError

        groups = detect_cgroups()
        if not self._swept and groups.version is not None:
            self._swept = True
            for path in sweep_stale(groups):
                log.info("removed stale worker cgroup %s", path)
        if not self.limits or groups.version is None:
            return None
        try:
            return WorkerCgroup(groups, owner_prefix() + tag, self.limits)
        except OSError as exc:
            raise SpawnError(f"cannot create the worker's cgroup: {exc}") from exc

    def launch_plan(
        self, cgroup: WorkerCgroup | None
    ) -> tuple[tuple[str, ...], Callable[[], None]]:
        """The argv prefix and ``preexec_fn`` for one worker process."""
        prefix, preexec, _ = launcher(self.mode, cgroup.procs_files if cgroup else ())
        return prefix, preexec
