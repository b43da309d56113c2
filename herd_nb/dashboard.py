"""The live dashboard: a source's pools at a glance, in a notebook.

::

    Dashboard(source)          a herd.Pool, a Source (%herd connect) or a herd serve URL
        |
        |  a task on the running event loop (the kernel's, in ipykernel), every interval:
        v
    source.pools() ----> dict[pool name, PoolStats] ----> Dashboard._apply()
        |                                                    |  sets only the trait values
        |  SourceError: "stopped: <reason>", the task ends   |  that changed: ipywidgets sends
        v                                                    v  one comm message per change
    status line            totals | CPU and RAM bars | history sparklines | a row per worker
                                                                              |
    "end" button of a row --> a task: await source.release(session) --> status line, refresh

What each part does:

- :class:`Dashboard` is an ``ipywidgets.VBox``. Widgets are made once: a row
  (cells in one ``HTML``, plus an "end" button where the source can end
  sessions) is created when its worker appears and closed when it goes, and the
  rows' container is reassigned only then. The row of a worker whose figures
  did not change sends nothing, and figures are rounded to what a reader sees
  (whole percents, MiB, seconds then minutes) so that noise sends nothing
  either: with 50 settled workers a refresh is a handful of messages.
- Nothing blocks the kernel: reads and releases are coroutines on its event
  loop, no thread and no nested loop. Refreshing stops for good on
  :meth:`Dashboard.close` (also called when the widget is closed), when the
  source raises :class:`~herd_nb.sources.SourceError` (its pool stopped, its
  server went away), and with the kernel. While every view of a displayed
  dashboard is gone (its output cleared, its notebook closed) it pauses, and
  resumes when a view comes back: re-running a cell does not pile up pollers.
- Where widgets cannot render (nbconvert, terminal IPython, a notebook viewer),
  the displayed object's ``text/plain`` and ``text/html`` are a snapshot of the
  same figures; JupyterLab and Notebook 7 prefer the widget view over both.
- :func:`render_text` and :func:`render_html` are the same tables as pure
  functions of the stats, for ``%herd stats``.

Created where nothing could show its updates (no running event loop, as in
terminal IPython between cells, or no kernel, as in terminal IPython running
``%herd`` on its own loop), the dashboard is a snapshot: it reads its source
once if it can without awaiting (a pool of this process; a URL when no loop
runs) and starts no task; ``await dashboard.refresh()`` updates it.

ipywidgets is imported here only: ``herd_nb`` exposes :class:`Dashboard` lazily.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime
import enum
import html
import logging
import math
import sys
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from typing import Any, TypeVar

# ipywidgets ships no type information; its classes are Any here.
import ipywidgets as widgets  # type: ignore[import-untyped]
from comm import DummyComm
from ipywidgets.widgets.widget_string import HTMLStyle  # type: ignore[import-untyped]

import herd

from .sources import PoolSource, Source, SourceError, as_source

__all__ = ["Dashboard", "DashboardState", "WorkerRow", "render_html", "render_text"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# The history chart covers this many seconds by default.
HISTORY_SECONDS = 300.0
# At most this many points per sparkline (the chart is 160 px wide).
_CHART_POINTS = 80
# Recent crashes listed under the totals.
_CRASHES_SHOWN = 5

# Columns of the worker table; the numeric ones are right-aligned.
_WORKER_HEADER = ("worker", "pid", "session", "state", "RSS", "CPU", "age", "idle")
_WORKER_RIGHT = frozenset({1, 4, 5, 6, 7})
_TOTALS_HEADER = (
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
)
_TOTALS_RIGHT = frozenset(range(2, 10))

# One stylesheet for the worker rows, so that each row's HTML carries only its
# cells (50 rows changing cost 50 short messages, not 50 copies of the styles).
_ROW_STYLE = """<style>
.herd-dash-grid{display:grid;column-gap:1.5ch;white-space:nowrap;line-height:26px;
 font-family:var(--jp-code-font-family,monospace);font-size:var(--jp-code-font-size,12px);
 grid-template-columns:7ch 8ch 22ch 7ch 9ch 5ch 7ch 7ch}
.herd-dash-grid.herd-dash-pools{grid-template-columns:16ch 7ch 8ch 22ch 7ch 9ch 5ch 7ch 7ch}
.herd-dash-grid>span{overflow:hidden;text-overflow:ellipsis}
.herd-dash-grid>.r{text-align:right}
.herd-dash-head{font-weight:bold}
.herd-dash table{border-collapse:collapse}
.herd-dash th,.herd-dash td{padding:1px 8px;text-align:left}
.herd-dash th.r,.herd-dash td.r{text-align:right}
</style>"""


# -- formatting ----------------------------------------------------------------------------


def _size(n: int | None) -> str:
    """Bytes, rounded so that a few KiB of drift does not change the text."""
    if n is None:
        return "-"
    if n < 1 << 10:
        return f"{n} B"
    if n < 1 << 20:
        return f"{n / (1 << 10):.0f} KiB"
    if n < 10 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    if n < 1 << 30:
        return f"{n / (1 << 20):.0f} MiB"
    return f"{n / (1 << 30):.1f} GiB"


def _duration(seconds: float) -> str:
    """Seconds for the first minute, then minutes: a row of old workers stays still."""
    if seconds < 60:
        return f"{int(seconds)} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}%"


def _clock(at: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at))


def _pinned(stats: herd.PoolStats) -> int:
    return sum(1 for w in stats.workers if w.state in ("pinned", "ending"))


def _memory_used(node: herd.NodeStats) -> float:
    if not node.total_memory_bytes:
        return 0.0
    used = node.total_memory_bytes - node.available_memory_bytes
    return 100 * used / node.total_memory_bytes


def _cpu_text(node: herd.NodeStats) -> str:
    cores = "core" if node.cpu_count == 1 else "cores"
    return f"{100 - node.cpu_idle:.0f}% of {node.cpu_count} {cores}"


def _ram_text(node: herd.NodeStats) -> str:
    used = node.total_memory_bytes - node.available_memory_bytes
    return f"{_size(used)} of {_size(node.total_memory_bytes)}"


def _host_line(node: herd.NodeStats) -> str:
    return f"CPU {_cpu_text(node)} busy · RAM {_ram_text(node)} used ({_memory_used(node):.0f}%)"


def _node(stats: Mapping[str, herd.PoolStats]) -> herd.NodeStats | None:
    # Every pool of a source runs on one machine (a server's pools share its host).
    for pool in stats.values():
        return pool.node
    return None


def _cap(max_workers: int) -> str:
    # herd_nb's kernel pools have no cap unless one is configured: sys.maxsize.
    return "none" if max_workers >= sys.maxsize else str(max_workers)


def _totals_rows(stats: Mapping[str, herd.PoolStats]) -> list[tuple[str, ...]]:
    return [
        (
            name,
            s.state,
            str(s.total_workers),
            _cap(s.max_workers),
            str(s.available_workers),
            str(_pinned(s)),
            str(s.starting_workers),
            str(s.active_sessions),
            str(s.inflight_acquires),
            str(len(s.recent_crashes)),
            s.sandbox,
        )
        for name, s in stats.items()
    ]


def _worker_cells(worker: herd.WorkerStats) -> tuple[str, ...]:
    return (
        worker.id,
        "-" if worker.pid is None else str(worker.pid),
        worker.session_id or "-",
        worker.state,
        _size(worker.rss_bytes),
        _percent(worker.cpu_percent),
        _duration(worker.age_seconds),
        "in use" if worker.open_uses else _duration(worker.idle_seconds),
    )


def _worker_rows(stats: Mapping[str, herd.PoolStats]) -> list[tuple[str, ...]]:
    several = len(stats) > 1
    return [
        ((name, *_worker_cells(w)) if several else _worker_cells(w))
        for name, s in stats.items()
        for w in s.workers
    ]


def _notes(stats: Mapping[str, herd.PoolStats]) -> list[str]:
    """What needs attention: crashes with their reasons (newest first), failing spawns."""
    crashes = sorted(
        ((name, c) for name, s in stats.items() for c in s.recent_crashes),
        key=lambda item: item[1].at,
        reverse=True,
    )
    lines = []
    several = len(stats) > 1
    for name, crash in crashes[:_CRASHES_SHOWN]:
        where = f"{name} " if several else ""
        session = f" (session {crash.session_id})" if crash.session_id else ""
        lines.append(f"crash {_clock(crash.at)}: {where}{crash.worker_id}{session}: {crash.reason}")
    for name, s in stats.items():
        if s.spawn_failures:
            lines.append(
                f"{name}: {s.spawn_failures} failed spawn(s) in a row: {s.last_spawn_error or '?'}"
            )
    return lines


def _text_table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Iterable[int]) -> str:
    right = set(right)
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        out = (
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        return "  ".join(out).rstrip()

    return "\n".join([line(header), *(line(r) for r in rows)])


def _html_table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    right: Iterable[int],
    titles: Mapping[tuple[int, int], str] | None = None,
) -> str:
    right = set(right)
    titles = titles or {}

    def cell(tag: str, i: int, text: str, title: str | None = None) -> str:
        attrs = ' class="r" style="text-align:right"' if i in right else ""
        if title:
            attrs += f' title="{html.escape(title)}"'
        return f"<{tag}{attrs}>{html.escape(text)}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(cell("td", i, c, titles.get((n, i))) for i, c in enumerate(r)) + "</tr>"
        for n, r in enumerate(rows)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _totals_html(stats: Mapping[str, herd.PoolStats]) -> str:
    # The sandbox cell says why, on hover.
    titles = {(n, 10): s.sandbox_reason for n, s in enumerate(stats.values()) if s.sandbox_reason}
    return _html_table(_TOTALS_HEADER, _totals_rows(stats), _TOTALS_RIGHT, titles)


def _worker_header(several: bool) -> tuple[tuple[str, ...], frozenset[int]]:
    if several:
        return ("pool", *_WORKER_HEADER), frozenset(i + 1 for i in _WORKER_RIGHT)
    return _WORKER_HEADER, _WORKER_RIGHT


def render_text(stats: Mapping[str, herd.PoolStats], *, workers: bool = True) -> str:
    """A plain-text summary of pools: totals, host, notes and a line per worker.

    Pure: the same stats give the same text. ``%herd stats`` prints it in a
    terminal; the dashboard shows it where widgets cannot render.

    :param stats: :class:`herd.PoolStats` by pool name (:meth:`Source.pools
        <herd_nb.sources.Source.pools>`).
    :param workers: include the table of workers.

    Example::

        print(render_text({"local": pool.stats()}))
    """
    if not stats:
        return "no pools"
    parts = [_text_table(_TOTALS_HEADER, _totals_rows(stats), _TOTALS_RIGHT)]
    node = _node(stats)
    if node is not None:
        parts.append("host: " + _host_line(node))
    parts.extend(
        f"sandbox {name}: {s.sandbox_reason}" for name, s in stats.items() if s.sandbox_reason
    )
    parts.extend(_notes(stats))
    if workers:
        rows = _worker_rows(stats)
        header, right = _worker_header(len(stats) > 1)
        parts.append("\n" + _text_table(header, rows, right) if rows else "\nno workers")
    return "\n".join(parts)


def render_html(stats: Mapping[str, herd.PoolStats], *, workers: bool = True) -> str:
    """:func:`render_text` as HTML tables (every value escaped), for notebooks.

    :param stats: :class:`herd.PoolStats` by pool name.
    :param workers: include the table of workers.
    """
    if not stats:
        return "<p>no pools</p>"
    parts = ['<div class="herd-stats">', _totals_html(stats)]
    node = _node(stats)
    if node is not None:
        parts.append(f"<p>host: {html.escape(_host_line(node))}</p>")
    notes = _notes(stats)
    if notes:
        parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    if workers:
        rows = _worker_rows(stats)
        header, right = _worker_header(len(stats) > 1)
        parts.append(_html_table(header, rows, right) if rows else "<p>no workers</p>")
    parts.append("</div>")
    return "".join(parts)


# -- the history chart ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Sample:
    at: float  # time.monotonic()
    sessions: int
    cpu_busy: float  # percent of all CPUs
    memory_used: float  # percent of physical memory


def _sparkline(points: Sequence[tuple[float, float]], top: float, color: str) -> str:
    """An inline SVG polyline of (x in 0..1, value in 0..top) points."""
    width, height = 160, 28
    coords = " ".join(
        # 3 px inside the box, so that a line at 0 or at the top stays visible
        f"{x * width:.1f},{height - 3 - min(max(v / top, 0.0), 1.0) * (height - 6):.1f}"
        for x, v in points
    )
    return (
        f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'style="display:block;background:rgba(128,128,128,.08)">'
        f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{coords}"/></svg>'
    )


def _chart_html(history: Iterable[_Sample], window: float) -> str:
    samples = list(history)
    if not samples:
        return ""
    end = samples[-1].at
    # Until the window is full the chart spans what there is, so it is never a dot.
    span = min(window, end - samples[0].at)
    step = max(1, math.ceil(len(samples) / _CHART_POINTS))
    # Thin out from the newest sample back, so the last point is always the current one.
    shown = samples[::-1][::step][::-1]

    def series(value: Callable[[_Sample], float]) -> list[tuple[float, float]]:
        return [(1 - (end - s.at) / span if span else 1.0, value(s)) for s in shown]

    last = samples[-1]
    # Headroom: a steady count draws below the top edge, not along it.
    top_sessions = max(max(s.sessions for s in samples), 1) * 1.25
    blocks = [
        ("sessions", str(last.sessions), series(lambda s: s.sessions), top_sessions, "#1f77b4"),
        ("CPU", f"{last.cpu_busy:.0f}%", series(lambda s: s.cpu_busy), 100.0, "#ff7f0e"),
        ("RAM", f"{last.memory_used:.0f}%", series(lambda s: s.memory_used), 100.0, "#2ca02c"),
    ]
    cells = "".join(
        f'<div style="margin-right:16px"><div>{name} <b>{now}</b></div>'
        f"{_sparkline(points, top, color)}</div>"
        for name, now, points, top, color in blocks
    )
    return (
        f'<div style="display:flex;align-items:flex-end">{cells}'
        f'<div style="opacity:.6">last {_duration(span)}</div></div>'
    )


# -- the widget ----------------------------------------------------------------------------


class DashboardState(enum.Enum):
    """Lifecycle of a :class:`Dashboard`; it never goes back to an earlier state."""

    RUNNING = "running"  # a task on the event loop refreshes it every interval
    STATIC = "static"  # not live (no loop, or no frontend): a snapshot refresh() updates
    STOPPED = "stopped"  # the source is gone (SourceError): last figures kept, no refresh
    CLOSED = "closed"  # close(): widgets closed, no refresh


class WorkerRow:
    """One worker's line in a :class:`Dashboard`: its cells and its "end" button.

    :ivar pool: the pool's name.
    :ivar worker_id: the worker's ID.
    :ivar session_id: the session shown on the row (the one its button ends).
    :ivar cells: the ``ipywidgets.HTML`` of the row's cells.
    :ivar button: the ``ipywidgets.Button`` that ends the session, ``None`` where
        the source cannot end sessions; disabled while the row has no session.
    :ivar widget: what the dashboard shows for the row.
    """

    def __init__(
        self, pool: str, worker_id: str, cells: Any, button: Any | None, layout: Any
    ) -> None:
        self.pool = pool
        self.worker_id = worker_id
        self.session_id: str | None = None
        self.cells = cells
        self.button = button
        self.widget = cells if button is None else widgets.HBox([cells, button], layout=layout)

    def close(self) -> None:
        """Close the row's widgets (not the layouts and styles it shares with its siblings)."""
        for widget in {id(w): w for w in (self.widget, self.cells, self.button)}.values():
            if widget is not None:
                widget.close()


class Dashboard(widgets.VBox):  # ipywidgets is untyped: VBox is Any
    """A live ipywidgets panel of a pool, a server's pools, or a ``herd serve`` gateway.

    Totals per pool (workers, idle, pinned, starting, sessions, acquires in
    flight, recent crashes with their reasons, sandbox level), host CPU and RAM
    as bars, a chart of the last minutes, and a row per worker with a button
    that ends its session (where the source can). It refreshes itself from a
    task on the running event loop, never blocking the kernel, until it is
    closed or its source stops.

    :param source: a :class:`herd.Pool`, a :class:`~herd_nb.sources.Source`,
        or the URL of a ``herd serve`` gateway (read only).
    :param interval: seconds (or a :class:`datetime.timedelta`) between refreshes.
    :param history: seconds of history in the chart.
    :param live: refresh from a task on the running event loop. ``None`` (the
        default): where something can show the updates, that is in a kernel
        (ipywidgets has a comm to a frontend) with a running event loop.
        ``True``: wherever a loop runs (tests, code reading the properties).
        ``False``: read once. A dashboard that is not live is a snapshot that
        ``await dashboard.refresh()`` updates.
    :raises ValueError: ``interval`` or ``history`` is not a positive number.
    :raises TypeError: ``source`` is none of the above.

    Example (a notebook cell)::

        from herd_nb import Dashboard
        Dashboard(pool)                     # live until closed or until the pool stops
        Dashboard("http://127.0.0.1:8080")  # a herd serve gateway, read only
    """

    def __init__(
        self,
        source: herd.Pool[Any] | Source | str,
        interval: float | datetime.timedelta = 1.0,
        *,
        history: float = HISTORY_SECONDS,
        live: bool | None = None,
    ) -> None:
        if isinstance(interval, datetime.timedelta):
            interval = interval.total_seconds()
        if not (math.isfinite(interval) and interval > 0):
            raise ValueError(f"interval must be a positive number of seconds, not {interval!r}")
        if not (math.isfinite(history) and history > 0):
            raise ValueError(f"history must be a positive number of seconds, not {history!r}")
        self._source = as_source(source)
        self._interval = float(interval)
        self._window = float(history)
        # Everything below is touched on the loop's thread only (refreshes, clicks, close).
        # CLOSED until the widgets exist: close() (from ipywidgets' __del__) then skips them.
        self._state = DashboardState.CLOSED
        self._stop_reason = ""
        self._read_error: str | None = None  # the last read failed (not a SourceError)
        self._message: tuple[str, bool] | None = None  # the last action's outcome, is-error
        self._stats: dict[str, herd.PoolStats] | None = None  # None: not read yet
        self._history: collections.deque[_Sample] = collections.deque()
        self._rows: dict[tuple[str, str], WorkerRow] = {}
        self._order: list[tuple[str, str]] = []  # keys of the rows, as shown
        self._several = False  # whether the rows have a pool column
        self._releasing: set[str] = set()  # sessions whose release is under way
        self._tasks: set[asyncio.Task[None]] = set()  # releases, kept referenced
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one read-and-apply at a time: figures never go back
        self._wake = asyncio.Event()  # ends the wait between two refreshes early
        self._seen_views = False

        # Layouts and styles every row shares: a row costs three widgets, not eight.
        self._row_layout = widgets.Layout(align_items="center", margin="0")
        self._cells_layout = widgets.Layout(margin="0")
        self._cells_style = HTMLStyle()
        self._button_layout = widgets.Layout(width="auto", height="22px", margin="2px 0 2px 12px")
        self._button_style = widgets.ButtonStyle()
        self._header = widgets.HTML()
        self._totals = widgets.HTML()
        self._cpu = widgets.FloatProgress(min=0, max=100, description="CPU")
        # Fixed widths: a label growing by a digit must not move the other bar.
        self._cpu_text = widgets.HTML(layout=widgets.Layout(width="10em"))
        self._ram = widgets.FloatProgress(min=0, max=100, description="RAM")
        self._ram_text = widgets.HTML(layout=widgets.Layout(width="12em"))
        self._host = widgets.HBox([self._cpu, self._cpu_text, self._ram, self._ram_text])
        self._chart = widgets.HTML()
        self._notes = widgets.HTML()
        self._table_header = widgets.HTML()
        self._table = widgets.VBox()
        parts = [self._header, self._totals, self._host, self._chart, self._notes]
        parts += [self._table_header, self._table]
        # _view_count as a number: the frontend counts the views of the model.
        super().__init__(parts, _view_count=0)
        self.add_class("herd-dash")
        self.observe(self._on_views, names="_view_count")

        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if live is None:
            # No kernel, no frontend: ipywidgets falls back to a comm that sends
            # nothing (terminal IPython, where %herd runs on IPython's loop).
            live = not isinstance(self.comm, DummyComm)
        live = live and loop is not None
        self._state = DashboardState.RUNNING if live else DashboardState.STATIC
        if isinstance(self._source, PoolSource):
            # A pool of this process answers without awaiting anything: show its
            # figures now, so that the output displayed with the widget has them.
            self._apply_result(_run_now(self._source.pools()))
        elif loop is None:
            self._read_once()
        if loop is not None and live and self._live():
            self._task = loop.create_task(self._run(), name=f"herd dashboard: {self.label}")
        self._render_status()

    # -- what callers and tests read -------------------------------------------------------

    @property
    def source(self) -> Source:
        """Where the figures come from."""
        return self._source

    @property
    def label(self) -> str:
        """The source's name, shown in the title."""
        return self._source.label

    @property
    def interval(self) -> float:
        """Seconds between two refreshes."""
        return self._interval

    @property
    def state(self) -> DashboardState:
        """Refreshing, read once, stopped with its source, or closed."""
        return self._state

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The refreshing task (``None`` if made with no running event loop)."""
        return self._task

    @property
    def paused(self) -> bool:
        """Whether refreshing waits for a view: it was displayed, and its views are gone."""
        return self._seen_views and not self._view_count

    @property
    def stats(self) -> dict[str, herd.PoolStats]:
        """The figures shown: :class:`herd.PoolStats` by pool name (empty before a read)."""
        return dict(self._stats or {})

    @property
    def rows(self) -> dict[tuple[str, str], WorkerRow]:
        """The worker rows shown, by ``(pool name, worker ID)``, in display order."""
        return {key: self._rows[key] for key in self._order}

    @property
    def status(self) -> str:
        """The status line: ``live, every 1 s``, ``stopped: <reason>``, an action's outcome."""
        return self._status()[0]

    @property
    def history(self) -> list[tuple[float, int, float, float]]:
        """The chart's samples: (monotonic time, sessions, CPU busy %, RAM used %)."""
        return [(s.at, s.sessions, s.cpu_busy, s.memory_used) for s in self._history]

    def text(self) -> str:
        """A plain-text snapshot: title, status, totals and workers."""
        body = "waiting for a first reading" if self._stats is None else render_text(self._stats)
        return f"herd · {self.label} · {self.status}\n{body}"

    def __repr__(self) -> str:
        return f"<Dashboard of {self.label}: {self._state.value}>"

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        # ipywidgets gives the widget view (and a one-line repr as text/plain).
        # Frontends with widgets prefer the view (JupyterLab and Notebook 7 rank it
        # first); the others (nbconvert, terminal IPython, viewers) show a snapshot.
        bundle = dict(super()._repr_mimebundle_(**kwargs) or {}) if self.comm is not None else {}
        bundle["text/plain"] = self.text()
        title = f"<p><b>herd</b> · {html.escape(self.label)} · {html.escape(self.status)}</p>"
        body = "" if self._stats is None else render_html(self._stats)
        bundle["text/html"] = title + body
        return bundle

    # -- lifecycle -------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Read the source and update the panel now; a no-op once stopped or closed.

        A :class:`~herd_nb.sources.SourceError` stops the dashboard for good
        (``stopped: <reason>``); another failure to read is shown in the status
        line, and the next refresh tries again.
        """
        if not self._live():
            return
        async with self._lock:
            try:
                pools = await self._source.pools()
            except SourceError as exc:
                self._stop(str(exc))
                return
            except Exception as exc:
                self._read_error = f"cannot read {self.label}: {_describe(exc)}"
                self._render_status()
                return
            if not self._live():
                return  # closed while the read was under way
            self._read_error = None
            self._apply(pools)

    def close(self) -> None:
        """Stop refreshing and close every widget of the panel. Idempotent.

        ipywidgets calls it when the widget is closed (``Widget.close_all()``,
        garbage collection), so the task never outlives its widget.
        """
        # getattr: ipywidgets' __del__ calls close() even when __init__ failed early.
        if getattr(self, "_state", DashboardState.CLOSED) is not DashboardState.CLOSED:
            self._state = DashboardState.CLOSED
            for task in [self._task, *self._tasks]:
                if task is not None and not task.done():
                    # The loop may be closed already (a dashboard collected late).
                    with contextlib.suppress(RuntimeError):
                        task.cancel()
            for row in self._rows.values():
                row.close()
            self._rows.clear()
            self._order.clear()
            for part in [*self.children, self._host, *self._host.children]:
                _close_with_style(part)
            for shared in (self._row_layout, self._cells_layout, self._cells_style):
                shared.close()
            for shared in (self._button_layout, self._button_style, self.layout):
                shared.close()
        super().close()
        # ipywidgets hides the repr of a closed widget; ours still says what it showed.
        self.__dict__.pop("_repr_mimebundle_", None)

    async def _run(self) -> None:
        try:
            while self._state is DashboardState.RUNNING:
                self._wake.clear()
                if not self.paused:
                    try:
                        await self.refresh()
                    except Exception:
                        # A bug of ours, not of the source: log it, keep the panel alive.
                        log.exception("herd dashboard: refresh failed")
                        self._read_error = "refresh failed (see the log)"  # until one works
                        self._render_status()
                if not self._live():
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._interval):
                        await self._wake.wait()
        except asyncio.CancelledError:
            if self._state is not DashboardState.CLOSED:
                raise  # not our close(): the loop is shutting down

    def _live(self) -> bool:
        # A method, not an inline test: the state changes while a coroutine awaits.
        return self._state in (DashboardState.RUNNING, DashboardState.STATIC)

    def _read_once(self) -> None:
        """With no running loop: read the source once, on a private loop."""
        # loop_factory: leave the thread's current event loop (IPython's) as it is.
        with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
            runner.run(self.refresh())

    def _stop(self, reason: str) -> None:
        self._state = DashboardState.STOPPED
        self._stop_reason = reason
        self._wake.set()
        self._sync_buttons()
        self._render_status()

    def _on_views(self, change: dict[str, Any]) -> None:
        if change["new"]:
            self._seen_views = True
            self._wake.set()  # a view came (back): give it fresh figures now
        self._render_status()

    # -- applying figures ------------------------------------------------------------------

    def _apply_result(self, result: dict[str, herd.PoolStats] | SourceError | None) -> None:
        if isinstance(result, SourceError):
            self._stop(str(result))
        elif result is not None:
            self._apply(result)

    def _apply(self, pools: dict[str, herd.PoolStats]) -> None:
        self._stats = pools
        node = _node(pools)
        if node is not None:
            now = time.monotonic()
            sample = _Sample(
                at=now,
                sessions=sum(s.active_sessions for s in pools.values()),
                cpu_busy=100 - node.cpu_idle,
                memory_used=_memory_used(node),
            )
            self._history.append(sample)
            while self._history[0].at < now - self._window:
                self._history.popleft()
            _set_bar(self._cpu, self._cpu_text, sample.cpu_busy, _cpu_text(node))
            _set_bar(self._ram, self._ram_text, sample.memory_used, _ram_text(node))
        _set(self._totals, _totals_html(pools) if pools else "<p>no pools</p>")
        _set(self._chart, _chart_html(self._history, self._window))
        notes = "".join(f"<li>{html.escape(n)}</li>" for n in _notes(pools))
        _set(self._notes, f'<ul style="margin:4px 0">{notes}</ul>' if notes else "")
        self._apply_rows(pools)
        self._render_status()

    def _apply_rows(self, pools: dict[str, herd.PoolStats]) -> None:
        several = len(pools) > 1
        header, right = _worker_header(several)
        if several != self._several or not self._table_header.value:
            self._several = several
            _set(self._table_header, _ROW_STYLE + _grid_html(header, right, several, head=True))
        order = []
        for name, stats in pools.items():
            for worker in stats.workers:
                key = (name, worker.id)
                order.append(key)
                row = self._rows.get(key)
                if row is None:
                    row = self._rows[key] = self._new_row(name, worker.id)
                cells = _worker_cells(worker)
                _set(row.cells, _grid_html((name, *cells) if several else cells, right, several))
                if row.session_id != worker.session_id:
                    row.session_id = worker.session_id
                    if row.button is not None:
                        sid = worker.session_id
                        with row.button.hold_sync():  # tooltip and disabled: one message
                            row.button.tooltip = f"end session {sid}" if sid else "no session"
                            self._sync_button(row)
                else:
                    self._sync_button(row)
        if order != self._order:
            for key in set(self._order) - set(order):
                self._rows.pop(key).close()
            self._order = order
            # The one place the children are reassigned: workers came or went.
            self._table.children = tuple(self._rows[key].widget for key in order)

    def _new_row(self, pool: str, worker_id: str) -> WorkerRow:
        cells = widgets.HTML(layout=self._cells_layout, style=self._cells_style)
        button = None
        if self._source.can_release:
            button = widgets.Button(
                description="end",
                disabled=True,
                layout=self._button_layout,
                style=self._button_style,
            )
        row = WorkerRow(pool, worker_id, cells, button, self._row_layout)
        if button is not None:
            button.on_click(lambda _button: self._on_click(row))
        return row

    def _sync_button(self, row: WorkerRow) -> None:
        if row.button is None:
            return
        disabled = not self._live() or row.session_id is None or row.session_id in self._releasing
        if row.button.disabled != disabled:
            row.button.disabled = disabled

    def _sync_buttons(self) -> None:
        for row in self._rows.values():
            self._sync_button(row)

    # -- ending a session ------------------------------------------------------------------

    def _on_click(self, row: WorkerRow) -> None:
        """The "end" button: release the row's session in a task. Never raises."""
        session_id = row.session_id
        if session_id is None or session_id in self._releasing or not self._live():
            return
        try:
            # A click is handled on the kernel's event loop, in its thread.
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._message = (f"cannot end session {session_id}: no running event loop", True)
            self._render_status()
            return
        self._releasing.add(session_id)
        self._sync_button(row)
        self._message = (f"ending session {session_id}…", False)
        self._render_status()
        task = loop.create_task(self._release(session_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _release(self, session_id: str) -> None:
        try:
            await self._source.release(session_id)
        except Exception as exc:
            # Into the status line, never a traceback in the notebook.
            self._message = (f"could not end session {session_id}: {_describe(exc)}", True)
        else:
            self._message = (f"ended session {session_id}", False)
        finally:
            self._releasing.discard(session_id)
        if not self._live():
            self._sync_buttons()
            return
        self._render_status()
        await self.refresh()  # show the row without its session now, not in a second
        self._sync_buttons()

    # -- the status line -------------------------------------------------------------------

    def _status(self) -> tuple[str, bool]:
        """The status text, and whether it reports a failure."""
        if self._state is DashboardState.STOPPED:
            return f"stopped: {self._stop_reason}", True
        if self._state is DashboardState.CLOSED:
            return "closed", False
        if self._state is DashboardState.STATIC:
            parts = ["snapshot (await dashboard.refresh() updates it)"]
        elif self.paused:
            parts = ["paused while not displayed"]
        else:
            parts = [f"live, every {self._interval:g} s"]
        error = False
        if self._read_error is not None:
            parts.append(self._read_error)
            error = True
        if self._message is not None:
            parts.append(self._message[0])
            error = error or self._message[1]
        return " · ".join(parts), error

    def _render_status(self) -> None:
        if self._state is DashboardState.CLOSED:
            return
        text, error = self._status()
        color = "var(--jp-error-color1,#d32f2f)" if error else "var(--jp-ui-font-color2,#757575)"
        _set(
            self._header,
            f"<b>herd</b> · {html.escape(self.label)} "
            f'<span style="color:{color}">· {html.escape(text)}</span>',
        )


def _grid_html(
    cells: Sequence[str], right: frozenset[int], several: bool, head: bool = False
) -> str:
    classes = "herd-dash-grid"
    if several:
        classes += " herd-dash-pools"
    if head:
        classes += " herd-dash-head"
    # Text cells may be cut short (a long session ID): a title shows them whole on hover.
    spans = "".join(
        f"<span class=r>{html.escape(c)}</span>"
        if i in right
        else f'<span title="{html.escape(c)}">{html.escape(c)}</span>'
        for i, c in enumerate(cells)
    )
    return f'<div class="{classes}">{spans}</div>'


def _set(widget: Any, value: str) -> None:
    # Traitlets compares too (an equal value sends nothing); this also skips validation.
    if widget.value != value:
        widget.value = value


def _set_bar(bar: Any, label: Any, percent: float, text: str) -> None:
    # Whole percents: a tenth of a percent of drift sends no message.
    value = float(round(percent))
    style = "danger" if value >= 95 else "warning" if value >= 80 else ""
    if bar.value != value or bar.bar_style != style:
        with bar.hold_sync():  # one message for both traits
            bar.value = value
            bar.bar_style = style
    _set(label, text)


def _close_with_style(widget: Any) -> None:
    # Closing a widget leaves the Layout and Style widgets it made for itself open.
    widget.close()
    for part in (widget.layout, getattr(widget, "style", None)):
        if part is not None:
            part.close()


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _run_now(coro: Coroutine[Any, Any, T]) -> T | SourceError | None:
    """Run a coroutine that never suspends (a pool's stats) to its end, here and now.

    ``None`` if it did suspend after all: the next refresh reads the source instead.
    """
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    except SourceError as exc:
        return exc
    coro.close()
    return None
