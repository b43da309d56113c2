"""The live Dashboard and the text/HTML renderings, over real pools and a real ``herd serve``.

Outside a kernel ipywidgets has no frontend to talk to, and a dashboard there is
a snapshot unless made with ``live=True``: most tests ask for that, and one
test runs a dashboard in a real ipykernel, over ZMQ, as JupyterLab does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import comm
import ipywidgets  # type: ignore[import-untyped]
import pytest
from IPython.core.formatters import DisplayFormatter
from ipywidgets.widgets.widget import _instances  # type: ignore[import-untyped]
from jupyter_client.manager import start_new_kernel

import herd
from herd.testing import FakeClock, FakeFactory
from herd_nb.dashboard import Dashboard, DashboardState, render_html, render_text
from herd_nb.sources import GatewaySource, PoolSource, SourceError
from tests.helpers import factory, wait_until, wait_until_sync

ROOT = Path(__file__).resolve().parent.parent
WEB_WORKER = str(Path(__file__).parent / "helpers" / "web_worker.py")
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


@pytest.fixture
async def pool() -> AsyncIterator[herd.Pool[Any]]:
    """Three real process workers."""
    async with herd.Pool(factory(), min_workers=3, max_workers=4, health_interval=None) as p:
        yield p


@pytest.fixture
def dashboards() -> Iterator[list[Dashboard]]:
    """Dashboards made by a test, closed after it even if it fails."""
    made: list[Dashboard] = []
    yield made
    for dashboard in made:
        dashboard.close()


async def pin(pool: herd.Pool[Any], session_id: str) -> herd.Session[Any]:
    """Pin ``session_id`` and close the use: the pin stays."""
    session = await pool.acquire(session_id)
    await session.close()
    return session


def by_session(dashboard: Dashboard) -> dict[str | None, Any]:
    return {row.session_id: row for row in dashboard.rows.values()}


def displayed(obj: object) -> dict[str, Any]:
    """The mime bundle ``display(obj)`` publishes."""
    data, _ = DisplayFormatter().format(obj)  # type: ignore[no-untyped-call]
    return dict(data)


def paused(dashboard: Dashboard) -> bool:
    return dashboard.paused  # (a call: the type checker does not pin the value down)


class Messages:
    """The comm messages ipywidgets would send to a frontend, by model ID.

    Outside a kernel every widget's comm is a ``comm.DummyComm``; recording what
    it is asked to publish counts exactly what a kernel would put on the wire.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sent: list[tuple[str, str, dict[str, Any]]] = []
        record = self.sent

        def publish_msg(self: Any, msg_type: str, data: Any = None, *args: Any, **kw: Any) -> None:
            record.append((self.comm_id, msg_type, data or {}))

        monkeypatch.setattr(comm.DummyComm, "publish_msg", publish_msg)

    def updates(self, *widgets: Any) -> list[dict[str, Any]]:
        ids = {w.model_id for w in widgets}
        return [
            data["state"]
            for comm_id, kind, data in self.sent
            if kind == "comm_msg" and comm_id in ids and data.get("method") == "update"
        ]


# -- a local pool ------------------------------------------------------------------------


async def test_totals_and_rows_of_a_pool_with_two_pinned_sessions(
    pool: herd.Pool[Any], dashboards: list[Dashboard]
) -> None:
    alice, bob = await pin(pool, "alice"), await pin(pool, "bob")
    dashboard = Dashboard(pool, live=True)
    dashboards.append(dashboard)

    # A pool of this process is read at once: the figures are there before any await.
    assert dashboard.state is DashboardState.RUNNING
    stats = dashboard.stats["local"]
    assert (stats.total_workers, stats.active_sessions, stats.available_workers) == (3, 2, 1)
    rows = by_session(dashboard)
    assert set(rows) == {"alice", "bob", None}
    assert rows["alice"].worker_id == alice.worker.id
    assert rows["bob"].worker_id == bob.worker.id
    assert str(alice.worker.pid) in rows["alice"].cells.value
    # One end button per worker; usable only where there is a session to end.
    assert not rows["alice"].button.disabled
    assert not rows["bob"].button.disabled
    assert rows["alice"].button.tooltip == "end session alice"
    assert rows[None].button.disabled
    # The rows are the table's children, in the pool's order.
    assert dashboard._table.children == tuple(r.widget for r in dashboard.rows.values())

    totals = dashboard._totals.value  # pool, state, workers, max, idle, pinned, ...
    assert ">local<" in totals
    assert ">ready<" in totals
    cells = [c.split("<")[0] for c in totals.split("<td")[1:]]
    numbers = [c.split(">")[-1] for c in cells][2:10]
    assert numbers == ["3", "4", "1", "2", "0", "2", "0", "0"]
    assert dashboard._cpu.description == "CPU"
    assert 0 <= dashboard._cpu.value <= 100
    assert 0 < dashboard._ram.value <= 100
    assert "sessions <b>2</b>" in dashboard._chart.value
    assert "<svg" in dashboard._chart.value
    assert dashboard.status == "live, every 1 s"


async def test_the_end_button_ends_that_session(
    pool: herd.Pool[Any], dashboards: list[Dashboard]
) -> None:
    alice = await pin(pool, "alice")
    await pin(pool, "bob")
    dashboard = Dashboard(pool, interval=60, live=True)  # refreshed only by the click
    dashboards.append(dashboard)
    row = by_session(dashboard)["alice"]

    row.button.click()  # what a click in the browser runs, on the kernel's loop
    assert row.button.disabled  # no second click while the first is under way
    assert dashboard.status.endswith("ending session alice…")
    await wait_until(lambda: "alice" not in pool.sessions(), what="alice's session to end")
    await wait_until(lambda: dashboard.status.endswith("ended session alice"))

    assert set(pool.sessions()) == {"bob"}
    # The same row (the worker is reused) now has no session, and nothing to end.
    assert dashboard.rows[("local", alice.worker.id)] is row
    assert row.session_id is None
    assert row.button is not None
    assert row.button.disabled
    assert dashboard.stats["local"].active_sessions == 1


class RefusingSource(PoolSource):
    """A pool that cannot end sessions (say, the server said no)."""

    async def release(self, session_id: str) -> None:
        raise SourceError(f"DELETE sessions/{session_id}: 403 Forbidden")


async def test_a_failed_release_shows_in_the_status_line_not_as_a_traceback(
    pool: herd.Pool[Any], dashboards: list[Dashboard]
) -> None:
    await pin(pool, "alice")
    dashboard = Dashboard(RefusingSource(pool), interval=60, live=True)
    dashboards.append(dashboard)
    row = by_session(dashboard)["alice"]
    row.button.click()
    await wait_until(lambda: "could not end" in dashboard.status)
    assert dashboard.status == (
        "live, every 60 s · could not end session alice: DELETE sessions/alice: 403 Forbidden"
    )
    assert "color:var(--jp-error-color1" in dashboard._header.value
    assert pool.sessions().keys() == {"alice"}
    await wait_until(lambda: not row.button.disabled, what="the button to be usable again")


async def test_rows_come_and_go_with_workers(dashboards: list[Dashboard]) -> None:
    async with herd.Pool(
        factory(), min_workers=1, max_workers=3, worker_reuse=False, health_interval=None
    ) as pool:
        dashboard = Dashboard(pool, interval=0.05, live=True)
        dashboards.append(dashboard)
        first = next(iter(dashboard.rows.values()))
        sessions = [await pin(pool, sid) for sid in ("a", "b", "c")]
        await wait_until(lambda: len(dashboard.rows) == 3, what="a row per worker")
        assert set(by_session(dashboard)) == {"a", "b", "c"}
        assert dashboard.rows[("local", sessions[0].worker.id)] is first  # made once, kept
        assert len(dashboard._table.children) == 3

        # worker_reuse=False: a released session's worker is killed, and its row goes.
        b = by_session(dashboard)["b"]
        await pool.release("b")
        await wait_until(lambda: ("local", sessions[1].worker.id) not in dashboard.rows)
        assert b.widget not in dashboard._table.children
        assert b.widget.comm is None
        assert b.cells.comm is None
        assert b.button.comm is None
        assert len(dashboard._table.children) == len(dashboard.rows)
        assert "b" not in by_session(dashboard)


async def test_unchanged_figures_send_no_messages(
    monkeypatch: pytest.MonkeyPatch, dashboards: list[Dashboard]
) -> None:
    messages = Messages(monkeypatch)
    clock = FakeClock()  # ages and idle times stand still
    async with herd.Pool(FakeFactory(), min_workers=4, max_workers=5, clock=clock) as pool:
        await pin(pool, "alice")
        dashboard = Dashboard(pool, interval=60, live=True)
        dashboards.append(dashboard)
        rows = list(dashboard.rows.values())
        row_widgets = [w for r in rows for w in (r.widget, r.cells, r.button)]
        messages.sent.clear()  # what building the rows sent
        await dashboard.refresh()
        await dashboard.refresh()
        assert messages.updates(*row_widgets, dashboard._table) == []

        # One session pinned: its row's cells and button change, nothing else of the rows.
        await pin(pool, "bob")
        await dashboard.refresh()
        bob = by_session(dashboard)["bob"]
        assert [sorted(u) for u in messages.updates(*row_widgets)] == [
            ["value"],  # the cells of bob's row
            ["disabled", "tooltip"],  # its button, in one message
        ]
        assert messages.updates(bob.cells)[0]["value"] == bob.cells.value
        assert messages.updates(dashboard._table) == []  # no worker came or went


async def test_close_stops_refreshing_and_closes_every_widget(
    pool: herd.Pool[Any],
) -> None:
    before = set(_instances)
    dashboard = Dashboard(pool, interval=0.01, live=True)
    assert len(set(_instances) - before) > 10
    await wait_until(lambda: len(dashboard.history) >= 3, what="a few refreshes")
    task = dashboard.task
    assert task is not None

    dashboard.close()
    await asyncio.wait([task], timeout=5)
    assert task.done()
    assert not task.cancelled()
    assert task.result() is None
    assert dashboard.state is DashboardState.CLOSED
    assert set(_instances) == before  # rows, parts, layouts and styles: all closed
    seen = len(dashboard.history)
    await dashboard.refresh()  # a no-op now
    assert len(dashboard.history) == seen
    dashboard.close()  # idempotent
    # What it showed last is still its repr, without a widget view to a closed model.
    data = displayed(dashboard)
    assert WIDGET_VIEW not in data
    assert data["text/plain"].startswith("herd · local pool · closed\n")


async def test_closing_the_widget_stops_it_too(pool: herd.Pool[Any]) -> None:
    dashboard = Dashboard(pool, interval=0.01, live=True)
    task = dashboard.task
    assert task is not None
    ipywidgets.Widget.close_all()  # what closing every widget of a kernel does
    await asyncio.wait([task], timeout=5)
    assert task.done()
    assert dashboard.state is DashboardState.CLOSED


async def test_stops_when_its_pool_stops(dashboards: list[Dashboard]) -> None:
    async with herd.Pool(factory(), min_workers=1, health_interval=None) as pool:
        await pin(pool, "alice")
        dashboard = Dashboard(pool, interval=0.02, live=True)
        dashboards.append(dashboard)
        row = by_session(dashboard)["alice"]
    task = dashboard.task
    assert task is not None
    await asyncio.wait([task], timeout=5)
    assert task.done()
    assert task.result() is None
    assert dashboard.state is DashboardState.STOPPED
    assert dashboard.status == "stopped: the local pool has stopped"
    assert "stopped: the local pool has stopped" in dashboard._header.value
    assert row.button.disabled  # nothing to act on any more
    # The last figures stay on screen, and refresh() does nothing.
    assert by_session(dashboard)["alice"] is row
    await dashboard.refresh()
    assert dashboard.state is DashboardState.STOPPED


async def test_a_pool_already_stopped_shows_stopped_at_once(dashboards: list[Dashboard]) -> None:
    pool = herd.Pool(FakeFactory(), min_workers=1)
    await pool.start()
    await pool.aclose()
    dashboard = Dashboard(pool)
    dashboards.append(dashboard)
    assert dashboard.state is DashboardState.STOPPED
    assert dashboard.task is None
    assert dashboard.status == "stopped: the local pool has stopped"


class FlakySource:
    """Two pools; the first read fails the way a bad answer would (not a SourceError)."""

    label = "two pools"
    can_release = True

    def __init__(self, kernels: herd.Pool[Any], process: herd.Pool[Any]) -> None:
        self.pools_ = {"kernels:python3": kernels, "process": process}
        self.failures = 1

    async def pools(self) -> dict[str, herd.PoolStats]:
        if self.failures:
            self.failures -= 1
            raise KeyError("pools")
        return {name: pool.stats() for name, pool in self.pools_.items()}

    async def release(self, session_id: str) -> None:
        for pool in self.pools_.values():
            await pool.release(session_id)


async def test_several_pools_and_a_failed_read(dashboards: list[Dashboard]) -> None:
    async with (
        herd.Pool(FakeFactory(), min_workers=2) as kernels,
        herd.Pool(FakeFactory(), min_workers=1) as process,
    ):
        await pin(kernels, "nb-1")
        dashboard = Dashboard(FlakySource(kernels, process), interval=0.02, live=True)
        dashboards.append(dashboard)
        assert dashboard.stats == {}  # not a pool of this process: read by the task
        assert dashboard.text().endswith("waiting for a first reading")
        await wait_until(lambda: len(dashboard.rows) == 3, what="the rows of both pools")
        # The failed read was shown, then cleared by the next good one.
        assert dashboard.status == "live, every 0.02 s"
        assert [key[0] for key in dashboard.rows] == ["kernels:python3"] * 2 + ["process"]
        row = by_session(dashboard)["nb-1"]
        assert row.cells.value.startswith('<div class="herd-dash-grid herd-dash-pools">')
        assert ">kernels:python3<" in row.cells.value
        assert ">kernels:python3<" in dashboard._totals.value
        assert ">process<" in dashboard._totals.value


async def test_pauses_while_no_view_shows_it(
    pool: herd.Pool[Any], dashboards: list[Dashboard]
) -> None:
    dashboard = Dashboard(pool, interval=0.01, live=True)
    dashboards.append(dashboard)
    assert not paused(dashboard)  # never displayed (nbclient, tests): it refreshes
    # The frontend counts the views of the model: one shown, then its output cleared.
    dashboard.set_state({"_view_count": 1})
    dashboard.set_state({"_view_count": 0})
    assert paused(dashboard)
    assert dashboard.status == "paused while not displayed"
    await asyncio.sleep(0.05)  # a refresh under way finishes
    seen = len(dashboard.history)
    await asyncio.sleep(0.1)
    assert len(dashboard.history) == seen
    dashboard.set_state({"_view_count": 1})  # shown again: refreshed at once
    await wait_until(lambda: len(dashboard.history) > seen, timeout=0.5)
    assert dashboard.status == "live, every 0.01 s"


async def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="interval"):
        Dashboard("http://127.0.0.1:1/", interval=0)
    with pytest.raises(ValueError, match="history"):
        Dashboard("http://127.0.0.1:1/", history=float("nan"))
    with pytest.raises(TypeError, match="not a pool"):
        Dashboard(42)  # type: ignore[arg-type]


# -- the text fallback ---------------------------------------------------------------------


async def test_text_plain_and_html_where_widgets_cannot_render(
    pool: herd.Pool[Any], dashboards: list[Dashboard]
) -> None:
    alice = await pin(pool, "alice")
    dashboard = Dashboard(pool, live=True)
    dashboards.append(dashboard)
    data = displayed(dashboard)  # what display() publishes
    assert data[WIDGET_VIEW]["model_id"] == dashboard.model_id
    text = data["text/plain"]
    lines = text.splitlines()
    assert lines[0] == "herd · local pool · live, every 1 s"
    assert lines[1].split() == [
        "pool",
        "state",
        "workers",
        "max",
        "idle",
        "pinned",
        "starting",
        "sessions",
        "in-flight",
        "crashes",
        "sandbox",
    ]
    assert lines[2].split()[:10] == ["local", "ready", "3", "4", "2", "1", "0", "1", "0", "0"]
    assert any(line.startswith("host: CPU ") for line in lines)
    worker_line = next(line for line in lines if " alice " in line)
    assert worker_line.split()[:4] == [alice.worker.id, str(alice.worker.pid), "alice", "pinned"]
    assert len([line for line in lines if line.startswith("w-")]) == 3
    assert data["text/html"].startswith("<p><b>herd</b> · local pool · live, every 1 s</p>")
    assert "<td>alice</td>" in data["text/html"]


async def test_outside_a_kernel_it_is_a_snapshot_unless_asked(
    pool: herd.Pool[Any], gateway: tuple[str, subprocess.Popen[bytes]]
) -> None:
    # Terminal IPython runs %herd on its own loop: a loop runs, but no frontend
    # would ever see an update, so no task is started.
    await pin(pool, "alice")
    local = Dashboard(pool)
    remote = Dashboard(gateway[0])
    try:
        assert local.state is DashboardState.STATIC
        assert local.task is None
        assert "alice" in local.text()  # a pool of this process is read at once
        assert remote.state is DashboardState.STATIC
        assert remote.task is None
        assert remote.text().endswith("waiting for a first reading")
        await remote.refresh()
        assert remote.stats["gateway"].total_workers == 2
        assert remote.status == "snapshot (await dashboard.refresh() updates it)"
    finally:
        local.close()
        remote.close()


def test_without_a_running_loop_it_renders_once() -> None:
    # Terminal IPython: the pool lives on a loop that runs only while a cell awaits.
    with asyncio.Runner() as runner:
        pool = herd.Pool(FakeFactory(), min_workers=2)
        runner.run(pool.start())
        runner.run(pin(pool, "alice"))
        dashboard = Dashboard(pool)  # no loop running here
        try:
            assert dashboard.state is DashboardState.STATIC
            assert dashboard.task is None
            assert "alice" in dashboard.text()
            assert dashboard.status == "snapshot (await dashboard.refresh() updates it)"
            runner.run(pin(pool, "bob"))
            assert "bob" not in dashboard.text()
            runner.run(dashboard.refresh())  # `await dashboard.refresh()` in a cell
            assert "bob" in dashboard.text()
        finally:
            dashboard.close()
            runner.run(pool.aclose())


# -- a herd serve gateway ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def gateway() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A ``herd serve`` of two test web workers; yields its URL and process."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "herd", "serve", "--port", str(port), "--min", "2"]
    argv += ["--health-path", "/health", "--", sys.executable, WEB_WORKER, "{port}"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:

        def two_workers() -> bool:
            assert proc.poll() is None, "herd serve exited"
            try:
                with urllib.request.urlopen(url + "/herd/stats", timeout=2) as response:
                    return bool(json.load(response)["total_workers"] == 2)
            except OSError:
                return False

        wait_until_sync(two_workers, timeout=20, what="herd serve with two workers")
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def get(url: str, session_id: str) -> int:
    request = urllib.request.Request(url, headers={"X-Session-ID": session_id})
    with urllib.request.urlopen(request, timeout=10) as response:
        return int(response.status)


async def test_a_herd_serve_gateway_is_shown_read_only(
    gateway: tuple[str, subprocess.Popen[bytes]], dashboards: list[Dashboard]
) -> None:
    url, proc = gateway
    assert await asyncio.to_thread(get, url + "/health", "alice") == 200
    dashboard = Dashboard(url, interval=0.05, live=True)  # a URL: a GatewaySource
    dashboards.append(dashboard)
    assert isinstance(dashboard.source, GatewaySource)
    assert not dashboard.source.can_release

    # Without the gateway's admin token its stats show session tags, not IDs.
    def alices_row() -> list[str]:
        return [s for s in by_session(dashboard) if s is not None and s.startswith("s-")]

    await wait_until(alices_row, what="alice's row")
    assert len(dashboard.rows) == 2
    assert all(row.button is None for row in dashboard.rows.values())  # read only
    assert all(row.widget is row.cells for row in dashboard.rows.values())
    assert dashboard.label == url + "/"
    assert dashboard.stats["gateway"].active_sessions == 1
    assert alices_row()[0] in dashboard.text()
    assert "alice" not in dashboard.text()

    # The gateway stops: the dashboard says so and its task ends.
    proc.send_signal(signal.SIGTERM)
    await asyncio.to_thread(proc.wait, 15)
    task = dashboard.task
    assert task is not None
    await asyncio.wait([task], timeout=15)
    assert dashboard.state is DashboardState.STOPPED
    assert dashboard.status.startswith(f"stopped: {url}/ cannot be reached")


def test_a_gateway_without_a_running_loop_is_read_once(
    gateway: tuple[str, subprocess.Popen[bytes]],
) -> None:
    url, _ = gateway
    dashboard = Dashboard(url)
    try:
        assert dashboard.state is DashboardState.STATIC
        assert dashboard.task is None
        assert dashboard.stats["gateway"].total_workers == 2
        assert len(dashboard.rows) == 2
    finally:
        dashboard.close()


# -- render_text and render_html -----------------------------------------------------------

NODE = herd.NodeStats(
    total_memory_bytes=8 << 30,
    available_memory_bytes=6 << 30,
    cpu_idle=75.0,
    cpu_count=2,
)


def worker(**fields: Any) -> herd.WorkerStats:
    base: dict[str, Any] = {
        "id": "w-1",
        "pid": 101,
        "address": "127.0.0.1:9001",
        "state": "idle",
        "session_id": None,
        "open_uses": 0,
        "rss_bytes": 48 << 20,
        "cpu_percent": 0.0,
        "age_seconds": 42.9,
        "idle_seconds": 3.2,
    }
    return herd.WorkerStats(**{**base, **fields})


def pool_stats(**fields: Any) -> herd.PoolStats:
    base: dict[str, Any] = {
        "state": "ready",
        "total_workers": 2,
        "available_workers": 1,
        "starting_workers": 1,
        "active_sessions": 1,
        "inflight_acquires": 0,
        "min_workers": 1,
        "max_workers": 10,
        "min_idle": 0,
        "spawn_failures": 0,
        "last_spawn_error": None,
        "node": NODE,
        "workers": (
            worker(),
            worker(
                id="w-2",
                pid=102,
                state="pinned",
                session_id="alice",
                open_uses=1,
                rss_bytes=1536 << 20,
                cpu_percent=12.34,
                age_seconds=7300,
                idle_seconds=0,
            ),
        ),
        "sandbox": "none",
        "sandbox_reason": "process group and parent-death signal only",
    }
    return herd.PoolStats(**{**base, **fields})


def test_render_text_of_one_pool() -> None:
    assert render_text({"local": pool_stats()}) == "\n".join(
        [
            "pool   state  workers  max  idle  pinned  starting  sessions  in-flight  crashes"
            "  sandbox",
            "local  ready        2   10     1       1         1         1          0        0"
            "  none",
            "host: CPU 25% of 2 cores busy · RAM 2.0 GiB of 8.0 GiB used (25%)",
            "sandbox local: process group and parent-death signal only",
            "",
            "worker  pid  session  state       RSS  CPU    age    idle",
            "w-1     101  -        idle     48 MiB   0%   42 s     3 s",
            "w-2     102  alice    pinned  1.5 GiB  12%  2.0 h  in use",
        ]
    )


def test_a_pool_without_a_cap_says_so() -> None:
    # herd_nb's kernel pools have no cap unless one is configured (sys.maxsize).
    first = render_text({"kernels:python3": pool_stats(max_workers=sys.maxsize)}).splitlines()[1]
    assert first.split()[3] == "none"


def test_render_text_of_several_pools_with_crashes_and_failing_spawns() -> None:
    at = time.mktime((2024, 5, 1, 12, 3, 4, 0, 0, -1))
    crash = herd.CrashInfo(
        worker_id="k-3", session_id="nb-1", reason="killed: memory limit 256 MiB", at=at
    )
    stats = {
        "kernels:python3": pool_stats(recent_crashes=(crash,), workers=()),
        "process": pool_stats(
            spawn_failures=3,
            last_spawn_error="exited with code 1",
            workers=(worker(id="w-9", pid=None, rss_bytes=None, cpu_percent=None),),
            sandbox_reason="",
        ),
    }
    text = render_text(stats)
    lines = text.splitlines()
    assert lines[1].split()[0] == "kernels:python3"
    assert lines[1].split()[-2:] == ["1", "none"]
    assert lines[2].split()[0] == "process"
    assert lines[2].split()[-2:] == ["0", "none"]
    assert "crash 12:03:04: kernels:python3 k-3 (session nb-1): killed: memory limit 256 MiB" in (
        lines
    )
    assert "process: 3 failed spawn(s) in a row: exited with code 1" in lines
    assert lines[-2].split() == [
        "pool",
        "worker",
        "pid",
        "session",
        "state",
        "RSS",
        "CPU",
        "age",
        "idle",
    ]
    assert lines[-1].split() == ["process", "w-9", "-", "-", "idle", "-", "-", "42", "s", "3", "s"]
    assert render_text(stats, workers=False).splitlines() == lines[: lines.index("")]


@pytest.mark.parametrize(
    ("fields", "cells"),
    [
        ({"rss_bytes": 512, "age_seconds": 0.4, "idle_seconds": 59.9}, ["512", "B", "0", "s"]),
        ({"rss_bytes": 3 << 10, "age_seconds": 60}, ["3", "KiB", "1", "min"]),
        ({"rss_bytes": (75 << 20) // 10, "age_seconds": 3599}, ["7.5", "MiB", "59", "min"]),
        ({"rss_bytes": 5 << 30, "age_seconds": 3 * 86400}, ["5.0", "GiB", "3.0", "d"]),
    ],
)
def test_sizes_and_durations_are_rounded_for_reading(
    fields: dict[str, Any], cells: list[str]
) -> None:
    text = render_text({"p": pool_stats(workers=(worker(**fields),))})
    row = text.splitlines()[-1].split()
    assert row[4:6] + row[7:9] == cells


def test_render_html_escapes_and_right_aligns() -> None:
    crash = herd.CrashInfo(worker_id="w-3", session_id=None, reason="<script>x</script>", at=0.0)
    stats = {"a&b": pool_stats(recent_crashes=(crash,))}
    out = render_html(stats)
    assert "<script>" not in out
    assert "&lt;script&gt;x&lt;/script&gt;" in out
    assert "<th>a&amp;b</th>" not in out
    assert "<td>a&amp;b</td>" in out
    assert '<td class="r" style="text-align:right">10</td>' in out  # max
    assert 'title="process group and parent-death signal only"' in out
    assert "<td>alice</td>" in out
    assert "<td>in use</td>" not in out
    assert '<td class="r" style="text-align:right">in use</td>' in out
    assert out.startswith('<div class="herd-stats"><table>')
    assert out.endswith("</div>")
    assert "<td>alice</td>" not in render_html(stats, workers=False)
    assert render_html({}) == "<p>no pools</p>"
    assert render_text({}) == "no pools"


def test_render_functions_are_pure() -> None:
    stats = {"local": pool_stats()}
    copy = {"local": dataclasses.replace(stats["local"])}
    assert render_text(stats) == render_text(copy)
    assert render_html(stats) == render_html(copy)


# -- in a real kernel ----------------------------------------------------------------------


def test_in_a_kernel_it_updates_between_cells_and_a_click_ends_a_session() -> None:
    """Over ZMQ, as JupyterLab sees it: updates arrive while the kernel is idle."""
    manager, client = start_new_kernel(kernel_name="python3", cwd=str(ROOT))
    try:

        def run(code: str) -> list[dict[str, Any]]:
            outputs: list[dict[str, Any]] = []
            reply = client.execute_interactive(
                code, timeout=30, output_hook=lambda msg: outputs.append(msg)
            )
            errors = [m["content"] for m in outputs if m["msg_type"] == "error"]
            assert reply["content"]["status"] == "ok", errors
            return outputs

        shown = run(
            "import herd\n"
            "from herd.testing import FakeFactory\n"
            "from herd_nb.dashboard import Dashboard\n"
            "pool = herd.Pool(FakeFactory(), min_workers=2)\n"
            "await pool.start()\n"
            "await (await pool.acquire('alice')).close()\n"
            "d = Dashboard(pool, interval=0.1)\n"
            "d"
        )
        result = next(m["content"]["data"] for m in shown if m["msg_type"] == "execute_result")
        root = result[WIDGET_VIEW]["model_id"]
        assert "alice" in result["text/plain"]
        opened: dict[str, dict[str, Any]] = {}  # the models as a frontend knows them
        for m in shown:
            if m["msg_type"] == "comm_open":
                opened[m["content"]["comm_id"]] = dict(m["content"]["data"]["state"])
            elif m["msg_type"] == "comm_msg" and m["content"]["data"]["method"] == "update":
                opened[m["content"]["comm_id"]].update(m["content"]["data"]["state"])
        assert opened[root]["_model_name"] == "VBoxModel"
        assert opened[root]["_view_count"] == 0  # the frontend is asked to count views
        (button,) = [
            comm_id
            for comm_id, state in opened.items()
            if state.get("tooltip") == "end session alice"
        ]

        # Between cells the dashboard's task runs on the kernel's loop and sends updates.
        deadline = time.monotonic() + 10
        updates = 0
        while updates < 3:
            assert time.monotonic() < deadline, "no updates from the idle kernel"
            try:
                msg = client.get_iopub_msg(timeout=1)
            except Exception:
                continue
            if msg["msg_type"] == "comm_msg" and msg["content"]["comm_id"] in opened:
                updates += 1

        # A click, as the browser sends it: a comm message to the button's model.
        click = {"method": "custom", "content": {"event": "click"}}
        client.shell_channel.send(
            client.session.msg("comm_msg", {"comm_id": button, "data": click})
        )
        out = run(
            "import asyncio\n"
            "for _ in range(200):\n"
            "    if 'alice' not in pool.sessions() and 'ended' in d.status: break\n"
            "    await asyncio.sleep(0.05)\n"
            "print(sorted(pool.sessions()), d.status)\n"
            "d.close()\n"
            "await pool.aclose()\n"
            "await asyncio.sleep(0)\n"
            "print(d.task.done(), d.state.value)"
        )
        printed = "".join(m["content"]["text"] for m in out if m["msg_type"] == "stream")
        assert printed == "[] live, every 0.1 s · ended session alice\nTrue closed\n"
        assert any(m["msg_type"] == "comm_close" for m in out)
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
