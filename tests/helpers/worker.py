"""A tiny HTTP worker for herd's tests, driven by environment variables.

Routes: /health, /pid (this process's PID as seen by the host... and inside),
/state (a per-process counter: proof of affinity), /env/NAME, /exit/CODE,
/sleep/SECONDS, /ps (PIDs this process can see), /daemon (the PID of a
double-forked grandchild it started at boot, if WORKER_DOUBLE_FORK=1), /alloc/MIB
(hold that much more memory), /forkbomb/MOST[/hold] (fork sleepers until refused; hold: keep the
request's thread too, so that no PID slot is left),
/spin/SECONDS (busy-loop), /ids (its PID, parent PID, process group and session),
/orphans/N (start N shell background jobs that outlive their shell, as
``subprocess.run("sleep 0.2 &", shell=True)`` does; their PIDs),
/raise/SIGNAME (answer, then send itself that signal).

Start-up behaviour:
  WORKER_EXIT_AT_START=CODE   print a line to stderr and exit with CODE at once
  WORKER_NEVER_HEALTHY=1      serve, but /health answers 503
  WORKER_DOUBLE_FORK=1        start a daemon (double fork + setsid) that sleeps forever
  WORKER_HEALTH_FILE=PATH     /health answers 503 while PATH exists
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time

PORT = int(sys.argv[1] if len(sys.argv) > 1 else os.environ["PORT"])
counter = 0
lock = threading.Lock()
hoard: list[bytearray] = []


def fork_until_refused(most: int) -> int:
    """Fork sleeping children until the kernel refuses (or ``most``); return how many."""
    forked = 0
    while forked < most:
        try:
            pid = os.fork()
        except OSError:
            break
        if pid == 0:
            time.sleep(3600)
            os._exit(0)
        forked += 1
    return forked


daemon_pid: int | None = None


def double_fork() -> int:
    read, write = os.pipe()
    first = os.fork()
    if first == 0:
        os.setsid()
        second = os.fork()
        if second == 0:
            os.close(read)
            os.write(write, str(os.getpid()).encode())
            os.close(write)
            for fd in (0, 1, 2):
                os.close(fd)
            while True:
                time.sleep(3600)
        os._exit(0)
    os.close(write)
    os.waitpid(first, 0)
    pid = int(os.read(read, 32))
    os.close(read)
    return pid


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def reply(self, code: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        global counter
        parts = self.path.strip("/").split("/")
        route = parts[0]
        if route == "health":
            marker = os.environ.get("WORKER_HEALTH_FILE")
            if os.environ.get("WORKER_NEVER_HEALTHY") or (marker and os.path.exists(marker)):
                self.reply(503, {"ok": False})
            else:
                self.reply(200, {"ok": True})
        elif route == "pid":
            self.reply(200, {"pid": os.getpid(), "port": PORT})
        elif route == "state":
            with lock:
                counter += 1
                value = counter
            self.reply(200, {"count": value, "pid": os.getpid()})
        elif route == "env":
            self.reply(200, {"value": os.environ.get(parts[1])})
        elif route == "exit":
            self.reply(200, {"exiting": True})
            self.wfile.flush()
            os._exit(int(parts[1]))
        elif route == "sleep":
            time.sleep(float(parts[1]))
            self.reply(200, {"slept": float(parts[1])})
        elif route == "ps":
            pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
            self.reply(200, {"pids": pids})
        elif route == "daemon":
            self.reply(200, {"pid": daemon_pid})
        elif route == "alloc":
            hoard.append(bytearray(int(parts[1]) << 20))  # touched: zero-filled pages
            for block in hoard[-1:]:
                for i in range(0, len(block), 4096):
                    block[i] = 1
            self.reply(200, {"held_mib": sum(len(b) for b in hoard) >> 20})
        elif route == "forkbomb":
            self.reply(200, {"forked": fork_until_refused(int(parts[1]))})
            if parts[2:] == ["hold"]:  # keep this thread, and its PID slot, for good
                self.wfile.flush()
                time.sleep(3600)
        elif route == "spin":
            deadline = time.monotonic() + float(parts[1])
            while time.monotonic() < deadline:
                pass
            self.reply(200, {"spun": float(parts[1])})
        elif route == "ids":
            pid = os.getpid()
            ids = {"pid": pid, "ppid": os.getppid(), "pgid": os.getpgid(0), "sid": os.getsid(0)}
            self.reply(200, ids)
        elif route == "orphans":
            orphans = []
            for _ in range(int(parts[1])):
                shell = "sleep 0.2 >/dev/null 2>&1 & echo $!"
                done = subprocess.run(shell, shell=True, capture_output=True, text=True)
                orphans.append(int(done.stdout))
            self.reply(200, {"pids": orphans})
        elif route == "raise":
            self.reply(200, {"raising": parts[1]})
            self.wfile.flush()
            os.kill(os.getpid(), signal.Signals[parts[1]])
        else:
            self.reply(404, {"error": "no such route"})


def main() -> None:
    global daemon_pid
    code = os.environ.get("WORKER_EXIT_AT_START")
    if code is not None:
        print(f"worker: refusing to start (exit {code})", file=sys.stderr, flush=True)
        sys.exit(int(code))
    if os.environ.get("WORKER_DOUBLE_FORK"):
        daemon_pid = double_fork()
    print(f"worker listening on 127.0.0.1:{PORT}", flush=True)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
