"""The proxy's own answers: JSON bodies ``{"error": ..., "message": ...}``.

A :class:`_Failure` raised anywhere while a request is handled becomes one through
:func:`_json_error`; the server's canned answers (written before any handler
exists) are whole responses, from :func:`_canned_error`.
"""

from __future__ import annotations

import json
from typing import Any

from tornado.web import RequestHandler

from .._exceptions import (
    PoolClosedError,
    PoolExhaustedError,
    RegistryUnavailableError,
    SessionElsewhereError,
    SpawnError,
)
from .._pool import Pool
from .._session import Session


class _Failure(Exception):
    """An error to answer with a JSON body."""

    def __init__(self, status: int, error: str, message: str, **headers: str) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.headers = headers


def _error_body(error: str, message: str, session_id: str | None = None) -> str:
    body: dict[str, Any] = {"error": error, "message": message}
    if session_id is not None:
        body["session_id"] = session_id
    return json.dumps(body)


def _json_error(handler: RequestHandler, failure: _Failure, session_id: str | None) -> None:
    handler.clear()
    handler.set_status(failure.status)
    for name, value in failure.headers.items():
        handler.set_header(name.replace("_", "-"), value)
    handler.set_header("Content-Type", "application/json")
    handler.finish(_error_body(failure.error, failure.message, session_id))


def _canned_error(status: bytes, error: str, message: str, *headers: bytes) -> bytes:
    """A whole response, to write to a socket: ``status`` is ``b"503 Service Unavailable"``,
    ``headers`` are more ``b"Name: value"`` lines; the connection then closes."""
    body = _error_body(error, message).encode()
    return b"\r\n".join(
        [
            b"HTTP/1.1 " + status,
            b"Content-Type: application/json",
            b"Connection: close",
            *headers,
            b"Content-Length: %d" % len(body),
            b"",
            body,
        ]
    )


async def acquire_or_fail(
    pool: Pool[Any], session_id: str, timeout: float | None, *, forwards: bool = False
) -> Session[Any]:
    """``pool.acquire``, its errors as the proxy answers them: 503 (exhausted, with
    ``Retry-After``; closed; the registry down) or 502 (the worker could not start).

    :param forwards: the caller forwards requests to other nodes: a session owned
        by another node raises :class:`herd.SessionElsewhereError` for it (else 503).
    """
    try:
        return await pool.acquire(session_id, timeout=timeout)
    except SessionElsewhereError as exc:
        if forwards:
            raise
        raise _Failure(
            503,
            "session_elsewhere",
            f"{exc}: this server does not forward requests to other nodes",
        ) from None
    except RegistryUnavailableError as exc:
        raise _Failure(503, "registry_unavailable", str(exc), Retry_After="1") from None
    except PoolExhaustedError as exc:
        raise _Failure(503, "pool_exhausted", str(exc), Retry_After="1") from None
    except PoolClosedError as exc:
        raise _Failure(503, "pool_closed", str(exc)) from None
    except SpawnError as exc:
        raise _Failure(502, "spawn_failed", exc.message) from None


async def worker_failure(pool: Pool[Any], session: Session[Any], exc: BaseException) -> _Failure:
    """A connection to ``session``'s worker failed with ``exc``: the pool checks the
    worker at once (a dead one goes through the crash path), and the 502 says which."""
    alive = await pool.check_worker(session.worker.id)
    state = "alive but refusing" if alive else "dead"
    return _Failure(
        502,
        "worker_unavailable",
        f"worker {session.worker.id} of session {session.session_id!r} is {state}: {exc}",
    )
