"""What the sandbox costs a spawn: one run, one table, no sandbox as the anchor.

    python bench/sandbox.py            # 40 spawns per mode
    python bench/sandbox.py --quick    # 10

Two measurements per mode, interleaved (in a new order every round) so that
machine noise hits all alike:

- ``spawn``: ``ProcessFactory.spawn()`` of a tiny HTTP worker until it is healthy
  (Python's own start-up dominates this; the differences are what count, in
  steps: from about 70 ms the health polls are 38 ms apart);
- ``launch``: fork + exec of ``/bin/true`` through herd's launcher (namespaces,
  herd's init, parent-death signal, joining the cgroups) until it exits: the
  bare overhead, as wall time and as the CPU time of the whole process tree
  (user + system, from ``RUSAGE_CHILDREN``): the latter hardly moves when other
  work shares the machine.

Modes: no sandbox (``sandbox=False``); namespaces without herd's init (the
launcher before the init: the worker is PID 1 of its namespace); namespaces
(``sandbox=True``: the init is PID 1); namespaces plus cgroup limits
(``cpu_limit``, ``memory_limit``, ``pids_limit``); then tenant isolation
(``isolation="tenant"``: a filesystem view built by the init, no capabilities,
a network namespace of its own), without and with the limits, and once more
without its network namespace (the same launch less ``unshare --net --ipc
--uts`` and the init's ``--loopback``: the worker on the host's network), so
that the view and the network namespace are priced apart. A bare start of the
init's interpreter (``python -I -S -c pass``) in a namespace is timed alongside:
the floor of what an init in Python can cost.

Then the memory the init takes per worker: its two processes (PID 1 and its
fork, the worker's parent), as RSS, PSS (shared pages split among the processes
that map them) and USS (pages no other process maps).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping
from typing import Any

import psutil

import herd
from herd import _cgroups
from herd._procfs import children
from herd._sandbox import Launch, init_command

WORKER = r"""
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""

LIMITS = {"cpu_limit": 1.0, "memory_limit": 256 << 20, "pids_limit": 64}
NO_INIT = "namespaces, no init"
HOST_NETWORK = "tenant, host network"
TENANT = {"sandbox": True, "isolation": "tenant"}
MODES = {
    "no sandbox": {"sandbox": False},
    NO_INIT: {"sandbox": True},
    "namespaces": {"sandbox": True},
    "namespaces + cgroups": {"sandbox": True, **LIMITS},
    HOST_NETWORK: TENANT,
    "tenant": TENANT,
    "tenant + cgroups": {**TENANT, **LIMITS},
}
# What unshare and the init do for a tenant's network namespace, dropped for HOST_NETWORK.
NETWORK_OPTIONS = ("--net", "--ipc", "--uts", "--loopback")
PYTHON_FLOOR = [sys.executable, "-I", "-S", "-c", "pass"]


def factory(options: dict[str, object]) -> herd.ProcessFactory:
    return herd.ProcessFactory([sys.executable, "-c", WORKER, "{port}"], health_path="/", **options)  # type: ignore[arg-type]


def without_init(spawner: herd.ProcessFactory) -> herd.ProcessFactory:
    """The launcher as it was before the init: the same prefix, less the init."""
    init = init_command()
    launch = spawner._sandbox.launch

    async def without(name: str, env: Mapping[str, str] | None = None, **kw: Any) -> Launch:
        plan = await launch(name, env, **kw)
        assert plan.prefix[-len(init) :] == init, plan.prefix
        return dataclasses.replace(plan, prefix=plan.prefix[: -len(init)])

    spawner._sandbox.launch = without  # type: ignore[method-assign]
    return spawner


def without_network(spawner: herd.ProcessFactory) -> herd.ProcessFactory:
    """A tenant's launch on the host's network: no network, IPC and UTS
    namespaces, no loopback to bring up; the view and the rest as they are."""
    launch = spawner._sandbox.launch

    async def without(name: str, env: Mapping[str, str] | None = None, **kw: Any) -> Launch:
        plan = await launch(name, env, **kw)
        assert plan.own_network, plan  # else this mode would measure nothing
        prefix = tuple(arg for arg in plan.prefix if arg not in NETWORK_OPTIONS)
        return dataclasses.replace(plan, prefix=prefix, own_network=False)

    spawner._sandbox.launch = without  # type: ignore[method-assign]
    return spawner


async def spawn_ms(spawner: herd.ProcessFactory) -> float:
    started = time.perf_counter()
    worker = await spawner.spawn()
    elapsed = (time.perf_counter() - started) * 1000
    await worker.close()
    return elapsed


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(argv: list[str]) -> tuple[float, float]:
    """Run ``argv`` as a worker is started, until it exits: wall and CPU ms."""
    started, cpu = time.perf_counter(), cpu_seconds()
    subprocess.run(argv, start_new_session=True, check=True)
    return (time.perf_counter() - started) * 1000, (cpu_seconds() - cpu) * 1000


async def launch_ms(spawner: herd.ProcessFactory) -> tuple[float, float]:
    """fork+exec of /bin/true the way spawn() starts a worker, until it exits:
    wall and CPU milliseconds."""
    plan = await spawner._sandbox.launch(f"bench-{time.monotonic_ns()}")
    try:
        return timed([*plan.prefix, "true"])
    finally:
        await plan.discard()


async def floor_ms(spawner: herd.ProcessFactory) -> tuple[float, float]:
    """A bare start of the init's interpreter where the init runs: in a namespace."""
    plan = await spawner._sandbox.launch(f"bench-{time.monotonic_ns()}")
    try:
        return timed([*plan.prefix, *PYTHON_FLOOR])
    finally:
        await plan.discard()


async def init_memory(spawner: herd.ProcessFactory, workers: int = 5) -> dict[str, float]:
    """Medians over ``workers`` live workers of the init's two processes, in MiB."""
    samples: dict[str, list[float]] = {"rss": [], "pss": [], "uss": []}
    started = [await spawner.spawn() for _ in range(workers)]
    try:
        await asyncio.sleep(0.5)  # let them settle
        for worker in started:
            init = children(worker.pid)
            pair = [psutil.Process(pid) for pid in [*init, *children(init[0])]]
            infos = [p.memory_full_info() for p in pair]
            for key in samples:
                samples[key].append(sum(getattr(i, key) for i in infos) / 2**20)
    finally:
        await asyncio.gather(*(w.close() for w in started))
    return {k: statistics.median(v) for k, v in samples.items()}


Row = dict[str, float]


async def run(reps: int) -> tuple[dict[str, Row], Row, Row]:
    spawners = {name: factory(options) for name, options in MODES.items()}
    without_init(spawners[NO_INIT])
    without_network(spawners[HOST_NETWORK])
    kinds = ("spawn", "launch", "cpu")
    samples = {n: {k: list[float]() for k in kinds} for n in MODES}
    floor: dict[str, list[float]] = {"launch": [], "cpu": []}
    for spawner in spawners.values():  # warm up: detection, imports, page cache
        await spawn_ms(spawner)
        await launch_ms(spawner)
    await floor_ms(spawners[NO_INIT])
    order = list(spawners)
    shuffle = random.Random(0).shuffle
    for _ in range(reps):
        # A new order every round: what a mode leaves the kernel to finish (a
        # cgroup to take down, a network namespace to free) falls on any mode.
        shuffle(order)
        for name in order:
            spawner = spawners[name]
            samples[name]["spawn"].append(await spawn_ms(spawner))
            wall, cpu = await launch_ms(spawner)
            samples[name]["launch"].append(wall)
            samples[name]["cpu"].append(cpu)
        wall, cpu = await floor_ms(spawners[NO_INIT])
        floor["launch"].append(wall)
        floor["cpu"].append(cpu)
    medians = {n: {k: statistics.median(v) for k, v in s.items()} for n, s in samples.items()}
    memory = await init_memory(spawners["namespaces"])
    return medians, {k: statistics.median(v) for k, v in floor.items()}, memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    results, floor, memory = asyncio.run(run(10 if args.quick else 40))
    report = factory(MODES["namespaces + cgroups"]).sandbox_report
    print(f"herd sandbox spawn cost; sandbox here: {report.level} ({report.reason})")
    print(f"load average at the start: {load:.2f}, at the end: {os.getloadavg()[0]:.2f}")
    header = ["spawn ms", "+ vs none", "launch ms", "+ vs none", "CPU ms", "+ vs none"]
    print(f"{'mode':24}" + "".join(f"{h:>11}" for h in header))
    base = results["no sandbox"]
    for name, row in results.items():
        cells = []
        for kind in ("spawn", "launch", "cpu"):
            cells += [f"{row[kind]:11.2f}", f"{row[kind] - base[kind]:+11.2f}"]
        print(f"{name:24}" + "".join(cells))
    print(
        f"{'ns + python -I -S -c pass':24}{'':22}{floor['launch']:11.2f}{'':11}{floor['cpu']:11.2f}"
    )
    before, with_init = results[NO_INIT], results["namespaces"]
    added = {k: with_init[k] - before[k] for k in ("spawn", "launch", "cpu")}
    # The floor is the same launcher running a bare interpreter instead of
    # `true`: the init's CPU less that is its own work (forks, its code).
    python = floor["cpu"] - before["cpu"]
    own = added["cpu"] - python
    print(
        f"\nthe init adds {added['launch']:+.2f} ms to a launch and {added['spawn']:+.2f} ms "
        f"to a spawn; CPU {added['cpu']:+.2f} ms = Python's start {python:.2f} + its own work "
        f"{own:.2f};\nper worker RSS {memory['rss']:.1f} MiB, PSS {memory['pss']:.1f} MiB, "
        f"USS {memory['uss']:.1f} MiB (PID 1 and its fork)"
    )
    kinds = ("launch", "spawn", "cpu")
    view = {k: results[HOST_NETWORK][k] - with_init[k] for k in kinds}
    network = {k: results["tenant"][k] - results[HOST_NETWORK][k] for k in kinds}
    print(
        f"tenant: the view (with no capabilities, /proc and /sys hardened) adds "
        f"{view['launch']:+.2f} ms to a launch, {view['spawn']:+.2f} ms to a spawn, "
        f"CPU {view['cpu']:+.2f} ms;\n        the network namespace adds "
        f"{network['launch']:+.2f} ms to a launch, {network['spawn']:+.2f} ms to a spawn, "
        f"CPU {network['cpu']:+.2f} ms"
    )
    extra = results["namespaces + cgroups"]["launch"] - base["launch"] - added["launch"]
    verdict = "ok" if extra <= 5 else "MISS"
    print(
        f"target: namespaces and cgroups add at most a few ms to a launch: +{extra:.2f} ms "
        f"(≤ 5 ms) {verdict}"
    )
    verdict = "ok" if own <= 5 else "MISS"
    print(
        f"target: the init costs one bare Python start and little more: {own:+.2f} ms CPU "
        f"(≤ 5 ms) {verdict}"
    )
    if _cgroups.detect().version is None:
        print(f"(cgroups unavailable here: {_cgroups.detect().reason})")


if __name__ == "__main__":
    main()
