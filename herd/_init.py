"""herd's init: PID 1 of a worker's PID namespace, so that the worker is not.

Run as a script by the sandbox's launcher, in front of the worker's command, on
the pool's interpreter (:func:`herd._sandbox.init_command`); the pool's process
never imports it::

    unshare --pid --fork --kill-child [--mount-proc] python -I -S _init.py CMD ARGS...
      \\-- init, PID 1          in the launcher's process group: gets its signals
            \\-- parent, PID 2  a fork of the init, in a process group of its own
                  \\-- CMD, PID 3: the worker, in a session of its own
                        \\-- what the worker starts; orphans are re-parented to PID 1

What it does, as ``docker run --init`` (tini) does:

- **reaps** every process re-parented to it, so orphans leave no zombie;
- **forwards** every signal it gets (SIGINT from an interrupt, SIGTERM from a
  close, ...) to the worker's process group, as ``tini -g`` does. The worker
  starts a session of its own (as a stock Jupyter kernel does), so a signal to
  the launcher's process group reaches it exactly once: through the init;
- **exits** as soon as the worker has exited, with its exit code, or 128+N if
  signal N killed it (PID 1 cannot die of a signal it sends itself). That tears
  the namespace down: the kernel SIGKILLs whatever is left in it.

The worker's parent is not the init but PID 2, a fork of it that waits for the
worker and passes its exit status on. On a plain host a process whose parent
becomes PID 1 has lost its parent, and programs act on that: ipykernel, given
``JPY_PARENT_PID``, shuts down at once when ``os.getppid()`` is 1. So the worker
sees a plain host: its PID is not 1, its parent is alive and not PID 1, signals
it sends itself take their default actions, its orphans are reaped.

The worker gets the environment the init was exec'd with, read back from
``/proc/self/environ`` (Python's start-up may add ``LC_CTYPE`` when it coerces a
C locale), and SIGPIPE and SIGXFSZ at their defaults (Python ignores them at
start-up; :class:`subprocess.Popen` resets them for a child in the same way).

Run as ``_init.py --launch PARENT FILE... -- COMMAND...`` it is herd's launcher
instead, where util-linux's ``setpriv`` or ``dash`` is missing
(:func:`herd._sandbox.launch_prefix`): it sets its parent-death signal, joins
the worker's cgroups and execs the command (``unshare``, when sandboxed).

Start-up cost is Python's own (``-I -S``: no ``site``, no ``PYTHON*``
variables) and little more: only built-in modules are imported (``posix`` and
``_signal`` rather than ``os`` and ``signal``, which import ``enum`` and more).
"""

# No `from __future__ import annotations` and no `typing`: every import here is
# paid at every worker start (`typing` alone costs ~10 ms).
import posix
import sys

TYPE_CHECKING = False  # mypy takes any name TYPE_CHECKING as true
if TYPE_CHECKING:  # typeshed describes the C module only as `signal`
    import signal as _signal
    from types import ModuleType
else:
    import _signal

# Raised by the kernel for a fault of this very process: never waited for, so
# that a bug in the init shows instead of hanging it (tini leaves out the same).
_SYNCHRONOUS = frozenset(
    {
        _signal.SIGABRT,
        _signal.SIGBUS,
        _signal.SIGFPE,
        _signal.SIGILL,
        _signal.SIGSEGV,
        _signal.SIGSYS,
        _signal.SIGTRAP,
        _signal.SIGTTIN,
        _signal.SIGTTOU,
    }
)
# Python ignores these at start-up; the worker gets them at their defaults.
_RESET = (_signal.SIGPIPE, _signal.SIGXFSZ)
_ENOENT, _ENOEXEC = 2, 8  # `errno` would be one more import
_PR_SET_PDEATHSIG = 1


def _environment() -> dict[bytes, bytes]:
    """The environment this process was exec'd with, before Python changed it."""
    try:
        with open("/proc/self/environ", "rb") as f:
            entries = f.read().split(b"\0")
    except OSError:  # no /proc: Python's own view is the next best
        return dict(posix.environ)
    env: dict[bytes, bytes] = {}
    for entry in entries:
        name, equals, value = entry.partition(b"=")
        if equals and name:
            env[name] = value
    return env


def _exit_code(status: int) -> int:
    """The shell's convention: the exit code, or 128+N for a death by signal N."""
    code = posix.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _exec(command: list[str], env: dict[bytes, bytes]) -> OSError:
    """Exec ``command``, looked up on ``PATH`` as ``execvp`` does; the error if
    every candidate failed."""
    name = command[0]
    if "/" in name:
        candidates = [name.encode()]
    else:
        path = env.get(b"PATH", b"/bin:/usr/bin").split(b":")
        candidates = [(folder or b".") + b"/" + name.encode() for folder in path]
    failure: OSError | None = None
    for candidate in candidates:
        try:
            try:
                posix.execve(candidate, command, env)
            except OSError as exc:
                if exc.errno != _ENOEXEC:
                    raise
                # No #! line: a shell script, as execvp (and so unshare) runs it.
                script: list[bytes | str] = [b"/bin/sh", candidate, *command[1:]]
                posix.execve(b"/bin/sh", script, env)
        except OSError as exc:
            # As execvp: the first error that is not "no such file" is the one
            # that counts (a binary found but not executable, say).
            if failure is None or isinstance(failure, (FileNotFoundError, NotADirectoryError)):
                failure = exc
    assert failure is not None
    return failure


def _spawn(command: list[str], mask: set[int], plan: "object | None" = None) -> int:
    """Start the worker in a session of its own; its PID.

    Fork and exec rather than ``posix_spawn``, which leaves glibc's internal
    signals (32 and 33) ignored in the new program.

    :raises OSError: the command could not be exec'd.
    """
    env = _environment()
    if plan is not None:
        _isolation().environment(plan, env)
    read_end, write_end = posix.pipe()  # close-on-exec: EOF says the exec worked
    pid = posix.fork()
    if pid == 0:  # single-threaded: any code is safe between fork and exec
        try:
            posix.close(read_end)
            posix.setsid()
            for signum in _RESET:
                _signal.signal(signum, _signal.SIG_DFL)
            _signal.pthread_sigmask(_signal.SIG_SETMASK, mask)
            if plan is not None:
                try:
                    _isolation().drop(plan)
                except OSError as exc:  # "D": the drop failed, not the exec
                    posix.write(write_end, f"D{exc.errno or 1}".encode())
                    posix._exit(126)
            failure = _exec(command, env)
            posix.write(write_end, str(failure.errno).encode())
        finally:
            posix._exit(127)
    posix.close(write_end)
    with open(read_end, "rb") as report:
        answer = report.read()
    if answer:
        posix.waitpid(pid, 0)
        errno = int(answer.lstrip(b"D"))
        if answer.startswith(b"D"):
            why = "cannot drop the worker's privileges or switch to its user"
            raise OSError(errno, f"{why}: {posix.strerror(errno)}")
        raise OSError(errno, posix.strerror(errno))
    return pid


def _parent(command: list[str], mask: set[int], report: int, plan: "object | None") -> int:
    """PID 2: start the worker, tell the init its PID, wait for it; its exit code."""
    # Out of the launcher's process group: signals to that group reach the init
    # only, which forwards them. All signals stay blocked here (from the init).
    posix.setpgid(0, 0)
    try:
        worker = _spawn(command, mask, plan)
    except OSError as exc:  # as unshare would have said it
        print(f"herd init: failed to execute {command[0]}: {exc.strerror}", file=sys.stderr)
        return 127 if exc.errno == _ENOENT else 126
    posix.write(report, str(worker).encode())
    posix.close(report)
    _, status = posix.waitpid(worker, 0)
    return _exit_code(status)


def _init(parent: int, worker: int | None, waited: set[int]) -> int:
    """PID 1: forward signals, reap, and return once the parent has exited."""
    while True:
        signum = _signal.sigwaitinfo(waited).si_signo
        if signum != _signal.SIGCHLD:
            if worker is not None:
                try:
                    posix.kill(-worker, signum)
                except OSError:  # the worker's group is gone: its exit is on its way
                    pass
            continue
        while True:  # one SIGCHLD may stand for many exits
            try:
                pid, status = posix.waitpid(-1, posix.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid == parent:
                return _exit_code(status)


def _launch(argv: list[str]) -> int:
    """``--launch PARENT FILE... -- COMMAND...``: herd's launcher where setpriv
    or dash is missing (:func:`herd._sandbox.launch_prefix`). Set the parent-death
    signal, join the cgroups (``FILE``: ``cgroup.procs`` files), check that the
    parent is still ``PARENT``, exec ``COMMAND``; an exit code if that failed."""
    import ctypes  # only here: the init's own start stays free of it

    try:
        cut = argv.index("--")
        parent, join, command = int(argv[0]), argv[1:cut], argv[cut + 1 :]
    except (ValueError, IndexError):
        print("herd launch: usage: _init.py --launch PARENT [FILE...] -- COMMAND", file=sys.stderr)
        return 2
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, _signal.SIGKILL, 0, 0, 0)
    if posix.getppid() != parent:  # it died before the signal was set
        return 125
    for path in join:
        try:
            fd = posix.open(path, posix.O_WRONLY)
            try:
                posix.write(fd, b"0")  # "0": the writing process itself
            finally:
                posix.close(fd)
        except OSError as exc:
            print(f"herd: cannot join the worker's cgroup {path}: {exc.strerror}", file=sys.stderr)
            return 125
    for signum in _RESET:
        _signal.signal(signum, _signal.SIG_DFL)
    failure = _exec(command, _environment())
    print(f"herd launch: failed to execute {command[0]}: {failure.strerror}", file=sys.stderr)
    return 127 if failure.errno == _ENOENT else 126


def _isolation() -> "ModuleType":
    """:mod:`herd._isolate`, imported from beside this script (``-I`` keeps the
    script's directory off ``sys.path``)."""
    if "_isolate" not in sys.modules:
        sys.path.insert(0, __file__.rpartition("/")[0] or ".")
    import _isolate  # type: ignore[import-not-found]

    return _isolate  # type: ignore[no-any-return]


def main(command: list[str]) -> int:
    """Run ``command`` as the worker; return the exit code for this process."""
    if command[:1] == ["--launch"]:
        return _launch(command[1:])
    waited = {int(signum) for signum in _signal.valid_signals()} - _SYNCHRONOUS
    # Blocked before anything else: a signal that comes before the init waits
    # for it is queued, not lost (the kernel drops signals that PID 1 neither
    # handles nor blocks). The worker gets the mask the init started with.
    mask = _signal.pthread_sigmask(_signal.SIG_BLOCK, waited)
    plan = None
    if command[:1] and command[0].startswith("--"):  # isolation options, then --
        isolation = _isolation()
        try:
            plan, command = isolation.parse(command)
            isolation.prepare(plan)
        except (OSError, ValueError) as exc:
            print(f"herd init: cannot isolate the worker: {exc}", file=sys.stderr)
            return 125
    if not command:
        print("herd init: usage: _init.py COMMAND [ARG...]", file=sys.stderr)
        return 2
    # An ignored SIGCHLD (inherited) would reap children behind our back.
    _signal.signal(_signal.SIGCHLD, _signal.SIG_DFL)
    read_end, write_end = posix.pipe()
    parent = posix.fork()
    if parent == 0:
        posix.close(read_end)
        return _parent(command, mask, write_end, plan)
    posix.close(write_end)
    with open(read_end, "rb") as report:  # EOF: the parent could not start the worker
        answer = report.read()
    return _init(parent, int(answer) if answer else None, waited)


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stderr.flush()
    # At once: finalizing the interpreter costs milliseconds, and the worker's
    # exit is noticed outside only once the init has gone.
    posix._exit(code)
