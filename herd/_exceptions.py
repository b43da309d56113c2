"""The herd exception tree.

Every error herd raises on purpose derives from :class:`HerdError`::

    HerdError
     +-- InvalidSessionIdError    the session ID is empty, too long or has bad characters
     +-- PoolClosedError          the pool is shutting down or shut down
     +-- PoolExhaustedError       max_workers are busy and the acquire timed out waiting
     +-- WorkerDeadError          the worker pinned to a session died (the Go ErrWorkerDead)
     +-- SpawnError               a worker could not start (binary missing, exited, never healthy)
     +-- RegistryUnavailableError the shared session registry (Redis) cannot be reached
     +-- SessionElsewhereError    another node of the fleet owns the session (forward to it)

Each error carries the context needed to act on it: ``session_id``, ``worker_id``
and, for spawns, the command, the exit code and the tail of the worker's output.
Bad configuration values are not herd errors: they raise :class:`ValueError` at
construction, as Python does for bad arguments.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "HerdError",
    "InvalidSessionIdError",
    "PoolClosedError",
    "PoolExhaustedError",
    "RegistryUnavailableError",
    "SessionElsewhereError",
    "SpawnError",
    "WorkerDeadError",
]


class HerdError(Exception):
    """Base class of every error herd raises on purpose.

    :param message: what went wrong, in words a user can act on.
    :param session_id: the session concerned, if any.
    :param worker_id: the worker concerned, if any.
    """

    def __init__(
        self, message: str, *, session_id: str | None = None, worker_id: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.session_id = session_id
        self.worker_id = worker_id

    def __str__(self) -> str:
        return self.message


class InvalidSessionIdError(HerdError, ValueError):
    """A session ID is not a non-empty string of allowed characters and length.

    Also a :class:`ValueError`, so code that validates input generically catches it.
    """


class PoolClosedError(HerdError):
    """The pool is shutting down or has shut down and accepts no more work."""


class PoolExhaustedError(HerdError, TimeoutError):
    """Every worker is busy (``max_workers`` reached) and the acquire timed out waiting.

    :param timeout: the seconds the caller waited before giving up.
    """

    def __init__(
        self, message: str, *, session_id: str | None = None, timeout: float | None = None
    ) -> None:
        super().__init__(message, session_id=session_id)
        self.timeout = timeout


class WorkerDeadError(HerdError):
    """The worker serving a session has died; the session has been unpinned.

    The next :meth:`herd.Pool.acquire` of the same session ID gets a fresh worker
    (without the dead worker's in-memory state).

    :param reason: why the worker died, e.g. ``"exited with code 1"``.
    """

    def __init__(
        self,
        message: str,
        *,
        session_id: str | None = None,
        worker_id: str | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message, session_id=session_id, worker_id=worker_id)
        self.reason = reason


class SpawnError(HerdError):
    """A worker could not be started.

    Raised when the binary is missing, the process exits during start-up, or it
    does not answer its health check within ``start_timeout``. The process, if any,
    has already been killed.

    :param command: the command line that was run.
    :param exit_code: the process's exit code (negative: killed by that signal),
        or ``None`` if it was still running (and then killed) or never started.
    :param output_tail: the last lines the process wrote to stdout/stderr.
    """

    def __init__(
        self,
        message: str,
        *,
        command: Sequence[str] = (),
        exit_code: int | None = None,
        output_tail: Sequence[str] = (),
        worker_id: str | None = None,
    ) -> None:
        super().__init__(message, worker_id=worker_id)
        self.command = list(command)
        self.exit_code = exit_code
        self.output_tail = list(output_tail)

    def __str__(self) -> str:
        text = self.message
        if self.command:
            text += f"\n  command: {' '.join(self.command)}"
        if self.exit_code is not None:
            text += f"\n  exit code: {self.exit_code}"
        if self.output_tail:
            text += "\n  last output:\n" + "\n".join(f"    {line}" for line in self.output_tail)
        return text


class RegistryUnavailableError(HerdError):
    """The session registry could not be reached (Redis down, a network cut).

    Raised for a *new* session only: sessions this node owns already keep
    working without the registry. The message names the registry (its address,
    without any password).

    :param registry: the registry's address, as shown to users.
    """

    def __init__(self, message: str, *, session_id: str | None = None, registry: str = "") -> None:
        super().__init__(message, session_id=session_id)
        self.registry = registry


class SessionElsewhereError(HerdError):
    """Another live node of the fleet owns the session: a request for it must be
    forwarded there (:mod:`herd.proxy` does). Only a shared registry raises it.

    :param node: the owning node's ID.
    :param address: the address the owning node advertises (``http://host:port``).
    """

    def __init__(self, message: str, *, session_id: str, node: str, address: str) -> None:
        super().__init__(message, session_id=session_id)
        self.node = node
        self.address = address
