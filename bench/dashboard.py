"""What a live Dashboard costs the kernel it runs in: CPU time per second, 50 workers.

    python bench/dashboard.py              # ~2.5 min: rounds of 5 s, with and without
    python bench/dashboard.py --quick      # 3 rounds of each kind per phase
    python bench/dashboard.py --json out.json

The issue's target: a dashboard refreshing every second costs the kernel less
than 2% of a core with 50 workers.

How it is measured, and why this way. Outside a kernel ipywidgets has no comm
(its messages go nowhere), so an in-process measurement would leave out what a
widget update really costs: serialising the message, signing it and handing it
to ZMQ on the IOPub thread. So this runs where a notebook runs it:

- a real ``python3`` ipykernel is started with jupyter_client; this script is
  its frontend: it executes cells and reads every IOPub message (counting the
  widget ``comm_msg`` updates and their bytes), as JupyterLab would;
- a cell starts a :class:`herd.Pool` of 50 process workers (the test worker,
  ``tests/helpers/worker.py``; ``sandbox=False``: the sandbox is not what is
  measured) with 25 pinned sessions, in the kernel;
- rounds alternate: *with* (a cell makes ``Dashboard(pool, interval=1.0)`` and
  displays it, 1.5 s pass so the widgets' creation is not counted, then the
  round is measured, then a cell closes it) and *without* (the same cells
  minus the dashboard). A round's figure is the kernel process's CPU time
  (user + system, all its threads, from psutil; not its children, the workers)
  per second of wall time. The dashboard's cost is the median of the *with*
  rounds minus the median of the *without* rounds, in % of one core;
- two phases: **fresh**, right after the workers started, while their age and
  idle time are under a minute and so shown to the second: every row changes
  every second, the worst case for messages (as many rounds as fit in that
  minute, up to 6 of each kind); then **settled**, once they are over a minute
  (shown in minutes): only what really changes is sent (6 rounds of each kind,
  30 s of dashboard).

Everything the pool itself does in the kernel (health checks every 5 s, the
exit watches) is in both kinds of rounds; what the dashboard makes it do
(``pool.stats()`` reading /proc for 50 workers every second) is in the
*with* rounds, as it should be. The kernel and the workers are stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
from jupyter_client.manager import start_new_kernel

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "helpers" / "worker.py"

START_POOL = """
import herd, sys, time
from herd_nb.dashboard import Dashboard
pool = herd.Pool(
    herd.ProcessFactory([sys.executable, {worker!r}, "{{port}}"], sandbox=False),
    min_workers={workers}, max_workers={workers},
)
await pool.start()
for i in range({workers} // 2):
    await (await pool.acquire(f"session-{{i}}")).close()
started = time.monotonic()
assert pool.stats().total_workers == {workers}, pool.stats()
"""
OPEN = "d = Dashboard(pool, interval=1.0)\ndisplay(d)"
CLOSE = "d.close()"
NOTHING = "pass"
STOP_POOL = "await pool.aclose()"


@dataclass
class Round:
    phase: str
    dashboard: bool
    cpu_percent: float  # kernel CPU time per wall second, % of one core
    messages_per_s: float  # widget updates on IOPub
    kib_per_s: float


class Frontend:
    """A kernel and the IOPub reader a frontend would be."""

    def __init__(self) -> None:
        self.manager, self.client = start_new_kernel(kernel_name="python3", cwd=str(ROOT))
        provisioner: Any = self.manager.provisioner
        self.kernel = psutil.Process(int(provisioner.process.pid))
        self.updates = 0
        self.update_bytes = 0
        self.errors: queue.Queue[str] = queue.Queue()
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.client.get_iopub_msg(timeout=0.2)
            except queue.Empty:
                continue
            kind = msg["msg_type"]
            if kind == "comm_msg":
                self.updates += 1
                self.update_bytes += len(json.dumps(msg["content"]))
            elif kind == "error":
                self.errors.put(f"{msg['content']['ename']}: {msg['content']['evalue']}")
            elif kind == "stream" and msg["content"]["name"] == "stderr":
                sys.stderr.write(msg["content"]["text"])

    def run(self, code: str, timeout: float = 120.0) -> None:
        msg_id = self.client.execute(code)
        deadline = time.monotonic() + timeout
        while True:
            reply = self.client.get_shell_msg(timeout=max(deadline - time.monotonic(), 0.1))
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        if reply["content"]["status"] != "ok":
            content = reply["content"]
            raise RuntimeError(f"cell failed: {content.get('ename')}: {content.get('evalue')}")

    def cpu(self) -> float:
        times = self.kernel.cpu_times()
        return times.user + times.system

    def close(self) -> None:
        self._stop.set()
        self._reader.join()
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=False)


def measure(front: Frontend, phase: str, dashboard: bool, seconds: float) -> Round:
    front.run(OPEN if dashboard else NOTHING)
    time.sleep(1.5)  # the widgets' comm_open burst is a one-off, not the steady cost
    cpu0, wall0 = front.cpu(), time.monotonic()
    updates0, bytes0 = front.updates, front.update_bytes
    time.sleep(seconds)
    cpu1, wall1 = front.cpu(), time.monotonic()
    updates1, bytes1 = front.updates, front.update_bytes
    front.run(CLOSE if dashboard else NOTHING)
    wall = wall1 - wall0
    return Round(
        phase=phase,
        dashboard=dashboard,
        cpu_percent=100 * (cpu1 - cpu0) / wall,
        messages_per_s=(updates1 - updates0) / wall,
        kib_per_s=(bytes1 - bytes0) / wall / 1024,
    )


def summary(rounds: list[Round], phase: str) -> dict[str, float]:
    with_ = [r for r in rounds if r.phase == phase and r.dashboard]
    without = [r for r in rounds if r.phase == phase and not r.dashboard]
    on = statistics.median(r.cpu_percent for r in with_)
    off = statistics.median(r.cpu_percent for r in without)
    return {
        "with_percent": on,
        "without_percent": off,
        "cost_percent": on - off,
        "messages_per_s": statistics.median(r.messages_per_s for r in with_),
        "kib_per_s": statistics.median(r.kib_per_s for r in with_),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of each kind per phase")
    parser.add_argument("--workers", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of a round")
    parser.add_argument("--json", metavar="FILE", help="also write the rounds as JSON")
    options = parser.parse_args()
    pairs = 3 if options.quick else 6

    print(f"starting a kernel and a pool of {options.workers} process workers ...", flush=True)
    front = Frontend()
    rounds: list[Round] = []
    try:
        front.run(START_POOL.format(worker=str(WORKER), workers=options.workers))
        started = time.monotonic()
        for phase in ("fresh", "settled"):
            if phase == "settled":
                # Every age and idle time over a minute: shown in minutes from now on.
                time.sleep(max(0.0, started + 65 - time.monotonic()))
            for i in range(2 * pairs):
                round_ends = time.monotonic() + options.seconds + 2.5
                if phase == "fresh" and i % 2 == 0 and round_ends + 7 > started + 55:
                    break  # a pair more would run past the oldest workers' first minute
                # Alternate, starting with and without in turn, so drift hits both kinds.
                dashboard = (i % 2 == 0) == (i // 2 % 2 == 0)
                row = measure(front, phase, dashboard, options.seconds)
                rounds.append(row)
                print(
                    f"  {phase:8} {'with' if dashboard else 'without':8}"
                    f" kernel CPU {row.cpu_percent:5.2f}% of a core,"
                    f" {row.messages_per_s:5.1f} widget updates/s, {row.kib_per_s:5.1f} KiB/s",
                    flush=True,
                )
            if phase == "fresh" and time.monotonic() - started > 60:
                print("  (note: the fresh phase ran past the workers' first minute)")
        front.run(STOP_POOL)
    finally:
        front.close()
    if not front.errors.empty():
        print("errors in the kernel:", *front.errors.queue, sep="\n  ")

    print()
    print(f"Dashboard(pool, interval=1.0), {options.workers} workers, real ipykernel over ZMQ")
    print(f"{'phase':10}{'with':>9}{'without':>9}{'cost':>9}{'updates/s':>11}{'KiB/s':>8}")
    results = {}
    for phase in ("fresh", "settled"):
        s = results[phase] = summary(rounds, phase)
        print(
            f"{phase:10}{s['with_percent']:8.2f}%{s['without_percent']:8.2f}%"
            f"{s['cost_percent']:8.2f}%{s['messages_per_s']:11.1f}{s['kib_per_s']:8.1f}"
        )
    worst = max(s["cost_percent"] for s in results.values())
    verdict = "ok" if worst < 2.0 else "MISS"
    print(f"target: < 2% of a core -> worst phase {worst:.2f}%: {verdict}")
    if options.json:
        Path(options.json).write_text(
            json.dumps({"rounds": [asdict(r) for r in rounds], "summary": results}, indent=2)
        )


if __name__ == "__main__":
    main()
