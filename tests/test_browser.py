"""The main job in a real browser: JupyterLab with herd_nb, quickstart.ipynb run from the
menu, and the live dashboard rendered by ipywidgets in chromium. And a kernel crash as a
JupyterLab user sees it, with herd_nb and with stock jupyter_server side by side.

The server is started as the README says (``jupyter lab notebooks/quickstart.ipynb``),
with only what a test needs added: a free port, a token, ``--no-browser`` (and
``--allow-root`` as root). herd_nb is not named: it must load because installing herd
enabled it. Jupyter's user directories are the test's own, so nothing a developer set
up changes what the test sees.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Locator, expect

from tests.helpers import wait_until_sync
from tests.helpers.browser import ARTIFACTS, JupyterLab, chromium, open_tab, write_user_settings
from tests.helpers.jupyter import TOKEN, Server, server_errors

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"

# Browser problems this test accepts, each with the reason it may.
IGNORED: dict[str, str] = {}

# ... and those a kernel crash may bring as well, on stock Jupyter as with herd_nb.
CRASH_IGNORED: dict[str, str] = {
    **IGNORED,
    r"Could not restore the debugger state: Canceled future for debug_request": (
        "JupyterLab's debugger asks the restarting kernel for its state (debugInfo) and "
        "logs console.error when the lost connection cancels that request: a race in "
        "JupyterLab's own debugger handler, seen in CI on a stock server"
    ),
}

# The dashboard as a reader sees it: the title line, the totals table (a dict per
# pool, by column), the worker rows (a dict per worker, by column, with its button).
_READ_DASHBOARD = """dash => {
    const text = el => (el ? el.textContent.trim() : '');
    const table = dash.querySelector('table');
    const columns = table ? [...table.querySelectorAll('thead th')].map(text) : [];
    const totals = table ? [...table.querySelectorAll('tbody tr')].map(
        tr => Object.fromEntries([...tr.children].map((td, i) => [columns[i], text(td)]))) : [];
    const head = dash.querySelector('.herd-dash-grid.herd-dash-head');
    const fields = head ? [...head.children].map(text) : [];
    const workers = [...dash.querySelectorAll('.herd-dash-grid:not(.herd-dash-head)')].map(row => {
        const worker = Object.fromEntries([...row.children].map((c, i) => [fields[i], text(c)]));
        const button = row.closest('.widget-hbox')?.querySelector('button');
        worker.button = button ? {text: text(button), disabled: button.disabled} : null;
        return worker;
    });
    return {title: text(dash.children[0]), totals, workers, text: dash.innerText};
}"""

# Sessions counted in the totals, and a row for each of alice's and bob's kernels.
_DASHBOARD_READY = f"""dash => {{
    const s = ({_READ_DASHBOARD})(dash);
    return s.totals.some(t => Number(t.sessions) > 0)
        && ['alice', 'bob'].every(id => s.workers.some(w => w.session === id)) && s;
}}"""

# A refresh reached the browser: the figures (ages, CPU, RSS) moved.
_DASHBOARD_MOVED = """([dash, before]) => dash.innerText !== before"""


@pytest.fixture
def browser() -> Iterator[Browser]:
    """Chromium; the test is skipped if it cannot start here. Started before the
    server, so a skip costs no JupyterLab."""
    with chromium() as b:
        yield b


def own_jupyter_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Jupyter's user directories in ``tmp_path``, the installed defaults for the rest,
    and JupyterLab's news toast off: for a server the test starts."""
    for name in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    # Where a developer may point Jupyter elsewhere; the installed defaults apply instead
    # (herd_nb is enabled by the config that installing herd put in sys.prefix).
    for name in (
        "JUPYTER_CONFIG_PATH",
        "JUPYTER_PATH",
        "JUPYTERLAB_DIR",
        "JUPYTERLAB_SETTINGS_DIR",
        "JUPYTERLAB_WORKSPACES_DIR",
    ):
        monkeypatch.delenv(name, raising=False)
    # JupyterLab's first start asks in a toast whether to fetch Jupyter's news; the toast
    # would cover part of the screenshot, and the answer is not what this test is about.
    write_user_settings(
        tmp_path / "jupyter_config_dir",
        "@jupyterlab/apputils-extension:notification",
        {"fetchNews": "false"},
    )


@pytest.fixture
def lab_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    """``jupyter lab notebooks/quickstart.ipynb`` in a copy of the repository's notebooks
    (JupyterLab saves what runs in it), stopped with SIGTERM after the test."""
    shutil.copytree(NOTEBOOKS, tmp_path / "notebooks")
    own_jupyter_dirs(tmp_path, monkeypatch)
    # `jupyter lab` as the README runs it, through this interpreter (no venv needed);
    # it loads no jupyter_server_config.py from its directory, so Server's is unused.
    command = [sys.executable, "-m", "jupyterlab", "notebooks/quickstart.ipynb"]
    server = Server(tmp_path, "", command=command)
    try:
        # The file's directory is the server's root; herd_nb answers: it was enabled by
        # installing herd, nothing here names it.
        server.wait_ready(lambda pools: "kernels:python3" in pools)
        yield server
    finally:
        server.stop()


def stop(server: Server) -> str:
    """Stop the server as Ctrl-C's second press or a service manager would (SIGTERM);
    return its log, also saved as an artifact."""
    server.stop(signal.SIGTERM)
    log = server.log()
    path = ARTIFACTS / "quickstart-server.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(log)
    return log


def read_dashboard(dashboard: Locator, *, timeout: float) -> dict[str, Any]:
    """Wait until the dashboard counts sessions and shows alice's and bob's kernels; read it."""
    handle = dashboard.element_handle(timeout=timeout * 1000)
    ready = dashboard.page.wait_for_function(
        _DASHBOARD_READY, arg=handle, polling=250, timeout=timeout * 1000
    )
    state: dict[str, Any] = ready.json_value()
    return state


def wait_for_refresh(dashboard: Locator, before: str, *, timeout: float) -> None:
    """Wait until the dashboard's text is no longer ``before``: it is live in the page."""
    handle = dashboard.element_handle(timeout=timeout * 1000)
    dashboard.page.wait_for_function(
        _DASHBOARD_MOVED, arg=[handle, before], polling=250, timeout=timeout * 1000
    )


@pytest.mark.timeout(300)
def test_quickstart_dashboard_in_jupyterlab(browser: Browser, lab_server: Server) -> None:
    with open_tab(browser, "quickstart") as tab:
        lab = JupyterLab(tab, lab_server.base, TOKEN)
        lab.open("quickstart.ipynb")
        lab.wait_for_kernel_idle(timeout=90)
        lab.run_all_cells()
        lab.wait_for_cells_done(timeout=180)
        assert lab.stderr_outputs() == []  # no traceback, no warning
        lab.wait_for_output("alice runs in process")
        lab.wait_for_output("no secret here")  # bob's kernel is not alice's

        # The last cell's output is the widget itself (.herd-dash is the VBox's class),
        # not the text/html snapshot shown where widgets cannot render.
        dashboard = lab.outputs().locator(".herd-dash")
        state = read_dashboard(dashboard, timeout=60)
        # Refreshed every second over the widget's comm: a few more readings also
        # give the history chart some points for the screenshot.
        for _ in range(3):
            wait_for_refresh(dashboard, dashboard.inner_text(), timeout=15)
        dashboard.scroll_into_view_if_needed()
        tab.screenshot("quickstart")

    context = f"the dashboard showed:\n{state['text']}"
    assert "live" in state["title"], context
    assert len(state["totals"]) == 1, context  # the notebook's own pool
    totals = state["totals"][0]
    assert totals["state"] == "ready", context
    assert totals["sessions"] == "2", context
    assert int(totals["workers"]) >= 2, context
    assert "CPU" in state["text"], context
    assert "RAM" in state["text"], context
    pinned = {w["session"]: w for w in state["workers"] if w["session"] != "-"}
    assert sorted(pinned) == ["alice", "bob"], context
    for worker in pinned.values():
        assert worker["state"] == "pinned", context
        assert worker["pid"].isdigit(), context
        # The button that ends the row's session, live while it has one.
        assert worker["button"] == {"text": "end", "disabled": False}, context
    assert pinned["alice"]["pid"] != pinned["bob"]["pid"], context

    tab.assert_no_errors(IGNORED)

    log = stop(lab_server)
    assert lab_server.proc.returncode == 0, log[-3000:]
    assert not server_errors(log), log[-3000:]


# -- a kernel crash, herd_nb against stock ------------------------------------------------

# The crash notebook: a cell to run, a cell that kills its kernel, a cell to run after.
CRASH_CELLS = ("1+1", "import os; os._exit(1)", "x = 41; x + 1")

# herd's reason, written to stderr as output of the cell that was running:
# "herd: the kernel died (<why>); restarting it".
HERD_REASON = re.compile(r"the kernel died \((?P<why>[^)]*)\).*restarting")

# What JupyterLab shows when the server says the kernel is "restarting" (its status
# message after an automatic restart): stock and herd alike.
RESTART_TITLE = "Kernel Restarting"
RESTART_BODY = "The kernel for crash.ipynb appears to have died. It will restart automatically."

_STDERR = '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'
_RESULT = ".jp-OutputArea-executeResult .jp-OutputArea-output"


def code_notebook(*sources: str) -> dict[str, Any]:
    """An nbformat 4.5 notebook of code cells never run, for the ``python3`` kernel."""
    return {
        "cells": [
            {
                "id": f"cell-{index}",
                "cell_type": "code",
                "source": source,
                "metadata": {},
                "outputs": [],
                "execution_count": None,
            }
            for index, source in enumerate(sources)
        ],
        "metadata": {
            "kernelspec": {
                "name": "python3",
                "display_name": "Python 3 (ipykernel)",
                "language": "python",
            }
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def answers(server: Server) -> bool:
    """Whether the server answers ``/api/status``; fails with its log if it exited."""
    if server.proc.poll() is not None:
        raise AssertionError(server.log()[-3000:])
    try:
        return server.request("/api/status")[0] == 200
    except (OSError, http.client.HTTPException):  # not up yet, or not it on the port
        return False


@pytest.fixture(params=["herd", "stock"])
def crash_lab(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, Server]]:
    """``jupyter lab`` rooted at a directory holding ``crash.ipynb`` (:data:`CRASH_CELLS`):
    ``herd``, herd_nb as installing herd enabled it, with its defaults (warm kernels),
    ready once a warm kernel is; or ``stock``, herd_nb disabled. Stopped after the test."""
    flavor: str = request.param
    own_jupyter_dirs(tmp_path, monkeypatch)
    (tmp_path / "crash.ipynb").write_text(json.dumps(code_notebook(*CRASH_CELLS)))
    command = [sys.executable, "-m", "jupyterlab"]
    if flavor == "stock":
        command.append("--ServerApp.jpserver_extensions=herd_nb=False")
    server = Server(tmp_path, "", command=command)
    try:
        if flavor == "herd":
            server.wait_ready(
                lambda pools: pools.get("kernels:python3", {}).get("available_workers", 0) > 0
            )
        else:
            wait_until_sync(lambda: answers(server), timeout=60, what="jupyter lab (stock)")
        yield flavor, server
    finally:
        server.stop()


def only_session(server: Server) -> dict[str, Any]:
    """The server's one session (``GET /api/sessions``)."""
    sessions: list[dict[str, Any]] = server.json("/api/sessions")
    assert len(sessions) == 1, sessions
    return sessions[0]


@pytest.mark.timeout(240)
def test_kernel_crash_in_jupyterlab(
    browser: Browser,
    crash_lab: tuple[str, Server],
) -> None:
    """A cell kills the kernel: JupyterLab says it restarts, the next cell runs in a
    fresh process (count 1) of the same kernel ID. herd_nb also says why, in the cell."""
    flavor, server = crash_lab
    with open_tab(browser, f"crash-{flavor}") as tab:
        lab = JupyterLab(tab, server.base, TOKEN)
        lab.open("crash.ipynb")
        lab.wait_for_kernel_idle(timeout=90)
        before = only_session(server)

        lab.run_cell(0)  # 1+1
        expect(lab.prompt(0)).to_have_text("[1]:", timeout=60_000)
        expect(lab.code_cells().nth(0).locator(_RESULT)).to_have_text("2")

        lab.run_cell(1)  # os._exit(1)
        dialog = lab.dialog()
        # Stock's restarter polls every 3 s; herd sees the exit at once.
        expect(dialog).to_contain_text(RESTART_TITLE, timeout=60_000)
        expect(dialog).to_contain_text(RESTART_BODY)
        tab.screenshot(f"crash-{flavor}-restarting")
        lab.dismiss_dialog("Ok")
        lab.wait_for_kernel_idle(timeout=60)
        expect(lab.prompt(1)).to_have_text("[ ]:")  # cut short: no count

        lab.run_cell(2)  # x = 41; x + 1
        expect(lab.code_cells().nth(2).locator(_RESULT)).to_have_text("42", timeout=60_000)
        expect(lab.prompt(2)).to_have_text("[1]:")  # a new process counts from 1 again
        lab.wait_for_kernel_idle(timeout=60)
        stderr = lab.stderr_outputs()
        # Each code cell's stderr outputs, to tell where a message landed.
        by_cell = [lab.code_cells().nth(i).locator(_STDERR).all_inner_texts() for i in range(3)]
        tab.screenshot(f"crash-{flavor}")

    after = only_session(server)
    context = f"before: {before}\nafter: {after}\nstderr outputs by cell: {by_cell}"
    # Restarted in place: the session keeps its kernel ID, as stock's auto-restart does.
    assert after["id"] == before["id"], context
    assert after["kernel"]["id"] == before["kernel"]["id"], context
    assert after["kernel"]["execution_state"] == "idle", context
    if flavor == "herd":
        # Why it died, once, and nothing else on stderr...
        assert len(stderr) == 1, context
        reason = HERD_REASON.search(stderr[0])
        assert reason, context
        assert re.search(r"\b1\b", reason["why"]), context  # os._exit(1)'s code
    else:
        assert stderr == [], context  # stock says nothing in the notebook

    tab.assert_no_errors(CRASH_IGNORED)

    server.stop(signal.SIGTERM)
    log = server.log()
    path = ARTIFACTS / f"crash-{flavor}-server.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(log)
    kernel_id = before["kernel"]["id"]
    if flavor == "herd":
        # The default config's warm kernel was handed out, and restarted in place.
        assert re.search(rf"Kernel started: {kernel_id} \(herd: [^)]*warm", log), log[-3000:]
    assert f"kernel {kernel_id} restarted" in log, log[-3000:]
    assert server.proc.returncode == 0, log[-3000:]
    assert not server_errors(log), log[-3000:]

    if flavor == "herd":
        # herd_nb sends its reason as output of the execute request the kernel was
        # running, so JupyterLab shows it under the cell that killed the kernel, not
        # under the cell before. (It learns that request from the kernel's IOPub
        # status "busy", which a kernel dying at once may never have sent.)
        assert by_cell[1] == stderr, f"herd's reason is not under the crashing cell: {context}"
