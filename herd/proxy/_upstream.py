"""Keep-alive connections to the workers, and how to make a new one."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from tornado import iostream

from .._protocols import SocketOpener

log = logging.getLogger("herd.proxy")


class _Kept(Protocol):
    """What a keep-alive pool holds: a connection that can be closed."""

    def close(self) -> None: ...


_K = TypeVar("_K", bound=_Kept)


class KeepAlive(Generic[_K]):
    """Idle keep-alive connections to workers, by address: the policy both of herd's
    proxies share (:class:`UpstreamPool` holds Tornado streams, the relay asyncio
    transports).

    A connection is reused only if it is still usable (:meth:`_usable`: the worker
    left it open) and idle for less than ``max_idle``.

    At most ``per_worker`` idle connections are kept per address, and every
    ``prune_interval`` seconds (while any are kept) :meth:`prune` closes those idle
    for ``max_idle`` or more and those the worker closed: a killed or retired
    worker's connections would otherwise sit in ``CLOSE_WAIT`` for good, since its
    successor listens on another port and nobody asks for the old one again. So
    the pool holds at most ``per_worker`` connections per live worker, and none a
    ``max_idle`` after the traffic stops.

    :param per_worker: idle connections kept per address at most.
    :param max_idle: seconds an idle connection is kept.
    :param prune_interval: seconds between prunes (``0``: none; a connection is then
        checked only when it is taken).
    """

    def __init__(
        self, *, per_worker: int = 32, max_idle: float = 30.0, prune_interval: float = 1.0
    ) -> None:
        if per_worker < 0 or max_idle < 0 or prune_interval < 0:
            raise ValueError("per_worker, max_idle and prune_interval must be >= 0")
        self.per_worker = per_worker
        self.max_idle = max_idle
        self.prune_interval = prune_interval
        # Oldest first; take() takes the newest. An address with none has no key.
        self._idle: dict[str, deque[tuple[float, _K]]] = {}
        self._pruner: asyncio.TimerHandle | None = None  # set while any are kept

    def _usable(self, conn: _K) -> bool:
        """Whether ``conn`` can carry another request (the worker has not closed it)."""
        raise NotImplementedError

    def _closed(self, conn: _K) -> bool:
        """Whether ``conn`` is known closed, checked cheaply (when it is put back)."""
        return not self._usable(conn)

    def idle_count(self) -> int:
        """Idle connections kept, all addresses together."""
        return sum(len(idle) for idle in self._idle.values())

    def idle(self, address: str) -> list[_K]:
        """The idle connections kept to ``address``, oldest first."""
        return [conn for _, conn in self._idle.get(address, ())]

    def addresses(self) -> list[str]:
        """The addresses with idle connections kept."""
        return list(self._idle)

    def take(self, address: str) -> _K | None:
        """A kept connection to ``address`` that is still usable, or ``None``;
        the unusable ones met on the way are closed."""
        idle = self._idle.get(address)
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            since, conn = idle.pop()
            if now - since < self.max_idle and self._usable(conn):
                if not idle:
                    del self._idle[address]
                return conn
            conn.close()
        del self._idle[address]
        return None

    def put(self, address: str, conn: _K) -> None:
        """Keep ``conn`` for the next request to ``address``."""
        idle = self._idle.get(address)
        if len(idle or ()) >= self.per_worker or self._closed(conn):
            conn.close()
            return
        if idle is None:
            idle = self._idle[address] = deque()
        idle.append((time.monotonic(), conn))
        if self._pruner is None:
            self._schedule_prune()

    def prune(self) -> int:
        """Close the idle connections kept ``max_idle`` or longer and those whose
        worker has closed its end (or sent bytes nobody asked for); how many."""
        now = time.monotonic()
        closed = 0
        for address, idle in list(self._idle.items()):
            keep: deque[tuple[float, _K]] = deque()
            for since, conn in idle:
                if now - since < self.max_idle and self._usable(conn):
                    keep.append((since, conn))
                else:
                    conn.close()
                    closed += 1
            if keep:
                self._idle[address] = keep
            else:
                del self._idle[address]
        return closed

    def forget(self, address: str) -> None:
        """Close every idle connection to ``address`` (its worker is gone)."""
        for _, conn in self._idle.pop(address, ()):
            conn.close()

    def close(self) -> None:
        """Close every idle connection (and stop pruning until one is kept again)."""
        for address in list(self._idle):
            self.forget(address)
        if self._pruner is not None:
            self._pruner.cancel()
            self._pruner = None

    def _schedule_prune(self) -> None:
        if self._pruner is not None or not self.prune_interval:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on a loop (a test filling the pool by hand)
            return
        self._pruner = loop.call_later(self.prune_interval, self._prune_tick)

    def _prune_tick(self) -> None:
        self._pruner = None
        closed = self.prune()
        if closed:
            log.debug("closed %d idle upstream connection(s); %d kept", closed, self.idle_count())
        if self._idle:
            self._schedule_prune()


class UpstreamPool(KeepAlive[iostream.IOStream]):
    """Idle keep-alive connections to workers, by address, as Tornado streams (for
    :class:`~herd.proxy.ProxyHandler`); see :class:`KeepAlive` for the policy.

    A connection is reused only if the worker left it open (checked with a
    non-blocking peek when it is taken) and idle for less than ``max_idle``.
    """

    def _usable(self, conn: iostream.IOStream) -> bool:
        return _still_open(conn)

    def _closed(self, conn: iostream.IOStream) -> bool:
        return conn.closed()  # (no syscall on each request: the peek waits for take)

    async def connect(
        self,
        address: str,
        timeout: float,
        open_socket: Callable[[], socket.socket] | None = None,
    ) -> tuple[iostream.IOStream, bool]:
        """A connection to ``address`` and whether it is a reused one.

        :param open_socket: makes a new connection's socket (a worker in a network
            namespace of its own is reachable only from sockets made there).
        :raises OSError: the worker refused or did not answer in time.
        """
        kept = self.take(address)
        if kept is not None:
            return kept, True
        host, _, port = address.rpartition(":")
        sock = open_socket() if open_socket is not None else socket.socket()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stream = iostream.IOStream(sock)
        try:
            await asyncio.wait_for(stream.connect((host, int(port))), timeout)
        except TimeoutError:
            stream.close()
            raise OSError(errno.ETIMEDOUT, f"connecting to {address} timed out") from None
        except iostream.StreamClosedError as exc:
            stream.close()
            cause = exc.real_error if isinstance(exc.real_error, OSError) else None
            raise cause or OSError(errno.ECONNREFUSED, f"{address} refused") from None
        return stream, False


def _socket_maker(worker: object) -> Callable[[], socket.socket] | None:
    """The worker's ``open_socket`` (a worker with a network of its own has one)."""
    return worker.open_socket if isinstance(worker, SocketOpener) else None


def _still_open(stream: iostream.IOStream) -> bool:
    if stream.closed():
        return False
    try:
        stream.socket.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True  # nothing to read: open and quiet, as it should be
    except OSError:
        return False
    return False  # EOF, or stray bytes from an answer nobody asked for: not reusable
