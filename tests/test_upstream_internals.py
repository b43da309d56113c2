"""Every private upstream internal herd relies on, pinned for the installed versions.

herd reaches into Tornado, jupyter_client, jupyter_server, ipykernel, ipywidgets
and pyzmq where no public API does the job. Nothing warns when a release renames
one of those: an override of a removed method silently stops running, a
``getattr(obj, "_name", None)`` silently takes its fallback. Each test below pins
one internal (it exists, it has the shape herd uses: arity, coroutine or not,
type) and says in its docstring where herd uses it and what would break. The last
two tests are generic: herd's overrides of upstream methods still accept every
argument the base takes, and herd's own private names in subclasses of upstream
classes do not collide with upstream's (a new ``RequestHandler._run`` upstream
would be replaced by herd's without a word).

When one fails after an upgrade: fix herd (or its version bounds in
``pyproject.toml``), then this file. New uses are found with
``ruff check --select SLF001 herd herd_nb`` (``obj._name``) and the generic tests
(``self._name`` in subclasses); ``getattr`` with a private name is only found by
reading, so each one herd has is pinned here by name.

Introspection only: no kernel, server or client is started.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil
import re
import socket
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import traitlets
import zmq
import zmq.asyncio
from tornado import httputil
from tornado.http1connection import HTTP1Connection
from tornado.httpserver import HTTPServer
from tornado.iostream import BaseIOStream, IOStream
from tornado.simple_httpclient import SimpleAsyncHTTPClient
from tornado.tcpclient import TCPClient
from tornado.web import Application, HTTPError, RequestHandler

import herd
import herd_nb
from herd._client import _SocketTCPClient
from herd.proxy._server import _HeadLimitStream

# -- helpers -----------------------------------------------------------------------------


@functools.cache
def _source(obj: Any) -> str:
    return textwrap.dedent(inspect.getsource(obj))


def _assigned(func: Callable[..., Any]) -> set[str]:
    """The ``self.<name>`` attributes a function assigns (``=``, or annotated)."""
    return set(re.findall(r"self\.(\w+)\s*(?::[^=\n]+)?=(?!=)", _source(func)))


def _defined_in(cls: type, name: str) -> type:
    """The class of ``cls``'s MRO whose ``__dict__`` holds ``name``."""
    for klass in cls.__mro__:
        if name in vars(klass):
            return klass
    raise AssertionError(f"{cls.__qualname__} has no {name}")


def _binds(override: Callable[..., Any], base: Callable[..., Any]) -> str | None:
    """Why a call that ``base`` accepts would fail on ``override`` (``None``: it would not).

    Required parameters are passed by position; optional ones both by keyword and,
    for positional-or-keyword ones, by position: callers do both. Optional private
    ones (``_redirect_to_login``) are left out: only upstream's own subclasses pass
    them, to their ``super()``."""
    base_sig = inspect.signature(base)
    sig = inspect.signature(override)
    params = [
        p
        for p in base_sig.parameters.values()
        if p.default is p.empty or not p.name.startswith("_")
    ]
    required = [
        p
        for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    optional_positional = [
        p
        for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is not p.empty
    ]
    keywords = {
        p.name: None
        for p in params
        if p.kind == p.KEYWORD_ONLY
        or (p.kind == p.POSITIONAL_OR_KEYWORD and p.default is not p.empty)
    }
    calls = [
        ([None] * len(required), keywords),
        (
            [None] * (len(required) + len(optional_positional)),
            {p.name: None for p in params if p.kind == p.KEYWORD_ONLY},
        ),
    ]
    for args, kwargs in calls:
        try:
            sig.bind(*args, **kwargs)
        except TypeError as exc:
            return f"{override.__qualname__}{sig} vs {base.__qualname__}{base_sig}: {exc}"
    return None


def _ours(cls: type) -> bool:
    return cls.__module__.split(".")[0] in ("herd", "herd_nb")


def _herd_classes() -> Iterator[type]:
    """herd's classes with an upstream base (``herd.cli`` and ``herd_nb`` included),
    and the kernel manager class herd_nb makes for each kernel."""
    from jupyter_client.ioloop.manager import AsyncIOLoopKernelManager
    from jupyter_client.manager import AsyncKernelManager

    from herd_nb.kernels import _launch_class

    seen: set[type] = set()
    for package in (herd, herd_nb):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if info.name.endswith("__main__"):
                continue  # runs the CLI
            module = importlib.import_module(info.name)
            for value in vars(module).values():
                if inspect.isclass(value) and _ours(value) and value not in seen:
                    seen.add(value)
    seen |= {_launch_class(AsyncKernelManager), _launch_class(AsyncIOLoopKernelManager)}
    plain = ("builtins", "typing", "abc", "enum", "argparse", "logging", "asyncio")
    for cls in sorted(seen, key=lambda c: (c.__module__, c.__qualname__)):
        upstream = [b for b in cls.__mro__ if not _ours(b) and b is not object]
        if any(b.__module__.split(".")[0] not in plain for b in upstream):
            yield cls


# -- Tornado ------------------------------------------------------------------------------


def test_tcpclient_create_stream() -> None:
    """herd/_client.py _SocketTCPClient overrides it: a mismatch breaks netns workers' clients."""
    base = _defined_in(TCPClient, "_create_stream")
    assert base is TCPClient
    assert not inspect.iscoroutinefunction(TCPClient._create_stream)
    params = list(inspect.signature(TCPClient._create_stream).parameters)
    assert params[:4] == ["self", "max_buffer_size", "af", "addr"]
    # TCPClient.connect binds max_buffer_size, and source_ip and source_port by
    # keyword; its connector then passes (af, addr).
    assert "self._create_stream" in _source(TCPClient.connect)
    why = _binds(_SocketTCPClient._create_stream, TCPClient._create_stream)
    assert why is None, why


async def test_tcpclient_create_stream_is_used_by_connect() -> None:
    """herd/_client.py _SocketTCPClient: connect() must use its socket, or netns is bypassed."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    made: list[socket.socket] = []

    def open_socket() -> socket.socket:
        made.append(socket.socket())
        return made[-1]

    client = _SocketTCPClient(open_socket)
    try:
        stream = await client.connect("127.0.0.1", listener.getsockname()[1])
        assert stream.socket is made[0]
        stream.close()
    finally:
        client.close()
        listener.close()
        for sock in made:
            sock.close()


async def test_simple_http_client_tcp_client() -> None:
    """herd/_client.py HTTPWorkerClient._http_client sets tcp_client: unread, netns is bypassed."""
    client = SimpleAsyncHTTPClient(force_instance=True)
    try:
        assert isinstance(client.tcp_client, TCPClient)
        assert client.resolver is not None
    finally:
        client.close()
    # Each request's connection is made from the client's tcp_client, read per request.
    assert "self.tcp_client" in _source(SimpleAsyncHTTPClient._handle_request)


class _Connection:
    def set_close_callback(self, callback: Callable[[], None] | None) -> None:
        pass


def _handler() -> RequestHandler:
    request = httputil.HTTPServerRequest(
        start_line=httputil.RequestStartLine("GET", "/", "HTTP/1.1"),
        headers=httputil.HTTPHeaders({"Host": "example.test"}),
        connection=_Connection(),  # type: ignore[arg-type]
    )
    return RequestHandler(Application(), request)


def test_request_handler_finished() -> None:
    """herd/proxy/_handler.py ProxyHandler._done reads _finished: gone, every request fails."""
    handler = _handler()
    assert handler._finished is False
    assert "_finished" in _assigned(RequestHandler.__init__)
    assert "_finished" in _assigned(RequestHandler.finish)


def test_request_handler_headers_and_write_buffer() -> None:
    """proxy/_handler.py _send_head, clear set _headers, _write_buffer: else headers are lost."""
    handler = _handler()
    assert isinstance(handler._headers, httputil.HTTPHeaders)
    assert handler._write_buffer == []
    flush = _source(RequestHandler.flush)
    assert "self._headers" in flush
    assert "self._write_buffer" in flush


def test_request_handler_clear_resets_only_what_herd_resets() -> None:
    """proxy/_handler.py ProxyHandler.clear replaces Tornado's: new state would stay stale."""
    assert _assigned(RequestHandler.clear) <= {
        "_headers",
        "_write_buffer",
        "_status_code",
        "_reason",
    }
    assert {"_status_code", "_reason"} <= _assigned(RequestHandler.set_status)
    # Tornado calls it before every error page; herd's JSON errors call it too.
    assert "self.clear()" in _source(RequestHandler.send_error)


async def test_http_server_connections_and_conn_params() -> None:
    """proxy/_server.py ProxyServer counts _connections: else max_connections never applies."""
    server = HTTPServer(Application())
    try:
        assert isinstance(server._connections, set)
        assert isinstance(server.conn_params.max_header_size, int)
        handle = _source(HTTPServer.handle_stream)
        assert "self._connections.add(" in handle
        assert "self._connections.remove(" in _source(HTTPServer.on_close)
    finally:
        server.stop()


def test_iostream_head_reads() -> None:
    """proxy/_server.py _HeadLimitStream: heads must be read by read_until_regex, else no 431."""
    connection = re.sub(r"\s+", "", _source(HTTP1Connection))
    assert "self.stream.read_until_regex(" in connection
    assert "max_bytes=self.params.max_header_size" in connection
    for name in ("read_until_regex", "read_until", "close_fd"):
        why = _binds(getattr(_HeadLimitStream, name), getattr(IOStream, name))
        assert why is None, why
    assert {"max_buffer_size", "read_chunk_size"} <= set(
        re.findall(r"self\.(\w+) =", _source(BaseIOStream.__init__))
    )


def test_iostream_read_buffer_size() -> None:
    """proxy/_exchange.py _Exchange.keep: bytes a worker sent past its answer, already
    buffered, make its connection unfit for keeping (else a second answer would go to
    the next request); the stream's buffered byte count is ``_read_buffer_size``."""
    assert "_read_buffer_size" in re.findall(r"self\.(\w+) =", _source(BaseIOStream.__init__))
    assert "self._read_buffer_size += " in _source(BaseIOStream._read_to_buffer)


# -- jupyter_client -----------------------------------------------------------------------


def test_kernel_manager_launch_args() -> None:
    """kernelmanager.py _adopt, _unretarget set _launch_args: else restarts lose cwd and env."""
    from jupyter_client.manager import KernelManager

    trait = KernelManager.class_traits()["_launch_args"]
    assert isinstance(trait, traitlets.Dict)
    assert "_launch_args" in _assigned(KernelManager._async_pre_start_kernel)
    assert "**self._launch_args" in _source(KernelManager._async_restart_kernel)


def test_kernel_manager_attributes_read_with_a_fallback() -> None:
    """kernelmanager.py, kernels.py getattr these with defaults: a rename degrades silently."""
    from jupyter_client.ioloop.manager import AsyncIOLoopKernelManager
    from jupyter_client.manager import AsyncKernelManager
    from jupyter_client.provisioning.local_provisioner import LocalProvisioner

    manager = AsyncKernelManager()
    assert manager.shutting_down is False
    assert "restarter_class" in AsyncIOLoopKernelManager.class_traits()
    assert hasattr(LocalProvisioner, "cwd")
    assert hasattr(LocalProvisioner, "process")
    assert "self.process = launch_kernel(" in _source(LocalProvisioner)


def test_multi_kernel_manager_context_default() -> None:
    """kernelmanager.py _kernel_manager_options calls it: else no kernel once a context closed."""
    from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager

    handler = vars(_defined_in(AsyncMappingKernelManager, "_context_default"))["_context_default"]
    assert isinstance(handler, traitlets.traitlets.DefaultHandler)
    assert handler.trait_name == "context"
    assert list(inspect.signature(handler.func).parameters) == ["self"]


def test_context_default_called_on_an_instance(manager: Any) -> None:
    """kernelmanager.py _kernel_manager_options: a fresh async context, as the server's."""
    context = manager._context_default()
    try:
        assert isinstance(context, zmq.asyncio.Context)
        assert context is not manager.context
    finally:
        context.term()


# -- jupyter_server -----------------------------------------------------------------------


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[Any]:
    """A HerdKernelManager, made and never started, with a context of its own."""
    from herd_nb import HerdKernelManager

    context = zmq.asyncio.Context()
    made = HerdKernelManager(root_dir=str(tmp_path), connection_dir=str(tmp_path), context=context)
    yield made
    context.term()


def test_mapping_kernel_manager_state(manager: Any) -> None:
    """kernelmanager.py _adopt, _async_shutdown_kernel use these: else kernels hide or leak."""
    assert manager._kernels == {}
    assert manager._kernel_connections == {}
    assert manager._kernel_ports == {}
    assert manager._initialized_culler is False
    from jupyter_server.services.kernels.kernelmanager import MappingKernelManager

    assert "_initialized_culler" in _assigned(MappingKernelManager.initialize_culler)
    assert "self._kernel_ports[" in _source(MappingKernelManager._finish_kernel_start)
    # Stock forgets its own kernels' entries as herd forgets its kernels'.
    forget = _source(MappingKernelManager._remove_kernel_when_ready)
    assert "self._kernel_connections.pop(kernel_id" in forget
    assert "self._kernel_ports.pop(kernel_id" in forget


def test_check_kernel_id(manager: Any) -> None:
    """kernelmanager.py _async_shutdown_kernel calls it (404): gone, no herd kernel shuts down."""
    assert not inspect.iscoroutinefunction(manager._check_kernel_id)
    assert list(inspect.signature(manager._check_kernel_id).parameters) == ["kernel_id"]
    with pytest.raises(HTTPError) as raised:
        manager._check_kernel_id("no-such-kernel")
    assert raised.value.status_code == 404


def test_finish_kernel_start() -> None:
    """kernelmanager.py start_kernel, _start_cold await it: without it no herd kernel starts."""
    from jupyter_server.services.kernels.kernelmanager import MappingKernelManager

    finish = MappingKernelManager._finish_kernel_start
    assert inspect.iscoroutinefunction(finish)
    assert list(inspect.signature(finish).parameters) == ["self", "kernel_id"]
    assert "self._finish_kernel_start(" in _source(MappingKernelManager._async_start_kernel)


@pytest.mark.parametrize(
    ("name", "public"),
    [("_async_shutdown_kernel", "shutdown_kernel"), ("_async_restart_kernel", "restart_kernel")],
)
def test_overridden_shutdown_and_restart(name: str, public: str) -> None:
    """kernelmanager.py overrides these: unused by stock, herd's pools are never told."""
    from jupyter_server.services.kernels.kernelmanager import (
        AsyncMappingKernelManager,
        MappingKernelManager,
    )

    from herd_nb import HerdKernelManager

    base = getattr(AsyncMappingKernelManager, name)
    assert _defined_in(AsyncMappingKernelManager, name) is MappingKernelManager
    assert inspect.iscoroutinefunction(base)
    assert inspect.iscoroutinefunction(getattr(HerdKernelManager, name))
    why = _binds(getattr(HerdKernelManager, name), base)
    assert why is None, why
    # Stock's public name is the same coroutine (herd assigns its own likewise).
    assert getattr(AsyncMappingKernelManager, public) is base
    assert getattr(HerdKernelManager, public) is getattr(HerdKernelManager, name)


def test_activity_stream_and_zmq_recv_callback() -> None:
    """kernelmanager.py start_watching_activity chains these: else 'died' loses its cell."""
    from jupyter_server.services.kernels.kernelmanager import MappingKernelManager
    from zmq.eventloop.zmqstream import ZMQStream

    assert "kernel._activity_stream =" in _source(MappingKernelManager.start_watching_activity)
    # pyzmq keeps the one callback as given: herd calls it, then records.
    assert "self._recv_callback = callback" in _source(ZMQStream.on_recv)


def test_serverapp_signal_stop() -> None:
    """extension.py Herd._stop_on_sigint installs it: without it Ctrl-C leaves the server up."""
    from jupyter_server.serverapp import ServerApp

    stop = ServerApp._signal_stop
    assert not inspect.iscoroutinefunction(stop)
    assert list(inspect.signature(stop).parameters) == ["self", "sig", "frame"]


def test_jupyter_handler_prepare_goes_on_up_the_mro() -> None:
    """herd_nb/handlers.py HerdProxyHandler.prepare: ``JupyterHandler.prepare`` ends with
    ``return super().prepare()``, ProxyHandler's coroutine by HerdProxyHandler's MRO;
    herd awaits what it returns (else: a coroutine never awaited on every request)."""
    from jupyter_server.base.handlers import JupyterHandler

    assert "return super().prepare()" in _source(JupyterHandler.prepare)
    assert inspect.iscoroutinefunction(JupyterHandler.prepare)


def test_extension_app_private_hooks() -> None:
    """extension.py Herd overrides both: uncalled, no herd kernel manager, no pools started."""
    from jupyter_server.extension.application import ExtensionApp

    from herd_nb.extension import Herd

    link = ExtensionApp._link_jupyter_server_extension
    start = ExtensionApp._start_jupyter_server_extension
    assert not inspect.iscoroutinefunction(link)
    assert inspect.iscoroutinefunction(start)
    assert inspect.iscoroutinefunction(Herd._start_jupyter_server_extension)
    for name in ("_link_jupyter_server_extension", "_start_jupyter_server_extension"):
        why = _binds(getattr(Herd, name), getattr(ExtensionApp, name))
        assert why is None, why
    # jupyter_server's ExtensionPoint finds both by name on the extension's app.
    from jupyter_server.extension.manager import ExtensionPoint

    points = _source(ExtensionPoint)
    assert "self.app._link_jupyter_server_extension" in points
    assert "self.app._start_jupyter_server_extension" in points


def test_tz_utcnow() -> None:
    """kernelmanager.py imports jupyter_server._tz.utcnow (last_activity): else no import."""
    from jupyter_server._tz import utcnow

    assert utcnow().tzinfo is not None


def test_websocket_v1_message_helpers() -> None:
    """websocket.py, kernelmanager.py _herd_tell use the v1 helpers: else no cell tracking."""
    from jupyter_client.session import Session
    from jupyter_server.services.kernels.connection.base import (
        deserialize_msg_from_ws_v1,
        serialize_msg_to_ws_v1,
    )

    session = Session(key=b"")
    msg = session.msg("execute_request", {"code": "1"})
    # (untyped upstream)
    wire = serialize_msg_to_ws_v1(msg, "shell", session.pack)  # type: ignore[no-untyped-call]
    channel, parts = deserialize_msg_from_ws_v1(wire)  # type: ignore[no-untyped-call]
    assert channel == "shell"
    assert session.unpack(parts[0])["msg_type"] == "execute_request"


def test_websocket_connection_restart_callback() -> None:
    """kernelmanager.py _herd_tell finds connections by these: else no 'died' message."""
    from jupyter_server.services.kernels.connection.channels import (
        ZMQChannelsWebsocketConnection as Connection,
    )

    connect = re.sub(r"\s+", "", _source(Connection.connect))
    assert "add_restart_callback(self.kernel_id,self.on_kernel_restarted)" in connect
    for name in ("channels", "session", "subprotocol"):
        assert name in Connection.class_traits() or hasattr(Connection, name), name
    assert hasattr(Connection, "write_message")  # (a property: the handler's)


def test_websocket_mixin_check_origin() -> None:
    """handlers.py HerdProxyHandler.check_websocket_origin calls it unbound: else no WebSockets."""
    from jupyter_server.base.handlers import JupyterHandler
    from jupyter_server.base.websocket import WebSocketMixin

    check = WebSocketMixin.check_origin
    assert inspect.isfunction(check)
    assert list(inspect.signature(check).parameters) == ["self", "origin"]
    used = set(re.findall(r"self\.(\w+)", _source(check)))
    instance = _assigned(RequestHandler.__init__)  # request, application...
    missing = {name for name in used if not hasattr(JupyterHandler, name)} - instance
    assert not missing, f"check_origin reads what JupyterHandler lacks: {missing}"


# -- ipykernel, ipywidgets ---------------------------------------------------------------


def test_ipykernel_allow_stdin() -> None:
    """magics.py HerdMagics.herd reads kernel._allow_stdin: renamed, remote input() never asks."""
    from ipykernel.ipkernel import IPythonKernel
    from ipykernel.kernelbase import Kernel

    assert isinstance(Kernel.class_traits()["_allow_stdin"], traitlets.Bool)
    assert "_allow_stdin" in _assigned(IPythonKernel._forward_input)


def test_ipywidgets_view_count_and_mimebundle() -> None:
    """dashboard.py Dashboard uses _view_count, _repr_mimebundle_: else no pause, no display."""
    import ipywidgets  # type: ignore[import-untyped]

    trait = ipywidgets.Widget.class_traits()["_view_count"]
    assert isinstance(trait, traitlets.Int)
    assert trait.allow_none
    assert trait.metadata.get("sync") is True
    bundle = ipywidgets.Widget._repr_mimebundle_
    assert list(inspect.signature(bundle).parameters) == ["self", "kwargs"]


# -- generic -----------------------------------------------------------------------------

#: Upstream private names herd uses on purpose from its subclasses, each pinned above.
_PINNED = frozenset(
    {
        "_create_stream",
        "_finished",
        "_headers",
        "_write_buffer",
        "_connections",
        "_kernels",
        "_kernel_connections",
        "_kernel_ports",
        "_check_kernel_id",
        "_finish_kernel_start",
        "_initialized_culler",
        "_context_default",
        "_async_shutdown_kernel",
        "_async_restart_kernel",
        "_link_jupyter_server_extension",
        "_start_jupyter_server_extension",
        "_view_count",
        "_repr_mimebundle_",
    }
)


def _herd_names(cls: type) -> tuple[set[str], set[str]]:
    """Private names herd's classes in ``cls``'s MRO (defines or assigns, reads)."""
    defined: set[str] = set()
    read: set[str] = set()
    for klass in cls.__mro__:
        if not _ours(klass):
            continue
        source = _source(klass)
        defined |= set(re.findall(r"\bdef (_[a-z]\w*)", source))
        defined |= set(re.findall(r"self\.(_[a-z]\w*)\s*(?::[^=\n]+)?=(?!=)", source))
        defined |= set(re.findall(r"^    (_[a-z]\w*)\s*[:=]", source, re.MULTILINE))
        read |= set(re.findall(r"self\.(_[a-z]\w*)", source))
    return defined, read


def _upstream_names(cls: type) -> set[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        if _ours(klass) or klass is object:
            continue
        names |= {n for n in vars(klass) if n.startswith("_") and not n.startswith("__")}
        try:
            names |= set(re.findall(r"self\.(_[a-z]\w*)", _source(klass)))
        except (OSError, TypeError):
            pass
    return names


def test_herd_private_names_do_not_collide_with_upstream() -> None:
    """herd's private names in upstream subclasses aren't upstream's; those it reads are pinned."""
    problems = []
    for cls in _herd_classes():
        defined, read = _herd_names(cls)
        upstream = _upstream_names(cls)
        for name in sorted((defined & upstream) - _PINNED):
            problems.append(f"{cls.__qualname__}.{name} is upstream's too")
        for name in sorted(read - defined - _PINNED):
            problems.append(f"{cls.__qualname__} reads upstream's {name}: pin it here")
    assert not problems, "\n".join(problems)


def test_herd_overrides_accept_every_base_call() -> None:
    """herd's overrides of upstream methods accept every base call, async where the base is."""
    problems = []
    for cls in _herd_classes():
        for klass in cls.__mro__:
            if not _ours(klass):
                continue
            for name, ours in vars(klass).items():
                if not inspect.isfunction(ours) or name in ("__init__", "__init_subclass__"):
                    continue
                base = next(
                    (vars(b)[name] for b in cls.__mro__ if not _ours(b) and name in vars(b)),
                    None,
                )
                if not inspect.isfunction(base) or base.__name__ != name:
                    # Not a method but a placeholder under another name (Tornado's
                    # get = _unimplemented_method, initialize = _initialize): the
                    # route decides those signatures.
                    continue
                why = _binds(ours, base)
                if why is not None:
                    problems.append(f"{cls.__qualname__}: {why}")
                if inspect.iscoroutinefunction(base) and not inspect.iscoroutinefunction(ours):
                    problems.append(f"{cls.__qualname__}.{name}: base is a coroutine function")
    assert not problems, "\n".join(problems)
