"""HTTP helpers: the client bound to a worker, and the health probe.

The probe is a single hand-written ``GET`` over an asyncio stream: it runs every
few milliseconds while a worker starts and on every health interval, so it must
cost no more than a connect and a status line, with an exact timeout.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable, Mapping
from typing import Any

from tornado.concurrent import Future
from tornado.httpclient import AsyncHTTPClient, HTTPResponse
from tornado.iostream import IOStream
from tornado.simple_httpclient import SimpleAsyncHTTPClient
from tornado.tcpclient import TCPClient

__all__ = ["HTTPWorkerClient", "connect_socket", "probe"]


class HTTPWorkerClient:
    """An HTTP client bound to one worker's base URL (``http://127.0.0.1:PORT``).

    >>> client = HTTPWorkerClient("127.0.0.1:8000")
    >>> client.url("/api?x=1")
    'http://127.0.0.1:8000/api?x=1'

    Requests use Tornado's :class:`~tornado.httpclient.AsyncHTTPClient`; HTTP
    error statuses are returned, not raised, so callers see the worker's answer.
    """

    def __init__(
        self, address: str, *, open_socket: Callable[[], socket.socket] | None = None
    ) -> None:
        self.address = address
        self.base_url = f"http://{address}"
        self._open_socket = open_socket
        self._http: AsyncHTTPClient | None = None

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
        response = await self._http_client().fetch(
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

    def _http_client(self) -> AsyncHTTPClient:
        if self._open_socket is None:
            return AsyncHTTPClient()  # the loop's shared one
        if self._http is None:
            # A worker in a network of its own: a client whose connections are
            # made from sockets in that namespace.
            http = SimpleAsyncHTTPClient(force_instance=True)
            http.tcp_client = _SocketTCPClient(self._open_socket, resolver=http.resolver)
            self._http = http
        return self._http

    async def get(self, path: str, **kwargs: object) -> HTTPResponse:
        """``GET path``; see :meth:`request`."""
        return await self.request("GET", path, **kwargs)  # type: ignore[arg-type]

    async def post(self, path: str, body: bytes | str = b"", **kwargs: object) -> HTTPResponse:
        """``POST path`` with ``body``; see :meth:`request`."""
        return await self.request("POST", path, body=body, **kwargs)  # type: ignore[arg-type]

    def close(self) -> None:
        """Let go of the client made for a worker with a network of its own."""
        if self._http is not None:
            self._http.close()
            self._http = None

    def __repr__(self) -> str:
        return f"HTTPWorkerClient({self.base_url!r})"


class _SocketTCPClient(TCPClient):
    """A Tornado TCP client whose sockets come from ``open_socket``."""

    def __init__(self, open_socket: Callable[[], socket.socket], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._open = open_socket

    def _create_stream(
        self,
        max_buffer_size: int | None,
        af: socket.AddressFamily,
        addr: tuple[Any, ...],
        source_ip: str | None = None,
        source_port: int | None = None,
    ) -> tuple[IOStream, Future[IOStream]]:
        # TCPClient.connect passes source_ip and source_port as keywords; a worker's
        # socket comes from its namespace, bound by the kernel, so they are unused.
        sock = self._open()
        try:
            stream = IOStream(sock, max_buffer_size=max_buffer_size)
        except BaseException:
            sock.close()
            raise
        return stream, stream.connect(addr)


async def connect_socket(
    host: str, port: int, open_socket: Callable[[], socket.socket] | None = None
) -> socket.socket:
    """A non-blocking TCP socket connected to ``host:port``, made by
    ``open_socket`` (a worker's network namespace) or plainly.

    :raises OSError: the connection was refused or failed; the socket is closed.
    """
    sock = open_socket() if open_socket is not None else socket.socket()
    try:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock


# connect() errors that are this side's shortage, not the worker's answer.
_LOCAL_CONNECT_ERRNOS = frozenset({errno.EADDRNOTAVAIL, errno.ENOBUFS, errno.ENOMEM})


async def probe(
    host: str,
    port: int,
    path: str,
    timeout: float,
    *,
    open_socket: Callable[[], socket.socket] | None = None,
    raise_local: bool = False,
) -> int | None:
    """``GET path`` once; the status code, or ``None`` if nothing answered in time.

    :param open_socket: makes the socket to connect from (a worker's network
        namespace); a plain one if ``None``.
    :param raise_local: raise the :class:`OSError` of a probe that could not be
        made on this side: no socket (``EMFILE``, ``ENFILE``, ``ENOBUFS``, or a
        namespace not there) or no local port (``EADDRNOTAVAIL``). A health check
        must tell "the worker did not answer" (``None``) from "we could not ask".
    """
    try:
        sock = open_socket() if open_socket is not None else socket.socket()
    except OSError:
        if raise_local:
            raise
        return None
    writer: asyncio.StreamWriter | None = None
    try:
        sock.setblocking(False)
        async with asyncio.timeout(timeout):
            try:
                await asyncio.get_running_loop().sock_connect(sock, (host, port))
            except OSError as exc:
                if raise_local and exc.errno in _LOCAL_CONNECT_ERRNOS:
                    raise
                return None
            try:
                reader, writer = await asyncio.open_connection(sock=sock)
                writer.write(
                    f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                    "User-Agent: herd-health\r\nConnection: close\r\n\r\n".encode("latin-1")
                )
                line = await reader.readline()
            except (OSError, asyncio.IncompleteReadError):
                return None
    except TimeoutError:
        return None
    finally:
        if writer is not None:
            writer.close()
        else:
            sock.close()
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return None
    return int(parts[1])
