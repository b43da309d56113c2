"""The sandbox, for anyone writing a :class:`herd.WorkerFactory`.

:class:`herd.ProcessFactory` and ``herd_nb.KernelFactory`` start their workers
through a :class:`Sandbox`; a factory of any other kind of worker does the same::

    from herd.sandbox import WORKER_TAG_VARIABLE, NetNamespace, Sandbox

    sandbox = Sandbox(True, memory_limit=256 << 20, isolation="tenant")
    env[WORKER_TAG_VARIABLE] = tag                  # how herd finds its daemons on close
    launch = await sandbox.launch(name, env, argv=argv, cwd=cwd)   # detects once
    try:
        proc = subprocess.Popen([*launch.prefix, *argv], env=env, cwd=cwd,
                                start_new_session=True)
    except OSError:
        await launch.discard()                      # its cgroup, if it got one
        raise
    netns = NetNamespace(proc.pid) if launch.own_network else None

A worker with a network of its own is reachable only through sockets made in
its namespace: give it an ``open_socket()`` that returns ``netns.socket()`` (the
:class:`herd.SocketOpener` protocol), and herd's probes and proxy use it.

:class:`SandboxReport` says what isolation that gives on this machine and why
not more; expose it as your factory's ``sandbox_report`` (the
:class:`herd.SandboxReporting` protocol) and the pool shows it in its stats.
"""

from __future__ import annotations

from ._cgroups import Limits, WorkerCgroup
from ._netns import NetNamespace
from ._process import TAG_VARIABLE as WORKER_TAG_VARIABLE
from ._sandbox import (
    Isolation,
    Launch,
    Network,
    Sandbox,
    SandboxLevel,
    SandboxMode,
    SandboxReport,
)

__all__ = [
    "WORKER_TAG_VARIABLE",
    "Isolation",
    "Launch",
    "Limits",
    "NetNamespace",
    "Network",
    "Sandbox",
    "SandboxLevel",
    "SandboxMode",
    "SandboxReport",
    "WorkerCgroup",
]
