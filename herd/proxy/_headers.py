"""Which headers pass a proxy: the end-to-end ones (RFC 9110 §7.6.1)."""

from __future__ import annotations

from tornado import httputil

# RFC 9110 §7.6.1: connection-specific headers a proxy must not forward, plus
# those named in the Connection header itself; and herd's own hop header between
# the nodes of a fleet (FORWARDED_HOPS), which no worker sees.
FORWARDED_HOPS = "Herd-Forwarded"
HOP_BY_HOP = frozenset(
    {
        "connection",
        "herd-forwarded",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


def _end_to_end(headers: httputil.HTTPHeaders) -> httputil.HTTPHeaders:
    """A copy without hop-by-hop headers (and those named in ``Connection``).

    Tornado parsed and validated these headers already, so the copy sets each
    name's first value (``headers[name] = value`` does not validate again) and
    adds only the further values of a repeated header (``Set-Cookie``), which
    ``add`` does validate: re-adding every header costs a tenth of a proxied
    request. The original is left alone: Tornado still reads the body by it.
    """
    named = _tokens(headers.get("Connection", "")) if "Connection" in headers else set()
    copy = httputil.HTTPHeaders()
    get_list = headers.get_list
    for name in headers:  # each name once, as Tornado normalized it
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in named:
            continue
        values = get_list(name)
        copy[name] = values[0]
        if len(values) > 1:
            for value in values[1:]:
                copy.add(name, value)
    return copy


def _tokens(value: str) -> set[str]:
    return {token.strip().lower() for token in value.split(",") if token.strip()}
