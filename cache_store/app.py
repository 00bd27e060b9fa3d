"""Cache store HTTP API and KV listener.

KV transport: "kv" messages are stored and acknowledged; "fetch" messages are answered with the
replica's tokens as one "kv" message, in the dtype they were put in (e.g. "bfloat16"); a refusal
(fenced epoch, gap, no replica) is an "error".
POST /drop   DropRequest -> AbortResult    (the request ended: free its replica)
GET  /replicas/{request_id}  what is held for one request (tokens, epoch, bytes): for tests and operators
GET  /health, /metrics
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi import FastAPI

from cache_store.store import Refused, ReplicaStore
from common.errors import NotFound
from common.kv import transport_for
from common.kv.receiver import kv_server
from common.kv.wire import Header
from common.protocol import AbortResult, DropRequest, ServiceKind
from common.service import (add_health_and_metrics, internal_app, keep_freed_memory, listen_kv, registered,
                            request_id_var, supervise)
from common.settings import CacheStoreSettings

log = logging.getLogger(__name__)


def _layers(fetch: Header) -> range | None:
    """The layers a fetch asks for: [layer_start, layer_end), or every one the replica has (0, 0)."""
    return range(fetch.layer_start, fetch.layer_end) if fetch.layer_end else None


MAX_MESSAGE_BYTES = 16 << 30  # one replica message: a whole sequence's KV of any model we serve, not a claimed
#                               terabyte. Not --memory-bytes: a first message is the whole prefix, and refusing it
#                               would close the link every other request to this store shares, again and again


async def _expire(store: ReplicaStore) -> None:
    """Drop orphaned replicas (see cache_store/store.py), checking a few times per TTL."""
    while True:
        await asyncio.sleep(min(store.ttl_s / 4, 10.0))
        for request_id in store.expire():
            log.info("replica of %s expired: not written to or fetched for %.0f s", request_id, store.ttl_s)


def create_app(settings: CacheStoreSettings) -> FastAPI:
    store = ReplicaStore(settings.memory_bytes, settings.spill_dir, settings.replica_ttl_s)
    # dropped replicas' memory serves the next ones (docs/BENCHMARKS.md §5: fewer page faults)
    memory_kept = keep_freed_memory(settings.memory_bytes)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        transport = transport_for(settings)
        handler = kv_server(store.put, (Refused,), request_id_var,  # fetch -> (raw array, dtype name)
                            fetch=lambda h: store.fetch(h.request_id, h.epoch, h.token_end, _layers(h)),
                            max_payload=MAX_MESSAGE_BYTES)
        kv_address = await listen_kv(transport, handler, settings)
        log.info("cache store ready: KV on %s (%s), %d MiB in memory, spilling to %s", kv_address,
                 settings.kv_transport, settings.memory_bytes >> 20, settings.spill_dir or "a temporary folder")
        if memory_kept:  # logged here: logging is configured once the app is built
            log.info("freed replica memory is not kept for the next replicas (%s): each new one faults its pages in",
                     memory_kept)
        lease_fields = lambda: dict(  # noqa: E731
            kv_address=kv_address, kv_transport=settings.kv_transport, active_requests=len(store.replicas),
            kv_bytes_used=store.bytes_held + store.bytes_spilled,
            kv_bytes_free=max(settings.memory_bytes - store.bytes_held, 0))
        expiry = supervise(asyncio.create_task(_expire(store)), "replica expiry")
        try:
            async with registered(app, settings, ServiceKind.CACHE_STORE, lease_fields):
                yield
        finally:
            expiry.cancel()
            await transport.close()
            store.close()

    app = internal_app("DéjàVu cache store", settings, lifespan)

    async def health() -> dict:
        return {"kind": "cache_store", "replicas": len(store.replicas), "bytes_held": store.bytes_held,
                "bytes_spilled": store.bytes_spilled}

    add_health_and_metrics(app, health)

    @app.post("/drop")
    async def drop(req: DropRequest) -> AbortResult:
        request_id_var.set(req.request_id)
        return AbortResult(request_id=req.request_id, found=store.drop(req.request_id, req.epoch))

    @app.get("/replicas/{request_id}")
    async def replica(request_id: str) -> dict:
        held = store.replicas.get(request_id)
        if held is None:
            raise NotFound(f"no replica of request {request_id} here")
        return {"request_id": request_id, "tokens": held.tokens, "epoch": held.epoch,
                "chunks": len(held.chunks)}

    return app
