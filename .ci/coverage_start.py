"""Coverage for .ci/run: started in the processes of the suite that run herd's code.

``.ci/run`` installs a one-line ``.pth`` that runs this file in every Python
process that has ``HERD_COVERAGE_CONFIG`` (the path of pyproject.toml) in its
environment. It starts coverage (``coverage.process_startup``) in pytest's
process and in every ``herd serve`` the tests start, and in no other: not in
kernels, Jupyter servers or test workers, whose start-up and timing the tracer
would change (measuring every process made the suite 2.5 times slower and
timing-sensitive fidelity tests fail). ``COVERAGE_PROCESS_START`` is set only
for the call and removed after, so that coverage's own ``.pth`` does not start
it in the children; they come through here and are chosen by the same rule.

Each measured process writes its own data file (``parallel = true``) where
``COVERAGE_FILE`` says; ``.ci/run`` combines them after the suite.
"""

import os


def _argv() -> list[bytes]:
    try:
        with open("/proc/self/cmdline", "rb") as f:
            return f.read().rstrip(b"\0").split(b"\0")
    except OSError:
        return []


def measured(argv: list[bytes]) -> bool:
    """``python [options] -m pytest|herd ...``, or the ``herd``/``pytest`` scripts."""
    for i, arg in enumerate(argv[1:], 1):
        if arg == b"-m":
            return i + 1 < len(argv) and argv[i + 1] in (b"pytest", b"herd")
        if not arg.startswith(b"-"):  # a script: the console scripts' own
            return os.path.basename(arg) in (b"pytest", b"herd", b"py.test")
    return False


def start() -> None:
    config = os.environ.get("HERD_COVERAGE_CONFIG")
    if not config or not measured(_argv()):
        return
    import coverage

    os.environ["COVERAGE_PROCESS_START"] = config
    try:
        coverage.process_startup()
    finally:
        del os.environ["COVERAGE_PROCESS_START"]


start()
