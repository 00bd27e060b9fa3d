"""Prompt service HTTP API: thin handlers over PrefillEngine.

POST /prefill  PrefillRequest -> PrefillResult (after the token service acknowledged every layer)
POST /abort    AbortRequest   -> AbortResult
GET  /health, /metrics
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time

from fastapi import FastAPI

from common import metadata
from common.errors import install_error_handlers
from common.kv import make_transport
from common.kv.peers import Peers
from common.model import load_model, resolve_model_path
from common.protocol import AbortRequest, AbortResult, PrefillRequest, PrefillResult, ServiceInfo, ServiceKind
from common.runner import ModelRunner
from common.service import Lease, add_health_and_metrics, ready_line, request_id_var, supervise
from common.settings import PromptSettings
from prompt_service.engine import PrefillEngine

log = logging.getLogger(__name__)


def create_app(settings: PromptSettings) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        path = resolve_model_path(settings.model, progress=log.info)
        runner = ModelRunner(await asyncio.to_thread(load_model, path, settings.threads))
        transport = make_transport(settings.kv_transport)
        peers = Peers(transport)
        engine = app.state.engine = PrefillEngine(runner, settings, peers)
        redis = metadata.connect(settings.redis_url)
        started = time.time()

        def info() -> ServiceInfo:
            return ServiceInfo(kind=ServiceKind.PROMPT, id=app.state.service_id, url=app.state.url,
                               host=socket.gethostname(), pid=os.getpid(), model=str(path),
                               kv_transport=settings.kv_transport, max_model_len=settings.max_model_len,
                               active_requests=len(engine.jobs), started_at=started)

        lease = Lease(metadata.Registry(redis), info, settings)
        await lease.start()
        loop_task = supervise(asyncio.create_task(engine.run()), "prefill loop")
        log.info("prompt service ready: model %s, KV transport %s", path, settings.kv_transport)
        ready_line(ServiceKind.PROMPT, app.state.url)
        try:
            yield
        finally:
            loop_task.cancel()
            await lease.stop()
            await peers.close()
            await transport.close()
            await redis.aclose()

    app = FastAPI(title="DéjàVu prompt service", lifespan=lifespan)
    install_error_handlers(app)

    async def health() -> dict:
        return {"kind": "prompt", "requests": len(app.state.engine.jobs)}

    add_health_and_metrics(app, health)

    @app.post("/prefill")
    async def prefill(req: PrefillRequest) -> PrefillResult:
        request_id_var.set(req.request_id)
        return await app.state.engine.submit(req)

    @app.post("/abort")
    async def abort(req: AbortRequest) -> AbortResult:
        request_id_var.set(req.request_id)
        return AbortResult(request_id=req.request_id, found=app.state.engine.abort(req.request_id))

    return app
