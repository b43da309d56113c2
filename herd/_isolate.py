"""What herd's init does to a worker's namespaces before the worker runs.

Imported by herd's init (:mod:`herd._init`, run as a script with ``-I -S``) only
when the sandbox asks for more than namespaces, so it uses built-in modules and
:mod:`ctypes` only. The pool imports it for its names (:func:`options`).

Two levels, each asked for by options in front of the worker's command::

    _init.py --harden [--keep-caps 0,1,...] [--no-new-privs] [--user UID:GID[:NAME]]
             [--view --ro PATH ... --hide PATH ...] -- COMMAND...

``--harden`` (every sandboxed worker): in the worker's mount namespace ``/sys``
and every mount under it (the cgroup hierarchies) are read-only, so a worker
can neither leave its cgroups nor change a limit, its own or a neighbour's;
``/proc``'s kernel-wide knobs (``/proc/sys``, ``/proc/sysrq-trigger``, ...) are
read-only and its kernel-memory views masked, as Docker does. The worker keeps
only the capabilities in ``--keep-caps`` (none if empty): without
``CAP_SYS_ADMIN`` it cannot remount any of this.

``--view`` (tenant isolation): the worker sees a root of its own, built on a
tmpfs from read-only binds of ``--ro`` paths (system directories, its
interpreter, program and working directory), a fresh ``/proc``, a minimal
``/dev``, a private ``/tmp``, and
nothing else: not the host's ``/tmp``, other workers' directories, the pool's
files or ``/sys``. ``--hide`` paths inside a bound path are covered (secrets in
``/etc``). The way bubblewrap builds a sandbox's root: pivot into a tmpfs, bind
from the old root, pivot into the new root, detach the old one.

``--loopback`` brings up the loopback interface of a new network namespace.
``--home PATH`` gives a view an empty writable directory at ``PATH`` (owned by
``--user``) if nothing is bound there. ``--no-new-privs`` and ``--user`` apply
to the worker alone, between its fork and its exec; the init keeps its own
privileges (the worker cannot reach it: different capabilities, so no
``ptrace`` and no ``/proc/1/root``).
"""

# Built-in modules only at import: herd's init imports this at every isolated start.
import posix
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    import ctypes

# mount(2) and friends (linux/mount.h, linux/prctl.h)
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_NOATIME, _MS_NODIRATIME, _MS_RELATIME = 1024, 2048, 1 << 21
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_MNT_DETACH = 2
_PR_CAPBSET_DROP, _PR_SET_NO_NEW_PRIVS = 24, 38
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
# Per-mount flags that a remount must repeat (a user namespace may not clear them).
_KEPT = {
    "nosuid": _MS_NOSUID,
    "nodev": _MS_NODEV,
    "noexec": _MS_NOEXEC,
    "noatime": _MS_NOATIME,
    "nodiratime": _MS_NODIRATIME,
    "relatime": _MS_RELATIME,
}

# Docker's default capabilities less CAP_MKNOD (Docker relies on a devices
# cgroup that herd does not set up): what a root worker keeps under --harden.
DEFAULT_CAPS = (0, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 29, 31)
# Masked and read-only /proc paths, as Docker has them.
_PROC_MASKED = ("kcore", "keys", "latency_stats", "timer_list", "timer_stats", "sched_debug")
_PROC_MASKED_DIRS = ("acpi", "scsi")
_PROC_READONLY = ("sys", "sysrq-trigger", "irq", "bus", "fs")
_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")


class Plan:
    """The isolation options of one worker, as parsed from the init's argv."""

    def __init__(self) -> None:
        self.harden = False
        self.keep_caps: tuple[int, ...] | None = None  # None: leave capabilities alone
        self.no_new_privs = False
        self.user: tuple[int, int] | None = None
        self.user_name: str | None = None
        self.view = False
        self.ro: list[str] = []
        self.hide: list[str] = []
        self.home: str | None = None
        self.loopback = False


def parse(argv: list[str]) -> tuple[Plan, list[str]]:
    """The plan and the command from ``OPTIONS... -- COMMAND...``.

    :raises ValueError: an unknown option, a missing value or no ``--``.
    """
    plan = Plan()
    i = 0
    while i < len(argv) and argv[i] != "--":
        name = argv[i]
        if name in ("--harden", "--no-new-privs", "--view", "--loopback"):
            setattr(plan, name[2:].replace("-", "_"), True)
            i += 1
            continue
        if i + 1 >= len(argv):
            raise ValueError(f"{name} needs a value")
        value = argv[i + 1]
        if name == "--keep-caps":
            plan.keep_caps = tuple(int(c) for c in value.split(",") if c)
        elif name == "--user":
            uid, _, rest = value.partition(":")
            gid, _, user_name = rest.partition(":")
            plan.user = (int(uid), int(gid or uid))
            plan.user_name = user_name or None
        elif name in ("--ro", "--hide"):
            getattr(plan, name[2:]).append(value)
        elif name == "--home":
            plan.home = value
        else:
            raise ValueError(f"unknown option {name}")
        i += 2
    if i >= len(argv):
        raise ValueError("no -- before the command")
    return plan, argv[i + 1 :]


_libc: "ctypes.CDLL | None" = None
_proc = "/proc"  # where this process's /proc is (the old root's, while a view is built)


def _c() -> "ctypes.CDLL":
    global _libc
    if _libc is None:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _check(result: int, what: str) -> None:
    if result != 0:
        import ctypes

        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {posix.strerror(errno)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    enc = [s.encode() if s is not None else None for s in (source, target, fstype)]
    _check(
        _c().mount(enc[0], enc[1], enc[2], flags, data.encode() if data else None),
        f"mount {target}",
    )


def _unescape(field: str) -> str:
    """A path from /proc/self/mountinfo (octal escapes for space, tab, newline, \\)."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _mounts_under(prefix: str) -> list[tuple[str, int]]:
    """Mount points at or below ``prefix``, parents first, with their kept flags."""
    found = []
    with open(_proc + "/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = _unescape(fields[4])
            if point == prefix or point.startswith(prefix.rstrip("/") + "/"):
                flags = 0
                for option in fields[5].split(","):
                    flags |= _KEPT.get(option, 0)
                found.append((point, flags))
    return found


def _readonly(prefix: str) -> None:
    """Remount ``prefix`` and every mount below it read-only (in this namespace)."""
    for point, flags in _mounts_under(prefix):
        try:
            _mount(None, point, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | flags)
        except OSError:
            # A mount point hidden under another mount cannot be remounted; one
            # we cannot make read-only must not stay writable: cover it.
            if posix.access(point, posix.W_OK):
                _mount("tmpfs", point, "tmpfs", _MS_RDONLY | _MS_NOSUID | _MS_NODEV, "size=0")


def _bind_readonly(source: str, target: str) -> None:
    _mount(source, target, None, _MS_BIND | _MS_REC)
    _readonly(target)


def _harden(root: str) -> None:
    """``/sys`` read-only; ``/proc`` masked as Docker's is (under ``root``)."""
    if _is_dir(root + "/sys"):
        _readonly(root + "/sys")
    proc = root + "/proc"
    for name in _PROC_MASKED:
        if _exists(f"{proc}/{name}"):
            _bind_readonly(root + "/dev/null" if root else "/dev/null", f"{proc}/{name}")
    for name in _PROC_MASKED_DIRS:
        if _is_dir(f"{proc}/{name}"):
            _mount("tmpfs", f"{proc}/{name}", "tmpfs", _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
    for name in _PROC_READONLY:
        if _exists(f"{proc}/{name}"):
            _bind_readonly(f"{proc}/{name}", f"{proc}/{name}")


def _exists(path: str) -> bool:
    try:
        posix.stat(path)
    except OSError:
        return False
    return True


def _is_dir(path: str) -> bool:
    try:
        return posix.stat(path).st_mode & 0o170000 == 0o040000
    except OSError:
        return False


def _makedirs(path: str) -> None:
    parts = [p for p in path.split("/") if p]
    current = ""
    for part in parts:
        current += "/" + part
        try:
            posix.mkdir(current, 0o755)
        except FileExistsError:
            pass


def _mount_point(source: str, target: str) -> None:
    """Make ``target`` a directory or an empty file, as ``source`` is."""
    if _is_dir(source):
        _makedirs(target)
    else:
        _makedirs(target.rsplit("/", 1)[0])
        if not _exists(target):
            posix.close(posix.open(target, posix.O_CREAT | posix.O_WRONLY, 0o644))


def _place(old: str, new: str, path: str) -> None:
    """Bind ``old+path`` at ``new+path``, read-only; a symlink is copied as a symlink."""
    source = old + path
    try:
        link = posix.readlink(source)
    except OSError:
        link = None
    if link is not None:
        _makedirs((new + path).rsplit("/", 1)[0])
        if not _exists(new + path) and not _is_link(new + path):
            posix.symlink(link, new + path)
        return
    if not _exists(source):
        return
    _mount_point(source, new + path)
    _bind_readonly(source, new + path)


def _is_link(path: str) -> bool:
    try:
        return posix.lstat(path).st_mode & 0o170000 == 0o120000
    except OSError:
        return False


def _view(plan: Plan, cwd: str) -> None:
    """Pivot into a new root holding only what the plan binds (see the module)."""
    c = _c()
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    base = "/tmp"
    _mount("tmpfs", base, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755")
    posix.chdir(base)
    posix.mkdir("oldroot", 0o755)
    _check(c.syscall(_SYS_PIVOT_ROOT, b".", b"oldroot"), "pivot_root")
    posix.chdir("/")
    old, new = "/oldroot", "/newroot"
    global _proc
    _proc = old + "/proc"
    posix.mkdir(new, 0o755)
    _mount("tmpfs", new, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755")
    # /dev: the harmless devices, a private /dev/shm and pseudo-terminals.
    _makedirs(new + "/dev")
    _mount("tmpfs", new + "/dev", "tmpfs", _MS_NOSUID, "mode=0755")
    for name in _DEVICES:
        _mount_point(old + "/dev/" + name, new + "/dev/" + name)
        _mount(old + "/dev/" + name, new + "/dev/" + name, None, _MS_BIND)
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ):
        posix.symlink(target, f"{new}/dev/{name}")
    posix.mkdir(new + "/dev/shm", 0o1777)
    _mount("tmpfs", new + "/dev/shm", "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=1777")
    posix.mkdir(new + "/dev/pts", 0o755)
    try:
        options = "newinstance,ptmxmode=0666,mode=620"
        _mount("devpts", new + "/dev/pts", "devpts", _MS_NOSUID | _MS_NOEXEC, options)
    except OSError:  # no private pseudo-terminals: a program that asks for one is told so
        pass
    _makedirs(new + "/proc")
    _mount("proc", new + "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    _makedirs(new + "/tmp")
    _mount("tmpfs", new + "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=1777")
    # Parents before children: a bind inside another (or inside /tmp) lands on top.
    for path in sorted(plan.ro):
        _place(old, new, path)
    for path in plan.hide:
        target = new + path
        if _is_dir(target):
            _mount("tmpfs", target, "tmpfs", _MS_RDONLY | _MS_NOSUID | _MS_NODEV, "size=0")
        elif _exists(target):
            _mount(old + "/dev/null", target, None, _MS_BIND)
    # A home of its own where none is bound: empty, writable, gone with the worker.
    if plan.home and plan.home.startswith("/") and not _exists(new + plan.home):
        try:
            _makedirs(new + plan.home)
            if plan.user is not None:
                posix.chown(new + plan.home, plan.user[0], plan.user[1])
        except OSError:  # under a read-only bind: the worker has no home to write
            pass
    _harden(new)
    _proc = "/proc"
    posix.chdir(new)
    posix.mkdir("oldroot", 0o755)
    _check(c.syscall(_SYS_PIVOT_ROOT, b".", b"oldroot"), "pivot_root")
    posix.chdir("/")
    _check(c.umount2(b"/oldroot", _MNT_DETACH), "umount /oldroot")
    posix.rmdir("/oldroot")
    try:
        posix.chdir(cwd)
    except OSError:
        posix.chdir("/tmp")


# pivot_root has no glibc wrapper: its system call number, per architecture.
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "armv7l": 218, "ppc64le": 203, "s390x": 217}.get(
    posix.uname().machine, 155
)


def _loopback_up() -> None:
    """Bring ``lo`` up: a new network namespace has it, down."""
    c = _c()
    fd = c.socket(2, 2, 0)  # AF_INET, SOCK_DGRAM: any socket takes interface ioctls
    _check(0 if fd >= 0 else -1, "socket")
    try:
        import ctypes

        request = ctypes.create_string_buffer(b"lo", 40)  # struct ifreq
        _check(c.ioctl(fd, _SIOCGIFFLAGS, request), "SIOCGIFFLAGS lo")
        flags = int.from_bytes(request.raw[16:18], "little") | _IFF_UP
        ctypes.memmove(ctypes.addressof(request) + 16, flags.to_bytes(2, "little"), 2)
        _check(c.ioctl(fd, _SIOCSIFFLAGS, request), "SIOCSIFFLAGS lo")
    finally:
        posix.close(fd)


_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 1


def prepare(plan: Plan) -> None:
    """In the init, before the worker is forked: the loopback and the mounts.

    :raises OSError: a step failed (the init then exits: no worker runs
        without the isolation it was started with).
    """
    if plan.loopback:
        _loopback_up()
    if plan.view:
        _view(plan, posix.getcwd())
    elif plan.harden:
        _harden("")


def environment(plan: Plan, env: dict[bytes, bytes]) -> None:
    """The worker's environment, for ``--user``: its own ``HOME`` (``--home``),
    ``USER`` and ``LOGNAME``, as a login would set them."""
    if plan.user is None:
        return
    if plan.home:
        env[b"HOME"] = plan.home.encode()
    if plan.user_name:
        env[b"USER"] = env[b"LOGNAME"] = plan.user_name.encode()


def drop(plan: Plan) -> None:
    """In the worker's child, just before its exec: capabilities, user, no_new_privs."""
    c = _c()
    if plan.keep_caps is not None:
        keep = set(plan.keep_caps)
        try:
            with open("/proc/sys/kernel/cap_last_cap") as f:
                last = int(f.read())
        except (OSError, ValueError):
            last = 40
        for cap in range(last + 1):
            if cap not in keep:
                _check(c.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap}")
        c.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    if plan.user is not None:
        uid, gid = plan.user
        posix.setgroups([gid])
        posix.setgid(gid)
        posix.setuid(uid)
    if plan.no_new_privs:
        _check(c.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


if __name__ == "__main__":  # pragma: no cover - a module of the init, not a program
    sys.exit("herd: _isolate.py is imported by herd's init")
