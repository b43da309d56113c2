"""Routes under ``{base_url}herd/``; every one requires Jupyter's authentication.

- ``GET api/stats``: ``{"pools": {name: PoolStats}}`` for every pool the
  extension runs;
- ``GET api/sessions``: every pinned session; ``DELETE api/sessions/{id}``: end
  one (a warm kernel's session is its kernel ID: the kernel is shut down); unsafe
  methods check XSRF, as Jupyter does;
- ``proxy/...``: the process pool behind :class:`herd.proxy.ProxyHandler`, HTTP and
  WebSocket, after Jupyter's authentication (a WebSocket upgrade is a GET, so it
  passes the same check before anything reaches a worker).
"""

from __future__ import annotations

import json
from typing import Any

from jupyter_server.base.handlers import APIHandler, JupyterHandler
from tornado import web

import herd
from herd.proxy import ProxyHandler, ProxySettings

__all__ = ["HerdProxyHandler", "SessionHandler", "SessionsHandler", "StatsHandler"]


class _PoolsHandler(APIHandler):
    @property
    def pools(self) -> dict[str, herd.Pool[Any]]:
        return dict(self.settings.get("herd_pools", {}))


class StatsHandler(_PoolsHandler):
    """``GET``: the stats of every pool."""

    @web.authenticated
    async def get(self) -> None:
        stats = {name: pool.stats().as_dict() for name, pool in self.pools.items()}
        self.finish(json.dumps({"pools": stats}))


class SessionsHandler(_PoolsHandler):
    """``GET``: every pinned session with its pool and worker."""

    @web.authenticated
    async def get(self) -> None:
        sessions = [
            {"id": sid, "pool": name, "worker": worker}
            for name, pool in self.pools.items()
            for sid, worker in pool.sessions().items()
        ]
        self.finish(json.dumps({"sessions": sessions}))


class SessionHandler(_PoolsHandler):
    """``DELETE``: end one session (404 if no pool has it)."""

    @web.authenticated
    async def delete(self, session_id: str) -> None:
        try:
            herd.validate_session_id(session_id)
        except herd.InvalidSessionIdError as exc:
            raise web.HTTPError(400, str(exc)) from None
        kernels: dict[str, Any] = getattr(self.kernel_manager, "herd_kernel_ids", dict)()
        if session_id in kernels:
            # A warm kernel's session is its kernel: end both, as Jupyter would.
            await self.kernel_manager.shutdown_kernel(session_id)
            self.set_status(204)
            self.finish()
            return
        for pool in self.pools.values():
            if session_id in pool.sessions():
                await pool.release(session_id)
                self.set_status(204)
                self.finish()
                return
        raise web.HTTPError(404, f"no session {session_id!r}")


@web.stream_request_body
class HerdProxyHandler(JupyterHandler, ProxyHandler):
    """:class:`herd.proxy.ProxyHandler` behind Jupyter's authentication and XSRF check."""

    def initialize(self, settings: ProxySettings | None = None, **fields: Any) -> None:
        ProxyHandler.initialize(self, settings, **fields)

    async def prepare(self) -> None:  # type: ignore[override]
        # Jupyter's checks first: identity (403 or a login redirect when
        # missing), and XSRF for unsafe methods. Nothing reaches a worker before.
        await JupyterHandler.prepare(self)
        if self.current_user is None:
            raise web.HTTPError(403)
        await ProxyHandler.prepare(self)

    def on_finish(self) -> None:
        ProxyHandler.on_finish(self)
        JupyterHandler.on_finish(self)
