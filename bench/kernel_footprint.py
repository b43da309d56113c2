"""What a Jupyter server costs holding kernels, and a restart's time: stock against herd_nb.

    python bench/kernel_footprint.py              # 6 kernels, 5 restarts per server
    python bench/kernel_footprint.py --kernels 12 --restarts 9

Both servers (stock ``jupyter server`` with herd_nb disabled, and herd_nb with its
defaults: 2 warm spares) run in the same run. Each opens ``--kernels`` notebooks
and runs a cell in each over the kernel WebSocket, then the server process's
threads and open file descriptors are counted (``/proc``). Then, alternating
between the servers, a kernel that started a child process (``sleep 60``, as a
notebook running a tool in the background would), or one whose child has
exited, is restarted through ``POST /api/kernels/{id}/restart``, and the
request's time is taken: the medians are compared (the machine is shared and
noisy).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

from kernels import Server, execute_once, jupyter_server, ready  # bench/kernels.py

# herd_nb's defaults, not bench/kernels.py's 8 warm kernels.
SPARES = 2
CHILDREN = {
    "a child still running": "import subprocess; child = subprocess.Popen(['sleep', '60'])",
    "a child that exited": "import subprocess; subprocess.run(['true'])",
}


def census(pid: int) -> tuple[int, int]:
    """Threads and open file descriptors of process ``pid``."""
    return len(os.listdir(f"/proc/{pid}/task")), len(os.listdir(f"/proc/{pid}/fd"))


async def open_kernels(server: Server, count: int) -> list[str]:
    ids = []
    for i in range(count):
        body = {"path": f"k{i}.ipynb", "type": "notebook", "kernel": {"name": "python3"}}
        model = await server.call("POST", "/api/sessions", body)
        ids.append(str(model["kernel"]["id"]))
        await execute_once(server, ids[-1])
    return ids


async def restart_with_child(server: Server, kernel_id: str, child: str) -> float:
    """Seconds the restart request of a kernel that ran ``child`` takes."""
    await execute_once(server, kernel_id, child)
    started = time.perf_counter()
    await server.call("POST", f"/api/kernels/{kernel_id}/restart", {})
    return time.perf_counter() - started


async def main(kernels: int, restarts: int) -> None:
    census_rows = []
    times: dict[tuple[str, str], list[float]] = {
        (scenario, name): [] for scenario in CHILDREN for name in ("stock", "herd")
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("stock", "herd"):
            (Path(tmp) / name).mkdir()
        with (
            jupyter_server("stock", Path(tmp) / "stock") as stock,
            jupyter_server("herd", Path(tmp) / "herd", warm=SPARES) as herd,
        ):
            servers = (stock, herd)
            for server in servers:
                await ready(server, warm=SPARES)
            ids = {server.name: await open_kernels(server, kernels) for server in servers}
            await asyncio.sleep(2)  # the refill of herd's spares, and the servers settle
            for server in servers:
                threads, fds = census(server.proc.pid)
                census_rows.append((server.name, threads, fds))
            for i in range(restarts):
                order = servers if i % 2 == 0 else servers[::-1]
                for scenario, child in CHILDREN.items():
                    for server in order:
                        kernel_id = ids[server.name][i % kernels]
                        seconds = await restart_with_child(server, kernel_id, child)
                        times[scenario, server.name].append(seconds)
    print(f"holding {kernels} kernels (herd: plus {SPARES} warm spares)")
    print(f"{'server':8} {'threads':>8} {'fds':>6}")
    for name, threads, fds in census_rows:
        print(f"{name:8} {threads:8} {fds:6}")
    print(f"\nrestart of a kernel that started a child process ({restarts} per server)")
    print(f"{'scenario':24} {'server':8} {'p50 s':>8} {'max s':>8} {'herd/stock':>11}")
    for scenario in CHILDREN:
        for name in ("stock", "herd"):
            samples = times[scenario, name]
            p50 = statistics.median(samples)
            ratio = p50 / statistics.median(times[scenario, "stock"])
            shown = f"{ratio:10.2f}x" if name == "herd" else ""
            print(f"{scenario:24} {name:8} {p50:8.2f} {max(samples):8.2f} {shown:>11}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kernels", type=int, default=6)
    parser.add_argument("--restarts", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.kernels, args.restarts))
