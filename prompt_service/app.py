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

from common import grammar
from common.kv import transport_for
from common.kv.peers import Peers
from common.model import model_fingerprint, resolve_model_path, within_context
from common.protocol import (PROTOCOL, AbortRequest, AbortResult, PrefillRequest, PrefillResult, PrefixCacheReset,
                             ServiceKind)
from common.service import add_health_and_metrics, internal_app, registered, request_id_var, supervise
from common.settings import PromptSettings
from engine import prefix_cache
from engine.checkpoint import load_for_engine
from engine.runner import ModelRunner, stage_layers, teams_on_engine_threads_only
from prompt_service.engine import PrefillEngine
from prompt_service.pipeline import PromptPipeline
from token_service.stage_app import create_stage_app, open_pipeline, stage_fields

log = logging.getLogger(__name__)


def create_app(settings: PromptSettings) -> FastAPI:
    if settings.stage > 0:  # a stage worker of a prompt pipeline (prompt_service/pipeline.py)
        return create_stage_app(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        nonlocal settings
        path = resolve_model_path(settings.model, progress=log.info, weights=True)
        grammar.use_model(path)  # structured output: its tokenizer, read on the first grammar
        settings = within_context(settings, path)
        model_id = model_fingerprint(path)  # the gateway routes only to services of this model
        threads = teams_on_engine_threads_only(settings.threads)
        model = await asyncio.to_thread(load_for_engine, path, settings.dtype)
        # with our CPU kernels, though it never decodes: the causal attention and the fused small ops
        # are most of a prefill's non-GEMM time (docs/BENCHMARKS.md §5)
        runner = ModelRunner(model, settings.block_size, settings.max_model_len, turns=settings.cpu_turns,
                             layers=stage_layers(model.config.num_hidden_layers, settings.stages, 0), threads=threads,
                             cuda_graphs=False)  # a prefill's KV streams out layer by layer: no decode step to replay
        del model  # the runner keeps what it needs (our forward copies and packs the weights)
        transport = transport_for(settings)
        peers = Peers(transport, fault_rate=settings.inject_kv_faults)
        engine = app.state.engine = PrefillEngine(runner, settings, peers)
        tasks: list[asyncio.Task] = []
        lease_fields = lambda: dict(model=str(path), model_id=model_id, protocol=PROTOCOL,  # noqa: E731
                                    kv_transport=settings.kv_transport,
                                    max_model_len=settings.max_model_len, active_requests=len(engine.jobs),
                                    dtype=runner.dtype_name, **stage_fields(settings, runner))

        def start() -> None:
            tasks.append(supervise(asyncio.create_task(engine.run()), "prefill loop"))
            log.info("prompt service ready: model %s (%s, %s forward), KV transport %s%s", path, runner.dtype,
                     runner.name, settings.kv_transport,
                     f", layers [0, {runner.layers.stop}) of a {settings.stages}-stage pipeline" if settings.stages > 1 else "")

        async def link_and_register() -> None:
            """A pipeline's head: link its stages first (outside uvicorn's start-up: SIGTERM works)."""
            engine.pipeline = await open_pipeline(transport, runner, settings, model_id, app.state.service_id,
                                                  ServiceKind.PROMPT, PromptPipeline)
            start()
            async with registered(app, settings, ServiceKind.PROMPT, lease_fields):
                await asyncio.Event().wait()

        try:
            if settings.stages > 1:
                tasks.append(supervise(asyncio.create_task(link_and_register()), "the prompt pipeline"))
                yield
            else:
                start()
                async with registered(app, settings, ServiceKind.PROMPT, lease_fields):
                    yield
        finally:
            for task in reversed(tasks):
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if engine.pipeline is not None:
                await engine.pipeline.close()
            await peers.close()
            await transport.close()

    app = internal_app("DéjàVu prompt service", settings, lifespan)

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

    @app.post("/prefix_cache/reset")
    async def reset_prefix_cache() -> PrefixCacheReset:
        """Forget the prefix cache's blocks (the gateway's /reset_prefix_cache and /flush_cache)."""
        blocks, size = prefix_cache.reset(app.state.engine.prefix_cache)
        return PrefixCacheReset(blocks=blocks, bytes=size)

    return app
