"""A Tornado worker for the proxy tests: HTTP echo, streaming bodies, SSE, WebSocket.

Usage: python web_worker.py PORT

Routes:
  /health                    200
  /echo...                   JSON: method, uri, path, query, headers, body length (any method)
  /answer-with?NAME=VALUE... GET: answers with those response headers (added to Tornado's)
  /upload                    streaming POST/PUT: JSON with byte count and sha256
  /download/N                N bytes of a repeating pattern, streamed in 64 KiB chunks
  /sse/N                     N server-sent events, 0.2 s apart
  /redirect?to=URL           302 to URL
  /status/CODE               an empty response with that status
  /sleep/SECONDS             answers after SECONDS
  /exit/CODE                 exits the process at once (no response)
  /state                     a per-process counter
  /last-close                the close code and reason of the last WebSocket
  /ws                        WebSocket echo; "close:CODE:REASON" closes with that code;
                             prefers subprotocol "herd.v2" over "herd.v1"; binary echoed as binary
  /ws-request                WebSocket whose first message is its handshake: JSON uri, query,
                             headers; any Origin accepted
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys

import tornado.web
import tornado.websocket

PATTERN = bytes(range(256)) * 256  # 64 KiB
counter = 0
last_close: dict[str, object] = {}


class Health(tornado.web.RequestHandler):
    def get(self) -> None:
        self.write("ok")


class Echo(tornado.web.RequestHandler):
    SUPPORTED_METHODS = ("GET", "HEAD", "POST", "DELETE", "PATCH", "PUT", "OPTIONS")

    def any(self) -> None:
        body = {
            "method": self.request.method,
            "uri": self.request.uri,
            "path": self.request.path,
            "query": self.request.query,
            "headers": dict(self.request.headers.get_all()),
            "header_list": list(self.request.headers.get_all()),
            "body_length": len(self.request.body),
        }
        self.set_header("Content-Type", "application/json")
        self.set_header("X-Worker-Pid", str(os.getpid()))
        self.add_header("Set-Cookie", "a=1")
        self.add_header("Set-Cookie", "b=2")
        self.write(json.dumps(body))

    get = head = post = delete = patch = put = options = any  # type: ignore[assignment]


@tornado.web.stream_request_body
class Upload(tornado.web.RequestHandler):
    def prepare(self) -> None:
        self.count = 0
        self.digest = hashlib.sha256()
        self.request.connection.set_max_body_size(2**40)  # type: ignore[union-attr]

    def data_received(self, chunk: bytes) -> None:
        self.count += len(chunk)
        self.digest.update(chunk)

    def post(self) -> None:
        self.write({"bytes": self.count, "sha256": self.digest.hexdigest()})

    put = post


class Download(tornado.web.RequestHandler):
    async def get(self, size: str) -> None:
        remaining = int(size)
        self.set_header("Content-Type", "application/octet-stream")
        if self.get_argument("length", "yes") == "yes":
            self.set_header("Content-Length", str(remaining))
        while remaining > 0:
            chunk = PATTERN[: min(remaining, len(PATTERN))]
            self.write(chunk)
            await self.flush()
            remaining -= len(chunk)


class Events(tornado.web.RequestHandler):
    async def get(self, count: str) -> None:
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        for i in range(int(count)):
            self.write(f"data: event {i}\n\n")
            await self.flush()
            await asyncio.sleep(0.2)


class Redirect(tornado.web.RequestHandler):
    def get(self) -> None:
        self.redirect(self.get_argument("to"))


class Status(tornado.web.RequestHandler):
    def get(self, code: str) -> None:
        self.set_status(int(code))


class Sleep(tornado.web.RequestHandler):
    async def get(self, seconds: str) -> None:
        await asyncio.sleep(float(seconds))
        self.write({"slept": float(seconds)})


class Exit(tornado.web.RequestHandler):
    def get(self, code: str) -> None:
        os._exit(int(code))


class State(tornado.web.RequestHandler):
    def get(self) -> None:
        global counter
        counter += 1
        self.write({"count": counter, "pid": os.getpid()})


class Socket(tornado.websocket.WebSocketHandler):
    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        for preferred in ("herd.v2", "herd.v1"):
            if preferred in subprotocols:
                return preferred
        return None

    def on_message(self, message: str | bytes) -> None:
        if isinstance(message, str) and message.startswith("close:"):
            _, code, reason = message.split(":", 2)
            self.close(int(code), reason)
            return
        self.write_message(message, binary=isinstance(message, bytes))

    def on_close(self) -> None:
        last_close.update(code=self.close_code, reason=self.close_reason)


class AnswerWith(tornado.web.RequestHandler):
    def get(self) -> None:
        for name, values in self.request.query_arguments.items():
            for value in values:
                self.add_header(name, value.decode())
        self.write({"ok": True})


class RequestSocket(tornado.websocket.WebSocketHandler):
    def check_origin(self, origin: str) -> bool:
        return True  # leaves Origin to the gateway in front, as many workers do

    def open(self, *args: str, **kwargs: str) -> None:
        request = {
            "uri": self.request.uri,
            "query": self.request.query,
            "headers": dict(self.request.headers.get_all()),
        }
        self.write_message(json.dumps(request))


class LastClose(tornado.web.RequestHandler):
    def get(self) -> None:
        self.write(dict(last_close))


async def main() -> None:
    port = int(sys.argv[1])
    app = tornado.web.Application(
        [
            (r"/health", Health),
            (r"/upload", Upload),
            (r"/download/(\d+)", Download),
            (r"/sse/(\d+)", Events),
            (r"/redirect", Redirect),
            (r"/status/(\d+)", Status),
            (r"/sleep/([\d.]+)", Sleep),
            (r"/exit/(\d+)", Exit),
            (r"/state", State),
            (r"/ws", Socket),
            (r"/ws-request", RequestSocket),
            (r"/answer-with", AnswerWith),
            (r"/last-close", LastClose),
            (r"/echo.*", Echo),
        ],
        websocket_max_message_size=256 * 1024 * 1024,
    )
    app.listen(port, address="127.0.0.1", max_body_size=2**40)
    print(f"web worker listening on 127.0.0.1:{port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
