"""CI step "newest releases": herd's upstream-facing tests on the index's newest releases.

herd uses private internals of Tornado and the Jupyter packages
(tests/test_upstream_internals.py pins them). The main suite runs on what CI
installed; this step compares that with the newest release of each package on
the index and, if any is behind, runs the tests that touch upstream again in a
virtualenv over the host's packages that holds the newest releases, so a
release that breaks herd is seen the day it ships:

    installed versions ──┐
                         ├─ all equal ──> print them, skip (the suite ran on them)
    `pip index versions` ┘  index unreachable ──> say so, skip (never a failure)
                         └─ some behind ──> a venv over the host's packages:
                                            pip install NAME==NEWEST (those behind)
                                            python -m pytest SUBSET  (its status is ours)

The venv sees the host's site-packages (herd's editable install and everything
the suite above ran on) beneath its own, which holds only the newer releases
and whatever pip must upgrade with them: the packages that differ are exactly
those printed, and the install takes seconds, not the minutes a venv of the
whole Jupyter stack does. The newest releases are pinned exactly (``==``), past
herd's own upper bounds if need be: pip then warns that herd's requirements are
not met, and the tests say whether that bound can move. Only if the newest
releases cannot be installed together does it fall back to ``--upgrade`` within
herd's bounds (and says so).

Usage::

    python .ci/newest.py                         # the CI step
    python .ci/newest.py --compare-only          # print the comparison, exit 0/10
    python .ci/newest.py --newest traitlets=9.9  # pretend (testing this script)

Exit status: 0 skipped or passed, 1 the tests failed (or the venv could not be
made), 10 with ``--compare-only`` when some package is behind.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

PACKAGES = (
    "tornado",
    "jupyter_server",
    "jupyter_client",
    "ipykernel",
    "ipywidgets",
    "traitlets",
    "jupyterlab",
    "pyzmq",
)
# The canary (every private attribute herd uses), kernels over jupyter_client, and
# the proxy over Tornado: about a minute, so that CI stays well inside 30 minutes.
SUBSET = (
    "tests/test_upstream_internals.py",
    "tests/test_kernels.py",
    "tests/test_proxy.py",
)
ROOT = Path(__file__).resolve().parent.parent
INDEX_TIMEOUT = 60.0  # seconds per `pip index versions`
INSTALL_TIMEOUT = 600.0
TESTS_TIMEOUT = 720.0  # 12 minutes


def _normal(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_index_versions(name: str, output: str) -> str | None:
    """The newest version in ``pip index versions NAME``'s output (first line
    ``NAME (X.Y.Z)``; pip may spell the name otherwise, warnings may come first)."""
    for line in output.splitlines():
        match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s+\(([^()\s]+)\)\s*$", line)
        if match and _normal(match.group(1)) == _normal(name):
            return match.group(2)
    return None


def newest_on_index(name: str) -> tuple[str | None, str]:
    """``(version, "")``, or ``(None, why)`` when the index did not say."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "index",
        "versions",
        name,
        "--disable-pip-version-check",
        "--timeout",
        "15",
    ]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=INDEX_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    version = parse_index_versions(name, done.stdout)
    if version is None:
        lines = (done.stderr or done.stdout).strip().splitlines()
        return None, lines[-1] if lines else f"exit status {done.returncode}"
    return version, ""


def _key(version: str) -> tuple[object, ...]:
    try:
        from packaging.version import Version

        return (Version(version),)
    except Exception:  # no packaging, or not PEP 440: numbers, then the rest
        parts = re.findall(r"\d+|[A-Za-z]+", version)
        return tuple((0, int(p)) if p.isdigit() else (-1, p) for p in parts)


def behind(installed: str | None, newest: str) -> bool:
    """Whether ``newest`` is a later release than ``installed`` (not installed: yes)."""
    return installed is None or _key(newest) > _key(installed)


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def compare(
    packages: Sequence[str], pretend: dict[str, str]
) -> tuple[dict[str, tuple[str | None, str]], list[str]]:
    """``({name: (installed, newest)}, [names the index did not answer for])``."""
    found: dict[str, tuple[str | None, str]] = {}
    unknown: list[str] = []
    for name in packages:
        newest: str | None = pretend.get(_normal(name))
        if newest is None:
            newest, why = newest_on_index(name)
            if newest is None:
                print(f"  {name}: the index did not answer ({why})")
                unknown.append(name)
                continue
        found[name] = (installed_version(name), newest)
    return found, unknown


def _run(
    command: Sequence[str],
    timeout: float,
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> int:
    """Run ``command`` in a session of its own; past ``timeout`` (or on SIGTERM from
    the CI's own limit) its whole process group is killed. Returns its status."""
    print("$", " ".join(command), flush=True)
    process = subprocess.Popen(command, start_new_session=True, cwd=cwd, env=env)
    try:
        return int(process.wait(timeout=timeout))
    except subprocess.TimeoutExpired:
        print(f"timed out after {timeout:g} s", flush=True)
        return 124
    finally:
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()


def _venv_versions(python: Path, packages: Sequence[str]) -> dict[str, str | None]:
    code = (
        "import importlib.metadata as m, json, sys\n"
        "def v(n):\n"
        "    try: return m.version(n)\n"
        "    except m.PackageNotFoundError: return None\n"
        "print(json.dumps({n: v(n) for n in sys.argv[1:]}))\n"
    )
    out = subprocess.run(
        [str(python), "-c", code, *packages], capture_output=True, text=True, check=True
    )
    result: dict[str, str | None] = json.loads(out.stdout)
    return result


def run_on_newest(found: dict[str, tuple[str | None, str]], keep: bool, tests: list[str]) -> int:
    """Make the venv, install the newest releases, run the subset: its exit status."""
    directory = Path(tempfile.mkdtemp(prefix="herd-newest-"))
    started = time.monotonic()
    try:
        venv = directory / "venv"
        made = [sys.executable, "-m", "venv", "--system-site-packages", str(venv)]
        if _run(made, timeout=120):
            print("could not make the virtualenv")
            return 1
        python = venv / "bin" / "python"
        pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        late = [name for name, (installed, newest) in found.items() if behind(installed, newest)]
        pins = [f"{name}=={found[name][1]}" for name in late]
        if _run([*pip, "--upgrade", *pins], timeout=INSTALL_TIMEOUT, cwd=ROOT):
            print("the newest releases cannot be installed together: upgrading within bounds")
            if _run([*pip, "--upgrade", *late], timeout=INSTALL_TIMEOUT, cwd=ROOT):
                print("could not upgrade them either")
                return 1
        print(f"(venv ready in {time.monotonic() - started:.0f} s)")
        now = _venv_versions(python, list(found))
        print("versions that differ from the suite's above (host -> venv):")
        for name, (installed, _) in found.items():
            if now.get(name) != installed:
                print(f"  {name:16} {installed} -> {now.get(name)}")
        env = {**os.environ, "PYTHONNOUSERSITE": "1"}
        env.pop("COVERAGE_PROCESS_START", None)  # the host's coverage is not in the venv
        env.pop("PYTHONPATH", None)
        status = _run(
            [str(python), "-m", "pytest", "-p", "no:cacheprovider", *tests],
            timeout=TESTS_TIMEOUT,
            cwd=ROOT,
            env=env,
        )
        print(f"(newest releases: {time.monotonic() - started:.0f} s in all, status {status})")
        return 0 if status == 0 else 1
    finally:
        if keep:
            print(f"(kept {directory})")
        else:
            shutil.rmtree(directory, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--newest",
        action="append",
        default=[],
        metavar="NAME=VERSION",
        help="pretend the index's newest NAME is VERSION (to test this script)",
    )
    parser.add_argument(
        "--compare-only", action="store_true", help="print the comparison; exit 10 if behind"
    )
    parser.add_argument("--keep", action="store_true", help="keep the virtualenv")
    parser.add_argument(
        "--tests", nargs="+", default=list(SUBSET), help="what to run (default: the subset)"
    )
    args = parser.parse_args(argv)
    pretend = {}
    for item in args.newest:
        name, sep, version = item.partition("=")
        if not sep or not version:
            parser.error(f"--newest takes NAME=VERSION, not {item!r}")
        pretend[_normal(name)] = version
    # The CI's `timeout` sends SIGTERM: end as on Ctrl-C, so the venv is removed.
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    found, unknown = compare(PACKAGES, pretend)
    if not found:
        print("the package index cannot be reached: skipped")
        return 0
    width = max(map(len, found))
    late = {name: pair for name, pair in found.items() if behind(*pair)}
    for name, (installed, newest) in found.items():
        mark = "  <- behind" if name in late else ""
        print(f"  {name:{width}} installed {installed}, newest {newest}{mark}")
    if not late:
        skipped = f" ({', '.join(unknown)}: not compared)" if unknown else ""
        print(f"newest releases are installed: the suite above ran on them{skipped}")
        return 0
    if args.compare_only:
        return 10
    return run_on_newest(found, args.keep, args.tests)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM from the CI's time limit
        print("newest releases: interrupted (the virtualenv was removed)", file=sys.stderr)
        sys.exit(130)
