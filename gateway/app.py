"""Gateway HTTP API (OpenAI-compatible). Handlers are thin: build a Job, then `serve` it
(gateway/serving.py).

GET  /v1/models
POST /v1/completions, /v1/chat/completions   (stream or not)
POST /v1/responses                           (OpenAI's Responses API, on chat: gateway/responses_api.py)
POST /v1/messages, /v1/messages/count_tokens (Anthropic's Messages API, on chat: gateway/messages_api.py)
POST /generate                               (SGLang's native API, on completions: gateway/generate_api.py)
GET  /model_info, /server_info, /health_generate  (SGLang's, with their older /get_* names)
POST /abort_request, GET /v1/loads           (SGLang's: end /generate requests by id; requests in flight)
POST /reset_prefix_cache, /flush_cache       (vLLM's and SGLang's: every service forgets its prefix cache)
POST /tokenize, /detokenize                  (vLLM's: a prompt's or chat's token ids, and text from ids)
GET  /version
GET  /health, /metrics
GET  /cluster                                (every registered service and its lease: for operators)

With --api-key set (DEJAVU_API_KEYS), every route but /health and /metrics (/v1/*, /cluster, which
names internal addresses, the OpenAPI pages) needs `Authorization: Bearer KEY` (or `x-api-key: KEY`,
as Anthropic's clients send it); the probes and scrapers' two stay open.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from fastapi import FastAPI, Query, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from common import metadata
from common.errors import BadRequest, DejavuError, NotFound, Unavailable, error_body, install_error_handlers
from common.model import context_length, eos_token_ids, load_tokenizer, model_fingerprint, resolve_model_path
from common.protocol import ServiceKind, cluster_fingerprint, cluster_status
from common.service import (API_KEYS, BodyLimit, RequireSecret, add_health_and_metrics, cluster_headers, printable,
                            registered, request_id_var)
from common.settings import GatewaySettings
from gateway import reasoning
from gateway.generate_api import AbortRequest, GenerateForm, GenerateRequest
from gateway.jobs import LARGE_TEXT_CHARS, Job, Limits, chat_jobs, completion_jobs, deltas, text_chars
from gateway.messages_api import AnthropicErrors, MessagesForm, MessagesRequest, count_tokens
from gateway.openai_types import ChatRequest, CompletionRequest
from gateway.responses import CHAT, COMPLETION
from gateway.responses_api import ResponsesForm, ResponsesRequest, ResponseStore
from gateway.router import Router
from gateway.serving import ClientGone, RequestIds, finish, serve, start, totals_of
from gateway.tokenize_api import DetokenizeRequest, TokenizeRequest, detokenize, tokenize, version
from gateway.tools import parser_for

log = logging.getLogger(__name__)
VERSION = version()  # GET /version
HEALTH_GENERATE_S = 20.0  # /health_generate: the most it waits for a token (SGLang's)


def create_app(settings: GatewaySettings) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        path = resolve_model_path(settings.model, progress=log.info)
        model_id = model_fingerprint(path)
        app.state.model_path = path
        app.state.tokenizer = tokenizer = await asyncio.to_thread(load_tokenizer, path)
        app.state.encoder = await asyncio.to_thread(Encoder, path)
        app.state.limits = Limits(settings.model_name, min(settings.max_model_len, context_length(path)),
                                  len(tokenizer), eos_token_ids(path), settings.max_tokens_default,
                                  max(map(len, tokenizer.get_vocab())), tool_parser(settings, tokenizer),
                                  *reasoning_parser(settings, tokenizer))
        app.state.active = {}  # request id: its job, of the requests being served
        app.state.redis_grace_s = settings.lease_ttl_s
        client = httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
                                   headers=cluster_headers(settings))  # every internal call carries the token
        lease_fields = lambda: dict(model=str(path), model_id=model_id,  # noqa: E731
                                    max_model_len=app.state.limits.max_model_len, active_requests=len(app.state.active))
        log.info("gateway ready: serving %r (%s), max context %d, tool-call parser %s, reasoning parser %s",
                 settings.model_name, path, app.state.limits.max_model_len, app.state.limits.tool_parser,
                 app.state.limits.reasoning_parser)
        try:
            async with registered(app, settings, ServiceKind.GATEWAY, lease_fields) as redis:
                app.state.store = metadata.RequestStore(redis)
                app.state.responses = ResponseStore(redis, settings.responses_ttl_s,
                                                    cluster_fingerprint(settings.cluster_token))
                registry = metadata.Registry(redis, cluster_fingerprint(settings.cluster_token))  # this cluster's only
                app.state.router = Router(registry, client, settings, app.state.store, model_id)
                try:
                    yield
                finally:
                    await app.state.router.close()
        finally:
            await client.aclose()

    app = FastAPI(title="DéjàVu gateway", version=VERSION, lifespan=lifespan)
    install_error_handlers(app, public=True)

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone):  # nobody reads it; for the access log
        return JSONResponse(error_body("client disconnected", "invalid_request_error"), status_code=499)

    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    if settings.api_keys:  # added last: it runs first, before a body is read
        app.add_middleware(RequireSecret, **API_KEYS, secrets=settings.api_keys)
    app.add_middleware(AnthropicErrors)  # it rewrites the errors of every layer on /v1/messages
    app.add_middleware(RequestIds)
    if origins := settings.cors_origins:  # outermost: a preflight carries no API key
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["*"], allow_headers=["*"],
                           expose_headers=["x-request-id", "request-id"])
    add_health_and_metrics(app, lambda: _health(app))

    served_since = int(time.time())  # the model's `created`: when this gateway started serving it (vLLM's: now)

    @app.get("/v1/models")
    async def models() -> dict:
        """OpenAI's list, which Anthropic's clients read too (their fields alongside: type,
        display_name, created_at; has_more, first_id, last_id)."""
        limits: Limits = app.state.limits
        name = limits.model_name
        since = datetime.datetime.fromtimestamp(served_since, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {"object": "list", "data": [{"id": name, "object": "model", "created": served_since,
                                            "owned_by": "dejavu", "max_model_len": limits.max_model_len,
                                            "type": "model", "display_name": name, "created_at": since}],
                "has_more": False, "first_id": name, "last_id": name}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict:
        """One model (the openai SDK's models.retrieve): the one served, or a 404."""
        listed = (await models())["data"][0]
        if model != listed["id"]:
            raise NotFound(f"model '{model}' does not exist; this server serves '{listed['id']}'", "model",
                           code="model_not_found")
        return listed

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await serve(app, await _jobs(app, completion_jobs, body), request, COMPLETION)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        return await serve(app, await _jobs(app, chat_jobs, body), request, CHAT)

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, request: Request):
        """OpenAI's Responses API, on the chat machinery (gateway/responses_api.py)."""
        store: ResponseStore = app.state.responses
        earlier, owner = None, _owner(request)
        if body.previous_response_id is not None and store.enabled:  # the conversation it goes on from
            earlier = (await store.get(body.previous_response_id, "previous_response_id", owner))["history"]
        return await _translated(app, ResponsesForm(body, store, earlier, owner), request)

    @app.api_route("/v1/responses/{response_id}", methods=["GET", "DELETE"])  # one route: a 405's Allow has both
    async def response(response_id: str, request: Request) -> dict:
        """A stored response: GET reads it (the openai SDK's responses.retrieve), DELETE drops it
        (responses.delete)."""
        if request.method == "DELETE":
            await app.state.responses.delete(response_id, _owner(request))
            return {"id": response_id, "object": "response", "deleted": True}
        return (await app.state.responses.get(response_id, owner=_owner(request)))["response"]

    @app.get("/v1/responses/{response_id}/input_items")
    async def input_items(response_id: str, request: Request, order: str = "desc", limit: int = 20,
                          after: str | None = None) -> dict:
        """A stored response's input items (responses.input_items.list): newest first by default."""
        record = await app.state.responses.get(response_id, owner=_owner(request))
        return ResponseStore.listed(record["input"], order, limit, after)

    @app.post("/v1/messages")
    async def messages(body: MessagesRequest, request: Request):
        """Anthropic's Messages API, on the chat machinery (gateway/messages_api.py)."""
        return await _translated(app, MessagesForm(body), request)

    @app.post("/v1/messages/count_tokens")
    async def count_tokens_(body: MessagesRequest) -> dict:
        """Anthropic's: the input tokens a message request would have."""
        return await _tokenizing(app, count_tokens, body)

    @app.post("/generate")
    async def generate(body: GenerateRequest, request: Request):
        """SGLang's native API, on the completions machinery (gateway/generate_api.py)."""
        form = GenerateForm(body)
        jobs = await _tokenizing(app, GenerateForm.jobs, form)
        if body.rid is not None:
            log.info("the client's rid %r is request %s", printable(str(body.rid)),
                     ", ".join(job.request_id for job in jobs[:16]))
        try:
            return await serve(app, jobs, request, form)
        except BadRequest as exc:  # one the router raises (a pipeline cannot score a prompt): SGLang's names
            raise form.renamed(exc) from None

    @app.get("/model_info")
    @app.get("/get_model_info")  # SGLang's older name
    async def model_info() -> dict:
        """SGLang's: what is served (bench_serving loads `tokenizer_path` where it is given no tokenizer)."""
        limits: Limits = app.state.limits
        return {"model_path": str(app.state.model_path), "tokenizer_path": str(app.state.model_path),
                "served_model_name": limits.model_name, "is_generation": True, "preferred_sampling_params": None,
                "weight_version": "default",
                "tool_call_parser": None if limits.tool_parser == "none" else limits.tool_parser,
                "reasoning_parser": None if limits.reasoning_parser == "none" else limits.reasoning_parser,
                "has_image_understanding": False,
                "has_audio_understanding": False}

    @app.get("/server_info")
    @app.get("/get_server_info")  # SGLang's older name
    async def server_info() -> dict:
        """SGLang's, the part its clients read: the model, the context, the version, how streams
        are written, and one `internal_states` entry (bench_serving reads it)."""
        info = await model_info()
        return {**{k: info[k] for k in ("model_path", "tokenizer_path", "served_model_name")},
                "context_length": app.state.limits.max_model_len, "max_context_length": app.state.limits.max_model_len,
                "incremental_streaming_output": False, "stream_interval": 1, "version": VERSION,
                "internal_states": [{}]}

    @app.post("/abort_request", response_class=Response)  # (200: SGLang's empty body)
    async def abort_request(body: AbortRequest) -> Response:
        """SGLang's: end the /generate request whose id (meta_info.id) is `rid`, or all of them;
        each answers with its output so far, finish_reason "abort". 200, empty, as SGLang's. (SGLang's
        scheduler also takes a prefix, but its front end passes on only a rid it knows.)"""
        rid = body.rid or ""
        ended = [job for job in app.state.active.values()
                 if job.abort is not None and (body.abort_all or (rid and job.rid == rid))]
        for job in ended:
            job.abort.set()
        if ended:
            log.info("aborting %d requests (rid %r%s): %s", len(ended), printable(rid),
                     ", all" if body.abort_all else "", ", ".join(job.request_id for job in ended[:16]))
        return Response(status_code=200)

    @app.get("/v1/loads")
    async def loads() -> dict:
        """SGLang's: the requests in flight, those waiting for KV room among them (what RL
        frameworks poll until it is 0 after /abort_request)."""
        waiting = len(app.state.router.admission.queue)
        running = max(len(app.state.active) - waiting, 0)
        return {"timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(), "version": VERSION,
                "loads": [{"dp_rank": 0, "num_running_reqs": running, "num_waiting_reqs": waiting}]}

    unreset = {503: {"description": "a service did not reset its cache", "content": {"application/json": {}}}}

    async def reset_caches() -> None:
        """Every service's prefix cache forgotten, or Unavailable (503) saying how many were not."""
        failed = await app.state.router.reset_prefix_caches()
        if failed:
            raise Unavailable(f"the prefix cache was not reset on {len(failed)} service(s) (the gateway's log "
                              "names them); retry")

    @app.post("/reset_prefix_cache", responses=unreset)
    async def reset_prefix_cache(reset_running_requests: bool = False, reset_external: bool = False) -> dict:
        """vLLM's: every service forgets its prefix cache (benchmark clients call it between the
        warm-up and the measured run). Requests in flight are never refused nor waited for: they keep
        the hits they had and their prompts' blocks are not kept (the two flags change nothing).
        A service that did not reset: a 503 (vLLM's answers `success` false with a 200)."""
        await reset_caches()
        return {"success": True}

    # POST only: SGLang's takes GET too, but its clients POST, and one route of two methods would be
    # two operations of one id in the OpenAPI schema
    @app.post("/flush_cache", response_class=PlainTextResponse, responses=unreset)
    async def flush_cache(timeout: float = Query(0.0, ge=0.0)) -> Response:
        """SGLang's /reset_prefix_cache, its answer a text. Nothing in flight is waited for, so
        `timeout` (how long SGLang waits for its requests to end) changes nothing."""
        await reset_caches()
        return PlainTextResponse("Cache flushed.\n")

    @app.get("/health_generate", response_class=Response,  # (200: SGLang's empty body)
             responses={503: {"description": "no token generated", "content": {"application/json": {}}}})
    async def health_generate():
        """SGLang's deep probe: 200 once one token is generated through the cluster (one greedy
        token of a one-token prompt), 503 if none comes within HEALTH_GENERATE_S. A request like
        any other: recorded in Redis, counted in dejavu_gateway_requests_total."""
        form = GenerateForm(GenerateRequest(input_ids=[0], sampling_params={"max_new_tokens": 1, "temperature": 0}))
        [job] = form.jobs(app.state.tokenizer, app.state.limits)
        job.abort = None  # a probe: /abort_request's abort_all must not make it answer 200 untried
        request_id_var.set(job.request_id)
        await start(app, job, "health_generate")
        gen, totals, error = deltas(app.state.router, app.state.tokenizer, job), None, None
        try:
            totals = await asyncio.wait_for(totals_of(gen), HEALTH_GENERATE_S)
        except (DejavuError, asyncio.TimeoutError) as exc:
            error = exc
        except BaseException as exc:  # the prober gone (cancelled), or a bug
            error = exc
            raise
        finally:
            await gen.aclose()  # aborts it downstream where it still runs
            await finish(app, job, totals, error)
        if error is not None:
            why = error.client_body(job.request_id)["error"]["message"] if isinstance(error, DejavuError) else (
                f"none within {HEALTH_GENERATE_S:g} s")
            return JSONResponse(error_body(f"no token generated: {why}", "service_unavailable"), status_code=503)
        return Response(status_code=200)

    @app.post("/tokenize")
    async def tokenize_(body: TokenizeRequest) -> dict:
        """vLLM's: the token ids a prompt, or a chat's messages, would be prefilled with."""
        return await _tokenizing(app, tokenize, body)

    @app.post("/detokenize")
    async def detokenize_(body: DetokenizeRequest) -> dict:
        """vLLM's: the text of token ids."""
        return await _tokenizing(app, detokenize, body)

    @app.get("/version")
    async def version_() -> dict:
        return {"version": VERSION}

    @app.get("/cluster")
    async def cluster() -> dict:  # Redis down: Unavailable, a 503 with the OpenAI error body
        return cluster_status(await app.state.router.registry.services(), time.time())

    return app


def tool_parser(settings: GatewaySettings, tokenizer) -> str:
    """--tool-call-parser, with auto resolved from the chat template (tools.parser_for)."""
    if settings.tool_call_parser != "auto":
        return settings.tool_call_parser
    return parser_for(_template(tokenizer))


def reasoning_parser(settings: GatewaySettings, tokenizer) -> tuple[str, bool]:
    """(--reasoning-parser with auto resolved, whether its tags are special tokens, which the
    text then keeps: as vLLM's parsers read them)."""
    parser = settings.reasoning_parser
    if parser == "auto":
        parser = reasoning.parser_for(_template(tokenizer))
    return parser, parser != "none" and any(_special(tokenizer, tag) for tag in (reasoning.START, reasoning.END))


def _special(tokenizer, token: str) -> bool:
    """A special token, which decoding skips: listed as one, or an added token marked special."""
    if token in getattr(tokenizer, "all_special_tokens", []):
        return True
    added = getattr(tokenizer, "added_tokens_decoder", {})
    token_id = tokenizer.convert_tokens_to_ids(token)
    return token_id in added and added[token_id].content == token and added[token_id].special  # not unk's


def _template(tokenizer) -> str:
    return tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else str(tokenizer.chat_template)


class Encoder:
    """Tokenization of large prompts off the event loop, on one thread with a tokenizer of its
    own (a fast tokenizer used from two threads at once can fail with "Already borrowed"): a
    long prompt or chat template then costs its own request time, not every live stream's."""

    def __init__(self, path):
        self.tokenizer = load_tokenizer(path)
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="tokenize")

    async def run(self, work, body, limits: Limits):
        """work(body, tokenizer, limits) on the thread: a request's jobs (jobs.py), /tokenize's answer."""
        return await asyncio.get_running_loop().run_in_executor(self.thread, work, body, self.tokenizer, limits)


async def _jobs(app: FastAPI, make_jobs, body) -> list[Job]:
    if text_chars(body) < LARGE_TEXT_CHARS and not body.constrained:  # a grammar may take long to compile
        return make_jobs(body, app.state.tokenizer, app.state.limits)
    return await app.state.encoder.run(make_jobs, body, app.state.limits)


async def _translated(app: FastAPI, form, request: Request):
    """A request of another API (a ResponsesForm, a MessagesForm) served as the chat request it
    translates to (`form.as_chat`); chat's 400s come back in that API's names."""
    try:
        jobs = await _jobs(app, chat_jobs, form.as_chat)
    except BadRequest as exc:
        raise form.request.renamed(exc) from None
    return await serve(app, jobs, request, form)


async def _tokenizing(app: FastAPI, work, body):
    """work(body, tokenizer, limits): on the event loop, or on the tokenizer thread where
    `body.large` (its answer; a request's jobs)."""
    if not body.large:
        return work(body, app.state.tokenizer, app.state.limits)
    return await app.state.encoder.run(work, body, app.state.limits)


async def _health(app: FastAPI) -> dict:
    """Ready (200) only when a request can be routed: a token service, and a prompt service or a
    colocated token service, registered; 503 with the reason otherwise (probes route on it)."""
    body = {"kind": "gateway", "in_flight": len(app.state.active)}
    try:
        router: Router = app.state.router
        tokens, prompts = await router.services(ServiceKind.TOKEN), await router.services(ServiceKind.PROMPT)
    except DejavuError:
        return {**body, "status": "unavailable", "reason": "the registry (Redis) is unreachable"}
    if not tokens:
        return {**body, "status": "unavailable", "reason": "no token service registered" + router.registry.foreign_hint(ServiceKind.TOKEN)}
    if not prompts and not any(t.colocated for t in tokens):
        return {**body, "status": "unavailable", "reason": "no prompt service registered (and no colocated token service)"}
    return {**body, "token_services": len(tokens), "prompt_services": len(prompts)}


def _owner(request: Request) -> str:
    """Whose stored responses a request may see: a digest of the API key RequireSecret checked
    ("" where the gateway takes no keys)."""
    return request.scope.get("state", {}).get("secret_digest", "")
