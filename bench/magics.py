"""``%%herd`` round trips against a direct execute on the same kernel and ipyparallel's ``%%px``.

    python bench/magics.py              # 300 rounds of trivial cells, 60 of 10,000 lines (~2 min)
    python bench/magics.py --quick      # 20 and 5 rounds
    python bench/magics.py --pause 0    # cells back to back, as Run All sends them
    python bench/magics.py --no-history # IPython's history off in every kernel
    python bench/magics.py --json out.json

What is timed is what a notebook user waits for: from the ``execute_request``
of a cell to the kernel's ``idle`` with every output received (and the
``execute_reply``), by a jupyter_client ``BlockingKernelClient`` in this
process, for three cells: ``pass``, ``1`` (a result to replay) and
``for i in range(10000): print(i)``. The ways, in one run, in alternating
rounds (each round runs every way once, the order rotated round to round),
10 ms apart (``--pause``):

- **direct**: the cell executed on the worker kernel that the ``%%herd``
  session ``s`` is pinned to, by a client connected straight to it (its
  connection info read from inside the host). The floor: what the kernel
  itself costs.
- **%%herd**: ``%%herd s`` + the cell, sent to the host kernel (a python3
  kernel that ran ``%load_ext herd_nb`` and ``%herd start``), which runs it in
  that worker and replays its output.
- **%%px**: ipyparallel's ``%%px`` + the cell in a second host kernel, on a
  one-engine cluster (``ipp.Cluster(n=1)``, its view blocking, as ``%%px``
  is used to see output): the closest peer.
- **host itself**: the cell executed in the ``%%herd`` host kernel itself,
  no magic: the host's own round trip, which every ``%%herd`` cell pays on top
  of its worker's.

Then, to explain the difference, two views that need no change to herd_nb:

- **in the host**: one host cell times, in a loop, ``await
  herd_nb.magics.run_cell_magic("s", code)`` (a ``%%herd`` cell without
  IPython's part), ``herd_nb._execute.run_cell`` with no replay (herd's
  receive loop alone) and the worker client's own ``execute_interactive``.
- **timeline**: the steps of each ``%%herd pass`` cell, from the ``date``
  headers of the host's and the worker's ``status`` messages and of the
  worker's ``execute_request`` (this process subscribes to both kernels'
  IOPub; one clock).

All kernels share one IPython profile made for the run (``IPYTHONDIR`` in a
temporary directory, inherited by the workers and the engine), so no user
configuration applies and their history goes to one fresh database, as
kernels started from one user share ``~/.ipython``. The worker's IOPub also
reaches the host's session client while ``direct`` runs; those stale
messages are drained (untimed) before each ``%%herd`` sample, as a notebook
that uses only ``%%herd`` never has them. Every kernel and the cluster are
stopped at the end, and any process they started that is still alive is
killed (and reported).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import queue
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any, ClassVar

import psutil
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.manager import KernelManager, start_new_kernel

SESSION = "s"
CELLS = {  # label -> code
    "pass": "pass",
    "1": "1",
    "print 10,000 lines": "for i in range(10000):\n    print(i)",
}
TRIVIAL = ("pass", "1")
WAYS = ("direct", "%%herd", "%%px", "host itself")
TIMEOUT = 120.0
TRIVIAL_ROUNDS, PRINT_ROUNDS = 300, 60
# Between two cells: the previous cell's background work (IPython's history
# commit, ipykernel's IOPub flushes) ends, as it does between a user's cells.
PAUSE = 0.01

# Targets of the issue, judged on p50s from this run.
HERD_ADDS_MS = 2.0  # %%herd adds at most this to a direct execute (trivial cells)
PX_OVER_HERD = 2.0  # %%herd is at least this many times faster than %%px


# -- driving kernels ---------------------------------------------------------------------


@dataclass
class Trip:
    """One cell's round trip, as the client saw it."""

    seconds: float
    status: str
    stdout: str  # and displays updated in place (%%px's stdout)
    results: list[str]
    sent: datetime  # wall clock, to line up with the kernels' message dates
    busy: datetime | None  # the kernel's status busy / idle for this request
    idle: datetime | None


def round_trip(client: BlockingKernelClient, code: str, timeout: float = TIMEOUT) -> Trip:
    """Execute ``code``; return when the kernel is idle and has replied.

    Reads the channels themselves (a plain ZMQ poll): the client's
    ``get_iopub_msg`` runs an event loop per call (jupyter_core's ``run_sync``).
    """
    sent = datetime.now(UTC)
    started = time.perf_counter()
    msg_id = client.execute(code, allow_stdin=False)
    deadline = started + timeout
    stdout: list[str] = []
    results: list[str] = []
    displays: dict[str, str] = {}
    busy = idle = None
    try:
        while idle is None:
            msg = client.iopub_channel.get_msg(timeout=max(0.0, deadline - time.perf_counter()))
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream" and content["name"] == "stdout":
                stdout.append(content["text"])
            elif kind in ("execute_result", "display_data", "update_display_data"):
                text = str(content["data"].get("text/plain", ""))
                shown = content.get("transient", {}).get("display_id")
                if shown:  # %%px streams the engine's stdout as a display it updates
                    displays[shown] = text
                else:
                    results.append(text)
            elif kind == "error":
                stdout.append(f"{content['ename']}: {content['evalue']}\n")
            elif kind == "status" and content["execution_state"] == "busy":
                busy = msg["header"]["date"]
            elif kind == "status" and content["execution_state"] == "idle":
                idle = msg["header"]["date"]
        while True:
            reply = client.shell_channel.get_msg(timeout=max(0.0, deadline - time.perf_counter()))
            if reply["parent_header"].get("msg_id") == msg_id:
                break
    except queue.Empty:
        raise TimeoutError(f"{code!r} did not end within {timeout:g}s") from None
    seconds = time.perf_counter() - started
    output = "".join(stdout) + "".join(displays.values())
    return Trip(seconds, reply["content"]["status"], output, results, sent, busy, idle)


def drain(client: BlockingKernelClient) -> list[dict[str, Any]]:
    """The IOPub messages already received (nothing waits)."""
    msgs = []
    with contextlib.suppress(queue.Empty):
        while True:
            msgs.append(client.iopub_channel.get_msg(timeout=0))
    return msgs


class Host:
    """A python3 kernel driven as a notebook drives it."""

    def __init__(self, name: str, cwd: Path, env: dict[str, str]) -> None:
        self.name = name
        self.manager: KernelManager
        self.client: BlockingKernelClient
        self.manager, self.client = start_new_kernel(kernel_name="python3", cwd=str(cwd), env=env)

    @property
    def pid(self) -> int:
        provisioner: Any = self.manager.provisioner
        return int(provisioner.process.pid)

    def run(self, code: str, timeout: float = TIMEOUT) -> Trip:
        return round_trip(self.client, code, timeout)

    def ok(self, code: str, timeout: float = TIMEOUT) -> Trip:
        """:meth:`run`, raising if the cell failed."""
        trip = self.run(code, timeout)
        if trip.status != "ok":
            raise RuntimeError(f"{self.name}: {code!r} failed: {trip.stdout[-2000:]}")
        return trip

    def shutdown(self) -> None:
        """A shutdown request (the host's pool or cluster stops with it), then a kill."""
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=False)


def connect(info: KernelConnectionInfo) -> BlockingKernelClient:
    """A client of the kernel with connection ``info`` (shell and IOPub only)."""
    client = BlockingKernelClient()
    client.load_connection_info(info)
    client.start_channels(shell=True, iopub=True, stdin=False, hb=False, control=False)
    client.wait_for_ready(timeout=30)
    return client


def descendants(pid: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).children(recursive=True)
    return []


# -- the host cells ------------------------------------------------------------------------

HERD_SETUP = ("%load_ext herd_nb", "%herd start --warm 1")  # two cells: the extension first

# The session's worker, found as %%herd finds it; its connection info for this process.
HERD_WORKER = f"""\
import json as _hb_json
_hb_pool = %herd pool
async with _hb_pool.acquire({SESSION!r}) as _hb_use:
    _hb_worker = _hb_use.worker
_hb_info = _hb_worker.manager.get_connection_info()
_hb_info["key"] = _hb_info["key"].decode()
print(_hb_json.dumps(_hb_info))"""

HERD_WARM = "print(_hb_pool.stats().available_workers, _hb_pool.stats().starting_workers)"

# Discard what the worker published for other clients (the `direct` cells).
HERD_DRAIN = """\
import queue as _hb_queue
try:
    while True:
        await _hb_worker.client.iopub_channel.get_msg(timeout=0)
except _hb_queue.Empty:
    pass"""

IN_HOST_WAYS = ("run_cell_magic", "run_cell, no replay", "execute_interactive")
IN_HOST = f"""\
import asyncio as _hb_asyncio
import time as _hb_time
from herd_nb._execute import run_cell as _hb_run_cell
from herd_nb.magics import run_cell_magic as _hb_magic

async def _hb_in_host(code, rounds, pause):
    client = _hb_worker.client
    ways = {{
        {IN_HOST_WAYS[0]!r}: lambda: _hb_magic({SESSION!r}, code),
        {IN_HOST_WAYS[1]!r}: lambda: _hb_run_cell(client, code, on_event=lambda event: None),
        {IN_HOST_WAYS[2]!r}: lambda: client.execute_interactive(
            code, allow_stdin=False, timeout={TIMEOUT}
        ),
    }}
    names = list(ways)
    samples = {{name: [] for name in names}}
    for r in range(rounds):
        for name in names[r % 3 :] + names[: r % 3]:
            await _hb_asyncio.sleep(pause)
            started = _hb_time.perf_counter()
            await ways[name]()
            samples[name].append(_hb_time.perf_counter() - started)
    return samples"""

PX_SETUP = """\
import ipyparallel as ipp
cluster = ipp.Cluster(n=1, log_level=40)
rc = await cluster.start_and_connect(n=1)
view = rc[:]
view.block = True  # else %%px returns a pending AsyncResult at once
view.activate()
print(len(rc.ids))"""

PX_STOP = """\
rc.close()
await cluster.stop_cluster()"""


# -- measuring ------------------------------------------------------------------------------


@dataclass
class Row:
    cell: str
    way: str
    samples: int
    p50_ms: float
    p95_ms: float
    max_ms: float


def row(cell: str, way: str, seconds: list[float]) -> Row:
    ms = sorted(s * 1000 for s in seconds)
    p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
    return Row(cell, way, len(ms), statistics.median(ms), p95, ms[-1])


@dataclass
class Steps:
    """The timeline of ``%%herd pass`` cells, in ms per cell."""

    names: ClassVar[tuple[str, ...]] = (
        "request sent -> host busy",
        "host busy -> host sends the worker's request",
        "worker request sent -> worker busy",
        "worker busy -> worker idle (the cell)",
        "worker idle -> host idle",
        "host idle -> all received here",
    )
    samples: list[list[float]] = field(default_factory=list)
    direct: list[list[float]] = field(default_factory=list)  # the same for `direct pass`

    def add_herd(self, trip: Trip, worker_msgs: list[dict[str, Any]]) -> None:
        busy = idle = None
        for msg in worker_msgs:
            # Health probes (kernel_info on control) have a busy and an idle too.
            if msg["parent_header"].get("msg_type") != "execute_request":
                continue
            if msg["msg_type"] == "status":
                state = msg["content"]["execution_state"]
                if state == "busy" and busy is None:
                    busy = msg
                elif state == "idle":
                    idle = msg
        if busy is None or idle is None or trip.busy is None or trip.idle is None:
            return
        requested = busy["parent_header"]["date"]
        stamps = [
            trip.sent,
            trip.busy,
            requested,
            busy["header"]["date"],
            idle["header"]["date"],
            trip.idle,
        ]
        gaps = [(b - a).total_seconds() * 1000 for a, b in itertools.pairwise(stamps)]
        gaps.append(trip.seconds * 1000 - (trip.idle - trip.sent).total_seconds() * 1000)
        self.samples.append(gaps)

    def add_direct(self, trip: Trip) -> None:
        if trip.busy is None or trip.idle is None:
            return
        to_busy = (trip.busy - trip.sent).total_seconds() * 1000
        run = (trip.idle - trip.busy).total_seconds() * 1000
        self.direct.append([to_busy, run, trip.seconds * 1000 - to_busy - run])

    def medians(self) -> list[float]:
        """The p50 of each step (none without samples)."""
        return [statistics.median(column) for column in zip(*self.samples, strict=True)]


@dataclass
class Bench:
    """The kernels of a run; :meth:`trip` times one cell one way."""

    herd: Host
    px: Host
    worker: BlockingKernelClient
    pause: float  # seconds between two cells (after the untimed drains)
    steps: Steps = field(default_factory=Steps)

    def trip(self, way: str, code: str, cell: str) -> Trip:
        if way == "direct":
            drain(self.worker)
            time.sleep(self.pause)
            trip = round_trip(self.worker, code)
            if cell == "pass":
                self.steps.add_direct(trip)
        elif way == "%%herd":
            self.herd.ok(HERD_DRAIN)
            drain(self.worker)
            time.sleep(self.pause)
            trip = self.herd.run(f"%%herd {SESSION}\n{code}")
            if cell == "pass":
                self.steps.add_herd(trip, drain(self.worker))
        elif way == "%%px":
            time.sleep(self.pause)
            trip = self.px.run(f"%%px\n{code}")
        else:
            time.sleep(self.pause)
            trip = self.herd.run(code)
        check(way, cell, trip)
        return trip

    def alternate(self, cell: str, rounds: int) -> dict[str, list[float]]:
        """Seconds of each way's round trips, in rounds whose order rotates."""
        code = CELLS[cell]
        seconds: dict[str, list[float]] = {way: [] for way in WAYS}
        for way in WAYS:  # one unmeasured round: imports, first-use paths
            self.trip(way, code, cell)
        self.steps.samples.clear()
        self.steps.direct.clear()
        for r in range(rounds):
            for way in WAYS[r % len(WAYS) :] + WAYS[: r % len(WAYS)]:
                seconds[way].append(self.trip(way, code, cell).seconds)
        return seconds

    def in_host(self, cell: str, rounds: int) -> dict[str, list[float]]:
        """Seconds of each :data:`IN_HOST_WAYS`, timed inside one host cell."""
        code = CELLS[cell]
        self.herd.ok(HERD_DRAIN)
        self.herd.ok(f"_hb_samples = await _hb_in_host({code!r}, {rounds}, {self.pause})")
        found = self.herd.ok("print(_hb_json.dumps(_hb_samples))").stdout
        drain(self.worker)
        samples: dict[str, list[float]] = json.loads(found)
        return samples


def check(way: str, cell: str, trip: Trip) -> None:
    """The cell did what it should (its output all arrived)."""
    problem = ""
    if trip.status != "ok":
        problem = f"status {trip.status}"
    elif any("AsyncResult" in result for result in trip.results):
        problem = f"not waited for: {trip.results}"
    elif cell == "print 10,000 lines":
        lines = trip.stdout.splitlines()
        if len(lines) < 10000 or not lines[-1].endswith("9999"):
            problem = f"{len(lines)} lines of output"
    elif cell == "1" and not any(result.endswith("1") for result in trip.results):
        problem = f"results {trip.results}"
    if problem:
        raise RuntimeError(f"{way} {cell!r}: {problem}: {trip.stdout[-500:]!r}")


# -- setting up and tearing down -------------------------------------------------------------


@contextlib.contextmanager
def hosts(
    tmp: Path, started: list[psutil.Process], *, pause: float, history: bool
) -> Iterator[Bench]:
    """Both host kernels, the herd pool, the cluster and a client of the worker."""
    # A profile of the run's own, which the workers and the engine inherit: a
    # history database of its own, and no user configuration.
    profile = tmp / "ipython" / "profile_default"
    profile.mkdir(parents=True)
    if not history:
        (profile / "ipython_config.py").write_text("c.HistoryManager.enabled = False\n")
    env = {**os.environ, "IPYTHONDIR": str(tmp / "ipython")}
    stack = contextlib.ExitStack()
    with stack:
        herd = Host("herd host", tmp, env)
        stack.callback(herd.shutdown)
        started.append(psutil.Process(herd.pid))
        px = Host("px host", tmp, env)
        stack.callback(px.shutdown)
        started.append(psutil.Process(px.pid))

        def snapshot() -> None:  # what both hosts started, while they are its parents
            started.extend(descendants(herd.pid) + descendants(px.pid))

        stack.callback(snapshot)  # before the hosts stop, however far the set-up got

        for code in HERD_SETUP:
            herd.ok(code)
        herd.ok(f"%%herd {SESSION}\npass")
        info = json.loads(herd.ok(HERD_WORKER).stdout)
        herd.ok(IN_HOST)
        worker = connect(info)
        stack.callback(worker.stop_channels)
        deadline = time.monotonic() + 60
        while herd.ok(HERD_WARM).stdout.split() != ["1", "0"]:  # the spare has started
            if time.monotonic() > deadline:
                raise RuntimeError("herd pool: the warm spare did not start")
            time.sleep(0.1)

        stack.callback(stop_cluster, px)
        stack.callback(snapshot)  # and before the cluster stops (some exit later)
        px.ok(PX_SETUP, timeout=180)
        yield Bench(herd, px, worker, pause)


def stop_cluster(px: Host) -> None:
    """Best effort: whatever the cluster leaves running is killed by :func:`reap`."""
    with contextlib.suppress(TimeoutError):
        trip = px.run(PX_STOP, timeout=60)
        if trip.status != "ok":
            print(f"stopping the cluster failed: {trip.stdout[-300:]}", file=sys.stderr)


def reap(started: list[psutil.Process], grace: float = 10.0) -> list[str]:
    """Kill whatever of ``started`` outlived the shutdown by ``grace`` seconds;
    what was left."""
    procs = list({p.pid: p for p in started}.values())
    _, alive = psutil.wait_procs(procs, timeout=grace)  # some exit after their parent
    left = []
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue  # exited; its parent has yet to reap it
            left.append(f"{proc.pid} {' '.join(proc.cmdline())[:80]}")
            proc.kill()
    psutil.wait_procs(alive, timeout=5)
    return left


# -- reporting --------------------------------------------------------------------------------


def table(rows: list[Row]) -> str:
    lines = [
        f"{'cell':<20}{'way':<13}{'n':>5}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}"
        f"{'p50 - direct':>14}{'p50 / %%herd':>14}",
        "-" * 93,
    ]
    by = {(r.cell, r.way): r for r in rows}
    for r in rows:
        direct, herd = by.get((r.cell, "direct")), by.get((r.cell, "%%herd"))
        over = f"{r.p50_ms - direct.p50_ms:+.2f} ms" if direct and r.way != "direct" else ""
        ratio = f"{r.p50_ms / herd.p50_ms:.2f}x" if herd and r.way != "%%herd" else ""
        lines.append(
            f"{r.cell:<20}{r.way:<13}{r.samples:>5}{r.p50_ms:>9.2f}{r.p95_ms:>9.2f}"
            f"{r.max_ms:>9.2f}{over:>14}{ratio:>14}".rstrip()
        )
    return "\n".join(lines)


def in_host_table(rows: list[Row]) -> str:
    lines = [f"{'cell':<20}{'awaited in one host cell':<26}{'n':>5}{'p50 ms':>9}{'p95 ms':>9}"]
    lines.append("-" * len(lines[0]))
    lines += [
        f"{r.cell:<20}{r.way:<26}{r.samples:>5}{r.p50_ms:>9.2f}{r.p95_ms:>9.2f}" for r in rows
    ]
    return "\n".join(lines)


def steps_table(steps: Steps) -> str:
    if not steps.samples:
        return "(no timeline: the kernels' status messages were not seen)"
    lines = [f"where a %%herd pass cell's time goes (p50 of each step, n={len(steps.samples)})"]
    medians = steps.medians()
    lines += [f"  {name:<48}{ms:>7.2f} ms" for name, ms in zip(steps.names, medians, strict=True)]
    lines.append(f"  {'sum of the step p50s':<48}{sum(medians):>7.2f} ms")
    if steps.direct:
        direct = [statistics.median(c) for c in zip(*steps.direct, strict=True)]
        lines.append(
            f"  direct pass, same kernel: request -> busy {direct[0]:.2f}, busy -> idle "
            f"{direct[1]:.2f}, idle -> all received {direct[2]:.2f} ms"
        )
    return "\n".join(lines)


@dataclass
class Verdict:
    label: str
    value: float
    unit: str
    target: str
    ok: bool

    def __str__(self) -> str:
        value = f"{self.value:+.2f} {self.unit}" if self.unit == "ms" else f"{self.value:.2f}x"
        return f"  {self.label:<46}{value:>10}{self.target:>10}  {'PASS' if self.ok else 'MISS'}"


def verdicts(rows: list[Row]) -> list[Verdict]:
    by = {(r.cell, r.way): r.p50_ms for r in rows}
    out = []
    for cell in TRIVIAL:
        adds = by[cell, "%%herd"] - by[cell, "direct"]
        out.append(
            Verdict(
                f"%%herd adds to direct, {cell!r}",
                adds,
                "ms",
                f"<= {HERD_ADDS_MS:g} ms",
                adds <= HERD_ADDS_MS,
            )
        )
    for cell in CELLS:
        ratio = by[cell, "%%px"] / by[cell, "%%herd"]
        out.append(
            Verdict(
                f"%%px / %%herd, {cell!r}",
                ratio,
                "x",
                f">= {PX_OVER_HERD:g}x",
                ratio >= PX_OVER_HERD,
            )
        )
    return out


def decomposition(rows: list[Row], in_host: list[Row]) -> str:
    """Each cell's %%herd p50 as direct + the host's own round trip + the rest.

    The host floor is the host running the same trivial cell itself (``pass``
    for the 10,000 lines: the host then relays them, which is in the rest).
    """
    by = {(r.cell, r.way): r.p50_ms for r in rows}
    inside = {(r.cell, r.way): r.p50_ms for r in in_host}
    lines = [
        f"{'cell':<20}{'%%herd':>8}{'direct':>8}{'host floor':>12}{'rest':>8}"
        f"{'in host: magic - execute_interactive':>38}",
    ]
    for cell in CELLS:
        herd, direct = by[cell, "%%herd"], by[cell, "direct"]
        host = by[cell if cell in TRIVIAL else "pass", "host itself"]
        magic, floor = inside.get((cell, IN_HOST_WAYS[0])), inside.get((cell, IN_HOST_WAYS[2]))
        own = f"{magic - floor:+.2f}" if magic is not None and floor is not None else ""
        lines.append(
            f"{cell:<20}{herd:>8.2f}{direct:>8.2f}{host:>12.2f}{herd - direct - host:>+8.2f}"
            f"{own:>38}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 and 5 rounds")
    parser.add_argument(
        "--pause",
        type=float,
        default=PAUSE,
        metavar="SECONDS",
        help=f"between two cells (default {PAUSE:g}; 0: back to back, as Run All)",
    )
    parser.add_argument(
        "--no-history",
        dest="history",
        action="store_false",
        help="IPython history off in every kernel (it is an SQLite commit per cell)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args()
    trivial_rounds, print_rounds = (20, 5) if args.quick else (TRIVIAL_ROUNDS, PRINT_ROUNDS)
    rounds = {cell: trivial_rounds if cell in TRIVIAL else print_rounds for cell in CELLS}

    started: list[psutil.Process] = []
    rows: list[Row] = []
    in_host: list[Row] = []
    began = time.monotonic()
    load_before = os.getloadavg()[0]

    def progress(what: str) -> None:
        print(f"[{time.monotonic() - began:5.1f}s] {what}", file=sys.stderr, flush=True)

    try:
        with (
            tempfile.TemporaryDirectory() as tmp,
            hosts(Path(tmp), started, pause=args.pause, history=args.history) as bench,
        ):
            progress("kernels, herd pool and ipyparallel cluster ready")
            steps = Steps()
            for cell in CELLS:
                seconds = bench.alternate(cell, rounds[cell])
                rows += [row(cell, way, seconds[way]) for way in WAYS]
                if cell == "pass":
                    steps = bench.steps
                    bench.steps = Steps()
                progress(f"{cell}: {rounds[cell]} rounds")
            for cell in CELLS:
                samples = bench.in_host(cell, rounds[cell] // 2)
                in_host += [row(cell, way, samples[way]) for way in IN_HOST_WAYS]
                progress(f"in the host, {cell}: {rounds[cell] // 2} rounds")
    finally:
        left = reap(started)
    count = len({p.pid for p in started})
    progress(f"stopped; {count} processes started, {len(left)} left over (killed)")
    for what in left:
        progress(f"  left over: {what}")

    versions = ", ".join(
        f"{name} {version(name)}" for name in ("ipykernel", "jupyter_client", "ipyparallel")
    )
    history = "on" if args.history else "off"
    load = f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    print(f"%%herd round trips ({versions}; {os.cpu_count()} cores, 1-min load {load})")
    print(
        f"{trivial_rounds} rounds of trivial cells, {print_rounds} of 10,000 lines; "
        f"{args.pause * 1000:g} ms between cells; IPython history {history}"
    )
    print(table(rows))
    print("\nin the host kernel: the same cells awaited inside one host cell, alternating")
    print(in_host_table(in_host))
    print()
    print(steps_table(steps))
    print("\n%%herd's p50 (ms) = direct + the host's own round trip (host floor) + the rest")
    print(decomposition(rows, in_host))
    print("\ntargets (p50s from this run)")
    for verdict in verdicts(rows):
        print(verdict)
    print(
        f"\nprocesses started (kernels, workers, controller, engine): {count}; "
        f"alive after shutdown: {len(left)}" + (f", killed: {'; '.join(left)}" if left else "")
    )
    if args.json:
        report = {
            "rows": [asdict(r) for r in rows],
            "in_host": [asdict(r) for r in in_host],
            "timeline_p50_ms": dict(zip(steps.names, steps.medians(), strict=False)),
            "left_over": left,
        }
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
