"""Pre-warmed notebook kernels in a real ``jupyter server``, driven as JupyterLab does:
REST calls, then a kernel client over the server's kernel WebSocket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import tornado.httpclient

from herd import _cgroups
from tests.helpers import pid_alive, tagged_processes, wait_until, wait_until_sync
from tests.helpers.jupyter import TOKEN, Server
from tests.helpers.kernel_ws import KernelWS

WARM = 2


def config(**herd: Any) -> str:
    """A ``jupyter_server_config.py`` text setting ``c.Herd.<key>``."""
    settings = {"warm_kernels": WARM, "max_workers": 4, **herd}
    return "".join(f"c.Herd.{key} = {value!r}\n" for key, value in settings.items())


def install_kernelspec(share: Path, name: str, argv: list[str], **metadata: Any) -> None:
    """A kernelspec ``name`` running ``argv``, under ``share`` (a ``JUPYTER_PATH`` entry)."""
    spec_dir = share / "kernels" / name
    spec_dir.mkdir(parents=True)
    spec = {"argv": argv, "display_name": name, "language": "python", "metadata": metadata}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))


IPYKERNEL = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]


def kernel_pool(server: Server) -> dict[str, Any]:
    pool: dict[str, Any] = server.stats()["kernels:python3"]
    return pool


def warm_pids(server: Server) -> set[int]:
    return {w["pid"] for w in kernel_pool(server)["workers"] if w["state"] == "idle"}


def pid_of(server: Server, kernel_id: str) -> int:
    """The host PID of the kernel's worker (its launcher; inside its sandbox the
    kernel has a PID of its namespace)."""
    workers = kernel_pool(server)["workers"]
    pids = [w["pid"] for w in workers if w["session_id"] == kernel_id]
    assert len(pids) == 1, workers
    return int(pids[0])


def start_server(tmp: Path, text: str, argv: Sequence[str] = ()) -> Server:
    server = Server(tmp, text, argv)
    try:
        server.wait_ready(lambda pools: pools["kernels:python3"]["available_workers"] == WARM)
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    running = start_server(tmp_path, config())
    try:
        yield running
    finally:
        running.stop()


def open_session(server: Server, path: str, kind: str = "notebook") -> dict[str, Any]:
    """``POST /api/sessions`` as JupyterLab does when it opens ``path``."""
    body = {"path": path, "name": Path(path).name, "type": kind, "kernel": {"name": "python3"}}
    model: dict[str, Any] = server.json("/api/sessions", method="POST", body=body)
    return model


async def kernel_facts(ws: KernelWS) -> dict[str, Any]:
    code = (
        "import json, os\n"
        "print(json.dumps({'cwd': os.getcwd(), 'env': dict(os.environ),"
        " 'session': globals().get('__session__')}))"
    )
    reply, printed = await ws.execute(code)
    assert reply["status"] == "ok", reply
    facts: dict[str, Any] = json.loads(printed)
    facts["execution_count"] = reply["execution_count"]
    return facts


async def test_a_notebook_gets_a_warm_kernel_retargeted_to_its_directory(
    server: Server, tmp_path: Path
) -> None:
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "helper_module.py").write_text("VALUE = 'next to the notebook'\n")
    warm = warm_pids(server)
    model = open_session(server, "project/analysis.ipynb")
    kernel_id = model["kernel"]["id"]
    assert kernel_pool(server)["active_sessions"] == 1
    assert {w["session_id"] for w in kernel_pool(server)["workers"]} >= {kernel_id}

    ws = await KernelWS.connect(server.base, kernel_id, TOKEN)
    try:
        facts = await kernel_facts(ws)
        # The kernel was started before the request, for no one in particular...
        assert pid_of(server, kernel_id) in warm
        # ...and behaves as if started for this notebook.
        assert facts["cwd"] == str(tmp_path / "project")
        assert facts["env"]["JPY_SESSION_NAME"] == str(tmp_path / "project" / "analysis.ipynb")
        assert facts["session"] == facts["env"]["JPY_SESSION_NAME"]
        assert "HERD_WORKER_TAG" not in facts["env"]
        assert facts["execution_count"] == 1  # retargeting left no trace in the history
        reply, printed = await ws.execute("import helper_module; print(helper_module.VALUE)")
        assert (reply["status"], printed) == ("ok", "next to the notebook\n")
        reply, printed = await ws.execute("print(sorted(k for k in globals() if 'herd' in k))")
        assert printed == "[]\n"  # nothing of herd's in the user's namespace
    finally:
        await ws.close()
    # The pool refilled its spares in the background.
    wait_until_sync(lambda: kernel_pool(server)["available_workers"] == WARM, what="refill")


async def test_the_environment_is_what_a_cold_start_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A second kernelspec has no spares: its kernels are started for their session.
    install_kernelspec(tmp_path / "share", "cold-python", IPYKERNEL)
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "share"))  # the server's kernelspecs
    server = start_server(tmp_path, config())
    try:
        facts, ids = {}, {}
        for name in ("python3", "cold-python"):
            body = {"path": f"{name}.ipynb", "type": "notebook", "kernel": {"name": name}}
            model = server.json("/api/sessions", method="POST", body=body)
            ids[name] = model["kernel"]["id"]
            ws = await KernelWS.connect(server.base, ids[name], TOKEN)
            try:
                facts[name] = await kernel_facts(ws)
            finally:
                await ws.close()
        warm, cold = facts["python3"], facts["cold-python"]
        pinned = {w["session_id"] for w in kernel_pool(server)["workers"]}
        assert ids["python3"] in pinned

        # Still a herd worker: in a pool of its own, sandboxed like the warm ones
        # (pinned once it answered herd too: the session was answered at its launch).
        def pinned_cold() -> bool:
            workers = server.stats()["kernels:cold-python"]["workers"]
            return [w["session_id"] for w in workers] == [ids["cold-python"]]

        wait_until_sync(pinned_cold, timeout=10, what="the cold kernel pinned")
        own = server.stats()["kernels:cold-python"]
        assert own["sandbox"] == kernel_pool(server)["sandbox"] != "none"
        assert warm["cwd"] == cold["cwd"] == str(tmp_path)
        assert warm["session"] == warm["env"]["JPY_SESSION_NAME"] == "python3.ipynb"
        assert cold["session"] == cold["env"]["JPY_SESSION_NAME"] == "cold-python.ipynb"
        del warm["env"]["JPY_SESSION_NAME"], cold["env"]["JPY_SESSION_NAME"]
        assert warm["env"] == cold["env"]
        # Shutting the sessions down ends both kernels.
        for model in server.json("/api/sessions"):
            server.json(f"/api/sessions/{model['id']}", method="DELETE")
        assert server.json("/api/kernels") == []
    finally:
        server.stop()


async def test_a_kernel_that_cannot_be_retargeted_is_started_for_its_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A Python kernel behind a launcher script: herd cannot tell it is IPython, so
    # it never retargets it.
    launcher = tmp_path / "launch.py"
    launcher.write_text("from ipykernel import kernelapp\nkernelapp.launch_new_instance()\n")
    install_kernelspec(
        tmp_path / "share", "wrapped", [sys.executable, str(launcher), "-f", "{connection_file}"]
    )
    (tmp_path / "sub").mkdir()
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "share"))
    server = Server(tmp_path, config(warm_kernels=1, kernel_names=["wrapped"]))
    try:
        server.wait_ready(lambda pools: pools["kernels:wrapped"]["available_workers"] == 1)
        (spare,) = (w["pid"] for w in server.stats()["kernels:wrapped"]["workers"])
        body = {"path": "sub/nb.ipynb", "type": "notebook", "kernel": {"name": "wrapped"}}
        model = server.json("/api/sessions", method="POST", body=body)
        ws = await KernelWS.connect(server.base, model["kernel"]["id"], TOKEN)
        try:
            facts = await kernel_facts(ws)
        finally:
            await ws.close()
        assert facts["cwd"] == str(tmp_path / "sub")  # right, because started there
        pool = server.stats()["kernels:wrapped"]
        assert [w["pid"] for w in pool["workers"] if w["state"] == "idle"] == [spare]
        # The log says why, once (not once per kernel).
        body = {"path": "nb2.ipynb", "type": "notebook", "kernel": {"name": "wrapped"}}
        server.json("/api/sessions", method="POST", body=body)
        why = re.findall(r"herd: wrapped: not an IPython kernel.*", server.log())
        assert why == [
            "herd: wrapped: not an IPython kernel (only those can be moved to a session's "
            "directory and environment): kernels are started for their sessions unless a "
            "spare already matches (logged once)"
        ]
        # A request the spare can serve as it is (no directory, same environment) gets it.
        kernel = server.json("/api/kernels", method="POST", body={"name": "wrapped"})
        pool = server.stats()["kernels:wrapped"]
        assert [w["pid"] for w in pool["workers"] if w["session_id"] == kernel["id"]] == [spare]
    finally:
        server.stop()


async def test_reconnect_interrupt_restart_and_shutdown(server: Server, tmp_path: Path) -> None:
    (tmp_path / "work").mkdir()
    model = open_session(server, "work/nb.ipynb")
    kernel_id = model["kernel"]["id"]
    first = await KernelWS.connect(server.base, kernel_id, TOKEN)
    reply, _ = await first.execute("state = 'kept'")
    pid = pid_of(server, kernel_id)
    await first.close()  # a page reload
    # Reopening the notebook finds the session and its kernel.
    again = open_session(server, "work/nb.ipynb")
    assert again["kernel"]["id"] == kernel_id
    second = await KernelWS.connect(server.base, kernel_id, TOKEN)
    third = await KernelWS.connect(server.base, kernel_id, TOKEN)  # a second tab
    try:
        assert (await second.execute("print(state)"))[1] == "kept\n"
        assert (await third.execute("print(state)"))[1] == "kept\n"

        # Interrupt a running cell: the kernel survives, the cell gets KeyboardInterrupt.
        code = "import time; print('running', flush=True); time.sleep(60)"
        msg_id = second.send("shell", "execute_request", {"code": code, "silent": False})
        await second.wait_for_output(msg_id, "running")  # SIGINT now reaches the cell
        server.json(f"/api/kernels/{kernel_id}/interrupt", method="POST")
        reply, _ = await second.reply_to(msg_id)
        assert (reply["status"], reply["ename"]) == ("error", "KeyboardInterrupt")
        assert (await second.execute("print(state)"))[1] == "kept\n"
        assert pid_of(server, kernel_id) == pid

        # Restart: a fresh interpreter in the notebook's directory, same session.
        server.json(f"/api/kernels/{kernel_id}/restart", method="POST")  # returns when ready
        await second.close()  # JupyterLab reconnects after a restart
        second = await KernelWS.connect(server.base, kernel_id, TOKEN)
        facts = await kernel_facts(second)
        restarted = pid_of(server, kernel_id)  # the same worker and session, a new process
        assert restarted != pid
        assert not pid_alive(pid)
        assert facts["cwd"] == str(tmp_path / "work")
        assert facts["env"]["JPY_SESSION_NAME"] == str(tmp_path / "work" / "nb.ipynb")
        assert (await second.execute("state"))[0]["ename"] == "NameError"
        assert kernel_pool(server)["recent_crashes"] == []
    finally:
        await second.close()
        await third.close()

    # Shutdown from JupyterLab: the kernel is gone, and never serves anyone again.
    server.json(f"/api/sessions/{model['id']}", method="DELETE")
    assert server.json("/api/kernels") == []
    assert not pid_alive(restarted)
    wait_until_sync(lambda: kernel_pool(server)["available_workers"] == WARM, what="refill")
    assert restarted not in warm_pids(server)
    assert kernel_pool(server)["active_sessions"] == 0


async def test_post_api_kernels_gets_a_warm_kernel_too(server: Server) -> None:
    warm = warm_pids(server)
    kernel = server.json("/api/kernels", method="POST", body={"name": "python3"})
    ws = await KernelWS.connect(server.base, kernel["id"], TOKEN)
    try:
        facts = await kernel_facts(ws)
    finally:
        await ws.close()
    pid = pid_of(server, kernel["id"])
    assert pid in warm
    assert facts["cwd"] == str(server.root)
    # herd's own API lists the kernel's session and ends it like Jupyter would.
    sessions = server.json("/herd/api/sessions")["sessions"]
    assert {"id": kernel["id"], "pool": "kernels:python3"}.items() <= sessions[0].items()
    server.json(f"/herd/api/sessions/{kernel['id']}", method="DELETE")
    assert server.json("/api/kernels") == []
    assert not pid_alive(pid)


async def until_restarted(ws: KernelWS, timeout: float = 60) -> list[tuple[str, str | None]]:
    """Read until IOPub says ``restarting``, then until the new kernel answers
    ``kernel_info``; the stderr ``stream`` texts seen on the way, each with the
    ID of the request it answers."""
    told: list[tuple[str, str | None]] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while "restarting" not in ws.statuses:
        msg = await ws.recv(max(deadline - loop.time(), 0.01))
        if msg is None:
            raise ConnectionError("closed before status 'restarting'")
        if msg["msg_type"] == "stream" and msg["content"]["name"] == "stderr":
            told.append((msg["content"]["text"], msg["parent_header"].get("msg_id")))
        assert "dead" not in ws.statuses
    while True:
        msg_id = ws.send("shell", "kernel_info_request", {})
        with contextlib.suppress(TimeoutError):
            await ws.reply_to(msg_id, timeout=2)
            return told
        assert loop.time() < deadline, "no kernel_info reply after the restart"


def worker_of(server: Server, kernel_id: str) -> str:
    (worker,) = (w for w in kernel_pool(server)["workers"] if w["session_id"] == kernel_id)
    return str(worker["id"])


async def test_a_kernel_crash_mid_session_is_restarted_in_place(server: Server) -> None:
    model = open_session(server, "crash.ipynb")
    kernel_id = model["kernel"]["id"]
    worker = worker_of(server, kernel_id)
    ws = await KernelWS.connect(server.base, kernel_id, TOKEN)
    try:
        await kernel_facts(ws)
        pid = pid_of(server, kernel_id)
        os.killpg(pid, signal.SIGKILL)  # the whole sandbox, as an OOM kill would
        told = await until_restarted(ws)
        assert any("herd: the kernel died (" in text for text, _ in told), told
        reply, printed = await ws.execute("print(2)")
        assert (reply["status"], printed) == ("ok", "2\n")
    finally:
        await ws.close()
    assert not pid_alive(pid)
    assert [k["id"] for k in server.json("/api/kernels")] == [kernel_id]
    assert [s["id"] for s in server.json("/api/sessions")] == [model["id"]]
    assert worker_of(server, kernel_id) == worker  # same worker, same cgroup
    assert kernel_pool(server)["recent_crashes"] == []  # the pool saw no death
    assert "restarting it in place" in server.log()


@pytest.mark.skipif(
    _cgroups.detect().version is None, reason=f"no usable cgroups here: {_cgroups.detect().reason}"
)
async def test_a_kernel_past_its_memory_limit_is_restarted_and_the_user_told_why(
    tmp_path: Path,
) -> None:
    server = start_server(tmp_path, config(memory_limit=200 << 20))
    try:
        kernel_id = open_session(server, "greedy.ipynb")["kernel"]["id"]
        ws = await KernelWS.connect(server.base, kernel_id, TOKEN)
        try:
            previous = ws.send("shell", "execute_request", {"code": "x = 1", "silent": False})
            await ws.reply_to(previous)
            hoard = ws.send(
                "shell",
                "execute_request",
                {"code": "hoard = bytearray(600 << 20)", "silent": False, "store_history": True},
            )
            told = await until_restarted(ws)
            # As output of the cell that ran, where JupyterLab shows it, when the
            # kernel got its "busy" for that cell out before it was killed; else
            # of the cell before (the server saw nothing of the new one).
            reason = "herd: the kernel died (killed: memory limit 200 MiB); restarting it\n"
            assert [text for text, _ in told] == [reason], told
            assert told[0][1] in (hoard, previous), told
            reply, printed = await ws.execute("print(2)")
            assert (reply["status"], printed) == ("ok", "2\n")
            reply, _ = await ws.execute("x")
            assert reply.get("ename") == "NameError"  # a fresh kernel, as stock's restart
        finally:
            await ws.close()
        assert [k["id"] for k in server.json("/api/kernels")] == [kernel_id]
        assert "killed: memory limit 200 MiB" in server.log()
    finally:
        server.stop()


async def test_a_kernel_dying_at_every_start_ends_dead_after_restart_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # IPython runs its startup files in every kernel: this one kills the kernels
    # started in "doomed" (the notebook's), and only once it exists.
    ipython = tmp_path / "ipython"
    monkeypatch.setenv("IPYTHONDIR", str(ipython))
    (tmp_path / "doomed").mkdir()
    server = start_server(tmp_path, config() + "c.KernelRestarter.restart_limit = 2\n")
    try:
        kernel_id = open_session(server, "doomed/nb.ipynb")["kernel"]["id"]
        ws = await KernelWS.connect(server.base, kernel_id, TOKEN)
        try:
            await ws.execute("x = 1")
            startup = ipython / "profile_default" / "startup"
            startup.mkdir(parents=True, exist_ok=True)
            (startup / "00-doom.py").write_text(
                "import os\nif os.path.basename(os.getcwd()) == 'doomed':\n    os._exit(3)\n"
            )
            ws.send("shell", "execute_request", {"code": "import os; os._exit(1)"})
            await ws.wait_for_status("dead", timeout=90)
        finally:
            await ws.close()
        assert ws.statuses.count("restarting") == 2  # then gave up, as stock's restarter
        assert server.json("/api/kernels") == []
        crashes = kernel_pool(server)["recent_crashes"]
        assert [c["session_id"] for c in crashes] == [kernel_id]
        assert "exited with code 3" in crashes[0]["reason"]
        assert "3 times in a row: not restarting it" in server.log()
        fresh = open_session(server, "elsewhere.ipynb")  # the server carries on
        assert fresh["kernel"]["id"] != kernel_id
    finally:
        server.stop()


async def test_kernel_routes_refuse_unauthenticated_requests(server: Server) -> None:
    body = {"path": "x.ipynb", "type": "notebook", "kernel": {"name": "python3"}}
    status, _ = server.request("/api/sessions", token=False, method="POST", body=body)
    assert status == 403
    status, _ = server.request("/api/kernels", token=False, method="POST", body={})
    assert status == 403
    assert kernel_pool(server)["active_sessions"] == 0  # no kernel was handed out
    kernel = server.json("/api/kernels", method="POST", body={"name": "python3"})
    with pytest.raises(tornado.httpclient.HTTPClientError) as refused:
        await KernelWS.connect(server.base, kernel["id"], None)
    assert refused.value.code == 403
    server.json(f"/api/kernels/{kernel['id']}", method="DELETE")


async def test_idle_kernels_are_culled_after_the_ttl(tmp_path: Path) -> None:
    server = start_server(tmp_path, config(ttl=2.0))
    try:
        model = open_session(server, "idle.ipynb")
        kernel_id = model["kernel"]["id"]
        pid = pid_of(server, kernel_id)
        await wait_until(
            lambda: server.json("/api/kernels") == [], timeout=15, what="the kernel to be culled"
        )
        await wait_until(lambda: not pid_alive(pid), what="the culled kernel to exit")
        assert kernel_pool(server)["active_sessions"] == 0
    finally:
        server.stop()


async def test_with_worker_reuse_a_kernel_is_reset_before_its_next_session(
    tmp_path: Path,
) -> None:
    (tmp_path / "a").mkdir()
    server = start_server(tmp_path, config(worker_reuse=True, max_workers=WARM))
    try:
        model = open_session(server, "a/one.ipynb")
        ws = await KernelWS.connect(server.base, model["kernel"]["id"], TOKEN)
        try:
            await ws.execute("secret = 42")
            first = pid_of(server, model["kernel"]["id"])
        finally:
            await ws.close()
        server.json(f"/api/sessions/{model['id']}", method="DELETE")
        assert first in warm_pids(server)  # back in the pool, not killed
        # Every kernel serves one session at a time; take both to get the reused one.
        pids = {}
        for name in ("b1.ipynb", "b2.ipynb"):
            kid = open_session(server, name)["kernel"]["id"]
            ws = await KernelWS.connect(server.base, kid, TOKEN)
            try:
                facts = await kernel_facts(ws)
                pids[pid_of(server, kid)] = (facts, (await ws.execute("secret"))[0])
            finally:
                await ws.close()
        facts, reply = pids[first]
        assert reply["ename"] == "NameError"  # the previous session's variables are gone
        assert facts["cwd"] == str(tmp_path)
        assert facts["env"]["JPY_SESSION_NAME"].endswith(".ipynb")
        # Both kernels are taken and max_workers=2: a third kernel gets a clear refusal
        # (503; Jupyter's sessions API turns every error into a 500, message kept).
        status, error = server.request("/api/kernels", method="POST", body={})
        assert status == 503
        assert "all 2 kernels are in use (c.Herd.max_workers)" in json.loads(error)["message"]
        body = {"path": "c.ipynb", "type": "notebook", "kernel": {"name": "python3"}}
        status, error = server.request("/api/sessions", method="POST", body=body)
        assert status == 500
        assert "c.Herd.max_workers" in json.loads(error)["message"]
    finally:
        server.stop()


async def test_kernels_stop_with_the_server(tmp_path: Path) -> None:
    server = start_server(tmp_path, config())
    try:
        open_session(server, "one.ipynb")
        wait_until_sync(lambda: kernel_pool(server)["available_workers"] == WARM, what="refill")
        pids = {w["pid"] for w in kernel_pool(server)["workers"]}
        assert len(pids) == WARM + 1
    finally:
        server.stop(signal.SIGTERM)
    assert server.proc.returncode == 0
    await wait_until(lambda: not any(pid_alive(p) for p in pids), what="kernels to exit")
    tag = os.environ["HERD_TEST_TAG"]
    await wait_until(lambda: tagged_processes(tag) == [], what="no process left")


def readme_launch() -> tuple[str, list[str]]:
    """The README's ``jupyter_server_config.py`` and its launch line, verbatim."""
    text = (Path(__file__).parents[1] / "README.md").read_text()
    config = re.search(r"```python\n(# jupyter_server_config\.py\n.*?)```", text, re.S)
    line = re.search(r"```bash\n(jupyter server [^\n]*)\n```", text)
    assert config is not None, "README lost its jupyter_server_config.py example"
    assert line is not None, "README lost its launch line"
    return config.group(1), shlex.split(line.group(1))


async def test_the_readme_launch_command(tmp_path: Path) -> None:
    config, command = readme_launch()
    assert command[:2] == ["jupyter", "server"]
    # This interpreter's `jupyter`, whether or not its environment is on PATH
    # (a venv not activated): the script pip put beside it, else the module.
    script = Path(sys.executable).with_name("jupyter")
    jupyter = [str(script)] if script.exists() else [sys.executable, "-m", "jupyter"]
    command = [*jupyter, *command[1:]]
    (tmp_path / "notes").mkdir()
    server = Server(tmp_path, config, command=command)
    try:
        server.wait_ready(
            lambda pools: (
                pools["kernels:python3"]["available_workers"] == 2
                and pools["process"]["available_workers"] >= 1
            )
        )
        model = open_session(server, "notes/readme.ipynb")
        ws = await KernelWS.connect(server.base, model["kernel"]["id"], TOKEN)
        try:
            facts = await kernel_facts(ws)
        finally:
            await ws.close()
        assert facts["cwd"] == str(tmp_path / "notes")
        status, listing = server.request("/herd/proxy/", **{"X-Session-ID": "readme"})
        assert status == 200
        assert b"notes/" in listing  # http.server, run in its own pool
        pids = {w["pid"] for pool in server.stats().values() for w in pool["workers"]}
    finally:
        server.stop()
    assert server.proc.returncode == 0
    await wait_until(lambda: not any(pid_alive(p) for p in pids), what="workers to exit")


async def test_a_sigkilled_server_leaves_no_kernel(tmp_path: Path) -> None:
    server = start_server(tmp_path, config())
    try:
        open_session(server, "one.ipynb")
        wait_until_sync(lambda: kernel_pool(server)["available_workers"] == WARM, what="refill")
        pids = {w["pid"] for w in kernel_pool(server)["workers"]}
        server.proc.kill()  # no cleanup runs: the kernels' parent-death signal does it
        server.proc.wait()
        await wait_until(lambda: not any(pid_alive(p) for p in pids), what="kernels to die")
        # The kernels inside the sandboxes go with their launchers, a moment later.
        tag = os.environ["HERD_TEST_TAG"]
        await wait_until(lambda: tagged_processes(tag) == [], what="no process left")
    finally:
        server.stop()


async def test_pending_kernels_start_in_the_background_and_report_a_failed_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    share = tmp_path / "share"
    install_kernelspec(share, "other", IPYKERNEL)  # no spares: started for its session
    install_kernelspec(share, "bad", ["non_existent_path", "-f", "{connection_file}"])
    monkeypatch.setenv("JUPYTER_PATH", str(share))
    server = Server(tmp_path, config(), ["--AsyncMultiKernelManager.use_pending_kernels=True"])
    try:
        server.wait_ready(lambda pools: pools["kernels:python3"]["available_workers"] == WARM)
        # As stock: the ID comes back before the kernel runs; clients wait for it.
        model = server.json("/api/kernels", method="POST", body={"name": "other"})
        assert model["execution_state"] == "starting"
        ws = await KernelWS.connect(server.base, model["id"], TOKEN)
        try:
            reply, printed = await ws.execute("print(6 * 7)")
        finally:
            await ws.close()
        assert (reply["status"], printed) == ("ok", "42\n")
        # A warm kernel is ready when handed out: nothing to wait for.
        warm = open_session(server, "warm.ipynb")
        assert warm["kernel"]["execution_state"] == "idle"

        # A start that fails: the session exists, its kernel is dead and says why.
        body = {"path": "b.ipynb", "type": "notebook", "kernel": {"name": "bad"}}
        session = server.json("/api/sessions", method="POST", body=body)
        with pytest.raises(tornado.httpclient.HTTPClientError):
            await KernelWS.connect(server.base, session["kernel"]["id"], TOKEN)
        (listed,) = [s for s in server.json("/api/sessions") if s["id"] == session["id"]]
        assert listed["kernel"]["execution_state"] == "dead"
        assert "No such file or directory: 'non_existent_path'" in listed["kernel"]["reason"]
        status, _ = server.request(f"/api/sessions/{session['id']}", method="DELETE")
        assert status == 204
        kernels = {k["id"] for k in server.json("/api/kernels")}
        assert session["kernel"]["id"] not in kernels
        assert model["id"] in kernels
    finally:
        server.stop()


async def test_transport_encryption_applies_to_warm_kernels_as_to_stock_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from jupyter_client.asynchronous.client import AsyncKernelClient

    share = tmp_path / "share"
    install_kernelspec(share, "plain", IPYKERNEL)  # declares no CurveZMQ support
    monkeypatch.setenv("JUPYTER_PATH", str(share))
    runtime = tmp_path / "runtime"
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(runtime))
    server = start_server(
        tmp_path, config(), ["--MappingKernelManager.transport_encryption=required"]
    )
    try:
        kernel_id = open_session(server, "nb.ipynb")["kernel"]["id"]
        assert "a warm spare" in server.log()
        ws = await KernelWS.connect(server.base, kernel_id, TOKEN)
        try:
            reply, printed = await ws.execute("print('over curve')")
        finally:
            await ws.close()
        assert (reply["status"], printed) == ("ok", "over curve\n")
        info = json.loads((runtime / f"kernel-{kernel_id}.json").read_text())
        assert info["curve_publickey"]
        assert info["curve_secretkey"]

        # The attack: someone on the machine who reads the ports (not the keys)
        # talks to the kernel in the clear. Encrypted, it never answers.
        async def answers(connection: dict[str, Any]) -> bool:
            client = AsyncKernelClient()
            client.load_connection_info(connection)
            client.start_channels(iopub=False, stdin=False, hb=False, control=False)
            try:
                await client.kernel_info(reply=True, timeout=3)
                return True
            except TimeoutError:
                return False
            finally:
                client.stop_channels()
                client.context.destroy(linger=0)

        keyless = {k: v for k, v in info.items() if not k.startswith("curve_")}
        assert not await answers(keyless)
        assert await answers(info)

        # As stock: a kernelspec without CurveZMQ support is refused (the reason is
        # in the log, as stock's RuntimeError).
        status, _ = server.request("/api/kernels", method="POST", body={"name": "plain"})
        assert status == 500
        assert "RuntimeError: transport_encryption='required' but kernelspec" in server.log()
        assert "no warm" not in server.log()  # python3 declares it: its spares are warm
    finally:
        server.stop()
