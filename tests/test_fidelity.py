"""Stock unless better: a herd kernel behaves as a stock Jupyter kernel, side by side.

The server tests run a stock ``jupyter server`` (herd_nb disabled) next to one
with herd_nb, do the same thing on both, and compare what a user would see: the
kernel's namespace, history and execution count, the server's log lines, which
kernels it refuses, whether it starts at all. The others drive herd's kernel
pool in-process where a server could not show it quickly: a GIL-holding cell
under fast health checks, a server environment that changes under its spares.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest

import herd
import herd_nb
from herd_nb import HerdKernelManager
from tests.helpers import wait_until, wait_until_sync
from tests.helpers.first_output import FirstCell, first_cell
from tests.helpers.jupyter import TOKEN, Server
from tests.helpers.kernel_ws import KernelWS

# What a notebook's first cells can see of the kernel they run in, made
# comparable across servers: the server's root directory reads as "<root>".
# The cell binds nothing itself (it would show in the namespace it reports).
PROBE = """\
print(__import__('json').dumps({
    'user_ns': sorted(get_ipython().user_ns),
    'hidden': sorted(get_ipython().user_ns_hidden),
    'dir': sorted(dir()),
    'history': len(get_ipython().history_manager.input_hist_raw),
    'In': len(In),
    'execution_count': get_ipython().execution_count,
    'cwd': __import__('os').getcwd(),
    'dh': [str(p) for p in _dh],
    'session': globals().get('__session__'),
    'sys_path': __import__('sys').path,
    'JPY_SESSION_NAME': __import__('os').environ.get('JPY_SESSION_NAME'),
}))
"""


def stock_server(root: Path, *argv: str) -> Server:
    """``jupyter server`` without herd_nb (installed, but disabled for this server)."""
    root.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "jupyter_server",
        "--ServerApp.jpserver_extensions=herd_nb=False",
        f"--ServerApp.root_dir={root}",
        *argv,
    ]
    return Server(root, "", command=command)


def herd_server(root: Path, config: str = "", *argv: str) -> Server:
    """``jupyter server`` with herd_nb, configured by ``config`` only."""
    root.mkdir(parents=True, exist_ok=True)
    return Server(root, config, argv)


def wait_serving(server: Server) -> None:
    """Until the server answers ``/api/status``; fails with its log if it exits."""

    def check() -> bool:
        if server.proc.poll() is not None:
            raise AssertionError(server.log()[-3000:])
        try:
            return server.request("/api/status")[0] == 200
        except OSError:
            return False

    wait_until_sync(check, timeout=60, what="jupyter server")


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    """Servers a test starts; all stopped at its end."""
    started: list[Server] = []
    try:
        yield started
    finally:
        for server in started:
            server.stop()


def stock_and_herd(tmp_path: Path, servers: list[Server]) -> tuple[Server, Server]:
    """A stock server and a herd_nb one with its defaults (2 spares), both serving;
    added to ``servers`` (stock first) to be stopped after the test."""
    stock = stock_server(tmp_path / "stock")
    servers.append(stock)
    herded = herd_server(tmp_path / "herd")
    servers.append(herded)
    wait_serving(stock)
    herded.wait_ready(lambda pools: pools["kernels:python3"]["available_workers"] == 2)
    return stock, herded


def open_notebook(server: Server, path: str) -> dict[str, Any]:
    body = {
        "path": path,
        "name": Path(path).name,
        "type": "notebook",
        "kernel": {"name": "python3"},
    }
    model: dict[str, Any] = server.json("/api/sessions", method="POST", body=body)
    return model


async def first_cells(server: Server, kernel_id: str) -> dict[str, Any]:
    """Run a notebook's first two cells, ``%who`` and the probe; what they saw."""
    ws = await KernelWS.connect(server.base, kernel_id, TOKEN)
    try:
        who_reply, who = await ws.execute("%who")
        reply, printed = await ws.execute(PROBE)
        undefined, _ = await ws.execute("os")  # works on a kernel that leaked its import
    finally:
        await ws.close()
    assert reply["status"] == "ok", reply
    facts: dict[str, Any] = json.loads(printed.replace(str(server.root), "<root>"))
    facts["%who"] = who
    facts["execution_counts"] = [who_reply["execution_count"], reply["execution_count"]]
    facts["os without import"] = undefined.get("ename", undefined["status"])
    return facts


def herd_pool(server: Server) -> dict[str, Any]:
    pool: dict[str, Any] = server.stats()["kernels:python3"]
    return pool


def pid_of(server: Server, kernel_id: str) -> int:
    (pid,) = (w["pid"] for w in herd_pool(server)["workers"] if w["session_id"] == kernel_id)
    return int(pid)


async def test_a_warm_kernel_looks_like_a_stock_one_and_nothing_is_capped_or_culled(
    tmp_path: Path, servers: list[Server]
) -> None:
    stock = stock_server(tmp_path / "stock")
    servers.append(stock)
    herded = herd_server(tmp_path / "herd")  # nothing configured: what every user gets
    servers.append(herded)
    for server in servers:
        (server.root / "project").mkdir()
    wait_serving(stock)
    herded.wait_ready(lambda pools: pools["kernels:python3"]["available_workers"] == 2)
    spares = {w["pid"] for w in herd_pool(herded)["workers"]}

    facts, kernels, sessions = {}, {}, {}
    for server in servers:
        model = open_notebook(server, "project/analysis.ipynb")
        kernels[server], sessions[server] = model["kernel"]["id"], model["id"]
        facts[server] = await first_cells(server, kernels[server])
    assert pid_of(herded, kernels[herded]) in spares  # a warm kernel, retargeted
    assert facts[stock]["%who"] == "Interactive namespace is empty.\n"
    assert facts[stock]["os without import"] == "NameError"
    assert facts[stock]["cwd"] == "<root>/project"
    assert facts[herded] == facts[stock]

    # The server's log says what stock's says, herd's own words after it.
    for server in servers:
        server.json(f"/api/sessions/{sessions[server]}", method="DELETE")
    for server in servers:
        log = server.log()
        assert f"Kernel started: {kernels[server]}" in log
        assert f"Kernel shutdown: {kernels[server]}" in log
        assert "Culling kernels" not in log  # stock culls nothing unless told
    summary = re.findall(r"herd_nb: kernels: .*", herded.log())
    assert summary == [
        "herd_nb: kernels: 2 warm spares kept per kernelspec (python3); "
        f"sandbox {herd_pool(herded)['sandbox']}"
        + (
            ""
            if herd_pool(herded)["sandbox"] == "full"
            else f": {herd_pool(herded)['sandbox_reason']}"
        )
        + "; limits per kernel: none; no cap on kernels, no culling"
    ]

    # No cap anybody chose: an 11th notebook starts as on stock (herd once capped at 10).
    def start_kernel(_: int) -> int:
        return herded.request("/api/kernels", method="POST", body={"name": "python3"})[0]

    with ThreadPoolExecutor(4) as executor:
        statuses = list(executor.map(start_kernel, range(11)))
    assert statuses == [201] * 11
    assert len(herded.json("/api/kernels")) == 11
    await asyncio.to_thread(herded.stop)  # stops the 11 and the spares
    assert herded.proc.returncode == 0


async def test_a_reused_kernel_looks_like_a_fresh_stock_one(
    tmp_path: Path, servers: list[Server]
) -> None:
    stock = stock_server(tmp_path / "stock")
    servers.append(stock)
    # Two kernels at most: the one that served a session comes back for the next.
    herded = herd_server(tmp_path / "herd", "c.Herd.worker_reuse = True\nc.Herd.max_workers = 2\n")
    servers.append(herded)
    wait_serving(stock)
    herded.wait_ready(lambda pools: pools["kernels:python3"]["available_workers"] == 2)

    model = open_notebook(herded, "first.ipynb")
    used = pid_of(herded, model["kernel"]["id"])
    ws = await KernelWS.connect(herded.base, model["kernel"]["id"], TOKEN)
    try:
        reply, _ = await ws.execute("import os, sys\nsecret = 42\nos.chdir('/')\n%cd /tmp")
        assert reply["status"] == "ok", reply
    finally:
        await ws.close()
    herded.json(f"/api/sessions/{model['id']}", method="DELETE")
    assert used in {w["pid"] for w in herd_pool(herded)["workers"]}  # reset, back in the pool

    for path in ("second.ipynb", "third.ipynb"):
        model = open_notebook(herded, path)
        if pid_of(herded, model["kernel"]["id"]) == used:
            break
    else:
        raise AssertionError("the reset kernel served neither session")
    reused = await first_cells(herded, model["kernel"]["id"])
    fresh = await first_cells(stock, open_notebook(stock, path)["kernel"]["id"])
    assert fresh["%who"] == "Interactive namespace is empty.\n"
    assert reused == fresh


async def test_a_kernel_busy_holding_the_gil_is_not_killed() -> None:
    # Health checks every 0.1 s with 0.1 s to answer: a cell holding the GIL
    # for over a second fails any probe that needs the kernel to answer.
    crashed: list[str] = []
    factory = herd_nb.KernelFactory(health_timeout=0.1)
    async with herd.Pool(
        factory, min_workers=0, max_workers=1, health_interval=0.1, on_crash=crashed.append
    ) as pool:
        async with pool.acquire("busy") as session:
            worker = session.worker
            assert isinstance(worker, herd_nb.KernelWorker)
            code = (
                "import random, time\n"
                "L = [random.random() for _ in range(5 * 10**6)]\n"
                "started = time.perf_counter()\n"
                "L.sort()  # one C call: the GIL is held throughout\n"
                "print(time.perf_counter() - started)"
            )
            printed: list[str] = []

            def output(msg: dict[str, Any]) -> None:
                if msg["msg_type"] == "stream":
                    printed.append(msg["content"]["text"])

            run = asyncio.ensure_future(
                worker.client.execute_interactive(code, output_hook=output, timeout=60)
            )
            died = asyncio.ensure_future(worker.wait())
            done, _ = await asyncio.wait([run, died], return_when=asyncio.FIRST_COMPLETED)
            died.cancel()
            assert run in done, f"the kernel was killed while busy: {crashed}"
            assert run.result()["content"]["status"] == "ok"
            assert float("".join(printed)) > 0.3  # the GIL was held for 3 health intervals
            assert crashed == []
            assert pool.sessions() == {"busy": worker.id}


async def test_a_missing_default_kernelspec_does_not_stop_the_server(
    tmp_path: Path, servers: list[Server]
) -> None:
    missing = "--MappingKernelManager.default_kernel_name=no-such-kernel"
    stock = stock_server(tmp_path / "stock", missing)
    servers.append(stock)
    herded = herd_server(tmp_path / "herd", "", missing)
    servers.append(herded)
    wait_serving(stock)
    herded.wait_ready(lambda pools: True)
    log = herded.log()
    assert "invalid configuration" not in log
    warnings = re.findall(r"herd_nb: no warm kernels: the default kernelspec .*", log)
    assert len(warnings) == 1, log
    assert "'no-such-kernel' is not installed" in warnings[0]
    assert "herd_nb: kernels: no warm spares" in log
    # Both serve the kernels they can. (A start without a kernel name is refused
    # by both, but leaves a pending kernel ID that hangs a stock server's shutdown
    # for good: not done here.)
    specs = [server.json("/api/kernelspecs") for server in servers]
    assert specs[0] == specs[1]
    assert specs[0]["default"] == "no-such-kernel"
    for server in servers:
        kernel = server.json("/api/kernels", method="POST", body={"name": "python3"})
        server.json(f"/api/kernels/{kernel['id']}", method="DELETE")
    assert "kernels:python3" in herded.stats()  # in herd's pool, made on first use


async def test_spares_passed_over_for_a_changed_environment_are_explained_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A server whose environment changes after its spares started (pytest sets
    # PYTEST_CURRENT_TEST for every test), in-process.
    log = logging.getLogger("herd-test-kernelmanager")
    manager = HerdKernelManager(log=log, root_dir=str(tmp_path), connection_dir=str(tmp_path))
    registry: dict[str, herd.Pool[Any]] = {}
    manager.configure_herd(
        registry,
        kernel_names=["python3"],
        warm=1,
        max_kernels=None,
        health_interval=None,
        worker_reuse=False,
        sandbox=True,
        cpu_limit=None,
        memory_limit=None,
        pids_limit=None,
    )
    pool = registry["kernels:python3"]
    caplog.set_level(logging.INFO, logger=log.name)
    try:
        await pool.start()
        started = []
        for value in ("one", "two"):
            await wait_until(lambda: pool.idle_count == 1, timeout=30, what="a spare")
            monkeypatch.setenv("HERD_TEST_DRIFT", value)
            started.append(await manager.start_kernel(kernel_name="python3"))
    finally:
        await manager.shutdown_all()
        await pool.shutdown()
    said = [r.getMessage() for r in caplog.records if "environment changed" in r.getMessage()]
    assert said == [
        "herd: python3: the server's environment changed after the spares started "
        "(HERD_TEST_DRIFT): kernels are started for their sessions, and spares are "
        "replaced as they are taken (logged once)"
    ]
    for kernel_id in started:
        assert f"Kernel started: {kernel_id} (herd: started for its session" in caplog.text


async def test_a_crashed_kernel_is_restarted_in_place_as_on_stock(
    tmp_path: Path, servers: list[Server]
) -> None:
    stock, herded = stock_and_herd(tmp_path, servers)

    seen: dict[Server, dict[str, Any]] = {}
    for server in servers:
        model = open_notebook(server, "crash.ipynb")
        kernel_id = model["kernel"]["id"]
        ws = await KernelWS.connect(server.base, kernel_id, TOKEN)
        told: list[str] = []
        try:
            reply, _ = await ws.execute("x = 1")
            assert reply["status"] == "ok"
            ws.statuses.clear()
            ws.send("shell", "execute_request", {"code": "import os; os._exit(1)"})
            while "restarting" not in ws.statuses:
                msg = await ws.recv(60)
                assert msg is not None, "closed before status 'restarting'"
                if msg["msg_type"] == "stream" and msg["content"]["name"] == "stderr":
                    told.append(msg["content"]["text"])
            # "busy" may be lost with the process that exited before IOPub sent it.
            until_restart = [state for state in ws.statuses if state != "busy"]
            deadline = asyncio.get_running_loop().time() + 60
            while True:  # JupyterLab asks for kernel info after a restart
                msg_id = ws.send("shell", "kernel_info_request", {})
                try:
                    await ws.reply_to(msg_id, timeout=2)
                    break
                except TimeoutError:
                    assert asyncio.get_running_loop().time() < deadline
            printed = await ws.execute("print(2)")
            lost = await ws.execute("x")
        finally:
            await ws.close()
        seen[server] = {
            "statuses until restarting": until_restart,
            "dead": "dead" in ws.statuses,
            "print(2)": (printed[0]["status"], printed[1]),
            "x": lost[0].get("ename"),
            "kernels": [k["id"] for k in server.json("/api/kernels")] == [kernel_id],
            "sessions": [(s["id"], s["kernel"]["id"]) for s in server.json("/api/sessions")]
            == [(model["id"], kernel_id)],
        }
        seen[server]["told"] = told
    assert seen[stock].pop("told") == []
    assert seen[herded].pop("told") == [
        "herd: the kernel died (exited with code 1); restarting it\n"
    ]
    assert seen[stock] == {
        "statuses until restarting": ["restarting"],
        "dead": False,
        "print(2)": ("ok", "2\n"),
        "x": "NameError",
        "kernels": True,
        "sessions": True,
    }
    assert seen[herded] == seen[stock]
    assert "exited with code 1); restarting it in place" in herded.log()


def send_cell(ws: KernelWS, code: str) -> str:
    """Send a cell as JupyterLab does, without waiting; its request's ``msg_id``."""
    content = {"code": code, "silent": False, "store_history": True, "allow_stdin": False}
    return ws.send("shell", "execute_request", content)


async def test_a_kernel_is_not_pid_1_and_its_own_sigterm_restarts_it_as_on_stock(
    tmp_path: Path, servers: list[Server]
) -> None:
    # herd runs a kernel under a small init in a PID namespace: were the kernel
    # PID 1 there, a signal it has no handler for (SIGTERM) would not kill it.
    stock, herded = stock_and_herd(tmp_path, servers)

    seen: dict[Server, dict[str, Any]] = {}
    for server in servers:
        model = open_notebook(server, "signals.ipynb")
        kernel_id = model["kernel"]["id"]
        ws = await KernelWS.connect(server.base, kernel_id, TOKEN)
        told: list[str] = []
        replied = False
        try:
            pids_id = send_cell(ws, "import os\nprint(os.getpid() > 1, os.getppid() > 1)\nx = 1")
            pids = await ws.reply_to(pids_id)
            ws.statuses.clear()
            msg_id = send_cell(ws, "import os, signal; os.kill(os.getpid(), signal.SIGTERM)")
            while "restarting" not in ws.statuses:
                msg = await ws.recv(60)
                assert msg is not None, "closed before status 'restarting'"
                parent = msg["parent_header"].get("msg_id")
                if parent == msg_id and msg["msg_type"] == "execute_reply":
                    replied = True
                elif msg["msg_type"] == "stream" and msg["content"]["name"] == "stderr":
                    # A restarted stock kernel's own stderr has no parent.
                    cell = {msg_id: "the killing cell", pids_id: "the cell before"}.get(parent)
                    if cell is not None:
                        told.append(f"{cell}: {msg['content']['text']}")
            # "busy" may be lost with the process that died before IOPub sent it.
            until_restart = [state for state in ws.statuses if state != "busy"]
            deadline = asyncio.get_running_loop().time() + 60
            while True:  # JupyterLab asks for kernel info after a restart
                info_id = ws.send("shell", "kernel_info_request", {})
                try:
                    await ws.reply_to(info_id, timeout=2)
                    break
                except TimeoutError:
                    assert asyncio.get_running_loop().time() < deadline
            printed = await ws.execute("print(2)")
            lost = await ws.execute("x")
        finally:
            await ws.close()
        seen[server] = {
            "pids > 1": (pids[0]["status"], pids[1]),
            "the killing cell replied": replied,
            "statuses until restarting": until_restart,
            "dead": "dead" in ws.statuses,
            "print(2)": (printed[0]["status"], printed[0]["execution_count"], printed[1]),
            "x": lost[0].get("ename"),
            "kernels": [k["id"] for k in server.json("/api/kernels")] == [kernel_id],
            "sessions": [(s["id"], s["kernel"]["id"]) for s in server.json("/api/sessions")]
            == [(model["id"], kernel_id)],
            "told": told,
        }
    said = {server: seen[server].pop("told") for server in servers}
    assert seen[stock] == {
        "pids > 1": ("ok", "True True\n"),
        "the killing cell replied": False,
        "statuses until restarting": ["restarting"],
        "dead": False,
        "print(2)": ("ok", 1, "2\n"),  # a new kernel: the execution count starts over
        "x": "NameError",
        "kernels": True,
        "sessions": True,
    }
    assert seen[herded] == seen[stock]
    assert "died (killed by SIGTERM); restarting it in place" in herded.log()
    # Stock says nothing; herd says why, as output of the cell that was running
    # (JupyterLab shows it there), not of the one before.
    assert said[stock] == []
    assert said[herded] == [
        "the killing cell: herd: the kernel died (killed by SIGTERM); restarting it\n"
    ]


def zombies_in_tree(root: int) -> list[str]:
    """The zombies among ``root`` and its descendants, as "pid name (parent ppid)"."""
    try:
        top = psutil.Process(root)
        tree = [top, *top.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    found = []
    for process in tree:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                found.append(f"{process.pid} {process.name()} (parent {process.ppid()})")
        except psutil.NoSuchProcess:
            continue
    return found


async def test_a_kernels_orphans_are_reaped_as_on_stock(
    tmp_path: Path, servers: list[Server]
) -> None:
    # A shell that backgrounds a command and exits orphans it. A stock kernel's
    # orphans leave its tree (adopted by the host's init or a subreaper: whether
    # that one reaps them is the host's business, not the kernel's). A herd
    # kernel's are adopted by the init of its sandbox, inside the tree herd runs
    # it in: that init must reap them, or each one is a zombie until the kernel ends.
    stock, herded = stock_and_herd(tmp_path, servers)

    seen: dict[Server, list[str]] = {}
    for server in servers:
        kernel_id = open_notebook(server, "zombies.ipynb")["kernel"]["id"]
        ws = await KernelWS.connect(server.base, kernel_id, TOKEN)
        try:
            reply, printed = await ws.execute("import os; print(os.getpid())")
            assert reply["status"] == "ok", reply
            reply, _ = await ws.execute(
                "import subprocess; [subprocess.run('sleep 0.2 &', shell=True) for _ in range(3)]"
            )
            assert reply["status"] == "ok", reply
            await asyncio.sleep(1)  # the sleeps are over (zombies, or reaped)
            # The tree: stock's kernel process; herd's sandbox (its init and all in it).
            root = int(printed) if server is stock else pid_of(server, kernel_id)
            if server is stock:
                assert psutil.Process(root).ppid() == stock.proc.pid  # the kernel itself
            seen[server] = zombies_in_tree(root)
        finally:
            await ws.close()
    assert seen[stock] == []
    assert seen[herded] == seen[stock]


# Rounds per server. A stock round is mostly its kernel's start (about 1 s; a
# warm herd kernel's first cell takes 0.1 s): 50 rounds took 80 s in all on a
# quiet 2-CPU machine, 145 s on one loaded by other test runs (load average 9).
# HERD_FIRST_CELL_ROUNDS=200 for the measure (0 lost in 200 under load).
FIRST_CELL_ROUNDS = int(os.environ.get("HERD_FIRST_CELL_ROUNDS", "50"))


@pytest.mark.timeout(300 * max(1, FIRST_CELL_ROUNDS // 50))
async def test_a_new_notebooks_first_cell_prints_as_on_stock(
    tmp_path: Path, servers: list[Server]
) -> None:
    # JupyterLab sends a new notebook's first cell as soon as the kernel's
    # WebSocket is open; the server nudges the kernel until its IOPub is
    # subscribed before it lets the cell through. A herd kernel, handed out warm
    # (or started for its session), must not lose what that first cell prints.
    stock, herded = stock_and_herd(tmp_path, servers)  # herd's default: 2 warm spares

    seen: dict[Server, list[FirstCell]] = {stock: [], herded: []}
    closing = []
    for i in range(FIRST_CELL_ROUNDS):
        for server in servers:  # stock, herd, stock, herd...
            cell = await first_cell(server, f"first-{i}.ipynb")
            seen[server].append(cell)
            # Shut down while the next notebooks open, as a user closing tabs would.
            delete = f"/api/sessions/{cell.session_id}"
            closing.append(
                asyncio.ensure_future(asyncio.to_thread(server.json, delete, method="DELETE"))
            )
    await asyncio.gather(*closing)
    # Herd's default 2 spares: a stock round between two herd rounds does not
    # always give herd the time to replace the spare taken (the closing kernels
    # compete for the CPUs), and the session's kernel is then started for it:
    # 50 rounds gave 33 warm and 17 started once, 42 and 8 another time. Either
    # way, the first cell must print.
    log = herded.log()
    how = {
        "warm": log.count("(herd: a warm spare"),
        "cold": log.count("(herd: started for its session"),
    }
    took = {
        name: (sum(c.seconds for c in seen[server]), max(c.seconds for c in seen[server]))
        for name, server in (("stock", stock), ("herd", herded))
    }
    for server in servers:
        failed = [cell for cell in seen[server] if cell.status != "ok"]
        assert failed == [], (how, took)
        assert {cell.execution_count for cell in seen[server]} == {1}
    lost = {server: [cell for cell in seen[server] if cell.output_lost] for server in servers}
    print(  # shown with -s: the measure behind the assertions
        f"first cells: {FIRST_CELL_ROUNDS} per server; output lost: stock "
        f"{len(lost[stock])}, herd {len(lost[herded])}; herd's kernels {how}; "
        f"seconds (total, max) {took}"
    )
    assert lost[herded] == [], (len(lost[stock]), how, took)
    assert len(lost[herded]) <= len(lost[stock])
    assert how["warm"] + how["cold"] == FIRST_CELL_ROUNDS


async def test_what_a_kernel_writes_outside_cells_reaches_the_servers_log_as_on_stock(
    tmp_path: Path, servers: list[Server]
) -> None:
    # A stock kernel inherits the server's stderr: what it writes there outside
    # IPython's capture (a C library, faulthandler, os.write) is in the server's log.
    _, herded = stock_and_herd(tmp_path, servers)
    for server in servers:
        model = open_notebook(server, "fd.ipynb")
        ws = await KernelWS.connect(server.base, model["kernel"]["id"], TOKEN)
        try:
            reply, _ = await ws.execute("import os; os.write(2, b'written to fd 2\\n')")
            assert reply["status"] == "ok", reply
            wait_until_sync(
                lambda server=server: "written to fd 2" in server.log(),  # type: ignore[misc]
                timeout=10,
                what="the kernel's line in the server's log",
            )
            # Shut down from another tab while this one is open: the log stays
            # stock's, with no pyzmq complaint about sockets closed under the
            # server's streams (herd's kernels share the server's ZMQ context).
            server.json(f"/api/sessions/{model['id']}", method="DELETE")
        finally:
            await ws.close()
    await asyncio.to_thread(herded.stop)
    assert "Unregistering FD" not in herded.log()
    assert "Traceback" not in herded.log()
