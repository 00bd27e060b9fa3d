"""Registry and request metadata against a real Redis server."""

import asyncio
import time

import pytest

from common import metadata
from common.protocol import ServiceInfo, ServiceKind


def run(coro):
    return asyncio.run(coro)


def info(i: str, kind=ServiceKind.TOKEN) -> ServiceInfo:
    return ServiceInfo(kind=kind, id=i, url=f"http://h/{i}", host="h", pid=1)


def test_registry_lease_expires(redis_server):
    async def go():
        redis = metadata.connect(redis_server.url)
        reg = metadata.Registry(redis)
        await reg.renew(info("t-short"), ttl_s=0.3)
        await reg.renew(info("p-long", ServiceKind.PROMPT), ttl_s=30)
        ids = {s.id for s in await reg.services()}
        assert {"t-short", "p-long"} <= ids
        assert [s.id for s in await reg.services(ServiceKind.PROMPT) if s.id == "p-long"] == ["p-long"]
        await asyncio.sleep(0.5)
        ids = {s.id for s in await reg.services()}
        assert "t-short" not in ids and "p-long" in ids
        await reg.deregister("p-long")
        assert "p-long" not in {s.id for s in await reg.services()}
        await redis.aclose()

    run(go())


def test_replicated_index_only_advances_for_the_current_epoch(redis_server):
    async def go():
        redis = metadata.connect(redis_server.url)
        store = metadata.RequestStore(redis)
        rid = f"req-{time.time_ns()}"
        await store.create(rid, {"status": "running"})
        assert await store.advance_replicated(rid, 0, 10) == 10
        assert await store.advance_replicated(rid, 0, 5) == 10      # never backwards
        assert await store.fence(rid, "token-b") == (1, 10, "")  # as it was; the index is cleared
        assert (await store.get(rid))["replicated"] == "0"
        assert await store.advance_replicated(rid, 1, 10) == 10
        assert await store.advance_replicated(rid, 0, 20) == -1     # the fenced owner is refused
        assert (await store.get(rid))["replicated"] == "10"
        assert await store.advance_replicated(rid, 1, 20) == 20
        assert (await store.get(rid))["owner"] == "token-b"
        assert await store.advance_replicated(rid, 1, 30, "store-a") == 30
        assert await store.advance_replicated(rid, 1, 16, "store-a") == 30  # same store: never backwards
        assert await store.advance_replicated(rid, 1, 16, "store-b") == 16  # a new store: its own count
        assert (await store.get(rid))["store"] == "store-b"
        assert await store.advance_replicated(rid, 0, 99, "store-a") == -1  # fenced, whatever the store
        assert (await store.get(rid))["store"] == "store-b"
        assert await store.fence(rid, "token-c") == (2, 16, "store-b")
        await redis.aclose()

    run(go())


def test_a_pipelines_stages_each_record_their_layers_and_the_request_resumes_from_the_least(redis_server):
    """Issue #11 item 5: each stage of a token pipeline records the tokens the store acknowledged
    for its own layers; the request's index is the least over the layers, 0 until every layer has
    some. A new owner of another depth starts from the index it resumed from; a late write of a
    replica that started over (gen) changes nothing."""
    async def go():
        redis = metadata.connect(redis_server.url)
        store = metadata.RequestStore(redis)
        rid = f"req-{time.time_ns()}"
        await store.create(rid, {"status": "running"})
        adv = lambda epoch, n, layers, gen=0, s="store-a": store.advance_replicated(  # noqa: E731
            rid, epoch, n, s, range(*layers), 30, gen)
        assert await adv(0, 16, (0, 10)) == 0  # layers 10.. have nothing yet
        assert await adv(0, 32, (10, 20)) == 0
        assert await adv(0, 48, (20, 30)) == 16
        assert await adv(0, 32, (0, 10)) == 32
        assert await adv(0, 16, (0, 10)) == 32  # never backwards
        fields = await store.get(rid)
        assert (fields["replicated"], fields["rep:0:10"], fields["rep:20:30"]) == ("32", "32", "48")
        # the head's replica starts over on store-b (gen 1); stage 2's late write for store-a is ignored
        assert await adv(0, 16, (0, 10), gen=1, s="store-b") == 0
        assert await adv(0, 64, (20, 30), gen=0, s="store-a") == 0
        assert await adv(0, 16, (10, 20), gen=1, s="store-b") == 0
        assert await adv(0, 16, (20, 30), gen=1, s="store-b") == 16
        assert (await store.get(rid))["store"] == "store-b"
        # stage 1 dies: the gateway fences; the new owner, one token service, restored 16 tokens
        assert await store.fence(rid, "token-b") == (1, 16, "store-b")
        assert not [f for f in await store.get(rid) if f.startswith("rep:")]
        assert await adv(1, 16, (0, 30), s="store-b") == 16
        assert await adv(0, 99, (10, 20), gen=1, s="store-b") == -1  # the old pipeline's stage is fenced
        assert await adv(1, 32, (0, 30), s="store-b") == 32
        # and a pipeline of 3 stages after it: one stage's progress alone moves nothing
        assert await store.fence(rid, "token-c") == (2, 32, "store-b")
        assert await adv(2, 32, (0, 30), s="store-b") == 32  # its head records the restored replica
        assert await adv(2, 48, (0, 10), s="store-b") == 32
        assert await adv(2, 48, (10, 30), s="store-b") == 48
        await redis.aclose()

    run(go())


def test_a_lost_record_is_rebuilt_by_its_owner_and_fencing_never_goes_back(redis_server):
    """Issue #10 item 9: after Redis restarts empty, the owner's next index update must not read as
    "fenced" (before, replication stopped for good); and a gateway that fences a request Redis
    forgot keeps the epoch above every one it handed out."""
    async def go():
        redis = metadata.connect(redis_server.url)
        store = metadata.RequestStore(redis)
        rid = f"req-{time.time_ns()}"
        await store.create(rid, {"status": "running"})
        assert await store.fence(rid, "token-b") == (1, 0, "")
        assert await store.fence(rid, "token-c") == (2, 0, "")
        await redis.delete(store._key(rid))  # Redis restarted without its data
        assert await store.advance_replicated(rid, 2, 32, "store-a") == 32  # the owner rebuilds it
        assert await store.advance_replicated(rid, 1, 48, "store-a") == -1  # an older owner is still fenced
        fields = await store.get(rid)
        assert (fields["epoch"], fields["replicated"], fields["store"]) == ("2", "32", "store-a")
        assert 0 < await redis.ttl(store._key(rid)) <= metadata.REQUEST_TTL_S
        await redis.delete(store._key(rid))
        assert await store.fence(rid, "token-d", at_least=3) == (3, 0, "")  # not 1: epoch 2 is out there
        assert await store.advance_replicated(rid, 2, 64) == -1
        # lost again; an owner fenced since (epoch 1), still alive, rebuilds the record before the
        # current one (3) writes: the next fence must not hand the stale owner's replica on
        await redis.delete(store._key(rid))
        assert await store.advance_replicated(rid, 1, 80, "store-stale") == 80
        assert await store.fence(rid, "token-e", at_least=4) == (4, 0, "")
        await redis.aclose()

    run(go())


def test_registry_unreachable_is_unavailable():
    from common.errors import Unavailable

    async def go():
        redis = metadata.connect("redis://127.0.0.1:1/0")
        with pytest.raises(Unavailable):
            await metadata.Registry(redis).services()
        await redis.aclose()

    run(go())


def test_a_malformed_or_newer_registry_entry_is_skipped_not_fatal(redis_server):
    """One bad entry (garbage, a missing field, a wrong type) is skipped and the others still
    listed; an entry from a newer version with fields we do not know is read."""
    async def go():
        redis = metadata.connect(redis_server.url)
        reg = metadata.Registry(redis)
        await reg.renew(info("t-good"), ttl_s=30)
        newer = {**info("t-newer").model_dump(mode="json"), "stages": 2, "pipeline": "p0"}
        bad = {"t-garbage": "{not json", "t-missing": '{"kind": "token", "id": "t-missing"}',
               "t-wrong": '{"kind": "token", "id": "t-wrong", "url": 5, "host": "h", "pid": "x"}',
               "t-list": "[1, 2]", "t-newer": __import__("json").dumps(newer)}
        for i, raw in bad.items():
            await redis.set(metadata.PREFIX + "svc:" + i, raw, ex=30)
            await redis.sadd(metadata.PREFIX + "svcs", i)
        ids = {s.id for s in await reg.services()}
        assert {"t-good", "t-newer"} <= ids and not ids & {"t-garbage", "t-missing", "t-wrong", "t-list"}
        for i in [*bad, "t-good"]:
            await reg.deregister(i)
        await redis.aclose()

    run(go())


def test_a_registry_lists_only_its_own_clusters_services(redis_server):
    """Two clusters on one Redis (different cluster tokens) never see, so never route to, each other;
    a registry counts the others' services (a gateway given a wrong token says so)."""
    from common.protocol import cluster_fingerprint

    async def go():
        redis = metadata.connect(redis_server.url)
        a, b = cluster_fingerprint("token-a"), cluster_fingerprint("token-b")
        assert a and b and a != b and "token-a" not in a
        everyone = metadata.Registry(redis)
        for i, cluster in (("c-a1", a), ("c-a2", a), ("c-b1", b)):
            await everyone.renew(info(i).model_copy(update={"cluster": cluster}), ttl_s=30)
        assert {s.id for s in await metadata.Registry(redis, a).services()} == {"c-a1", "c-a2"}
        only_b = metadata.Registry(redis, b)
        assert {s.id for s in await only_b.services()} == {"c-b1"}
        assert "2 token service(s) of another cluster token" in only_b.foreign_hint(ServiceKind.TOKEN)
        assert only_b.foreign_hint(ServiceKind.PROMPT) == ""
        assert {"c-a1", "c-a2", "c-b1"} <= {s.id for s in await everyone.services()}  # dejavu status: all
        assert everyone.foreign_hint(ServiceKind.TOKEN) == ""
        for i in ("c-a1", "c-a2", "c-b1"):
            await everyone.deregister(i)
        await redis.aclose()

    run(go())


def test_a_burst_of_requests_waits_for_a_connection_instead_of_failing(redis_server):
    """300 requests recorded at once (bench.overload's burst): redis-py's default pool refused every
    command past 100 in flight with "Too many connections"; ours waits for a free one."""
    async def go():
        redis = metadata.connect(redis_server.url)
        store = metadata.RequestStore(redis)
        rids = [f"burst-{time.time_ns()}-{i}" for i in range(300)]
        results = await asyncio.gather(*(store.create(rid, {"status": "running"}) for rid in rids),
                                       return_exceptions=True)
        await redis.delete(*(store._key(rid) for rid in rids))
        await redis.aclose()
        return [r for r in results if isinstance(r, Exception)]

    assert run(go()) == []
