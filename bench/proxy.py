"""Proxy benchmark: direct vs ``herd serve`` vs jupyter-server-proxy, one run, one table.

    python bench/proxy.py                 # full run (1 GiB transfers), a few minutes
    python bench/proxy.py --quick         # 2 s load runs, 256 MiB transfers
    python bench/proxy.py --json out.json
    python bench/proxy.py --isolation     # herd serve: tenant against process isolation
    python bench/proxy.py --against TREE  # herd serve: this checkout against another one

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
``--isolation process``: "no slower than before" measured in one run.

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
from dataclasses import asdict, dataclass

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
    pid: int | None  # the proxy process, for RSS (None: direct)

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


async def ws_round_trips(target: Target, size: int, seconds: float) -> float:
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    ws = await websocket_connect(
        HTTPRequest(target.ws, headers=target.headers), max_message_size=2**30
    )
    payload = os.urandom(size)
    count = 0
    stop_at = time.monotonic() + seconds
    while time.monotonic() < stop_at:
        await ws.write_message(payload, binary=True)
        reply = await ws.read_message()
        assert reply is not None
        assert len(reply) == size
        count += 1
    ws.close()
    return count / seconds


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


def upload(target: Target, size: int) -> tuple[float | None, int | None, str]:
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


def download(target: Target, size: int) -> tuple[float | None, int | None, str]:
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
        "--rounds",
        type=int,
        default=None,
        help="rounds per gateway with --isolation or --against (5; quick 3)",
    )
    args = parser.parse_args()
    seconds = 2.0 if args.quick else 5.0
    size = (256 if args.quick else 1024) << 20

    workdir = tempfile.mkdtemp(prefix="herd-bench-")
    backend_py = os.path.join(workdir, "backend.py")
    with open(backend_py, "w") as f:
        f.write(BACKEND)
    rounds = args.rounds or (3 if args.quick else 5)
    if args.isolation:
        variants: list[Variant] = [
            (isolation, herd_serve(0, backend_py, isolation), None) for isolation in ISOLATIONS
        ]
        compare_gateways(variants, seconds, rounds, args.json)
        return
    if args.against:
        other = os.path.abspath(args.against)
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        variants = [
            (
                name,
                herd_serve(0, backend_py, "process"),
                {**os.environ, "PYTHONPATH": tree},
            )
            for name, tree in (("this", here), (os.path.basename(other) or "that", other))
        ]
        compare_gateways(variants, seconds, rounds, args.json)
        return
    backend_port, herd_port, jsp_port = free_port(), free_port(), free_port()
    results: dict[str, dict[str, object]] = {}
    use_wrk = shutil.which("wrk") is not None
    jsp_available = jsp_version() != "not installed"

    with contextlib.ExitStack() as stack:
        stack.enter_context(running([sys.executable, backend_py, str(backend_port)]))
        herd_proc = stack.enter_context(running(herd_serve(herd_port, backend_py, "process")))
        targets = [
            Target("direct", f"http://127.0.0.1:{backend_port}", {}, None),
            Target(
                "herd", f"http://127.0.0.1:{herd_port}", {"X-Session-ID": "bench"}, herd_proc.pid
            ),
        ]
        if jsp_available:
            argv = [
                sys.executable,
                "-m",
                "jupyter_server",
                "--no-browser",
                "--ip=127.0.0.1",
                f"--port={jsp_port}",
                f"--IdentityProvider.token={TOKEN}",
                "--ServerApp.jpserver_extensions=jupyter_server_proxy=True",
                f"--ServerApp.root_dir={workdir}",
                "--ServerApp.disable_check_xsrf=True",
            ]
            if os.geteuid() == 0:
                argv.append("--allow-root")
            jsp_proc = stack.enter_context(running(argv, cwd=workdir))
            targets.append(
                Target(
                    "jsp",
                    f"http://127.0.0.1:{jsp_port}/proxy/{backend_port}",
                    {"Authorization": f"token {TOKEN}"},
                    jsp_proc.pid,
                )
            )
        for target in targets:
            wait_http(target.base + "/", target.headers)

        for target in targets:
            row: dict[str, object] = {}
            for connections in (1, 10):
                row[f"c{connections}"] = asdict(load_of(target, connections, seconds, use_wrk))
            for label, ws_size in (("64B", 64), ("1MB", 1 << 20)):
                row[f"ws_{label}"] = asyncio.run(ws_round_trips(target, ws_size, seconds))
            row["upload"] = upload(target, size)
            row["download"] = download(target, size)
            results[target.name] = row
            print(f"  measured {target.name}", file=sys.stderr, flush=True)

    print_table(results, size, use_wrk)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


# -- tenant against process isolation --------------------------------------------------

ISOLATIONS = ("tenant", "process")
# key: (label, format)
METRICS = {
    "rps_c1": ("HTTP req/s, 1 conn", "{:.0f}"),
    "p50_c1": ("HTTP p50 ms, 1 conn", "{:.3f}"),
    "rps_c10": ("HTTP req/s, 10 conn", "{:.0f}"),
    "p50_c10": ("HTTP p50 ms, 10 conn", "{:.2f}"),
    "ws_64B": ("WebSocket echo round trips/s 64B", "{:.0f}"),
}


def load_of(target: Target, connections: int, seconds: float, use_wrk: bool) -> Load:
    """HTTP load on ``target`` with wrk, or with the Python load generator."""
    if use_wrk:
        return wrk(target, connections, seconds)
    return asyncio.run(python_load(target, connections, seconds))


def one_round(target: Target, seconds: float, use_wrk: bool) -> dict[str, float]:
    row: dict[str, float] = {}
    for connections in (1, 10):
        load = load_of(target, connections, seconds, use_wrk)
        assert load.errors == 0, (target.name, load)
        row[f"rps_c{connections}"] = load.rps
        row[f"p50_c{connections}"] = load.p50_ms
    row["ws_64B"] = asyncio.run(ws_round_trips(target, 64, seconds))
    return row


Variant = tuple[str, list[str], dict[str, str] | None]  # name, herd serve argv, env


def compare_gateways(
    variants: list[Variant], seconds: float, rounds: int, json_path: str | None
) -> None:
    """Alternating rounds against two ``herd serve`` that differ in one thing."""
    use_wrk = shutil.which("wrk") is not None
    samples: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in variants}
    load = os.getloadavg()[0]
    with contextlib.ExitStack() as stack:
        targets = []
        for name, argv, env in variants:
            port = free_port()
            argv = [part.replace("{gateway_port}", str(port)) for part in argv]
            proc = stack.enter_context(running(argv, env=env))
            headers = {"X-Session-ID": "bench"}
            targets.append(Target(name, f"http://127.0.0.1:{port}", headers, proc.pid))
        for target in targets:
            wait_http(target.base + "/", target.headers)
            one_round(target, 1.0, use_wrk)  # warm up: the session's worker, connections
        for n in range(rounds):
            # Each gateway goes first in every other round: what a round does to
            # the machine (caches, the CPU's clock) falls on both alike.
            for target in targets if n % 2 == 0 else targets[::-1]:
                samples[target.name].append(one_round(target, seconds, use_wrk))
            print(f"  round {n + 1}/{rounds}", file=sys.stderr, flush=True)
    print_pair(samples, rounds, seconds, use_wrk, load)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(samples, f, indent=2)


def print_pair(
    samples: dict[str, list[dict[str, float]]],
    rounds: int,
    seconds: float,
    use_wrk: bool,
    load: float,
) -> None:
    tool = "wrk" if use_wrk else "python load generator"
    a, b = samples
    print(
        f"herd serve: {a} against {b} ({tool}; {rounds} alternating rounds "
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
    print(
        f"\n(per round: the lowest and highest {a}/{b} ratio of one round, "
        "both measured back to back)"
    )


def print_table(results: dict[str, dict[str, object]], size: int, use_wrk: bool) -> None:
    names = list(results)
    tool = "wrk" if use_wrk else "python load generator"
    print(
        f"herd proxy benchmark ({tool}; jupyter-server-proxy {jsp_version()}; "
        f"{os.cpu_count()} cores)"
    )
    print(f"{'':34}" + "".join(f"{n:>16}" for n in names))

    def line(label: str, cells: list[str]) -> None:
        print(f"{label:34}" + "".join(f"{c:>16}" for c in cells))

    for c in (1, 10):
        loads = [results[n][f"c{c}"] for n in names]
        line(f"HTTP req/s, {c} conn", [f"{x['rps']:.0f}" for x in loads])  # type: ignore[index]
        line(
            f"HTTP p50 / p99 ms, {c} conn",
            [f"{x['p50_ms']:.2f} / {x['p99_ms']:.2f}" for x in loads],
        )  # type: ignore[index]
    for label in ("64B", "1MB"):
        line(
            f"WebSocket echo round trips/s {label}",
            [f"{results[n][f'ws_{label}']:.0f}" for n in names],
        )
    failures = []
    for kind in ("upload", "download"):
        cells = []
        for n in names:
            elapsed, growth, note = results[n][kind]  # type: ignore[misc]
            text = f"{elapsed:.1f}s" if elapsed is not None else "FAILED"
            if elapsed is None:
                failures.append(f"  {n} {kind}: {note}")
            if growth is not None:
                text += f" +{growth >> 20}M"
            cells.append(text)
        line(f"{size >> 20} MiB {kind}: time, RSS growth", cells)
    if failures:
        print("\n".join(["failed transfers:", *failures]))

    print("\ntargets (ratios from this run)")
    herd, direct = results["herd"], results["direct"]
    checks: list[tuple[str, float | None, str, bool | None]] = []
    p50_overhead = herd["c1"]["p50_ms"] - direct["c1"]["p50_ms"]  # type: ignore[index]
    checks.append(
        ("herd p50 overhead over direct, 1 conn", p50_overhead, "≤ 0.3 ms", p50_overhead <= 0.3)
    )
    if "jsp" in results:
        jsp = results["jsp"]
        ratio = herd["c10"]["rps"] / jsp["c10"]["rps"]  # type: ignore[index]
        checks.append(("herd / jsp req/s, 10 conn", ratio, "≥ 4x", ratio >= 4))
        ws = herd["ws_64B"] / jsp["ws_64B"]  # type: ignore[operator]
        checks.append(("herd / jsp WebSocket 64 B round trips", ws, "≥ 1.5x", ws >= 1.5))
    for kind in ("upload", "download"):
        elapsed, growth, _ = herd[kind]  # type: ignore[misc]
        mib = None if growth is None else growth / 2**20
        checks.append(
            (
                f"herd RSS growth, {size >> 20} MiB {kind} (MiB)",
                mib,
                "≤ 64",
                elapsed is not None and mib is not None and mib <= 64,
            )
        )
    for label, value, target, ok in checks:
        shown = "-" if value is None else f"{value:.2f}"
        verdict = "ok" if ok else "MISS"
        print(f"  {label:44} {shown:>10}  {target:>10}  {verdict}")


if __name__ == "__main__":
    main()
