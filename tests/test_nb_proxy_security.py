"""herd_nb's proxy route keeps Jupyter's protections, against a real ``jupyter server``.

``{base_url}herd/proxy/`` serves the workers from the server's own origin, with
the user's login cookie. Each protection is tested twice: on the server as
shipped, where the attack fails, and on a server started through a launcher that
turns that one protection off (a flag of :mod:`herd_nb.handlers`, flipped in the
server's process), where the same attack succeeds:

- a page of another site opens a WebSocket to a worker with the user's cookie
  (``CHECK_ORIGIN``);
- a worker's page loses Jupyter's security headers, so another site may frame it
  (``SECURITY_HEADERS``);
- a worker reads the server's token and login cookie off the requests it gets
  (``STRIP_CREDENTIALS``).
"""

from __future__ import annotations

import asyncio
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from email.message import Message
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.jupyter import TOKEN, Server
from tests.test_extension import CONFIG as EXTENSION_CONFIG

# test_extension's process pool, and an administrator's own header: Jupyter
# sets it on every page it serves.
CONFIG = EXTENSION_CONFIG + (
    "c.ServerApp.tornado_settings = {'headers': {'Referrer-Policy': 'no-referrer'}}\n"
)
EVIL = "http://evil.example"
SESSION = {"X-Session-ID": "tenant"}


def start(tmp: Path, *argv: str, unprotected: str | None = None) -> Server:
    """A server with herd_nb's process pool; ``unprotected`` names the flag of
    :mod:`herd_nb.handlers` turned off in its process."""
    command = None
    if unprotected is not None:
        launcher = (
            "import sys, herd_nb.handlers as handlers; "
            f"setattr(handlers, {unprotected!r}, False); "
            "from jupyter_server.serverapp import main; sys.exit(main())"
        )
        command = [
            sys.executable,
            "-c",
            launcher,
            "--ServerApp.jpserver_extensions=herd_nb=True",
            f"--ServerApp.root_dir={tmp}",
            f"--config={tmp / 'jupyter_server_config.py'}",
            *argv,
        ]
    server = Server(tmp, CONFIG, argv, command=command)
    try:
        server.wait_ready(lambda pools: pools["process"]["total_workers"] >= 1)
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Starts servers (:func:`start`'s arguments) and stops them all after the test."""
    started: list[Server] = []

    def make(*argv: str, unprotected: str | None = None) -> Server:
        root = tmp_path / f"server-{len(started)}"
        root.mkdir()
        started.append(start(root, *argv, unprotected=unprotected))
        return started[-1]

    try:
        yield make
    finally:
        for server in started:
            server.stop()
    for server in started:  # (a coroutine of the handler's that never ran, say)
        warnings = [line for line in server.log().splitlines() if "Warning" in line]
        assert not warnings, warnings


@pytest.fixture
def server(servers: Callable[..., Server]) -> Server:
    return servers()


# -- clients ------------------------------------------------------------------------------


def fetch(server: Server, path: str, **headers: str) -> tuple[int, Message, bytes]:
    """``GET path`` with exactly ``headers``: status, response headers, body."""
    request = urllib.request.Request(server.base + path, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, reply.headers, reply.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers, error.read()


def login_cookie(server: Server) -> str:
    """``name=value`` of the login cookie Jupyter sets for a token-authenticated
    request: what a browser that logged in sends with every request after."""
    _, headers, _ = fetch(server, "/api/status", Authorization=f"token {TOKEN}")
    cookies = [c.split(";", 1)[0] for c in headers.get_all("Set-Cookie") or []]
    (cookie,) = [c for c in cookies if c.startswith("username-")]
    return cookie


class Handshake:
    """A WebSocket handshake's answer: status, headers, then the first message
    (after a 101) or the body (otherwise)."""

    def __init__(self, status: int, headers: dict[str, str], payload: bytes) -> None:
        self.status = status
        self.headers = headers
        self.payload = payload

    def json(self) -> Any:
        return json.loads(self.payload)


def websocket(server: Server, path: str, **headers: str) -> Handshake:
    """Open a WebSocket to ``path`` with ``headers`` (a raw client: it sends exactly
    these, as a browser page's ``new WebSocket(url)`` would, cookie and Origin)."""

    async def run() -> Handshake:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            lines = [
                f"GET {path} HTTP/1.1",
                f"Host: 127.0.0.1:{server.port}",
                "Upgrade: websocket",
                "Connection: Upgrade",
                "Sec-WebSocket-Version: 13",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                *(f"{name.replace('_', '-')}: {value}" for name, value in headers.items()),
            ]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
            status_line, *fields = head.decode("latin-1").split("\r\n")
            answer: dict[str, str] = {}
            for field in filter(None, fields):
                name, _, value = field.partition(":")
                answer.setdefault(name.strip().lower(), value.strip())
            status = int(status_line.split()[1])
            if status == 101:  # the worker's first frame (text, unmasked)
                first = await asyncio.wait_for(reader.readexactly(2), 20)
                length = first[1] & 0x7F
                if length == 126:
                    length = int.from_bytes(await reader.readexactly(2), "big")
                payload = b"" if not length else await reader.readexactly(length)
            else:
                size = int(answer.get("content-length", "0"))
                payload = await asyncio.wait_for(reader.readexactly(size), 20)
            return Handshake(status, answer, payload)
        finally:
            writer.close()
            await writer.wait_closed()  # or the socket is left to the garbage collector

    return asyncio.run(run())


def opens(server: Server, path: str, **headers: str) -> int:
    """The status of a WebSocket handshake (101: open)."""
    return websocket(server, path, **headers).status


# -- Origin on WebSocket upgrades ---------------------------------------------------------


def test_cross_origin_websocket_is_refused_as_jupyter_refuses_it(server: Server) -> None:
    cookie = login_cookie(server)
    same = f"http://127.0.0.1:{server.port}"
    kernel = server.json("/api/kernels", method="POST", body={})["id"]
    jupyters_own = f"/api/kernels/{kernel}/channels"
    cases = {
        # name: (headers, expected answer)
        "cookie, another site": ({"Origin": EVIL}, 403),
        "cookie, another site, Sec-Fetch-Site": (
            {"Origin": EVIL, "Sec-Fetch-Site": "cross-site"},
            403,
        ),
        "cookie, same origin": ({"Origin": same}, 101),
        "cookie, no Origin (not a browser)": ({}, 101),
        "token, another site": ({"Origin": EVIL, "Authorization": f"token {TOKEN}"}, 101),
    }
    for name, (headers, expected) in cases.items():
        sent = {"Cookie": cookie, **headers}
        herd = opens(server, "/herd/proxy/ws-request", **SESSION, **sent)
        jupyter = opens(server, jupyters_own, **sent)
        assert (herd, jupyter) == (expected, expected), name

    refused = websocket(server, "/herd/proxy/ws-request", Cookie=cookie, Origin=EVIL, **SESSION)
    assert refused.json()["error"] == "cross_origin"
    assert refused.headers["x-content-type-options"] == "nosniff"
    assert "Blocking Cross Origin WebSocket Attempt" in server.log()
    # An accepted one gets Jupyter's headers on its 101 too, and then the worker.
    opened = websocket(server, "/herd/proxy/ws-request", Cookie=cookie, Origin=same, **SESSION)
    assert opened.status == 101
    assert opened.headers["x-content-type-options"] == "nosniff"
    assert "frame-ancestors 'self'" in opened.headers["content-security-policy"]
    assert opened.json()["headers"]["Origin"] == same


def test_without_the_origin_check_another_site_reaches_the_worker(
    servers: Callable[..., Server],
) -> None:
    server = servers(unprotected="CHECK_ORIGIN")
    cookie = login_cookie(server)
    opened = websocket(server, "/herd/proxy/ws-request", Cookie=cookie, Origin=EVIL, **SESSION)
    assert opened.status == 101
    assert opened.json()["headers"]["Origin"] == EVIL  # the evil page talks to the worker


@pytest.mark.parametrize(
    ("option", "allowed"),
    [
        ("--ServerApp.allow_origin=https://good.example", "https://good.example"),
        ("--ServerApp.allow_origin_pat=https://.*\\.good\\.example", "https://app.good.example"),
    ],
)
def test_allow_origin_is_honoured(
    servers: Callable[..., Server], option: str, allowed: str
) -> None:
    server = servers(option)
    cookie = login_cookie(server)
    path = "/herd/proxy/ws-request"
    assert opens(server, path, Cookie=cookie, Origin=allowed, **SESSION) == 101
    assert opens(server, path, Cookie=cookie, Origin=EVIL, **SESSION) == 403


def test_allow_origin_star_lets_every_site_in(servers: Callable[..., Server]) -> None:
    server = servers("--ServerApp.allow_origin=*")
    cookie = login_cookie(server)
    assert opens(server, "/herd/proxy/ws-request", Cookie=cookie, Origin=EVIL, **SESSION) == 101


# -- security headers -----------------------------------------------------------------


def test_security_headers_on_proxied_answers_and_herds_errors(server: Server) -> None:
    token = {"Authorization": f"token {TOKEN}"}
    _, jupyters, _ = fetch(server, "/login")  # a page of Jupyter's own (its API adds more)
    policy = jupyters["Content-Security-Policy"]
    assert "frame-ancestors 'self'" in policy

    # The worker's own headers pass; Jupyter's are set over them, and the
    # worker's policy goes alongside Jupyter's (a browser enforces both).
    worker_says = (
        "?Content-Security-Policy=frame-ancestors%20*"
        "&X-Content-Type-Options=sniff-away&Referrer-Policy=unsafe-url&X-Worker=yes"
    )
    status, headers, _ = fetch(server, "/herd/proxy/answer-with" + worker_says, **SESSION, **token)
    assert status == 200
    assert headers.get_all("X-Content-Type-Options") == ["nosniff"]
    assert headers.get_all("Referrer-Policy") == ["no-referrer"]
    assert sorted(headers.get_all("Content-Security-Policy") or []) == sorted(
        ["frame-ancestors *", policy]
    )
    assert headers["X-Worker"] == "yes"

    errors = {
        "no session key (herd's 400)": fetch(server, "/herd/proxy/echo", **token),
        "bad session ID (herd's 400)": fetch(
            server, "/herd/proxy/echo", **{"X-Session-ID": "a b"}, **token
        ),
        "dead worker (herd's 502)": fetch(server, "/herd/proxy/exit/3", **SESSION, **token),
        "not logged in (Jupyter's 403)": fetch(server, "/herd/proxy/echo", **SESSION),
    }
    for name, (status, headers, body) in errors.items():
        assert status >= 400, name
        assert headers["X-Content-Type-Options"] == "nosniff", name
        assert headers["Content-Security-Policy"] == policy, name
        assert headers["Referrer-Policy"] == "no-referrer", name
        if "herd" in name:
            assert json.loads(body)["error"], name


def test_without_the_headers_another_site_may_frame_a_worker(
    servers: Callable[..., Server],
) -> None:
    server = servers(unprotected="SECURITY_HEADERS")
    token = {"Authorization": f"token {TOKEN}"}
    path = "/herd/proxy/answer-with?Content-Security-Policy=frame-ancestors%20*"
    status, headers, _ = fetch(server, path, **SESSION, **token)
    assert status == 200
    assert headers.get_all("Content-Security-Policy") == ["frame-ancestors *"]
    assert "X-Content-Type-Options" not in headers
    status, headers, _ = fetch(server, "/herd/proxy/echo", **token)
    assert status == 400
    assert "Content-Security-Policy" not in headers
    assert "X-Content-Type-Options" not in headers


# -- credentials ------------------------------------------------------------------------


def credentials(cookie: str) -> dict[str, str]:
    """Everything a browser or a script sends the server that authenticates it,
    and some that does not."""
    return {
        "Authorization": f"token {TOKEN}",
        "X-XSRFToken": "2|xsrf-secret|0",
        "Cookie": f"flavour=mint; {cookie}; _xsrf=2|xsrf-secret|0; theme=dark",
        "X-Tenant-Header": "kept",
    }


QUERY = f"?keep=1&token={TOKEN}&_xsrf=xsrf-secret&%74oken={TOKEN}&also=2"


def test_the_worker_never_sees_the_servers_credentials(server: Server) -> None:
    cookie = login_cookie(server)
    status, _, body = fetch(server, "/herd/proxy/echo" + QUERY, **SESSION, **credentials(cookie))
    assert status == 200
    request = json.loads(body)
    opened = websocket(server, "/herd/proxy/ws-request" + QUERY, **SESSION, **credentials(cookie))
    assert opened.status == 101
    handshake = opened.json()
    for seen in (request, handshake):
        headers = seen["headers"]
        assert seen["query"] == "keep=1&also=2"
        assert headers["Cookie"] == "flavour=mint; theme=dark"
        assert "Authorization" not in headers
        assert "X-Xsrftoken" not in headers
        assert headers["X-Tenant-Header"] == "kept"
        assert TOKEN not in json.dumps(seen)
        assert cookie.split("=", 1)[1] not in json.dumps(seen)
        assert "xsrf-secret" not in json.dumps(seen)


def test_without_stripping_a_worker_reads_the_token_and_login_cookie(
    servers: Callable[..., Server],
) -> None:
    server = servers(unprotected="STRIP_CREDENTIALS")
    cookie = login_cookie(server)
    status, _, body = fetch(server, "/herd/proxy/echo" + QUERY, **SESSION, **credentials(cookie))
    assert status == 200
    headers = json.loads(body)["headers"]
    assert headers["Authorization"] == f"token {TOKEN}"
    assert cookie in headers["Cookie"]
    assert "_xsrf=" in headers["Cookie"]
    handshake = websocket(
        server, "/herd/proxy/ws-request" + QUERY, **SESSION, **credentials(cookie)
    ).json()
    assert f"token={TOKEN}" in handshake["query"]
    assert cookie in handshake["headers"]["Cookie"]
