"""Process isolation for workers: what the machine allows, detected once.

Every worker, sandboxed or not, gets

- its own process group (``setsid``), so closing it signals its whole group;
- a parent-death signal (``PR_SET_PDEATHSIG`` = SIGKILL), so it dies with the
  thread that spawned it even if the pool's process is SIGKILLed.

A parent-death signal covers only the direct child. A worker that double-forks
a daemon would leave the daemon behind, so with ``sandbox=True`` the worker also
runs in a PID namespace of its own (util-linux ``unshare --pid --fork
--kill-child``): when the namespace's PID 1 dies the kernel kills every process
in it, and ``--kill-child`` ties PID 1 to the ``unshare`` process that carries
the parent-death signal. PID 1 is herd's init (:mod:`herd._init`), not the
worker: PID 1 is special (the kernel drops signals it has no handler for, and
orphans become its children to reap), and a worker should not have to know how
to be one. So::

    pool process --(PDEATHSIG)--> unshare --(--kill-child)--> init = PID 1
                                                                 \\-- parent = PID 2
                                                                       \\-- worker = PID 3
                                                                             \\-- what it forks

The init reaps orphans, forwards the signals sent to the launcher's process
group (interrupts, a close's SIGTERM) to the worker's, and exits with the
worker's exit code (128+N for death by signal N, which :func:`returncode`
turns back into ``-N``). The worker runs in a session of its own, so it gets
each such signal once, from the init. Its parent is the init's fork, PID 2,
not PID 1: a process whose parent is PID 1 has lost its parent, and some act
on that (ipykernel exits). All of them run inside the worker's cgroups, joined
before ``unshare`` is exec'd.

As root the namespace also gets a mount namespace with its own ``/proc``, so a
worker cannot see other workers' processes. Without root the namespaces come
from an unprivileged user namespace where the kernel allows it.

Before the worker starts, the init applies :mod:`herd._isolate`: with limits
(and always for tenants) ``/sys`` and the cgroups read-only and a container's
capabilities, so the limits cannot be undone; with ``isolation="tenant"`` a
filesystem view of its own, no capabilities and ``no_new_privs``, and (from
``unshare --net``) a network of its own that the pool reaches through
:mod:`herd._netns`.

The detected level is ``full`` (everything the isolation asks for),
``partial`` (some of it: a PID namespace through a user namespace, a network
not isolated, a user not applied) or ``none`` (process group and parent-death
signal only), each with the reason; :func:`detect` caches the namespaces per
process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal

from ._isolate import DEFAULT_CAPS
from ._procfs import children

if TYPE_CHECKING:
    from ._cgroups import WorkerCgroup

__all__ = [
    "Isolation",
    "Launch",
    "Network",
    "Sandbox",
    "SandboxLevel",
    "SandboxMode",
    "SandboxReport",
    "detect",
    "hidden_paths",
    "init_command",
    "init_ready",
    "launch_prefix",
    "launcher_tools",
    "namespaces",
    "network_namespaces",
    "resolve_user",
    "returncode",
    "view_paths",
]

log = logging.getLogger("herd.sandbox")

SandboxMode = bool | Literal["required"]
SandboxLevel = Literal["full", "partial", "none"]
#: ``"process"``: a worker is contained (its namespaces, its limits, which it
#: cannot undo); ``"tenant"``: it is also kept from everything that is not its
#: own (a filesystem view of its own, no capabilities, its own network).
Isolation = Literal["process", "tenant"]
#: A tenant's network: its own (``"private"``) or the host's (``"host"``).
Network = Literal["private", "host"]

# The init exits with 128+N when signal N killed the worker: 129 up to this.
_LAST_EXIT_BY_SIGNAL = 128 + int(signal.SIGRTMAX)


@dataclasses.dataclass(frozen=True)
class SandboxReport:
    """What isolation workers get on this machine, and why not more.

    :param level: ``"full"``, ``"partial"`` or ``"none"``.
    :param reason: a sentence a user can act on.
    :param prefix: the argv prefix that puts a worker into its namespaces,
        under herd's init (empty without namespaces).
    """

    level: SandboxLevel
    reason: str
    prefix: tuple[str, ...] = ()


def _probe(prefix: list[str]) -> str | None:
    """Run ``true`` under ``prefix``; ``None`` if it worked, else why not."""
    try:
        done = subprocess.run(
            [*prefix, "true"], capture_output=True, timeout=10, check=False, text=True
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    if done.returncode != 0:
        return done.stderr.strip() or f"exit code {done.returncode}"
    return None


def init_command() -> tuple[str, ...]:
    """The argv prefix that runs a command under herd's init (:mod:`herd._init`).

    The init runs on this very interpreter, isolated (``-I``: no ``PYTHON*``
    variables, no user site) and without ``site`` (``-S``): it needs nothing
    but built-in modules, and every import would be paid at every spawn (so
    would an import of the init itself: run as a script, it starts sooner).
    Empty if this interpreter cannot be started again (no ``sys.executable``).
    """
    if not sys.executable:
        return ()
    here = os.path.dirname(os.path.abspath(__file__))
    return (sys.executable, "-I", "-S", os.path.join(here, "_init.py"))


@functools.cache
def detect() -> SandboxReport:
    """Find out once which namespaces this process can give its workers."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return SandboxReport("none", "util-linux 'unshare' is not installed")
    init = init_command()
    if not init:
        return SandboxReport("none", "no Python interpreter to run the init (sys.executable)")
    base = [unshare, "--pid", "--fork", "--kill-child"]
    if os.geteuid() == 0:
        full = [*base, "--mount-proc", *init]
        why = _probe(full)
        if why is None:
            return SandboxReport("full", "PID and mount namespaces (root)", tuple(full))
        root_why = f"PID namespace refused as root: {why}"
    else:
        root_why = "not root"
    user = [*base, "--user", "--map-root-user", "--mount-proc", *init]
    why = _probe(user)
    if why is None:
        return SandboxReport(
            "partial", f"{root_why}; PID namespace through a user namespace", tuple(user)
        )
    return SandboxReport("none", f"{root_why}; user namespaces refused: {why}")


def returncode(report: SandboxReport, launcher: int, output: Sequence[str] = ()) -> int:
    """The worker's exit code (negative: killed by that signal) from its launcher's.

    :param report: the sandbox the worker was started in.
    :param launcher: the launcher's return code, as :class:`subprocess.Popen` has it.
    :param output: the last lines the launcher wrote (``unshare`` explains itself there).
    """
    if not report.prefix:
        return launcher
    if launcher == 1 and any("sigprocmask unblock failed" in line for line in output):
        # unshare re-raises the signal that killed PID 1, except SIGKILL, which
        # it cannot unblock: it says so and exits 1.
        return -signal.SIGKILL
    if 128 < launcher <= _LAST_EXIT_BY_SIGNAL:
        # The init's "killed by signal N" (PID 1 cannot die of a signal of its
        # own). A worker that exits with such a code itself reads the same, as
        # in a shell's $?.
        return 128 - launcher
    return launcher


def init_ready(launcher: int) -> bool:
    """Whether the init under ``launcher`` is up, so that a signal to the
    launcher's process group reaches the worker.

    The init blocks the signals it forwards before it forks, so a child of the
    init is the sign: from then on they are queued. (Until then the kernel
    drops signals that PID 1 has no handler for.)
    """
    return any(children(init) for init in children(launcher))


def namespaces(sandbox: SandboxMode) -> SandboxReport:
    """The namespaces a worker gets in this mode (none with ``sandbox=False``)."""
    if sandbox is False:
        return SandboxReport("none", "disabled (sandbox=False)")
    return detect()


#: Whether sandboxed workers with limits (and tenants) get :mod:`herd._isolate`'s
#: ``--harden`` (read-only /sys and cgroups, masked /proc, a container's
#: capabilities). Always, but for the tests that show what a worker could do
#: without it.
HARDEN = True


# The launcher's fast path: util-linux's setpriv sets the parent-death signal,
# then dash joins the cgroups, checks that the parent is still the pool (it may
# have died before the signal was set) and execs the worker. Dash because it
# leaves the environment as it found it, except PWD, which the script puts
# back ("-": PWD was not set; "=VALUE": it was); bash would add SHLVL.
_LAUNCH_SCRIPT = (
    "p=$1 w=$2; shift 2; case $w in -) unset PWD ;; *) PWD=${w#=} ;; esac; "
    'while [ "$1" != -- ]; do echo 0 >"$1" || '
    '{ echo "herd: cannot join the worker\'s cgroup $1" >&2; exit 125; }; shift; done; shift; '
    '[ "$PPID" = "$p" ] || exit 125; exec "$@"'
)


@functools.cache
def launcher_tools() -> tuple[str, str] | None:
    """``setpriv`` and ``dash`` for the launcher's fast path, if both work here.

    Without them the launcher is herd's init in its ``--launch`` mode, which
    starts an interpreter (a few milliseconds more per spawn).
    """
    setpriv, dash = shutil.which("setpriv"), shutil.which("dash")
    if setpriv is None or dash is None:
        return None
    try:
        done = subprocess.run(
            [setpriv, "--pdeathsig", "KILL", "--", dash, "-c", "exit 0"],
            capture_output=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (setpriv, dash) if done.returncode == 0 else None  # util-linux < 2.33: no option


def launch_prefix(
    join: Sequence[str] = (), env: Mapping[str, str] | None = None
) -> tuple[str, ...]:
    """The argv prefix that starts a worker's command the way herd does.

    The launcher is the process the pool forks; before it execs the command
    (or the sandbox's ``unshare``) it

    - sets its parent-death signal to SIGKILL (it dies with the thread that
      forked it: the pool's event loop thread);
    - writes itself into each of ``join`` (``cgroup.procs`` files), so that the
      command never runs outside its limits;
    - exits (125) if its parent is already gone.

    This is what a ``preexec_fn`` did, without running Python code between
    ``fork`` and ``exec`` in a process that has threads, which CPython warns
    is unsafe; and without ``preexec_fn``, ``subprocess`` may use ``vfork``,
    so a spawn no longer copies the page tables of a large pool process.

    :param join: ``cgroup.procs`` files to join.
    :param env: the environment the command gets (``os.environ`` if ``None``):
        the launcher passes it on exactly as given.
    """
    env = os.environ if env is None else env
    parent = str(os.getpid())
    tools = launcher_tools()
    if tools is None:
        init = init_command()
        if not init:
            from ._exceptions import SpawnError

            raise SpawnError(
                "cannot start workers: no setpriv and dash, and no Python interpreter "
                "(sys.executable) to run herd's launcher"
            )
        return (*init, "--launch", parent, *join, "--")
    setpriv, dash = tools
    pwd = "=" + env["PWD"] if "PWD" in env else "-"
    script = (dash, "-c", _LAUNCH_SCRIPT, "herd-launch")
    return (setpriv, "--pdeathsig", "KILL", "--", *script, parent, pwd, *join, "--")


def warn_once(report: SandboxReport) -> None:
    """Log the sandbox level once per process when workers run without namespaces."""
    if report.level != "full" and not _warned.get(report.reason):
        _warned[report.reason] = True
        log.warning("herd sandbox: %s (%s)", report.level, report.reason)


_warned: dict[str, bool] = {}


@functools.cache
def network_namespaces() -> str | None:
    """``None`` if workers can get network namespaces of their own that this
    process can still reach, else why not."""
    from ._netns import available

    why_not = available()
    if why_not is not None:
        return why_not
    unshare = shutil.which("unshare")
    if unshare is None:
        return "util-linux 'unshare' is not installed"
    return _probe([unshare, "--net"])


def _home_of(uid: int) -> str:
    import pwd

    return pwd.getpwuid(uid).pw_dir


def resolve_user(user: str | int) -> tuple[str, int, int]:
    """``(name, uid, gid)`` of a user given by name or UID, as an int or as text
    (its primary group).

    :raises ValueError: no such user.
    """
    import pwd

    try:
        if isinstance(user, int):
            entry = pwd.getpwuid(user)
        else:
            try:
                entry = pwd.getpwnam(user)
            except KeyError:
                if not user.isdigit():  # a UID given as text ("65534", from a flag)
                    raise
                entry = pwd.getpwuid(int(user))
    except (KeyError, OverflowError):
        raise ValueError(f"no such user: {user!r}") from None
    return entry.pw_name, entry.pw_uid, entry.pw_gid


# What a tenant's worker sees of the host, read-only: the system's directories.
_SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
# Secrets under them that it does not see (covered in its view).
_SECRETS = (
    "/etc/shadow",
    "/etc/shadow-",
    "/etc/gshadow",
    "/etc/gshadow-",
    "/etc/sudoers",
    "/etc/sudoers.d",
    "/etc/ssh",
    "/etc/ssl/private",
    "/etc/jupyter",
)


@functools.cache
def _interpreter_paths() -> tuple[str, ...]:
    """This interpreter's prefixes and import path (editable installs included)."""
    found = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]
    found += [entry for entry in sys.path if entry and os.path.isdir(entry)]
    return tuple(dict.fromkeys(os.path.realpath(path) for path in found))


def _covered(path: str, by: Sequence[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in by)


# Folders that hold other people's things: a program or a working directory
# right in one of them is bound alone, never the whole folder.
_SHARED = frozenset(
    {
        "/",
        "/tmp",
        "/var/tmp",
        "/dev/shm",
        "/run",
        "/var",
        "/home",
        "/root",
        "/mnt",
        "/media",
        "/srv",
        "/opt",
    }
)


def view_paths(argv: Sequence[str], cwd: str, env: Mapping[str, str] | None) -> list[str]:
    """What a tenant's worker sees read-only: the system directories, its program
    (the command and any argument that is a file, with their directories), the
    interpreter running it, this interpreter and its import path, and ``cwd``.

    A file right in a shared folder (``/tmp/app.py``, ``/home/x``) is bound alone,
    and a working directory that is such a folder not at all: binding ``/tmp``
    would show the worker every other one's files there.
    """
    paths = [path for path in _SYSTEM if os.path.lexists(path)]
    search = (env if env is not None else os.environ).get("PATH")
    program = shutil.which(argv[0], path=search) if argv else None
    candidates = [program] if program else []
    files = [os.path.join(cwd, arg) for arg in argv[1:]]
    candidates += [path for path in files if os.path.isfile(path)]
    for candidate in candidates:
        real = os.path.realpath(candidate)
        folder = os.path.dirname(real)
        if os.path.basename(real).startswith("python"):
            folder = os.path.dirname(folder)  # a Python's prefix: bin/.. holds lib/
        paths.append(real if folder in _SHARED else folder)
    paths += [path for path in _interpreter_paths() if path not in _SHARED]
    real_cwd = os.path.realpath(cwd)
    if real_cwd not in _SHARED:
        paths.append(real_cwd)
    kept: list[str] = []
    for path in sorted(dict.fromkeys(paths), key=len):
        if not _covered(path, kept):
            kept.append(path)
    return kept


def hidden_paths(folders: Sequence[str]) -> list[str]:
    """What a tenant's worker does not see inside what it sees: secrets under
    /etc, and the hidden entries (``.env``, ``.ssh``, ``.git``: where a program's
    own secrets are kept) of ``folders`` (its working directory, its program's)."""
    found = [path for path in _SECRETS if os.path.lexists(path)]
    for folder in folders:
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        found += [os.path.join(folder, name) for name in sorted(names) if name.startswith(".")]
    return found


@dataclasses.dataclass(frozen=True)
class Launch:
    """How one worker process starts: what isolation it gets, its cgroup (if
    any) and the argv prefix to put in front of its command."""

    report: SandboxReport
    cgroup: WorkerCgroup | None
    prefix: tuple[str, ...]
    #: The worker gets a network namespace of its own: reach it through
    #: :class:`herd._netns.NetNamespace` of its launcher.
    own_network: bool = False

    async def discard(self) -> None:
        """Remove the cgroup of a worker that did not start (off the event loop)."""
        if self.cgroup is not None:
            await asyncio.to_thread(self.cgroup.remove)


class Sandbox:
    """The isolation plan shared by every worker of one factory.

    Namespaces from :func:`detect`, the launcher from :func:`launch_prefix`,
    cgroup limits from :mod:`herd._cgroups`. Factories of any kind of worker
    (processes, Jupyter kernels) use it the same way::

        launch = await sandbox.launch(name, env)  # raises, or warns once
        Popen([*launch.prefix, *argv], env=env, start_new_session=True)
        ...                                       # on failure: await launch.discard()

    Everything that may block (detection runs probe processes; creating and
    sweeping cgroups may wait on the kernel) runs off the event loop.

    :param mode: ``True``, ``False`` or ``"required"``.
    :param isolation: ``"process"`` or ``"tenant"`` (see :data:`Isolation`).
    :param user: run workers as this user (a name or a UID), with its primary
        group; needs root.
    :param network: a tenant's network: ``"private"`` (its own, loopback only)
        or ``"host"`` (the host's: for workers that must reach the outside, such
        as an API; they can then reach each other's ports too).
    :raises ValueError: a bad mode, isolation, network, limit or user.
    """

    def __init__(
        self,
        mode: SandboxMode = True,
        *,
        cpu_limit: float | None = None,
        memory_limit: int | None = None,
        pids_limit: int | None = None,
        isolation: Isolation = "process",
        user: str | int | None = None,
        network: Network = "private",
    ) -> None:
        from ._cgroups import Limits

        if mode not in (True, False, "required"):
            raise ValueError(f"sandbox must be True, False or 'required', not {mode!r}")
        if isolation not in ("process", "tenant"):
            raise ValueError(f"isolation must be 'process' or 'tenant', not {isolation!r}")
        if network not in ("private", "host"):
            raise ValueError(f"network must be 'private' or 'host', not {network!r}")
        self.network: Network = network
        self.mode: SandboxMode = mode
        self.limits = Limits.validated(cpu_limit, memory_limit, pids_limit)
        self.isolation: Isolation = isolation
        self.user = resolve_user(user) if user is not None else None
        #: The user's home (its HOME when workers run as that user).
        self.user_home = _home_of(self.user[1]) if self.user is not None else None
        self._prepared = False
        self._preparing = threading.Lock()

    @property
    def report(self) -> SandboxReport:
        """``full``: namespaces, and cgroups for the configured limits; ``partial``:
        part of that; ``none``: process group and parent-death signal only.

        The first call in a process detects (a few probe processes); later calls
        are cheap.
        """
        from ._cgroups import detect as detect_cgroups

        found = namespaces(self.mode)
        level, reasons = found.level, [found.reason]
        tenant = self.isolation == "tenant"
        prefix = found.prefix
        if prefix and self._hardened:
            caps = "no capabilities, no_new_privs" if tenant else "a container's capabilities"
            reasons.append(f"/sys and the cgroups read-only, /proc masked, {caps}")
        if prefix and tenant:
            reasons.append(
                "a filesystem view of its own (system directories, its interpreter, program "
                "and working directory read-only; a private /tmp)"
            )
            why_not = network_namespaces() if self.network == "private" else None
            if self.network == "host":
                level = "partial" if level == "full" else level
                reasons.append(
                    "network NOT isolated: the host's, as asked (network='host'): workers "
                    "can reach each other's ports and the host's services"
                )
            elif why_not is None:
                # unshare moves itself into the new network (and IPC, UTS)
                # namespaces; the init brings the loopback up.
                prefix = (prefix[0], "--net", "--ipc", "--uts", *prefix[1:])
                reasons.append("a network of its own (loopback only)")
            else:
                level = "partial" if level == "full" else level
                reasons.append(f"network NOT isolated: {why_not}")
        elif tenant:
            reasons.append("tenant isolation NOT possible without namespaces")
        if self.user is not None:
            name, uid, gid = self.user
            if prefix and os.geteuid() == 0:
                reasons.append(f"as user {name} ({uid}:{gid})")
            else:
                level = "partial" if level == "full" else level
                reasons.append(f"user {name!r} NOT applied: needs root and namespaces")
        if self.limits:
            groups = detect_cgroups()
            if groups.version is None:
                level = "partial" if level == "full" else level
                reasons.append(f"limits NOT enforced: {groups.reason}")
            else:
                reasons.append(f"limits by {groups.reason}")
        return SandboxReport(level, "; ".join(reasons), prefix)

    @property
    def _hardened(self) -> bool:
        """Whether workers get ``--harden``: when they have limits to keep, and
        always as tenants. (Without limits a worker keeps root's capabilities, as
        any process of a root server has: a notebook can then start a sandboxed
        pool of its own.)"""
        return HARDEN and (self.isolation == "tenant" or bool(self.limits))

    def check(self) -> SandboxReport:
        """The report; raises for ``"required"`` short of full, else warns once.

        :raises herd.SpawnError: ``mode="required"`` and the sandbox is not full.
        """
        from ._exceptions import SpawnError

        report = self.report
        if self.mode == "required" and report.level != "full":
            raise SpawnError(f"sandbox='required' but it is {report.level}: {report.reason}")
        if self.mode is not False:
            warn_once(report)
        return report

    def prepare(self) -> None:
        """Detect what this machine allows and sweep the cgroups of pools that
        were killed; once per sandbox, blocking (:meth:`launch` runs it in a thread)."""
        from ._cgroups import detect as detect_cgroups
        from ._cgroups import sweep_stale

        with self._preparing:
            if self._prepared:
                return
            _ = self.report  # detects namespaces (and the network's, for tenants)
            launcher_tools()
            groups = detect_cgroups()
            if groups.version is not None:
                for path in sweep_stale(groups):
                    log.info("removed stale worker cgroup %s", path)
            self._prepared = True

    def cgroup(self, name: str) -> WorkerCgroup | None:
        """A new worker cgroup with the limits (``None`` without limits or cgroups);
        blocking.

        :raises herd.SpawnError: the cgroup could not be created.
        """
        from ._cgroups import WorkerCgroup, owner_prefix
        from ._cgroups import detect as detect_cgroups
        from ._exceptions import SpawnError

        groups = detect_cgroups()
        if not self.limits or groups.version is None:
            return None
        try:
            return WorkerCgroup(groups, owner_prefix() + name, self.limits)
        except OSError as exc:
            raise SpawnError(f"cannot create the worker's cgroup: {exc}") from exc

    async def launch(
        self,
        name: str,
        env: Mapping[str, str] | None = None,
        *,
        argv: Sequence[str] = (),
        cwd: str | None = None,
    ) -> Launch:
        """Plan one worker's start: check the sandbox, create its cgroup (named
        after ``name``), build the launcher for ``env`` (see :func:`launch_prefix`).

        With ``isolation="tenant"`` the worker sees only what it needs: ``argv``
        (its command, to find its program and interpreter) and ``cwd`` (its
        working directory, read-only). Finding those reads the filesystem, so a
        tenant's plan is made in a thread.

        Call it on the thread that will fork the worker: the launcher checks
        that its parent is this process, and dies with that thread.

        :raises herd.SpawnError: ``mode="required"`` and the sandbox is not full,
            or the cgroup could not be created.
        """
        if not self._prepared:
            await asyncio.to_thread(self.prepare)
        report = self.check()
        cgroup = await asyncio.to_thread(self.cgroup, name) if self.limits else None
        try:
            prefix = launch_prefix(cgroup.procs_files if cgroup else (), env)
        except BaseException:
            if cgroup is not None:
                await asyncio.to_thread(cgroup.remove)
            raise
        where = cwd or os.getcwd()
        if self.isolation == "tenant":
            options = await asyncio.to_thread(self._init_options, report, argv, where, env)
        else:
            options = self._init_options(report, argv, where, env)
        own_network = "--net" in report.prefix
        return Launch(report, cgroup, (*prefix, *report.prefix, *options), own_network)

    def _init_options(
        self,
        report: SandboxReport,
        argv: Sequence[str],
        cwd: str,
        env: Mapping[str, str] | None,
    ) -> tuple[str, ...]:
        """What herd's init does before the worker runs (:mod:`herd._isolate`)."""
        if not report.prefix:
            return ()
        tenant = self.isolation == "tenant"
        options: list[str] = []
        if self._hardened:
            caps = "" if tenant else ",".join(map(str, DEFAULT_CAPS))
            options += ["--harden", "--keep-caps", caps]
        if "--net" in report.prefix:
            options.append("--loopback")
        if tenant:
            options += ["--no-new-privs", "--view"]
            seen = view_paths(argv, cwd, env)
            for path in seen:
                options += ["--ro", path]
            own = [p for p in seen if os.path.isdir(p) and not _covered(p, _SYSTEM)]
            for path in hidden_paths(own):
                options += ["--hide", path]
        home = (env if env is not None else os.environ).get("HOME")
        if self.user is not None and os.geteuid() == 0:
            name, uid, gid = self.user
            options += ["--user", f"{uid}:{gid}:{name}"]
            home = self.user_home
        if home and (tenant or self.user is not None):
            options += ["--home", home]
        return (*options, "--") if options else ()
