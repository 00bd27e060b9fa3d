"""A resumed request is exact to the bit (issue #10): the gateway's Router in process against a real
Redis, with two colocated token services whose engines run in process on the tiny model, faked only
at the HTTP boundary (httpx.MockTransport).

A seeded-sampling request runs once without a failure. Then again, its first decode stream broken
after k tokens, at several k: the other token service resumes it by a re-prefill (no replica) or
from a replica (the old owner's KV [0, n), handed over in place of a cache store's fetch). Every
token after the resume equals the failure-free run's, and so does the KV of the whole row, bit for
bit: the tokens already out are replayed through decode steps, as they were first computed.
Before, they were recomputed in one forward (with the prompt, on a re-prefill), whose float32
rounding differs: the KV differed in its last bits, and now and then so did a token drawn after it
(with the inverse-CDF draw of before December 7, at temperature 0.2 about one such resume in 25
within 40 tokens; the exponential race moves a pick far more rarely, so the tokens alone would
hardly show it). The KV is the invariant checked: which token flips moves with every change of a
kernel or of the draw.
"""

from __future__ import annotations

import asyncio
import functools
import re

import httpx
import pytest
import pytest_asyncio
import torch

import token_service.engine
from common import grammar, metadata
from common.model import load_model
from common.protocol import (PROTOCOL, AbortRequest, AbortResult, DecodeRequest, PrefillRequest, ReserveRequest, RestoreRequest,
                             SamplingParams, ServiceInfo, ServiceKind)
from common.settings import GatewaySettings, TokenSettings
from engine.attention import slots_of
from engine.runner import ModelRunner
from gateway.router import Router
from token_service.engine import TokenEngine

pytestmark = pytest.mark.asyncio
PROMPT = [1, 422, 3003, 314, 2386, 30, 260, 1820, 55, 66, 77]
SAMPLING = SamplingParams(temperature=0.2, seed=160, max_tokens=40, ignore_eos=True)  # see the docstring
# penalties count the prompt and every token out: the resuming service gets them (DecodeRequest.history)
# (at a temperature that repeats tokens without them: a draw changes where a penalized token would win)
UNPENALIZED = SAMPLING.model_copy(update={"temperature": 0.05})
PENALIZED = UNPENALIZED.model_copy(update={"frequency_penalty": 1.0, "presence_penalty": 0.5, "repetition_penalty": 1.3,
                                           "logit_bias": [(422, 2.0)]})
# a grammar follows every token out: the resuming service rebuilds its place from them (a fresh
# matcher would put the digits and letters elsewhere); 30 single-digit tokens, more than any cut
GUIDED = SAMPLING.model_copy(update={"grammar": grammar.from_request("regex", "([0-9]{3}[a-z]){10}")})
SERVICES = ("token-a", "token-b")


class Engine(TokenEngine):
    """A token engine that keeps the KV of each row it releases: [0, last_position), every layer (a
    finished row has no KV for its last token: no step took it as input)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.rows: dict[str, torch.Tensor] = {}

    def release(self, seq) -> None:
        if seq.blocks:
            slots = slots_of(seq.blocks, self.blocks.block_size, 0, seq.last_position)
            self.rows[seq.request_id] = self.pool[:, :, slots].clone()  # (layers, 2, tokens, kv_heads, D)
        super().release(seq)


class Services:
    """The token services as the gateway calls them over HTTP. The first decode stream of a request
    breaks after `cut` tokens (its service dies), `replicated` tokens of its KV replicated."""

    def __init__(self, runner: ModelRunner, requests: metadata.RequestStore, cut: int | None = None,
                 replicated: int = 0):
        settings = TokenSettings(max_seqs=2, max_model_len=128, colocated=True)
        self.engines = {name: Engine(runner, settings, name) for name in SERVICES}
        self.requests, self.cut, self.replicated = requests, cut, replicated
        self.replica: torch.Tensor | None = None  # the KV the old owner had when it died
        self.decodes = 0
        self.finished: Engine | None = None  # where the request ended

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        engine, path, body = self.engines.get(request.url.host), request.url.path, request.content
        if path == "/reserve":
            return ok(engine.reserve(ReserveRequest.model_validate_json(body)))
        if path == "/prefill":
            return ok(await engine.prefill(PrefillRequest.model_validate_json(body)))
        if path == "/restore":
            return ok(await engine.restore(RestoreRequest.model_validate_json(body)))
        if path == "/decode":
            self.decodes += 1
            seq = engine.start_decode(DecodeRequest.model_validate_json(body))
            return httpx.Response(200, content=self._events(engine, seq, self.cut if self.decodes == 1 else None))
        if path in ("/abort", "/drop"):
            rid = AbortRequest.model_validate_json(body).request_id
            return ok(AbortResult(request_id=rid, found=bool(engine and engine.abort(rid))))
        return httpx.Response(200, json={"status": "ok"})  # /health

    async def _events(self, engine: Engine, seq, cut: int | None):
        sent = 0
        while True:
            event = await seq.events.get()
            if event is None:  # a token replayed
                yield b"\n"
                continue
            if sent == cut:  # the service dies: what it replicated is on the store, the stream breaks
                slots = slots_of(seq.blocks, engine.blocks.block_size, 0, self.replicated)
                self.replica = engine.pool[:, :, slots].clone()
                if self.replicated:
                    await self.requests.advance_replicated(seq.request_id, 0, self.replicated, "store-0")
                engine.abort(seq.request_id)
                raise httpx.ReadError("connection reset by peer")
            if event.token.finish_reason:
                self.finished = engine
            yield event.model_dump_json(exclude_none=True).encode() + b"\n"
            sent += 1

    async def fetch_replica(self, transport, address, request_id, epoch, tokens, layers=None):
        layers = layers if layers is not None else range(self.replica.shape[0])
        return self.replica[layers.start:layers.stop, :, :tokens]


@functools.cache
def runner_tokenizer():
    from common.model import load_tokenizer

    return load_tokenizer(grammar._model)


def ok(message) -> httpx.Response:
    return httpx.Response(200, content=message.model_dump_json())


def service(name: str, kind: ServiceKind = ServiceKind.TOKEN) -> ServiceInfo:
    return ServiceInfo(kind=kind, id=name, url=f"http://{name}", host="h", pid=1, protocol=PROTOCOL, kv_address=f"{name}:1",
                       kv_transport="tcp", max_model_len=128, colocated=True)


@pytest.fixture(scope="module")
def runner(tiny_model_path):
    grammar.use_model(tiny_model_path)
    return ModelRunner(load_model(tiny_model_path))


@pytest_asyncio.fixture
async def redis(redis_server):
    """Both token services and a cache store in the registry; the request records deleted after."""
    redis = metadata.connect(redis_server.url)
    registry = metadata.Registry(redis)
    for info in (service("token-a"), service("token-b"), service("store-0", ServiceKind.CACHE_STORE)):
        await registry.renew(info, ttl_s=60)
    yield registry, metadata.RequestStore(redis)
    for name in ("token-a", "token-b", "store-0"):
        await registry.deregister(name)
    async for key in redis.scan_iter(metadata.PREFIX + "req:exact-*"):
        await redis.delete(key)
    await redis.aclose()


async def generate(registry: metadata.Registry, services: Services, rid: str,
                   sampling: SamplingParams = SAMPLING) -> tuple[list[int], torch.Tensor]:
    """One request through the gateway's Router: its tokens, and the KV of its row where it ended."""
    requests = services.requests
    await requests.create(rid, {"prompt_ids": PROMPT, "status": "running"})
    loops = [asyncio.create_task(e.run()) for e in services.engines.values()]
    async with httpx.AsyncClient(transport=httpx.MockTransport(services)) as client:
        router = Router(registry, client, GatewaySettings(), requests)
        try:
            tokens = [e.token_id async for e in router.generate(rid, PROMPT, sampling)]
        finally:
            for task in [*loops, *router.background]:  # the replicas' late drops, aborts of the dead
                task.cancel()
    return tokens, services.finished.rows[rid]


@pytest.mark.parametrize("sampling", [SAMPLING, PENALIZED, GUIDED], ids=["seeded", "penalized", "guided"])
@pytest.mark.parametrize("path", ["reprefill", "replica"])
async def test_a_resumed_request_draws_the_same_tokens_from_the_same_kv(runner, redis, path, sampling, monkeypatch):
    registry, requests = redis
    clean, clean_kv = await generate(registry, Services(runner, requests), f"exact-clean-{path}", sampling)
    assert len(clean) == SAMPLING.max_tokens
    if sampling is PENALIZED:  # the penalties change what is drawn, so losing their counts would show
        plain, _ = await generate(registry, Services(runner, requests), f"exact-plain-{path}", UNPENALIZED)
        assert plain != clean and len(set(plain)) < len(set(clean)), (plain, clean)
    if sampling is GUIDED:
        text = runner_tokenizer().decode(clean)
        assert re.fullmatch(r"([0-9]{3}[a-z]){0,9}[0-9]{0,3}[a-z]*", text), text  # on its way (max_tokens first)
    for k in (1, 3, 10, 20):
        replicated = len(PROMPT) + k // 2 if path == "replica" else 0  # the replica is behind the tokens out
        services = Services(runner, requests, cut=k, replicated=replicated)
        monkeypatch.setattr(token_service.engine, "fetch_replica", services.fetch_replica)
        tokens, kv = await generate(registry, services, f"exact-{path}-{k}", sampling)
        assert services.decodes == 2, "resumed once"
        assert tokens == clean, f"resumed after {k} tokens"
        assert torch.equal(kv, clean_kv), f"resumed after {k} tokens: the KV differs by {(kv - clean_kv).abs().max()}"
