"""``%load_ext herd_nb``: the %herd / %%herd magics in a real kernel, as a notebook uses them."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from herd_nb.magics import transform
from tests.helpers import WORKER, pid_alive, wait_until_sync
from tests.helpers.host_kernel import HostKernel
from tests.helpers.jupyter import Server


@pytest.fixture
def kernel(tmp_path: Path) -> Iterator[HostKernel]:
    host = HostKernel(tmp_path)
    try:
        host.ok("%load_ext herd_nb")
        yield host
    finally:
        host.shutdown()


def worker_pids(kernel: HostKernel) -> list[int]:
    cell = kernel.ok("_pool = %herd pool\nprint([w.pid for w in _pool.workers()])")
    return [int(pid) for pid in re.findall(r"\d+", cell.stream())]


def test_a_cell_runs_in_its_sessions_kernel_and_shows_its_output_here(kernel: HostKernel) -> None:
    started = kernel.ok("%herd start --warm 1 --max 4")
    assert "python3 kernels ready" in started.stream()

    cell = kernel.ok("%%herd alice\nx = 6 * 7\nprint('hello', x)\nx")
    assert cell.stream() == "hello 42\n"
    [result] = cell.of("execute_result")
    assert result.content["data"]["text/plain"] == "42"
    # Variables persist in a session and never reach another one, nor this kernel.
    assert kernel.ok("%%herd alice\nprint(x + 1)").stream() == "43\n"
    assert kernel.ok("%%herd bob\nprint(globals().get('x'))").stream() == "None\n"
    assert kernel.ok("print(globals().get('x'))").stream() == "None\n"

    # stdout and stderr arrive as they are printed, not when the cell ends.
    cell = kernel.ok(
        "%%herd alice\nimport sys, time\nprint('one', flush=True)\n"
        "print('err', file=sys.stderr, flush=True)\ntime.sleep(1.5)\nprint('two')"
    )
    one = next(o for o in cell.outputs if "one" in o.text)
    two = next(o for o in cell.outputs if "two" in o.text)
    assert two.at - one.at > 1.0, cell.outputs
    assert cell.stream("stderr") == "err\n"

    # Rich displays keep their display IDs, so updates replace them in place.
    cell = kernel.ok(
        "%%herd alice\nfrom IPython.display import HTML, display\n"
        "handle = display(HTML('<b>first</b>'), display_id=True)\n"
        "handle.update(HTML('<b>second</b>'))"
    )
    [shown] = cell.of("display_data")
    [updated] = cell.of("update_display_data")
    assert shown.content["data"]["text/html"] == "<b>first</b>"
    assert updated.content["data"]["text/html"] == "<b>second</b>"
    assert shown.content["transient"]["display_id"] == updated.content["transient"]["display_id"]

    # input() in the remote cell prompts in the notebook.
    cell = kernel.ok("%%herd alice\nname = input('who? ')\nprint('hi', name)", stdin=["zoe"])
    assert cell.prompts == [{"prompt": "who? ", "password": False}]
    assert cell.stream() == "hi zoe\n"

    # Nothing of herd's lands in the notebook's namespace.
    assert kernel.ok("%who_ls").of("execute_result")[0].content["data"]["text/plain"] == "[]"


def test_an_error_shows_the_remote_traceback_alone(kernel: HostKernel) -> None:
    kernel.ok("%herd start --warm 1")
    cell = kernel.run("%%herd alice\ndef f():\n    return 1 / 0\nf()")
    assert cell.status == "error"
    assert cell.reply["ename"] == "ZeroDivisionError"
    assert cell.reply["evalue"] == "division by zero"
    [error] = cell.of("error")
    traceback = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(error.content["traceback"]))
    assert "return 1 / 0" in traceback
    assert "herd_nb" not in traceback
    assert "magics.py" not in traceback
    # Without stdin (nbconvert, a notebook that cannot prompt), input() fails there.
    cell = kernel.run("%%herd alice\ninput('x')")
    assert cell.reply["ename"] == "StdinNotImplementedError"


def test_the_stop_button_interrupts_the_remote_cell_and_keeps_its_state(
    kernel: HostKernel,
) -> None:
    kernel.ok("%herd start --warm 1")
    kernel.ok("%%herd alice\nkept = 'yes'")
    cell = kernel.run("%%herd alice\nimport time\ntime.sleep(60)", interrupt_after=1.5)
    assert cell.status == "error"
    assert cell.reply["ename"] == "KeyboardInterrupt"
    assert cell.outputs[-1].at < 15
    assert kernel.ok("%%herd alice\nprint(kept)").stream() == "yes\n"
    # ... and while it waits for input().
    cell = kernel.run("%%herd alice\ninput('never answered')", stdin=[], interrupt_after=1.5)
    assert cell.reply["ename"] == "KeyboardInterrupt"
    assert kernel.ok("%%herd alice\nprint(kept)").stream() == "yes\n"


@pytest.mark.parametrize(
    ("code", "says"),
    [
        ("%%herd alice\n1", "no pool: run %herd start"),
        ("%herd bogus", "no command 'bogus'"),
        ("%herd start --max -1", "max_workers"),
        ("%herd start --ttl soon", "not a duration"),
        ("%herd start --memory lots", "not a size"),
        ("%herd start --kernel no-such-kernel", "no-such-kernel"),
        ("%herd release", "usage: %herd release SESSION"),
        ("%herd dashboard", "no pool"),
    ],
)
def test_wrong_usage_prints_a_short_message(kernel: HostKernel, code: str, says: str) -> None:
    cell = kernel.run(code)
    shown = cell.stream("stderr") + "".join(o.text for o in cell.of("error"))
    assert "UsageError" in shown
    assert says in shown
    assert "Traceback" not in shown


def test_a_session_cell_needs_one_valid_session_id(kernel: HostKernel) -> None:
    kernel.ok("%herd start --warm 0")
    for line in ("%%herd", "%%herd a b", "%%herd ../etc"):
        cell = kernel.run(f"{line}\nprint(1)")
        assert "UsageError" in cell.stream("stderr"), line
    assert "already in use" in kernel.run("%herd start").stream("stderr")


def test_sessions_stats_release_and_stop(kernel: HostKernel) -> None:
    kernel.ok("%herd start --warm 0 --max 3")
    kernel.ok("%%herd alice\npass")
    kernel.ok("%%herd bob\npass")
    table = kernel.ok("%herd sessions").of("display_data")[0].content["data"]
    assert "<table" in table["text/html"]
    assert "alice" in table["text/plain"]
    assert "bob" in table["text/plain"]
    stats = kernel.ok("%herd stats").of("display_data")[0].content["data"]
    assert "alice" in stats["text/plain"]
    pids = worker_pids(kernel)
    assert len(pids) == 2

    kernel.ok("%herd release bob")
    text = kernel.ok("%herd sessions").of("display_data")[0].content["data"]["text/plain"]
    assert "alice" in text
    assert "bob" not in text
    assert "no session 'bob'" in kernel.run("%herd release bob").stream("stderr")

    kernel.ok("%herd stop")
    wait_until_sync(lambda: not any(pid_alive(pid) for pid in pids), what="kernels to stop")
    assert "no pool" in kernel.run("%herd sessions").stream("stderr")


def test_a_process_pool_of_a_command(kernel: HostKernel) -> None:
    kernel.ok(
        f"%herd start --min 1 --warm 0 --health-path /health -- {sys.executable} {WORKER} {{port}}"
    )
    cell = kernel.ok(
        "pool = %herd pool\n"
        "async with pool.acquire('alice') as session:\n"
        "    reply = await session.worker.client.get('/state')\n"
        "print(reply.code)"
    )
    assert cell.stream() == "200\n"
    cell = kernel.run("%%herd alice\nprint(1)")
    assert "not kernels" in cell.stream("stderr")


def test_the_pool_stops_with_its_kernel(tmp_path: Path) -> None:
    host = HostKernel(tmp_path)
    try:
        host.ok("%load_ext herd_nb")
        host.ok("%herd start --warm 1 --memory 512M")
        host.ok("%%herd alice\npass")
        pids = worker_pids(host)
        cgroups = [_memory_cgroup(pid) for pid in pids]
        assert all(path is not None and path.is_dir() for path in cgroups), cgroups
    finally:
        host.shutdown()
    # A clean stop (not only the parent-death signal): the cgroups are gone too.
    wait_until_sync(lambda: not any(pid_alive(pid) for pid in pids), what="workers to stop")
    assert not any(path is not None and path.exists() for path in cgroups)


def test_the_pool_stops_when_its_kernel_restarts(kernel: HostKernel) -> None:
    kernel.ok("%herd start --warm 1")
    kernel.ok("%%herd alice\npass")
    pids = worker_pids(kernel)
    kernel.manager.restart_kernel(now=False)
    wait_until_sync(lambda: not any(pid_alive(pid) for pid in pids), what="workers to stop")
    kernel.client.wait_for_ready(timeout=30)
    assert kernel.ok("print(1)").stream() == "1\n"  # a fresh kernel, and no worker left


def _memory_cgroup(pid: int) -> Path | None:
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if "memory" in controllers.split(","):
                return Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            if controllers == "" and os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
                return Path("/sys/fs/cgroup") / path.lstrip("/")
    return None


def test_the_transformer_turns_magics_into_awaits() -> None:
    lines = ["%%herd alice\n", "x = 1\n", "print(x)\n"]
    [code] = transform(lines)
    assert code.startswith("await ")
    assert "run_cell_magic('alice', 'x = 1\\nprint(x)\\n')" in code
    out = transform(
        ["%herd start --max 2\n", "y = 2\n", "  %herd stats\n", "%herdsman\n", "p = %herd pool\n"]
    )
    assert out[0].startswith("await ")
    assert "run_line('start --max 2')" in out[0]
    assert out[1:4] == ["y = 2\n", "  %herd stats\n", "%herdsman\n"]
    assert out[4].startswith("p = await ")
    assert transform([]) == []


def test_commands_in_the_cell_that_loads_the_extension(tmp_path: Path) -> None:
    # The transformer does not exist yet when such a cell is transformed: the
    # commands run as tasks, and the next %herd command waits for them.
    host = HostKernel(tmp_path)
    try:
        host.ok("%load_ext herd_nb\n%herd start --warm 1\n%herd bogus")
        assert host.ok("pool = %herd pool\nprint(pool.state.value)").stream() == "ready\n"
        assert host.ok("%%herd alice\nprint(1 + 1)").stream() == "2\n"
    finally:
        host.shutdown()


@pytest.fixture
def connected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Server, HostKernel]]:
    """A jupyter server with herd_nb, and a kernel that ran %herd connect to it."""
    # %herd connect finds the server by its runtime file (the only one here).
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    server = Server(tmp_path, "c.Herd.warm_kernels = 1\n")
    host = None
    try:
        server.wait_ready(lambda pools: pools["kernels:python3"]["available_workers"] >= 1)
        host = HostKernel(tmp_path)
        host.ok("%load_ext herd_nb")
        assert f"connected to {server.base}/" in host.ok("%herd connect").stream()
        yield server, host
    finally:
        if host is not None:
            host.shutdown()
        server.stop()


@pytest.mark.timeout(180)
def test_connected_cells_run_in_the_servers_kernel_pool(
    connected: tuple[Server, HostKernel],
) -> None:
    server, host = connected
    cell = host.ok("%%herd alice\nimport os\nx = 6 * 7\nprint('pid', os.getpid())\nx")
    assert cell.of("execute_result")[0].content["data"]["text/plain"] == "42"
    assert host.ok("%%herd alice\nprint(x)").stream() == "42\n"
    assert [s["id"] for s in server.json("/herd/api/sessions")["sessions"]] == ["alice"]

    # input() and the stop button reach the server's kernel too.
    cell = host.ok("%%herd alice\nprint('hi', input('who? '))", stdin=["zoe"])
    assert cell.prompts[0]["prompt"] == "who? "
    assert cell.stream() == "hi zoe\n"
    cell = host.run("%%herd alice\nimport time\ntime.sleep(60)", interrupt_after=1.5)
    assert cell.reply["ename"] == "KeyboardInterrupt"
    assert host.ok("%%herd alice\nprint(x)").stream() == "42\n"
    cell = host.run("%%herd alice\n1/0")
    assert cell.reply["ename"] == "ZeroDivisionError"

    host.ok("%herd release alice")
    assert server.json("/herd/api/sessions")["sessions"] == []


def test_connect_says_when_no_server_runs(
    kernel: HostKernel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cell = kernel.run(f"import os\nos.environ['JUPYTER_RUNTIME_DIR'] = {str(tmp_path / 'none')!r}")
    assert cell.status == "ok"
    shown = kernel.run("%herd connect").stream("stderr")
    assert "no running Jupyter server found" in shown
    shown = kernel.run("%herd connect http://127.0.0.1:9/ --token x").stream("stderr")
    assert "cannot be reached" in shown


@pytest.mark.timeout(120)
def test_a_connected_session_whose_kernel_dies_says_so(
    connected: tuple[Server, HostKernel],
) -> None:
    _, host = connected
    host.ok("%%herd alice\nx = 1")
    cell = host.run("%%herd alice\nimport os\nos._exit(3)")
    assert cell.status == "error"
    shown = cell.stream("stderr")
    assert "its kernel died (exited with code 3)" in shown
    assert "Traceback" not in shown
    assert host.ok("%%herd alice\nprint(globals().get('x'))").stream() == "None\n"
