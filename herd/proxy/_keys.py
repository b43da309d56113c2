"""Session keys: where in a request its session ID is, and what URI the worker gets."""

from __future__ import annotations

import dataclasses
import http.cookies
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Protocol, overload

from .._exceptions import InvalidSessionIdError
from .._session import session_tag, validate_session_id
from ._errors import _Failure


@dataclasses.dataclass(frozen=True)
class Route:
    """Where a request goes: its session ID and the URI to ask the worker for.

    :param session_id: the session's ID (not yet validated).
    :param uri: path and query string to forward (``"/api?x=1"``).
    :param prefix: the public path in front of ``uri`` (for rewriting ``Location``);
        empty unless the session ID is a path segment.
    """

    session_id: str
    uri: str
    prefix: str = ""


class Headers(Protocol):
    """A request's headers as a session key reads them (case-insensitive names;
    several values of one name joined with commas, as Tornado's ``HTTPHeaders``)."""

    @overload
    def get(self, name: str, /) -> str | None: ...
    @overload
    def get(self, name: str, default: str, /) -> str: ...

    def __contains__(self, name: object, /) -> bool: ...


class RequestView(Protocol):
    """What a session key may read of a request: the reading side of Tornado's
    :class:`~tornado.httputil.HTTPServerRequest`, which :class:`ProxyHandler` passes;
    the relay (``herd serve``) passes a lighter object with the same attributes."""

    @property
    def method(self) -> str | None: ...
    @property
    def uri(self) -> str | None: ...
    @property
    def path(self) -> str: ...
    @property
    def query(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def headers(self) -> Headers: ...
    @property
    def remote_ip(self) -> str | None: ...
    @property
    def protocol(self) -> str: ...
    @property
    def host(self) -> str: ...
    @property
    def cookies(self) -> Mapping[str, http.cookies.Morsel[str]]: ...
    @property
    def query_arguments(self) -> Mapping[str, list[bytes]]: ...


SessionKey = Callable[[RequestView, str], "Route | None"]
"""Finds a request's session: ``key(request, uri) -> Route | None``.

``uri`` is the request URI with the handler's mount prefix removed. ``None`` means
the request carries no session key (the proxy answers 400).
"""


def from_header(name: str = "X-Session-ID") -> SessionKey:
    """The session ID is the value of request header ``name``."""

    def key(request: RequestView, uri: str) -> Route | None:
        value = request.headers.get(name)
        return Route(value, uri) if value is not None else None

    key.__doc__ = f"header {name}"
    return key


def from_cookie(name: str = "herd-session") -> SessionKey:
    """The session ID is the value of cookie ``name``."""

    def key(request: RequestView, uri: str) -> Route | None:
        morsel = request.cookies.get(name)
        return Route(morsel.value, uri) if morsel is not None else None

    key.__doc__ = f"cookie {name}"
    return key


def from_query(name: str = "session") -> SessionKey:
    """The session ID is query parameter ``name`` (left in the forwarded URI)."""

    def key(request: RequestView, uri: str) -> Route | None:
        values = request.query_arguments.get(name)
        return Route(values[0].decode("utf-8", "replace"), uri) if values else None

    key.__doc__ = f"query parameter {name}"
    return key


def from_path() -> SessionKey:
    """The session ID is the first path segment, stripped before forwarding.

    ``/alice/api?x=1`` goes to session ``alice`` as ``/api?x=1``; a relative
    ``Location`` in the response (``/login``) is rewritten to ``/alice/login``.
    """

    def key(request: RequestView, uri: str) -> Route | None:
        path, sep, query = uri.partition("?")
        segment, _slash, rest = path.lstrip("/").partition("/")
        if not segment:
            return None
        forward = "/" + rest + (sep + query if sep else "")
        return Route(urllib.parse.unquote(segment), forward, "/" + segment)

    key.__doc__ = "first path segment"
    return key


def from_callable(find: Callable[[RequestView], str | None]) -> SessionKey:
    """The session ID is whatever ``find(request)`` returns (``None``: no key)."""

    def key(request: RequestView, uri: str) -> Route | None:
        value = find(request)
        return Route(value, uri) if value is not None else None

    key.__doc__ = getattr(find, "__name__", "callable")
    return key


def find_route(
    request: RequestView, prefix: str, key: SessionKey, forward_uri: Callable[[str], str]
) -> Route:
    """The request's :class:`Route`: its URI less the mount ``prefix``, its session
    found by ``key`` and validated, the URI to forward made by ``forward_uri``.

    :raises _Failure: 404 (not under ``prefix``), 400 (no session key, or an
        invalid session ID).
    """
    uri = request.uri or "/"
    if prefix:
        if not (uri == prefix or uri.startswith(prefix + "/") or uri.startswith(prefix + "?")):
            raise _Failure(404, "not_found", f"not under {prefix}")
        uri = uri[len(prefix) :]
    if not uri.startswith("/"):
        uri = "/" + uri
    route = key(request, uri)
    if route is None:
        how = key.__doc__ or "the session key"
        raise _Failure(400, "no_session", f"no session key in the request (expected {how})")
    try:
        validate_session_id(route.session_id)
    except InvalidSessionIdError as exc:
        raise _Failure(400, "invalid_session", str(exc)) from None
    forward = forward_uri(route.uri)
    return route if forward == route.uri else dataclasses.replace(route, uri=forward)


def logged_uri(route: Route | None, uri: str) -> str:
    """``uri`` as a log line shows it: with its session ID (a path segment or a
    query value) replaced by the session's tag."""
    if route is None:
        return uri
    tag = session_tag(route.session_id)
    if route.prefix:  # the ID was the first path segment
        return "/" + tag + route.uri
    path, sep, query = uri.partition("?")
    if not sep:
        return uri
    fields = []
    for field in query.split("&"):
        name, eq, value = field.partition("=")
        if eq and urllib.parse.unquote_plus(value) == route.session_id:
            field = f"{name}={tag}"
        fields.append(field)
    return path + "?" + "&".join(fields)
