"""herd in one screen: sessions pinned to worker processes.

Run it with ``python examples/quickstart.py``. It starts a pool of small HTTP
workers (an embedded Python program that counts the requests it has served),
sends requests for three sessions, and shows that every request of a session
reaches the same worker process, which keeps its state between requests.
"""

from __future__ import annotations

import asyncio
import json
import sys

import herd

# The embedded default worker: any program that serves HTTP on a port will do.
WORKER = r"""
import http.server, json, os, sys
served = 0
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        global served
        if self.path != "/health":
            served += 1
        body = json.dumps({"served": served, "pid": os.getpid()}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


async def main() -> None:
    factory = herd.ProcessFactory([sys.executable, "-c", WORKER, "{port}"])
    async with herd.Pool(factory, min_workers=1, max_workers=3, ttl=60) as pool:
        print(f"{'request':>7}  {'session':<8} {'worker':<6} {'address':<16} {'served':>6}")
        for request, session_id in enumerate(["alice", "bob", "alice", "carol", "bob", "alice"], 1):
            async with pool.acquire(session_id) as session:
                reply = json.loads((await session.worker.client.get("/")).body)
                worker = session.worker
                print(
                    f"{request:>7}  {session_id:<8} {worker.id:<6} {worker.address:<16} "
                    f"{reply['served']:>6}"
                )

        print("\nalice always reached the same worker, which remembered her requests.")
        await pool.release("alice")
        async with pool.acquire("dave") as session:
            print(
                f"after release('alice'), new session dave got recycled worker {session.worker.id}"
            )

        stats = pool.stats()
        print(
            f"\npool: {stats.total_workers} workers, {stats.active_sessions} sessions, "
            f"{stats.available_workers} idle; "
            f"node {stats.node.available_memory_bytes >> 20} MiB free"
        )
        for row in stats.workers:
            rss = f"{row.rss_bytes >> 20} MiB" if row.rss_bytes else "?"
            print(
                f"  {row.id:<6} pid {row.pid:<7} {row.state:<7} session={row.session_id} rss={rss}"
            )
    print("pool closed: every worker stopped.")


if __name__ == "__main__":
    asyncio.run(main())
