"""Proxy benchmark: direct vs ``herd serve`` vs jupyter-server-proxy, one run, one table.

    python bench/proxy.py                 # full run (1 GiB transfers), a few minutes
    python bench/proxy.py --quick         # 2 s load runs, 256 MiB transfers
    python bench/proxy.py --json out.json
    python bench/proxy.py --isolation     # herd serve: tenant against process isolation
    python bench/proxy.py --against TREE  # herd serve: this checkout against another one
    python bench/proxy.py --against TREE --herd-nb  # the same for herd_nb's route in Jupyter

Needs jupyter_server and jupyter-server-proxy 4.x (``pip install -e '.[bench]'``)
and uses wrk for HTTP load when it is installed (Debian: ``apt-get install wrk``),
else a Python load generator (slower: its numbers only compare with each other).

The same backend program (a small Tornado app: ``GET /`` → 12 bytes, a WebSocket
echo, streaming upload and download) serves all three paths:

- direct: the backend on its own port;
- herd: ``herd serve`` runs the backend as its worker, routed by ``X-Session-ID``;
- jsp: ``jupyter server`` with jupyter-server-proxy, ``/proxy/<port>/`` to the
  backend, authenticated with a token header.

``herd serve`` runs with ``--isolation process`` (workers on the host's network),
as it did before tenant isolation became its default.

``--isolation`` measures something else: what tenant isolation costs the
gateway. Two ``herd serve`` run the same backend, one with ``--isolation
tenant`` (each worker in a network namespace of its own, reached through
sockets the gateway creates there with ``setns``), one with ``--isolation
process`` (the host's network); rounds of HTTP load and WebSocket echoes
alternate between them (in turn first and second), and the table has the
medians over the rounds and their ratios.

``--against TREE`` does the same for two versions of herd: ``herd serve`` of
this checkout against ``herd serve`` of the checkout at ``TREE`` (a ``git
worktree add TREE <commit>``, run with ``PYTHONPATH=TREE``), both with
``--isolation process``: "no slower than before" measured in one run. With
``--herd-nb``, the two are ``jupyter server``s with herd_nb, measured on their
``/herd/proxy/`` route (a token header, the backend as the process pool's worker).

Loopback only; every run is bounded in time and every process is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import cast

import psutil

BACKEND = r"""
import asyncio, sys, tornado.web, tornado.websocket
PATTERN = bytes(range(256)) * 256
class Hello(tornado.web.RequestHandler):
    def get(self): self.write("hello world\n")
@tornado.web.stream_request_body
class Upload(tornado.web.RequestHandler):
    def prepare(self):
        self.n = 0
        self.request.connection.set_max_body_size(2**40)
    def data_received(self, chunk): self.n += len(chunk)
    def post(self): self.write({"bytes": self.n})
class Download(tornado.web.RequestHandler):
    async def get(self, size):
        left = int(size)
        self.set_header("Content-Length", str(left))
        while left > 0:
            chunk = PATTERN[:min(left, len(PATTERN))]
            self.write(chunk); await self.flush(); left -= len(chunk)
class Echo(tornado.websocket.WebSocketHandler):
    def check_origin(self, origin): return True
    def on_message(self, m): self.write_message(m, binary=isinstance(m, bytes))
async def main():
    app = tornado.web.Application([(r"/", Hello), (r"/health", Hello), (r"/upload", Upload),
        (r"/download/(\d+)", Download), (r"/ws", Echo)], websocket_max_message_size=2**30)
    app.listen(int(sys.argv[1]), address="127.0.0.1", max_body_size=2**40)
    await asyncio.Event().wait()
asyncio.run(main())
"""

TOKEN = "herd-bench"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, headers: dict[str, str] | None = None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            request = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(request, timeout=2) as reply:
                reply.read()
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer within {timeout}s") from None
            time.sleep(0.1)


@dataclass
class Target:
    name: str
    base: str  # http://host:port/prefix (no trailing slash)
    headers: dict[str, str]
    pid: int | None  # the proxy process, for RSS and CPU (None: direct)
    forks: bool = False  # it relays in a child per connection (socat): their CPU counts

    @property
    def ws(self) -> str:
        return "ws" + self.base[4:] + "/ws"


@contextlib.contextmanager
def running(argv: list[str], **kwargs: object) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, **kwargs
    )  # type: ignore[call-overload]
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# -- HTTP load --------------------------------------------------------------------------


@dataclass
class Load:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def wrk(target: Target, connections: int, seconds: float) -> Load:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{int(seconds)}s", "--latency"]
    for name, value in target.headers.items():
        argv += ["-H", f"{name}: {value}"]
    out = subprocess.run(
        [*argv, target.base + "/"], capture_output=True, text=True, check=True, timeout=seconds + 30
    ).stdout

    def latency(label: str) -> float:
        match = re.search(rf"^\s*{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        assert match, out
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[match[2]]
        return float(match[1]) * scale

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])  # type: ignore[index]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return Load(rps, latency("50%"), latency("99%"), int(errors[1]) if errors else 0)


async def python_load(target: Target, connections: int, seconds: float) -> Load:
    """Keep-alive HTTP/1.1 GETs over raw sockets, for machines without wrk."""
    host, _, rest = target.base[7:].partition(":")
    port_text, _, prefix = rest.partition("/")
    head = f"GET /{prefix}{'/' if prefix else ''} HTTP/1.1\r\nHost: {host}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in target.headers.items()) + "\r\n"
    request = head.replace(f"/{prefix}/ ", f"/{prefix}/ ").encode()
    latencies: list[float] = []
    errors = 0
    stop_at = time.monotonic() + seconds

    async def client() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, int(port_text))
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            writer.write(request)
            status = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            latencies.append((time.perf_counter() - started) * 1000)
            if not status.startswith(b"HTTP/1.1 2"):
                errors += 1
        writer.close()

    await asyncio.gather(*(client() for _ in range(connections)))
    latencies.sort()
    return Load(
        len(latencies) / seconds,
        latencies[len(latencies) // 2],
        latencies[int(len(latencies) * 0.99)],
        errors,
    )


# -- WebSocket --------------------------------------------------------------------------


async def ws_round_trips(
    target: Target, size: int, seconds: float, cpu: dict[str, float] | None = None
) -> float:
    """Echo round trips per second; with ``cpu``, also the proxy's CPU per frame it
    relayed (see :func:`_cpu_times`), in µs, user and system apart (``ws_user_us``,
    ``ws_sys_us``)."""
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    ws = await websocket_connect(
        HTTPRequest(target.ws, headers=target.headers), max_message_size=2**30
    )
    payload = os.urandom(size)
    count = 0
    before = _cpu_times(target) if cpu is not None else None
    stop_at = time.monotonic() + seconds
    while time.monotonic() < stop_at:
        await ws.write_message(payload, binary=True)
        reply = await ws.read_message()
        assert reply is not None
        assert len(reply) == size
        count += 1
    after = _cpu_times(target) if before is not None else None
    ws.close()
    if cpu is not None and before is not None and after is not None:
        frames = 2 * count  # each round trip: one frame each way
        cpu["ws_user_us"] = (after[0] - before[0]) / frames * 1e6
        cpu["ws_sys_us"] = (after[1] - before[1]) / frames * 1e6
    return count / seconds


def _cpu_times(target: Target) -> tuple[float, float] | None:
    """User and system CPU seconds of the proxy (and of its live children, if it
    forks: not herd serve's, which are workers)."""
    if target.pid is None:
        return None
    try:
        procs = [psutil.Process(target.pid)]
        if target.forks:
            procs += procs[0].children(recursive=True)
        times = [proc.cpu_times() for proc in procs]
    except psutil.Error:
        return None
    return sum(t.user for t in times), sum(t.system for t in times)


# -- big transfers ----------------------------------------------------------------------


class PeakRSS:
    """Samples a process's RSS every 20 ms in a thread; .growth is the peak over the start."""

    def __init__(self, pid: int | None) -> None:
        self.proc = psutil.Process(pid) if pid else None
        self.start = self.peak = self.proc.memory_info().rss if self.proc else 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while self.proc is not None and not self._stop.wait(0.02):
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, self.proc.memory_info().rss)

    def stop(self) -> int | None:
        self._stop.set()
        self._thread.join()
        return self.peak - self.start if self.proc else None


Transfer = tuple[float | None, int | None, str]  # seconds (None: failed), RSS growth, note


def upload(target: Target, size: int) -> Transfer:
    host, _, rest = target.base[7:].partition(":")
    port_text, _, prefix = rest.partition("/")
    path = f"/{prefix}/upload" if prefix else "/upload"
    rss = PeakRSS(target.pid)
    started = time.perf_counter()
    chunk = os.urandom(1 << 20)
    try:
        with socket.create_connection((host, int(port_text)), timeout=120) as sock:
            head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {size}\r\n"
            head += "Connection: close\r\n"
            head += "".join(f"{k}: {v}\r\n" for k, v in target.headers.items()) + "\r\n"
            sock.sendall(head.encode())
            for _ in range(size // len(chunk)):
                sock.sendall(chunk)
            reply = sock.makefile("rb").read(4096)
        ok = reply.startswith(b"HTTP/1.1 200") and f'"bytes": {size}'.encode() in reply
        note = "ok" if ok else reply.split(b"\r\n")[0].decode(errors="replace")
    except OSError as exc:
        note = f"failed: {exc}"
    elapsed = time.perf_counter() - started
    growth = rss.stop()
    return (elapsed if note == "ok" else None), growth, note


def download(target: Target, size: int) -> Transfer:
    host, _, rest = target.base[7:].partition(":")
    port_text, _, prefix = rest.partition("/")
    path = f"/{prefix}/download/{size}" if prefix else f"/download/{size}"
    rss = PeakRSS(target.pid)
    started = time.perf_counter()
    received = 0
    try:
        with socket.create_connection((host, int(port_text)), timeout=120) as sock:
            head = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
            head += "".join(f"{k}: {v}\r\n" for k, v in target.headers.items()) + "\r\n"
            sock.sendall(head.encode())
            stream = sock.makefile("rb")
            status = stream.readline()
            while stream.readline() not in (b"\r\n", b""):
                pass
            while piece := stream.read(1 << 20):
                received += len(piece)
        ok = status.startswith(b"HTTP/1.1 200") and received == size
        note = "ok" if ok else f"{status.decode(errors='replace').strip()}, {received} bytes"
    except OSError as exc:
        note = f"failed after {received >> 20} MiB: {exc}"
    elapsed = time.perf_counter() - started
    growth = rss.stop()
    return (elapsed if note == "ok" else None), growth, note


# -- the run ----------------------------------------------------------------------------


def herd_serve(port: int, backend_py: str, isolation: str) -> list[str]:
    """``herd serve`` with the backend as its worker, one session per client header
    (``port`` 0: a ``{gateway_port}`` placeholder, filled in when it starts)."""
    return [
        *(sys.executable, "-m", "herd", "serve", "--port", str(port or "{gateway_port}")),
        *("--min", "1", "--max", "2", "--health-path", "/health"),
        *("--isolation", isolation, "--log-level", "warning"),
        *("--", sys.executable, backend_py, "{port}"),
    ]


def jsp_version() -> str:
    try:
        from importlib.metadata import version

        return version("jupyter-server-proxy")
    except Exception:
        return "not installed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs, 256 MiB transfers")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument(
        "--isolation",
        action="store_true",
        help="herd serve --isolation tenant against --isolation process instead",
    )
    parser.add_argument(
        "--against",
        metavar="TREE",
        help="herd serve of this checkout against that of another checkout instead",
    )
    parser.add_argument(
        "--herd-nb",
        action="store_true",
        help="with --against: herd_nb's /herd/proxy/ route in jupyter server, not herd serve",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="rounds per gateway with --isolation or --against (5; quick 3)",
    )
    args = parser.parse_args()
    # SIGTERM (a timeout, a kill) unwinds as an exception: every server started here
    # is stopped on the way out, not left running.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    seconds = 2.0 if args.quick else 5.0
    size = (256 if args.quick else 1024) << 20

    workdir = tempfile.mkdtemp(prefix="herd-bench-")
    backend_py = os.path.join(workdir, "backend.py")
    with open(backend_py, "w") as f:
        f.write(BACKEND)
    rounds = args.rounds or (3 if args.quick else 5)
    if args.isolation:
        variants: list[Variant] = [
            (isolation, herd_serve(0, backend_py, isolation), None, None)
            for isolation in ISOLATIONS
        ]
        compare_gateways(variants, seconds, rounds, args.json)
        return
    if args.against:
        other = os.path.abspath(args.against)
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if args.herd_nb:
            config = herd_nb_config(workdir, backend_py)
            argv = [*jupyter_server(0, workdir, TOKEN, "{'herd_nb': True}"), f"--config={config}"]
            path, headers = "/herd/proxy", {"Authorization": f"token {TOKEN}"}
        else:
            argv, path, headers = herd_serve(0, backend_py, "process"), "", {}
        variants = [
            (
                name,
                argv,
                {**os.environ, "PYTHONPATH": tree},
                # In the tree: ``python -m`` puts its working directory first on
                # sys.path, before PYTHONPATH (from this checkout, both would run it).
                tree,
            )
            for name, tree in (("this", here), (os.path.basename(other) or "that", other))
        ]
        compare_gateways(variants, seconds, rounds, args.json, path=path, headers=headers)
        return
    if args.herd_nb:
        parser.error("--herd-nb goes with --against")
    compare_all(workdir, backend_py, seconds, size, rounds, args.json)


def herd_nb_config(workdir: str, backend_py: str) -> str:
    """A ``jupyter_server_config.py`` whose herd_nb runs the backend as the process
    pool's worker (no warm kernels); its path."""
    config = os.path.join(workdir, "herd_nb_config.py")
    with open(config, "w") as f:
        f.write(
            f"c.Herd.command = [{sys.executable!r}, {backend_py!r}, '{{port}}']\n"
            "c.Herd.health_path = '/health'\n"
            "c.Herd.isolation = 'process'\n"
            "c.Herd.min_workers = 1\n"
            "c.Herd.warm_kernels = 0\n"
        )
    return config


def jupyter_server(port: int, workdir: str, token: str, extensions: str) -> list[str]:
    argv = [
        *(sys.executable, "-m", "jupyter_server", "--no-browser", "--ip=127.0.0.1"),
        f"--port={port or '{gateway_port}'}",  # (0: as herd_serve's)
        f"--IdentityProvider.token={token}",
        f"--ServerApp.jpserver_extensions={extensions}",
        f"--ServerApp.root_dir={workdir}",
        "--ServerApp.disable_check_xsrf=True",
        "--ServerApp.log_level=WARN",
    ]
    if os.geteuid() == 0:
        argv.append("--allow-root")
    return argv


def compare_all(
    workdir: str, backend_py: str, seconds: float, size: int, rounds: int, json_path: str | None
) -> None:
    """Every path in one run: alternating rounds of HTTP load (1, 10, 100 connections)
    and 64 B WebSocket echoes, then the transfers and 1 MB echoes once each."""
    use_wrk = shutil.which("wrk") is not None
    backend_port, herd_port = free_port(), free_port()
    load = os.getloadavg()[0]
    with contextlib.ExitStack() as stack:
        stack.enter_context(running([sys.executable, backend_py, str(backend_port)]))
        herd_proc = stack.enter_context(running(herd_serve(herd_port, backend_py, "process")))
        targets = [
            Target("direct", f"http://127.0.0.1:{backend_port}", {}, None),
            Target("herd", f"http://127.0.0.1:{herd_port}", {"X-Session-ID": "b"}, herd_proc.pid),
        ]
        if shutil.which("socat"):
            # The floor of any proxy: a C relay, one more hop and nothing else.
            socat_port = free_port()
            socat = stack.enter_context(
                running(
                    [
                        "socat",
                        f"TCP-LISTEN:{socat_port},bind=127.0.0.1,fork,reuseaddr,nodelay",
                        f"TCP:127.0.0.1:{backend_port},nodelay",
                    ]
                )
            )
            socat_base = f"http://127.0.0.1:{socat_port}"
            targets.append(Target("socat", socat_base, {}, socat.pid, forks=True))
        if jsp_version() != "not installed":
            # With a token (as users run it), and with authentication off (its
            # fastest); the first also serves herd_nb's process pool route.
            token_port, open_port = free_port(), free_port()
            extensions = "{'jupyter_server_proxy': True, 'herd_nb': True}"
            config = herd_nb_config(workdir, backend_py)
            argv = jupyter_server(token_port, workdir, TOKEN, extensions)
            argv.append(f"--config={config}")
            token_proc = stack.enter_context(running(argv, cwd=workdir))
            open_argv = jupyter_server(open_port, workdir, "", "{'jupyter_server_proxy': True}")
            open_proc = stack.enter_context(running(open_argv, cwd=workdir))
            auth = {"Authorization": f"token {TOKEN}"}
            jsp_path = f"/proxy/{backend_port}"
            targets += [
                Target("jsp", f"http://127.0.0.1:{token_port}{jsp_path}", auth, token_proc.pid),
                Target("jsp-open", f"http://127.0.0.1:{open_port}{jsp_path}", {}, open_proc.pid),
                Target(
                    "herd_nb",
                    f"http://127.0.0.1:{token_port}/herd/proxy",
                    {**auth, "X-Session-ID": "b"},
                    token_proc.pid,
                ),
            ]
        for target in targets:
            wait_http(target.base + "/", target.headers)
            one_round(target, 1.0, use_wrk)  # warm up: sessions, workers, connections
        samples: dict[str, list[dict[str, float]]] = {target.name: [] for target in targets}
        for n in range(rounds):
            # Each path in turn first: what a round does to the machine falls on all alike.
            shift = n % len(targets)
            for target in targets[shift:] + targets[:shift]:
                samples[target.name].append(one_round(target, seconds, use_wrk))
            print(f"  round {n + 1}/{rounds}", file=sys.stderr, flush=True)
        once: dict[str, dict[str, object]] = {}
        for target in targets:
            if target.name == "socat":
                continue
            once[target.name] = {
                "ws_1MB": asyncio.run(ws_round_trips(target, 1 << 20, seconds)),
                "upload": upload(target, size),
                "download": download(target, size),
            }
            print(f"  transfers through {target.name}", file=sys.stderr, flush=True)
    print_all(samples, once, size, rounds, seconds, use_wrk, load)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"rounds": samples, "once": once}, f, indent=2)


# -- tenant against process isolation --------------------------------------------------

ISOLATIONS = ("tenant", "process")
# key: (label, format)
METRICS = {
    "rps_c1": ("HTTP req/s, 1 conn", "{:.0f}"),
    "p50_c1": ("HTTP p50 ms, 1 conn", "{:.3f}"),
    "p99_c1": ("HTTP p99 ms, 1 conn", "{:.3f}"),
    "rps_c10": ("HTTP req/s, 10 conn", "{:.0f}"),
    "p50_c10": ("HTTP p50 ms, 10 conn", "{:.2f}"),
    "p99_c10": ("HTTP p99 ms, 10 conn", "{:.2f}"),
    "rps_c100": ("HTTP req/s, 100 conn", "{:.0f}"),
    "p50_c100": ("HTTP p50 ms, 100 conn", "{:.1f}"),
    "p99_c100": ("HTTP p99 ms, 100 conn", "{:.1f}"),
    "ws_64B": ("WebSocket echo round trips/s 64B", "{:.0f}"),
}
# The proxy's CPU per 64 B frame it relays during the echoes, in µs (not for direct).
CPU_METRICS = {
    "ws_user_us": "  proxy CPU per frame: user us",
    "ws_sys_us": "  proxy CPU per frame: system us",
}


def load_of(target: Target, connections: int, seconds: float, use_wrk: bool) -> Load:
    """HTTP load on ``target`` with wrk, or with the Python load generator."""
    if use_wrk:
        return wrk(target, connections, seconds)
    return asyncio.run(python_load(target, connections, seconds))


def one_round(target: Target, seconds: float, use_wrk: bool) -> dict[str, float]:
    row: dict[str, float] = {}
    cpu: dict[str, float] = {}  # the proxy's CPU per frame (none for direct)
    for connections in (1, 10, 100):
        load = load_of(target, connections, seconds, use_wrk)
        assert load.errors == 0, (target.name, load)
        row[f"rps_c{connections}"] = load.rps
        row[f"p50_c{connections}"] = load.p50_ms
        row[f"p99_c{connections}"] = load.p99_ms
    row["ws_64B"] = asyncio.run(ws_round_trips(target, 64, seconds, cpu))
    row.update(cpu)
    return row


# name, herd serve argv, env, working directory
Variant = tuple[str, list[str], dict[str, str] | None, str | None]


def compare_gateways(
    variants: list[Variant],
    seconds: float,
    rounds: int,
    json_path: str | None,
    *,
    path: str = "",
    headers: dict[str, str] | None = None,
) -> None:
    """Alternating rounds against two gateways that differ in one thing, at ``path``
    with ``headers`` (and a session ID)."""
    use_wrk = shutil.which("wrk") is not None
    samples: dict[str, list[dict[str, float]]] = {name: [] for name, *_ in variants}
    load = os.getloadavg()[0]
    with contextlib.ExitStack() as stack:
        targets = []
        for name, argv, env, cwd in variants:
            where = subprocess.run(
                [sys.executable, "-c", "import herd; print(herd.__file__)"],
                env=env,
                cwd=cwd,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            print(f"  {name}: {where}", file=sys.stderr, flush=True)
            port = free_port()
            argv = [part.replace("{gateway_port}", str(port)) for part in argv]
            proc = stack.enter_context(running(argv, env=env, cwd=cwd))
            target_headers = {**(headers or {}), "X-Session-ID": "bench"}
            base = f"http://127.0.0.1:{port}{path}"
            targets.append(Target(name, base, target_headers, proc.pid))
        for target in targets:
            wait_http(target.base + "/", target.headers)
            one_round(target, 1.0, use_wrk)  # warm up: the session's worker, connections
        for n in range(rounds):
            # Each gateway goes first in every other round: what a round does to
            # the machine (caches, the CPU's clock) falls on both alike.
            for target in targets if n % 2 == 0 else targets[::-1]:
                samples[target.name].append(one_round(target, seconds, use_wrk))
            print(f"  round {n + 1}/{rounds}", file=sys.stderr, flush=True)
    print_pair(samples, rounds, seconds, use_wrk, load, "herd_nb's route" if path else "herd serve")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(samples, f, indent=2)


def print_pair(
    samples: dict[str, list[dict[str, float]]],
    rounds: int,
    seconds: float,
    use_wrk: bool,
    load: float,
    what: str = "herd serve",
) -> None:
    tool = "wrk" if use_wrk else "python load generator"
    a, b = samples
    print(
        f"{what}: {a} against {b} ({tool}; {rounds} alternating rounds "
        f"of {seconds:g} s; medians; {os.cpu_count()} cores)"
    )
    print(f"load average at the start: {load:.2f}, at the end: {os.getloadavg()[0]:.2f}")
    header = [a, b, f"{a}/{b}", "per round"]
    print(f"{'':34}" + "".join(f"{h:>16}" for h in header))
    first, second = samples[a], samples[b]
    for key, (label, form) in METRICS.items():
        medians = [statistics.median(row[key] for row in rows) for rows in (first, second)]
        ratios = [t[key] / p[key] for t, p in zip(first, second, strict=True)]
        spread = f"{min(ratios):.2f}-{max(ratios):.2f}"
        cells = [form.format(m) for m in medians] + [f"{medians[0] / medians[1]:.2f}", spread]
        print(f"{label:34}" + "".join(f"{c:>16}" for c in cells))
    for key, label in CPU_METRICS.items():
        print(f"{label:34}" + "".join(f"{_cpu_cell(rows, key):>16}" for rows in (first, second)))
    print(
        f"\n(per round: the lowest and highest {a}/{b} ratio of one round, "
        "both measured back to back)"
    )


def print_all(
    samples: dict[str, list[dict[str, float]]],
    once: dict[str, dict[str, object]],
    size: int,
    rounds: int,
    seconds: float,
    use_wrk: bool,
    load: float,
) -> None:
    names = list(samples)
    tool = "wrk" if use_wrk else "python load generator"
    print(
        f"herd proxy benchmark ({tool}; jupyter-server-proxy {jsp_version()}; {rounds} "
        f"alternating rounds of {seconds:g} s, medians; {os.cpu_count()} cores)"
    )
    print(f"load average at the start: {load:.2f}, at the end: {os.getloadavg()[0]:.2f}")
    median = {
        name: {key: statistics.median(row[key] for row in rows) for key in METRICS}
        for name, rows in samples.items()
    }
    width = max(13, *(len(name) + 2 for name in names))

    def line(label: str, cells: list[str]) -> None:
        print(f"{label:34}" + "".join(f"{c:>{width}}" for c in cells))

    line("", names)
    for key, (label, form) in METRICS.items():
        line(label, [form.format(median[name][key]) for name in names])
    for key, label in CPU_METRICS.items():
        line(label, [_cpu_cell(samples[name], key) for name in names])
    line("WebSocket echo round trips/s 1MB", [_cell(once, n, "ws_1MB") for n in names])
    failures = []
    for kind in ("upload", "download"):
        cells = []
        for name in names:
            if name not in once:
                cells.append("-")
                continue
            elapsed, growth, note = cast(Transfer, once[name][kind])
            text = f"{elapsed:.1f}s" if elapsed is not None else "FAILED"
            if elapsed is None:
                failures.append(f"  {name} {kind}: {note}")
            if growth is not None:
                text += f" +{growth >> 20}M"
            cells.append(text)
        line(f"{size >> 20} MiB {kind}: time, RSS +", cells)
    if failures:
        print("\n".join(["failed transfers:", *failures]))

    herd, direct = median["herd"], median["direct"]
    checks: list[tuple[str, float | None, str, bool | None]] = []

    def ratio(label: str, value: float, target: str, ok: bool | None) -> None:
        checks.append((label, value, target, ok))

    for c in (10, 100):
        r = herd[f"rps_c{c}"] / direct[f"rps_c{c}"]
        ratio(f"herd / direct req/s, {c} conn", r, ">= 0.5", r >= 0.5)
    added = herd["p50_c1"] - direct["p50_c1"]
    ratio("herd p50 added over direct, 1 conn (ms)", added, "<= 0.3", added <= 0.3)
    added = herd["p99_c10"] - direct["p99_c10"]
    ratio("herd p99 added over direct, 10 conn (ms)", added, "<= 1", added <= 1.0)
    r = herd["ws_64B"] / direct["ws_64B"]
    ratio("herd / direct WebSocket 64 B", r, ">= 0.8", r >= 0.8)
    if "socat" in median:
        r = median["socat"]["ws_64B"] / direct["ws_64B"]
        ratio("  (socat / direct WebSocket 64 B: the floor)", r, "", None)
        r = herd["ws_64B"] / median["socat"]["ws_64B"]
        ratio("  (herd / socat WebSocket 64 B)", r, "", None)
    for name in ("jsp", "jsp-open"):
        if name in median:
            r = herd["rps_c10"] / median[name]["rps_c10"]
            ratio(f"herd / {name} req/s, 10 conn", r, ">= 5", r >= 5)
    for kind in ("upload", "download"):
        elapsed, growth, _ = cast(Transfer, once["herd"][kind])
        mib = -1.0 if growth is None else growth / 2**20
        ok = elapsed is not None and growth is not None and mib <= 64
        ratio(f"herd RSS growth, {size >> 20} MiB {kind} (MiB)", mib, "<= 64", ok)
    if "herd_nb" in median:
        nb = median["herd_nb"]
        for c in (1, 10):
            r = nb[f"rps_c{c}"] / median["jsp"][f"rps_c{c}"]
            ratio(f"herd_nb / jsp (one server) req/s, {c} conn", r, "", None)
        r = nb["rps_c10"] / direct["rps_c10"]
        ratio("herd_nb / direct req/s, 10 conn", r, "", None)
        added = nb["p50_c1"] - median["jsp"]["p50_c1"]
        ratio("herd_nb p50 over jsp's, 1 conn (ms)", added, "", None)
        r = nb["ws_64B"] / direct["ws_64B"]
        ratio("herd_nb / direct WebSocket 64 B", r, "", None)
    print("\ntargets (from the medians above)")
    for label, value, target, met in checks:
        shown = "-" if value is None else f"{value:.2f}"
        verdict = "" if met is None else "ok" if met else "MISS"
        print(f"  {label:46} {shown:>8}  {target:>8}  {verdict}")


def _cpu_cell(rows: list[dict[str, float]], key: str) -> str:
    values = [row[key] for row in rows if key in row]
    return f"{statistics.median(values):.1f}" if values else "-"


def _cell(once: dict[str, dict[str, object]], name: str, key: str) -> str:
    value = once.get(name, {}).get(key)
    return "-" if value is None else f"{value:.0f}"


if __name__ == "__main__":
    main()
