"""Prefix-aware routing (gateway/affinity.py): a prompt goes to the service that prefilled its
longest prefix last, whose prefix cache likely holds it, while that service has at most SLACK
requests in flight more than the least loaded one. Against a real Redis, the services faked at the
HTTP boundary (httpx.MockTransport): the prompt services of a disaggregated cluster, or the
colocated token services that prefill their own requests."""

from __future__ import annotations

import json

import httpx
import pytest

from common import metadata
from common.protocol import (PROTOCOL, DecodeEvent, PrefillResult, SamplingParams, ServiceInfo, ServiceKind,
                             TokenEvent)
from common.settings import GatewaySettings
from gateway import affinity
from gateway.affinity import PrefixHomes
from gateway.router import Router

pytestmark = pytest.mark.asyncio
CHAT = list(range(100, 140))  # two whole blocks and 8 tokens


async def test_the_home_is_the_last_service_of_the_longest_remembered_prefix():
    homes = PrefixHomes(capacity=4)
    assert homes.home(CHAT) == (None, 0)
    homes.record(CHAT[:20], "p-0")                       # block 0
    homes.record(CHAT, "p-1")                            # blocks 0 and 1: block 0's home is p-1 now
    assert homes.home(CHAT + [7, 8]) == ("p-1", 32)
    assert homes.home(CHAT[:16] + [1] * 16) == ("p-1", 16)  # block 1 differs: only block 0 matches
    assert homes.home([1] + CHAT[1:]) == (None, 0)       # the same tokens behind another first token
    assert homes.home(CHAT[:15]) == (None, 0)            # shorter than a block
    homes.record(list(range(500, 548)), "p-0")           # 3 blocks more, 5 in all: CHAT's tail goes first
    assert len(homes.homes) == 4 and homes.home(CHAT) == ("p-1", 16)
    homes.record(CHAT, "p-1")
    assert homes.home_worth_it(CHAT) is None  # 32 tokens: fewer than MIN_TOKENS
    homes = PrefixHomes()
    homes.record(CHAT * 3, "p-1")             # 120 tokens, 7 whole blocks
    assert homes.home_worth_it(CHAT * 3 + [5] * 100) == "p-1"    # 112 of 220 tokens
    assert homes.home_worth_it(CHAT * 3 + [5] * 400) is None     # 112 of 520: less than a quarter


class Fakes:
    """Every service's HTTP side: /reserve and /decode on token services, /prefill wherever the
    gateway sends it (it records where)."""

    def __init__(self):
        self.prefilled: list[str] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        host, path = request.url.host, request.url.path
        body = json.loads(request.content) if request.content else {}
        rid = body.get("request_id", "")
        if path == "/reserve":
            return httpx.Response(200, json={"request_id": rid, "service_id": host, "kv_address": f"{host}:1",
                                             "kv_transport": "tcp"})
        if path == "/prefill":
            self.prefilled.append(host)
            first = TokenEvent(request_id=rid, index=0, token_id=1)
            return httpx.Response(200, content=PrefillResult(request_id=rid, first=first, prefill_ms=1,
                                                             stream_tail_ms=0).model_dump_json())
        if path == "/decode":
            token = TokenEvent(request_id=rid, index=1, token_id=2, finish_reason="length")
            return httpx.Response(200, content=DecodeEvent(token=token).model_dump_json().encode() + b"\n")
        if path in ("/abort", "/drop", "/health"):
            return httpx.Response(200, json={"request_id": rid, "found": True, "status": "ok"})
        return httpx.Response(404)


def service(kind: ServiceKind, name: str, colocated: bool = False) -> ServiceInfo:
    return ServiceInfo(kind=kind, id=name, url=f"http://{name}", host="h", pid=1, protocol=PROTOCOL,
                       kv_address=f"{name}:1", kv_transport="tcp", max_model_len=1024, colocated=colocated)


@pytest.mark.parametrize("colocated", [False, True], ids=["prompt-services", "colocated-token-services"])
@pytest.mark.parametrize("routing", [True, False], ids=["prefix-routing", "least-loaded-only"])
async def test_a_chats_next_turn_goes_where_its_prefix_was_prefilled_unless_that_one_is_busy(
        redis_server, colocated, routing):
    if colocated:
        services, a, b = [service(ServiceKind.TOKEN, n, True) for n in ("svc-a", "svc-b")], "svc-a", "svc-b"
    else:
        services = [service(ServiceKind.PROMPT, "svc-a"), service(ServiceKind.PROMPT, "svc-b"),
                    service(ServiceKind.TOKEN, "token")]
        a, b = "svc-a", "svc-b"
    redis = metadata.connect(redis_server.url)
    registry = metadata.Registry(redis)
    for info in services:
        await registry.renew(info, ttl_s=60)
    fakes = Fakes()
    try:
        async with httpx.AsyncClient(transport=httpx.MockTransport(fakes)) as client:
            router = Router(registry, client, GatewaySettings(prefix_routing=routing), metadata.RequestStore(redis))

            async def ask(rid: str, ids: list[int]) -> str:
                async for _ in router.generate(rid, ids, SamplingParams(max_tokens=2, ignore_eos=True)):
                    pass
                return fakes.prefilled[-1]

            chat = CHAT * 2                            # a conversation's first turn: 80 tokens
            assert await ask("r-other", [9] * 40) == a  # all idle: the first listed
            router.in_flight[a] = 1                     # a busy: the first turn goes to b
            assert await ask("r-turn-1", chat) == b
            router.in_flight[a] = 0
            assert await ask("r-header-only", chat[:20] + [3] * 80) == a  # a block in common: no reason to route
            turn_2 = chat + [7] * 20
            assert await ask("r-turn-2", turn_2) == (b if routing else a)  # all idle again
            router.in_flight[b] = affinity.SLACK        # b busier than a, within the slack
            assert await ask("r-turn-3", turn_2 + [8] * 9) == (b if routing else a)
            router.in_flight[b] = affinity.SLACK + 1    # past it: the least loaded
            assert await ask("r-turn-4", turn_2 + [6] * 9) == a
            router.in_flight[b] = 0
            if routing:  # turn 4 went to a: a is the home now
                assert router.homes.home(turn_2 + [6] * 9)[0] == a and router.homes.home(chat)[0] == a
                assert await ask("r-turn-5", turn_2 + [6] * 9 + [5]) == a
    finally:
        for info in services:
            await registry.deregister(info.id)
        await redis.aclose()


async def test_a_prefix_cache_reset_reaches_every_service_and_names_those_that_did_not_answer(redis_server):
    """POST /reset_prefix_cache and /flush_cache (gateway/app.py): every prompt and token service
    is told, at once; the gateway forgets where it sent each prefix; a service that does not answer
    is named, the others reset all the same."""
    services = [service(ServiceKind.PROMPT, "p-ok"), service(ServiceKind.PROMPT, "p-gone"),
                service(ServiceKind.TOKEN, "t-ok")]
    told: list[str] = []

    async def handle(request: httpx.Request) -> httpx.Response:
        if request.url.host == "p-gone":
            raise httpx.ConnectError("connection refused", request=request)
        assert request.url.path == "/prefix_cache/reset" and json.loads(request.content) == {}
        told.append(request.url.host)
        return httpx.Response(200, json={"blocks": 3, "bytes": 3 << 20})

    redis = metadata.connect(redis_server.url)
    registry = metadata.Registry(redis)
    for info in services:
        await registry.renew(info, ttl_s=60)
    try:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handle)) as client:
            router = Router(registry, client, GatewaySettings(), metadata.RequestStore(redis))
            router.homes.record(CHAT * 3, "p-ok")
            assert await router.reset_prefix_caches() == ["p-gone"]
            assert sorted(told) == ["p-ok", "t-ok"] and router.homes.home(CHAT * 3) == (None, 0)
    finally:
        for info in services:
            await registry.deregister(info.id)
        await redis.aclose()
