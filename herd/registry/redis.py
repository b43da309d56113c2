"""A :class:`~herd.SessionRegistry` on Redis: one session table for a fleet of nodes.

Several gateways (``herd serve --registry redis://...``) share it so that a
session has one worker in the whole fleet, whichever node a request reaches. The
only module of herd that imports redis (``pip install 'herd[redis]'``).

What lives in Redis (every key under one hash tag, ``herd:{NAMESPACE}:``, so that
a Redis Cluster keeps them in one slot and the scripts below stay atomic)::

    epoch            a counter: fencing tokens and node incarnations come from it
    grace            set for a moment when a node finds the counter gone back (Redis
                     lost its data): no new claims until it expires, so that the
                     live nodes register the sessions they serve first
    nodes            the set of node IDs
    node:ID          hash {inc, address, sessions}, expires after the node's lease
    s:HASH           hash {node, inc, epoch, worker}: a session's claim; expires
                     after claim_ttl unless its owner renews it

A session's key is a keyed hash of its ID: nothing in Redis holds a session ID in
clear (a session ID is a bearer credential).

The rules, each one Lua script so that it is atomic:

- **claim**: a session with no claim, or whose owner's node key is gone or names
  another incarnation (the node died, or restarted), is claimed for this node
  with a new epoch; one owned by a live node is that node's.
- **renew** (every ``lease / 3`` seconds, one call for the whole node): refresh
  this node's key, and every ``claim_ttl / 3`` its claims (a claim whose epoch
  changed is *lost*: the pool stops serving it); read the fleet.
- a node whose key expired (it could not renew within its lease: Redis was down,
  or the node was cut off) has **lapsed**: its next renewal registers it afresh,
  under a new incarnation, and takes back the claims still free or still its own.
  Until then claims fail and other nodes may take its sessions over.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import urllib.parse
from collections.abc import Awaitable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .._exceptions import RegistryUnavailableError
from .._protocols import Claim, NodeInfo

__all__ = ["RedisRegistry"]

log = logging.getLogger("herd.registry")

T = TypeVar("T")

# KEYS: node key, nodes set, epoch counter, grace key
# ARGV: node ID, address, lease ms, claim ttl ms, sessions, claim prefix, node prefix,
#       grace ms, the node's last incarnation ('' if none), then (hash, epoch) pairs
#       of the claims this node holds
_REGISTER = """
local inc = redis.call('INCR', KEYS[3])
if ARGV[9] ~= '' and inc <= tonumber(ARGV[9]) then
  -- The counter went back: Redis lost its data. No new session for a moment, so
  -- that every live node registers its sessions again before anyone claims them.
  redis.call('SET', KEYS[4], '1', 'PX', ARGV[8])
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'inc', inc, 'address', ARGV[2], 'sessions', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('SADD', KEYS[2], ARGV[1])
local lost = {}
for i = 10, #ARGV, 2 do
  local key = ARGV[6] .. ARGV[i]
  local cur = redis.call('HMGET', key, 'node', 'inc', 'epoch')
  local ours = cur[1] == false or (cur[1] == ARGV[1] and cur[3] == ARGV[i + 1])
  if not ours and cur[1] ~= ARGV[1] then
    local live = redis.call('HGET', ARGV[7] .. cur[1], 'inc')
    ours = live ~= cur[2]
  end
  if ours then
    redis.call('HSET', key, 'node', ARGV[1], 'inc', inc, 'epoch', ARGV[i + 1])
    redis.call('PEXPIRE', key, ARGV[4])
  else
    table.insert(lost, ARGV[i])
  end
end
return {inc, lost}
"""

# KEYS: node key, nodes set
# ARGV: node ID, incarnation, lease ms, sessions, claim ttl ms, claim prefix, node prefix,
#       then (hash, epoch) pairs of the claims to refresh (none between refreshes)
_RENEW = """
if redis.call('HGET', KEYS[1], 'inc') ~= ARGV[2] then return {'lapsed'} end
redis.call('HSET', KEYS[1], 'sessions', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local lost = {}
for i = 8, #ARGV, 2 do
  local key = ARGV[6] .. ARGV[i]
  local cur = redis.call('HMGET', key, 'node', 'epoch')
  if cur[1] == false then
    redis.call('HSET', key, 'node', ARGV[1], 'inc', ARGV[2], 'epoch', ARGV[i + 1])
    redis.call('PEXPIRE', key, ARGV[5])
  elseif cur[1] == ARGV[1] and cur[2] == ARGV[i + 1] then
    redis.call('PEXPIRE', key, ARGV[5])
  else
    table.insert(lost, ARGV[i])
  end
end
local fleet = {}
for _, node in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local info = redis.call('HMGET', ARGV[7] .. node, 'address', 'sessions')
  if info[1] then
    table.insert(fleet, node)
    table.insert(fleet, info[1])
    table.insert(fleet, info[2])
  else
    redis.call('SREM', KEYS[2], node)
  end
end
return {'ok', lost, fleet}
"""

# KEYS: claim key, epoch counter, node key, grace key
# ARGV: node ID, incarnation, claim ttl ms, node prefix
_CLAIM = """
if redis.call('HGET', KEYS[3], 'inc') ~= ARGV[2] then return {'lapsed'} end
local cur = redis.call('HMGET', KEYS[1], 'node', 'inc', 'epoch')
local previous = ''
if not cur[1] then
  local wait = redis.call('PTTL', KEYS[4])
  if wait > 0 then return {'wait', wait} end
else
  if cur[1] == ARGV[1] and cur[2] == ARGV[2] then return {'mine', cur[3]} end
  local owner = redis.call('HMGET', ARGV[4] .. cur[1], 'inc', 'address')
  if owner[1] == cur[2] then return {'other', cur[3], cur[1], owner[2]} end
  previous = cur[1]
end
local epoch = redis.call('INCR', KEYS[2])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'node', ARGV[1], 'inc', ARGV[2], 'epoch', epoch)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {'new', epoch, previous}
"""

# KEYS: node key, nodes set. ARGV: node ID, claim prefix, then (hash, epoch) pairs
_LEAVE = """
for i = 3, #ARGV, 2 do
  local key = ARGV[2] .. ARGV[i]
  if redis.call('HGET', key, 'epoch') == ARGV[i + 1] then redis.call('DEL', key) end
end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
return 1
"""

# KEYS: claim key. ARGV: epoch, worker ID ('' to release)
_FENCED = """
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return 0 end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('HSET', KEYS[1], 'worker', ARGV[2])
end
return 1
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def shown_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, for messages and logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    netloc = f"{user}:***@{parts.netloc.rpartition('@')[2]}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _client(url: str, connect_timeout: float, timeout: float) -> tuple[Any, list[Any]]:
    """A redis.asyncio client for ``url``: ``redis://``, ``rediss://``, ``unix://``
    as redis-py reads them, ``redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT]/SERVICE[/DB]``
    (the master of SERVICE, found through those Sentinels), or
    ``redis+cluster://[:PASSWORD@]HOST:PORT`` (a Redis Cluster); and the other
    clients it made, to close with it (the Sentinels')."""
    options: dict[str, Any] = {
        "socket_connect_timeout": connect_timeout,
        "socket_timeout": timeout,
        # Fail fast: one retry at once (a kept connection that Redis closed when it
        # restarted fails its first command), no back-off (the pool retries renewals).
        "retry": Retry(NoBackoff(), 1),
    }
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "redis+sentinel":
        from redis.asyncio.sentinel import Sentinel

        hosts = []
        for item in parts.netloc.rpartition("@")[2].split(","):
            host, _, port = item.rpartition(":")
            hosts.append((host or "localhost", int(port or 26379)))
        path = [p for p in parts.path.split("/") if p]
        if not path:
            raise ValueError(f"{shown_url(url)}: name the Sentinel service, as .../mymaster")
        db = int(path[1]) if len(path) > 1 else 0
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            hosts,
            sentinel_kwargs={"socket_connect_timeout": connect_timeout, "socket_timeout": timeout},
            password=parts.password,
            username=parts.username or None,
            db=db,
            **options,
        )
        return sentinel.master_for(path[0]), list(sentinel.sentinels)
    if parts.scheme == "redis+cluster":
        from redis.asyncio.cluster import RedisCluster

        plain = urllib.parse.urlunsplit(parts._replace(scheme="redis"))
        cluster = RedisCluster.from_url(
            plain, socket_connect_timeout=connect_timeout, socket_timeout=timeout
        )
        return cluster, []
    return aioredis.Redis.from_url(url, **options), []


class RedisRegistry:
    """Sessions shared by the nodes of a fleet through Redis (see the module's docstring).

    :param url: ``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]``, ``rediss://`` for
        TLS, ``unix://PATH``, ``redis+sentinel://...`` or ``redis+cluster://...``.
    :param address: where this node takes requests that other nodes forward to it
        (``http://10.0.0.2:8080``); required for a fleet of more than one node.
    :param node_id: this node's ID in the fleet; default: host name, process ID and
        a random part (a restarted node is a new node).
    :param namespace: separates fleets that share one Redis.
    :param lease: seconds a node stays the owner of its sessions without renewing
        (it renews every third of it). A node that dies has its sessions taken
        over by others after this long at most.
    :param claim_ttl: seconds a session's claim outlives its owner's last renewal
        (the owner refreshes it every third of it): the clean-up of claims left by
        dead nodes that nobody asked for again.
    :param connect_timeout: seconds to connect to Redis before giving up.
    :param timeout: seconds to wait for one answer from Redis.
    :param client: a ``redis.asyncio`` client to use instead of one made from ``url``.
    """

    def __init__(
        self,
        url: str = "redis://localhost:6379/0",
        *,
        address: str = "",
        node_id: str | None = None,
        namespace: str = "herd",
        lease: float = 10.0,
        claim_ttl: float = 600.0,
        connect_timeout: float = 1.0,
        timeout: float = 2.0,
        client: Any = None,
    ) -> None:
        if lease <= 0 or claim_ttl <= 0:
            raise ValueError("lease and claim_ttl must be > 0")
        if claim_ttl < lease:
            raise ValueError(f"claim_ttl ({claim_ttl:g}s) must be at least the lease ({lease:g}s)")
        if not namespace or any(ch in namespace for ch in "{}: \t\r\n"):
            raise ValueError(f"namespace {namespace!r}: letters, digits, - and _ only")
        self.url = url
        self.shown_url = shown_url(url)
        self.address = address
        self.node = node_id or f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"
        self.lease = lease
        self.claim_ttl = claim_ttl
        self._others: list[Any] = []  # more clients to close with it
        if client is None:
            client, self._others = _client(url, connect_timeout, timeout)
        self._client = client
        prefix = f"herd:{{{namespace}}}:"
        self._claim_prefix = prefix + "s:"
        self._node_prefix = prefix + "node:"
        self._node_key = self._node_prefix + self.node
        self._nodes_key = prefix + "nodes"
        self._epoch_key = prefix + "epoch"
        self._grace_key = prefix + "grace"
        # Keyed by the namespace: two fleets on one Redis never share a key.
        self._hash_key = hashlib.blake2b(prefix.encode(), digest_size=16).digest()
        self._register = self._client.register_script(_REGISTER)
        self._renew = self._client.register_script(_RENEW)
        self._claim = self._client.register_script(_CLAIM)
        self._fenced = self._client.register_script(_FENCED)
        self._leave = self._client.register_script(_LEAVE)
        self._incarnation: str | None = None  # None: not registered (yet, or lapsed)
        self._last_incarnation = ""  # the last one, kept through a lapse
        self._held: dict[str, Claim] = {}  # by the session's hash
        self._lost: list[str] = []  # lost at a registration, told by the next renew()
        self._fleet: tuple[NodeInfo, ...] = ()
        self._last_refresh = 0.0  # loop time of the last claim refresh
        self._lock = asyncio.Lock()  # one registration at a time

    @property
    def renew_interval(self) -> float:
        """A third of the lease."""
        return self.lease / 3

    @property
    def grace(self) -> float:
        """Seconds without new sessions after Redis lost its data: a lease, within
        which every live node renews (and so registers its sessions again)."""
        return self.lease

    def _key(self, session_id: str) -> str:
        digest = hashlib.blake2b(session_id.encode(), key=self._hash_key, digest_size=20)
        return digest.hexdigest()

    async def _call(self, what: str, work: Awaitable[T]) -> T:
        try:
            return await work
        except (RedisError, OSError) as exc:
            raise RegistryUnavailableError(
                f"session registry {self.shown_url} is unavailable ({what}): "
                f"{type(exc).__name__}: {exc}",
                registry=self.shown_url,
            ) from exc

    def _pairs(self) -> list[str]:
        pairs: list[str] = []
        for digest, claim in self._held.items():
            pairs += (digest, str(claim.epoch))
        return pairs

    async def _ensure_registered(self) -> str:
        """Register this node (again, after a lapse); the claims it held and still
        can are taken back. Returns the incarnation."""
        async with self._lock:
            if self._incarnation is not None:
                return self._incarnation
            ms = int(self.lease * 1000)
            reply = await self._call(
                "registering the node",
                self._register(
                    keys=[self._node_key, self._nodes_key, self._epoch_key, self._grace_key],
                    args=[
                        self.node,
                        self.address,
                        ms,
                        int(self.claim_ttl * 1000),
                        len(self._held),
                        self._claim_prefix,
                        self._node_prefix,
                        int(self.grace * 1000),
                        self._last_incarnation,
                        *self._pairs(),
                    ],
                ),
            )
            incarnation, lost = _text(reply[0]), [_text(x) for x in reply[1]]
            self._incarnation = self._last_incarnation = incarnation
            self._last_refresh = asyncio.get_running_loop().time()
            self._lost += [self._held.pop(digest).session_id for digest in lost]
            log.info(
                "node %s joined the fleet at %s (incarnation %s; %d session(s) kept, %d lost)",
                self.node,
                self.shown_url,
                incarnation,
                len(self._held),
                len(self._lost),
            )
            return incarnation

    async def claim(self, session_id: str) -> Claim:
        """Claim ``session_id`` for this node, or name the live node that owns it."""
        digest = self._key(session_id)
        for _ in range(2):  # a lapse found by the claim: register, then once more
            incarnation = await self._ensure_registered()
            args = [self.node, incarnation, int(self.claim_ttl * 1000), self._node_prefix]
            keys = [self._claim_prefix + digest, self._epoch_key, self._node_key, self._grace_key]
            reply = await self._call("claiming a session", self._claim(keys=keys, args=args))
            kind = _text(reply[0])
            if kind == "lapsed":
                self._lapsed(incarnation)
                continue
            if kind == "wait":
                raise RegistryUnavailableError(
                    f"session registry {self.shown_url} lost its data (restarted without "
                    "persistence?): the nodes are registering their sessions again; new "
                    f"sessions in {int(_text(reply[1])) / 1000:.1f}s",
                    session_id=session_id,
                    registry=self.shown_url,
                )
            epoch = int(_text(reply[1]))
            if kind == "other":
                node, address = _text(reply[2]), _text(reply[3])
                return Claim(session_id, node, address, epoch, mine=False)
            restarted = None
            if kind == "new" and _text(reply[2]):
                restarted = f"node {_text(reply[2])}, which owned it, stopped"
            claim = Claim(session_id, self.node, self.address, epoch, True, restarted)
            self._held[digest] = claim
            return claim
        raise RegistryUnavailableError(
            f"session registry {self.shown_url}: node {self.node} keeps lapsing; "
            "is its lease shorter than Redis's answers?",
            session_id=session_id,
            registry=self.shown_url,
        )

    def _lapsed(self, incarnation: str) -> None:
        if self._incarnation == incarnation:
            log.warning("node %s: its lease lapsed in the registry; joining again", self.node)
            self._incarnation = None

    async def bind(self, claim: Claim, worker_id: str) -> bool:
        """Name ``worker_id`` in the claim; ``False`` if the claim is not this node's."""
        digest = self._key(claim.session_id)
        done = await self._call(
            "naming a session's worker",
            self._fenced(keys=[self._claim_prefix + digest], args=[claim.epoch, worker_id or "-"]),
        )
        if not done:
            self._held.pop(digest, None)
        return bool(done)

    async def release(self, claim: Claim) -> None:
        """Delete the claim if it is still this one (a newer claim stays)."""
        digest = self._key(claim.session_id)
        if self._held.get(digest) == claim:
            del self._held[digest]
        await self._call(
            "releasing a session",
            self._fenced(keys=[self._claim_prefix + digest], args=[claim.epoch, ""]),
        )

    async def renew(self) -> list[str]:
        """Renew this node's lease (and, every third of ``claim_ttl``, its claims);
        register it again if it lapsed. Returns the sessions lost to other nodes."""
        try:
            return await self._renew_now()
        except RegistryUnavailableError:
            self._fleet = ()  # unknown while Redis cannot be reached
            raise

    async def _renew_now(self) -> list[str]:
        incarnation = await self._ensure_registered()
        lost = self._take_lost()
        now = asyncio.get_running_loop().time()
        refresh = now - self._last_refresh >= self.claim_ttl / 3
        reply = await self._call(
            "renewing the node's lease",
            self._renew(
                keys=[self._node_key, self._nodes_key],
                args=[
                    self.node,
                    incarnation,
                    int(self.lease * 1000),
                    len(self._held),
                    int(self.claim_ttl * 1000),
                    self._claim_prefix,
                    self._node_prefix,
                    *(self._pairs() if refresh else ()),
                ],
            ),
        )
        if _text(reply[0]) == "lapsed":
            self._lapsed(incarnation)
            await self._ensure_registered()
            return lost + self._take_lost()
        if refresh:
            self._last_refresh = now
        lost += [self._held.pop(_text(d)).session_id for d in reply[1] if _text(d) in self._held]
        raw = [_text(x) for x in reply[2]]
        self._fleet = tuple(
            NodeInfo(node, address, int(sessions or 0), this=node == self.node)
            for node, address, sessions in zip(raw[0::3], raw[1::3], raw[2::3], strict=True)
        )
        return lost

    def _take_lost(self) -> list[str]:
        lost, self._lost = self._lost, []
        return lost

    def fleet(self) -> tuple[NodeInfo, ...]:
        """The nodes as the last renewal saw them, this one marked."""
        return self._fleet

    async def close(self) -> None:
        """Release every claim this node holds and leave the fleet, so that other
        nodes take its sessions at once; then close the connection."""
        try:
            if self._incarnation is not None:
                await self._call(
                    "leaving the fleet",
                    self._leave(
                        keys=[self._node_key, self._nodes_key],
                        args=[self.node, self._claim_prefix, *self._pairs()],
                    ),
                )
        finally:
            self._held.clear()
            self._incarnation = None
            for client in (self._client, *self._others):
                await client.aclose()

    def __repr__(self) -> str:
        return f"RedisRegistry({self.shown_url!r}, node={self.node!r}, sessions={len(self._held)})"
