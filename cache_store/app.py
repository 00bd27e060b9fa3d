"""Cache store HTTP API and KV listener.

KV transport: "kv" messages are stored and acknowledged (an "error" answers a fenced epoch).
POST /drop   AbortRequest -> AbortResult   (the request ended: free its replica)
GET  /health, /metrics
"""

from __future__ import annotations

import contextlib
import logging

from fastapi import FastAPI

from cache_store.store import ReplicaStore, StaleEpoch
from common.errors import install_error_handlers
from common.kv import make_transport
from common.kv.receiver import kv_server
from common.protocol import AbortRequest, AbortResult, ServiceKind
from common.service import registered, add_health_and_metrics, listen_kv, request_id_var
from common.settings import CacheStoreSettings

log = logging.getLogger(__name__)


def create_app(settings: CacheStoreSettings) -> FastAPI:
    store = ReplicaStore()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        transport = make_transport(settings.kv_transport)
        kv_address = await listen_kv(transport, kv_server(store.put, (StaleEpoch,), request_id_var), settings)
        log.info("cache store ready: KV on %s (%s), %d MiB in memory", kv_address, settings.kv_transport,
                 settings.memory_bytes >> 20)
        lease_fields = lambda: dict(  # noqa: E731
            kv_address=kv_address, kv_transport=settings.kv_transport, active_requests=len(store.replicas),
            kv_bytes_used=store.bytes_held, kv_bytes_free=max(settings.memory_bytes - store.bytes_held, 0))
        try:
            async with registered(app, settings, ServiceKind.CACHE_STORE, lease_fields):
                yield
        finally:
            await transport.close()

    app = FastAPI(title="DéjàVu cache store", lifespan=lifespan)
    install_error_handlers(app)

    async def health() -> dict:
        return {"kind": "cache_store", "replicas": len(store.replicas), "bytes_held": store.bytes_held}

    add_health_and_metrics(app, health)

    @app.post("/drop")
    async def drop(req: AbortRequest) -> AbortResult:
        return AbortResult(request_id=req.request_id, found=store.drop(req.request_id))

    return app
