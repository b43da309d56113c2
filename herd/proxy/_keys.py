"""Session keys: where in a request its session ID is, and what URI the worker gets."""

from __future__ import annotations

import dataclasses
import urllib.parse
from collections.abc import Callable

from tornado import httputil


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


SessionKey = Callable[[httputil.HTTPServerRequest, str], "Route | None"]
"""Finds a request's session: ``key(request, uri) -> Route | None``.

``uri`` is the request URI with the handler's mount prefix removed. ``None`` means
the request carries no session key (the proxy answers 400).
"""


def from_header(name: str = "X-Session-ID") -> SessionKey:
    """The session ID is the value of request header ``name``."""

    def key(request: httputil.HTTPServerRequest, uri: str) -> Route | None:
        value = request.headers.get(name)
        return Route(value, uri) if value is not None else None

    key.__doc__ = f"header {name}"
    return key


def from_cookie(name: str = "herd-session") -> SessionKey:
    """The session ID is the value of cookie ``name``."""

    def key(request: httputil.HTTPServerRequest, uri: str) -> Route | None:
        morsel = request.cookies.get(name)
        return Route(morsel.value, uri) if morsel is not None else None

    key.__doc__ = f"cookie {name}"
    return key


def from_query(name: str = "session") -> SessionKey:
    """The session ID is query parameter ``name`` (left in the forwarded URI)."""

    def key(request: httputil.HTTPServerRequest, uri: str) -> Route | None:
        values = request.query_arguments.get(name)
        return Route(values[0].decode("utf-8", "replace"), uri) if values else None

    key.__doc__ = f"query parameter {name}"
    return key


def from_path() -> SessionKey:
    """The session ID is the first path segment, stripped before forwarding.

    ``/alice/api?x=1`` goes to session ``alice`` as ``/api?x=1``; a relative
    ``Location`` in the response (``/login``) is rewritten to ``/alice/login``.
    """

    def key(request: httputil.HTTPServerRequest, uri: str) -> Route | None:
        path, sep, query = uri.partition("?")
        segment, _slash, rest = path.lstrip("/").partition("/")
        if not segment:
            return None
        forward = "/" + rest + (sep + query if sep else "")
        return Route(urllib.parse.unquote(segment), forward, "/" + segment)

    key.__doc__ = "first path segment"
    return key


def from_callable(find: Callable[[httputil.HTTPServerRequest], str | None]) -> SessionKey:
    """The session ID is whatever ``find(request)`` returns (``None``: no key)."""

    def key(request: httputil.HTTPServerRequest, uri: str) -> Route | None:
        value = find(request)
        return Route(value, uri) if value is not None else None

    key.__doc__ = getattr(find, "__name__", "callable")
    return key
