"""herd's launcher: the step between the pool's fork and the worker's program.

It sets the parent-death signal, joins the worker's cgroups and checks that the
pool is still its parent, as a ``preexec_fn`` did, but without running Python
between ``fork`` and ``exec`` in a process that has threads. Each test runs on
both launchers: util-linux ``setpriv`` + ``dash`` (the fast path) and herd's
init in its ``--launch`` mode (where those are missing).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import herd
import herd_nb
from herd import _cgroups
from herd import _sandbox as herd_sandbox
from tests.helpers import factory, pid_alive, wait_until_sync

GROUPS = _cgroups.detect()
needs_cgroups = pytest.mark.skipif(
    GROUPS.version is None, reason=f"no usable cgroups here: {GROUPS.reason}"
)
FAST = herd_sandbox.launcher_tools()


@pytest.fixture(params=["setpriv+dash", "python"])
def launcher(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which launcher ``launch_prefix`` builds (the module's choice, forced)."""
    if request.param == "setpriv+dash":
        if FAST is None:
            pytest.skip("util-linux setpriv or dash is not installed here")
    else:
        monkeypatch.setattr(herd_sandbox, "launcher_tools", lambda: None)
    return str(request.param)


def run(prefix: tuple[str, ...], command: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(
        [*prefix, *command], env=env, capture_output=True, text=True, timeout=30, check=True
    )
    return done.stdout


@pytest.mark.parametrize(
    "pwd",
    [None, os.getcwd(), "/nonexistent/stale"],
    ids=["no PWD", "PWD", "stale PWD"],
)
def test_the_launcher_passes_the_environment_exactly_as_given(
    launcher: str, pwd: str | None
) -> None:
    """dash would add or correct ``PWD``; Python's start-up may add ``LC_CTYPE``."""
    env = {"A": "1", "PATH": os.environ["PATH"], "LANG": "C"}
    if pwd is not None:
        env["PWD"] = pwd
    seen = run(herd_sandbox.launch_prefix((), env), ["env", "-0"], env)
    assert dict(entry.split("=", 1) for entry in seen.split("\0") if entry) == env


def test_the_launcher_leaves_signals_as_a_direct_start_does(launcher: str) -> None:
    """Nothing blocked or ignored that a plain ``Popen`` would not have left so."""
    command = ["grep", "-E", "^Sig(Blk|Ign)", "/proc/self/status"]
    env = dict(os.environ)
    assert run(herd_sandbox.launch_prefix((), env), command, env) == run((), command, env)


def test_the_launcher_does_not_start_the_worker_once_its_pool_is_gone(
    launcher: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A pool that dies before the parent-death signal is set cannot send it:
    the launcher sees it is no longer the child of the process that planned it."""
    monkeypatch.setattr(os, "getpid", lambda: 1)  # not our parent
    prefix = herd_sandbox.launch_prefix((), os.environ)
    monkeypatch.undo()
    marker = tmp_path / "ran"
    done = subprocess.run([*prefix, "touch", str(marker)], timeout=30, check=False)
    assert done.returncode == 125
    assert not marker.exists()


SPAWNER = textwrap.dedent(
    """
    import subprocess, sys
    from herd import _sandbox
    if sys.argv[1] == "python":
        _sandbox.launcher_tools = lambda: None
    prefix = _sandbox.launch_prefix((), None)
    child = subprocess.Popen([*prefix, "sleep", "60"], start_new_session=True)
    print(child.pid, flush=True)
    sys.stdin.read()
    """
)


def test_the_worker_dies_with_the_process_that_forked_it(launcher: str) -> None:
    """The parent-death signal: a SIGKILLed pool process leaves no worker."""
    spawner = subprocess.Popen(
        [sys.executable, "-c", SPAWNER, launcher],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.getcwd(),
    )
    assert spawner.stdout is not None
    assert spawner.stdin is not None
    worker = 0
    try:
        worker = int(spawner.stdout.readline())
        # The launcher has exec'd sleep (same PID) once /proc says so.
        wait_until_sync(lambda: _comm(worker) == "sleep", what="the worker's exec")
        os.kill(spawner.pid, signal.SIGKILL)
        spawner.wait(10)
        wait_until_sync(lambda: not pid_alive(worker), what="the worker's death")
    finally:
        if worker and pid_alive(worker):
            os.kill(worker, signal.SIGKILL)
        if spawner.poll() is None:
            spawner.kill()
            spawner.wait()
        spawner.stdin.close()
        spawner.stdout.close()


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


@needs_cgroups
def test_the_launcher_joins_the_cgroups_before_the_program_runs(launcher: str) -> None:
    sandbox = herd_sandbox.Sandbox(False, memory_limit=256 << 20)
    cgroup = sandbox.cgroup(f"launcher-{os.getpid()}")
    assert cgroup is not None
    try:
        prefix = herd_sandbox.launch_prefix(cgroup.procs_files, os.environ)
        seen = run(prefix, ["cat", "/proc/self/cgroup"], dict(os.environ))
        memory = cgroup.paths.get("memory") or cgroup.paths[""]
        assert memory.split("/sys/fs/cgroup/", 1)[1].split("/", 1)[1] in seen
    finally:
        cgroup.remove()


def test_a_cgroup_the_launcher_cannot_join_stops_the_start_with_a_reason(
    launcher: str, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    missing = str(tmp_path / "gone" / "cgroup.procs")
    prefix = herd_sandbox.launch_prefix([missing], os.environ)
    done = subprocess.run(
        [*prefix, "touch", str(marker)], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 125
    assert "cannot join the worker's cgroup" in done.stderr
    assert missing in done.stderr
    assert not marker.exists()


# -- the factories start workers without a preexec_fn ----------------------------------


@pytest.fixture
def popen_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The keyword arguments of every ``subprocess.Popen`` made during the test
    (jupyter_client's launcher imports the same class)."""
    calls: list[dict[str, Any]] = []
    original = subprocess.Popen.__init__

    def recording(self: subprocess.Popen[Any], *args: Any, **kwargs: Any) -> None:
        calls.append(kwargs)
        original(self, *args, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", recording)
    return calls


@pytest.mark.parametrize("sandbox", [True, False])
async def test_process_workers_start_without_a_preexec_fn(
    popen_calls: list[dict[str, Any]], sandbox: bool
) -> None:
    worker = await factory(sandbox=sandbox).spawn()
    try:
        starts = [call for call in popen_calls if call.get("start_new_session")]
        assert starts, popen_calls
        assert all(call.get("preexec_fn") is None for call in starts)
    finally:
        await worker.close()


async def test_kernels_start_without_a_preexec_fn(popen_calls: list[dict[str, Any]]) -> None:
    worker = await herd_nb.KernelFactory("python3").spawn()
    try:
        assert popen_calls
        assert all(call.get("preexec_fn") is None for call in popen_calls)
    finally:
        await worker.close()


async def test_a_pool_behind_the_python_launcher_serves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fallback is a whole path, not only a prefix: a pool works on it."""
    monkeypatch.setattr(herd_sandbox, "launcher_tools", lambda: None)
    async with herd.Pool(factory(), min_workers=1, max_workers=1) as pool:
        async with pool.acquire("s") as session:
            assert (await session.worker.client.get("/health")).code == 200
