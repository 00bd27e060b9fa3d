"""Prompt service HTTP API: thin handlers over PrefillEngine.

POST /prefill  PrefillRequest -> PrefillResult (after the token service acknowledged every layer)
POST /abort    AbortRequest   -> AbortResult
GET  /health, /metrics
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi import FastAPI

from common.errors import install_error_handlers
from common.kv import make_transport
from common.kv.peers import Peers
from common.model import load_model, model_fingerprint, resolve_model_path
from common.protocol import PROTOCOL, AbortRequest, AbortResult, PrefillRequest, PrefillResult, ServiceKind
from common.service import (CLUSTER_TOKEN, INTERNAL_MAX_BODY, BodyLimit, RequireSecret, add_health_and_metrics,
                            registered, request_id_var, supervise)
from common.settings import PromptSettings
from engine.runner import ModelRunner
from prompt_service.engine import PrefillEngine

log = logging.getLogger(__name__)


def create_app(settings: PromptSettings) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        path = resolve_model_path(settings.model, progress=log.info)
        model_id = model_fingerprint(path)  # the gateway routes only to services of this model
        model = await asyncio.to_thread(load_model, path, settings.threads, settings.dtype)
        # with our CPU kernels, though it never decodes: the causal attention and the fused small ops
        # are most of a prefill's non-GEMM time (docs/BENCHMARKS.md §5)
        runner = ModelRunner(model, settings.block_size, settings.max_model_len, turns=settings.cpu_turns)
        del model  # the runner keeps what it needs (our forward copies and packs the weights)
        transport = make_transport(settings.kv_transport, settings.cluster_token, settings.host)
        peers = Peers(transport, fault_rate=settings.inject_kv_faults)
        engine = app.state.engine = PrefillEngine(runner, settings, peers)
        loop_task = supervise(asyncio.create_task(engine.run()), "prefill loop")
        log.info("prompt service ready: model %s (%s, %s forward), KV transport %s", path, runner.dtype, runner.name,
                 settings.kv_transport)
        lease_fields = lambda: dict(model=str(path), model_id=model_id, protocol=PROTOCOL,  # noqa: E731
                                    kv_transport=settings.kv_transport,
                                    max_model_len=settings.max_model_len, active_requests=len(engine.jobs),
                                    dtype=runner.dtype_name)
        try:
            async with registered(app, settings, ServiceKind.PROMPT, lease_fields):
                yield
        finally:
            loop_task.cancel()
            await peers.close()
            await transport.close()

    app = FastAPI(title="DéjàVu prompt service", lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=INTERNAL_MAX_BODY)
    if settings.cluster_token:  # added last: it runs first
        app.add_middleware(RequireSecret, **CLUSTER_TOKEN, secrets=(settings.cluster_token,))

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
