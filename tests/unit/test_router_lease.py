"""A missing lease is a hint, not a death certificate (issue #10 item 9). Against a real Redis,
with a prompt service faked at the HTTP boundary: a prefill outlives its service's lease (as after
a Redis restart, or a pause past the TTL, before the next renewal). A service that still answers
/health is waited for; one that does not is given up, as before."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from common import metadata
from common.protocol import (PROTOCOL, PrefillRequest, PrefillResult, SamplingParams, ServiceInfo, ServiceKind,
                             TokenEvent)
from common.settings import GatewaySettings
from gateway import router as router_module
from gateway.router import LeaseLapsed, Router

pytestmark = pytest.mark.asyncio
PREFILL_S = 1.0


def prompt_service() -> ServiceInfo:
    return ServiceInfo(kind=ServiceKind.PROMPT, id="prompt-lease", url="http://prompt-lease", host="h", pid=1,
                       protocol=PROTOCOL)


def fake(healthy: bool):
    async def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            if not healthy:  # hung: the probe times out
                raise httpx.ReadTimeout("timed out", request=request)
            return httpx.Response(200, json={"status": "ok"})
        if request.url.path == "/prefill":
            await asyncio.sleep(PREFILL_S)
            first = TokenEvent(request_id="r-lease", index=0, token_id=7)
            return httpx.Response(200, content=PrefillResult(request_id="r-lease", first=first, prefill_ms=1,
                                                             stream_tail_ms=0).model_dump_json())
        return httpx.Response(404)
    return handle


@pytest.mark.parametrize("healthy", [True, False], ids=["alive", "hung"])
async def test_a_prefill_outlives_a_lost_lease_only_if_its_service_answers(redis_server, monkeypatch, healthy):
    monkeypatch.setattr(router_module, "LEASE_CHECK_S", 0.1)
    monkeypatch.setattr(router_module, "REGISTRY_CACHE_S", 0.0)
    redis = metadata.connect(redis_server.url)
    registry, svc = metadata.Registry(redis), prompt_service()
    await registry.renew(svc, ttl_s=60)
    req = PrefillRequest(request_id="r-lease", epoch=0, prompt_ids=[1, 2, 3], sampling=SamplingParams(max_tokens=4),
                         target_service_id="token-x", target_kv_address="token-x:1")
    try:
        async with httpx.AsyncClient(transport=httpx.MockTransport(fake(healthy))) as client:
            router = Router(registry, client, GatewaySettings(), None)
            call = asyncio.create_task(router.prefill_on(svc, req))
            await asyncio.sleep(0.3)
            await registry.deregister(svc.id)  # as if Redis restarted empty: no lease until the next renewal
            if healthy:
                result = await asyncio.wait_for(call, 10)
                assert result.first.token_id == 7
            else:
                with pytest.raises(LeaseLapsed):
                    await asyncio.wait_for(call, 10)
    finally:
        await registry.deregister(svc.id)
        await redis.aclose()


async def test_routing_outlives_a_registry_that_forgot_every_lease_for_one_ttl(redis_server, monkeypatch):
    """Redis restarted empty: queued and resuming requests keep routing to the services it listed
    a moment ago, for one lease TTL (each registers again within a renewal); past it, they are gone."""
    monkeypatch.setattr(router_module, "REGISTRY_CACHE_S", 0.0)
    redis = metadata.connect(redis_server.url)
    registry, svc = metadata.Registry(redis), prompt_service()
    router = Router(registry, None, GatewaySettings(lease_ttl_s=1.0, lease_renew_s=0.5), None)
    try:
        assert await router.services(ServiceKind.PROMPT) == []  # an empty registry is no error
        await registry.renew(svc, ttl_s=60)
        assert [s.id for s in await router.services(ServiceKind.PROMPT)] == [svc.id]
        await registry.deregister(svc.id)  # forgotten, as by a restart
        assert [s.id for s in await router.services(ServiceKind.PROMPT)] == [svc.id]
        assert not await router._leased(svc), "the lease check must see the registry as it is"
        await asyncio.sleep(1.1)
        assert await router.services(ServiceKind.PROMPT) == []
    finally:
        await registry.deregister(svc.id)
        await redis.aclose()


async def test_a_retry_on_the_service_a_lapsed_prefill_was_aborted_on_waits_for_that_abort(redis_server, monkeypatch):
    """A prompt service stalls past its lease (a long pause of its event loop): the gateway gives its
    prefill up, sends it an abort in the background and, that service being the only one, tries the
    request there again. The retry must come after the abort, which names only the request: landing
    after the retry had started, the abort would fail the retry instead of the call it was meant for."""
    monkeypatch.setattr(router_module, "LEASE_CHECK_S", 0.1)
    monkeypatch.setattr(router_module, "REGISTRY_CACHE_S", 0.0)
    redis = metadata.connect(redis_server.url)
    registry, svc = metadata.Registry(redis), prompt_service()
    await registry.renew(svc, ttl_s=60)
    seen, stalled = [], asyncio.Event()

    async def handle(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/health":
            if not stalled.is_set():
                raise httpx.ReadTimeout("timed out", request=request)
            return httpx.Response(200, json={"status": "ok"})
        if path == "/abort":
            await asyncio.sleep(0.5)  # the service answers it late, as it comes out of its pause
            seen.append("abort")
            return httpx.Response(200, json={})
        if path == "/prefill":
            seen.append("prefill")
            if len(seen) == 1:  # the first call stalls; the lease lapses meanwhile
                await registry.deregister(svc.id)
                await asyncio.sleep(60)
            first = TokenEvent(request_id="r-lease", index=0, token_id=7)
            return httpx.Response(200, content=PrefillResult(request_id="r-lease", first=first, prefill_ms=1,
                                                             stream_tail_ms=0).model_dump_json())
        return httpx.Response(404)

    req = PrefillRequest(request_id="r-lease", epoch=0, prompt_ids=[1, 2, 3], sampling=SamplingParams(max_tokens=4),
                         target_service_id="token-x", target_kv_address="token-x:1")
    try:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handle)) as client:
            router = Router(registry, client, GatewaySettings(), None)
            call = asyncio.create_task(router._prefill_round(req, []))
            await asyncio.sleep(0.5)  # LeaseLapsed by now: the service is out of its pause from here on
            stalled.set()
            result = await asyncio.wait_for(call, 10)
            assert result.first.token_id == 7
            assert seen == ["prefill", "abort", "prefill"]
            assert not router._prefill_aborts
    finally:
        await registry.deregister(svc.id)
        await redis.aclose()
