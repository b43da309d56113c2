"""Session-routing reverse proxy for HTTP and WebSocket, with two front ends that
behave alike (and share their tests):

- :class:`RelayServer`, ``herd serve``'s: an HTTP/1.1 server on asyncio protocols
  and llhttp that parses request heads and relays bodies and answers as bytes
  (see :mod:`herd.proxy._relay`);
- :class:`ProxyHandler`, a Tornado ``RequestHandler`` for a Tornado application
  (``herd_nb`` mounts it in Jupyter), in a :class:`ProxyServer`; described below.

Each request: find the session key → ``pool.acquire(sid)`` → forward to the
session's worker → close the use. Affinity therefore holds across requests and
connections; a WebSocket holds its use open for its whole life, so the TTL
never evicts a connected session.

Data flow of one HTTP request::

    client ──headers──> prepare(): route, acquire, take an upstream connection,
                                   write the request head upstream
           ──body─────> data_received(): chunk by chunk, awaited (backpressure)
                        <method>(): finish the upstream request, await the response
    worker ──head─────> _Response.headers_received(): status, end-to-end headers
           ──body─────> _Response.data_received(): write + flush (backpressure)
                        on_finish(): connection back to the keep-alive pool, use closed

Nothing buffers a whole body: memory stays flat for a 1 GB upload or download,
and a chunked or ``text/event-stream`` response reaches the client chunk by chunk.
Upstream connections are kept alive per worker, and closed once idle for a while
or once the worker has closed its end (:class:`UpstreamPool`). Tornado's
own HTTP client opens a connection per request, so the upstream side drives
:class:`tornado.http1connection.HTTP1Connection` in client mode directly.

A WebSocket is a tunnel: the client's handshake goes to the worker as it is
(but what :meth:`ProxyHandler.forward_headers` and ``forward_uri`` take out), the
worker's answer (its accept value, its choice of subprotocol) comes back as it is
(plus the handler's default headers, if it sets any), and from then on two
asyncio protocols pass frames as bytes both ways, with pause/resume
backpressure; a header-only frame meter enforces the message size (1009) and
notices a worker that vanishes without a close frame (1011).

Errors are JSON bodies ``{"error": ..., "message": ...}``: no key or an invalid
session ID → 400; a body whose length is ambiguous (two ``Content-Length``
values, ``+3``, ``Content-Length`` with ``Transfer-Encoding``) or a WebSocket
upgrade on a method other than GET → 400, before any worker is involved (and a
WebSocket handshake that :meth:`ProxyHandler.check_websocket_origin` refuses → 403);
body too large → 413; a request head over the server's ``max_header_size`` → 431 (with
:class:`ProxyServer`); pool exhausted → 503 with ``Retry-After``; worker dead,
refused or not starting → 502 (a refused connection sends the worker through the
pool's crash path at once); no response head within ``upstream_timeout`` → 504.
An error answered before the request body was read closes the connection, and
says so (``Connection: close``). A client that disconnects cancels the upstream
request.

Usage::

    app = tornado.web.Application([
        (r"/(.*)", herd.proxy.ProxyHandler, {"pool": pool, "key": herd.proxy.from_header()}),
    ])
    herd.proxy.ProxyServer(app, max_body_size=2**62).listen(8000)
"""

from __future__ import annotations

import logging

from ._handler import ProxyHandler as ProxyHandler
from ._headers import HOP_BY_HOP as HOP_BY_HOP
from ._keys import Headers as Headers
from ._keys import RequestView as RequestView
from ._keys import Route as Route
from ._keys import SessionKey as SessionKey
from ._keys import from_callable as from_callable
from ._keys import from_cookie as from_cookie
from ._keys import from_header as from_header
from ._keys import from_path as from_path
from ._keys import from_query as from_query
from ._relay import RelayServer as RelayServer
from ._relay import RelayUpstreams as RelayUpstreams
from ._relay import RequestHead as RequestHead
from ._server import ProxyServer as ProxyServer
from ._settings import ProxySettings as ProxySettings
from ._settings import TunnelCount as TunnelCount
from ._tunnel import _FrameMeter as _FrameMeter
from ._upstream import KeepAlive as KeepAlive
from ._upstream import UpstreamPool as UpstreamPool

__all__ = [
    "Headers",
    "KeepAlive",
    "ProxyHandler",
    "ProxyServer",
    "ProxySettings",
    "RelayServer",
    "RelayUpstreams",
    "RequestHead",
    "RequestView",
    "Route",
    "SessionKey",
    "TunnelCount",
    "UpstreamPool",
    "from_callable",
    "from_cookie",
    "from_header",
    "from_path",
    "from_query",
]

log = logging.getLogger("herd.proxy")
