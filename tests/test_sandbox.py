"""Sandbox over real processes: limits (memory, PIDs, CPU), cleanup, and the init
that is PID 1 of each worker's namespace (reaping, signals, exit status).

These need a writable cgroup hierarchy (root on the build machines: cgroup v1
memory, cpu and pids). Where there is none they are skipped, saying why.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from typing import Any

import psutil
import pytest
from tornado.httpclient import HTTPClientError

import herd
from herd import _cgroups
from herd import _sandbox as herd_sandbox
from herd._procfs import descendants
from tests.helpers import WORKER, factory, wait_until, wait_until_sync

GROUPS = _cgroups.detect()
needs_cgroups = pytest.mark.skipif(
    GROUPS.version is None, reason=f"no usable cgroups here: {GROUPS.reason}"
)


def read(folder: str, name: str) -> str:
    """A cgroup control file (a tiny virtual file: reading it never blocks)."""
    with open(os.path.join(folder, name)) as f:
        return f.read()


def exists(path: str) -> bool:
    return os.path.exists(path)


def herd_cgroups() -> list[str]:
    """Every worker cgroup folder that exists, in every hierarchy."""
    found = []
    for root in set(GROUPS.roots.values()):
        if os.path.isdir(root):
            found += [
                os.path.join(root, n)
                for n in os.listdir(root)
                if os.path.isdir(os.path.join(root, n))
            ]
    return found


@needs_cgroups
async def test_memory_hog_is_killed_reported_and_the_pool_keeps_serving() -> None:
    crashed: list[str] = []
    spawner = factory(memory_limit=64 << 20)
    async with herd.Pool(spawner, min_workers=1, max_workers=3, on_crash=crashed.append) as pool:
        async with pool.acquire("neighbour") as session:
            assert json.loads((await session.worker.client.get("/state")).body)["count"] == 1
        hog = await pool.acquire("hog")
        with pytest.raises(HTTPClientError, match="Stream closed"):  # it dies mid-request
            await hog.worker.client.get("/alloc/256", timeout=20)
        await wait_until(lambda: crashed == ["hog"], timeout=10, what="crash path")
        crash = pool.stats().recent_crashes[-1]
        assert crash.reason == "killed: memory limit 64 MiB"
        assert crash.session_id == "hog"
        with pytest.raises(herd.WorkerDeadError, match="memory limit 64 MiB"):
            hog.check()
        await hog.close()
        async with pool.acquire("neighbour") as session:  # untouched
            assert json.loads((await session.worker.client.get("/state")).body)["count"] == 2


@needs_cgroups
async def test_fork_bomb_stops_at_the_pid_limit() -> None:
    async with herd.Pool(factory(pids_limit=24), min_workers=1, max_workers=1) as pool:
        async with pool.acquire("bomb") as session:
            reply = await session.worker.client.get("/forkbomb/10000", timeout=20)
            forked = json.loads(reply.body)["forked"]
            assert 0 < forked < 24
            worker = session.worker
            assert isinstance(worker, herd.ProcessWorker)
            assert worker.cgroup is not None
            assert worker.cgroup.pids_limit_hits() > 0
            # The host is unaffected: it can still start processes.
            true = await asyncio.create_subprocess_exec("true")
            assert await true.wait() == 0
            assert await worker.healthy()


@needs_cgroups
async def test_cpu_limit_holds_a_busy_worker_to_its_share() -> None:
    async with herd.Pool(factory(cpu_limit=0.25), min_workers=1, max_workers=1) as pool:
        async with pool.acquire("busy") as session:
            worker = session.worker
            assert isinstance(worker, herd.ProcessWorker)
            before, started = worker.cpu_seconds(), time.monotonic()
            await worker.client.get("/spin/1.5", timeout=20)
            after, elapsed = worker.cpu_seconds(), time.monotonic() - started
            assert before is not None
            assert after is not None
            share = (after - before) / elapsed
            assert 0.15 <= share <= 0.35, f"used {share:.2f} of a core"


@needs_cgroups
async def test_cgroups_are_created_with_the_limits_and_removed_with_the_worker() -> None:
    spawner = factory(cpu_limit=0.5, memory_limit=128 << 20, pids_limit=50)
    worker = await spawner.spawn()
    assert worker.cgroup is not None
    paths = set(worker.cgroup.paths.values())
    assert all(exists(p) for p in paths)
    assert str(worker.pid) in read(next(iter(paths)), "cgroup.procs").split()
    if GROUPS.version == "v1":
        assert int(read(worker.cgroup.paths["memory"], "memory.limit_in_bytes")) == 128 << 20
        assert int(read(worker.cgroup.paths["cpu"], "cpu.cfs_quota_us")) == 50_000
        assert read(worker.cgroup.paths["pids"], "pids.max").strip() == "50"
    await worker.close()
    assert not any(exists(p) for p in paths)


@needs_cgroups
def test_a_killed_pools_cgroups_are_swept_by_the_next_pool() -> None:
    program = textwrap.dedent(f"""
        import asyncio, sys
        import herd
        async def main():
            factory = herd.ProcessFactory([sys.executable, {WORKER!r}, "{{port}}"],
                                          memory_limit=64 << 20)
            async with herd.Pool(factory, min_workers=2, max_workers=2):
                print("ready", flush=True)
                await asyncio.Event().wait()
        asyncio.run(main())
    """)
    before = set(herd_cgroups())
    pool = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, text=True)
    assert pool.stdout is not None
    assert pool.stdout.readline().strip() == "ready"
    stale = set(herd_cgroups()) - before
    assert len(stale) >= 2  # memory (and the other hierarchies) for two workers
    os.kill(pool.pid, signal.SIGKILL)
    pool.wait()
    pool.stdout.close()

    async def next_pool() -> None:  # even one without limits of its own sweeps
        async with herd.Pool(factory(), min_workers=1, max_workers=1):
            assert not stale & set(herd_cgroups())

    asyncio.run(next_pool())
    wait_until_sync(
        lambda: not (set(herd_cgroups()) - before), timeout=5, what="every herd cgroup to go"
    )


@needs_cgroups
async def test_shutdown_leaves_no_cgroup() -> None:
    before = set(herd_cgroups())
    async with herd.Pool(factory(pids_limit=64), min_workers=2, max_workers=3) as pool:
        await (await pool.acquire("a")).close()
        assert len(set(herd_cgroups()) - before) >= 2
    assert set(herd_cgroups()) == before


async def test_stats_report_the_sandbox_level_and_why() -> None:
    async with herd.Pool(factory(), min_workers=1, max_workers=1) as pool:
        stats = pool.stats()
        assert stats.sandbox in ("full", "partial", "none")
        assert stats.sandbox_reason
    async with herd.Pool(factory(sandbox=False), min_workers=0, max_workers=1) as pool:
        assert pool.stats().sandbox == "none"
        assert "sandbox=False" in pool.stats().sandbox_reason


@pytest.mark.skipif(os.geteuid() != 0, reason="the full sandbox needs root here")
async def test_required_sandbox_runs_when_everything_is_available() -> None:
    spawner = factory(sandbox="required", memory_limit=64 << 20)
    if spawner.sandbox_report.level != "full":
        pytest.skip(spawner.sandbox_report.reason)
    async with herd.Pool(spawner, min_workers=1, max_workers=1) as pool:
        assert pool.stats().sandbox == "full"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pids_limit": 0}, "pids_limit"),
        ({"pids_limit": -2}, "pids_limit"),
        ({"pids_limit": 1.5}, "pids_limit"),
        ({"cpu_limit": 0}, "cpu_limit"),
        ({"cpu_limit": -0.5}, "cpu_limit"),
        ({"cpu_limit": "half"}, "cpu_limit"),
        ({"memory_limit": 1000}, "memory_limit"),
        ({"memory_limit": -1}, "memory_limit"),
        ({"memory_limit": 1.5e9}, "memory_limit"),
    ],
)
def test_invalid_limits_raise_at_construction(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        herd.ProcessFactory(["true"], **kwargs)


def test_unlimited_pids_is_minus_one() -> None:
    assert herd.ProcessFactory(["true"], pids_limit=-1).limits.pids is None
    assert not herd.ProcessFactory(["true"]).limits


@pytest.mark.skipif(
    GROUPS.version != "v2", reason=f"cgroup v2 controllers not usable here: {GROUPS.reason}"
)
async def test_cgroup_v2_limits() -> None:
    worker = await factory(cpu_limit=0.5, memory_limit=128 << 20, pids_limit=50).spawn()
    try:
        assert worker.cgroup is not None
        path = worker.cgroup.paths[""]
        assert read(path, "cpu.max").split() == ["50000", "100000"]
        assert int(read(path, "memory.max")) == 128 << 20
        assert read(path, "pids.max").strip() == "50"
    finally:
        await worker.close()


@needs_cgroups
async def test_a_worker_stuck_at_its_pid_limit_goes_through_the_crash_path() -> None:
    crashed: list[str] = []
    async with herd.Pool(
        factory(pids_limit=16),
        min_workers=0,
        max_workers=1,
        health_interval=None,
        on_crash=crashed.append,
    ) as pool:
        session = await pool.acquire("stuck")
        worker = session.worker
        # Fill every slot, the request's own thread included: the server then
        # cannot start a thread for the next request.
        reply = await worker.client.get("/forkbomb/10000/hold", timeout=5)
        assert json.loads(reply.body)["forked"] > 0
        await pool.check_health()
        await wait_until(lambda: crashed == ["stuck"], timeout=10, what="crash path")
        assert "PID limit (16)" in pool.stats().recent_crashes[-1].reason
        await session.close()


NOT_ROOT_PROGRAM = """
import asyncio, logging, sys
import herd
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
WORKER = [sys.executable, "tests/helpers/worker.py", "{port}"]

async def main():
    factory = herd.ProcessFactory(WORKER, memory_limit=64 << 20)
    async with herd.Pool(factory, min_workers=1, max_workers=2) as pool:
        async with pool.acquire("s") as session:
            print("served", (await session.worker.client.get("/pid")).code)
        await pool.acquire("t")  # a second spawn: still one warning
        print("level", pool.stats().sandbox)
    required = herd.ProcessFactory(WORKER, memory_limit=64 << 20, sandbox="required")
    try:
        async with herd.Pool(required, min_workers=1, max_workers=1):
            print("required ran")
    except herd.SpawnError as exc:
        print("required refused:", exc.message.split(":")[0])

asyncio.run(main())
"""


def test_not_root_warns_once_and_required_refuses() -> None:
    """Run a pool as 'nobody' with Debian's python3 and copies of what it imports."""
    import pathlib
    import shutil
    import tempfile

    python = "/usr/bin/python3"
    if os.geteuid() != 0 or not shutil.which("setpriv") or not os.path.exists(python):
        pytest.skip("needs root, setpriv and /usr/bin/python3 to become another user")
    version = subprocess.run(
        [python, "-c", "import sys; print(sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if version != str(tuple(sys.version_info[:2])):
        pytest.skip(f"/usr/bin/python3 is {version}: psutil's extension would not load")
    tmp_path = pathlib.Path(tempfile.mkdtemp(prefix="herd-nobody-", dir="/tmp"))
    try:
        run_as_nobody(tmp_path, python)
    finally:
        shutil.rmtree(tmp_path)


def run_as_nobody(tmp_path: Any, python: str) -> None:
    import shutil

    import psutil
    import tornado

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for package in (tornado, psutil):
        shutil.copytree(
            os.path.dirname(package.__file__),
            tmp_path / os.path.basename(os.path.dirname(package.__file__)),
        )
    shutil.copytree(os.path.join(root, "herd"), tmp_path / "herd")
    shutil.copytree(os.path.join(root, "tests", "helpers"), tmp_path / "tests" / "helpers")
    for path in [tmp_path, *tmp_path.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    done = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "env",
            "HOME=/tmp",
            f"PYTHONPATH={tmp_path}",
            python,
            "-c",
            NOT_ROOT_PROGRAM,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "served 200" in done.stdout
    assert "level partial" in done.stdout or "level none" in done.stdout
    assert "required refused: sandbox='required' but it is" in done.stdout
    warnings = [line for line in done.stderr.splitlines() if "WARNING herd.sandbox" in line]
    assert len(warnings) == 1, done.stderr
    assert "not root" in warnings[0]


# -- the init: PID 1 of the namespace is herd's, not the worker ---------------------------

NAMESPACES = herd_sandbox.detect()
needs_namespaces = pytest.mark.skipif(
    NAMESPACES.level == "none", reason=f"no PID namespace here: {NAMESPACES.reason}"
)


async def get(worker: herd.ProcessWorker, path: str) -> Any:
    return json.loads((await worker.client.get(path, timeout=10)).body)


def worker_process(worker: herd.ProcessWorker) -> psutil.Process:
    """The worker's own process on the host: below the launcher, the init and its parent."""
    for pid in descendants(worker.pid):
        process = psutil.Process(pid)
        if WORKER in process.cmdline()[1:2]:
            return process
    raise AssertionError(f"no worker process under {worker.pid}")


@needs_namespaces
async def test_the_worker_is_neither_pid_1_nor_an_orphan() -> None:
    worker = await factory().spawn()
    try:
        ids = await get(worker, "/ids")
        # Its parent is the init's fork: alive, and not PID 1, which would tell
        # programs such as ipykernel that their parent has died.
        assert ids["pid"] not in (0, 1)
        assert ids["ppid"] not in (0, 1)
        # A session of its own, as Jupyter starts a kernel: signals to the
        # launcher's group reach it through the init only.
        assert ids["sid"] == ids["pgid"] == ids["pid"]
        host = worker_process(worker)
        assert os.getpgid(host.pid) != os.getpgid(worker.pid)
        assert host.parent().parent().parent().pid == worker.pid  # type: ignore[union-attr]
    finally:
        await worker.close()


@needs_namespaces
async def test_orphans_of_the_worker_are_reaped() -> None:
    worker = await factory().spawn()
    try:
        # The case: `subprocess.run('sleep 0.2 &', shell=True)` three times.
        orphans = set((await get(worker, "/orphans/3"))["pids"])
        assert len(orphans) == 3
        pids: list[int] = []

        async def visible() -> set[int]:
            pids[:] = (await get(worker, "/ps"))["pids"]
            return orphans & set(pids)

        deadline = time.monotonic() + 10
        while await visible():  # a zombie stays in /proc until it is reaped
            assert time.monotonic() < deadline, f"orphans not reaped: {pids}"
            await asyncio.sleep(0.05)
    finally:
        await worker.close()


@needs_namespaces
async def test_a_worker_that_sends_itself_sigterm_dies_of_it() -> None:
    crashed: list[str] = []
    async with herd.Pool(factory(), min_workers=0, max_workers=1, on_crash=crashed.append) as pool:
        session = await pool.acquire("self")
        await session.worker.client.get("/raise/SIGTERM")
        await wait_until(lambda: crashed == ["self"], timeout=10, what="crash path")
        assert pool.stats().recent_crashes[-1].reason == "killed by SIGTERM"
        assert session.worker.returncode == -signal.SIGTERM  # type: ignore[attr-defined]
        await session.close()


@needs_namespaces
@pytest.mark.parametrize(
    ("how", "reason", "code"),
    [
        ("/exit/7", "exited with code 7", 7),
        ("/exit/0", "exited with code 0", 0),
        ("sigkill", "killed by SIGKILL", -signal.SIGKILL),
        ("/raise/SIGSEGV", "killed by SIGSEGV", -signal.SIGSEGV),
    ],
)
async def test_the_workers_exit_status_comes_through_the_init(
    how: str, reason: str, code: int
) -> None:
    worker = await factory().spawn()
    try:
        if how == "sigkill":
            worker_process(worker).kill()  # the worker itself, not the init
        else:
            await worker.client.get(how)
        assert await asyncio.wait_for(worker.wait(), 10) == reason
        assert worker.returncode == code
    finally:
        await worker.close()


COUNTING_WORKER = """
import http.server, json, os, signal, sys
counts = {"SIGINT": 0, "SIGTERM": 0}
def count(signum, frame):
    counts[signal.Signals(signum).name] += 1
signal.signal(signal.SIGINT, count)
signal.signal(signal.SIGTERM, count)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps(counts).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


@needs_namespaces
async def test_a_signal_to_the_launchers_group_reaches_the_worker_once() -> None:
    worker = await herd.ProcessFactory(
        [sys.executable, "-c", COUNTING_WORKER, "{port}"], health_path="/"
    ).spawn()
    try:
        for round in range(1, 4):
            # As herd and jupyter_client interrupt: SIGINT to the launcher's group.
            os.killpg(worker.pid, signal.SIGINT)
            # A marker after it (SIGTERM: unshare, in that group too, dies of the
            # signals it does not block). The init forwards in order, and Python
            # runs the handlers of signals that came together in signal-number
            # order: once the marker is counted, every copy of the SIGINT is too.
            os.killpg(worker.pid, signal.SIGTERM)
            counts: dict[str, int] = {}
            deadline = time.monotonic() + 10
            while counts.get("SIGTERM") != round:
                assert time.monotonic() < deadline, counts
                counts = await get(worker, "/")
            assert counts["SIGINT"] == round
    finally:
        await worker.close()


@needs_namespaces
@pytest.mark.parametrize(
    ("prelude", "code", "line"),
    [
        ("", -signal.SIGTERM, None),  # the default action: dies of SIGTERM at once
        (
            "signal.signal(signal.SIGTERM, lambda *a: (print('graceful'), os._exit(0)))",
            0,
            "graceful",
        ),
    ],
)
async def test_close_stops_a_worker_with_sigterm_with_or_without_a_handler(
    prelude: str, code: int, line: str | None
) -> None:
    from tests.test_process import inline_worker

    worker = await herd.ProcessFactory(inline_worker(prelude), stop_timeout=10).spawn()
    started = time.monotonic()
    await worker.close()
    assert time.monotonic() - started < 5  # not the stop_timeout: SIGTERM did it
    assert worker.returncode == code
    if line is not None:
        assert line in worker.logs()


@needs_namespaces
async def test_close_kills_a_worker_that_ignores_sigterm_after_stop_timeout() -> None:
    from tests.test_process import inline_worker

    stubborn = "signal.signal(signal.SIGTERM, lambda *a: print('ignored'))"
    worker = await herd.ProcessFactory(inline_worker(stubborn), stop_timeout=0.5).spawn()
    started = time.monotonic()
    await worker.close()
    assert time.monotonic() - started >= 0.5
    assert worker.returncode == -signal.SIGKILL
    assert worker.logs() == ["ignored"]  # the SIGTERM came through, once


async def exec_state(command: list[str], sandbox: bool) -> list[str]:
    """What ``command`` prints when herd starts it (it exits at once: a failed spawn)."""
    spawner = herd.ProcessFactory(command, sandbox=sandbox, inherit_env=False, env={"A": "1"})
    with pytest.raises(herd.SpawnError, match="exited with code 0") as caught:
        await spawner.spawn()
    return caught.value.output_tail


@needs_namespaces
async def test_the_worker_is_execd_with_the_signals_and_environment_it_would_have_had() -> None:
    """As without the init in between: nothing blocked or ignored, the same variables."""
    signals = ["grep", "-E", "^Sig(Blk|Ign)", "/proc/self/status"]
    assert await exec_state(signals, True) == await exec_state(signals, False)
    blocked, ignored = await exec_state(signals, True)
    assert blocked.split() == ["SigBlk:", "0000000000000000"]
    assert ignored.split() == ["SigIgn:", "0000000000000000"]
    # No LC_CTYPE either (Python's start-up adds it to the init's own environment
    # when it coerces a C locale).
    names = sorted(line.split("=")[0] for line in await exec_state(["env"], True))
    assert names == ["A", "HERD_WORKER_TAG", "PORT"]
    assert len(await exec_state(["env"], False)) == 3


@needs_namespaces
@needs_cgroups
async def test_the_init_and_the_worker_run_in_the_workers_cgroup() -> None:
    worker = await factory(memory_limit=128 << 20).spawn()
    try:
        assert worker.cgroup is not None
        members = {int(p) for p in read(worker.cgroup.paths["memory"], "cgroup.procs").split()}
        tree = [worker.pid, *descendants(worker.pid)]
        assert len(tree) >= 4  # unshare, the init, its fork, the worker
        assert set(tree) <= members
    finally:
        await worker.close()


@needs_namespaces
async def test_stats_count_the_workers_own_memory() -> None:
    async with herd.Pool(factory(), min_workers=0, max_workers=1) as pool:
        async with pool.acquire("big") as session:
            await session.worker.client.get("/alloc/64", timeout=20)
            await asyncio.sleep(1.1)  # past the sampler's cache
            rss = pool.stats().workers[0].rss_bytes
            assert rss is not None
            assert rss >= 64 << 20


KERNEL_CELL = """
import time
caught = 0
print("running", flush=True)
end = time.monotonic() + 20
while time.monotonic() < end:
    try:
        time.sleep(0.01)
    except KeyboardInterrupt:
        caught += 1
        end = min(end, time.monotonic() + 1.0)  # time for a second one to come
print("caught", caught)
"""


@needs_namespaces
async def test_a_kernel_interrupt_raises_one_keyboard_interrupt() -> None:
    herd_nb = pytest.importorskip("herd_nb")
    pytest.importorskip("ipykernel")
    worker = await herd_nb.KernelFactory("python3").spawn()
    try:
        ids = "import os; print(os.getpid() != 1, os.getppid() not in (0, 1))"
        printed: list[str] = []

        def hook(msg: dict[str, Any]) -> None:
            if msg["msg_type"] == "stream":
                printed.append(msg["content"]["text"])

        await worker.client.execute_interactive(ids, output_hook=hook, timeout=20)
        assert printed == ["True True\n"]
        printed.clear()
        cell = asyncio.ensure_future(
            worker.client.execute_interactive(KERNEL_CELL, output_hook=hook, timeout=30)
        )
        await wait_until(lambda: printed, timeout=20, what="the cell to run")
        await worker.manager.interrupt_kernel()  # SIGINT to the launcher's group
        reply = await cell
        assert reply["content"]["status"] == "ok"
        assert "".join(printed).split() == ["running", "caught", "1"]
    finally:
        await worker.close()


@needs_namespaces
def test_init_ready_tells_when_signals_to_the_launchers_group_get_through() -> None:
    """Until the init has blocked the signals it forwards, the kernel drops those
    that PID 1 has no handler for: a close then goes straight to SIGKILL."""
    prefix = (*herd_sandbox.launch_prefix(), *herd_sandbox.namespaces(True).prefix)
    launched = subprocess.Popen([*prefix, "sleep", "30"], start_new_session=True)
    try:
        assert not herd_sandbox.init_ready(launched.pid)  # Python is still starting
        wait_until_sync(lambda: herd_sandbox.init_ready(launched.pid), what="the init")
        os.killpg(launched.pid, signal.SIGTERM)
        assert launched.wait(10) == 128 + signal.SIGTERM  # forwarded, and sleep died of it
        assert herd_sandbox.returncode(NAMESPACES, 128 + signal.SIGTERM) == -signal.SIGTERM
    finally:
        if launched.poll() is None:
            os.killpg(launched.pid, signal.SIGKILL)
            launched.wait()


def test_what_tenant_isolation_cannot_enforce_is_named_and_required_refuses_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where a machine cannot give a tenant its own network (not root), the level
    says partial and the reason says why; ``sandbox="required"`` refuses."""
    if NAMESPACES.level == "none":
        pytest.skip(NAMESPACES.reason)
    monkeypatch.setattr(herd_sandbox, "network_namespaces", lambda: "not root: no setns")
    report = herd_sandbox.Sandbox(True, isolation="tenant").report
    assert report.level == "partial"
    assert "network NOT isolated: not root: no setns" in report.reason
    assert "--net" not in report.prefix
    with pytest.raises(herd.SpawnError, match="network NOT isolated"):
        herd_sandbox.Sandbox("required", isolation="tenant").check()
    monkeypatch.undo()
    if herd_sandbox.network_namespaces() is None and NAMESPACES.level == "full":
        report = herd_sandbox.Sandbox("required", isolation="tenant").check()
        assert report.level == "full"
        assert "a network of its own" in report.reason


def test_a_user_is_found_by_name_or_uid_as_a_flag_gives_it() -> None:
    assert herd_sandbox.resolve_user("0") == herd_sandbox.resolve_user(0)
    assert herd_sandbox.resolve_user("root") == ("root", 0, 0)


def test_an_unknown_user_or_isolation_is_refused_at_once() -> None:
    with pytest.raises(ValueError, match="no such user"):
        herd.ProcessFactory(["true"], user="no-such-user-here")
    with pytest.raises(ValueError, match="isolation must be"):
        herd.ProcessFactory(["true"], isolation="jail")  # type: ignore[arg-type]


needs_netns = pytest.mark.skipif(
    herd_sandbox.network_namespaces() is not None,
    reason=f"no network namespaces here: {herd_sandbox.network_namespaces()}",
)


@needs_netns
async def test_a_tenants_http_client_reaches_it_in_its_network() -> None:
    """``worker.client`` of a worker in its own network connects through a socket
    made there (TCPClient.connect passes source_ip/source_port to the hook herd
    overrides: with a narrower signature every request raised TypeError)."""
    worker = await factory(isolation="tenant").spawn()
    try:
        assert worker.netns is not None
        assert (await get(worker, "/state"))["count"] == 1
        assert (await get(worker, "/state"))["count"] == 2
    finally:
        await worker.close()


@needs_netns
async def test_a_closed_tenants_network_is_never_entered_again() -> None:
    """Once its launcher is reaped, a worker's PID may name another process, in
    another worker's network: a socket for the closed worker must not be made
    there (it could reach another session's worker on a reused port)."""
    worker, other = [await factory(isolation="tenant").spawn() for _ in range(2)]
    try:
        assert worker.netns is not None
        with worker.open_socket() as sock:
            assert sock.family == socket.AF_INET
        await worker.close()
        # PID reuse, made to happen: the closed worker's PID now names a process
        # in another worker's network.
        worker.netns.pid = other.pid
        with pytest.raises(ConnectionRefusedError):
            worker.open_socket()
    finally:
        await worker.close()
        await other.close()
