"""A hostile tenant: an HTTP worker that runs whatever Python a request sends.

    python hostile.py PORT

``GET /health`` answers 200; ``POST /run`` executes the body as Python and
answers ``{"ok": bool, "out": printed text, "error": "Type: message"}``. The
adversarial tests (``tests/test_attacks.py``) send attacks through it.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import sys


class Handler(http.server.BaseHTTPRequestHandler):
    def reply(self, code: int, body: dict[str, object]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self.reply(200 if self.path == "/health" else 404, {"ok": self.path == "/health"})

    def do_POST(self) -> None:
        code = self.rfile.read(int(self.headers.get("Content-Length", "0"))).decode()
        out = io.StringIO()
        error = ""
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(code, "<attack>", "exec"), {"__name__": "__attack__"})
        except BaseException as exc:  # the attack's outcome is the answer
            error = f"{type(exc).__name__}: {exc}"
        self.reply(200, {"ok": not error, "out": out.getvalue(), "error": error})

    def log_message(self, format: str, *args: object) -> None:
        pass


if __name__ == "__main__":
    http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
