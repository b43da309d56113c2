"""An HTTP echo gateway: ``herd serve`` in front of a tiny stateful echo server.

Run it::

    python examples/echo_gateway.py            # listens on http://127.0.0.1:8080

then, in another shell::

    curl -H 'X-Session-ID: alice' localhost:8080/hello     # alice's worker, request 1
    curl -H 'X-Session-ID: alice' localhost:8080/again     # same worker, request 2
    curl -H 'X-Session-ID: bob'   localhost:8080/hello     # another worker
    curl localhost:8080/herd/stats                          # the pool, as JSON

Each worker echoes the method, path and body with its PID and a per-process
request count, so you can see the session → worker pinning. Ctrl-C stops the
gateway and every worker. It is exactly::

    herd serve --port 8080 --min 1 --max 5 --ttl 15m --health-path /health -- \\
        python examples/echo_gateway.py --worker {port}
"""

from __future__ import annotations

import http.server
import json
import os
import sys

from herd.cli import main

served = 0


class Echo(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _reply(self) -> None:
        global served
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.path != "/health":
            served += 1
        reply = (
            json.dumps(
                {
                    "pid": os.getpid(),
                    "served": served,
                    "method": self.command,
                    "path": self.path,
                    "body": body.decode("utf-8", "replace"),
                }
            ).encode()
            + b"\n"
        )
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _reply

    def log_message(self, format: str, *args: object) -> None:
        pass


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2])), Echo).serve_forever()
    else:
        port = sys.argv[1] if len(sys.argv) > 1 else "8080"
        sys.exit(
            main(
                [
                    "serve",
                    "--port",
                    port,
                    "--min",
                    "1",
                    "--max",
                    "5",
                    "--ttl",
                    "15m",
                    "--health-path",
                    "/health",
                    "--",
                    sys.executable,
                    os.path.abspath(__file__),
                    "--worker",
                    "{port}",
                ]
            )
        )
