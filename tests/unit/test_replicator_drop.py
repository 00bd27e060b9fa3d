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


async def test_a_send_that_fails_first_waits_for_the_stages_before_the_drop(redis_server, monkeypatch, caplog_ids):
    """A pipeline's head whose own send fails (here: nothing listens at the store's KV address, over
    a real TCP transport) while the later stages' sends of the same tokens are still out: the
    request ends meanwhile, and its drop waits for the stages' reports. Dropped at once, a stage's
    put landing after the drop left a replica nobody drops (review of #11 item 5). The failure's
    line carries the request's id (the send starts in the decode loop's context, which has none)."""
    import logging
    import socket
    import types

    import torch

    from common.kv import make_transport
    from common.kv.peers import Peers

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = STORE.model_copy(update={"kv_address": f"127.0.0.1:{port}"})
    drops = []

    async def http(request: httpx.Request) -> httpx.Response:
        drops.append(request.url.path)
        return httpx.Response(200, json={"request_id": "rd-4", "found": True})

    redis = metadata.connect(redis_server.url)
    transport = make_transport("tcp")
    peers = Peers(transport, connect_timeout=2.0)
    stages = asyncio.get_running_loop().create_future()
    try:
        async with httpx.AsyncClient(transport=httpx.MockTransport(http)) as client:
            rep = Replicator(None, 16, peers, metadata.RecentServices(metadata.Registry(redis), 3.0),
                             metadata.RequestStore(redis), client, 16, range(1), 2, stages=lambda *a: stages)
            seq = types.SimpleNamespace(request_id="rd-4", epoch=0)
            rep.epochs["rd-4"], rep.touched["rd-4"] = 0, {store.id: store}
            task = rep.inflight["rd-4"] = asyncio.create_task(
                rep._send(seq, torch.zeros(1, 2, 4, 1, 4), range(0, 4), store, 0, stages))
            rep.forget("rd-4")  # the request finishes while the send is out
            await asyncio.sleep(1.0)
            assert "rd-4" in rep.gens and not task.done() and drops == []  # failed, waits for the stages
            stages.set_result([{"stage": 1}])
            await asyncio.wait_for(task, 5.0)
            await asyncio.gather(*rep.background)
            assert drops == ["/drop"]
        [failed] = [r for r in caplog_ids.records if r.getMessage().startswith("replicating tokens [0, 4)")]
        assert failed.request_id == "rd-4" and failed.levelno == logging.WARNING
    finally:
        await peers.close()
        await transport.close()
        await redis.aclose()
