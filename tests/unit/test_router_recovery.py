"""The gateway's recovery order, against a real Redis, with its token services and cache store
faked at the HTTP boundary (httpx.MockTransport): the calls it makes, in the order it makes them.

Token service A decodes 20 tokens and its stream breaks while A is still alive (a slow owner, a
broken connection); B resumes the request from the replica. Issue #10:
- defect 10, fence first: A may be aborted only after B has fenced it and restored from the
  replica, since a live A drops its replica when aborted, and the store refuses that drop only
  once B's fetch has moved the replica to the new epoch. Before, the abort went out at once.
- defect 11: B's restore may take longer than --token-timeout-s (its fetch waits on a slow store
  for up to the fetch's own timeout) while B's lease is healthy: the restore is not a loss.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from common import metadata
from common.protocol import (PROTOCOL, DecodeEvent, PrefillResult, RestoreResult, SamplingParams, ServiceInfo, ServiceKind,
                             TokenEvent)
from common.settings import GatewaySettings
from gateway.router import Router

pytestmark = pytest.mark.asyncio
RID, PROMPT, MAX_TOKENS, BREAK_AT = "req-recovery-1", [5, 6, 7, 8], 40, 20
TOKEN_TIMEOUT_S = 1.0


def token_service(name: str) -> ServiceInfo:
    return ServiceInfo(kind=ServiceKind.TOKEN, id=name, url=f"http://{name}", host="h", pid=1, protocol=PROTOCOL, kv_address=f"{name}:1",
                       kv_transport="tcp", max_model_len=1024, colocated=True)


def event(index: int) -> bytes:
    finish = "length" if index == MAX_TOKENS - 1 else None
    token = TokenEvent(request_id=RID, index=index, token_id=100 + index, finish_reason=finish)
    return DecodeEvent(token=token).model_dump_json().encode() + b"\n"


class Fakes:
    """Token services token-a and token-b and one cache store, as the gateway sees them over HTTP."""

    def __init__(self):
        self.calls: list[tuple[str, str]] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        host, path = request.url.host, request.url.path
        self.calls.append((host, path))
        body = json.loads(request.content) if request.content else {}
        if path == "/reserve":
            return httpx.Response(200, json={"request_id": RID, "service_id": host, "kv_address": f"{host}:1",
                                             "kv_transport": "tcp"})
        if path == "/prefill":
            first = TokenEvent(request_id=RID, index=0, token_id=100)
            return httpx.Response(200, content=PrefillResult(request_id=RID, first=first, prefill_ms=1,
                                                             stream_tail_ms=0).model_dump_json())
        if path == "/restore":  # B's fetch waits on a slow store longer than --token-timeout-s; B is alive
            slow, read_timeout = TOKEN_TIMEOUT_S + 0.5, request.extensions["timeout"]["read"]
            if read_timeout is not None and read_timeout < slow:  # what the real client would do
                await asyncio.sleep(read_timeout)
                raise httpx.ReadTimeout("timed out", request=request)
            await asyncio.sleep(slow)
            return httpx.Response(200, content=RestoreResult(request_id=RID, fetched=16, recomputed=3,
                                                             fetch_ms=1).model_dump_json())
        if path == "/decode":
            first_index = body["first_index"]
            return httpx.Response(200, content=self._decode(host, first_index + 1))
        if path in ("/abort", "/drop"):
            return httpx.Response(200, json={"request_id": RID, "found": True})
        if path == "/health":
            return httpx.Response(200, json={"status": "ok"})
        return httpx.Response(404, json={"error": {"message": path, "type": "x", "param": None, "code": None}})

    async def _decode(self, host: str, start: int):
        for index in range(start, MAX_TOKENS):
            if host == "token-a" and index == BREAK_AT:
                raise httpx.ReadError("connection reset by peer")  # A's stream breaks, A lives on
            yield event(index)
            await asyncio.sleep(0)


async def test_the_lost_owner_is_aborted_only_after_the_fence_and_the_restore(redis_server):
    redis = metadata.connect(redis_server.url)
    registry, requests = metadata.Registry(redis), metadata.RequestStore(redis)
    store = ServiceInfo(kind=ServiceKind.CACHE_STORE, id="store-0", url="http://store-0", host="h", pid=1,
                        kv_address="store-0:1", kv_transport="tcp")
    for info in (token_service("token-a"), token_service("token-b"), store):
        await registry.renew(info, ttl_s=60)
    await requests.create(RID, {"prompt_ids": PROMPT, "status": "running"})
    assert await requests.advance_replicated(RID, 0, 16, "store-0") == 16  # A replicated 16 tokens
    fakes = Fakes()
    settings = GatewaySettings(token_timeout_s=TOKEN_TIMEOUT_S)
    async with httpx.AsyncClient(transport=httpx.MockTransport(fakes)) as client:
        router = Router(registry, client, settings, requests)
        router.in_flight["token-b"] = 1  # A is picked first
        sampling = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
        tokens = [e.token_id async for e in router.generate(RID, PROMPT, sampling)]
        await asyncio.gather(*router.background)
    try:
        assert tokens == [100 + i for i in range(MAX_TOKENS)]
        calls = fakes.calls
        assert ("token-b", "/prefill") not in calls, "resumed by a re-prefill, not from the replica"
        restored = calls.index(("token-b", "/restore"))
        aborted = calls.index(("token-a", "/abort"))
        assert aborted > restored, f"A was aborted before B restored from the replica: {calls}"
        assert int((await requests.get(RID))["epoch"]) == 1  # fenced once
        assert dict(router.in_flight) == {"token-b": 1}  # the test's own count; token-a's is gone, not left at 0
    finally:
        for i in ("token-a", "token-b", "store-0"):
            await registry.deregister(i)
        await redis.delete(metadata.PREFIX + "req:" + RID)
        await redis.aclose()


async def test_a_colocated_service_that_hangs_in_a_prefill_and_wakes_is_lost_not_a_502(redis_server, monkeypatch):
    """Found by killing processes: a colocated token service SIGSTOPped 5 s during a prefill. Its
    lease lapsed, so the prefill was given up; by then it was awake again and answered /health,
    which made the gateway take it for alive and answer the client a 502. A service that hung
    past its lease is lost all the same: the request resumes on the other one (prefilled again)."""
    import gateway.router as router_module

    monkeypatch.setattr(router_module, "REGISTRY_CACHE_S", 0.0)
    monkeypatch.setattr(router_module, "LEASE_CHECK_S", 0.1)
    redis = metadata.connect(redis_server.url)
    registry, requests = metadata.Registry(redis), metadata.RequestStore(redis)
    rid, calls, hung = "req-colocated-hang", [], {"token-a": True}

    async def handle(request: httpx.Request) -> httpx.Response:
        host, path = request.url.host, request.url.path
        calls.append((host, path))
        body = json.loads(request.content) if request.content else {}
        if path == "/reserve":
            return httpx.Response(200, json={"request_id": rid, "service_id": host, "kv_address": f"{host}:1",
                                             "kv_transport": "tcp"})
        if path == "/prefill" and host == "token-a":
            await asyncio.sleep(60)  # SIGSTOPped: no answer
        if path == "/prefill":
            first = TokenEvent(request_id=rid, index=0, token_id=100)
            return httpx.Response(200, content=PrefillResult(request_id=rid, first=first, prefill_ms=1,
                                                             stream_tail_ms=0).model_dump_json())
        if path == "/health":
            if hung.pop(host, False):  # hung when the lease is found lapsed; awake (SIGCONT) right after
                raise httpx.ConnectTimeout("timed out", request=request)
            return httpx.Response(200, json={"status": "ok"})
        if path == "/decode":
            tokens = [TokenEvent(request_id=rid, index=i, token_id=100 + i, finish_reason="length" if i == 9 else None)
                      for i in range(body["first_index"] + 1, 10)]
            return httpx.Response(200, content=b"".join(DecodeEvent(token=t).model_dump_json().encode() + b"\n"
                                                        for t in tokens))
        if path in ("/abort", "/drop"):
            return httpx.Response(200, json={"request_id": rid, "found": True})
        return httpx.Response(404, json={"error": {"message": path, "type": "x", "param": None, "code": None}})

    await registry.renew(token_service("token-a"), ttl_s=0.5)  # its lease lapses during the prefill
    await registry.renew(token_service("token-b"), ttl_s=60)
    await requests.create(rid, {"prompt_ids": PROMPT, "status": "running"})
    try:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handle)) as client:
            router = Router(registry, client, GatewaySettings(), requests)
            router.in_flight["token-b"] = 1  # token-a is picked first
            sampling = SamplingParams(max_tokens=10, ignore_eos=True)
            tokens = [e.token_id async for e in router.generate(rid, PROMPT, sampling)]
            await asyncio.gather(*router.background)
        assert tokens == [100 + i for i in range(10)]
        assert ("token-b", "/prefill") in calls and ("token-a", "/abort") in calls, calls
    finally:
        for i in ("token-a", "token-b"):
            await registry.deregister(i)
        await redis.delete(metadata.PREFIX + "req:" + rid)
        await redis.aclose()


async def test_a_store_that_hung_through_the_drops_is_asked_again_once_it_answers(redis_server, monkeypatch):
    """Found by stopping processes: a cache store SIGSTOPped while a resumed request ended (its
    old replica abandoned for a re-prefill) missed both of the gateway's drops and, woken, kept the
    replica its --replica-ttl-s, 600 s. A store that did not answer is asked again (REDROP_S),
    until it answers."""
    from gateway import router as router_module

    monkeypatch.setattr(router_module, "LATE_WRITE_S", 0.05)
    monkeypatch.setattr(router_module, "REDROP_S", (0.05, 0.05, 0.05))
    redis = metadata.connect(redis_server.url)
    registry = metadata.Registry(redis)
    store = ServiceInfo(kind=ServiceKind.CACHE_STORE, id="store-hung", url="http://store-hung", host="h", pid=1,
                        kv_address="store-hung:1", kv_transport="tcp")
    await registry.renew(store, ttl_s=60)
    tries, dropped = [], []

    async def hung_then_awake(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/drop"
        tries.append(json.loads(request.content))
        if len(tries) <= 3:  # stopped: the client gives up
            raise httpx.ReadTimeout("timed out", request=request)
        dropped.append(tries[-1]["request_id"])
        return httpx.Response(200, json={"request_id": tries[-1]["request_id"], "found": True})

    try:
        async with httpx.AsyncClient(transport=httpx.MockTransport(hung_then_awake)) as client:
            router = Router(registry, client, GatewaySettings(), None)
            await asyncio.wait_for(router._drop_replicas("req-abandoned"), 10)
        assert dropped == ["req-abandoned"] and len(tries) == 4  # and not asked again once it answered
    finally:
        await registry.deregister("store-hung")
        await redis.aclose()


async def test_a_store_hung_past_its_lease_is_still_asked_to_drop_the_replica_redis_named(redis_server, monkeypatch):
    """A store SIGSTOPped past its lease TTL is not listed when the resumed request ends, so no
    drop went to it; woken, it kept the replica its --replica-ttl-s. The store Redis named as the
    request's (a fence's answer) is asked from what the router saw of it last, until it answers;
    one it never saw, or that is named by no one, is not asked, and one that refuses the connection
    (dead: its replicas with it) only in the two passes every store gets."""
    from gateway import router as router_module

    monkeypatch.setattr(router_module, "LATE_WRITE_S", 0.05)
    monkeypatch.setattr(router_module, "REDROP_S", (0.05, 0.05, 0.05))
    redis = metadata.connect(redis_server.url)
    registry = metadata.Registry(redis)
    lapsed, other, dead = (ServiceInfo(kind=ServiceKind.CACHE_STORE, id=i, url=f"http://{i}", host="h", pid=1,
                                       kv_address=f"{i}:1", kv_transport="tcp")
                           for i in ("store-lapsed", "store-other", "store-dead"))
    tries = []

    async def hung_then_awake(request: httpx.Request) -> httpx.Response:
        tries.append((request.url.host, json.loads(request.content)["request_id"]))
        if request.url.host == "store-dead":
            try:  # as httpx raises it: a refused connection underneath
                raise ConnectionRefusedError(111, "Connection refused")
            except ConnectionRefusedError as refused:
                raise httpx.ConnectError("All connection attempts failed", request=request) from refused
        if len(tries) <= 4:  # stopped (both passes): the client gives up
            raise httpx.ReadTimeout("timed out", request=request)
        return httpx.Response(200, json={"request_id": tries[-1][1], "found": True})

    try:
        for store in (lapsed, other, dead):
            await registry.renew(store, ttl_s=60)
        async with httpx.AsyncClient(transport=httpx.MockTransport(hung_then_awake)) as client:
            router = Router(registry, client, GatewaySettings(), None)
            assert {s.id for s in await router.services(ServiceKind.CACHE_STORE)} == {s.id for s in (lapsed, other, dead)}
            for store in (lapsed, other, dead):  # their leases lapse
                await registry.deregister(store.id)
            router._cache = (float("-inf"), [])  # (the registry read anew, as REGISTRY_CACHE_S later)
            # (and a minute on: past the lease TTL RecentServices lists a lapsed one, within STORE_MEMORY_S)
            router.recent.seen = {i: (t - 60, info) for i, (t, info) in router.recent.seen.items()}
            await asyncio.wait_for(router._drop_replicas("req-abandoned",
                                                         named={"store-lapsed", "store-dead", "store-never"}), 10)
        assert sorted(tries) == [("store-dead", "req-abandoned")] * 2 + [("store-lapsed", "req-abandoned")] * 3
    finally:
        for store in (lapsed, other, dead):
            await registry.deregister(store.id)
        await redis.aclose()


async def test_the_owner_watch_logs_under_no_requests_id(redis_server, monkeypatch, caplog_ids):
    """The watch on the owners of finished requests is started by the first request that ends (in
    that request's log context) and outlives it: its lines ("token service X died: dropping the
    replicas of ...") are about every request that ended there, so they carry no one request's id.
    Before, they carried the id of whichever request had started the watch, minutes earlier."""
    import logging

    from common.service import request_id_var
    from gateway import router as router_module

    monkeypatch.setattr(router_module, "LEASE_CHECK_S", 0.05)
    monkeypatch.setattr(router_module, "REGISTRY_CACHE_S", 0.0)

    async def dead(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            raise httpx.ConnectError("All connection attempts failed", request=request)
        return httpx.Response(200, json={"request_id": "x", "found": True})

    redis = metadata.connect(redis_server.url)
    registry, owner = metadata.Registry(redis), token_service("token-dies")
    as_request = request_id_var.set("req-first")  # as the gateway's middleware sets it for a request
    try:
        async with httpx.AsyncClient(transport=httpx.MockTransport(dead)) as client:
            router = Router(registry, client, GatewaySettings(), None)
            try:
                with caplog_ids.at_level(logging.INFO, logger="gateway.router"):
                    router._watch_owner(owner, "req-first")  # never leased: dead at the first check
                    router._watch_owner(owner, "req-second")
                    await asyncio.wait_for(router._watcher, 10)
            finally:
                await router.close()
        died = [r for r in caplog_ids.records if "died: dropping the replicas" in r.getMessage()]
        assert [r.request_id for r in died] == ["-"], [(r.request_id, r.getMessage()) for r in died]
        assert "2 requests" in died[0].getMessage()
    finally:
        request_id_var.reset(as_request)
        await redis.aclose()
