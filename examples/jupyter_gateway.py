"""A multi-tenant Jupyter gateway: every session gets its own ``jupyter server``.

The Python counterpart of running one browser or model server per user: each
session ID (the first path segment) is pinned to its own ``jupyter server``
process, with its own kernels and its own root directory, and every HTTP and
WebSocket request of the session (REST API, kernel channels) goes there.

Needs jupyter_server (``pip install jupyter_server ipykernel``). Run::

    python examples/jupyter_gateway.py                  # http://127.0.0.1:8888

then::

    curl localhost:8888/alice/api/status                # alice's server
    curl -X POST localhost:8888/alice/api/kernels       # a kernel in alice's server
    curl localhost:8888/bob/api/kernels                 # bob's server: no kernels

herd strips the session segment before forwarding and rewrites redirects
under it, so the REST and WebSocket APIs (what jupyter_client, JupyterLab's
services and kernel gateways use) work per tenant. Servers are started before
any session is pinned to them, so they cannot know their session's URL: pages
of the classic HTML UI, whose links are absolute, are not rewritten. Token
authentication is off here (put it in front of the gateway) and each tenant's
root directory is a fresh temporary one.
The command it runs is::

    herd serve --port 8888 --session-path --health-path /api --start-timeout 60s \\
        --min 1 --max 4 --ttl 30m -- python examples/jupyter_gateway.py --tenant {port}
"""

from __future__ import annotations

import os
import sys
import tempfile

from herd.cli import main


def tenant(port: str) -> None:
    """One tenant's jupyter server (run by herd, once per session)."""
    root = tempfile.mkdtemp(prefix="herd-tenant-")
    argv = [
        sys.executable,
        "-m",
        "jupyter_server",
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        "--port-retries=0",
        f"--ServerApp.root_dir={root}",
        "--IdentityProvider.token=",
        "--ServerApp.password=",
        "--ServerApp.disable_check_xsrf=True",
    ]
    if os.geteuid() == 0:
        argv.append("--allow-root")
    os.execv(sys.executable, argv)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--tenant"]:
        tenant(sys.argv[2])
    else:
        port = sys.argv[1] if len(sys.argv) > 1 else "8888"
        sys.exit(
            main(
                [
                    "serve",
                    "--port",
                    port,
                    "--session-path",
                    "--health-path",
                    "/api",
                    "--start-timeout",
                    "60s",
                    "--min",
                    "1",
                    "--max",
                    "4",
                    "--ttl",
                    "30m",
                    "--",
                    sys.executable,
                    os.path.abspath(__file__),
                    "--tenant",
                    "{port}",
                ]
            )
        )
