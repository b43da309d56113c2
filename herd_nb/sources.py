"""Where the magics and the dashboard read pools from: one protocol, three places.

- :class:`PoolSource`: a :class:`herd.Pool` in this process (``%herd start``);
- :class:`ServerSource`: the pools of a Jupyter server running herd_nb
  (``%herd connect``), through its authenticated ``{base_url}herd/api/`` routes;
- :class:`GatewaySource`: a ``herd serve`` gateway, through its stats route
  (read only: the gateway has no route that ends a session).

Each gives :class:`herd.PoolStats` per pool name, so what reads them does not
care where a pool runs. HTTP goes through Tornado's client on the running
event loop: nothing here blocks the kernel.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

import herd

__all__ = [
    "GatewaySource",
    "PoolSource",
    "ServerSource",
    "Source",
    "SourceError",
    "as_source",
    "stats_from_dict",
]


class SourceError(herd.HerdError):
    """A source cannot be read (server gone, refused, not herd), or refused a request."""


@runtime_checkable
class Source(Protocol):
    """Pools to show and act on.

    Implementers answer from the source's current state; a source that is gone
    for good (its pool stopped, its server shut down) raises
    :class:`SourceError` from :meth:`pools`, and whoever polls it stops.
    """

    #: A short name for titles ("local pool", "http://127.0.0.1:8888/").
    label: str
    #: Whether :meth:`release` can end sessions here.
    can_release: bool

    async def pools(self) -> dict[str, herd.PoolStats]:
        """The stats of every pool, by name."""
        ...

    async def release(self, session_id: str) -> None:
        """End a session (its worker is recycled or killed)."""
        ...


class PoolSource:
    """A pool of this process."""

    can_release = True

    def __init__(self, pool: herd.Pool[Any], name: str = "local") -> None:
        self.pool = pool
        self.name = name
        self.label = f"{name} pool"

    async def pools(self) -> dict[str, herd.PoolStats]:
        if self.pool.state in (herd.PoolState.CLOSED, herd.PoolState.CLOSING):
            raise SourceError(f"the {self.name} pool has stopped")
        return {self.name: self.pool.stats()}

    async def release(self, session_id: str) -> None:
        if session_id not in self.pool.sessions():
            raise SourceError(f"no session {session_id!r} in the {self.name} pool")
        await self.pool.release(session_id)


class _HTTPSource:
    def __init__(self, url: str, token: str | None = None, *, timeout: float = 10.0) -> None:
        self.url = url if url.endswith("/") else url + "/"
        self.token = token
        self.timeout = timeout
        self.label = self.url

    async def _fetch(self, path: str, method: str = "GET") -> Any:
        headers = {"Authorization": f"token {self.token}"} if self.token else {}
        request = HTTPRequest(
            urllib.parse.urljoin(self.url, path),
            method=method,
            headers=headers,
            request_timeout=self.timeout,
            allow_nonstandard_methods=True,
        )
        try:
            response = await AsyncHTTPClient().fetch(request)
        except HTTPClientError as exc:
            detail = ""
            if exc.response is not None and exc.response.body:
                detail = _message(exc.response.body)
            raise SourceError(f"{method} {request.url}: {exc.code} {detail}".rstrip()) from None
        except OSError as exc:
            raise SourceError(f"{self.url} cannot be reached: {exc}") from None
        return json.loads(response.body) if response.body else None


class ServerSource(_HTTPSource):
    """A Jupyter server with herd_nb (``url`` is its base URL, with the base path)."""

    can_release = True

    async def pools(self) -> dict[str, herd.PoolStats]:
        body = await self._fetch("herd/api/stats")
        return {name: stats_from_dict(row) for name, row in body["pools"].items()}

    async def sessions(self) -> list[dict[str, str]]:
        """Every pinned session: ``{"id", "pool", "worker"}``."""
        body = await self._fetch("herd/api/sessions")
        return list(body["sessions"])

    async def release(self, session_id: str) -> None:
        herd.validate_session_id(session_id)
        await self._fetch(f"herd/api/sessions/{urllib.parse.quote(session_id)}", "DELETE")


class GatewaySource(_HTTPSource):
    """A ``herd serve`` gateway (``url`` is where it listens)."""

    can_release = False

    def __init__(
        self, url: str, token: str | None = None, *, stats_path: str = "/herd/stats"
    ) -> None:
        super().__init__(url, token)
        self.stats_path = stats_path.lstrip("/")

    async def pools(self) -> dict[str, herd.PoolStats]:
        return {"gateway": stats_from_dict(await self._fetch(self.stats_path))}

    async def release(self, session_id: str) -> None:
        raise SourceError("herd serve has no route that ends a session")


def as_source(source: object) -> Source:
    """A :class:`Source` for a pool, a source, or a URL (a ``herd serve`` gateway)."""
    if isinstance(source, herd.Pool):
        return PoolSource(source)
    if isinstance(source, str):
        return GatewaySource(source)
    if isinstance(source, Source):
        return source
    raise TypeError(f"not a pool, a source or a URL: {source!r}")


def stats_from_dict(row: Mapping[str, Any]) -> herd.PoolStats:
    """:class:`herd.PoolStats` back from :meth:`herd.PoolStats.as_dict` (JSON)."""
    fields = dict(row)
    fields["node"] = herd.NodeStats(**fields["node"])
    fields["workers"] = tuple(herd.WorkerStats(**w) for w in fields.get("workers", ()))
    fields["recent_crashes"] = tuple(herd.CrashInfo(**c) for c in fields.get("recent_crashes", ()))
    known = {f for f in herd.PoolStats.__dataclass_fields__}
    return herd.PoolStats(**{k: v for k, v in fields.items() if k in known})


def _message(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body[:200].decode(errors="replace")
    if isinstance(data, dict):
        return str(data.get("message") or data.get("reason") or data.get("error") or "")
    return ""
