"""herd: a session-affine process pool.

herd keeps a fleet of subprocess workers and pins every session ID to exactly
one of them for the session's lifetime, so stateful programs (kernels, REPLs,
browsers, model servers) become multi-tenant services::

    import herd

    factory = herd.ProcessFactory(["python", "-m", "http.server", "--bind", "127.0.0.1", "{port}"],
                                  health_path="/")
    async with herd.Pool(factory, min_workers=1, max_workers=4) as pool:
        async with pool.acquire("user-42") as session:
            reply = await session.worker.client.get("/")

The generic core never imports Jupyter; ``herd_nb`` holds the Jupyter side.
"""

from __future__ import annotations

from ._client import HTTPWorkerClient as HTTPWorkerClient
from ._config import Duration as Duration
from ._config import PoolConfig as PoolConfig
from ._exceptions import HerdError as HerdError
from ._exceptions import InvalidSessionIdError as InvalidSessionIdError
from ._exceptions import PoolClosedError as PoolClosedError
from ._exceptions import PoolExhaustedError as PoolExhaustedError
from ._exceptions import RegistryUnavailableError as RegistryUnavailableError
from ._exceptions import SessionElsewhereError as SessionElsewhereError
from ._exceptions import SpawnError as SpawnError
from ._exceptions import WorkerDeadError as WorkerDeadError
from ._pool import Pool as Pool
from ._pool import PoolState as PoolState
from ._pool import WorkerState as WorkerState
from ._process import ProcessFactory as ProcessFactory
from ._process import ProcessWorker as ProcessWorker
from ._protocols import Claim as Claim
from ._protocols import ExitAware as ExitAware
from ._protocols import LimitAware as LimitAware
from ._protocols import NodeInfo as NodeInfo
from ._protocols import SandboxReporting as SandboxReporting
from ._protocols import SessionRegistry as SessionRegistry
from ._protocols import SocketOpener as SocketOpener
from ._protocols import Worker as Worker
from ._protocols import WorkerFactory as WorkerFactory
from ._session import AcquireContext as AcquireContext
from ._session import Session as Session
from ._session import session_tag as session_tag
from ._session import validate_session_id as validate_session_id
from ._stats import CrashInfo as CrashInfo
from ._stats import NodeStats as NodeStats
from ._stats import PoolStats as PoolStats
from ._stats import WorkerStats as WorkerStats
from .registry.memory import MemoryRegistry as MemoryRegistry

__version__ = "0.1.0"

__all__ = [
    "AcquireContext",
    "Claim",
    "CrashInfo",
    "Duration",
    "ExitAware",
    "HTTPWorkerClient",
    "HerdError",
    "InvalidSessionIdError",
    "LimitAware",
    "MemoryRegistry",
    "NodeInfo",
    "NodeStats",
    "Pool",
    "PoolClosedError",
    "PoolConfig",
    "PoolExhaustedError",
    "PoolState",
    "PoolStats",
    "ProcessFactory",
    "ProcessWorker",
    "RegistryUnavailableError",
    "SandboxReporting",
    "Session",
    "SessionElsewhereError",
    "SessionRegistry",
    "SocketOpener",
    "SpawnError",
    "Worker",
    "WorkerDeadError",
    "WorkerFactory",
    "WorkerState",
    "WorkerStats",
    "session_tag",
    "validate_session_id",
]
