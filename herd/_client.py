"""HTTP helpers: the client bound to a worker, and the health probe.

The probe is a single hand-written ``GET`` over an asyncio stream: it runs every
few milliseconds while a worker starts and on every health interval, so it must
cost no more than a connect and a status line, with an exact timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from tornado.httpclient import AsyncHTTPClient, HTTPResponse

__all__ = ["HTTPWorkerClient", "probe"]


class HTTPWorkerClient:
    """An HTTP client bound to one worker's base URL (``http://127.0.0.1:PORT``).

    >>> client = HTTPWorkerClient("127.0.0.1:8000")
    >>> client.url("/api?x=1")
    'http://127.0.0.1:8000/api?x=1'

    Requests use Tornado's :class:`~tornado.httpclient.AsyncHTTPClient`; HTTP
    error statuses are returned, not raised, so callers see the worker's answer.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self.base_url = f"http://{address}"

    def url(self, path: str) -> str:
        """The absolute URL of ``path`` on this worker."""
        return self.base_url + (path if path.startswith("/") else "/" + path)

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | str | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 30.0,
    ) -> HTTPResponse:
        """Send one request to the worker and return its response.

        :raises tornado.httpclient.HTTPClientError: only for status 599 (no answer:
            connection refused or timeout), never for an HTTP error status.
        """
        if body is None and method in ("POST", "PUT", "PATCH"):
            body = b""
        response = await AsyncHTTPClient().fetch(
            self.url(path),
            method=method,
            body=body,
            headers=dict(headers or {}),
            request_timeout=timeout,
            raise_error=False,
            follow_redirects=False,
        )
        if response.code == 599 and response.error is not None:
            raise response.error
        return response

    async def get(self, path: str, **kwargs: object) -> HTTPResponse:
        """``GET path``; see :meth:`request`."""
        return await self.request("GET", path, **kwargs)  # type: ignore[arg-type]

    async def post(self, path: str, body: bytes | str = b"", **kwargs: object) -> HTTPResponse:
        """``POST path`` with ``body``; see :meth:`request`."""
        return await self.request("POST", path, body=body, **kwargs)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"HTTPWorkerClient({self.base_url!r})"


async def probe(host: str, port: int, path: str, timeout: float) -> int | None:
    """``GET path`` once; the status code, or ``None`` if nothing answered in time."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                "User-Agent: herd-health\r\nConnection: close\r\n\r\n".encode("latin-1")
            )
            line = await reader.readline()
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return None
    finally:
        if writer is not None:
            writer.close()
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return None
    return int(parts[1])
