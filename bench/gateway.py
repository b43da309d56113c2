"""Kernel gateway benchmark: ``herd serve --kernel`` against Jupyter Kernel Gateway 3.0.

    python bench/gateway.py            # 6 rounds, 300 round trips, 50 sessions at once
    python bench/gateway.py --quick    # 3 rounds, 100 round trips, 20 sessions
    python bench/gateway.py --json out.json

Needs jupyter_kernel_gateway 3.0 (``pip install -e '.[bench]'``). Three servers run
in one process tree, on loopback, with the same python3 kernelspec and a token:

- herd: ``herd serve --kernel python3 --warm 2``;
- kg: ``jupyter kernelgateway`` (its jupyter-websocket mode), no prespawn;
- kg-prespawn: the same with ``--KernelGatewayApp.prespawn_count`` (a client then
  picks a prespawned kernel from ``GET /api/kernels`` instead of starting one).

Measured, in rounds that alternate the order of the servers (medians):

1. **new session → first result** of ``1 + 1``: herd's ``POST
   /sessions/{id}/execute?wait=1`` of a new session ID, against Kernel Gateway's
   ``POST /api/kernels`` (or a prespawned kernel) + a WebSocket to its channels +
   ``execute_request``, until the ``execute_reply``. Before each timed herd
   round the bench waits for herd's warm spares to be back (it refills them in
   the background), and before each Kernel Gateway round for herd to be idle.
2. **a trivial cell's round trip on a live session** (``pass``): herd's execute
   route, against a direct jupyter_client execute on a kernel of the bench's own
   (the anchor: what no gateway can beat), and Kernel Gateway's WebSocket, in 10
   batches that alternate their order. herd's client keeps its HTTP connection
   alive, as a program's client (requests.Session, httpx.Client) does.
3. **N sessions at once**: N new sessions each run ``1 + 1``, all started
   together; the time until the last result.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TOKEN = "bench-gateway-token"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running(argv: list[str], cwd: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with_kill = proc.poll() is None
            if with_kill:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def call(base: str, method: str, path: str, body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, method=method, data=data)
    request.add_header("Authorization", f"token {TOKEN}")
    with urllib.request.urlopen(request, timeout=120) as reply:
        raw = reply.read()
    return json.loads(raw) if raw else None


def wait_up(base: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            call(base, "GET", "/api/kernelspecs")
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def herd_spares(base: str) -> int:
    pools = call(base, "GET", "/herd/api/stats")["pools"]
    stats = pools.get("kernels:python3")
    return int(stats["available_workers"]) if stats else 0


def wait_for(predicate: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("the servers did not settle")
        time.sleep(0.1)


async def ws_execute(base: str, kernel_id: str, code: str, *, times: int = 1) -> list[float]:
    """Connect to ``kernel_id``'s channels and run ``code`` ``times`` times; the
    seconds from each execute_request to its execute_reply (the first includes
    nothing of the connection: the caller times that)."""
    from jupyter_client.session import Session
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    session = Session(session=uuid.uuid4().hex, username="bench")
    url = base.replace("http", "ws", 1) + f"/api/kernels/{kernel_id}/channels"
    conn = await websocket_connect(
        HTTPRequest(url, headers={"Authorization": f"token {TOKEN}"}, request_timeout=120)
    )
    took = []
    try:
        for _ in range(times):
            msg = session.msg("execute_request", {"code": code, "silent": False})
            msg["channel"] = "shell"
            started = time.perf_counter()
            conn.write_message(json.dumps(msg, default=str))
            msg_id = msg["header"]["msg_id"]
            while True:
                raw = await asyncio.wait_for(conn.read_message(), 120)
                assert raw is not None, "the gateway closed the WebSocket"
                reply = json.loads(raw)
                if (
                    reply.get("msg_type") == "execute_reply"
                    and reply["parent_header"].get("msg_id") == msg_id
                ):
                    break
            took.append(time.perf_counter() - started)
    finally:
        conn.close()
    return took


async def kg_first_result(base: str, prespawned: str | None) -> float:
    started = time.perf_counter()
    if prespawned is None:
        kernel_id = (await asyncio.to_thread(call, base, "POST", "/api/kernels", {}))["id"]
    else:
        kernel_id = prespawned
    await ws_execute(base, kernel_id, "1 + 1")
    took = time.perf_counter() - started
    await asyncio.to_thread(call, base, "DELETE", f"/api/kernels/{kernel_id}")
    return took


def herd_first_result(base: str) -> float:
    session = uuid.uuid4().hex
    started = time.perf_counter()
    events = call(base, "POST", f"/sessions/{session}/execute?wait=1", {"code": "1 + 1"})
    took = time.perf_counter() - started
    assert events["events"][-1]["status"] == "ok", events
    call(base, "DELETE", f"/sessions/{session}")
    return took


def round_trips(herd: str, kg: str, times: int, batches: int) -> dict[str, list[float]]:
    """``pass`` on a live session, in batches that alternate their order: a kernel
    of the bench's own through jupyter_client (the anchor), herd's execute route,
    and Kernel Gateway's WebSocket."""
    from jupyter_client.manager import start_new_kernel

    manager, client = start_new_kernel(kernel_name="python3")
    session = uuid.uuid4().hex
    call(herd, "POST", f"/sessions/{session}/execute?wait=1", {"code": "1"})
    kernel_id = call(kg, "POST", "/api/kernels", {})["id"]
    asyncio.run(ws_execute(kg, kernel_id, "1"))
    took: dict[str, list[float]] = {"direct": [], "herd": [], "kg": []}

    def direct(count: int) -> list[float]:
        values = []
        for _ in range(count):
            started = time.perf_counter()
            client.execute_interactive("pass", timeout=60, output_hook=lambda msg: None)
            values.append(time.perf_counter() - started)
        return values

    # One kept-alive connection, as a program's HTTP client (requests.Session,
    # httpx.Client) keeps one: the kernel gateway's WebSocket is one connection too.
    conn = http.client.HTTPConnection("127.0.0.1", int(herd.rsplit(":", 1)[1]), timeout=60)
    body = json.dumps({"code": "pass"})
    headers = {"Authorization": f"token {TOKEN}", "Content-Type": "application/json"}

    def via_herd(count: int) -> list[float]:
        values = []
        for _ in range(count):
            started = time.perf_counter()
            conn.request("POST", f"/sessions/{session}/execute?wait=1", body, headers)
            answer = conn.getresponse().read()
            values.append(time.perf_counter() - started)
            assert b'"ok"' in answer, answer
        return values

    def via_kg(count: int) -> list[float]:
        return asyncio.run(ws_execute(kg, kernel_id, "pass", times=count))

    steps = {"direct": direct, "herd": via_herd, "kg": via_kg}
    try:
        for batch in range(batches):
            names = list(steps) if batch % 2 == 0 else list(steps)[::-1]
            for name in names:
                took[name] += steps[name](times // batches)
    finally:
        conn.close()
        client.stop_channels()
        manager.shutdown_kernel(now=True)
        call(herd, "DELETE", f"/sessions/{session}")
        call(kg, "DELETE", f"/api/kernels/{kernel_id}")
    return took


async def herd_many(base: str, count: int) -> float:
    ids = [uuid.uuid4().hex for _ in range(count)]
    started = time.perf_counter()
    await asyncio.gather(
        *(
            asyncio.to_thread(call, base, "POST", f"/sessions/{s}/execute?wait=1", {"code": "1+1"})
            for s in ids
        )
    )
    took = time.perf_counter() - started
    await asyncio.gather(*(asyncio.to_thread(call, base, "DELETE", f"/sessions/{s}") for s in ids))
    return took


async def kg_many(base: str, count: int) -> float:
    started = time.perf_counter()

    async def one() -> str:
        kernel_id: str = (await asyncio.to_thread(call, base, "POST", "/api/kernels", {}))["id"]
        await ws_execute(base, kernel_id, "1 + 1")
        return kernel_id

    kernels = await asyncio.gather(*(one() for _ in range(count)))
    took = time.perf_counter() - started
    await asyncio.gather(
        *(asyncio.to_thread(call, base, "DELETE", f"/api/kernels/{k}") for k in kernels)
    )
    return took


def ms(values: list[float]) -> str:
    return f"{1000 * statistics.median(values):.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    rounds, trips, many = (3, 100, 20) if args.quick else (6, 300, 50)
    if shutil.which("jupyter-kernelgateway") is None:
        sys.exit("needs jupyter_kernel_gateway 3.0: pip install -e '.[bench]'")
    work = tempfile.mkdtemp(prefix="herd-bench-gateway-")
    herd_port, kg_port, pre_port = free_port(), free_port(), free_port()
    herd = f"http://127.0.0.1:{herd_port}"
    kg = f"http://127.0.0.1:{kg_port}"
    pre = f"http://127.0.0.1:{pre_port}"
    herd_argv = [sys.executable, "-m", "herd", "serve", "--kernel", "python3", "--warm", "2"]
    herd_argv += ["--port", str(herd_port), "--token", TOKEN, "--max", str(many + 10)]
    herd_argv += ["--cwd", work, "--ttl", "0"]
    kg_argv = ["jupyter-kernelgateway", f"--KernelGatewayApp.auth_token={TOKEN}"]
    kg_argv += [
        "--KernelGatewayApp.ip=127.0.0.1",
        "--JupyterWebsocketPersonality.list_kernels=True",
    ]
    results: dict[str, Any] = {}
    with (
        running(herd_argv, work),
        running([*kg_argv, f"--KernelGatewayApp.port={kg_port}"], work),
        running(
            [
                *kg_argv,
                f"--KernelGatewayApp.port={pre_port}",
                f"--KernelGatewayApp.prespawn_count={rounds}",
            ],
            work,
        ),
    ):
        for base in (herd, kg, pre):
            wait_up(base)
        wait_for(lambda: herd_spares(herd) >= 2, 120)
        wait_for(lambda: len(call(pre, "GET", "/api/kernels")) >= rounds, 120)
        prespawned = [k["id"] for k in call(pre, "GET", "/api/kernels")]
        time.sleep(2)  # every kernel started and idle

        first: dict[str, list[float]] = {"herd": [], "kg": [], "kg-prespawn": []}
        for n in range(rounds):
            order = ["herd", "kg", "kg-prespawn"]
            for name in order if n % 2 == 0 else order[::-1]:
                wait_for(lambda: herd_spares(herd) >= 2, 120)
                time.sleep(1)  # the refill's kernel settled
                if name == "herd":
                    first[name].append(herd_first_result(herd))
                elif name == "kg":
                    first[name].append(asyncio.run(kg_first_result(kg, None)))
                else:
                    first[name].append(asyncio.run(kg_first_result(pre, prespawned[n])))
            print(f"first results, round {n + 1}/{rounds}", file=sys.stderr)
        results["first_result_s"] = first

        wait_for(lambda: herd_spares(herd) >= 2, 120)
        time.sleep(2)
        trip = round_trips(herd, kg, trips, batches=10)
        results["round_trip_s"] = trip
        print("round trips done", file=sys.stderr)

        wait_for(lambda: herd_spares(herd) >= 2, 120)
        time.sleep(2)
        at_once = {"herd": asyncio.run(herd_many(herd, many))}
        wait_for(lambda: herd_spares(herd) >= 2, 300)
        time.sleep(2)
        at_once["kg"] = asyncio.run(kg_many(kg, many))
        results["at_once_s"] = at_once
    shutil.rmtree(work, ignore_errors=True)

    print(f"\nherd serve --kernel against Jupyter Kernel Gateway 3.0, {rounds} rounds")
    print("\n1. new session -> first result of 1 + 1 (median)")
    for name, values in first.items():
        every = ", ".join(f"{1000 * v:.0f}" for v in values)
        print(f"   {name:<12} {ms(values):>10}   (all: {every})")
    herd_first = statistics.median(first["herd"])
    print(
        f"   herd is {statistics.median(first['kg']) / herd_first:.1f}x faster than kg "
        f"(target >= 10x) and {statistics.median(first['kg-prespawn']) / herd_first:.2f}x "
        "kg with prespawn (target > 1x)"
    )
    print(f"\n2. a trivial cell's round trip on a live session (p50 of {trips})")
    for name, values in trip.items():
        print(f"   {name:<12} {ms(values):>10}")
    added = 1000 * (statistics.median(trip["herd"]) - statistics.median(trip["direct"]))
    print(f"   herd adds {added:.2f} ms to a direct jupyter_client execute (target <= 2 ms)")
    print(f"\n3. {many} new sessions at once, until the last result")
    for name, value in at_once.items():
        print(f"   {name:<12} {value:>8.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
