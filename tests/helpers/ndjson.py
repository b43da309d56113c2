"""An HTTP/1.1 POST whose NDJSON answer is read line by line as it arrives, each
line stamped with the time it was received (and a connection the test may drop)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any


class Stream:
    """One request on its own connection; see :meth:`open`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self.status = 0
        self.headers: dict[str, str] = {}  # names in lower case
        self._chunked = False
        self._left: int | None = None  # bytes of a Content-Length body still to read
        self._buffer = b""
        self._ended = False
        self._stamp = 0.0  # when the last piece of the body arrived

    @classmethod
    async def open(
        cls,
        port: int,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Stream:
        """POST ``body`` (as JSON, or the bytes ``raw``) and read the status and headers."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        data = raw if raw is not None else json.dumps(body).encode()
        lines = [
            f"POST {path} HTTP/1.1",
            f"Host: 127.0.0.1:{port}",
            "Content-Type: application/json",
            f"Content-Length: {len(data)}",
            "Connection: close",
        ]
        if token is not None:
            lines.append(f"Authorization: token {token}")
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + data)
        stream = cls(reader, writer)
        status = await asyncio.wait_for(reader.readline(), 30)
        stream.status = int(status.split()[1])
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            stream.headers[name.strip().lower()] = value.strip()
        stream._chunked = stream.headers.get("transfer-encoding") == "chunked"
        if "content-length" in stream.headers:
            stream._left = int(stream.headers["content-length"])
        return stream

    async def _chunk(self) -> bytes:
        """The next piece of the body as it came off the wire; ``b""`` at its end."""
        if self._ended:
            return b""
        if self._chunked:
            size = int((await self._reader.readline()).strip() or b"0", 16)
            if size == 0:
                await self._reader.readline()
                self._ended = True
                return b""
            data = await self._reader.readexactly(size)
            await self._reader.readexactly(2)
            return data
        if self._left is not None:
            data = await self._reader.read(self._left) if self._left else b""
            self._left -= len(data)
        else:
            data = await self._reader.read(65536)
        self._ended = not data or self._left == 0
        return data

    async def events(self, timeout: float = 30) -> AsyncIterator[tuple[float, dict[str, Any]]]:
        """Each line's JSON object with the ``time.monotonic()`` it arrived at (the
        arrival of the piece of the body that completed it)."""
        try:
            while True:
                while b"\n" in self._buffer:
                    line, self._buffer = self._buffer.split(b"\n", 1)
                    yield self._stamp, json.loads(line)
                chunk = await asyncio.wait_for(self._chunk(), timeout)
                if not chunk:
                    break
                self._stamp = time.monotonic()
                self._buffer += chunk
        finally:
            self.close()  # read to the end, or abandoned

    async def all(self, timeout: float = 30) -> list[dict[str, Any]]:
        """Every event, until the answer ends."""
        return [event async for _, event in self.events(timeout)]

    async def json(self) -> Any:
        """The whole body as one JSON document (an error's)."""
        data = b""
        try:
            while chunk := await asyncio.wait_for(self._chunk(), 30):
                data += chunk
        finally:
            self.close()
        return json.loads(data)

    def close(self) -> None:
        """Drop the connection (the client going away)."""
        self._writer.close()
