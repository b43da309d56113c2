"""Session handles: one use of a session, and the end of a session.

A *session* is a session ID pinned to one worker until it is released, evicted
by TTL or its worker dies. A :class:`Session` object is one *use* of it, made
by :meth:`herd.Pool.acquire`: closing it (:meth:`Session.close`, or leaving
``async with``) ends that use and keeps the pin; :meth:`Session.release` ends the
whole session. While any use is open the session is never evicted.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Awaitable, Callable, Generator
from types import TracebackType
from typing import Any, Generic, Protocol

from ._exceptions import InvalidSessionIdError, WorkerDeadError
from ._protocols import C, Claim, Worker

__all__ = [
    "MAX_SESSION_ID_LENGTH",
    "AcquireContext",
    "Session",
    "session_tag",
    "validate_session_id",
]

MAX_SESSION_ID_LENGTH = 256
_SESSION_ID = re.compile(rf"[A-Za-z0-9_.~:@+=-]{{1,{MAX_SESSION_ID_LENGTH}}}")
_DOT_SEGMENTS = frozenset({".", ".."})


# Per process: a tag cannot be turned back into its ID by hashing guesses, even
# for IDs that are easy to guess ("alice"), nor matched across processes.
_TAG_KEY = os.urandom(16)


def session_tag(session_id: str) -> str:
    """A short tag for ``session_id``, safe to log: ``"s-"`` and 10 hex digits.

    A session ID is a bearer credential (whoever presents it reaches the
    session's worker), so herd's logs and its unauthenticated stats show this
    tag instead: the same ID always gets the same tag within one process, and
    the tag cannot be turned back into the ID (a keyed BLAKE2b hash, with a key
    drawn at random when the process starts).

    >>> session_tag("alice") == session_tag("alice") != session_tag("bob")
    True
    """
    digest = hashlib.blake2b(session_id.encode(), key=_TAG_KEY, digest_size=5)
    return "s-" + digest.hexdigest()


def validate_session_id(session_id: object) -> str:
    """Return ``session_id`` if it is a valid session ID, else raise.

    Valid: 1 to 256 characters from ``A-Z a-z 0-9 _ . ~ : @ + = -`` (UUIDs,
    JWT-like tokens, ``user@host``, ``tenant:42``), except ``.`` and ``..``. No
    ``/``, whitespace or control characters, and no relative path segment, so an ID
    is safe in a URL path segment, a header, a log line and a Redis key.

    :raises herd.InvalidSessionIdError: with the reason.
    """
    if (
        type(session_id) is str
        and _SESSION_ID.fullmatch(session_id)
        and session_id not in _DOT_SEGMENTS
    ):
        return session_id
    if not isinstance(session_id, str):
        why = f"must be a str, not {type(session_id).__name__}"
    elif not session_id:
        why = "must not be empty"
    elif session_id in _DOT_SEGMENTS:
        # A URL resolver or a client removes these from a path (RFC 3986 §5.2.4),
        # so /{sid}/... would not reach the session it names.
        why = "is a relative path segment"
    elif len(session_id) > MAX_SESSION_ID_LENGTH:
        why = f"is {len(session_id)} characters long (at most {MAX_SESSION_ID_LENGTH})"
    else:
        bad = next(ch for ch in session_id if not _SESSION_ID.fullmatch(ch))
        why = f"contains {bad!r} (allowed: letters, digits and _ . ~ : @ + = -)"
    shown = session_id
    if isinstance(session_id, str) and len(session_id) > 40:
        shown = session_id[:40] + "..."
    raise InvalidSessionIdError(f"invalid session ID {shown!r}: {why}")


class _Owner(Protocol):
    """What a session's uses report to: the pool's session table."""

    def _end_use(self, pin: _Pin[Any], /) -> None:
        """One use of ``pin`` closed."""

    async def _end_session(self, pin: _Pin[Any], /) -> None:
        """End the session of ``pin`` (if it is still the session's pin)."""


class _Pin(Generic[C]):
    """A session pinned to a worker, for as long as the session lives."""

    __slots__ = (
        "claim",
        "death",
        "ended",
        "last_active",
        "owner",
        "restarted",
        "session_id",
        "used",
        "uses",
        "worker",
    )

    def __init__(self, session_id: str, worker: Worker[C], owner: _Owner, now: float) -> None:
        self.session_id = session_id
        self.worker = worker
        self.owner = owner
        self.uses = 0  # open Session objects; > 0 means never evicted
        self.used = False  # a caller got a Session of it (else every caller gave up)
        self.last_active = now  # when the last use ended (or the pin was made)
        self.ended = False  # released, evicted or crashed: no new uses
        self.death: str | None = None  # why the worker died, if that ended the pin
        self.claim: Claim | None = None  # the registry's claim, once made
        self.restarted: str | None = None  # why the session's state was lost, for its next use


class Session(Generic[C]):
    """One use of a session, pinned to :attr:`worker`.

    >>> async with pool.acquire("user-42") as session:   # doctest: +SKIP
    ...     reply = await session.worker.client.get("/")

    """

    # Only the pin: at 10,000 live sessions every extra object an acquire
    # touches is a cache miss, and the fast path is what users feel.
    __slots__ = ("_closed", "_pin", "restarted")

    def __init__(self, pin: _Pin[C]) -> None:
        self._pin = pin
        self._closed = False
        #: On the first use of a session that had to start over on a fresh worker
        #: (its worker died, or the node that owned it did): why. ``None`` on
        #: every other use. herd's proxy passes it on as ``Herd-Session-Restarted``.
        self.restarted: str | None = None

    @property
    def session_id(self) -> str:
        """The session's ID."""
        return self._pin.session_id

    @property
    def worker(self) -> Worker[C]:
        """The worker pinned to the session (``.id``, ``.address``, ``.client``, ``.pid``)."""
        return self._pin.worker

    @property
    def closed(self) -> bool:
        """Whether this use has ended."""
        return self._closed

    @property
    def ended(self) -> bool:
        """Whether the session itself has ended (released, evicted or its worker died)."""
        return self._pin.ended

    def check(self) -> None:
        """Raise if the worker of this session has died since the session was acquired.

        For holders of long uses (a WebSocket, a stream) that want to stop at once.

        :raises herd.WorkerDeadError: with ``session_id``, ``worker_id`` and ``reason``.
        """
        if self._pin.death is not None:
            raise WorkerDeadError(
                f"worker {self.worker.id} of session {self.session_id!r} died ({self._pin.death})",
                session_id=self.session_id,
                worker_id=self.worker.id,
                reason=self._pin.death,
            )

    def close_nowait(self) -> None:
        """End this use without awaiting (for synchronous callbacks); idempotent."""
        if not self._closed:
            self._closed = True
            self._pin.owner._end_use(self._pin)

    async def close(self) -> None:
        """End this use; the session stays pinned to its worker. Idempotent.

        The session's idle clock (for ``ttl``) starts when its last use ends.
        """
        self.close_nowait()

    async def release(self) -> None:
        """End this use and the whole session: unpin it from its worker. Idempotent.

        The worker is recycled for other sessions, or killed if the pool has
        ``worker_reuse=False``. A session ID acquired again afterwards gets a
        worker from scratch. If the session was already re-pinned to a new
        worker after a crash, this old handle leaves the new pin alone.
        """
        self.close_nowait()
        await self._pin.owner._end_session(self._pin)

    async def __aenter__(self) -> Session[C]:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close_nowait()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        # The tag, not the ID: a repr ends up in logs and tracebacks, and the ID
        # is a bearer credential.
        return f"<Session {session_tag(self.session_id)} on {self.worker.id} ({state})>"


class AcquireContext(Generic[C]):
    """What :meth:`herd.Pool.acquire` returns: await it, or use it with ``async with``.

    ``session = await pool.acquire(sid)`` gives a :class:`Session` that you close
    yourself; ``async with pool.acquire(sid) as session:`` closes it on exit.
    """

    __slots__ = ("_make", "_session")

    def __init__(self, make: Callable[[], Awaitable[Session[C]]]) -> None:
        self._make = make
        self._session: Session[C] | None = None

    def __await__(self) -> Generator[Any, None, Session[C]]:
        return self._make().__await__()

    async def __aenter__(self) -> Session[C]:
        self._session = await self._make()
        return self._session

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            self._session.close_nowait()
