"""A token service whose request ended by an abort (its decode stream closed) keeps the replica for
a successor: the drop waits DROP_GRACE_S and is skipped if Redis shows a newer epoch (the gateway
fenced this owner and is resuming elsewhere); a finished request's replica is dropped at once.
Real Redis; the cache store faked at the HTTP boundary. Issue #10 defect 10: dropped at once, the
replica went before the new owner's fetch, and recovery fell back to a re-prefill."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from common import metadata
from common.protocol import ServiceInfo, ServiceKind
from token_service import replicator as replicator_module
from token_service.replicator import Replicator

pytestmark = pytest.mark.asyncio
STORE = ServiceInfo(kind=ServiceKind.CACHE_STORE, id="store-0", url="http://store-0", host="h", pid=1)


async def ended(redis_server, monkeypatch, rid: str, aborted: bool, fence: bool) -> list[str]:
    """Drops sent to the store for a request that ended here at epoch 0 (`fence`: a successor
    fenced it in Redis right after)."""
    monkeypatch.setattr(replicator_module, "DROP_GRACE_S", 0.2)
    drops = []

    async def store(request: httpx.Request) -> httpx.Response:
        drops.append(request.url.path)
        return httpx.Response(200, json={"request_id": rid, "found": True})

    redis = metadata.connect(redis_server.url)
    requests = metadata.RequestStore(redis)
    await requests.create(rid, {"status": "running"})
    async with httpx.AsyncClient(transport=httpx.MockTransport(store)) as client:
        rep = Replicator(None, 16, None, metadata.RecentServices(metadata.Registry(redis), 3.0), requests, client, 16,
                         range(2), 2)
        rep.epochs[rid], rep.touched[rid] = 0, {STORE.id: STORE}
        rep.forget(rid, aborted=aborted)
        if fence:
            await requests.fence(rid, "token-b")
        await asyncio.sleep(0.5)
        await asyncio.gather(*rep.background)
    await redis.delete(metadata.PREFIX + "req:" + rid)
    await redis.aclose()
    return drops


async def test_an_aborted_owner_that_was_fenced_leaves_the_replica(redis_server, monkeypatch):
    assert await ended(redis_server, monkeypatch, "rd-1", aborted=True, fence=True) == []


async def test_an_aborted_owner_not_fenced_drops_after_the_grace(redis_server, monkeypatch):
    assert await ended(redis_server, monkeypatch, "rd-2", aborted=True, fence=False) == ["/drop"]


async def test_a_finished_request_drops_at_once(redis_server, monkeypatch):
    assert await ended(redis_server, monkeypatch, "rd-3", aborted=False, fence=True) == ["/drop"]
