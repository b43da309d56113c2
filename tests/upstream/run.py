"""Run jupyter_server's and jupyter_client's own tests, stock and with herd forced in.

::

    python tests/upstream/run.py                  # both suites, both runs: ~25 minutes
    python tests/upstream/run.py --suite jupyter_client --timeout 120
    python tests/upstream/run.py --ci             # herd run only, its failures rerun
    python tests/upstream/run.py --suite jupyter_server --tests tests/services/api

For each suite, the source distribution of the *installed* version is downloaded
once (``pip download --no-binary :all:``) into the cache (``build/upstream/`` by
default), and only its ``tests/`` and ``pyproject.toml`` are unpacked: the tests
import the installed packages, never a copy from the sdist. Test requirements
that the environment lacks (pytest-jupyter, flaky, pytest-console-scripts,
pytest-timeout) are installed into the cache with ``pip install --target`` and
put on the test runs' ``PYTHONPATH`` only: two of them are pytest plugins that
would otherwise load into herd's own test runs.

Each suite then runs twice, each in a subprocess of its own, with upstream's
pytest configuration plus a per-test timeout:

    stock ─┐                            ┌─ results-<suite>-stock.jsonl
           ├─ pytest -p herd_forced ────┤  report-<suite>-<mode>.json (what the plugin saw)
    herd  ─┘  (HERD_UPSTREAM_MODE)      └─ <suite>-<mode>.log (full tracebacks)

``herd_forced.py`` (this folder) forces herd in for the ``herd`` run and only
watches in the ``stock`` run. A test that passes stock and fails with herd is a
*herd-only failure*; it must be listed in ``known_differences.txt`` (test ID and
reason), or the script exits with status 1. It also exits 1 when a run ended
without results (a crash, or the run's time limit). Processes a run leaves
behind (found by a tag in their environment) are reported and killed.

``--ci`` runs each suite with herd only, then runs the tests that failed again,
apart from that run, stock and with herd (one pytest for each, or one per test
with ``--rerun each``), and classifies each failure: *fails stock too* (not herd's),
*herd-only* (passes stock, fails with herd: must be listed, or exit status 1) or
*order- or load-dependent* (passes both reruns: a warning, not an error).
``--tests`` and ``-k`` run part of a suite (one ``--suite`` for ``--tests``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
KNOWN = HERE / "known_differences.txt"

#: Test requirements of the two sdists (their ``test`` extras, minus linters and
#: coverage), pinned; installed only where the environment has no version of them.
REQUIREMENTS = {
    "pytest-jupyter": "pytest-jupyter==0.11.0",
    "pytest-timeout": "pytest-timeout==2.4.0",
    "flaky": "flaky==3.8.1",
    "pytest-console-scripts": "pytest-console-scripts==1.4.1",
}

MODES = ("stock", "herd")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Suite:
    """Some of one upstream project's tests."""

    name: str
    dist: str
    paths: tuple[str, ...]


SUITES = (
    Suite(
        name="jupyter_server",
        dist="jupyter_server",
        paths=(
            "tests/services/kernels",
            "tests/services/sessions",
            "tests/auth/test_authorizer.py",
            "tests/services/api",
            "tests/test_serverapp.py",
        ),
    ),
    Suite(
        name="jupyter_client",
        dist="jupyter_client",
        paths=("tests/test_kernelmanager.py::TestAsyncKernelManager",),
    ),
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Result:
    """One test's outcome in one run."""

    outcome: str  # passed, failed, error, skipped, xfailed, xpassed
    message: str  # the first line of the error, or ""
    fds: int  # file descriptors open in the pytest process after the test

    @property
    def ok(self) -> bool:
        return self.outcome in ("passed", "xfailed", "skipped")

    @property
    def broken(self) -> bool:
        return self.outcome in ("failed", "error")


@dataclasses.dataclass(kw_only=True)
class Run:
    """One pytest subprocess: a suite, stock or with herd."""

    suite: Suite
    mode: str
    returncode: int
    seconds: float
    results: dict[str, Result]
    seen: dict[str, int]
    leftovers: list[str]
    log: Path

    def count(self, *outcomes: str) -> int:
        return sum(1 for r in self.results.values() if r.outcome in outcomes)

    @property
    def max_fds(self) -> int:
        return max((r.fds for r in self.results.values()), default=-1)


# -- preparing -------------------------------------------------------------------------


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], check=True)


def sdist_tests(dist: str, cache: Path) -> Path:
    """The sdist's ``tests/`` and ``pyproject.toml`` for the installed version of ``dist``."""
    version = importlib.metadata.version(dist)
    source = cache / "src" / f"{dist}-{version}"
    if (source / ".complete").exists():
        return source
    sdists = cache / "sdist"
    sdists.mkdir(parents=True, exist_ok=True)
    stem = f"{dist.replace('-', '_')}-{version}"
    tarball = sdists / f"{stem}.tar.gz"
    if not tarball.exists():
        print(f"downloading the {dist} {version} sdist (once; pip builds its metadata)")
        with tempfile.TemporaryDirectory(dir=sdists) as scratch:
            pip(
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"{dist}=={version}",
                "--dest",
                scratch,
            )
            (got,) = Path(scratch).glob("*.tar.gz")
            got.replace(tarball)
    shutil.rmtree(source, ignore_errors=True)
    source.mkdir(parents=True)
    with tarfile.open(tarball) as archive:
        wanted = [
            member
            for member in archive.getmembers()
            if member.name.split("/", 1)[-1] == "pyproject.toml"
            or member.name.split("/", 1)[-1].startswith("tests/")
        ]
        for member in wanted:
            member.name = member.name.split("/", 1)[1]
        archive.extractall(source, members=wanted, filter="data")
    (source / ".complete").touch()
    return source


def test_requirements(cache: Path) -> Path:
    """A directory holding the requirements the environment lacks (maybe none)."""
    site = cache / "site"
    have = {d.metadata["Name"].lower() for d in importlib.metadata.distributions()}
    there = {d.metadata["Name"].lower() for d in importlib.metadata.distributions(path=[str(site)])}
    missing = [pin for name, pin in REQUIREMENTS.items() if name not in have | there]
    if missing:
        print(f"installing into {site}: {' '.join(missing)}")
        pip("install", "--quiet", "--no-deps", "--target", str(site), *missing)
    return site


# -- running ---------------------------------------------------------------------------


def run_suite(
    suite: Suite,
    mode: str,
    *,
    source: Path,
    site: Path,
    herd: Path,
    out: Path,
    timeout: float,
    limit: float,
    tests: Sequence[str] = (),
    extra: Sequence[str] = (),
    label: str = "",
    quiet: bool = False,
) -> Run:
    """Run one suite in one mode (``tests``: only these IDs or paths; ``extra``: more
    pytest arguments), in a subprocess; kill what it leaves behind."""
    name = f"{suite.name}-{label or mode}"
    results_file = out / f"results-{name}.jsonl"
    report_file = out / f"report-{name}.json"
    log = out / f"{name}.log"
    for stale in (results_file, report_file):
        stale.unlink(missing_ok=True)
    tag = uuid.uuid4().hex
    path = [str(herd), str(HERE), str(site), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(path),
        "HERD_UPSTREAM_MODE": mode,
        "HERD_UPSTREAM_SUITE": suite.name,
        "HERD_UPSTREAM_RESULTS": str(results_file),
        "HERD_UPSTREAM_REPORT": str(report_file),
        "HERD_UPSTREAM_TAG": tag,
    }
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "herd_forced",
        "-p",
        "no:cacheprovider",
        "--no-showlocals",
        "--color=no",
        "-o",
        "timeout_method=signal",
        f"--timeout={timeout:g}",
        *extra,
        *(tests or suite.paths),
    ]
    if not quiet:
        print(f"{suite.name} {mode}: running (log: {log})", flush=True)
    started = time.monotonic()
    try:
        with log.open("w", encoding="utf-8") as output:
            proc = subprocess.Popen(
                command,
                cwd=source,
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                returncode = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                print(f"{suite.name} {mode}: over {limit:g}s, stopped", flush=True)
                returncode = -signal.SIGKILL
            finally:  # a time limit, or this script interrupted: stop the run's processes
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    finally:
        leftovers = kill_tagged(tag)
    seconds = time.monotonic() - started
    seen: dict[str, int] = {}
    if report_file.exists():
        seen = json.loads(report_file.read_text(encoding="utf-8"))["seen"]
    return Run(
        suite=suite,
        mode=mode,
        returncode=returncode,
        seconds=seconds,
        results=read_results(results_file),
        seen=seen,
        leftovers=leftovers,
        log=log,
    )


def saved_run(suite: Suite, mode: str, out: Path, label: str = "") -> Run | None:
    """The run of ``suite`` in ``mode`` that an earlier invocation left in ``out``."""
    name = f"{suite.name}-{label or mode}"
    results = read_results(out / f"results-{name}.jsonl")
    report_file = out / f"report-{name}.json"
    if not results or not report_file.exists():
        return None
    print(f"{suite.name} {mode}: results of an earlier run (--reuse)")
    return Run(
        suite=suite,
        mode=mode,
        returncode=0,
        seconds=0.0,
        results=results,
        seen=json.loads(report_file.read_text(encoding="utf-8"))["seen"],
        leftovers=[],
        log=out / f"{name}.log",
    )


def read_results(path: Path) -> dict[str, Result]:
    results: dict[str, Result] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            results[row["id"]] = Result(
                outcome=row["outcome"], message=row["message"], fds=row.get("fds", -1)
            )
    return results


def kill_tagged(tag: str) -> list[str]:
    """Kill the processes whose environment carries ``tag``; describe them."""
    found: list[psutil.Process] = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("HERD_UPSTREAM_TAG") == tag:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    described = []
    for proc in found:
        try:
            described.append(f"{proc.pid} {' '.join(proc.cmdline())[:160]}")
            proc.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(found, timeout=5)
    return described


# -- comparing -------------------------------------------------------------------------


def read_known(path: Path) -> dict[str, str]:
    """``suite::test-id -- reason`` lines (IDs may hold spaces); an ID without its
    ``[parameters]`` covers all of them; ``#`` starts a comment line."""
    known: dict[str, str] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        test, _, reason = line.partition(" -- ")
        if "::" not in test or not reason.strip():
            raise SystemExit(f"{path}:{number}: want 'suite::test-id -- reason', got {raw!r}")
        known[test.strip()] = reason.strip()
    return known


def known_reason(test: str, known: dict[str, str]) -> str | None:
    if test in known:
        return known[test]
    base = test.split("[", 1)[0]
    return known.get(base) if base != test else None


def herd_only(stock: Run, herd: Run) -> list[str]:
    """Tests that pass stock and fail (or error) with herd."""
    return sorted(
        test
        for test, result in herd.results.items()
        if result.broken and test in stock.results and stock.results[test].ok
    )


def known_entry(full: str, known: dict[str, str]) -> str | None:
    """The entry of ``known`` that covers ``suite::test-id``, if any."""
    if full in known:
        return full
    base = full.split("[", 1)[0]
    return base if base in known else None


def stale_known(
    known: dict[str, str], listed: set[str], herd_runs: dict[str, Run], *, restricted: bool
) -> list[str]:
    """Entries of ``known`` for the suites run with herd that no failure used; in a run
    of part of a suite (``restricted``), only those covering a test that ran."""
    stale = []
    for entry in sorted(set(known) - listed):
        suite = entry.partition("::")[0]
        run = herd_runs.get(suite)
        if run is None:
            continue
        if restricted and not any(
            known_entry(f"{suite}::{ran}", {entry: ""}) for ran in run.results
        ):
            continue
        stale.append(entry)
    return stale


def table(rows: Iterable[Sequence[object]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header], *([str(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def report(
    runs: dict[tuple[str, str], Run],
    known: dict[str, str],
    alone: dict[str, dict[str, Result]],
    *,
    restricted: bool = False,
) -> int:
    """Print the comparison; the exit status."""
    status = 0
    rows = []
    for suite in SUITES:
        for mode in MODES:
            run = runs.get((suite.name, mode))
            if run is None:
                continue
            rows.append(
                (
                    suite.name,
                    mode,
                    run.count("passed"),
                    run.count("failed", "error"),
                    run.count("skipped", "xfailed", "xpassed"),
                    f"{run.seconds:.0f}s",
                    run.max_fds,
                    len(run.leftovers),
                )
            )
            if not run.results or run.returncode not in (0, 1):
                print(f"!! {suite.name} {mode}: pytest exited {run.returncode}; see {run.log}")
                status = 1
    header = ("suite", "run", "passed", "failed", "skipped", "time", "max fds", "left running")
    print()
    print(table(rows, header))

    for (name, mode), run in sorted(runs.items()):
        print(f"\n{name} {mode}: what the plugin saw")
        for what, n in run.seen.items():
            print(f"  {n:5d}  {what}")
        for line in run.leftovers:
            print(f"  left running (killed): {line}")

    listed: set[str] = set()
    for suite in SUITES:
        stock, herd = runs.get((suite.name, "stock")), runs.get((suite.name, "herd"))
        if stock is None or herd is None:
            continue
        failures = herd_only(stock, herd)
        print(f"\n{suite.name}: {len(failures)} herd-only failures (pass stock, fail with herd)")
        isolated = alone.get(suite.name, {})
        for test in failures:
            full = f"{suite.name}::{test}"
            reason = known_reason(full, known)
            if reason is not None:
                listed.add(full if full in known else full.split("[", 1)[0])
            mark = "known" if reason is not None else "NEW  "
            print(f"  {mark} {test}\n          {herd.results[test].message}")
            if test in isolated:
                again = isolated[test]
                verdict = "fails" if again.broken else "passes"
                print(f"          run alone with herd: {verdict} {again.message}".rstrip())
            if reason is None:
                status = 1
        if isolated:
            passing = sum(1 for r in isolated.values() if not r.broken)
            print(f"  run alone with herd: {len(isolated) - passing} fail, {passing} pass")
        fixed = sorted(
            test
            for test, result in herd.results.items()
            if result.ok and test in stock.results and stock.results[test].broken
        )
        for test in fixed:
            print(f"  (fails stock, passes with herd: {test})")
    herd_runs = {name: run for (name, mode), run in runs.items() if mode == "herd"}
    for test in stale_known(known, listed, herd_runs, restricted=restricted):
        print(f"\nlisted in {KNOWN.name} but not a herd-only failure in this run: {test}")
    verdict = "is" if not status else "is not"
    print(f"\n{'FAILED' if status else 'OK'}: every herd-only failure {verdict} listed in {KNOWN}")
    return status


# -- --ci: the herd run only, its failures rerun -----------------------------------------

FAILS_STOCK = "fails stock too"
HERD_ONLY = "herd-only"
ORDER = "order- or load-dependent"
NO_RESULT = "no rerun result"
#: The kinds that must be listed in ``known_differences.txt`` (else exit status 1).
MUST_BE_LISTED = (HERD_ONLY, NO_RESULT)
KINDS = (FAILS_STOCK, HERD_ONLY, ORDER, NO_RESULT)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Verdict:
    """What the reruns made of one test that failed in the full herd run."""

    kind: str  # one of KINDS
    full: Result  # in the full herd run
    stock: Result | None  # rerun stock, apart from the full run (None: no result)
    herd: Result | None  # rerun with herd, apart from the full run


def classify(
    full: dict[str, Result], stock: dict[str, Result], herd: dict[str, Result]
) -> dict[str, Verdict]:
    """Each test that failed (or errored) in the full herd run ``full``, judged by its
    reruns ``stock`` and ``herd``: fails stock too (whatever herd did), herd-only
    (passes stock, fails with herd), order- or load-dependent (passes both), or no
    rerun result (a rerun did not report it: treated as herd-only)."""
    verdicts: dict[str, Verdict] = {}
    for test, result in full.items():
        if not result.broken:
            continue
        again_stock, again_herd = stock.get(test), herd.get(test)
        if again_stock is not None and again_stock.broken:
            kind = FAILS_STOCK
        elif again_stock is None or again_herd is None:
            kind = NO_RESULT
        elif again_herd.broken:
            kind = HERD_ONLY
        else:
            kind = ORDER
        verdicts[test] = Verdict(kind=kind, full=result, stock=again_stock, herd=again_herd)
    return verdicts


def rerun(
    suite: Suite,
    tests: Sequence[str],
    *,
    each: bool,
    source: Path,
    site: Path,
    herd: Path,
    out: Path,
    timeout: float,
    limit: float,
) -> tuple[dict[str, dict[str, Result]], list[Run]]:
    """``tests`` run again stock and with herd, apart from the full run: one pytest per
    mode (in the full run's order), or with ``each`` one per test and mode. The results
    by mode, and the pytest runs."""
    out.mkdir(parents=True, exist_ok=True)
    how = "one pytest per test and mode" if each else "one pytest per mode"
    print(f"{suite.name}: rerunning {len(tests)} herd failures, stock and herd ({how})")
    batches = [[test] for test in tests] if each else [list(tests)]
    results: dict[str, dict[str, Result]] = {}
    runs: list[Run] = []
    for mode in MODES:
        results[mode] = {}
        for number, batch in enumerate(batches, 1):
            run = run_suite(
                suite,
                mode,
                source=source,
                site=site,
                herd=herd,
                out=out,
                timeout=timeout,
                limit=limit,
                tests=batch,
                label=f"rerun-{mode}-{number}" if each else f"rerun-{mode}",
                quiet=True,
            )
            runs.append(run)
            results[mode].update((test, run.results[test]) for test in batch if test in run.results)
        got = results[mode]
        broken = sum(1 for r in got.values() if r.broken)
        seconds = sum(r.seconds for r in runs if r.mode == mode)
        print(
            f"{suite.name} rerun {mode}: {len(got) - broken} pass, {broken} fail, "
            f"{len(tests) - len(got)} no result in {seconds:.0f}s",
            flush=True,
        )
    return results, runs


def report_ci(
    runs: dict[str, Run],
    reruns: dict[str, list[Run]],
    verdicts: dict[str, dict[str, Verdict]],
    known: dict[str, str],
    *,
    restricted: bool = False,
) -> int:
    """Print what ``--ci`` found: the herd runs (by suite), the reruns of their failures
    and the verdicts; the exit status."""
    status = 0
    rows: list[Sequence[object]] = []
    ended_badly: list[Run] = []
    for suite in SUITES:
        run = runs.get(suite.name)
        if run is None:
            continue
        groups = [("herd", [run])]
        for mode in MODES:
            groups.append(
                (f"rerun {mode}", [r for r in reruns.get(suite.name, []) if r.mode == mode])
            )
        for what, group in groups:
            if not group:
                continue
            rows.append(
                (
                    suite.name,
                    what,
                    sum(r.count("passed") for r in group),
                    sum(r.count("failed", "error") for r in group),
                    sum(r.count("skipped", "xfailed", "xpassed") for r in group),
                    f"{sum(r.seconds for r in group):.0f}s",
                    max(r.max_fds for r in group),
                    sum(len(r.leftovers) for r in group),
                )
            )
            ended_badly += [r for r in group if not r.results or r.returncode not in (0, 1)]
    header = ("suite", "run", "passed", "failed", "skipped", "time", "max fds", "left running")
    print()
    print(table(rows, header))
    for run in ended_badly:
        print(f"!! {run.suite.name} {run.log.stem}: pytest exited {run.returncode}; see {run.log}")
        status = 1

    for name, run in sorted(runs.items()):
        print(f"\n{name} herd: what the plugin saw")
        for what, n in run.seen.items():
            print(f"  {n:5d}  {what}")
        leftovers = [*run.leftovers, *(x for r in reruns.get(name, []) for x in r.leftovers)]
        for line in leftovers:
            print(f"  left running (killed): {line}")

    counts = []
    unlisted = 0
    listed: set[str] = set()
    warnings: list[str] = []
    for name in sorted(runs):
        judged = verdicts.get(name, {})
        by_kind = {kind: sorted(t for t, v in judged.items() if v.kind == kind) for kind in KINDS}
        new = 0
        for kind in (HERD_ONLY, NO_RESULT, ORDER, FAILS_STOCK):
            tests = by_kind[kind]
            if not tests:
                continue
            print(f"\n{name}: {len(tests)} {kind}")
            for test in tests:
                verdict = judged[test]
                entry = known_entry(f"{name}::{test}", known)
                if entry is not None and kind != FAILS_STOCK:
                    listed.add(entry)
                if kind in MUST_BE_LISTED:
                    mark = "known" if entry is not None else "NEW  "
                    new += entry is None
                elif kind == ORDER:
                    mark = "known" if entry is not None else "WARN "
                    if entry is None:
                        warnings.append(f"{name}::{test}")
                else:
                    mark = "     "
                print(f"  {mark} {test}\n          full herd run: {verdict.full.message}")
                for mode, again in (("stock", verdict.stock), ("herd", verdict.herd)):
                    if kind == FAILS_STOCK and mode == "herd":
                        continue
                    said = "no result" if again is None else f"{again.outcome} {again.message}"
                    print(f"          rerun {mode}: {said}".rstrip())
        unlisted += new
        counts.append(
            (
                name,
                len(judged),
                len(by_kind[FAILS_STOCK]),
                len(by_kind[HERD_ONLY]),
                len(by_kind[ORDER]),
                len(by_kind[NO_RESULT]),
                new,
            )
        )
    for test in stale_known(known, listed, runs, restricted=restricted):
        print(f"\nlisted in {KNOWN.name} but not a herd failure in this run: {test}")
    print()
    kinds_header = (
        "suite",
        "failed with herd",
        FAILS_STOCK,
        HERD_ONLY,
        ORDER,
        NO_RESULT,
        "not listed",
    )
    print(table(counts, kinds_header))
    if warnings:
        print(
            f"\nWARNING: {len(warnings)} tests not listed in {KNOWN.name} failed in the full "
            "herd run but passed when rerun, stock and with herd (order- or load-dependent; "
            "not an error):"
        )
        for test in warnings:
            name, _, test_id = test.partition("::")
            message = verdicts[name][test_id].full.message
            print(f"  {test}\n      {message}")
    if ended_badly:
        print(f"\nFAILED: {len(ended_badly)} pytest runs ended without results (see above)")
    if unlisted:
        print(f"\nFAILED: {unlisted} herd-only failures are not listed in {KNOWN}")
        status = 1
    elif not ended_badly:
        print(f"\nOK: every herd-only failure is listed in {KNOWN}")
    return status


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--suite",
        choices=[s.name for s in SUITES],
        action="append",
        help="run only this suite (repeatable); default: all",
    )
    parser.add_argument(
        "--mode",
        choices=MODES,
        action="append",
        help="run only stock or herd (repeatable); default: both",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="per-test timeout in seconds, where a test sets none",
    )
    parser.add_argument(
        "--limit", type=float, default=2400.0, help="time limit of one pytest run, in seconds"
    )
    parser.add_argument(
        "--isolate",
        action="store_true",
        help="run each herd-only failure again, alone in a pytest of its own (with herd), "
        "to tell a test's own failure from one caused by what earlier tests left behind",
    )
    parser.add_argument(
        "--ci",
        action="store_true",
        help="run with herd only; rerun each test that fails, stock and with herd, apart "
        "from that run, to tell herd-only failures (must be listed) from tests that fail "
        "stock too (ignored) and order- or load-dependent ones (a warning)",
    )
    parser.add_argument(
        "--rerun",
        choices=("batch", "each"),
        default="batch",
        help="--ci: rerun the failures in one pytest per mode (batch), or in one pytest "
        "per test and mode (each: slower, and truly alone)",
    )
    parser.add_argument(
        "--tests",
        action="append",
        metavar="ID",
        help="run only these test IDs or paths (relative to the sdist, say "
        "tests/services/api or tests/test_serverapp.py::test_misc) instead of the "
        "suite's; repeatable; needs one --suite",
    )
    parser.add_argument(
        "-k",
        dest="keyword",
        metavar="EXPR",
        help="run only the tests matching this pytest -k expression",
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="report the results a previous run left in the cache instead of running "
        "again (where there are some)",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("HERD_UPSTREAM_CACHE", REPO / "build" / "upstream")),
        help="sdists, unpacked tests, requirements, logs and results",
    )
    parser.add_argument("--known", type=Path, default=KNOWN, help="the expected herd-only failures")
    parser.add_argument(
        "--herd-source",
        type=Path,
        default=REPO,
        help="the folder holding the herd and herd_nb under test",
    )
    args = parser.parse_args(argv)
    suites = [s for s in SUITES if not args.suite or s.name in args.suite]
    if args.tests and len(suites) != 1:
        parser.error("--tests needs exactly one --suite")
    if args.ci and (args.mode or args.isolate):
        parser.error(
            "--ci runs with herd only and reruns the failures itself: no --mode, no --isolate"
        )
    modes = ["herd"] if args.ci else [m for m in MODES if not args.mode or m in args.mode]
    restricted = bool(args.tests or args.keyword)
    extra = ["-k", args.keyword] if args.keyword else []
    cache: Path = args.cache.resolve()
    out = cache / "runs"
    out.mkdir(parents=True, exist_ok=True)
    known = read_known(args.known)
    site = test_requirements(cache)
    started = time.monotonic()
    runs: dict[tuple[str, str], Run] = {}
    alone: dict[str, dict[str, Result]] = {}
    reruns: dict[str, list[Run]] = {}
    verdicts: dict[str, dict[str, Verdict]] = {}
    for suite in suites:
        source = sdist_tests(suite.dist, cache)
        common = {
            "source": source,
            "site": site,
            "herd": args.herd_source.resolve(),
            "timeout": args.timeout,
            "limit": args.limit,
        }
        for mode in modes:
            # A run of part of a suite has files of its own: --reuse never mistakes it
            # for a whole run, or the other way round.
            label = f"{mode}-part" if restricted else mode
            if args.reuse and (saved := saved_run(suite, mode, out, label)) is not None:
                runs[(suite.name, mode)] = saved
                continue
            run = run_suite(
                suite, mode, out=out, tests=args.tests or (), extra=extra, label=label, **common
            )
            runs[(suite.name, mode)] = run
            print(
                f"{suite.name} {mode}: {run.count('passed')} passed, "
                f"{run.count('failed', 'error')} failed in {run.seconds:.0f}s",
                flush=True,
            )
        stock, herd = runs.get((suite.name, "stock")), runs.get((suite.name, "herd"))
        if args.isolate and stock is not None and herd is not None:
            failures = herd_only(stock, herd)
            alone[suite.name] = isolate(suite, failures, herd.results, out=out / "alone", **common)
        if args.ci and herd is not None:
            failed = [test for test, result in herd.results.items() if result.broken]
            if failed:
                again, reruns[suite.name] = rerun(
                    suite, failed, each=args.rerun == "each", out=out / "ci", **common
                )
                verdicts[suite.name] = classify(herd.results, again["stock"], again["herd"])
    if args.ci:
        herd_runs = {name: run for (name, mode), run in runs.items() if mode == "herd"}
        status = report_ci(herd_runs, reruns, verdicts, known, restricted=restricted)
    else:
        status = report(runs, known, alone, restricted=restricted)
    print(f"total: {time.monotonic() - started:.0f}s; logs and results in {out}")
    return status


def isolate(
    suite: Suite,
    tests: Sequence[str],
    herd_results: dict[str, Result],
    *,
    source: Path,
    site: Path,
    herd: Path,
    out: Path,
    timeout: float,
    limit: float,
) -> dict[str, Result]:
    """``tests`` run alone with herd: one per test function and error (its first line,
    numbers aside), whose result stands for the others of its group."""
    out.mkdir(parents=True, exist_ok=True)
    groups: dict[tuple[str, str], list[str]] = {}
    for test in tests:
        key = (test.split("[", 1)[0], re.sub(r"\d+", "N", herd_results[test].message))
        groups.setdefault(key, []).append(test)
    results: dict[str, Result] = {}
    print(f"{suite.name}: running {len(groups)} herd-only failures alone", flush=True)
    for number, members in enumerate(groups.values(), 1):
        test = members[0]
        run = run_suite(
            suite,
            "herd",
            source=source,
            site=site,
            herd=herd,
            out=out,
            timeout=timeout,
            limit=limit,
            tests=[test],
            label=f"alone-{number}",
            quiet=True,
        )
        result = run.results.get(test)
        if result is None:
            message = f"no result (pytest exited {run.returncode}; see {run.log})"
            result = Result(outcome="error", message=message, fds=-1)
        results[test] = result
        for other in members[1:]:
            results[other] = dataclasses.replace(result, message=f"(as {test}) {result.message}")
    return results


if __name__ == "__main__":
    sys.exit(main())
