"""Soak: ``herd serve`` under load, worker kills, a slowloris and idle connections.

    python bench/soak.py                       # 10 minutes, as issue 14 asks
    python bench/soak.py --duration 60         # a short one
    python bench/soak.py --slowloris 0 --idle 0

Not a test (nothing is asserted): it prints what happened. One ``herd serve``
(``--max 16``, the test worker ``tests/helpers/web_worker.py``) on loopback, and
against it, at once:

- **load**: ``--connections`` keep-alive clients (default 200) sending ``GET
  /state`` for sessions picked at random among ``--sessions`` (default 50);
  a client whose connection is closed opens a new one;
- **kills**: every ``--kill-every`` seconds (default 5) a random worker is
  SIGKILLed (its launcher's process group: the worker and its sandbox);
- **slowloris**: ``--slowloris`` connections (default 5,000) that send a request
  head one byte every 10 s and never finish it;
- **idle**: ``--idle`` connections (default 2,000) that send nothing.

Reported: requests answered by status, 5xx by their JSON ``error``, client
connection errors, workers killed by the soak against workers herd declared
dead or retired on its own (from its log), and the gateway's RSS and open
descriptors, sampled every ``--sample-every`` seconds, with its sockets sorted
by whom they connect (clients, live workers, workers that are gone) and TCP
state. Target (issue 14): no healthy worker killed by herd, RSS and descriptors
flat, every request answered. Everything stops by itself after ``--duration``.

"Flat" compares a **steady state** (the first sample ``--steady-after`` seconds
in, default 60 or half the run if shorter, when every attack has started) with
the **end** (5 s after the last client left), not with the start. The start is
an idle gateway; the flood takes it to 7,000 open connections at once, and the
RSS those took (IOStreams, buffers, parsers) stays with the process after they
close: CPython's object arenas and glibc's heap keep their high-water mark
instead of returning it to the OS. That plateau is not a leak; growth while the
same load goes on is. So the RSS is flat if the end is within 10% of the steady
state, and the descriptors are flat if the end holds no more than the steady
state, no client connection (every client has left) and none of a worker
that is gone (its pipe, a socket to its port, a socket in ``CLOSE_WAIT``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

WORKER = Path(__file__).resolve().parents[1] / "tests" / "helpers" / "web_worker.py"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stats(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/herd/stats", timeout=10) as reply:
        data: dict[str, Any] = json.load(reply)
        return data


class Tally:
    def __init__(self) -> None:
        self.status: collections.Counter[int] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.client_errors: collections.Counter[str] = collections.Counter()
        self.killed_by_soak = 0


async def client(port: int, sessions: int, tally: Tally, until: float) -> None:
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    loop = asyncio.get_running_loop()
    while loop.time() < until:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert reader is not None
            session = f"s{random.randrange(sessions)}"
            writer.write(
                f"GET /state HTTP/1.1\r\nHost: x\r\nX-Session-ID: {session}\r\n\r\n".encode()
            )
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
            lines = head.split(b"\r\n")
            code = int(lines[0].split()[1])
            length = 0
            close = False
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
                if name.strip().lower() == b"connection" and b"close" in value.lower():
                    close = True
            body = await asyncio.wait_for(reader.readexactly(length), 60)
            tally.status[code] += 1
            if code >= 500:
                with contextlib.suppress(ValueError):
                    tally.errors[f"{code} {json.loads(body).get('error')}"] += 1
            if close:
                writer.close()
                writer = None
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
            tally.client_errors[type(exc).__name__] += 1
            if writer is not None:
                writer.close()
            writer = None
            await asyncio.sleep(0.05)
    if writer is not None:
        writer.close()


async def killer(port: int, every: float, tally: Tally, until: float) -> None:
    loop = asyncio.get_running_loop()
    while loop.time() + every < until:
        await asyncio.sleep(every)
        workers = (await asyncio.to_thread(stats, port))["workers"]
        if workers:
            pid = random.choice(workers)["pid"]
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
                tally.killed_by_soak += 1


async def slowloris(port: int, count: int, until: float) -> int:
    """Open ``count`` connections, each sending a head a byte every 10 s; how many
    the gateway took (not refused at once)."""
    writers: list[asyncio.StreamWriter] = []
    for _ in range(count):
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"G")
            writers.append(writer)
    loop = asyncio.get_running_loop()
    while loop.time() < until:
        await asyncio.sleep(10)
        for writer in writers:
            if not writer.is_closing():
                writer.write(b"E")
    alive = sum(not w.is_closing() for w in writers)
    for writer in writers:
        writer.close()
    return alive


async def idle(port: int, count: int, until: float) -> list[asyncio.StreamWriter]:
    writers = []
    for _ in range(count):
        with contextlib.suppress(OSError):
            writers.append((await asyncio.open_connection("127.0.0.1", port))[1])
    await asyncio.sleep(max(0.0, until - asyncio.get_running_loop().time()))
    for writer in writers:
        writer.close()
    return writers


def start(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """``argv`` in a session of its own, its output into ``log_path``."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)


def census(pid: int) -> tuple[float, int]:
    proc = psutil.Process(pid)
    return proc.memory_info().rss / 2**20, proc.num_fds()


def fd_kinds(pid: int) -> dict[str, int]:
    """The process's open descriptors by kind (socket, pipe, anon_inode:[pidfd], ...)."""
    kinds: collections.Counter[str] = collections.Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            kinds[target.split(":[")[0] if ":[" in target else target.rsplit("/", 1)[0]] += 1
    return dict(kinds)


_TCP_STATES = {"01": "ESTABLISHED", "06": "TIME_WAIT", "08": "CLOSE_WAIT", "0A": "LISTEN"}


def _tcp_sockets() -> dict[str, tuple[int, int, str]]:
    """Socket inode -> (local port, remote port, state), from /proc/net/tcp{,6}."""
    table = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(name) as rows:
            next(rows)
            for row in rows:
                fields = row.split()
                local, remote = (int(a.rsplit(":", 1)[1], 16) for a in fields[1:3])
                table[fields[9]] = (local, remote, _TCP_STATES.get(fields[3], fields[3]))
    return table


def sockets(pid: int, port: int, worker_ports: set[int]) -> dict[str, int]:
    """The process's TCP sockets by peer and state: ``client ESTABLISHED`` (its own
    ``port``), ``worker ...`` (a live worker's port), ``gone ...`` (any other: a
    worker that is gone), ``listening``; ``other`` for non-TCP sockets."""
    table = _tcp_sockets()
    kinds: collections.Counter[str] = collections.Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if not target.startswith("socket:["):
                continue
            found = table.get(target[len("socket:[") : -1])
            if found is None:
                kinds["other"] += 1
                continue
            local, remote, state = found
            if state == "LISTEN":
                kinds["listening"] += 1
            elif local == port:
                kinds[f"client {state}"] += 1
            else:
                kinds[f"{'worker' if remote in worker_ports else 'gone'} {state}"] += 1
    return dict(sorted(kinds.items()))


def _worker_ports(port: int) -> set[int]:
    workers = stats(port)["workers"]
    return {int(worker["address"].rsplit(":", 1)[1]) for worker in workers}


class Sample:
    """The gateway at one moment: seconds into the run, RSS, descriptors."""

    def __init__(self, at: float, pid: int, port: int) -> None:
        self.at = at
        self.workers = _worker_ports(port)
        time.sleep(0.1)  # for the gateway to close that request's connection
        self.rss, self.fds = census(pid)
        self.kinds = fd_kinds(pid)
        self.sockets = sockets(pid, port, self.workers)

    def line(self) -> str:
        return (
            f"{self.at:5.0f} s  RSS {self.rss:6.1f} MiB  fds {self.fds:5d}  "
            f"workers {len(self.workers):2d}  {self.sockets}"
        )

    def of_the_gone(self, start: Sample) -> dict[str, int]:
        """Descriptors of workers that are gone: sockets to their ports, sockets in
        CLOSE_WAIT, output pipes and pidfds beyond one per live worker (the event
        loop's own pipes and anon inodes are those of ``start`` less its workers)."""
        per_worker = {"pipe": "pipes", "anon_inode": "pidfds"}
        found = {
            "sockets": sum(n for kind, n in self.sockets.items() if kind.startswith("gone")),
            "CLOSE_WAIT": sum(
                n
                for kind, n in self.sockets.items()
                if kind.endswith("CLOSE_WAIT") and not kind.startswith("gone")
            ),
        }
        for kind, name in per_worker.items():
            base = start.kinds.get(kind, 0) - len(start.workers)
            found[name] = max(0, self.kinds.get(kind, 0) - base - len(self.workers))
        return {name: n for name, n in found.items() if n}

    def clients(self) -> int:
        return sum(n for kind, n in self.sockets.items() if kind.startswith("client"))


async def sampler(
    pid: int, port: int, every: float, started: float, samples: list[Sample], until: float
) -> None:
    loop = asyncio.get_running_loop()
    while loop.time() + every < until:
        await asyncio.sleep(every)
        at = time.monotonic() - started
        with contextlib.suppress(OSError, psutil.Error):
            samples.append(await asyncio.to_thread(Sample, at, pid, port))


async def main(args: argparse.Namespace) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.connections + args.slowloris + args.idle + 256
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, need), hard), hard))
    port = free_port()
    log_path = Path(tempfile.mkdtemp()) / "herd-serve.log"
    argv = [sys.executable, "-m", "herd", "serve", "--port", str(port), "--min", "4"]
    argv += ["--max", str(args.max), "--health-path", "/health", "--ttl", "5m"]
    # Process isolation: the sockets are told apart by peer through the gateway's
    # /proc/net/tcp, which shows its own network only (a tenant's upstream
    # sockets live in the worker's network namespace).
    argv += ["--isolation", "process", "--", sys.executable, str(WORKER), "{port}"]
    gateway = start(argv, log_path)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                stats(port)
                break
            except OSError:
                if time.monotonic() > deadline or gateway.poll() is not None:
                    raise RuntimeError(log_path.read_text()[-2000:]) from None
                await asyncio.sleep(0.1)
        tally = Tally()
        loop = asyncio.get_running_loop()
        until = loop.time() + args.duration
        started = time.monotonic()
        samples = [await asyncio.to_thread(Sample, 0.0, gateway.pid, port)]
        watch = asyncio.ensure_future(
            sampler(gateway.pid, port, args.sample_every, started, samples, until)
        )
        clients = [
            asyncio.ensure_future(client(port, args.sessions, tally, until))
            for _ in range(args.connections)
        ]
        await asyncio.sleep(1)  # the clients' connections first
        jobs = [asyncio.ensure_future(killer(port, args.kill_every, tally, until))]
        loris = asyncio.ensure_future(slowloris(port, args.slowloris, until))
        idlers = asyncio.ensure_future(idle(port, args.idle, until))
        await asyncio.gather(*clients, *jobs, watch)
        loris_alive = await loris
        idle_held = len(await idlers)
        elapsed = time.monotonic() - started
        await asyncio.sleep(5)
        end = await asyncio.to_thread(Sample, time.monotonic() - started, gateway.pid, port)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(gateway.pid, signal.SIGTERM)
        try:
            gateway.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(gateway.pid, signal.SIGKILL)
            gateway.wait()
    text = log_path.read_text(errors="replace")
    declared = text.count("declared dead") + text.count("health check")
    answered = sum(tally.status.values())
    print(f"soak: {elapsed:.0f} s, {args.connections} clients over {args.sessions} sessions, ")
    print(f"      --max {args.max}, a worker SIGKILLed every {args.kill_every:g} s, ")
    print(f"      slowloris {args.slowloris}, idle {args.idle}; {os.cpu_count()} cores")
    print(f"requests answered: {answered} ({answered / elapsed:.0f}/s)")
    for code, count in sorted(tally.status.items()):
        print(f"  {code}: {count}")
    for error, count in tally.errors.most_common():
        print(f"  5xx {error}: {count}")
    print(f"client connection errors: {dict(tally.client_errors)}")
    print(f"workers SIGKILLed by the soak: {tally.killed_by_soak}")
    print(f"herd log lines about failed health checks: {declared}")
    print(f"slowloris connections still open at the end: {loris_alive} of {args.slowloris}")
    print(f"idle connections opened: {idle_held} of {args.idle}")
    first = samples[0]
    steady_at = min(args.steady_after, args.duration / 2)
    steady = next((x for x in samples if x.at >= steady_at), samples[-1])
    print("gateway, every sample (sockets by peer and TCP state):")
    for sample in [*samples, end]:
        print("  " + sample.line())
    print(
        f"gateway RSS: start {first.rss:.1f}, steady state ({steady.at:.0f} s) "
        f"{steady.rss:.1f}, end {end.rss:.1f} MiB"
    )
    print(f"gateway fds: start {first.fds}, steady state {steady.fds}, end {end.fds}")
    print(f"  fds by kind at start: {first.kinds}")
    print(f"  fds by kind at the end: {end.kinds}")
    gone = end.of_the_gone(first)
    rss_flat = end.rss <= steady.rss * 1.10
    fds_flat = end.fds <= steady.fds and not gone and not end.clients()
    print(
        f"flat (steady state -> end): RSS {'yes' if rss_flat else 'NO'} "
        f"({end.rss - steady.rss:+.1f} MiB); fds {'yes' if fds_flat else 'NO'} "
        f"({end.fds - steady.fds:+d}; of workers gone at the end: {gone or 'none'}; "
        f"client connections at the end: {end.clients()})"
    )
    print(f"workers at the end: {len(end.workers)}")
    print(f"gateway log: {len(text.encode()) / 2**20:.1f} MiB ({log_path})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=600)
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--max", type=int, default=16)
    parser.add_argument("--kill-every", type=float, default=5)
    parser.add_argument("--slowloris", type=int, default=5000)
    parser.add_argument("--idle", type=int, default=2000)
    parser.add_argument(
        "--sample-every", type=float, default=10, help="seconds between RSS/fd samples"
    )
    parser.add_argument(
        "--steady-after",
        type=float,
        default=60,
        help="seconds in to take the steady state (at most half of --duration)",
    )
    asyncio.run(main(parser.parse_args()))
