"""The three extension points of herd, as :class:`typing.Protocol` classes.

- :class:`Worker` is one running process (or anything that behaves like one) with
  a client object of type ``C`` that talks to it.
- :class:`WorkerFactory` starts workers; :class:`herd.ProcessFactory` starts any
  HTTP binary, ``herd_nb.KernelFactory`` starts Jupyter kernels.
- :class:`SessionRegistry` stores which node owns which session, as claims. The
  default keeps them in memory; a shared registry (Redis) lets several nodes agree
  on owners.

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

import dataclasses
import socket
from collections.abc import Collection
from typing import TYPE_CHECKING, Protocol, TypeVar, runtime_checkable

if TYPE_CHECKING:
    from ._sandbox import SandboxReport

__all__ = [
    "C",
    "Claim",
    "ExitAware",
    "LimitAware",
    "NodeInfo",
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


@dataclasses.dataclass(frozen=True, slots=True)
class Claim:
    """Who owns a session in the fleet: what :meth:`SessionRegistry.claim` returns.

    :param session_id: the session.
    :param node: the ID of the owning node.
    :param address: where the owning node takes requests (``http://host:port``;
        ``""`` for a registry of one node).
    :param epoch: the claim's fencing token: every new claim of any session gets a
        larger one, and a registry refuses to bind, renew or release a claim whose
        epoch is no longer the session's.
    :param mine: whether this node owns it (a claim just made, or one it held).
    :param restarted: for a new claim that replaced a dead node's: why (the
        session's state on that node is gone); else ``None``.
    """

    session_id: str
    node: str
    address: str
    epoch: int
    mine: bool
    restarted: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class NodeInfo:
    """One node of the fleet as the registry last saw it (:meth:`SessionRegistry.fleet`).

    :param node: the node's ID.
    :param address: where it takes requests.
    :param sessions: the sessions it owns, as it last reported.
    :param this: whether it is the node asking.
    """

    node: str
    address: str
    sessions: int
    this: bool = False


@runtime_checkable
class SessionRegistry(Protocol):
    """Which node owns which session, shared by the nodes of a fleet.

    A first acquire of a session **claims** it: atomically, so that two nodes
    racing for one new session agree on one owner. A claim is a lease: the owner
    renews its claims (in batches, never per request) and a node whose lease
    lapsed cannot act as owner any more (:attr:`Claim.epoch` fences it out). The
    pool calls these; the fast path of a session the node owns already makes no
    call at all. :class:`herd.MemoryRegistry` is the registry of one node;
    ``herd.registry.RedisRegistry`` shares one among many.
    """

    @property
    def renew_interval(self) -> float | None:
        """Seconds between :meth:`renew` calls (``None``: no renewal needed)."""
        ...

    async def claim(self, session_id: str) -> Claim:
        """Claim ``session_id`` for this node, or say who owns it.

        :returns: this node's claim (new, or one it holds), or a live node's
            (``mine`` false).
        :raises herd.RegistryUnavailableError: the registry cannot be reached.
        """
        ...

    async def bind(self, claim: Claim, worker_id: str) -> bool:
        """Name the worker that serves ``claim`` (for the fleet's view).

        :returns: ``False`` if the claim is no longer this node's (fenced out).
        """
        ...

    async def release(self, claim: Claim) -> None:
        """End ``claim``: the session is free to be claimed anew. A claim that is
        no longer this node's is left alone."""
        ...

    async def renew(self) -> Collection[str]:
        """Renew every claim this node holds (and its own liveness).

        :returns: the IDs of sessions whose claims this node has lost to another
            node (it must stop serving them).
        """
        ...

    def fleet(self) -> tuple[NodeInfo, ...]:
        """The nodes as last seen by :meth:`renew` (no I/O; empty if unknown)."""
        ...

    async def close(self) -> None:
        """Give up every claim and leave the fleet (a clean shutdown)."""
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
