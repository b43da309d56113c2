"""A real browser for the tests: Debian's chromium, driven by Playwright's sync API.

::

    chromium()                      the browser; skips the test if chromium cannot start
        |
        v
    open_tab(browser, name)  -->  Tab: the page, and everything it reported from its first
        |                         request on (console errors, uncaught errors, failed
        |                         requests, HTTP errors); on the way out it saves
        |                         <name>-console.txt, and <name>-failure.png if the block failed
        v
    JupyterLab(tab, base_url, token)   JupyterLab driven as a user drives it:
        .open("x.ipynb")                 /lab/tree/x.ipynb?token=...
        .wait_for_kernel_idle()          the status bar says "| Idle"
        .run_all_cells()                 Run -> Run All Cells, in the menu bar
        .wait_for_cells_done()           every code cell has its execution count
        .wait_for_output("text")         an output of the notebook shows it
        .run_cell(i)                     click into code cell i, Shift+Enter
        .dismiss_dialog("Ok")            click a dialog's button; wait until it is gone
    tab.screenshot("name")           build/test-artifacts/name.png

Only an installed browser runs: Debian's ``chromium`` (``$HERD_TEST_CHROMIUM`` names
another), never one fetched by ``playwright install``. The API is Playwright's sync one,
so the tests that use it are plain (not ``async``) test functions.

Example::

    def test_it(tmp_path):
        with chromium() as browser, open_tab(browser, "it") as tab:
            lab = JupyterLab(tab, server.base, TOKEN)
            lab.open("notebook.ipynb")
            lab.wait_for_kernel_idle()
            lab.run_all_cells()
            lab.wait_for_cells_done()
            tab.screenshot("it")
        tab.assert_no_errors()
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import (
    Browser,
    ConsoleMessage,
    Locator,
    Page,
    Request,
    Response,
    ViewportSize,
    sync_playwright,
)
from playwright.sync_api import Error as PlaywrightError

# Screenshots and console logs; build/ is gitignored.
ARTIFACTS = Path(__file__).resolve().parents[2] / "build" / "test-artifacts"

# Names the chromium executable to use instead of Debian's.
CHROMIUM_ENV = "HERD_TEST_CHROMIUM"

CHROMIUM_ARGS: Sequence[str] = (
    "--headless",
    # As root in a container chromium's own sandbox cannot start; the pages are ours.
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # The network is closed: without these three chromium keeps calling Google's
    # services and floods its log with refused connections.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)

# Wide enough for JupyterLab's side bar, a notebook and a dashboard's widest table.
VIEWPORT: ViewportSize = {"width": 1400, "height": 1000}


def chromium_executable() -> Path | None:
    """The chromium to run: ``$HERD_TEST_CHROMIUM``, else ``chromium`` on the ``PATH``
    (``/usr/bin/chromium`` on Debian); ``None`` if there is none."""
    named = os.environ.get(CHROMIUM_ENV)
    if named:
        return Path(named) if os.access(named, os.X_OK) else None
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    return Path(found) if found else None


def _reason(exc: BaseException) -> str:
    """The first line of a Playwright error, and the last lines the browser wrote.

    A launch error goes on with the whole command line and a call log: too long for
    a skip reason, and what the browser said is what tells why.
    """
    lines = str(exc).splitlines()
    said = [_BROWSER_SAID.sub("", line) for line in lines if _BROWSER_SAID.match(line)]
    return "; ".join([lines[0] if lines else type(exc).__name__, *said[-3:]])


# A line of the browser's own output in a launch error: "[pid=42][err] message".
_BROWSER_SAID = re.compile(r"^\[pid=\d+\]\[(?:err|out)\] ?")


@contextlib.contextmanager
def chromium(*, args: Sequence[str] = CHROMIUM_ARGS, timeout: float = 60.0) -> Iterator[Browser]:
    """Launch chromium (headless) for the block; close it, and Playwright's driver, after.

    :param args: chromium's command-line switches.
    :param timeout: seconds chromium may take to start.
    :raises pytest.skip.Exception: chromium is missing or cannot start here; the
        reason reads ``chromium cannot start here: <error>``.
    """
    executable = chromium_executable()
    if executable is None:
        where = os.environ.get(CHROMIUM_ENV) or "chromium on the PATH"
        pytest.skip(
            f"chromium cannot start here: no executable ({where}); "
            f"apt-get install chromium, or set {CHROMIUM_ENV}"
        )
    try:
        playwright = sync_playwright().start()
    except Exception as exc:  # the driver (node) is missing or broken
        pytest.skip(f"chromium cannot start here: Playwright's driver failed: {_reason(exc)}")
    try:
        try:
            browser = playwright.chromium.launch(
                executable_path=executable, args=list(args), timeout=timeout * 1000
            )
        except PlaywrightError as exc:
            pytest.skip(f"chromium cannot start here: {executable}: {_reason(exc)}")
        try:
            yield browser
        finally:
            browser.close()
    finally:
        playwright.stop()


@dataclasses.dataclass(frozen=True)
class Problem:
    """Something a page reported that fails a test unless the test ignores it, saying why."""

    kind: str  # "console error", "page error", "request failed" or "HTTP <status>"
    text: str
    where: str = ""  # the URL (and line) it came from, when known

    def __str__(self) -> str:
        return f"{self.kind}: {self.text}" + (f" ({self.where})" if self.where else "")


class Tab:
    """A browser page, and what it reported since it was opened (see :func:`open_tab`).

    :ivar page: the Playwright page.
    :ivar name: prefix of the artifacts saved for it.
    :ivar console: every console message, as ``"<type>: <text> (<url>:<line>)"``, in order.
    :ivar problems: console errors, uncaught errors, failed requests and HTTP error
        responses, in order.
    """

    def __init__(self, page: Page, name: str) -> None:
        self.page = page
        self.name = name
        self.console: list[str] = []
        self.problems: list[Problem] = []
        page.on("console", self._on_console)
        page.on("pageerror", self._on_page_error)
        page.on("requestfailed", self._on_request_failed)
        page.on("response", self._on_response)

    # Playwright calls these on the test's thread, while a sync call is waiting.
    def _on_console(self, message: ConsoleMessage) -> None:
        url = message.location.get("url")
        where = f"{url}:{message.location.get('lineNumber', 0)}" if url else ""
        self.console.append(f"{message.type}: {message.text}" + (f" ({where})" if where else ""))
        if message.type == "error":
            self.problems.append(Problem("console error", message.text, where))

    def _on_page_error(self, error: PlaywrightError) -> None:
        self.console.append(f"uncaught: {error}")
        self.problems.append(Problem("page error", error.stack or str(error)))

    def _on_request_failed(self, request: Request) -> None:
        failure = request.failure or "failed"
        self.console.append(f"request failed: {request.method} {request.url}: {failure}")
        self.problems.append(Problem("request failed", f"{request.method} {failure}", request.url))

    def _on_response(self, response: Response) -> None:
        if response.status >= 400:
            request = response.request
            self.console.append(f"HTTP {response.status}: {request.method} {response.url}")
            self.problems.append(
                Problem(f"HTTP {response.status}", f"{request.method} {response.url}", "")
            )

    def errors(self, ignore: Mapping[str, str] | None = None) -> list[Problem]:
        """The problems, less those matching a pattern of ``ignore``.

        :param ignore: regular expression (searched in ``str(problem)``) -> why it is
            acceptable; a reason is required, so every ignore says why.
        """
        ignore = ignore or {}
        for pattern, why in ignore.items():
            if not why.strip():
                raise ValueError(f"ignoring {pattern!r} needs a reason")
        return [p for p in self.problems if not any(re.search(i, str(p)) for i in ignore)]

    def assert_no_errors(self, ignore: Mapping[str, str] | None = None) -> None:
        """Fail with every problem and the whole console if any problem is left.

        :param ignore: see :meth:`errors`.
        """
        errors = self.errors(ignore)
        assert not errors, (
            f"{len(errors)} browser error(s):\n  "
            + "\n  ".join(map(str, errors))
            + "\nconsole:\n  "
            + "\n  ".join(self.console)
        )

    def screenshot(self, name: str, locator: Locator | None = None) -> Path:
        """Save ``ARTIFACTS/<name>.png`` of the viewport (or of ``locator``); return its path."""
        path = ARTIFACTS / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        if locator is None:
            self.page.screenshot(path=path)
        else:
            locator.screenshot(path=path)
        return path

    def save_console(self) -> Path:
        """Write the console transcript to ``ARTIFACTS/<name>-console.txt``."""
        path = ARTIFACTS / f"{self.name}-console.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{line}\n" for line in self.console))
        return path


@contextlib.contextmanager
def open_tab(browser: Browser, name: str, *, timeout: float = 30.0) -> Iterator[Tab]:
    """A new page in a fresh browser context (no cookies, no storage), recorded from the start.

    On the way out the console transcript is saved as ``<name>-console.txt``; if the
    block raised, a screenshot is saved as ``<name>-failure.png`` first.

    :param name: prefix of the artifacts.
    :param timeout: Playwright's default for actions (clicks, navigation), in seconds.
    """
    context = browser.new_context(viewport=VIEWPORT)
    try:
        context.set_default_timeout(timeout * 1000)
        tab = Tab(context.new_page(), name)
        try:
            yield tab
        except BaseException:
            # What the page looked like when the test failed; never hides the failure.
            with contextlib.suppress(PlaywrightError):
                tab.screenshot(f"{name}-failure")
            raise
        finally:
            tab.save_console()
    finally:
        context.close()


def write_user_settings(config_dir: Path, plugin: str, settings: Mapping[str, Any]) -> None:
    """Set a JupyterLab plugin's user settings, as its Settings Editor would.

    :param config_dir: the server's ``JUPYTER_CONFIG_DIR``.
    :param plugin: the plugin's ID, ``"<package>:<plugin>"``.

    Example::

        write_user_settings(config, "@jupyterlab/apputils-extension:notification",
                            {"fetchNews": "false"})
    """
    package, _, name = plugin.partition(":")
    path = config_dir / "lab" / "user-settings" / package / f"{name}.jupyterlab-settings"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(settings), indent=2))


# Every code cell has an execution count, and none is queued or running ("[*]:").
_CELLS_DONE = """panel => {
    const prompts = [...panel.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')];
    return prompts.length > 0 && prompts.every(p => /^\\[\\d+\\]:$/.test(p.textContent.trim()));
}"""


class JupyterLab:
    """JupyterLab in a :class:`Tab`, driven as a user drives it: URL, menus, status bar.

    :param tab: the tab to drive.
    :param base_url: the server's URL, ``http://127.0.0.1:<port>`` (with its base URL).
    :param token: the server's token; the first page logs in with it.
    """

    def __init__(self, tab: Tab, base_url: str, token: str) -> None:
        self.tab = tab
        self.page = tab.page
        self.base_url = base_url.rstrip("/")
        self.token = token

    @property
    def notebook(self) -> Locator:
        """The notebook panel in front (its toolbar, cells and outputs)."""
        return self.page.locator("#jp-main-dock-panel .jp-NotebookPanel:visible")

    def open(self, path: str, *, timeout: float = 60.0) -> None:
        """Open ``/lab/tree/<path>`` (relative to the server's root) and wait for its panel."""
        query = urllib.parse.urlencode({"token": self.token})
        self.page.goto(
            f"{self.base_url}/lab/tree/{urllib.parse.quote(path)}?{query}", timeout=timeout * 1000
        )
        self.notebook.locator(".jp-Cell").first.wait_for(timeout=timeout * 1000)

    def wait_for_kernel_idle(self, *, timeout: float = 60.0) -> None:
        """Wait until the notebook's kernel is connected and idle.

        The status bar is the witness: it reads ``<kernel> | Idle`` only once the
        kernel's WebSocket is up and the kernel said it is idle. (The notebook
        toolbar's indicator starts out "idle" before any connection: a cell run
        then is dropped, never sent.)
        """
        idle = self.page.locator("#jp-main-statusbar .jp-StatusBar-TextItem").filter(
            has_text=re.compile(r"\|\s*Idle\s*$")
        )
        idle.first.wait_for(timeout=timeout * 1000)

    def menu(self, *labels: str) -> None:
        """Click through the menu bar: ``menu("Run", "Run All Cells")``."""
        top, *items = labels
        self.page.locator("#jp-MainMenu").get_by_role("menuitem", name=top, exact=True).click()
        for label in items:
            # An item's accessible name ends with its shortcut, if it has one.
            name = re.compile(rf"^{re.escape(label)}(\s|$)")
            self.page.locator(".lm-Menu:visible").get_by_role("menuitem", name=name).last.click()

    def run_all_cells(self) -> None:
        """Run -> Run All Cells; returns once the command is given
        (:meth:`wait_for_cells_done` waits for its end)."""
        self.menu("Run", "Run All Cells")

    def wait_for_cells_done(self, *, timeout: float = 120.0) -> None:
        """Wait until every code cell has an execution count (none queued or running),
        then for the kernel to be idle.

        Counts shown before the run would pass at once: use it on a notebook saved
        without outputs (as the repository's are), or clear them first
        (``menu("Edit", "Clear Outputs of All Cells")``).
        """
        panel = self.notebook.element_handle(timeout=timeout * 1000)
        self.page.wait_for_function(_CELLS_DONE, arg=panel, timeout=timeout * 1000)
        self.wait_for_kernel_idle(timeout=timeout)

    def code_cells(self) -> Locator:
        """The code cells of the notebook in front, in order."""
        return self.notebook.locator(".jp-CodeCell")

    def prompt(self, index: int) -> Locator:
        """Code cell ``index``'s input prompt: ``[ ]:``, ``[*]:`` or ``[<count>]:``."""
        return self.code_cells().nth(index).locator(".jp-InputArea-prompt")

    def run_cell(self, index: int) -> None:
        """Click into code cell ``index``'s editor and press Shift+Enter, as a user runs
        one cell (JupyterLab then selects the next, adding one after the last); returns
        once the keys are pressed."""
        self.code_cells().nth(index).locator(".cm-content").click()
        self.page.keyboard.press("Shift+Enter")

    def dialog(self) -> Locator:
        """JupyterLab's modal dialog (there is at most one at a time)."""
        return self.page.locator(".jp-Dialog")

    def dismiss_dialog(self, button: str = "Ok", *, timeout: float = 30.0) -> None:
        """Click the dialog's ``button``, and wait until the dialog is gone."""
        dialog = self.dialog()
        dialog.get_by_role("button", name=button, exact=True).click(timeout=timeout * 1000)
        dialog.wait_for(state="detached", timeout=timeout * 1000)

    def outputs(self) -> Locator:
        """Every output of the notebook in front (one per displayed item)."""
        return self.notebook.locator(".jp-OutputArea-output")

    def stderr_outputs(self) -> list[str]:
        """The text of every traceback and every output written to stderr (JupyterLab
        renders both as ``application/vnd.jupyter.stderr``)."""
        return self.notebook.locator(
            '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'
        ).all_inner_texts()

    def wait_for_output(self, text: str | re.Pattern[str], *, timeout: float = 60.0) -> Locator:
        """Wait until an output shows ``text``; return that output."""
        output = self.outputs().filter(has_text=text).first
        output.wait_for(timeout=timeout * 1000)
        return output
