"""Redis: the service registry (leases) and request metadata.

Keys (all under the `dejavu:` prefix):
  svc:{id}        JSON ServiceInfo, expires after the lease TTL unless renewed
  svcs            set of registered ids (members whose key expired are dead and get pruned)
  req:{id}        hash: prompt_tokens, sampling, owner, epoch, status, replicated, store, gen, rep:*, ... (the token ids
                  themselves stay in the gateway's memory: nothing reads them back from here)

Data before metadata: `replicated` only advances through `advance_replicated`, which refuses an
old epoch (a fenced owner) and never goes backwards; a token pipeline's stages each advance their
own layer range (`rep:<start>:<stop>`), and `replicated` is the least over the layers.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from common.errors import Unavailable
from common.protocol import ServiceInfo, ServiceKind

log = logging.getLogger(__name__)

PREFIX = "dejavu:"
REQUEST_TTL_S = 3600  # request metadata is kept an hour after its last write

# Per layer range of a token pipeline's stages (a single token service: one range, every layer):
# `rep:<start>:<stop>` = the tokens the store has acknowledged for those layers. A layer's index
# is the most any range over it says, the request's (`replicated`) the least over the layers, 0
# while a layer has none. `gen` counts the times an owner started its replica over (on another
# store): a late write of an earlier start is ignored, a later one clears the ranges.
_ADVANCE = """
local key = KEYS[1]
local epoch, n, store = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local first, stop, layers, gen = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local cur_epoch = tonumber(redis.call('HGET', key, 'epoch') or '-1')
if cur_epoch > epoch then return -1 end
local cur_gen = tonumber(redis.call('HGET', key, 'gen') or '0')
local function reset()
  for _, f in ipairs(redis.call('HKEYS', key)) do
    if string.sub(f, 1, 4) == 'rep:' then redis.call('HDEL', key, f) end
  end
  redis.call('HSET', key, 'epoch', epoch, 'gen', gen, 'store', store, 'replicated', 0)
end
if cur_epoch < epoch then
  reset()
  redis.call('EXPIRE', key, ARGV[4])
elseif gen < cur_gen then
  return tonumber(redis.call('HGET', key, 'replicated') or '0')
elseif gen > cur_gen or (store ~= '' and redis.call('HGET', key, 'store') ~= store) then
  reset()
end
local field = 'rep:' .. first .. ':' .. stop
if n > tonumber(redis.call('HGET', key, field) or '-1') then redis.call('HSET', key, field, n) end
local held = {}
local all = redis.call('HGETALL', key)
for i = 1, #all, 2 do
  local a, b = string.match(all[i], '^rep:(%d+):(%d+)$')
  if a then
    local v = tonumber(all[i + 1])
    for l = tonumber(a), tonumber(b) - 1 do
      if (held[l] or -1) < v then held[l] = v end
    end
  end
end
local least = nil
for l = 0, layers - 1 do
  local v = held[l] or 0
  if least == nil or v < least then least = v end
end
redis.call('HSET', key, 'replicated', least or 0)
return least or 0
"""

_FENCE = """
local before = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '-1')
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
if epoch < tonumber(ARGV[3]) then epoch = tonumber(ARGV[3]) redis.call('HSET', KEYS[1], 'epoch', epoch) end
local replicated = redis.call('HGET', KEYS[1], 'replicated') or '0'
local store = redis.call('HGET', KEYS[1], 'store') or ''
if before < tonumber(ARGV[3]) - 1 then replicated = '0' store = '' end
for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(f, 1, 4) == 'rep:' then redis.call('HDEL', KEYS[1], f) end
end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'replicated', 0, 'store', '', 'gen', 0)
redis.call('EXPIRE', KEYS[1], ARGV[2])
return {epoch, tonumber(replicated), store}
"""


MAX_CONNECTIONS = 64  # per process; more concurrent commands wait their turn for one


def connect(url: str, timeout_s: float = 5.0) -> aioredis.Redis:
    """`timeout_s` bounds each command: a service passes less than its lease TTL, so that a stalled
    Redis costs a renewal or a lookup that can be tried again, not the whole lease. The pool blocks
    (up to `timeout_s`) when all its connections are busy: redis-py's default pool fails at once
    past 100, which turned a burst of 300 requests into "Too many connections" errors."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=MAX_CONNECTIONS, timeout=timeout_s, decode_responses=True,
        socket_connect_timeout=min(2.0, timeout_s), socket_timeout=timeout_s, health_check_interval=10)
    return aioredis.Redis.from_pool(pool)  # closing the client closes its pool


class Registry:
    """`cluster`: list only the services of that cluster (a cluster_fingerprint): two clusters that
    share one Redis must not route to each other (each would refuse the other's token). None: all."""

    def __init__(self, redis: aioredis.Redis, cluster: str | None = None):
        self.redis, self.cluster = redis, cluster
        self.foreign: collections.Counter[ServiceKind] = collections.Counter()  # other clusters' services, by kind,
        #                                                   at the last listing (a wrong cluster token shows as these)

    async def renew(self, info: ServiceInfo, ttl_s: float) -> None:
        info = info.model_copy(update={"renewed_at": time.time()})
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(PREFIX + "svc:" + info.id, info.model_dump_json(), px=int(ttl_s * 1000))
            pipe.sadd(PREFIX + "svcs", info.id)
            await pipe.execute()

    async def deregister(self, service_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(PREFIX + "svc:" + service_id)
            pipe.srem(PREFIX + "svcs", service_id)
            await pipe.execute()

    async def services(self, kind: ServiceKind | None = None) -> list[ServiceInfo]:
        """Live services (lease not expired), optionally of one kind. Raises Unavailable if Redis is down."""
        try:
            ids = sorted(await self.redis.smembers(PREFIX + "svcs"))
            values = await self.redis.mget([PREFIX + "svc:" + i for i in ids]) if ids else []
            dead = [i for i, v in zip(ids, values) if v is None]
            if dead:
                await self.redis.srem(PREFIX + "svcs", *dead)
        except RedisError as exc:
            raise Unavailable(f"the registry (Redis) is unreachable: {exc}") from exc
        infos = [info for i, v in zip(ids, values) if v is not None and (info := _service_info(i, v)) is not None]
        ours = [i for i in infos if self.cluster is None or i.cluster == self.cluster]
        self.foreign = collections.Counter(i.kind for i in infos if i not in ours)
        return [i for i in ours if kind is None or i.kind == kind]

    def foreign_hint(self, kind: ServiceKind) -> str:
        """For a "no service of this kind registered" message: some of another cluster token share
        this Redis."""
        n = self.foreign[kind]
        return (f" ({n} {kind.value} service(s) of another cluster token share this Redis: if they are this "
                "cluster's, give every service the same DEJAVU_CLUSTER_TOKEN)") if n else ""


class RecentServices:
    """The registry as a router sees it: what Redis lists, plus what it listed within the last
    `ttl_s` (the lease TTL) and lists no more. A Redis that restarts empty, or is unreachable for a
    moment, forgets every lease at once, though each service writes its lease again within a
    renewal; meanwhile work in flight keeps routing instead of finding nobody. A dead service is
    listed at most one TTL longer than Redis lists it: a call to it fails and the caller moves on.
    For "is this one service alive?" ask the Registry itself. A service no longer listed is still
    known by its id (`remembered`) for `remember_s`, if that is longer than the TTL."""

    def __init__(self, registry: Registry, ttl_s: float, remember_s: float = 0.0):
        self.registry, self.ttl_s, self.remember_s = registry, ttl_s, max(remember_s, ttl_s)
        self.seen: dict[str, tuple[float, ServiceInfo]] = {}  # id -> (monotonic s it was last listed, its lease)
        self.listed: set[str] = set()  # ids the registry listed at the last read that succeeded

    async def services(self, kind: ServiceKind | None = None) -> list[ServiceInfo]:
        """Raises Unavailable only if Redis is unreachable and nothing was listed within `ttl_s`."""
        now, failure = time.monotonic(), None
        try:
            listed = await self.registry.services()
        except Unavailable as exc:
            listed, failure = [], exc
        for info in listed:
            self.seen[info.id] = (now, info)
        if failure is None:
            self.listed = {info.id for info in listed}
        self.seen = {i: (t, info) for i, (t, info) in self.seen.items() if now - t < self.remember_s}
        recent = [info for t, info in self.seen.values() if now - t < self.ttl_s]
        if failure and not recent:
            raise failure
        return [info for info in recent if kind is None or info.kind == kind]

    def remembered(self, service_id: str) -> ServiceInfo | None:
        """The lease of a service listed within `remember_s`, listed still or not."""
        entry = self.seen.get(service_id)
        return entry[1] if entry else None


class RequestStore:
    def __init__(self, redis: aioredis.Redis):
        self.redis = redis
        self._advance = redis.register_script(_ADVANCE)
        self._fence = redis.register_script(_FENCE)

    def _key(self, request_id: str) -> str:
        return PREFIX + "req:" + request_id

    async def create(self, request_id: str, fields: dict, wait_s: float = 0.0) -> None:
        """Record a new request; Redis unreachable: try again for `wait_s` (a restart costs a
        pause), then Unavailable."""
        values = {k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()}
        values.update(epoch="0", replicated="0", created_at=str(time.time()))
        deadline = time.monotonic() + wait_s
        while True:
            try:
                async with self.redis.pipeline(transaction=True) as pipe:
                    pipe.hset(self._key(request_id), mapping=values)
                    pipe.expire(self._key(request_id), REQUEST_TTL_S)
                    await pipe.execute()
                return
            except RedisError as exc:
                if time.monotonic() >= deadline:
                    raise Unavailable(f"request metadata store (Redis) is unreachable: {exc}") from exc
            await asyncio.sleep(0.1)

    async def update(self, request_id: str, **fields) -> None:
        values = {k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()}
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._key(request_id), mapping=values)
            pipe.expire(self._key(request_id), REQUEST_TTL_S)
            await pipe.execute()

    async def get(self, request_id: str) -> dict[str, str]:
        return await self.redis.hgetall(self._key(request_id))

    async def fence(self, request_id: str, new_owner: str, at_least: int = 0) -> tuple[int, int, str]:
        """Make `new_owner` the owner under a new epoch (at least `at_least`: the caller's own count,
        should Redis have lost the record): the old owner's writes are refused from now on. Returns
        (new epoch, replicated, store) as they were, and clears the index: until the new owner
        records what it has, no replica is vouched for (the store may trim it). A record older than
        `at_least - 1` was lost and rebuilt by an owner fenced since: its replica is not vouched for
        either (0, "")."""
        epoch, replicated, store = await self._fence(keys=[self._key(request_id)],
                                                     args=[new_owner, REQUEST_TTL_S, at_least])
        return int(epoch), int(replicated), store

    async def advance_replicated(self, request_id: str, epoch: int, n: int, store: str = "",
                                 layers: range | None = None, num_layers: int = 0, gen: int = 0) -> int:
        """Record that cache store `store` has acknowledged the KV of tokens [0, n) of `layers` of
        a model of `num_layers` (default: every layer, in one range). The request's index is the
        least over its layers (each the most any range over it says): a token pipeline's stages
        each record their own layers, and the request resumes from where all of them are. Refused
        (-1) when `epoch` is fenced (Redis holds a newer one). Never goes backwards within one
        start of the replica (`gen`, on one store); a later start (another store, or this one anew)
        clears it; a write of an earlier one is ignored. A record with an older epoch, or none, was
        lost (Redis restarted empty) or rebuilt by a fenced owner since: it is written afresh under
        `epoch`, so replication outlives a Redis restart. Returns the index now in force."""
        layers = layers if layers is not None else range(0, max(num_layers, 1))
        return int(await self._advance(keys=[self._key(request_id)],
                                       args=[epoch, n, store, REQUEST_TTL_S, layers.start, layers.stop,
                                             max(num_layers, layers.stop), gen]))


_bad_entries: set[str] = set()  # registry ids already logged as unreadable


def _service_info(service_id: str, raw: str | bytes) -> ServiceInfo | None:
    """One registry entry, or None (logged once) if it cannot be read: one malformed entry, or one
    written by a newer version, must not make every request fail. Unknown fields are ignored."""
    try:
        fields = json.loads(raw)
        known = {k: v for k, v in fields.items() if k in ServiceInfo.model_fields}
        return ServiceInfo.model_validate(known)
    except (ValueError, TypeError, AttributeError) as exc:  # pydantic's ValidationError is a ValueError
        if service_id not in _bad_entries:
            _bad_entries.add(service_id)
            log.warning("registry entry %s skipped, unreadable: %s", service_id, str(exc)[:300])
        return None
