"""Serving a request's jobs (gateway/jobs.py) once its handler in gateway/app.py has made them:
record it in Redis, answer it whole or as a stream (`form` writes either in its API's shape), its
choices merged (n > 1, a batch of prompts), a keep-alive while a stream is quiet (a failover's
pause), cancellation downstream when the client leaves, and its outcome counted and recorded once.
Every answer carries its request ids in its headers (RequestIds)."""

from __future__ import annotations

import asyncio
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from common.errors import DejavuError, ShuttingDown, error_body
from common.service import ClosingStreamingResponse, printable, request_id_var
from gateway.jobs import IN_FLIGHT, REQUESTS, Delta, Job, deltas
from gateway.responses import Totals, sse

log = logging.getLogger(__name__)
STOPPING = "the server is stopping (--stop-grace-s ran out)"  # a request ended so: ShuttingDown's message


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def serve(app: FastAPI, jobs: list[Job], request: Request, form):
    """A request's answer, written as `form` says (responses.CHAT, COMPLETION, a ResponsesForm):
    of its one job, or merged from its choices' (a batch of prompts, n > 1)."""
    request.state.request_ids = [job.request_id for job in jobs]  # the answer's headers (RequestIds)
    request_id_var.set(jobs[0].request_id)
    if client_id := _client_id(request):
        log.info("the client's X-Request-Id %r is request %s", client_id, ", ".join(request.state.request_ids))
    if len(jobs) > 1:
        return await _serve_choices(app, jobs, request, form)
    job = jobs[0]
    request_id_var.set(job.request_id)
    await start(app, job, form.name)
    gen = deltas(app.state.router, app.state.tokenizer, job)
    if not job.stream:
        return await _with_cancellation(_collect(app, job, gen, form), request, _stopped(app))
    try:  # the first token before any header: routing errors still get their own status
        first = await _with_cancellation(anext(gen), request, _stopped(app))
    except BaseException as exc:
        await gen.aclose()
        await finish(app, job, None, exc)
        raise
    stream = _stream(app, job, gen, first, form.writer(job, app.state.tokenizer), getattr(form, "keep", None))

    async def on_close() -> None:  # runs even if the client left before the body started
        await stream.aclose()
        await gen.aclose()
        await finish(app, job, None, ClientGone())

    return ClosingStreamingResponse(stream, on_close, media_type="text/event-stream")


def _client_id(request: Request) -> str:
    """The client's own X-Request-Id, for the log (printable, 128 characters at most). Never used
    as the request's id: two clients could send the same one, and it names the request's KV and its
    records in Redis."""
    return printable(request.headers.get("x-request-id", ""))


class RequestIds:
    """ASGI middleware: the answer to a request that was served (its choices' ids in
    `request.state.request_ids`, set by serve) carries them in `x-request-id` (OpenAI's header, the
    openai SDK's `_request_id`) and `request-id` (Anthropic's), errors after that point included (a
    bug's 500 too, written here: Starlette writes it outside every middleware): the ids every log
    line of the request carries. The first MAX_IDS of a request of more choices (a header past a
    few KiB is a 502 at proxies that buffer 4 KiB of them)."""

    MAX_IDS = 16

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        started = False

        async def with_ids(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if ids := state.get("request_ids"):
                    value = ", ".join(ids[:self.MAX_IDS]).encode()
                    message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", value),
                                                      (b"request-id", value)]}
            await send(message)

        try:
            await self.app(scope, receive, with_ids)
        except Exception as exc:
            if not started and state.get("request_ids"):  # the handler outside logs it and writes nothing more
                await JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"),
                                   status_code=500)(scope, receive, with_ids)
            raise


async def start(app: FastAPI, job: Job, kind: str) -> None:
    """Record the request in Redis and count it in flight."""
    await app.state.store.create(job.request_id, {"prompt_tokens": len(job.prompt_ids), "status": "running",
                                                   "sampling": job.sampling.model_dump(), "stream": job.stream},
                                 wait_s=app.state.redis_grace_s)  # a Redis restart costs a pause, not a 503
    log.info("%s: %d prompt tokens, max_tokens %d, stream %s", kind,
             len(job.prompt_ids), job.sampling.max_tokens, job.stream)
    app.state.active[job.request_id] = job
    IN_FLIGHT.set(len(app.state.active))


async def _serve_choices(app: FastAPI, jobs: list[Job], request: Request, form):
    """Several choices: each job is a request of its own downstream (admitted, routed, resumed
    alone; its logs carry its own id), in a task of its own. The first to fail ends the request
    and aborts the others; a stream starts once every choice has its first token. `form` writes
    them as one answer (`merged`) or one stream (a `writer` a choice, by index)."""
    log.info("%d choices: requests %s", len(jobs), ", ".join(job.request_id for job in jobs))
    for job in jobs:
        await start(app, job, form.name)
    gens = [deltas(app.state.router, app.state.tokenizer, job) for job in jobs]

    async def close_all(error: BaseException | None, totals: list[Totals] | None = None) -> None:
        for i, (job, gen) in enumerate(zip(jobs, gens)):
            await gen.aclose()
            await finish(app, job, totals[i] if totals else None, error)

    async def first(job: Job, gen) -> Delta | Totals:  # a stream's first delta, or the whole answer
        request_id_var.set(job.request_id)
        return await anext(gen) if job.stream else await totals_of(gen)

    try:
        results = await _with_cancellation(_all(first(job, gen) for job, gen in zip(jobs, gens)), request,
                                           _stopped(app))
    except BaseException as exc:
        await close_all(exc)
        raise
    share_prompt_scores(jobs, results)
    if not jobs[0].stream:
        await close_all(None, results)
        return JSONResponse(form.merged(jobs, results, app.state.tokenizer))
    stream = _stream_choices(app, jobs, gens, results, form)

    async def on_close() -> None:  # runs even if the client left before the body started
        await stream.aclose()
        await close_all(ClientGone())

    return ClosingStreamingResponse(stream, on_close, media_type="text/event-stream")


def share_prompt_scores(jobs: list[Job], firsts: list[Delta | Totals]) -> None:
    """Echo with logprobs and n > 1: a prompt is scored once, by its choice 0 (the job `choice`
    places before), and its other choices show the same scores."""
    for i, job in enumerate(jobs):
        if job.choice and jobs[i - job.choice].scored is not None:
            firsts[i].prompt = firsts[i - job.choice].prompt


async def totals_of(gen) -> Totals:
    totals = Totals()
    async for delta in gen:
        totals.add(delta)
    return totals


async def _all(coros):
    """Every coroutine's result, in order, each run in a task of its own; the first to fail cancels
    the others and its error is raised."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _stream_choices(app: FastAPI, jobs: list[Job], gens: list, firsts: list, form):
    """SSE chunks of every choice as they come, each with its index; one usage chunk at the end."""
    writers = [form.writer(job, app.state.tokenizer, index=i, stream_id=jobs[0].request_id) for i, job in enumerate(jobs)]
    totals, error, queue = [Totals() for _ in jobs], None, asyncio.Queue()

    async def pump(i: int) -> None:  # a choice's deltas into the queue, then None, or its error
        request_id_var.set(jobs[i].request_id)
        try:
            async for delta in gens[i]:
                queue.put_nowait((i, delta))
            queue.put_nowait((i, None))
        except Exception as exc:  # noqa: BLE001 - handed to the stream, which ends the request with it
            queue.put_nowait((i, exc))

    def stop(_) -> None:  # the server's stop grace ran out: the stream ends with an error event
        queue.put_nowait((0, ShuttingDown(STOPPING)))

    pumps, running, finished, stopped = [], len(jobs), set(), _stopped(app)
    if stopped is not None:
        stopped.add_done_callback(stop)
    try:
        for i, (writer, delta) in enumerate(zip(writers, firsts)):
            for chunk in writer.first(delta):
                yield chunk
            queue.put_nowait((i, delta))
        pumps = [asyncio.ensure_future(pump(i)) for i in range(len(jobs))]
        while running:
            try:
                async with asyncio.timeout(KEEPALIVE_S):  # (not wait_for, which on 3.11 can swallow the
                    i, delta = await queue.get()          # cancel of a client gone as a token comes)
            except TimeoutError:  # (a writer's own: of a choice still running, whose pause this is)
                yield keepalive(next((w for i, w in enumerate(writers) if i not in finished), writers[0]))
                continue
            if delta is None:
                running -= 1
                finished.add(i)
            elif isinstance(delta, Exception):
                raise delta
            else:
                totals[i].add(delta)
                if (chunk := writers[i].delta(delta)) is not None:
                    yield chunk
        if jobs[0].include_usage:
            yield writers[0].usage(totals, jobs)
    except DejavuError as exc:
        error = exc
        log.warning("stream failed: %s", exc.message)
        yield sse(exc.client_body(jobs[0].request_id))
    except BaseException as exc:  # client gone (cancelled) or a bug: record it, let it propagate
        error = exc
        raise
    finally:
        if stopped is not None:
            stopped.remove_done_callback(stop)
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        for i, (job, gen) in enumerate(zip(jobs, gens)):
            await gen.aclose()
            await finish(app, job, totals[i], None if i in finished else error)
    yield sse("[DONE]")


async def _collect(app: FastAPI, job: Job, gen, form) -> JSONResponse:
    totals, error = Totals(), None
    try:
        async for delta in gen:
            totals.add(delta)
    except BaseException as exc:
        error = exc
        raise
    finally:
        await gen.aclose()
        await finish(app, job, totals, error)
    body = form.body(job, totals, app.state.tokenizer)
    if keep := getattr(form, "keep", None):  # the Responses API's store
        await keep(body)
    return JSONResponse(body)


async def _stream(app: FastAPI, job: Job, gen, first, writer, keep=None):
    """The SSE body of a streamed request: `writer` (a ChunkWriter, an EventWriter) writes its
    events from the deltas; `keep` (the Responses API's store) takes the whole answer before the
    event that ends it goes out."""
    request_id_var.set(job.request_id)
    totals, error = Totals(), None
    rest = with_keepalive(gen, KEEPALIVE_S, _stopped(app))
    try:
        for chunk in writer.first(first):
            yield chunk
        delta = first
        while delta is not None:
            if delta is KEEPALIVE:
                yield keepalive(writer)
            else:
                totals.add(delta)
                if (chunk := writer.delta(delta)) is not None:
                    yield chunk
            delta = await anext(rest, None)
        end = writer.end(totals)
        if keep is not None:
            await keep(writer.response)
        if end:
            yield end
    except DejavuError as exc:
        error = exc
        log.warning("stream failed: %s", exc.message)
        yield writer.failed(exc)
    except BaseException as exc:  # client gone (cancelled) or a bug: record it, let it propagate
        error = exc
        raise
    finally:
        await rest.aclose()  # first: it may be waiting on gen in a task of its own
        await gen.aclose()
        await finish(app, job, totals, error)
    if done := writer.done():
        yield done


KEEPALIVE_S = 15.0  # a stream quiet this long gets an SSE comment (a failover's replay can take minutes)
KEEPALIVE = object()


def keepalive(writer) -> str:
    """What a quiet stream sends every KEEPALIVE_S: the writer's own (`keepalive()`: SGLang's
    client reads every line as JSON), or an SSE comment, which clients skip and proxies see."""
    own = getattr(writer, "keepalive", None)
    return own() if own is not None else ": keep-alive\n\n"


async def with_keepalive(gen, every_s: float, stopped: asyncio.Future | None = None):
    """gen's items, and KEEPALIVE each time `every_s` pass without one; ShuttingDown once `stopped`
    is done (the server's stop grace ran out)."""
    while True:
        item = asyncio.ensure_future(anext(gen, KEEPALIVE))  # KEEPALIVE here: gen has ended
        try:
            while not (await asyncio.wait({item} if stopped is None else {item, stopped}, timeout=every_s,
                                          return_when=asyncio.FIRST_COMPLETED))[0]:
                yield KEEPALIVE
            if not item.done():
                raise ShuttingDown(STOPPING)
        finally:
            if not item.done():  # closed while waiting: gen must not run on in that task
                item.cancel()
                await asyncio.gather(item, return_exceptions=True)
        if item.result() is KEEPALIVE:
            return
        yield item.result()


async def _with_cancellation(awaitable, request: Request, stopped: asyncio.Future | None = None):
    """Await it; if the client disconnects meanwhile, cancel it (aborting downstream), raise
    ClientGone; if the server's stop grace runs out (`stopped`), cancel it, raise ShuttingDown."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            await asyncio.wait({task} if stopped is None else {task, stopped}, timeout=0.5,
                               return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            if stopped is not None and stopped.done():
                log.info("the server is stopping: ending the request")
                task.cancel(STOPPING)  # finish() records it as the error it is, not as a client's leaving
                await asyncio.gather(task, return_exceptions=True)
                raise ShuttingDown(STOPPING)
            if await request.is_disconnected():
                log.info("client disconnected: aborting")
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                raise ClientGone()
    finally:
        task.cancel()


def _stopped(app: FastAPI) -> asyncio.Future | None:
    """Done once the server's stop grace ran out (common.service._Server); None where no server set
    one (an app under test)."""
    return getattr(app.state, "stopped", None)


async def finish(app: FastAPI, job: Job, totals: Totals | None, error: BaseException | None) -> None:
    """Count the outcome and record it in Redis, once per request."""
    if job.recorded:
        return
    job.recorded = True
    app.state.active.pop(job.request_id, None)
    IN_FLIGHT.set(len(app.state.active))
    stopping = isinstance(error, asyncio.CancelledError) and error.args == (STOPPING,)  # _with_cancellation's
    cancelled = not stopping and isinstance(error, (asyncio.CancelledError, GeneratorExit, ClientGone))
    outcome = "ok" if error is None else ("cancelled" if cancelled else "error")
    REQUESTS.labels(outcome).inc()
    fields = {"status": "finished" if error is None else outcome, "finished_at": time.time()}
    if totals is not None:
        fields.update(completion_tokens=len(totals.tokens), finish_reason=totals.finish_reason or "")
    try:
        await asyncio.shield(app.state.store.update(job.request_id, **fields))
    except Exception as exc:  # Redis trouble must not break a response already made
        log.warning("could not record the request's outcome: %s", exc)
