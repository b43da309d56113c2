"""Fleet benchmark: one ``herd serve`` node against three sharing Redis, one run.

    python bench/cluster.py            # 5 alternating rounds of 5 s
    python bench/cluster.py --quick    # 3 rounds of 2 s
    python bench/cluster.py --json out.json

A real ``redis-server`` on a loopback port and three ``herd serve --registry``
nodes (tests/helpers/fleet.py), each running bench/proxy.py's backend (a small
Tornado app: ``GET /`` → 12 bytes) as its workers. 99 sessions are made first,
a third owned by each node. Then, in rounds that alternate their order, wrk
(one thread, 10 connections, each request for one of the sessions at random):

- **local**: all requests to node 0, for the sessions node 0 owns: one node
  serving its own sessions (no Redis, no forwarding); at 1 connection (the
  latency of a request) and at 10 (the throughput);
- **forwarded**: the same requests, to node 1: every one forwarded to node 0;
- **spread**: three wrk at once, one per node, each request for any of the 99
  sessions: two in three forwarded, as behind a load balancer without
  stickiness (the three add up to 12 connections: 4 each).

Medians over the rounds. "Redis commands per request" is ``INFO commandstats``
(the calls of every command, those run inside herd's Lua scripts included)
over all the measured rounds, divided by the requests they made. Needs wrk and
redis-server (Debian: ``apt-get install wrk redis-server``).

The machine has 2 cores: three nodes, their workers, Redis and wrk share them,
so "spread" measures what forwarding costs, not how a fleet scales.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from proxy import BACKEND  # noqa: E402

from tests.helpers.fleet import Fleet, Node  # noqa: E402

SESSIONS = 99

LUA = """
local ids = {%s}
request = function()
  return wrk.format("GET", "/", {["X-Session-ID"] = ids[math.random(#ids)]})
end
"""


@dataclass
class Load:
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def wrk(node: Node, sessions: list[str], connections: int, seconds: float) -> Load:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(LUA % ", ".join(f'"{sid}"' for sid in sessions))
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{int(seconds)}s", "--latency", "-s", script.name]
    out = subprocess.run(
        [*argv, node.address + "/"],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 30,
    ).stdout
    Path(script.name).unlink()

    def latency(label: str) -> float:
        match = re.search(rf"^\s*{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        assert match, out
        return float(match[1]) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[match[2]]

    requests = int(re.search(r"(\d+) requests in", out)[1])  # type: ignore[index]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])  # type: ignore[index]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return Load(requests, rps, latency("50%"), latency("99%"), int(bad[1]) if bad else 0)


def redis_calls(fleet: Fleet) -> dict[str, int]:
    return fleet.redis.command_calls()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of 2 s")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 5)
    seconds = 2.0 if args.quick else 5.0

    workdir = tempfile.mkdtemp(prefix="herd-bench-cluster-")
    backend = Path(workdir) / "backend.py"
    backend.write_text(BACKEND)
    flags = ("--min", "0", "--max", "40", "--ttl", "0", "--isolation", "process")
    fleet = Fleet(3, *flags, command=[sys.executable, str(backend), "{port}"])
    try:
        nodes = fleet.nodes
        sessions = [f"bench-{i}" for i in range(SESSIONS)]
        with ThreadPoolExecutor(8) as threads:  # node i % 3 owns session i
            list(threads.map(lambda i: nodes[i % 3].request("/", sessions[i]), range(SESSIONS)))
        owned = [sid for i, sid in enumerate(sessions) if i % 3 == 0]
        for node in nodes:  # warm: every node learns every owner, connections kept
            wrk(node, sessions, 3, 1)

        results: dict[str, list[Load]] = {
            name: [] for name in ("local c1", "forwarded c1", "local", "forwarded", "spread")
        }
        calls_before = redis_calls(fleet)
        requests = 0

        def spread() -> Load:
            with ThreadPoolExecutor(3) as threads:
                loads = list(threads.map(lambda n: wrk(n, sessions, 4, seconds), nodes))
            return Load(
                sum(x.requests for x in loads),
                sum(x.rps for x in loads),
                statistics.median(x.p50_ms for x in loads),
                max(x.p99_ms for x in loads),
                sum(x.errors for x in loads),
            )

        steps = {
            "local c1": lambda: wrk(nodes[0], owned, 1, seconds),
            "forwarded c1": lambda: wrk(nodes[1], owned, 1, seconds),
            "local": lambda: wrk(nodes[0], owned, 10, seconds),
            "forwarded": lambda: wrk(nodes[1], owned, 10, seconds),
            "spread": spread,
        }
        for round_ in range(rounds):
            order = list(steps) if round_ % 2 == 0 else list(steps)[::-1]
            for name in order:
                load = steps[name]()
                results[name].append(load)
                requests += load.requests
            print(f"round {round_ + 1}/{rounds} done", file=sys.stderr)
        calls_after = redis_calls(fleet)
        by_command = {
            name: calls_after[name] - calls_before.get(name, 0)
            for name in calls_after
            if calls_after[name] != calls_before.get(name, 0)
        }
        calls = sum(by_command.values())
        stats = [node.stats() for node in nodes]
    finally:
        fleet.close()

    def median(name: str, field: str) -> float:
        return statistics.median(getattr(x, field) for x in results[name])

    print(f"\nherd fleet: 3 nodes, {SESSIONS} sessions, wrk -t1, {rounds} rounds of {seconds:g}s")
    print(f"{'':<14}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}")
    for name in results:
        errors = sum(x.errors for x in results[name])
        print(
            f"{name:<14}{median(name, 'rps'):>10.0f}{median(name, 'p50_ms'):>10.2f}"
            f"{median(name, 'p99_ms'):>10.2f}{errors:>8}"
        )
    added = median("forwarded c1", "p50_ms") - median("local c1", "p50_ms")
    loaded = median("forwarded", "p50_ms") - median("local", "p50_ms")
    per_request = calls / requests
    print(f"\nforwarded p50 added over local, 1 connection: {added:.2f} ms (target <= 0.5)")
    print(f"  at 10 connections (the 2 cores saturated): {loaded:.2f} ms")
    print(
        f"spread / local req/s: {median('spread', 'rps') / median('local', 'rps'):.2f}; "
        f"forwarded / local: {median('forwarded', 'rps') / median('local', 'rps'):.2f}"
    )
    print(f"Redis commands per request: {calls} / {requests} = {per_request:.5f} (target <= 0.01)")
    print("  by command:", ", ".join(f"{k} {v}" for k, v in sorted(by_command.items())))
    print("sessions per node:", [s["active_sessions"] for s in stats])
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "results": {k: [asdict(x) for x in v] for k, v in results.items()},
                    "forwarded_p50_added_ms": added,
                    "forwarded_p50_added_ms_c10": loaded,
                    "redis_commands_per_request": per_request,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
