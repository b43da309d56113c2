"""The three extension points of herd, as :class:`typing.Protocol` classes.

- :class:`Worker` is one running process (or anything that behaves like one) with
  a client object of type ``C`` that talks to it.
- :class:`WorkerFactory` starts workers; :class:`herd.ProcessFactory` starts any
  HTTP binary, ``herd_nb.KernelFactory`` starts Jupyter kernels.
- :class:`SessionRegistry` stores which worker owns which session. The default
  keeps it in memory; a shared registry lets several nodes agree on owners.

Implementations do not subclass these: matching the methods is enough
(``isinstance`` works too, the protocols are runtime-checkable).

A worker or factory may also have optional abilities, each a protocol of its own
that herd checks with ``isinstance``: :class:`ExitAware` (knows at once that its
process has exited), :class:`LimitAware` (tells the cgroup limit it ran into),
:class:`SocketOpener` (is reachable only through sockets it opens, as a worker
with a network namespace of its own) and :class:`SandboxReporting` (a factory
that says what isolation its workers get).
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Protocol, TypeVar, runtime_checkable

if TYPE_CHECKING:
    from ._sandbox import SandboxReport

__all__ = [
    "C",
    "ExitAware",
    "LimitAware",
    "SandboxReporting",
    "SessionRegistry",
    "SocketOpener",
    "Worker",
    "WorkerFactory",
]

C = TypeVar("C", covariant=True)


@runtime_checkable
class Worker(Protocol[C]):
    """One worker: a process the pool pins sessions to.

    Implementers must make :meth:`close` idempotent and safe to call while
    :meth:`healthy` or :meth:`wait` is running, and must never leave a process
    behind once :meth:`close` returns.
    """

    @property
    def id(self) -> str:
        """A stable identifier, unique among the pool's workers."""
        ...

    @property
    def address(self) -> str:
        """Where the worker listens, ``"host:port"`` (empty if it has no socket)."""
        ...

    @property
    def client(self) -> C:
        """An object to talk to the worker (an HTTP client, a kernel client, ...)."""
        ...

    @property
    def pid(self) -> int | None:
        """The worker's process ID, or ``None`` if it has no process of its own."""
        ...

    async def healthy(self) -> bool:
        """Probe the worker once; ``True`` if it answers as expected.

        Called by the pool every ``health_interval``. Must not raise for an
        unhealthy worker and should return within a few seconds. A worker whose
        process runs is declared dead after ``health_failures`` failed probes in a
        row (it may be busy); one that has exited, at once.

        :raises OSError: the probe could not be made on the pool's side (out of
            file descriptors, ``EMFILE``/``ENFILE``, or of buffers or local ports):
            such a probe counts neither for nor against the worker.
        """
        ...

    async def wait(self) -> str:
        """Return as soon as the worker has died, with a reason (``"exited with code 1"``).

        The pool awaits this for every worker so that a crash is noticed at
        once, not only at the next health check. It must also return after
        :meth:`close`.
        """
        ...

    async def close(self) -> None:
        """Stop the worker and everything it started. Idempotent; never raises."""
        ...


@runtime_checkable
class WorkerFactory(Protocol[C]):
    """Starts workers for a :class:`herd.Pool`."""

    async def spawn(self) -> Worker[C]:
        """Start one worker and return it once it is healthy.

        :raises herd.SpawnError: the worker could not be started; nothing of it is
            left running.
        """
        ...


@runtime_checkable
class SessionRegistry(Protocol):
    """A map of session ID to the ID of the worker that owns it.

    The pool writes through it on every pin and unpin, never on the fast path of
    an already-pinned session. All methods are coroutines so that an
    implementation may do I/O (the in-memory one does none).
    """

    async def get(self, session_id: str) -> str | None:
        """The owner of ``session_id``, or ``None``."""
        ...

    async def put(self, session_id: str, worker_id: str) -> None:
        """Record that ``worker_id`` owns ``session_id`` (replacing any owner)."""
        ...

    async def delete(self, session_id: str) -> None:
        """Forget ``session_id``; no error if it is unknown."""
        ...

    async def list(self) -> dict[str, str]:
        """Every session ID with its owner."""
        ...

    async def len(self) -> int:
        """How many sessions are recorded."""
        ...


# -- optional abilities ---------------------------------------------------------------


@runtime_checkable
class ExitAware(Protocol):
    """A worker that knows whether its process still runs.

    A failed health probe of a worker that has exited declares it dead at once,
    instead of after ``health_failures`` probes in a row.
    """

    @property
    def alive(self) -> bool:
        """``False`` once the worker's process has exited."""
        ...


@runtime_checkable
class LimitAware(Protocol):
    """A worker that can tell which of its resource limits it ran into."""

    def limit_breach(self) -> str | None:
        """The limit hit, ``"killed: memory limit 256 MiB"`` or ``"throttled: ..."``;
        ``None`` if none. A reason that starts with ``"killed:"`` is why the worker
        died; any other makes a failed probe final, as for an exited worker."""
        ...


@runtime_checkable
class SocketOpener(Protocol):
    """A worker whose ``address`` is reachable only through sockets it opens
    (a worker in a network namespace of its own). :mod:`herd.proxy` and the
    health probe connect through them."""

    def open_socket(self) -> socket.socket:
        """A new, unconnected TCP socket from which ``address`` is reachable.

        :raises OSError: the socket cannot be made (the worker is starting or gone).
        """
        ...


@runtime_checkable
class SandboxReporting(Protocol):
    """A factory that says what isolation its workers get; the pool copies it into
    :class:`herd.PoolStats` (``sandbox``, ``sandbox_reason``)."""

    @property
    def sandbox_report(self) -> SandboxReport:
        """The level (``"full"``, ``"partial"``, ``"none"``) and the reason."""
        ...
