"""What the sandbox costs a spawn: one run, one table, no sandbox as the anchor.

    python bench/sandbox.py            # 40 spawns per mode
    python bench/sandbox.py --quick    # 10

Two measurements per mode, interleaved so that machine noise hits all alike:

- ``spawn``: ``ProcessFactory.spawn()`` of a tiny HTTP worker until it is healthy
  (Python's own start-up dominates this; the differences are what count);
- ``launch``: fork + exec of ``/bin/true`` through herd's launcher (namespaces,
  parent-death signal, joining the cgroups) until it exits: the bare overhead.

Modes: no sandbox (``sandbox=False``), namespaces (``sandbox=True``), namespaces
plus cgroup limits (``cpu_limit``, ``memory_limit``, ``pids_limit``).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time

import herd
from herd import _cgroups

WORKER = r"""
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""

LIMITS = {"cpu_limit": 1.0, "memory_limit": 256 << 20, "pids_limit": 64}
MODES = {
    "no sandbox": {"sandbox": False},
    "namespaces": {"sandbox": True},
    "namespaces + cgroups": {"sandbox": True, **LIMITS},
}


def factory(options: dict[str, object]) -> herd.ProcessFactory:
    return herd.ProcessFactory([sys.executable, "-c", WORKER, "{port}"], health_path="/", **options)  # type: ignore[arg-type]


async def spawn_ms(spawner: herd.ProcessFactory) -> float:
    started = time.perf_counter()
    worker = await spawner.spawn()
    elapsed = (time.perf_counter() - started) * 1000
    await worker.close()
    return elapsed


def launch_ms(spawner: herd.ProcessFactory) -> float:
    """fork+exec of /bin/true the way spawn() starts a worker, until it exits."""
    cgroup = spawner._sandbox.cgroup(f"bench-{time.monotonic_ns()}")
    prefix, preexec = spawner._sandbox.launch_plan(cgroup)
    started = time.perf_counter()
    subprocess.run([*prefix, "true"], preexec_fn=preexec, start_new_session=True, check=True)
    elapsed = (time.perf_counter() - started) * 1000
    if cgroup is not None:
        cgroup.remove()
    return elapsed


async def run(reps: int) -> dict[str, dict[str, float]]:
    spawners = {name: factory(options) for name, options in MODES.items()}
    samples: dict[str, dict[str, list[float]]] = {n: {"spawn": [], "launch": []} for n in MODES}
    for spawner in spawners.values():  # warm up: detection, imports, page cache
        await spawn_ms(spawner)
        launch_ms(spawner)
    for _ in range(reps):
        for name, spawner in spawners.items():
            samples[name]["spawn"].append(await spawn_ms(spawner))
            samples[name]["launch"].append(launch_ms(spawner))
    return {n: {k: statistics.median(v) for k, v in s.items()} for n, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    results = asyncio.run(run(10 if args.quick else 40))
    report = factory(MODES["namespaces + cgroups"]).sandbox_report
    print(f"herd sandbox spawn cost; sandbox here: {report.level} ({report.reason})")
    print(f"{'mode':24} {'spawn ms':>10} {'+ vs none':>10} {'launch ms':>10} {'+ vs none':>10}")
    base = results["no sandbox"]
    for name, row in results.items():
        print(
            f"{name:24} {row['spawn']:10.2f} {row['spawn'] - base['spawn']:+10.2f} "
            f"{row['launch']:10.2f} {row['launch'] - base['launch']:+10.2f}"
        )
    extra = results["namespaces + cgroups"]["launch"] - base["launch"]
    verdict = "ok" if extra <= 5 else "MISS"
    print(
        f"\ntarget: the full sandbox adds at most a few ms to a launch: +{extra:.2f} ms "
        f"(≤ 5 ms) {verdict}"
    )
    if _cgroups.detect().version is None:
        print(f"(cgroups unavailable here: {_cgroups.detect().reason})")


if __name__ == "__main__":
    main()
