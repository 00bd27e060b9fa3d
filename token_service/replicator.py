"""Replication of every decoding request's KV to a cache store, for recovery (DéjàVu's fault tolerance).

Per request: the prompt's KV first, then every `chunk` new tokens, each message one contiguous
buffer of (layers, 2, tokens, kv_heads, head_dim), all of this process's layers at once (one copy,
one header). A token pipeline's head (token_service/pipeline.py) picks the store and the tokens,
and asks its stages, in order with the steps, to send their own layers' KV of those tokens to the
same store (`stages`: Pipeline.replicate); each stage records its layers in Redis itself and
reports back, and the next message of the request waits for every report.
Sends run in the background with at most one message in flight per request, so decode never
waits for replication. Data before metadata: only once the store has acknowledged tokens [0, n)
of a process's layers does it record n for them in Redis (and the store's id), under the request's
epoch; the request's `replicated` is the least over its layers (common/metadata.py). A fenced
owner is refused there and by the store, and stops replicating.

A failed send (the store died, a transfer failed), here or on a stage, starts the replica over, in
full (a new `gen`: Redis then ignores what the earlier start still records), on another store when
there is one (the failed one is avoided for a while), after a short pause. When the
request ends here its replica is dropped from every store it was sent to, unless this service
was fenced: the replica is its successor's then. A request that ended here by an abort (its
decode stream closed: the gateway may be resuming it elsewhere this very moment) has its replica
dropped only after DROP_GRACE_S, and only if Redis says no successor has fenced it meanwhile:
dropped at once, the replica went before the new owner could fetch it (the store refuses a
fenced owner's drop only once that fetch has moved the replica to the new epoch).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import httpx
import torch
from prometheus_client import Counter, Gauge
from redis.exceptions import RedisError

from common.kv.copy import gather
from common.kv.fetch import ACK_TIMEOUT_S
from common.kv.peers import KVRejected, Peers
from common.kv.wire import FENCED
from common.metadata import RecentServices, RequestStore
from common.protocol import DropRequest, ServiceInfo, ServiceKind
from common.service import request_id_var
from engine.attention import slots_of
from token_service.sequence import Sequence

log = logging.getLogger(__name__)

REPLICATED_BYTES = Counter("dejavu_token_replicated_bytes_total", "KV bytes acknowledged by cache stores")
REPLICATION_LAG = Gauge("dejavu_token_replication_lag_tokens", "tokens with KV not yet acknowledged by a store, summed")
RESTARTS = Counter("dejavu_token_replica_restarts_total", "replicas started over after a failed send")
# a pipeline's later stages each send their layers with their own ACK_TIMEOUT_S, after their turn in
# the chain and before telling Redis: the head waits this long for their reports, from its own send
STAGES_TIMEOUT_S = 2 * ACK_TIMEOUT_S
STORE_CACHE_S = 1.0
AVOID_S = 5.0  # a store whose send failed is not picked again for this long (if there is another)
RETRY_S = 0.5  # a request whose send failed waits this long before its replica starts over
DROP_GRACE_S = 2.0  # an aborted request's replica is kept this long for a successor to fence it


class StageFailed(Exception):
    """A stage of the pipeline could not replicate its layers (its report says why)."""


class Replicator:
    def __init__(self, pool: torch.Tensor, block_size: int, peers: Peers, stores: RecentServices,
                 requests: RequestStore, client: httpx.AsyncClient, chunk: int, layers: range, num_layers: int,
                 stages: Callable[..., Awaitable[list[dict]]] | None = None):
        self.pool, self.block_size, self.peers = pool, block_size, peers
        self.layers, self.num_layers = layers, num_layers  # the pool's layers, of the model's
        self.stages = stages  # a pipeline's head: Pipeline.replicate, the later stages' layers
        self.stores, self.requests, self.client = stores, requests, client
        self.chunk = chunk
        self.acked: dict[str, int] = {}           # request id -> tokens acknowledged (by every stage)
        self.gens: dict[str, int] = {}            # request id -> times its replica started over
        self.epochs: dict[str, int] = {}          # request id -> the epoch it is replicated under
        self.where: dict[str, ServiceInfo] = {}   # request id -> the store it replicates to now
        self.touched: dict[str, dict[str, ServiceInfo]] = {}  # request id -> every store sent to (to drop)
        self.inflight: dict[str, asyncio.Task] = {}
        self.fenced: set[str] = set()
        self.ended: set[str] = set()              # ended while a send was in flight: clean up after it
        self.aborted: set[str] = set()            # ended by an abort: drop its replica only if not fenced
        self.retry_at: dict[str, float] = {}      # request id -> monotonic time its replica may start over
        self.avoid: dict[str, float] = {}         # store id -> monotonic time until which it is avoided
        self.background: set[asyncio.Task] = set()
        self._stores: tuple[float, list[ServiceInfo]] = (float("-inf"), [])
        self._refresh_failed = False

    async def resume_from(self, request_id: str, epoch: int, store_id: str, kv_address: str, n: int,
                          url: str = "") -> None:
        """A recovered request: its replica [0, n) is on `store_id` already; go on from there, and
        say so in Redis (the gateway's fence cleared the index; the store keeps [0, n) at least)."""
        store = next((s for s in self._stores[1] if s.id == store_id), None) or ServiceInfo(
            kind=ServiceKind.CACHE_STORE, id=store_id, url=url, host="", pid=0, kv_address=kv_address)
        self.acked[request_id], self.epochs[request_id], self.where[request_id] = n, epoch, store
        self.touched.setdefault(request_id, {})[store_id] = store
        try:  # every layer of [0, n): the replica's, whoever wrote it
            await self.requests.advance_replicated(request_id, epoch, n, store_id, range(self.num_layers),
                                                   self.num_layers)
        except RedisError as exc:
            log.warning("could not record the restored replica in Redis: %s", exc)

    def after_step(self, seqs: list[Sequence]) -> None:
        """Called after each decode step: start a send for each request with enough new KV."""
        now = time.monotonic()
        if now - self._stores[0] > STORE_CACHE_S:
            self._stores = (now, self._stores[1])  # one refresh at a time
            self._spawn(self._refresh_stores())
        if self._stores[1]:  # no store registered: nothing to replicate to
            for seq in seqs:
                rid = seq.request_id
                if seq.done or rid in self.inflight or rid in self.fenced or self.retry_at.get(rid, 0.0) > now:
                    continue
                kv_len, acked = seq.input_position, self.acked.get(rid, 0)  # KV exists for [0, input_position)
                if kv_len - acked >= self.chunk or (acked == 0 and kv_len > 0):
                    store = self._store_for(rid)
                    if store is None:
                        continue
                    self.touched.setdefault(rid, {})[store.id] = store
                    buf = gather(self.pool, slots_of(seq.blocks, self.block_size, acked, kv_len))  # final: copy now
                    gen, tokens = self.gens.get(rid, 0), range(acked, kv_len)
                    # the stages' layers: asked for now, in order with the steps (a later one may reuse the blocks)
                    stages = (asyncio.ensure_future(self.stages(rid, seq.epoch, gen, list(seq.blocks), tokens, store,
                                                                self.num_layers))
                              if self.stages is not None else None)
                    self.epochs[rid] = seq.epoch
                    task = asyncio.create_task(self._send(seq, buf, tokens, store, gen, stages))
                    self.inflight[rid] = task
                    task.add_done_callback(lambda t, rid=rid: self.inflight.pop(rid, None))

    def lag(self, seqs) -> int:
        """Tokens of `seqs` (every sequence held here) whose KV no store has acknowledged yet."""
        return sum(max(s.input_position - self.acked.get(s.request_id, 0), 0) for s in seqs if not s.done)

    async def _send(self, seq: Sequence, buf: torch.Tensor, tokens: range, store: ServiceInfo, gen: int,
                    stages: asyncio.Future | None = None) -> None:
        rid, start, end = seq.request_id, tokens.start, tokens.stop
        request_id_var.set(rid)  # this task's lines are the request's (it started in the decode loop's context)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STAGES_TIMEOUT_S
        if stages is not None:  # its outcome is read below, unless this send fails first
            stages.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            link = await self.peers.get(store.kv_address)
            ack = await link.send(buf, request_id=rid, epoch=seq.epoch, layer_start=self.layers.start,
                                  layer_end=self.layers.stop, token_start=start, token_end=end)
            await asyncio.wait_for(ack, ACK_TIMEOUT_S)
            REPLICATED_BYTES.inc(buf.numel() * buf.element_size())
            try:  # the store has [0, end) of our layers; Redis is told next (a Redis error costs nothing here)
                if await self.requests.advance_replicated(rid, seq.epoch, end, store.id, self.layers,
                                                          self.num_layers, gen) < 0:
                    return self._fence(rid, seq.epoch)
            except RedisError as exc:
                log.warning("the store has tokens [0, %d) of %s but Redis could not be told: %s", end, rid, exc)
            if stages is not None:
                reports = await asyncio.wait_for(asyncio.shield(stages), deadline - loop.time())
                if any(r.get("fenced") for r in reports):
                    return self._fence(rid, seq.epoch)
                if failed := [r for r in reports if r.get("error")]:
                    raise StageFailed("; ".join(f"stage {r.get('stage')}: {r['error']}" for r in failed))
            self.acked[rid] = end
        except KVRejected as exc:
            if str(exc).startswith(FENCED):  # the store's refusal of an old epoch
                self._fence(rid, seq.epoch)
            else:
                self._start_over(rid, store, start, end, exc)
        except Exception as exc:  # noqa: BLE001 - replication never takes decode down
            self._start_over(rid, store, start, end, exc)
        finally:
            if stages is not None and not stages.done() and not asyncio.current_task().cancelling():
                # this send failed first: the stages' puts end before the request's replica may be
                # dropped or sent again (a put landing after the drop left a replica; one sent again
                # under the same ack key took the old one's ack). Not while shutting down.
                await asyncio.wait({stages}, timeout=max(deadline - loop.time(), 0))
            if rid in self.ended:
                self.ended.discard(rid)
                self._cleanup(rid)

    def _fence(self, rid: str, epoch: int) -> None:
        log.warning("request %s is fenced (epoch %d is old; another service owns it): no more replication", rid, epoch)
        self.fenced.add(rid)

    def _start_over(self, rid: str, store: ServiceInfo | None, start: int, end: int, exc: Exception) -> None:
        log.warning("replicating tokens [%d, %d) to %s failed: %s: %s; the replica starts over", start, end,
                    store.id if store else "a cache store", type(exc).__name__, exc)
        RESTARTS.inc()
        now = time.monotonic()
        self.avoid = {s: until for s, until in self.avoid.items() if until > now}  # stores come and go
        if store is not None:
            self.avoid[store.id] = now + AVOID_S
        self.retry_at[rid] = now + RETRY_S
        self.gens[rid] = self.gens.get(rid, 0) + 1
        self.acked.pop(rid, None)
        self.where.pop(rid, None)

    async def _refresh_stores(self) -> None:
        try:
            self._stores = (time.monotonic(), await self.stores.services(ServiceKind.CACHE_STORE))
        except Exception as exc:  # noqa: BLE001 - Redis down: keep the stores known
            # said once per outage: with no store known yet, nothing replicates until a refresh works
            (log.debug if self._refresh_failed else log.warning)("cache stores not refreshed (%d known): %s",
                                                                 len(self._stores[1]), exc)
            self._refresh_failed = True
        else:
            self._refresh_failed = False

    def _store_for(self, rid: str) -> ServiceInfo | None:
        if rid in self.where:
            return self.where[rid]
        now, stores = time.monotonic(), self._stores[1]
        usable = [s for s in stores if self.avoid.get(s.id, 0.0) < now] or stores  # all avoided: retry anyway
        if not usable:
            return None
        # one the registry lists now before one only remembered (it may have died a moment ago)
        self.where[rid] = store = min(usable, key=lambda s: (s.id not in self.stores.listed, s.kv_bytes_used))
        return store

    def ending(self, request_id: str) -> bool:
        """Whether the request ended here but its send in flight has not come back yet (its
        tables go then: a new sequence of the same request here would lose its own with them)."""
        return request_id in self.ended

    def forget(self, request_id: str, aborted: bool = False) -> None:
        """The request ended here: stop replicating it and drop its replica (in the background;
        after an abort, only if no successor fences it: see the module docstring). A send in
        flight is let finish (cutting a frame would break the link other requests share)."""
        if aborted:
            self.aborted.add(request_id)
        task = self.inflight.get(request_id)
        if task is not None and not task.done():  # its `finally` cleans up once the send is out
            self.ended.add(request_id)
        else:
            self._cleanup(request_id)

    def _cleanup(self, request_id: str) -> None:
        fenced = request_id in self.fenced
        aborted = request_id in self.aborted
        self.aborted.discard(request_id)
        epoch = self.epochs.pop(request_id, 0)
        for table in (self.acked, self.gens, self.where, self.retry_at):
            table.pop(request_id, None)
        self.fenced.discard(request_id)
        stores = list(self.touched.pop(request_id, {}).values())  # a failed send may have left chunks anywhere
        if stores and not fenced:  # a fenced owner's replica is its successor's now
            self._spawn(self._drop_unless_fenced(stores, request_id, epoch) if aborted else
                        self._drop_all(stores, request_id, epoch))

    async def _drop_all(self, stores: list[ServiceInfo], request_id: str, epoch: int) -> None:
        """At once: a dead store tried first delayed the live one's drop (and the gateway drops
        only if this service dies meanwhile: see Router._watch_owner)."""
        await asyncio.gather(*(self._drop(store, request_id, epoch) for store in stores))

    async def _drop_unless_fenced(self, stores: list[ServiceInfo], request_id: str, epoch: int) -> None:
        await asyncio.sleep(DROP_GRACE_S)
        try:
            now = int((await self.requests.get(request_id)).get("epoch", epoch))
        except (RedisError, ValueError):
            now = epoch  # Redis cannot say: drop (a store that a successor fetched from refuses it anyway)
        if now > epoch:
            log.info("replica of %s left to the owner that fenced this service (epoch %d > %d)", request_id, now, epoch)
            return
        await self._drop_all(stores, request_id, epoch)

    async def _drop(self, store: ServiceInfo, request_id: str, epoch: int) -> None:
        if not store.url:  # known only by its KV address (a recovered request): look it up
            store = next((s for s in self._stores[1] if s.id == store.id), store)
            if not store.url:
                return  # gone: nothing of it to free
        try:
            await self.client.post(store.url + "/drop", content=DropRequest(request_id=request_id, epoch=epoch)
                                   .model_dump_json(), headers={"content-type": "application/json"}, timeout=10)
        except httpx.HTTPError as exc:
            log.warning("could not drop the replica of %s on %s: %s", request_id, store.id, exc)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
