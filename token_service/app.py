"""Token service HTTP API: thin handlers over TokenEngine.

POST /reserve  ReserveRequest -> Reservation (503 kv_full when there is no room)
POST /prefill  PrefillRequest -> PrefillResult (colocated mode: the reserved row's KV computed here)
POST /restore  RestoreRequest -> RestoreResult (recovery: the reserved row's KV from a replica)
POST /decode   DecodeRequest  -> NDJSON stream of DecodeEvent, one per token, and a blank line per
                                 replayed token (keep-alive while a resumed request catches up); ends at finish
POST /abort    AbortRequest   -> AbortResult
GET  /health, /metrics
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import httpx
from fastapi import FastAPI

from common import grammar
from common.kv import transport_for
from common.kv.peers import Peers
from common.kv.receiver import kv_server
from common.metadata import RecentServices, Registry, RequestStore
from common.model import model_fingerprint, resolve_model_path, within_context
from common.protocol import (PROTOCOL, AbortRequest, AbortResult, DecodeEvent, DecodeRequest, PrefillRequest,
                             PrefillResult, PrefixCacheReset, Reservation, ReserveRequest, RestoreRequest, RestoreResult,
                             ServiceKind, cluster_fingerprint)
from common.service import (ClosingStreamingResponse, add_health_and_metrics, cluster_headers, internal_app, listen_kv,
                            registered, request_id_var, supervise)
from common.settings import TokenSettings
from engine import prefix_cache
from engine.checkpoint import load_for_engine
from engine.runner import ModelRunner, stage_layers, teams_on_engine_threads_only
from token_service.engine import KVMessageError, TokenEngine, outputs_before
from token_service.stage_app import create_stage_app, open_pipeline, stage_fields
from token_service.replicator import Replicator
from token_service.sequence import Sequence

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI, settings: TokenSettings):
    """Load the model, start the KV listener and the decode loop, register; undo it all on the way out."""
    path = resolve_model_path(settings.model, progress=log.info, weights=True)
    grammar.use_model(path)  # structured output: its tokenizer, read on the first grammar
    settings = within_context(settings, path)
    model_id = model_fingerprint(path)  # the gateway routes only to services of this model
    threads = teams_on_engine_threads_only(settings.threads)
    model = await asyncio.to_thread(load_for_engine, path, settings.dtype, settings.compile)
    runner = ModelRunner(model, settings.block_size, settings.max_model_len, compile=settings.compile, threads=threads,
                         cuda_graphs=settings.cuda_graphs, max_batch=settings.max_seqs,
                         turns=settings.cpu_turns, layers=stage_layers(model.config.num_hidden_layers, settings.stages, 0))
    del model  # the runner keeps what it needs (our forward copies and packs the weights)
    engine = app.state.engine = TokenEngine(runner, settings, app.state.service_id)
    transport = engine.transport = transport_for(settings)
    kv_address = engine.kv_address = await listen_kv(
        transport, kv_server(engine.receive_kv, (KVMessageError,), request_id_var,  # nothing over one whole sequence
                             max_payload=runner.kv.bytes_per_token * settings.max_model_len), settings)
    lease_fields = lambda: dict(  # noqa: E731
        model=str(path), model_id=model_id, protocol=PROTOCOL, kv_address=kv_address,
        kv_transport=settings.kv_transport, max_model_len=settings.max_model_len, colocated=settings.colocated, dtype=runner.dtype_name,
        active_requests=len(engine.scheduler.seqs),
        kv_bytes_used=engine.kv_bytes_used, kv_bytes_free=engine.kv_bytes_free, **stage_fields(settings, runner))
    peers = Peers(transport, fault_rate=settings.inject_kv_faults)
    client = httpx.AsyncClient(headers=cluster_headers(settings))  # the replicator's /drop calls to cache stores
    tasks: list[asyncio.Task] = []

    def start_decoding() -> None:
        tasks.append(supervise(asyncio.create_task(engine.run()), "decode loop"))
        log.info("token service ready: model %s (%s, %s forward), KV pool %d blocks x %d tokens (%.0f MiB), up to %d "
                 "sequences, KV on %s (%s)%s%s", path, runner.dtype, runner.name, engine.blocks.num_blocks,
                 runner.block_size, engine.pool.nbytes / 2**20, settings.max_seqs, kv_address, settings.kv_transport,
                 (", colocated: prefills here too" + (f", prefix cache {settings.prefix_cache_mib} MiB"
                                                      if engine.prefills.cache else "")) if settings.colocated else "",
                 f"; --swap: the pool in host memory, {engine.swap.device_blocks} device blocks "
                 f"({engine.swap.device.nbytes / 2**20:.0f} MiB), {engine.microbatches} steps in flight"
                 if engine.swap else "")

    async def link_and_register() -> None:
        """A pipeline's head: find and link its stages (as long as they take to come), then decode
        and register. In a task of its own, not in the lifespan's start-up: uvicorn acts on a
        SIGTERM only once start-up is over, and a head waiting for its stages must still stop."""
        engine.pipeline = await open_pipeline(transport, runner, settings, model_id, app.state.service_id)
        start_decoding()
        async with registered(app, settings, ServiceKind.TOKEN, lease_fields) as redis:
            start_replicating(redis)
            await asyncio.Event().wait()  # until cancelled, at shutdown

    def start_replicating(redis) -> None:
        registry = Registry(redis, cluster_fingerprint(settings.cluster_token))  # this cluster's stores only
        stores = RecentServices(registry, settings.lease_ttl_s)  # a Redis restart forgets no store
        engine.registry = registry
        engine.replicator = Replicator(engine.pool, runner.block_size, peers, stores, RequestStore(redis), client,
                                       settings.replicate_every, runner.layers, runner.kv.layers,
                                       engine.pipeline.replicate if engine.pipeline else None)

    try:
        if settings.stages > 1:
            tasks.append(supervise(asyncio.create_task(link_and_register()), "the token pipeline"))
            yield
        else:
            start_decoding()
            async with registered(app, settings, ServiceKind.TOKEN, lease_fields) as redis:
                start_replicating(redis)
                yield
    finally:
        for task in reversed(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if engine.pipeline is not None:
            await engine.pipeline.close()
        if engine.swap:
            engine.swap.close()
        await peers.close()
        await client.aclose()
        await transport.close()


def create_app(settings: TokenSettings) -> FastAPI:
    if settings.stage > 0:
        return create_stage_app(settings)
    app = internal_app("DéjàVu token service", settings, lambda app: _lifespan(app, settings))

    async def health() -> dict:
        engine: TokenEngine = app.state.engine
        return {"kind": "token", "requests": len(engine.scheduler.seqs), "kv_blocks_free": engine.blocks.num_uncommitted}

    add_health_and_metrics(app, health)

    @app.post("/reserve")
    async def reserve(req: ReserveRequest) -> Reservation:
        request_id_var.set(req.request_id)
        return app.state.engine.reserve(req)

    @app.post("/decode")
    async def decode(req: DecodeRequest) -> ClosingStreamingResponse:
        request_id_var.set(req.request_id)
        await app.state.engine.collect_landed(req.request_id)  # a pipeline's stages: their prompt KV
        matcher = await app.state.engine.start_grammar(req.sampling, outputs_before(req))
        return _decode_stream(app.state.engine, req, matcher)

    @app.post("/prefill")
    async def prefill(req: PrefillRequest) -> PrefillResult:
        request_id_var.set(req.request_id)
        return await app.state.engine.prefill(req)

    @app.post("/restore")
    async def restore(req: RestoreRequest) -> RestoreResult:
        request_id_var.set(req.request_id)
        result = await app.state.engine.restore(req)
        log.info("restored from replica on %s: %d tokens fetched (%.1f ms), %d to replay", req.store_id,
                 result.fetched, result.fetch_ms, result.recomputed)
        return result

    @app.post("/abort")
    async def abort(req: AbortRequest) -> AbortResult:
        request_id_var.set(req.request_id)
        return AbortResult(request_id=req.request_id, found=app.state.engine.abort(req.request_id, req.attempt))

    @app.post("/prefix_cache/reset")
    async def reset_prefix_cache() -> PrefixCacheReset:
        """Forget the prefix cache's blocks (the gateway's /reset_prefix_cache and /flush_cache)."""
        blocks, size = prefix_cache.reset(app.state.engine.prefix_cache)
        return PrefixCacheReset(blocks=blocks, bytes=size)

    return app


def _decode_stream(engine: TokenEngine, req: DecodeRequest, matcher) -> ClosingStreamingResponse:
    seq = engine.start_decode(req, matcher)

    async def on_close() -> None:  # the gateway went away (or the stream ended): free the row
        engine.abort_seq(seq)

    return ClosingStreamingResponse(_events(engine, seq), on_close, media_type="application/x-ndjson")


async def _events(engine: TokenEngine, seq: Sequence):
    """The decode stream; if the gateway goes away mid-stream the request is aborted here. A blank
    line for each token replayed (a resume) tells the gateway the stream is alive meanwhile."""
    finished = False
    try:
        while True:
            event: DecodeEvent | None = await seq.events.get()
            if event is None:
                yield "\n"
                continue
            yield event.model_dump_json(exclude_none=True) + "\n"
            if event.error or (event.token and event.token.finish_reason):
                finished = True
                return
    finally:
        if not finished:
            request_id_var.set(seq.request_id)
            log.info("decode stream closed before the end: aborting")
            engine.abort_seq(seq)
