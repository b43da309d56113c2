"""herd's launcher against the ``preexec_fn`` it replaced: one run, one table.

    python bench/launcher.py            # 60 rounds
    python bench/launcher.py --quick    # 15

Issue 14 (item 8) replaced the ``preexec_fn`` that set the parent-death signal
and joined the worker's cgroups (unsafe in a process with threads) by a
launcher that does it between ``fork`` and the worker's ``exec``; the target is
no more than the spawn cost it had. This times a start of ``/bin/true`` until
it exits, as a worker starts (``start_new_session``, the environment given),
four ways, alternating within each round so that noise hits all alike:

- ``preexec_fn``: the old way (anchor), re-created here as it was;
- ``setpriv+dash``: the launcher's fast path;
- ``python``: the launcher's fallback (herd's init in ``--launch`` mode);
- ``direct``: no launcher and no ``preexec_fn`` (the floor).

Once with no sandbox, once with namespaces and cgroup limits; each in this
small process and again with a 400 MiB heap, as a Jupyter server holding
several kernels' worth of data: ``fork`` (which a ``preexec_fn`` forces) copies
the page tables of the whole heap; ``vfork``, which ``subprocess`` uses
otherwise, does not.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import random
import signal
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence

from herd import _cgroups
from herd import _sandbox as sandbox_module
from herd._sandbox import Sandbox, launch_prefix

LIMITS = {"cpu_limit": 1.0, "memory_limit": 256 << 20, "pids_limit": 64}


def old_preexec(join: Sequence[str]) -> Callable[[], None]:
    """The ``preexec_fn`` herd used before the launcher, as it was."""
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()
    files = [os.fsencode(path) for path in join]

    def preexec() -> None:
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)
        for path in files:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)

    return preexec


def timed(argv: list[str], preexec: Callable[[], None] | None = None) -> float:
    started = time.perf_counter()
    subprocess.run(argv, start_new_session=True, preexec_fn=preexec, check=True)
    return (time.perf_counter() - started) * 1000


def one_round(box: Sandbox, namespaces: tuple[str, ...]) -> dict[str, float]:
    """Each way once, in a shuffled order; milliseconds."""
    cgroup = box.cgroup(f"bench-launcher-{time.monotonic_ns()}")
    join = cgroup.procs_files if cgroup else []
    env = dict(os.environ)
    try:
        fast = launch_prefix(join, env) if sandbox_module.launcher_tools() else None
        tools = sandbox_module.launcher_tools
        sandbox_module.launcher_tools = lambda: None  # type: ignore[assignment]
        try:
            python = launch_prefix(join, env)
        finally:
            sandbox_module.launcher_tools = tools
        ways: dict[str, Callable[[], float]] = {
            "preexec_fn": lambda: timed([*namespaces, "true"], old_preexec(join)),
            "python": lambda: timed([*python, *namespaces, "true"]),
            "direct": lambda: timed([*namespaces, "true"]),
        }
        if fast is not None:
            ways["setpriv+dash"] = lambda: timed([*fast, *namespaces, "true"])
        order = list(ways)
        random.shuffle(order)
        return {name: ways[name]() for name in order}
    finally:
        if cgroup is not None:
            cgroup.remove()


def measure(rounds: int, box: Sandbox, namespaces: tuple[str, ...]) -> dict[str, float]:
    samples: dict[str, list[float]] = {}
    one_round(box, namespaces)  # warm up
    for _ in range(rounds):
        for name, ms in one_round(box, namespaces).items():
            samples.setdefault(name, []).append(ms)
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rounds = 15 if args.quick else 60
    plain = Sandbox(False)
    full = Sandbox(True, **LIMITS)  # type: ignore[arg-type]
    full.prepare()
    print(f"herd's launcher against preexec_fn; sandbox here: {full.report.level}")
    print(f"cgroups: {_cgroups.detect().reason}; load {os.getloadavg()[0]:.2f}")
    cases = [("no sandbox", plain, ()), ("namespaces + cgroups", full, full.report.prefix)]
    heap: list[bytearray] = []
    header = ["preexec_fn", "setpriv+dash", "python", "direct", "dash/pre", "python/pre"]
    print(f"{'case':34}" + "".join(f"{h:>13}" for h in header))
    for heap_mib in (0, 400):
        while sum(map(len, heap)) < heap_mib << 20:
            heap.append(bytearray(b"x" * (1 << 20)))  # touched, as live data is
        for name, box, namespaces in cases:
            row = measure(rounds, box, namespaces)
            pre = row["preexec_fn"]
            cells = [f"{row.get(h, float('nan')):13.2f}" for h in header[:4]]
            cells += [f"{row.get(h, float('nan')) / pre:13.2f}" for h in ("setpriv+dash", "python")]
            print(f"{name + f', heap +{heap_mib} MiB':34}" + "".join(cells))
    print("\nmedians in ms of a start of /bin/true until it exits; ratios to preexec_fn")
    print("target: the launcher costs no more than preexec_fn (ratio <= 1.0)")


if __name__ == "__main__":
    main()
