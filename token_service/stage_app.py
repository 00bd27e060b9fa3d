"""A pipeline's processes (token_service/pipeline.py, prompt_service/pipeline.py): the stage workers'
own small service (`python -m token_service --stages S --stage K --pipeline ID`, K >= 1, and the
same for prompt_service), and how the head finds its stages in the registry and sets the pipeline up.

A stage worker serves GET /health and /metrics over HTTP; its work comes over the KV transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time

from fastapi import FastAPI

from common.errors import Unavailable
from common.kv import transport_for
from common.kv.transport import Transport, TransportError
from common.kv.peers import Peers
from common.metadata import Registry, RequestStore, connect
from common.model import model_fingerprint, resolve_model_path, within_context
from common.protocol import PROTOCOL, ServiceInfo, ServiceKind, cluster_fingerprint
from common.service import add_health_and_metrics, internal_app, listen_kv, registered, supervise
from common.settings import ModelSettings, PromptSettings
from engine.checkpoint import load_for_engine
from engine.runner import ModelRunner, stage_layers, teams_on_engine_threads_only
from token_service.pipeline import Pipeline, PipelineError, StageInfo
from token_service.room import kv_room
from token_service.stage import Stage

log = logging.getLogger(__name__)
RETRY_S = 5.0  # after a failed setup



def stage_fields(settings: ModelSettings, runner: ModelRunner) -> dict:
    """What the registry says of a pipeline's stage (the head's and the workers')."""
    if settings.stages == 1:
        return {}
    return dict(pipeline=settings.pipeline, stage=settings.stage, stages=settings.stages,
                layer_start=runner.layers.start, layer_end=runner.layers.stop, block_size=runner.block_size,
                num_blocks=kv_room(settings, runner)[0])


@contextlib.asynccontextmanager
async def _stage_lifespan(app: FastAPI, settings: ModelSettings):
    path = resolve_model_path(settings.model, progress=log.info, weights=True)
    settings = within_context(settings, path)
    model_id = model_fingerprint(path)
    threads = teams_on_engine_threads_only(settings.threads)
    model = await asyncio.to_thread(load_for_engine, path, settings.dtype)
    layers = stage_layers(model.config.num_hidden_layers, settings.stages, settings.stage)
    side = "prompt" if isinstance(settings, PromptSettings) else "token"
    # a token stage's decode steps replay CUDA graphs on a GPU, as a token service's do; a prompt
    # stage's prefill streams its KV out layer by layer and has none to replay
    graphs = settings.cuda_graphs if side == "token" else False
    runner = ModelRunner(model, settings.block_size, settings.max_model_len, turns=settings.cpu_turns, layers=layers,
                         threads=threads, cuda_graphs=graphs, max_batch=settings.max_seqs if graphs is not False else 1)
    del model
    transport = transport_for(settings)
    num_blocks, device_blocks = kv_room(settings, runner)
    if side == "prompt":
        from prompt_service.pipeline import PromptStage

        stage = PromptStage(runner, settings.stage, settings.stages, model_id, transport, settings)
    else:
        stage = Stage(runner, num_blocks, settings.stage, settings.stages, model_id, transport, device_blocks,
                      Peers(transport, fault_rate=settings.inject_kv_faults))
    app.state.stage = stage
    address = await listen_kv(transport, stage.handle, settings)
    pool = (f"KV pool {stage.num_blocks} blocks x {runner.block_size} tokens ({stage.pool.nbytes / 2**20:.0f} MiB)"
            if stage.num_blocks else "no KV pool: each layer's KV goes on to the token stage that holds the layer")
    log.info("%s pipeline %s, stage %d of %d ready: layers [%d, %d)%s of model %s (%s), %s, on %s (%s)", side,
             settings.pipeline, settings.stage, settings.stages, layers.start, layers.stop,
             " and the LM head" if runner.last else "", path, runner.dtype, pool, address, settings.kv_transport)
    if stage.swap:
        log.info("--swap: KV pool in host memory, %d device blocks (%.0f MiB) for the step computing and the next",
                 stage.swap.device_blocks, stage.swap.device.nbytes / 2**20)
    fields = lambda: dict(  # noqa: E731
        model=str(path), model_id=model_id, protocol=PROTOCOL, kv_address=address, kv_transport=settings.kv_transport,
        max_model_len=settings.max_model_len, dtype=runner.dtype_name, **stage_fields(settings, runner))
    try:
        async with registered(app, settings, ServiceKind.STAGE, fields) as redis:
            stage.requests = RequestStore(redis)  # each stage records its own layers' replicated index
            stage.registry = Registry(redis, cluster_fingerprint(settings.cluster_token))  # this cluster's stores
            yield
    finally:
        await stage.close()
        await transport.close()


def create_stage_app(settings: ModelSettings) -> FastAPI:
    side = "prompt" if isinstance(settings, PromptSettings) else "token"
    app = internal_app(f"DéjàVu {side} pipeline stage", settings, lambda app: _stage_lifespan(app, settings))

    async def health() -> dict:
        stage: Stage = app.state.stage
        return {"kind": "stage", "pipeline": settings.pipeline, "stage": stage.stage, "stages": stage.stages,
                "layers": [stage.runner.layers.start, stage.runner.layers.stop], "linked": stage.linked,
                "steps": stage.steps}

    add_health_and_metrics(app, health)
    return app


# -- the head ---------------------------------------------------------------------------------------

async def open_pipeline(transport: Transport, runner: ModelRunner, settings: ModelSettings, model_id: str,
                        service_id: str, kind: ServiceKind = ServiceKind.TOKEN, cls: type[Pipeline] = Pipeline) -> Pipeline:
    """Wait for stages 1..S-1 of our pipeline in the registry, then link and set them up (again,
    while a stage found there turns out dead or not ready). A stage whose model, dtype or layers
    differ from ours is skipped, and said so. While another head of the same pipeline is
    registered (two token services given one --pipeline), we wait: its stages are its own."""
    redis = connect(settings.redis_url, timeout_s=min(5.0, settings.lease_ttl_s / 2))
    registry = Registry(redis, cluster_fingerprint(settings.cluster_token))
    num_blocks, device_blocks = kv_room(settings, runner)
    setup = dict(pipeline=settings.pipeline, model_id=model_id, dtype=runner.dtype_name, block_size=runner.block_size,
                 num_blocks=num_blocks, stages=settings.stages, device_blocks=device_blocks)
    started, said, refused = time.monotonic(), 0.0, set()
    try:
        while True:
            try:
                found = await _find_stages(registry, settings, runner, model_id, refused)
                heads = [s.id for s in await registry.services(kind)
                         if s.stages > 1 and s.pipeline == settings.pipeline and s.id != service_id]
            except Unavailable as exc:
                found, why = None, f"the registry: {exc}"
            else:
                absent = [str(k) for k in range(1, settings.stages) if k not in found]
                why = f"stage(s) {', '.join(absent)} not registered" if absent else ""
                if heads:
                    found, why = None, (f"another {kind.value} service, {heads[0]}, heads this pipeline (one "
                                        "head per --pipeline)")
            if found is not None and not why:
                stages = [StageInfo(0, "", runner.layers)] + [found[k] for k in range(1, settings.stages)]
                pipeline = cls(transport, runner, stages, on_broken=lambda: _die(pipeline, f"the {kind.value} pipeline"))
                try:
                    await pipeline.open(setup)
                    log.info("pipeline %s linked: %s", settings.pipeline,
                             ", ".join(f"stage {s.stage} layers [{s.layers.start}, {s.layers.stop}) at "
                                       f"{s.address or 'here'}" for s in stages))
                    pipeline.watch_leases(registry)  # the pipeline's now: it closes the connection
                    redis = None
                    return pipeline
                except (TransportError, PipelineError, asyncio.TimeoutError) as exc:
                    why = f"{type(exc).__name__}: {exc}"
                    await pipeline.close()
                    log.warning("pipeline %s: %s; trying again in %.0f s", settings.pipeline, why, RETRY_S)
                    await asyncio.sleep(RETRY_S)  # a stage that refused, or a dead one whose lease has not lapsed
            if time.monotonic() - said >= 5.0:
                said = time.monotonic()
                log.info("pipeline %s: waiting (%.0f s): %s", settings.pipeline, said - started, why)
            await asyncio.sleep(0.5)
    finally:
        if redis is not None:
            await redis.aclose()


async def _find_stages(registry: Registry, settings: ModelSettings, runner: ModelRunner, model_id: str,
                       refused: set[str]) -> dict[int, StageInfo]:
    """The newest live registration of each stage of our pipeline that fits this head."""
    found: dict[int, ServiceInfo] = {}
    num_blocks = kv_room(settings, runner)[0]
    for info in await registry.services(ServiceKind.STAGE):
        if info.pipeline != settings.pipeline:
            continue
        want = stage_layers(runner.kv.layers, settings.stages, info.stage) if 0 < info.stage < settings.stages else None
        wrong = (f"model {info.model_id} (ours {model_id})" if info.model_id != model_id else
                 f"dtype {info.dtype} (ours {runner.dtype_name})" if info.dtype != runner.dtype_name else
                 f"{info.stages} stages (ours {settings.stages})" if info.stages != settings.stages else
                 f"KV transport {info.kv_transport} (ours {settings.kv_transport})" if info.kv_transport != settings.kv_transport else
                 f"layers [{info.layer_start}, {info.layer_end})" if want != range(info.layer_start, info.layer_end) else
                 f"KV pool {info.num_blocks} blocks of {info.block_size} (ours {num_blocks} of {runner.block_size}: "
                 "--kv-blocks, --kv-device-bytes, --swap, --max-seqs, --max-model-len and --block-size must agree)"
                 if (info.num_blocks, info.block_size) != (num_blocks, runner.block_size) else "")
        if wrong:
            if info.id not in refused:
                refused.add(info.id)
                log.error("pipeline %s: stage %d (%s) does not fit this head: %s", settings.pipeline, info.stage,
                          info.id, wrong)
            continue
        if info.stage not in found or info.started_at > found[info.stage].started_at:
            found[info.stage] = info
    return {k: StageInfo(k, s.kv_address, range(s.layer_start, s.layer_end), s.id, s.url) for k, s in found.items()}


def _die(pipeline: Pipeline, what: str) -> None:
    """A broken pipeline ends its head: the decode loop would fail at its next step anyway, and an
    idle head must not stay registered as a token service that cannot compute."""
    async def fail() -> None:
        raise pipeline.broken

    # said already ("pipeline broken: ..."); in a context of its own: _break may run in a request's
    supervise(asyncio.get_running_loop().create_task(fail(), context=contextvars.Context()), what,
              expected=(TransportError,))


__all__ = ["create_stage_app", "open_pipeline", "stage_fields"]
