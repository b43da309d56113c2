"""The proxy's request handler: routing, refusals and hooks; the forwarding itself is
an :class:`~herd.proxy._exchange._Exchange` (HTTP) or a
:class:`~herd.proxy._tunnel._Tunnel` (WebSocket)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from tornado import httputil, iostream
from tornado.web import RequestHandler, stream_request_body

from .._exceptions import SessionElsewhereError
from .._session import Session, session_tag
from ._errors import _Failure, _json_error, acquire_or_fail, worker_failure
from ._exchange import _Exchange
from ._fleet import Node, forward_to, hops, node_unreachable
from ._headers import FORWARDED_HOPS, _end_to_end
from ._keys import Route, find_route
from ._settings import ProxySettings
from ._tunnel import _Tunnel

log = logging.getLogger("herd.proxy")


@stream_request_body
class ProxyHandler(RequestHandler):
    """Forwards HTTP requests and WebSocket connections to the session's worker.

    Mount it with a :class:`ProxySettings` (or its fields as keyword arguments)::

        (r"/(.*)", ProxyHandler, {"settings": ProxySettings(pool=pool)})

    Hooks for a subclass that puts the proxy behind an application's own login
    (herd_nb's ``HerdProxyHandler`` uses them to apply Jupyter's rules); each is
    called on the loop thread, once per request, and does nothing by default:

    - :meth:`set_default_headers` (Tornado's): headers every answer carries, the
      JSON errors and the worker's responses alike (see :meth:`clear`);
    - :meth:`check_websocket_origin`: whether a WebSocket handshake may go on;
    - :meth:`forward_headers` and :meth:`forward_uri`: what of the client's
      request the worker gets (say, minus the application's own credentials).
    """

    #: Default headers (from :meth:`set_default_headers`) that a worker's header of
    #: the same name does not replace but goes alongside: a browser enforces every
    #: Content-Security-Policy it receives, so neither policy can loosen the other.
    ADDITIVE_DEFAULT_HEADERS = frozenset({"Content-Security-Policy"})

    SUPPORTED_METHODS = ("GET", "HEAD", "POST", "DELETE", "PATCH", "PUT", "OPTIONS")

    # Per request state (one handler object per request).
    settings_: ProxySettings
    route: Route | None
    session: Session[Any] | None

    def initialize(self, settings: ProxySettings | None = None, **fields: Any) -> None:
        self.settings_ = settings if settings is not None else ProxySettings(**fields)
        self.route = None
        self.session = None
        self._node: Node | None = None  # the node that owns the session, if another
        self._exchange: _Exchange | None = None  # an HTTP request's, from prepare()
        self._received = 0
        self._chunked_upstream = False
        self._websocket = False
        self._failed = False
        self._client_gone = False  # the client closed its connection (on_connection_close)

    # -- shared: routing and acquiring ---------------------------------------------------

    async def prepare(self) -> None:
        # Everything that can be refused is refused here, before acquire: a bad
        # request never costs a worker (or a spawn) anything.
        try:
            self.route = self._find_route()
            upgrade = self.request.headers.get("Upgrade")
            if upgrade is not None and upgrade.lower() == "websocket":
                if self.request.method != "GET":
                    raise _Failure(
                        400,
                        "bad_upgrade",
                        f"a WebSocket handshake is a GET, not {self.request.method}",
                    )
                if not self.check_websocket_origin():
                    raise _Failure(403, "cross_origin", "Cross origin websockets not allowed")
                self._websocket = True
                return
            self._check_framing()
            # Tornado's default limit is 100 MB; ours is enforced in data_received.
            self.request.connection.set_max_body_size(2**62)  # type: ignore[union-attr]
            await self._locate(self.route)
            await self._start_exchange(self.route)
        except _Failure as failure:
            self._fail(failure, body_unread=True)

    def _find_route(self) -> Route:
        settings = self.settings_
        return find_route(self.request, settings.prefix, settings.key, self.forward_uri)

    # -- hooks ----------------------------------------------------------------------------

    def check_websocket_origin(self) -> bool:
        """Whether this WebSocket handshake may go on to a worker.

        Called by :meth:`prepare` for every WebSocket upgrade (after the session key
        is found, before a worker is acquired); ``False`` answers 403
        ``cross_origin``. Browsers let any page open a WebSocket to any site, with
        that site's cookies, so a subclass whose users log in with a cookie must
        check ``Origin`` here, as Tornado's ``WebSocketHandler.check_origin`` does.
        The default lets every handshake through: the proxy itself has no login.
        """
        return True

    def forward_headers(self, headers: httputil.HTTPHeaders) -> None:
        """Edit, in place, the request headers about to go to the worker.

        Called for every proxied request and every WebSocket handshake, with a copy
        of the client's end-to-end headers and herd's ``X-Forwarded-*`` already
        added. The default forwards them all.
        """

    def forward_uri(self, uri: str) -> str:
        """The path and query string to ask the worker for, given the client's.

        Called once per request, when its :class:`Route` is found (the log lines
        show what it returns). The default forwards ``uri`` as it is.
        """
        return uri

    def _check_framing(self) -> None:
        """Refuse a body whose length a proxy would have to guess; check the size limit.

        RFC 9112 §6.3: an invalid ``Content-Length`` (Tornado joins two headers into
        ``"3,3"``), or one alongside ``Transfer-Encoding``, is a 400 and the end of
        the connection, since where the next request starts is unknown. Tornado
        would refuse some of these too, but only after the head went to a worker.
        """
        headers = self.request.headers
        declared = headers.get("Content-Length")
        encoding = headers.get("Transfer-Encoding")
        if declared is not None:
            if not (declared.isdigit() and declared.isascii()):
                raise _Failure(
                    400, "bad_framing", f"Content-Length must be one decimal number: {declared!r}"
                )
            if encoding is not None:
                raise _Failure(400, "bad_framing", "both Content-Length and Transfer-Encoding")
            limit = self.settings_.max_body_size
            if limit is not None and int(declared) > limit:
                raise _Failure(413, "body_too_large", f"request body over {limit} bytes")
        elif encoding is not None:
            if encoding.lower() != "chunked":  # the only coding HTTP/1.1 requires (as Tornado)
                raise _Failure(400, "bad_framing", f"unsupported Transfer-Encoding: {encoding!r}")
            # Tornado's client chunks POST/PUT/PATCH bodies of unknown length by
            # itself; any other method with a chunked body is framed here.
            self._chunked_upstream = self.request.method not in ("POST", "PUT", "PATCH")

    async def _locate(self, route: Route, *, ask: bool = False) -> None:
        """Acquire the session here (:attr:`session`), or find the node of the fleet
        that owns it (:attr:`_node`). ``ask``: not from what the pool remembers."""
        settings = self.settings_
        pool = settings.pool
        self._node = None
        session = pool.try_acquire(route.session_id)
        if session is not None:  # pinned here: the per-request path looks no further
            self.session = session
            return
        if not ask and FORWARDED_HOPS not in self.request.headers:
            owner = pool.remote_owner(route.session_id)
            if owner is not None:
                self._node = Node.of(owner.node, owner.address)
                return
        try:
            self.session = await acquire_or_fail(
                pool, route.session_id, settings.acquire_timeout, forwards=True
            )
        except SessionElsewhereError as exc:
            self._node = forward_to(exc, hops(self.request.headers))

    def _forget_node(self) -> None:
        """The owner named did not answer: the registry is asked again next time."""
        node, self._node = self._node, None
        assert node is not None
        assert self.route is not None
        self.settings_.upstreams.forget(node.address)
        self.settings_.pool.forget_remote_owner(self.route.session_id)

    def _fail(self, failure: _Failure, *, body_unread: bool = False) -> None:
        """Answer with ``failure`` as JSON, or cut a response already under way short.

        :param body_unread: the request body (if any) is still to come. Tornado then
            closes the connection once the answer is out (it will not read a body
            for nobody), so the answer says ``Connection: close``.
        """
        self._failed = True
        if log.isEnabledFor(logging.DEBUG):
            # What the worker would be asked for (no credentials the handler
            # strips), and the session's tag, never its ID.
            route = self.route
            tag = session_tag(route.session_id) if route else "-"
            message = failure.message
            if route and route.session_id:
                message = message.replace(route.session_id, tag)
            log.debug(
                "%s %s -> %d %s (session %s)",
                self.request.method,
                route.uri if route else "-",
                failure.status,
                message,
                tag,
            )
        if self._exchange is not None and self._exchange.response.started:
            # The head is already out: all we can do is cut the response short.
            self._abort()
            return
        if not self._done():
            if body_unread or failure.status == 413:
                failure.headers["Connection"] = "close"
            _json_error(self, failure, self.route.session_id if self.route else None)
        if (
            failure.status == 413 or failure.error == "bad_framing"
        ) and self.request.connection is not None:
            # The unread body would follow (or its end is unknown); stop reading it.
            self.request.connection.close()  # type: ignore[attr-defined]

    def _abort(self) -> None:
        if self.request.connection is not None:
            self.request.connection.close()  # type: ignore[attr-defined]

    async def _worker_failed(self, exc: BaseException) -> _Failure:
        """A connection to the worker failed: is the worker dead? 502 either way."""
        if self._node is not None:
            node = self._node
            self._forget_node()
            return _Failure(502, "node_failed", f"node {node.id} ({node.address}) failed: {exc}")
        session = self.session
        assert session is not None
        self.settings_.upstreams.forget(session.worker.address)
        return await worker_failure(self.settings_.pool, session, exc)

    # -- HTTP ---------------------------------------------------------------------------

    def _request_headers(self) -> httputil.HTTPHeaders:
        headers = _end_to_end(self.request.headers)
        # Tornado answered 100-continue itself; the body follows without one from the worker.
        headers.pop("Expect", None)
        self._add_forwarded(headers, self.request.protocol)
        self.forward_headers(headers)
        if self._chunked_upstream:
            headers["Transfer-Encoding"] = "chunked"
        return headers

    def _add_forwarded(self, headers: httputil.HTTPHeaders, proto: str) -> None:
        """X-Forwarded-For (appended to), -Proto and -Host, for the worker."""
        remote = self.request.remote_ip or ""
        previous = self.request.headers.get("X-Forwarded-For")
        headers["X-Forwarded-For"] = f"{previous}, {remote}" if previous else remote
        headers["X-Forwarded-Proto"] = proto
        headers["X-Forwarded-Host"] = self.request.headers.get("Host", "")

    def _node_headers(self) -> httputil.HTTPHeaders:
        """The client's request for the node that owns the session: its headers as
        they came (credentials too: the owner authenticates the client again),
        the client first in X-Forwarded-For, one more hop."""
        headers = _end_to_end(self.request.headers)
        headers.pop("Expect", None)
        remote = self.request.remote_ip or ""
        previous = self.request.headers.get("X-Forwarded-For")
        headers["X-Forwarded-For"] = f"{previous}, {remote}" if previous else remote
        headers[FORWARDED_HOPS] = str(hops(self.request.headers) + 1)
        if self._chunked_upstream:
            headers["Transfer-Encoding"] = "chunked"
        return headers

    async def _start_exchange(self, route: Route) -> None:
        method = self.request.method or "GET"
        for attempt in (1, 2):
            node = self._node
            if node is None:
                assert self.session is not None
                start = httputil.RequestStartLine(method, route.uri, "HTTP/1.1")
                worker, headers = self.session.worker, self._request_headers
            else:  # the client's own URI: the owner finds the session by the same key
                start = httputil.RequestStartLine(method, self.request.uri or "/", "HTTP/1.1")
                worker, headers = None, self._node_headers
            self._exchange = _Exchange(
                self.settings_,
                worker,
                start,
                chunked=self._chunked_upstream,
                on_head=self._send_head,
                on_chunk=self._send_chunk,
                address=node.address if node is not None else "",
            )
            try:
                await self._exchange.start(headers)
                return
            except OSError as exc:
                if node is None:
                    raise await self._worker_failed(exc) from None
                self._forget_node()
                if attempt == 2:
                    raise node_unreachable(node, route.session_id, exc) from None
                await self._locate(route, ask=True)  # a dead node's session starts over here
            except iostream.StreamClosedError as exc:
                raise await self._worker_failed(exc) from None

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        if self._failed or self._exchange is None:
            return None
        self._received += len(chunk)
        limit = self.settings_.max_body_size
        if limit is not None and self._received > limit:
            self._fail(_Failure(413, "body_too_large", f"request body over {limit} bytes"))
            return None
        return self._exchange.write(chunk)

    async def _proxy(self) -> None:
        if self._failed or self._done():
            return
        exchange = self._exchange
        assert exchange is not None
        try:
            open_after = await exchange.end()
        except TimeoutError:
            exchange.discard()
            raise _Failure(
                504,
                "upstream_timeout",
                f"worker sent no response within {self.settings_.upstream_timeout:g}s",
            ) from None
        except (iostream.StreamClosedError, httputil.HTTPInputError) as exc:
            exchange.discard()
            if exchange.response.started or self._client_gone:
                self._abort()
                return  # (a client that left says nothing about the worker)
            raise await self._worker_failed(exc) from None
        if self._done():  # the client went away while the response streamed
            return
        if not exchange.response.complete:  # the worker's body ended short: cut ours short too
            exchange.discard()
            self._abort()
            return
        exchange.keep(open_after)
        if not self._client_gone:
            self.finish()

    def _done(self) -> bool:
        """Whether the answer is finished (a call: mypy would take the attribute for
        the ``False`` it was before an ``await``)."""
        # RequestHandler's own flag, with no public reader (Tornado 6.3-6.6.1).
        return self._finished

    def _send_head(
        self, start_line: httputil.ResponseStartLine, headers: httputil.HTTPHeaders
    ) -> None:
        self.set_status(start_line.code, start_line.reason or None)
        headers = _end_to_end(headers)
        location = headers.get("Location")
        if location is not None and self._node is None:  # (a node rewrote it already)
            headers["Location"] = self._rewrite_location(location)
        self._merge_default_headers(headers)
        session = self.session
        if session is not None and session.restarted is not None:
            headers["Herd-Session-Restarted"] = " ".join(session.restarted.split())
        # The worker's headers as they are (Tornado parsed and validated them), in
        # place of Tornado's own (Server, Content-Type, Date): set_header would
        # check each again. RequestHandler's private map (Tornado 6.3-6.6.1).
        self._headers = headers

    def _merge_default_headers(self, headers: httputil.HTTPHeaders) -> None:
        """Put :meth:`set_default_headers`'s headers into a worker's answer."""
        defaults = self._default_headers
        if not defaults:
            return
        # The handler's defaults (a host application's security headers) win over
        # the worker's, as they would on the host's own pages.
        for name in defaults:
            if name in headers and name not in self.ADDITIVE_DEFAULT_HEADERS:
                del headers[name]
        for name, value in defaults.get_all():
            headers.add(name, value)

    def _handshake_answer(self, head: bytes) -> bytes:
        """The worker's answer to a WebSocket handshake, for the client: as it is,
        but with :meth:`set_default_headers`'s headers, as on any other answer."""
        if not self._default_headers:
            return head
        status, _, fields = head.decode("latin-1").partition("\r\n")
        headers = httputil.HTTPHeaders.parse(fields)
        self._merge_default_headers(headers)
        lines = [status, *(f"{name}: {value}" for name, value in headers.get_all())]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _rewrite_location(self, location: str) -> str:
        assert self.route is not None
        assert self._exchange is not None
        address = self._exchange.address
        if location.startswith(f"http://{address}"):
            location = location[len(f"http://{address}") :] or "/"
        if self.route.prefix and location.startswith("/") and not location.startswith("//"):
            return self.settings_.prefix + self.route.prefix + location
        if self.settings_.prefix and location.startswith("/") and not location.startswith("//"):
            return self.settings_.prefix + location
        return location

    def _send_chunk(self, chunk: bytes) -> Awaitable[None] | None:
        if self._done() or self.request.method == "HEAD":
            return None
        self.write(chunk)
        return _unless_gone(self.flush())

    def clear(self) -> None:
        """Reset the answer: no headers but :meth:`set_default_headers`'s.

        Tornado's version formats Date/Server/Content-Type defaults on every
        request; a proxied response replaces them with the worker's headers, and
        the JSON errors set their own. What :meth:`set_default_headers` sets (by
        default: nothing) is kept for both: the JSON errors start from it (they
        call this), and a worker's response gets it over its own headers, each
        replacing the worker's header of that name (but those in
        :attr:`ADDITIVE_DEFAULT_HEADERS`, added alongside).
        """
        # What Tornado's clear() resets, but its formatted defaults: RequestHandler's
        # private headers and write buffer, which nothing public empties (Tornado
        # 6.3-6.6.1).
        self._headers = httputil.HTTPHeaders()
        self._write_buffer: list[bytes] = []
        self.set_status(200)
        self.set_default_headers()
        self._default_headers = self._headers.copy() if self._headers else None

    def compute_etag(self) -> str | None:
        return None  # the worker's response is passed through as it is

    async def get(self, *args: str) -> None:
        await self._run(self._tunnel_websocket if self._websocket else self._proxy)

    async def _run(self, step: Callable[[], Awaitable[None]]) -> None:
        try:
            await step()
        except _Failure as failure:
            self._fail(failure)

    async def head(self, *args: str) -> None:
        await self._run(self._proxy)

    post = put = patch = delete = options = head

    # -- WebSocket ------------------------------------------------------------------------

    async def _tunnel_websocket(self) -> None:
        route = self.route
        assert route is not None
        await self._locate(route)
        for attempt in (1, 2):
            node = self._node
            tunnel = _Tunnel(self.settings_, self.session, route, node=node, uri=self.request.uri)
            try:
                head = await tunnel.open(
                    self._websocket_headers if node is None else self._node_websocket_headers
                )
                break
            except OSError as exc:  # refused, timed out, or closed before answering
                if node is None:
                    raise await self._worker_failed(exc) from None
                self._forget_node()
                if attempt == 2:
                    raise node_unreachable(node, route.session_id, exc) from None
                await self._locate(route, ask=True)
        try:
            answer = self._handshake_answer(head)
        except httputil.HTTPInputError:
            tunnel.close()
            raise _Failure(
                502, "bad_handshake", "worker sent a malformed handshake answer"
            ) from None
        try:
            await tunnel.run(self._attach, answer)
        finally:
            self._close_use()

    async def _attach(self, pipe: asyncio.Protocol) -> None:
        """Hand the client's connection from Tornado to ``pipe`` (a tunnel's)."""
        stream = self.detach()  # Tornado lets go of the connection here
        # The client sends nothing before our 101, so Tornado holds none of its
        # bytes: the socket moves to an asyncio transport (a dup, as closing the
        # IOStream closes its own descriptor).
        try:
            sock = socket.socket(fileno=os.dup(stream.socket.fileno()))
        finally:
            stream.close()
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: pipe, sock)
        except BaseException:
            sock.close()
            raise

    def _websocket_headers(self) -> httputil.HTTPHeaders:
        headers = _end_to_end(self.request.headers)
        headers["Connection"] = "Upgrade"
        headers["Upgrade"] = self.request.headers.get("Upgrade", "websocket")
        self._add_forwarded(headers, "wss" if self.request.protocol == "https" else "ws")
        self.forward_headers(headers)
        return headers

    def _node_websocket_headers(self) -> httputil.HTTPHeaders:
        headers = self._node_headers()
        headers["Connection"] = "Upgrade"
        headers["Upgrade"] = self.request.headers.get("Upgrade", "websocket")
        return headers

    def on_connection_close(self) -> None:
        # The client vanished mid-request: stop the upstream request too. Unless
        # the exchange with the worker is over (a client that closes as soon as it
        # has the body can be seen to leave before the read ends): that connection
        # is still good, and _proxy puts it back.
        self._client_gone = True
        exchange = self._exchange
        if exchange is not None and not (exchange.sent and exchange.response.complete):
            exchange.discard()
        self._close_use()

    def on_finish(self) -> None:
        self._close_use()
        # The answer is out: let go of the exchange. It holds this handler through
        # its read task's context (a host application's context variables may name
        # the handler, as Jupyter's do) and through its callbacks: a reference cycle
        # per request otherwise, which only the garbage collector's full
        # collections free, each one a pause of the whole server.
        self._exchange = None

    def _close_use(self) -> None:
        if self.session is not None:
            self.session.close_nowait()
        if self._exchange is not None:  # nothing more goes to this client
            self._exchange.response.release()  # (see on_finish)


async def _unless_gone(flushed: Awaitable[None]) -> None:
    """Wait for a piece of the answer to be written, as the read of the worker's
    answer does (back-pressure), but take a client that left for what it is: the
    client's choice, which :meth:`ProxyHandler.on_connection_close` handles. (Tornado
    would log the error of a delegate's write as an uncaught exception.)"""
    with contextlib.suppress(iostream.StreamClosedError):
        await flushed
