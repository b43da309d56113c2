"""Sockets in a worker's network namespace, made from the pool's process.

A tenant's worker runs in a network namespace of its own: it has a loopback
interface and nothing else, so it cannot reach another worker, the gateway, or
any other service of the host, and nothing outside can reach it. The pool
still connects to it, at the same ``127.0.0.1:PORT`` as ever, through sockets
created *inside* that namespace: a socket belongs for good to the namespace it
was created in, wherever it is used afterwards. So :meth:`NetNamespace.socket`
switches the calling thread into the worker's namespace (``setns``), creates
the socket and switches back, all between two statements of the event loop's
thread: about 5 µs, once per new connection (keep-alive connections are reused).

``setns`` into a network namespace needs ``CAP_SYS_ADMIN`` (the pool runs as
root); :func:`available` says whether this process may.
"""

from __future__ import annotations

import ctypes
import functools
import os
import socket
import threading

__all__ = ["NetNamespace", "available"]

_CLONE_NEWNET = 0x40000000
_home = threading.local()  # per thread: the namespace it came from (setns is per thread)


def _home_fd() -> int:
    fd: int | None = getattr(_home, "fd", None)
    if fd is None:
        fd = _home.fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    return fd


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


@functools.cache
def available() -> str | None:
    """``None`` if this process can make sockets in other network namespaces,
    else why not."""
    if os.geteuid() != 0:
        return "not root: the gateway cannot enter a worker's network namespace"
    if not hasattr(_libc(), "setns"):  # pragma: no cover - glibc has had it since 2.14
        return "no setns() in the C library"
    if _inode("/proc/self/ns/net") is None:
        return "no /proc/self/ns/net"
    return None


class NetNamespace:
    """The network namespace of one process (a worker's launcher), once it has one.

    :param pid: a process that is (or is about to be) in the worker's namespace:
        ``unshare --net`` moves itself into the new namespace before it forks.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._fd: int | None = None
        self._closed = False  # for good: the PID may belong to another process now
        self._lock = threading.Lock()

    def ready(self) -> bool:
        """Whether the process has left the pool's namespace (and the namespace is
        held open: it outlives the process, for connections still open to it)."""
        if self._fd is not None:
            return True
        if self._closed:
            return False
        path = f"/proc/{self.pid}/ns/net"
        own = _inode("/proc/self/ns/net")
        if _inode(path) in (None, own):
            return False
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        if os.fstat(fd).st_ino == own:  # the process exec'd again in between
            os.close(fd)
            return False
        self._fd = fd
        return True

    def socket(self, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """A new socket in the worker's namespace.

        :raises OSError: the worker has no namespace of its own yet (it is still
            starting: as a refused connection, try again) or it could not be entered.
        """
        if not self.ready():
            raise ConnectionRefusedError(f"process {self.pid} has no network namespace yet")
        assert self._fd is not None
        libc = _libc()
        home = _home_fd()
        with self._lock:
            if libc.setns(self._fd, _CLONE_NEWNET) != 0:
                code = ctypes.get_errno()
                raise OSError(code, f"cannot enter the worker's network: {os.strerror(code)}")
            try:
                return socket.socket(family, kind)
            finally:
                if libc.setns(home, _CLONE_NEWNET) != 0:  # pragma: no cover
                    # Left in a worker's network, this thread would connect every
                    # later socket there: nothing may run on.
                    os.abort()

    def close(self) -> None:
        """Let go of the namespace (the kernel frees it with its last user), for
        good: once the process is reaped its PID may name another process, in
        another worker's namespace."""
        self._closed = True
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __repr__(self) -> str:
        return f"<NetNamespace of pid {self.pid} {'held' if self._fd is not None else 'pending'}>"
