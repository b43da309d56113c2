"""Notebook start latency: stock ``jupyter server`` against ``jupyter server`` with herd_nb.

    python bench/kernels.py              # 20 sessions one at a time, 3 bursts of 8
    python bench/kernels.py --quick      # 8 sessions, 1 burst
    python bench/kernels.py --json out.json
    python bench/kernels.py --browser    # the user's view: JupyterLab in chromium (~10 min)

What is timed is what a JupyterLab user waits for when opening a notebook:
``POST /api/sessions`` → kernel WebSocket connected → ``execute_request`` →
the first ``execute_reply``. Both servers run on this machine in the same run,
one after the other, with the same client (jupyter_client's ``Session`` messages
over the server's JSON WebSocket protocol) and token authentication.

- **one at a time**: sessions opened one after the other; after each, the
  session is deleted and (herd) the warm pool is let refill, so every session
  finds warm kernels: the steady state of a server that is not overrun.
- **8 at once**: bursts of 8 sessions opened concurrently (herd: 8 warm kernels).
- **8 at once, floor**: 8 kernels already running and connected once; the
  time of 8 concurrent new WebSocket connects and first executes. No kernel is
  started in it: it is what the server and the kernels cost on this machine
  under the burst, the least the "8 at once" row can be.
- **back to back**: sessions opened as fast as possible with no pause, so the
  warm pool drains and herd falls back to starting kernels for the session: the
  worst case, shown so the other rows are read honestly.

``--browser`` times instead what the user sees in a real browser: from the click on
JupyterLab's Launcher tile to the output of ``1+1``, stock ``jupyter lab`` against
``jupyter lab`` with herd_nb's defaults, alternating, with the step-by-step timeline
of both and two floors (a second execute; a notebook whose kernel is already
running). ``bench/lab_open.py`` has the details.

Servers: **stock** is ``--ServerApp.jpserver_extensions=herd_nb=False``;
**nodelay** is stock plus only herd_nb's kernel WebSocket class (``TCP_NODELAY``,
which herd_nb sets), to show how much of the gain is that alone; **herd** is
herd_nb enabled with ``--Herd.warm_kernels=8``. Loopback only; every server is
stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from jupyter_client.jsonutil import json_default
from jupyter_client.session import Session
from proxy import free_port, running  # bench/proxy.py: the same process handling
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect

TOKEN = "herd-bench"
WARM = 8


@dataclass
class Server:
    name: str
    base: str
    proc: subprocess.Popen[bytes]

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        request = HTTPRequest(
            self.base + path,
            method=method,
            headers={"Authorization": f"token {TOKEN}"},
            body=json.dumps(body) if body is not None else (b"" if method == "POST" else None),
            request_timeout=120,
        )
        reply = await AsyncHTTPClient().fetch(request)
        return json.loads(reply.body) if reply.body else None

    async def warm(self) -> int:
        """Idle warm kernels (0 without herd's kernel pool)."""
        if self.name != "herd":
            return 0
        pools = (await self.call("GET", "/herd/api/stats"))["pools"]
        return int(pools["kernels:python3"]["available_workers"])

    async def wait_warm(self, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.name == "herd" and await self.warm() < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: pool did not refill to {count}")
            await asyncio.sleep(0.05)


@contextlib.contextmanager
def jupyter_server(name: str, root: Path, warm: int = WARM) -> Iterator[Server]:
    port = free_port()
    argv = [
        "jupyter",
        "server",
        f"--ServerApp.jpserver_extensions=herd_nb={name == 'herd'}",
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        "--port-retries=0",
        f"--IdentityProvider.token={TOKEN}",
        f"--ServerApp.root_dir={root}",
    ]
    if name == "herd":
        argv += [f"--Herd.warm_kernels={warm}", "--Herd.max_workers=64", "--Herd.ttl=0"]
    if name == "nodelay":
        argv.append(
            "--ServerApp.kernel_websocket_connection_class="
            "herd_nb.websocket.NoDelayWebsocketConnection"
        )
    if os.geteuid() == 0:
        argv.append("--allow-root")
    with running(argv) as proc:
        yield Server(name, f"http://127.0.0.1:{port}", proc)


async def ready(server: Server, timeout: float = 120, warm: int = WARM) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            await server.call("GET", "/api/status")
            break
        except OSError:
            if server.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{server.name} server did not start") from None
            await asyncio.sleep(0.1)
    await server.wait_warm(warm, timeout)


async def first_reply(server: Server, path: str) -> tuple[float, str]:
    """Seconds from POST /api/sessions to the first execute_reply; the session ID."""
    started = time.perf_counter()
    body = {"path": path, "type": "notebook", "kernel": {"name": "python3"}}
    model = await server.call("POST", "/api/sessions", body)
    await execute_once(server, model["kernel"]["id"])
    return time.perf_counter() - started, str(model["id"])


async def execute_once(server: Server, kernel_id: str, code: str = "1 + 1") -> float:
    """Connect a kernel WebSocket and run ``code``: seconds to its execute_reply."""
    started = time.perf_counter()
    session = Session(session=uuid.uuid4().hex, username="bench")
    url = server.base.replace("http", "ws", 1)
    url += f"/api/kernels/{kernel_id}/channels?session_id={session.session}"
    conn = await websocket_connect(
        HTTPRequest(url, headers={"Authorization": f"token {TOKEN}"}, connect_timeout=60)
    )
    try:
        msg = session.msg("execute_request", {"code": code, "silent": False})
        msg["channel"] = "shell"
        conn.write_message(json.dumps(msg, default=json_default))
        while True:
            raw = await asyncio.wait_for(conn.read_message(), 120)
            if raw is None:
                raise RuntimeError("kernel WebSocket closed")
            reply = json.loads(raw)
            if (
                reply["msg_type"] == "execute_reply"
                and reply["parent_header"]["msg_id"] == msg["header"]["msg_id"]
            ):
                return time.perf_counter() - started
    finally:
        conn.close()


async def close_all(server: Server, ids: list[str]) -> None:
    await asyncio.gather(*(server.call("DELETE", f"/api/sessions/{sid}") for sid in ids))


@dataclass
class Row:
    scenario: str
    server: str
    samples: int
    p50_ms: float
    p95_ms: float
    max_ms: float


def row(scenario: str, server: str, seconds: list[float]) -> Row:
    ms = sorted(s * 1000 for s in seconds)
    p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
    return Row(scenario, server, len(ms), statistics.median(ms), p95, ms[-1])


async def measure(server: Server, sessions: int, bursts: int) -> list[Row]:
    rows = []
    seconds = []
    for i in range(sessions):  # one at a time, pool refilled in between
        await server.wait_warm(WARM)
        elapsed, sid = await first_reply(server, f"one/nb{i}.ipynb")
        seconds.append(elapsed)
        await close_all(server, [sid])
    rows.append(row("one at a time", server.name, seconds))

    seconds = []
    for burst in range(bursts):
        await server.wait_warm(WARM)
        results = await asyncio.gather(
            *(first_reply(server, f"burst{burst}/nb{i}.ipynb") for i in range(8))
        )
        seconds += [elapsed for elapsed, _ in results]
        await close_all(server, [sid for _, sid in results])
    rows.append(row("8 at once", server.name, seconds))

    # The floor under a burst: the same 8 connects and first executes on kernels
    # that are already running (no kernel start, herd or stock, in the timing).
    await server.wait_warm(WARM)
    body = {"type": "notebook", "kernel": {"name": "python3"}}
    models = [
        await server.call("POST", "/api/sessions", {**body, "path": f"floor/nb{i}.ipynb"})
        for i in range(8)
    ]
    await asyncio.gather(*(execute_once(server, m["kernel"]["id"]) for m in models))
    seconds = list(await asyncio.gather(*(execute_once(server, m["kernel"]["id"]) for m in models)))
    await close_all(server, [m["id"] for m in models])
    rows.append(row("8 at once, floor", server.name, seconds))

    seconds, ids = [], []
    await server.wait_warm(WARM)
    for i in range(sessions):  # back to back: the warm pool drains
        elapsed, sid = await first_reply(server, f"b2b/nb{i}.ipynb")
        seconds.append(elapsed)
        ids.append(sid)
    await close_all(server, ids)
    rows.append(row("back to back, no pause", server.name, seconds))
    return rows


def table(rows: list[Row]) -> str:
    lines = [
        f"{'scenario':<24}{'server':<8}{'n':>4}{'p50 ms':>10}{'p95 ms':>10}{'max ms':>10}"
        f"{'p50 stock/herd':>16}",
        "-" * 82,
    ]
    stock = {r.scenario: r for r in rows if r.server == "stock"}
    for r in rows:
        ratio = ""
        if r.server != "stock" and r.scenario in stock:
            ratio = f"{stock[r.scenario].p50_ms / r.p50_ms:.1f}x"
        lines.append(
            f"{r.scenario:<24}{r.server:<8}{r.samples:>4}{r.p50_ms:>10.1f}{r.p95_ms:>10.1f}"
            f"{r.max_ms:>10.1f}{ratio:>16}"
        )
    return "\n".join(lines)


async def run(sessions: int, bursts: int) -> list[Row]:
    rows: list[Row] = []
    for name in ("stock", "nodelay", "herd"):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            for folder in ("one", "b2b", "floor", *(f"burst{b}" for b in range(bursts))):
                (root / folder).mkdir()
            with jupyter_server(name, root) as server:
                await ready(server)
                rows += await measure(server, sessions, bursts)
        print(f"{name}: done", file=sys.stderr)
    return rows


def git_state() -> str:
    """The commit, and the files of herd/ and herd_nb/ changed on top of it."""
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "log", "-1", "--format=%h %s"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--", "herd", "herd_nb"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return "no git"
    dirty = [line[3:] for line in changed if line.strip()]
    return f"{head}" + (f"; uncommitted: {', '.join(dirty)}" if dirty else "; clean")


def browser_main(rounds: int, json_path: str | None) -> None:
    """``--browser``: JupyterLab in chromium, stock against herd_nb (bench/lab_open.py)."""
    import lab_open  # only now: the other scenarios do without Playwright

    versions = ", ".join(f"{name} {version(name)}" for name in ("jupyterlab", "jupyter_server"))
    # The servers import herd_nb once, at start; herd's kernels run herd/_init.py from
    # the tree at every start: say so if the tree changes during the run.
    measured = git_state()
    print(f"herd at start: {measured}", file=sys.stderr)
    results = lab_open.run(rounds, progress=lambda line: print(line, file=sys.stderr))
    after = git_state()
    print(
        f"JupyterLab: click on the Launcher's Python 3 tile -> output of 1+1 "
        f"({versions}; chromium {results.browser}; {os.cpu_count()} cores, "
        f"1-min load {results.load[0]:.1f} before, {results.load[1]:.1f} after)"
    )
    print(f"herd at start: {measured}; herd_nb's defaults (warm_kernels={lab_open.WARM})")
    if after != measured:
        print(f"herd at the end (the tree changed during the run): {after}")
    print(lab_open.table(results))
    for scenario in (lab_open.LAUNCHER, lab_open.DRAINED, lab_open.RUNNING):
        print(f"\nwhere the time goes: {scenario}")
        print(lab_open.breakdown(results, scenario))
    problems = {p for found in results.problems.values() for p in found}
    if problems:
        print("\nthe pages reported:\n  " + "\n  ".join(sorted(problems)))
    print(
        f"\nprocesses seen (servers, kernels, chromium): {len(results.seen)}; "
        f"alive after: {len(results.alive_after)}"
    )
    for line in results.alive_after:
        print(f"  still running: {line}")
    if json_path:
        rows = {
            scenario: {name: results.samples(scenario, name) for name in lab_open.SERVERS}
            for scenario in lab_open.SCENARIOS
        }
        marks = {
            scenario: {
                name: [{**o.marks, **o.server} for o in results.opens[scenario][name]]
                for name in lab_open.SERVERS
            }
            for scenario in results.opens
        }
        Path(json_path).write_text(json.dumps({"ms": rows, "opens": marks}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 sessions, 1 burst")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    parser.add_argument(
        "--browser",
        action="store_true",
        help="the user's view: JupyterLab in chromium, click to first output",
    )
    parser.add_argument(
        "--rounds", type=int, default=12, help="--browser: rounds per server (default 12)"
    )
    args = parser.parse_args()
    if args.browser:
        browser_main(3 if args.quick else args.rounds, args.json)
        return
    sessions, bursts = (8, 1) if args.quick else (20, 3)
    rows = asyncio.run(run(sessions, bursts))
    print(table(rows))
    herd_p50 = {r.scenario: r for r in rows if r.server == "herd"}
    stock_p50 = {r.scenario: r for r in rows if r.server == "stock"}
    one, burst = "one at a time", "8 at once"
    print(
        f"\ntargets: herd p50 >= 10x faster than stock "
        f"({stock_p50[one].p50_ms / herd_p50[one].p50_ms:.1f}x one at a time, "
        f"{stock_p50[burst].p50_ms / herd_p50[burst].p50_ms:.1f}x 8 at once); "
        f"herd p95 < 100 ms with warm kernels "
        f"({herd_p50[one].p95_ms:.0f} ms, {herd_p50[burst].p95_ms:.0f} ms)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=2))


if __name__ == "__main__":
    main()
