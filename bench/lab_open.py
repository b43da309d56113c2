"""Opening a notebook in JupyterLab as a user does, timed in a real browser.

``python bench/kernels.py --browser`` runs this module. One open, from the click
on the Launcher's "Python 3 (ipykernel)" tile to the output of ``1+1``::

    click the tile                                                        t = 0
      POST /api/contents            a new Untitled.ipynb; JupyterLab loads it and
                                    shows the panel (GET contents, checkpoints...)
      POST /api/sessions            the kernel. stock: the process is launched and
                                    the request answered; herd_nb: a warm kernel is
                                    handed over (with no spare: one is started and
                                    the request waits until it answers)
      WebSocket .../channels        new -> open: the server accepts the upgrade once
                                    the kernel answered a kernel_info (then nudges it
                                    until IOPub carries a message)
      kernel_info_request -> reply  JupyterLab's; queued cells wait for it
    "1+1" typed as soon as the editor is there; Shift+Enter as soon as the status bar
    no longer says "Initializing" (until a session has a kernel, JupyterLab drops a
    run: no execute is ever sent, the cell keeps "[ ]:")
      execute_request -> execute_result -> "2" in the page                t = done

Every mark is taken in the page, on its clock (``performance.timeOrigin +
performance.now()``), by :data:`INSTRUMENT`, a script installed before
JupyterLab's own: it wraps ``fetch`` and ``WebSocket`` (decoding the kernel
protocol's message types, JSON or binary) and watches the DOM for the output.
The server's side comes from its log (debug level, same clock): how long it held
``POST /api/sessions`` and the WebSocket upgrade, how herd served the kernel,
and the nudges.

Scenarios, per round and server:

- **click -> output, warm**: the open above with herd's spares all ready
  (herd_nb's default, ``warm_kernels = 2``): a server a user comes back to.
- **click -> output, 3rd in a row**: two notebook sessions are created through
  the REST API right before the click and their kernels answer a ``kernel_info``
  (a user opening three notebooks in a row): herd's two spares are taken, so it
  starts the third kernel for its session, as stock does; its refill begins 1 s
  after the takes, while that kernel starts.
- **second execute** (a floor): ``1+1`` again, in the next cell of the first
  notebook, its kernel running and connected: Shift+Enter -> output.
- **open, kernel running** (a floor): a notebook whose session was created
  through the REST API before the page loaded (its kernel answered a
  ``kernel_info``), opened by a double-click in the file browser: click ->
  output with JupyterLab's whole open and no kernel start.

Both servers are ``python -m jupyterlab`` from temp dirs of their own (Jupyter's
config, data, runtime and IPython dirs, the same user settings: news off), herd_nb
disabled for stock (``--ServerApp.jpserver_extensions=herd_nb=False``) and
enabled with its defaults for herd. One chromium (Debian's, with the flags of
``tests/helpers/browser.py``), one browser context per server (JupyterLab's files
cached, as for a returning user), a new page per measurement, the servers taking
turns at going first.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
from jupyter_client import BlockingKernelClient
from playwright.sync_api import BrowserContext, Locator, Page, sync_playwright
from playwright.sync_api import Error as PlaywrightError

from tests.helpers.browser import (
    CHROMIUM_ARGS,
    VIEWPORT,
    JupyterLab,
    Tab,
    chromium_executable,
    write_user_settings,
)

TOKEN = "herd-bench"
SERVERS = ("stock", "herd")
WARM = 2  # herd_nb's default c.Herd.warm_kernels, which the herd server runs with

# The scenarios, in the order of the table.
LAUNCHER = "click -> output, warm"
DRAINED = "click -> output, 3rd in a row"
SECOND = "second execute"
RUNNING = "open, kernel running"
SCENARIOS = (LAUNCHER, DRAINED, SECOND, RUNNING)

# Installed in every page before JupyterLab's scripts. window.__bench.events gets
# {t, what, ...}, t in ms since the epoch (the page's high-resolution clock).
INSTRUMENT = r"""
(() => {
  const bench = { events: [], output: null };
  window.__bench = bench;
  const now = () => performance.timeOrigin + performance.now();
  const note = (what, detail) => bench.events.push({ t: now(), what, ...detail });
  bench.note = note;
  window.addEventListener('click', () => note('click', {}), true);
  window.addEventListener('keydown', e => note('keydown', { key: e.key }), true);
  const fetch0 = window.fetch;
  window.fetch = function (input, init) {
    const request = input instanceof Request ? input : null;
    const url = new URL(request ? request.url : String(input), location.href).pathname;
    const method = (init && init.method) || (request && request.method) || 'GET';
    const start = now();
    const reply = fetch0.apply(this, arguments);
    reply.then(r => note('fetch', { method, url, start, status: r.status }),
               () => note('fetch', { method, url, start, status: 0 }));
    return reply;
  };
  const text = new TextDecoder('utf8');
  // A kernel message, JSON or the binary v1.kernel.websocket.jupyter.org framing.
  const describe = data => {
    try {
      let channel, header, parent;
      if (typeof data === 'string') {
        ({ channel, header, parent_header: parent } = JSON.parse(data));
      } else {
        const view = new DataView(data);
        const at = [];
        for (let i = 0, n = Number(view.getBigUint64(0, true)); i < n; i++) {
          at.push(Number(view.getBigUint64(8 * (i + 1), true)));
        }
        const part = i => text.decode(data.slice(at[i], at[i + 1]));
        channel = part(0);
        header = JSON.parse(part(1));
        parent = JSON.parse(part(2));
      }
      return { channel, type: header.msg_type, parent_type: parent && parent.msg_type };
    } catch (e) {
      return { type: '?' };
    }
  };
  const WS = window.WebSocket;
  window.WebSocket = class extends WS {
    constructor(url, protocols) {
      super(url, protocols);
      const path = new URL(url).pathname;
      this.__path = path;
      note('ws new', { url: path });
      this.addEventListener('open', () => note('ws open', { url: path }));
      this.addEventListener('message', e => note('ws recv', { url: path, ...describe(e.data) }));
    }
    send(data) {
      note('ws send', { url: this.__path, ...describe(data) });
      super.send(data);
    }
  };
  // From now on, note when the page shows one more execute result reading `value`.
  bench.expect = value => {
    const count = () => [...document.querySelectorAll(
      '.jp-OutputArea-executeResult .jp-OutputArea-output')]
      .filter(o => o.textContent.trim() === value).length;
    const target = count() + 1;
    bench.output = null;
    const observer = new MutationObserver(() => {
      if (count() >= target) {
        bench.output = now();
        observer.disconnect();
      }
    });
    observer.observe(document.body, { childList: true, subtree: true, characterData: true });
  };
})();
"""

# The editor of the notebook in front is there.
_EDITOR_READY = """() => !!document.querySelector(
    '#jp-main-dock-panel .jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell .cm-content')"""

# A run would be sent: the status bar's kernel item no longer says "Initializing"
# (JupyterLab shows that until the notebook's session has a kernel). Noted once.
_RUNNABLE = r"""() => {
    const ok = [...document.querySelectorAll('#jp-main-statusbar .jp-StatusBar-TextItem')]
        .some(item => /\|\s*(?!Initializing)\w+\s*$/.test(item.textContent));
    if (ok) window.__bench.note('runnable', {});
    return ok;
}"""

POLL_MS = 10  # how often the page checks the two conditions above

# The marks of an open, in order: (mark, what it is). A mark is ms after the click.
STEPS: Sequence[tuple[str, str]] = (
    ("contents", "POST /api/contents answered (new file)"),
    ("session sent", "POST /api/sessions sent"),
    ("session", "POST /api/sessions answered"),
    ("ws new", "kernel WebSocket created"),
    ("ws open", "kernel WebSocket open"),
    ("kernel info", "kernel_info_reply received"),
    ("runnable", "status bar leaves 'Initializing'"),
    ("enter", "Shift+Enter pressed"),
    ("execute sent", "execute_request sent"),
    ("result", "execute_result received"),
    ("output", "output '2' in the page"),
)


# -- the servers ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LabServer:
    """A ``jupyter lab`` of this benchmark (``name``: ``stock`` or ``herd``)."""

    name: str
    base: str
    root: Path  # the server's root_dir
    runtime: Path  # its JUPYTER_RUNTIME_DIR (kernel connection files)
    proc: subprocess.Popen[bytes]
    log_path: Path

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        if method == "POST" and data is None:
            data = b""
        request = urllib.request.Request(
            self.base + path, method=method, data=data, headers={"Authorization": f"token {TOKEN}"}
        )
        with urllib.request.urlopen(request, timeout=60) as reply:
            raw = reply.read()
        return json.loads(raw) if raw else None

    def wait_warm(self, timeout: float = 120) -> None:
        """Until herd's pool has all its spares idle (at once for stock)."""
        deadline = time.monotonic() + timeout
        while self.name == "herd":
            pools = self.call("GET", "/herd/api/stats")["pools"]
            if pools["kernels:python3"]["available_workers"] >= WARM:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: the warm pool did not refill to {WARM}")
            time.sleep(0.05)

    def new_session(self, path: str) -> str:
        """A notebook session for ``path`` through the REST API; its kernel's ID."""
        # Named, as JupyterLab names its sessions: one session with a null name fails
        # JupyterLab's validation of the whole list, and it then sees none at all.
        body = {"path": path, "name": path, "type": "notebook", "kernel": {"name": "python3"}}
        return str(self.call("POST", "/api/sessions", body)["kernel"]["id"])

    def end_sessions(self) -> None:
        for session in self.call("GET", "/api/sessions"):
            self.call("DELETE", f"/api/sessions/{session['id']}")


@contextlib.contextmanager
def jupyter_lab(name: str, tmp: Path) -> Iterator[LabServer]:
    """``python -m jupyterlab`` in ``tmp``, with Jupyter directories and user settings of
    its own and herd_nb enabled only for ``herd`` (its defaults); stopped on the way out
    (SIGTERM to its process group, SIGKILL after 30 s)."""
    root = tmp / "root"
    root.mkdir()
    env = dict(os.environ)
    for var in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR"):
        env[var] = str(tmp / var.lower())
    # Where a developer may point Jupyter elsewhere; the installed defaults apply instead.
    for var in (
        "JUPYTER_CONFIG_PATH",
        "JUPYTER_PATH",
        "JUPYTERLAB_DIR",
        "JUPYTERLAB_SETTINGS_DIR",
        "JUPYTERLAB_WORKSPACES_DIR",
    ):
        env.pop(var, None)
    # As tests/test_browser.py: no toast asking to fetch Jupyter's news.
    write_user_settings(
        tmp / "jupyter_config_dir",
        "@jupyterlab/apputils-extension:notification",
        {"fetchNews": "false"},
    )
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        "--port-retries=0",
        f"--IdentityProvider.token={TOKEN}",
        f"--ServerApp.root_dir={root}",
        f"--ServerApp.jpserver_extensions=herd_nb={name == 'herd'}",
        # Request times, kernel starts and nudges: the server's side of the timeline.
        "--ServerApp.log_level=DEBUG",
    ]
    if os.geteuid() == 0:
        argv.append("--allow-root")
    log_path = tmp / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=log, cwd=root, env=env, start_new_session=True
        )
    runtime = tmp / "jupyter_runtime_dir"
    server = LabServer(name, f"http://127.0.0.1:{port}", root, runtime, proc, log_path)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                server.call("GET", "/api/status")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = log_path.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"{name} server did not start:\n{tail}") from None
                time.sleep(0.1)
        server.wait_warm()
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def running_kernel(server: LabServer, path: str) -> None:
    """A session for a new notebook ``path``, its kernel started through the REST API and
    answering (a kernel_info over ZMQ): what "open, kernel running" opens."""
    cell = {"cell_type": "code", "source": "", "metadata": {}, "outputs": []}
    notebook = {
        "cells": [{**cell, "execution_count": None}],
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
    (server.root / path).write_text(json.dumps(notebook))
    answering(server, server.new_session(path))


def answering(server: LabServer, kernel_id: str) -> None:
    """Return once the kernel answers a kernel_info (over ZMQ, its connection file)."""
    client = BlockingKernelClient()
    client.load_connection_file(str(server.runtime / f"kernel-{kernel_id}.json"))
    # No heartbeat channel: a beat not yet heard would read as a dead kernel.
    client.start_channels(hb=False)
    try:
        client.wait_for_ready(timeout=60)
    finally:
        client.stop_channels()


# -- one open ---------------------------------------------------------------------------


@dataclass
class Open:
    """One measured open: its marks (ms after the click) and the server's side."""

    marks: dict[str, float]
    server: dict[str, Any] = field(default_factory=dict)  # see server_side()

    @property
    def total(self) -> float:
        return self.marks["output"]


def marks(events: list[dict[str, Any]], output: float) -> tuple[float, dict[str, float]]:
    """The click's time (epoch ms) and the marks of :data:`STEPS` after it."""
    t0 = next(e["t"] for e in events if e["what"] == "click")
    found: dict[str, float] = {"output": output - t0}

    def first(name: str, match: Callable[[dict[str, Any]], bool], key: str = "t") -> None:
        hit = next((e for e in events if match(e)), None)
        if hit is not None:
            found[name] = hit[key] - t0

    def fetch(method: str, path: str) -> Callable[[dict[str, Any]], bool]:
        return lambda e: e["what"] == "fetch" and e["method"] == method and e["url"] == path

    def kernel(what: str, kind: str = "") -> Callable[[dict[str, Any]], bool]:
        return lambda e: (
            e["what"] == what
            and "/api/kernels/" in e.get("url", "")
            and (not kind or e.get("type") == kind)
        )

    first("contents", fetch("POST", "/api/contents"))
    first("session sent", fetch("POST", "/api/sessions"), key="start")
    first("session", fetch("POST", "/api/sessions"))
    first("ws new", kernel("ws new"))
    first("ws open", kernel("ws open"))
    first("kernel info", kernel("ws recv", "kernel_info_reply"))
    first("runnable", lambda e: e["what"] == "runnable")
    first("enter", lambda e: e["what"] == "keydown" and e.get("key") == "Enter")
    first("execute sent", kernel("ws send", "execute_request"))
    first("result", kernel("ws recv", "execute_result"))
    return t0, found


class Driver:
    """JupyterLab in a new page of ``context``, driven as a user drives it."""

    def __init__(self, context: BrowserContext, server: LabServer, timeout: float = 60) -> None:
        self.server = server
        self.page: Page = context.new_page()
        self.tab = Tab(self.page, f"bench-{server.name}")  # records the page's errors
        self.lab = JupyterLab(self.tab, server.base, TOKEN)
        self.timeout_ms = timeout * 1000

    def close(self) -> None:
        self.page.close()

    @property
    def tile(self) -> Locator:
        return self.page.locator(
            '.jp-LauncherCard[data-category="Notebook"][title="Python 3 (ipykernel)"]'
        )

    def load(self) -> None:
        """JupyterLab with a fresh workspace (the Launcher), done loading."""
        self.page.goto(f"{self.server.base}/lab?reset&token={TOKEN}", timeout=self.timeout_ms)
        self.tile.wait_for(timeout=self.timeout_ms)
        with contextlib.suppress(PlaywrightError):  # its polls may never let it be idle
            self.page.wait_for_load_state("networkidle", timeout=10_000)

    def _start(self) -> None:
        self.page.evaluate("window.__bench.events.length = 0; window.__bench.expect('2')")

    def _wait_output(self) -> tuple[list[dict[str, Any]], float]:
        """The page's events since :meth:`_start`, and when the output showed."""
        self.page.wait_for_function("() => window.__bench.output !== null", timeout=self.timeout_ms)
        events: list[dict[str, Any]] = self.page.evaluate("window.__bench.events")
        return events, float(self.page.evaluate("window.__bench.output"))

    def _run_first_cell(self) -> Open:
        """Type 1+1 in the notebook in front, Shift+Enter once a run is not dropped,
        wait for the output."""
        self.page.wait_for_function(_EDITOR_READY, polling=POLL_MS, timeout=self.timeout_ms)
        self.lab.notebook.locator(".jp-Cell .cm-content").first.click()
        self.page.keyboard.insert_text("1+1")
        self.page.wait_for_function(_RUNNABLE, polling=POLL_MS, timeout=self.timeout_ms)
        self.page.keyboard.press("Shift+Enter")
        events, output = self._wait_output()
        t0, found = marks(events, output)
        return Open(found, {"t0": t0})

    def open_from_launcher(self) -> Open:
        """Click the Python 3 tile; type 1+1; Shift+Enter; the output."""
        self._start()
        self.tile.click()
        return self._run_first_cell()

    def second_execute(self) -> float:
        """1+1 in the next cell (the kernel connected): ms from Shift+Enter to output."""
        self.lab.wait_for_kernel_idle(timeout=self.timeout_ms / 1000)
        self.lab.notebook.locator(".jp-Cell .cm-content").nth(1).click()
        self.page.keyboard.insert_text("1+1")
        self._start()
        self.page.keyboard.press("Shift+Enter")
        events, output = self._wait_output()
        enter = next(e["t"] for e in events if e["what"] == "keydown" and e["key"] == "Enter")
        return output - enter

    def open_running(self, path: str) -> Open:
        """Double-click ``path`` in the file browser (its kernel is running); 1+1; the
        output."""
        item = self.page.locator(".jp-DirListing-item").filter(has_text=path)
        item.wait_for(timeout=self.timeout_ms)
        self._start()
        item.dblclick()
        return self._run_first_cell()


# -- the server's side, from its log ----------------------------------------------------


def _log_time(line: str) -> float | None:
    """Epoch ms of a jupyter_server log line (``[D 2026-12-01 02:00:51.101 ServerApp]``)."""
    try:
        stamp = line[3:26]
        return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f").timestamp() * 1000
    except ValueError:
        return None


def server_side(log: str, start: float, end: float) -> dict[str, Any]:
    """What the server logged between ``start`` and ``end`` (epoch ms): how long it held
    JupyterLab's ``POST /api/sessions`` and the kernel WebSocket's upgrade, how herd
    served the kernel, and the nudges it needed (one is normal: each after the first
    is a 0.5 s wait)."""
    found: dict[str, Any] = {"nudges": 0}
    for line in log.splitlines():
        at = _log_time(line)
        if at is None or not start - 5 <= at <= end + 5:
            continue
        words = line.split()
        if " POST /api/sessions?" in line and words[-1].endswith("ms"):
            found.setdefault("session ms", float(words[-1][:-2]))
        elif " 101 GET /api/kernels/" in line and words[-1].endswith("ms"):
            found.setdefault("upgrade ms", float(words[-1][:-2]))
        elif "Kernel started:" in line and "(herd: " in line:
            how = line.split("(herd: ", 1)[1].split(",", 1)[0]
            found.setdefault("herd", how)
        elif "Nudge: attempt " in line:
            found["nudges"] = max(found["nudges"], int(line.split("Nudge: attempt ")[1].split()[0]))
    return found


# -- the run ----------------------------------------------------------------------------


@dataclass
class Results:
    """Everything measured: opens per scenario and server, and what the run left."""

    opens: dict[str, dict[str, list[Open]]] = field(
        default_factory=lambda: {s: {n: [] for n in SERVERS} for s in (LAUNCHER, DRAINED, RUNNING)}
    )
    second: dict[str, list[float]] = field(default_factory=lambda: {n: [] for n in SERVERS})
    problems: dict[str, list[str]] = field(default_factory=lambda: {n: [] for n in SERVERS})
    seen: dict[int, float] = field(default_factory=dict)  # pid -> create time: ours, ever
    alive_after: list[str] = field(default_factory=list)
    load: tuple[float, float] = (0.0, 0.0)  # 1-min load average before, after
    browser: str = ""  # chromium's version

    def note_processes(self) -> None:
        """Remember every process under this one (servers, their kernels, chromium and
        Playwright's driver), to check at the end that none is left."""
        for proc in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                self.seen[proc.pid] = proc.create_time()

    def samples(self, scenario: str, server: str) -> list[float]:
        """ms, one per round."""
        if scenario == SECOND:
            return self.second[server]
        return [o.total for o in self.opens[scenario][server]]


def _settle(server: LabServer) -> None:
    """herd's spares all idle (a refill starts 1 s after a take), then a quiet moment."""
    time.sleep(1.2)
    server.wait_warm()
    time.sleep(0.5)


def one_round(context: BrowserContext, server: LabServer, index: int, results: Results) -> None:
    """The four scenarios on one server, each from a clean state."""
    name = server.name
    floor_path = f"running-{index}.ipynb"
    driver = Driver(context, server)
    try:
        running_kernel(server, floor_path)
        driver.load()
        _settle(server)
        results.opens[LAUNCHER][name].append(driver.open_from_launcher())
        _settle(server)
        results.second[name].append(driver.second_execute())
        _settle(server)
        results.opens[RUNNING][name].append(driver.open_running(floor_path))
        results.note_processes()
        results.problems[name] += [str(p) for p in driver.tab.problems]
    finally:
        driver.close()
        server.end_sessions()

    driver = Driver(context, server)
    try:
        driver.load()
        _settle(server)
        for kernel_id in [server.new_session(f"before-{index}-{n}.ipynb") for n in range(2)]:
            answering(server, kernel_id)
        results.opens[DRAINED][name].append(driver.open_from_launcher())
        results.note_processes()
        results.problems[name] += [str(p) for p in driver.tab.problems]
    finally:
        driver.close()
        server.end_sessions()


def run(rounds: int, progress: Callable[[str], None]) -> Results:
    """``rounds`` rounds of every scenario on both servers, alternating; every server,
    kernel and browser stopped before it returns (checked)."""
    executable = chromium_executable()
    if executable is None:
        raise SystemExit("no chromium on the PATH: apt-get install chromium")
    results = Results(load=(os.getloadavg()[0], 0.0))
    with contextlib.ExitStack() as stack:
        servers: dict[str, LabServer] = {}
        for name in SERVERS:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix=f"herd-bench-{name}-"))
            servers[name] = stack.enter_context(jupyter_lab(name, Path(tmp)))
        playwright = stack.enter_context(sync_playwright())
        browser = playwright.chromium.launch(executable_path=executable, args=list(CHROMIUM_ARGS))
        stack.callback(browser.close)
        # Runs first on the way out, before anything is stopped: every process of the
        # run (servers, kernels, chromium), even one started since the last snapshot.
        stack.callback(results.note_processes)
        results.browser = browser.version
        contexts = {}
        for name in SERVERS:
            contexts[name] = browser.new_context(viewport=VIEWPORT)
            contexts[name].add_init_script(INSTRUMENT)
            warmup = Driver(contexts[name], servers[name])  # JupyterLab's files cached
            try:
                warmup.load()
            finally:
                warmup.close()
        for index in range(rounds):
            for name in SERVERS if index % 2 == 0 else SERVERS[::-1]:
                one_round(contexts[name], servers[name], index, results)
                progress(
                    f"round {index + 1}/{rounds} {name}: "
                    + ", ".join(f"{s} {results.samples(s, name)[-1]:.0f} ms" for s in SCENARIOS)
                )
        for name, server in servers.items():  # before the temp dirs go
            log = server.log_path.read_text(errors="replace")
            for scenario in (LAUNCHER, DRAINED, RUNNING):
                for opened in results.opens[scenario][name]:
                    t0 = opened.server["t0"]
                    opened.server.update(server_side(log, t0, t0 + opened.total))
    results.alive_after = alive(results.seen)
    results.load = (results.load[0], os.getloadavg()[0])
    return results


def alive(seen: dict[int, float]) -> list[str]:
    """Those of ``seen`` (pid -> create time) still running (not a reused PID)."""
    left = []
    for pid, created in seen.items():
        with contextlib.suppress(psutil.NoSuchProcess):
            proc = psutil.Process(pid)
            if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{pid} {' '.join(proc.cmdline())[:100]}")
    return left


# -- the report -------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, as bench/kernels.py's table."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def table(results: Results) -> str:
    lines = [
        f"{'scenario':<34}{'server':<8}{'n':>4}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}"
        f"{'p50 herd/stock':>16}",
        "-" * 89,
    ]
    for scenario in SCENARIOS:
        stock = statistics.median(results.samples(scenario, "stock"))
        for name in SERVERS:
            ms = results.samples(scenario, name)
            p50 = statistics.median(ms)
            ratio = f"{p50 / stock:.2f}x" if name != "stock" else ""
            lines.append(
                f"{scenario:<34}{name:<8}{len(ms):>4}{p50:>9.0f}{percentile(ms, 0.95):>9.0f}"
                f"{max(ms):>9.0f}{ratio:>16}"
            )
    return "\n".join(lines)


def breakdown(results: Results, scenario: str) -> str:
    """The median of every mark, stock against herd."""
    opens = results.opens[scenario]
    lines = [
        f"{'step (median ms after the click)':<42}{'stock':>8}{'herd':>8}{'herd - stock':>14}",
    ]
    for mark, label in STEPS:
        values = {n: [o.marks[mark] for o in opens[n] if mark in o.marks] for n in SERVERS}
        if not all(values.values()):
            continue
        stock, herd = (statistics.median(values[n]) for n in SERVERS)
        lines.append(f"  {label:<40}{stock:>8.0f}{herd:>8.0f}{herd - stock:>+14.0f}")
    server = {n: [o.server for o in opens[n]] for n in SERVERS}

    def med(name: str, key: str) -> str:
        found = [s[key] for s in server[name] if key in s]
        return f"{statistics.median(found):.0f}" if found else "-"

    lines.append(
        f"  {'server: held POST /api/sessions (ms)':<40}{med('stock', 'session ms'):>8}"
        f"{med('herd', 'session ms'):>8}"
    )
    lines.append(
        f"  {'server: held the WebSocket upgrade (ms)':<40}"
        f"{med('stock', 'upgrade ms'):>8}{med('herd', 'upgrade ms'):>8}"
    )
    nudges = {n: sum(1 for s in server[n] if s.get("nudges", 0) > 1) for n in SERVERS}
    lines.append(
        f"  {'opens that needed a 2nd nudge (0.5 s)':<40}{nudges['stock']:>8}{nudges['herd']:>8}"
    )
    served: dict[str, int] = {}
    for how in (s["herd"] for s in server["herd"] if "herd" in s):
        served[how] = served.get(how, 0) + 1
    if served:
        lines.append(
            "  herd's kernels: " + ", ".join(f"{how} x{n}" for how, n in sorted(served.items()))
        )
    return "\n".join(lines)
