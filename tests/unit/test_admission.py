"""Admission (issue #10 item 5): a request that finds no KV room waits in a FIFO queue at the
gateway, woken when KV frees up, instead of re-sending /reserve to every token service every 0.1 s;
past --max-queued-requests or --route-timeout-s it gets a 429 with Retry-After; a reservation the
gateway gave up on is aborted at once; a full token service's refusal is not logged as a warning.

The queue alone first, then the router against a real Redis with token services faked at the
HTTP boundary (httpx.MockTransport)."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI

from common import metadata
from common.errors import KVFull, Overloaded, Unavailable, install_error_handlers
from common.protocol import PROTOCOL, SamplingParams, ServiceInfo, ServiceKind
from common.settings import GatewaySettings
from gateway import admission, router as router_module
from gateway.admission import Admission
from gateway.router import Router

pytestmark = pytest.mark.asyncio


class Room:
    """`slots` places; `attempt` takes one or answers None, counting its tries."""

    def __init__(self, slots: int):
        self.free, self.tries, self.order = slots, 0, []

    def attempt(self, name: str):
        async def go():
            self.tries += 1
            if self.free:
                self.free -= 1
                self.order.append(name)
                return name
            return None
        return go


async def test_a_waiter_cancelled_as_its_turn_comes_leaves_cancelled_not_admitted(monkeypatch):
    """Its client left just as KV freed up: the cancel and the wake-up in the same loop turn. The
    waiter leaves the queue cancelled, taking no room (asyncio.wait_for on Python 3.11 returned
    the wake-up and dropped the cancel: the request went on for a client that was gone)."""
    monkeypatch.setattr(admission, "POLL_S", 60.0)
    queue, room = Admission(max_queued=10, timeout_s=120), Room(0)
    waiter = asyncio.create_task(queue.admit(room.attempt("gone")))
    await asyncio.sleep(0.05)
    assert len(queue.queue) == 1 and room.tries == 1
    room.free = 1
    queue.wake()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert room.order == [] and room.free == 1 and not queue.queue


async def test_waiters_are_admitted_in_arrival_order_when_woken(monkeypatch):
    monkeypatch.setattr(admission, "POLL_S", 60.0)  # only `wake` can move the queue in time
    queue, room = Admission(max_queued=10, timeout_s=120), Room(1)
    assert await queue.admit(room.attempt("first")) == "first"
    waiters = []
    for i in range(5):
        waiters.append(asyncio.create_task(queue.admit(room.attempt(f"w{i}"))))
        await asyncio.sleep(0)  # each arrives after the one before
    await asyncio.sleep(0.05)
    assert len(queue.queue) == 5 and room.order == ["first"]
    tries = room.tries
    assert tries <= 2, "waiters that are not at the head must not try"
    for waiter in waiters:
        room.free += 1  # a request ends
        queue.wake()
        await asyncio.wait_for(asyncio.shield(waiter), 10)
    assert room.order == ["first", "w0", "w1", "w2", "w3", "w4"]
    assert room.tries - tries <= 2 * 5, "each release should cost the head's try and its successor's, no more"
    assert not queue.queue


async def test_a_full_queue_answers_429_with_retry_after():
    queue, room = Admission(max_queued=2, timeout_s=120), Room(0)
    waiters = [asyncio.create_task(queue.admit(room.attempt(f"w{i}"))) for i in range(2)]
    await asyncio.sleep(0.05)
    with pytest.raises(Overloaded) as refused:
        await queue.admit(room.attempt("third"))
    assert refused.value.status == 429 and refused.value.code == "queue_full"
    assert refused.value.retry_after >= 1
    for w in waiters:
        w.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    assert not queue.queue, "cancelled waiters must leave the queue"


async def test_a_burst_gets_the_places_to_run_and_to_wait_before_429s(monkeypatch):
    """--max-seqs 2 --max-queued-requests 2 and 12 requests at once: 2 run and 2 wait, 8 get a 429
    (a probe saw 2 admitted and 10 refused: the arrivals counted those still reserving as waiting).
    The places to wait are the oldest arrivals'; the refusals come once a try finds no room."""
    monkeypatch.setattr(admission, "POLL_S", 60.0)
    queue, room = Admission(max_queued=2, timeout_s=120), Room(2)
    slow = room.attempt

    def attempt(name):  # a reservation takes a moment (an HTTP call): the burst arrives meanwhile
        async def go():
            await asyncio.sleep(0.01)
            return await slow(name)()
        return go

    waiters = [asyncio.create_task(queue.admit(attempt(f"r{i}"))) for i in range(12)]
    await asyncio.sleep(0.3)
    refused = [w for w in waiters if w.done() and isinstance(w.exception(), Overloaded)]
    assert len(refused) == 8 and all(w.exception().code == "queue_full" for w in refused)
    assert refused == waiters[4:] and room.order == ["r0", "r1"] and len(queue.queue) == 2
    assert room.tries <= 4, "the refused must not try"
    room.free = 2  # both running requests end
    queue.wake()
    assert await asyncio.wait_for(waiters[2], 10) == "r2" and await asyncio.wait_for(waiters[3], 10) == "r3"
    assert not queue.queue


async def test_without_a_queue_a_burst_is_refused_at_once_and_a_later_arrival_tries(monkeypatch):
    """--max-queued-requests 0: arrivals behind a try are refused without trying; once the queue is
    empty the next arrival tries again, whatever the last try found (the room may be free now)."""
    monkeypatch.setattr(admission, "POLL_S", 60.0)
    queue, room = Admission(max_queued=0, timeout_s=120), Room(0)

    def slow(name):  # the burst arrives while the first try is under way
        async def go():
            await asyncio.sleep(0.01)
            return await room.attempt(name)()
        return go

    burst = [asyncio.create_task(queue.admit(slow(f"r{i}"))) for i in range(6)]
    await asyncio.gather(*burst, return_exceptions=True)
    assert all(isinstance(w.exception(), Overloaded) for w in burst) and room.tries == 1
    room.free = 1  # freed on another gateway: nothing woke this one
    assert await queue.admit(room.attempt("later")) == "later"


async def test_a_burst_past_the_bound_by_more_than_burst_is_refused_at_the_door(monkeypatch):
    monkeypatch.setattr(admission, "POLL_S", 60.0)
    monkeypatch.setattr(admission, "BURST", 3)
    queue, room = Admission(max_queued=2, timeout_s=120), Room(0)
    hold = asyncio.Event()

    def slow(name):  # the head's try is still under way as the burst arrives
        async def go():
            await hold.wait()
            return await room.attempt(name)()
        return go

    waiters = [asyncio.create_task(queue.admit(slow(f"r{i}"))) for i in range(8)]
    await asyncio.sleep(0.05)
    assert len(queue.queue) == 5 and all(isinstance(w.exception(), Overloaded) for w in waiters[5:])
    hold.set()  # the try finds no room: the newest past the bound go too
    await asyncio.sleep(0.05)
    assert len(queue.queue) == 2 and all(isinstance(w.exception(), Overloaded) for w in waiters[2:])
    for w in waiters[:2]:
        w.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)


async def test_waiting_past_the_timeout_is_a_429():
    queue, room = Admission(max_queued=2, timeout_s=0.3), Room(0)
    with pytest.raises(Overloaded) as refused:
        await queue.admit(room.attempt("late"))
    assert refused.value.code == "queue_timeout" and not queue.queue


async def test_a_resumed_request_goes_first_and_a_leaver_passes_the_turn_on(monkeypatch):
    monkeypatch.setattr(admission, "POLL_S", 60.0)
    queue, room = Admission(max_queued=1, timeout_s=120), Room(0)
    waiting = asyncio.create_task(queue.admit(room.attempt("new")))
    await asyncio.sleep(0.05)
    resumed = asyncio.create_task(queue.admit(room.attempt("resumed"), front=True))  # past the bound too
    await asyncio.sleep(0.05)
    assert len(queue.queue) == 2
    room.free = 2
    queue.wake()  # one wake: the head (`resumed`) takes a place and hands the turn to `new`, which takes the other
    assert await asyncio.wait_for(resumed, 10) == "resumed"
    assert await asyncio.wait_for(waiting, 10) == "new"
    assert room.order == ["resumed", "new"]


# -- the router, against real Redis, token services faked at the HTTP boundary -----------------
def token_service(name: str) -> ServiceInfo:
    return ServiceInfo(kind=ServiceKind.TOKEN, id=name, url=f"http://{name}", host="h", pid=1, protocol=PROTOCOL, kv_address=f"{name}:1",
                       kv_transport="tcp", max_model_len=1024, colocated=True)


class FullTokenService:
    """One token service with room for `slots` requests: /reserve answers 503 kv_full past it,
    /abort frees a place; `hang_reserve` makes /reserve take that long (the gateway times out)."""

    def __init__(self, slots: int, hang_reserve: float = 0.0):
        self.slots, self.hang_reserve = slots, hang_reserve
        self.held: list[str] = []
        self.reserve_calls, self.refused, self.aborts = 0, 0, []
        self.given_up, self.aborted_calls = [], []  # the `attempt` of each /reserve timed out, of each /abort

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else {}
        if request.url.path == "/reserve":
            self.reserve_calls += 1
            read_timeout = request.extensions["timeout"]["read"]
            if self.hang_reserve and read_timeout is not None and read_timeout < self.hang_reserve:
                await asyncio.sleep(read_timeout)  # what the real client does: gives up
                self.given_up.append(body["attempt"])
                self.held.append(body["request_id"])  # while the service takes the room all the same
                raise httpx.ReadTimeout("timed out", request=request)
            if len(self.held) >= self.slots:
                self.refused += 1
                return httpx.Response(503, json=KVFull("no KV room").body())
            self.held.append(body["request_id"])
            return httpx.Response(200, json={"request_id": body["request_id"], "service_id": "token-a",
                                             "kv_address": "token-a:1", "kv_transport": "tcp"})
        if request.url.path == "/abort":
            self.aborts.append(body["request_id"])
            self.aborted_calls.append(body["attempt"])
            found = body["request_id"] in self.held
            if found:
                self.held.remove(body["request_id"])
            return httpx.Response(200, json={"request_id": body["request_id"], "found": found})
        return httpx.Response(404, json={"error": {"message": "no", "type": "x", "param": None, "code": None}})


@pytest_asyncio.fixture
async def registry(redis_server):
    redis = metadata.connect(redis_server.url)
    registry = metadata.Registry(redis)
    await registry.renew(token_service("token-a"), ttl_s=60)
    yield registry
    await registry.deregister("token-a")
    await redis.aclose()


async def test_requests_wait_in_order_without_hammering_the_token_service(registry, monkeypatch):
    monkeypatch.setattr(admission, "POLL_S", 0.2)
    fake = FullTokenService(slots=2)
    async with httpx.AsyncClient(transport=httpx.MockTransport(fake)) as client:
        router = Router(registry, client, GatewaySettings(max_queued_requests=10, route_timeout_s=60), None)
        tasks = []
        for i in range(6):
            tasks.append(asyncio.create_task(router.reserve(f"r{i}", 10, 10)))
            await asyncio.sleep(0.01)
        await asyncio.sleep(1.0)  # four wait for room; the old code would re-send /reserve every 0.1 s each
        assert fake.held == ["r0", "r1"] and len(router.admission.queue) == 4
        assert fake.refused <= 4 + 1.0 / 0.2 + 1, f"{fake.refused} refused /reserve calls in 1 s"
        for _ in range(4):  # one request ends at a time, as its decode finishes
            await router._abort_all(fake.held[0], [token_service("token-a")])
            await asyncio.wait_for(_until(lambda: len(fake.held) == 2), 10)
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        assert fake.aborts == ["r0", "r1", "r2", "r3"] and fake.held == ["r4", "r5"]


async def test_a_reservation_given_up_on_is_aborted_at_once(registry, monkeypatch):
    monkeypatch.setattr(router_module, "RESERVE_TIMEOUT_S", 0.2)
    monkeypatch.setattr(admission, "POLL_S", 0.1)
    fake = FullTokenService(slots=4, hang_reserve=0.5)  # answers after the gateway gave up: the room is taken
    async with httpx.AsyncClient(transport=httpx.MockTransport(fake)) as client:
        router = Router(registry, client, GatewaySettings(route_timeout_s=1.0), None)
        with pytest.raises(Overloaded):
            await router.reserve("slow", 10, 10)
        await asyncio.wait_for(asyncio.gather(*router.background), 10)
    assert "slow" in fake.aborts and fake.held == [], "the room taken by a timed-out /reserve was left to its TTL"
    # each abort names the call it gives up, which the service refuses if the abort overtook it
    # (tests/unit/test_token_engine.py); each call has its own
    assert fake.given_up and fake.aborted_calls == fake.given_up and len(set(fake.given_up)) == len(fake.given_up)
    assert all(fake.given_up)


async def test_the_router_sends_the_429_through_with_sampling_untouched(registry):
    fake = FullTokenService(slots=0)
    async with httpx.AsyncClient(transport=httpx.MockTransport(fake)) as client:
        router = Router(registry, client, GatewaySettings(max_queued_requests=0), None)
        with pytest.raises(Overloaded) as refused:
            async for _ in router.generate("r-full", [1, 2, 3], SamplingParams(max_tokens=4)):
                pass
    assert refused.value.status == 429 and fake.reserve_calls == 1


async def test_a_full_token_service_is_not_logged_as_a_warning_and_a_429_has_retry_after(caplog):
    app = FastAPI()
    install_error_handlers(app, public=True)

    @app.post("/full")
    async def full():
        raise KVFull("no KV room for 40 tokens")

    @app.post("/busy")
    async def busy():
        raise Overloaded("at capacity", code="queue_full", retry_after=7)

    with caplog.at_level(logging.INFO):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as client:
            assert (await client.post("/full")).status_code == 503
            resp = await client.post("/busy")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert resp.status_code == 429 and resp.headers["retry-after"] == "7"
    assert resp.json()["error"]["code"] == "queue_full" and resp.json()["error"]["type"] == "rate_limit_exceeded"


async def _until(predicate) -> None:
    while not predicate():
        await asyncio.sleep(0.01)


async def test_a_resumed_request_waits_for_a_token_service_to_come_back(redis_server, monkeypatch):
    """Its token service died and was the only one: the request waits (as `dejavu up` restarts it)
    instead of failing at once; past --resume-wait-s it fails, not with a client's 429."""
    monkeypatch.setattr(admission, "POLL_S", 0.05)
    monkeypatch.setattr(router_module, "REGISTRY_CACHE_S", 0.0)
    redis = metadata.connect(redis_server.url)
    registry, fake = metadata.Registry(redis), FullTokenService(slots=4)
    try:
        async with httpx.AsyncClient(transport=httpx.MockTransport(fake)) as client:
            router = Router(registry, client, GatewaySettings(resume_wait_s=0.5), None)
            with pytest.raises(Unavailable, match="--resume-wait-s"):
                await router.reserve("r-orphan", 10, 10, exclude={"token-dead"}, resume=True)
            waiting = asyncio.create_task(router.reserve("r-resumed", 10, 10, exclude={"token-dead"}, resume=True))
            await asyncio.sleep(0.2)
            await registry.renew(token_service("token-a"), ttl_s=60)  # the restarted one registers
            reservation, svc = await asyncio.wait_for(waiting, 10)
            assert svc.id == "token-a" and fake.held == ["r-resumed"]
    finally:
        await registry.deregister("token-a")
        await redis.aclose()


async def test_a_new_request_waits_for_a_token_service_that_went_lately(redis_server, monkeypatch):
    """The only token service went (killed and restarting, as under `dejavu up`, or hung past its
    lease): a new request waits for it as a resumed one does, for --resume-wait-s from the first
    read that found none (a gateway idle longer than that too), instead of a 503 (a probe: every new
    request while `dejavu up`'s token service was stopped 6 s). Past that, where none was ever
    listed, or where only another cluster's are: a 503 at once, saying so, never a 429."""
    monkeypatch.setattr(admission, "POLL_S", 0.05)
    monkeypatch.setattr(router_module, "REGISTRY_CACHE_S", 0.0)
    redis = metadata.connect(redis_server.url)
    registry, fake = metadata.Registry(redis, cluster="ours"), FullTokenService(slots=16)
    ours = token_service("token-a").model_copy(update={"cluster": "ours"})
    theirs = token_service("token-x").model_copy(update={"cluster": "theirs"})
    try:
        async with httpx.AsyncClient(transport=httpx.MockTransport(fake)) as client:
            for max_queued in (1024, 0):
                settings = GatewaySettings(resume_wait_s=1.5, lease_ttl_s=0.2, lease_renew_s=0.1,
                                           max_queued_requests=max_queued)
                router = Router(registry, client, settings, None)
                started = time.monotonic()
                with pytest.raises(Unavailable, match="no token service is registered: start one"):
                    await router.reserve(f"r-never-{max_queued}", 10, 10)
                assert time.monotonic() - started < 0.5
                await registry.renew(ours, ttl_s=60)
                assert (await router.reserve(f"r-1-{max_queued}", 10, 10))[1].id == "token-a"
                await asyncio.sleep(1.6)  # idle longer than --resume-wait-s: no read meanwhile
                await registry.deregister("token-a")
                await asyncio.sleep(0.3)  # past the lease TTL: no longer listed
                waiting = asyncio.create_task(router.reserve(f"r-new-{max_queued}", 10, 10))
                await asyncio.sleep(0.5)
                if not max_queued:  # no waiting allowed: a 503 that says why, not the 429 "at capacity"
                    with pytest.raises(Unavailable, match="no token service is registered: none has been for"):
                        await waiting
                    waiting = asyncio.create_task(router.reserve(f"r-new-{max_queued}", 10, 10))
                else:
                    assert not waiting.done() and len(router.admission.queue) == 1
                await registry.renew(ours, ttl_s=60)  # back
                assert (await asyncio.wait_for(waiting, 10))[1].id == "token-a"
                await registry.deregister("token-a")
                await asyncio.sleep(0.3)
                started = time.monotonic()
                with pytest.raises(Unavailable, match=r"none has been for \d+ s") as refused:
                    await router.reserve(f"r-late-{max_queued}", 10, 10)  # (with no queue: at once, not a 429)
                assert refused.value.status == 503 and time.monotonic() - started < 5
                await registry.renew(ours, ttl_s=60)
                await router.reserve(f"r-2-{max_queued}", 10, 10)
                await registry.deregister("token-a")
                await registry.renew(theirs, ttl_s=60)  # a wrong cluster token on the one restarted
                await asyncio.sleep(0.3)
                started = time.monotonic()
                with pytest.raises(Unavailable, match="1 token service.s. of another cluster token"):
                    await router.reserve(f"r-foreign-{max_queued}", 10, 10)
                assert time.monotonic() - started < 0.5
                await registry.deregister("token-x")
            assert len(fake.held) == 6
    finally:
        for name in ("token-a", "token-x"):
            await registry.deregister(name)
        await redis.aclose()


async def test_a_waiter_pushed_back_by_a_resumed_request_waits_instead_of_spinning(monkeypatch):
    """Two resumed requests join one after the other: the first's turn is set, the second goes in
    front of it. The first must wait again, not loop on its set event (a hot loop on 3.11, a frozen
    event loop on 3.12+, which the review of this change found)."""
    class CountingEvent(asyncio.Event):
        waits = 0

        async def wait(self):
            CountingEvent.waits += 1
            return await super().wait()

    monkeypatch.setattr(admission, "POLL_S", 60.0)
    monkeypatch.setattr(admission.asyncio, "Event", CountingEvent)  # the queue's turns count their waits
    queue, room = Admission(max_queued=10, timeout_s=120), Room(0)
    first = asyncio.create_task(queue.admit(room.attempt("first"), front=True))
    await asyncio.sleep(0)
    second = asyncio.create_task(queue.admit(room.attempt("second"), front=True))
    await asyncio.sleep(0.3)
    assert CountingEvent.waits <= 6, f"{CountingEvent.waits} waits in 0.3 s: a waiter spins"
    room.free = 2
    queue.wake()
    assert await asyncio.wait_for(second, 10) == "second" and await asyncio.wait_for(first, 10) == "first"


async def test_a_service_whose_reservation_is_being_aborted_is_not_asked_again(registry, monkeypatch):
    """A /reserve that timed out is aborted; a new /reserve of the same request on the same service
    before that abort is through could be freed by it (the two race on separate connections)."""
    monkeypatch.setattr(router_module, "RESERVE_TIMEOUT_S", 0.2)
    monkeypatch.setattr(admission, "POLL_S", 0.05)
    fake = FullTokenService(slots=4, hang_reserve=0.5)
    aborting, overlaps = [], []
    plain = fake.__call__

    async def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/abort":
            aborting.append(True)
            await asyncio.sleep(0.5)  # a slow abort
            aborting.pop()
        elif request.url.path == "/reserve":
            if aborting:
                overlaps.append(True)
            if fake.reserve_calls:
                fake.hang_reserve = 0.0  # the first one hangs past the gateway's timeout, the next ones answer
        return await plain(request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handle)) as client:
        router = Router(registry, client, GatewaySettings(route_timeout_s=10), None)
        reservation, svc = await asyncio.wait_for(router.reserve("r-slow", 10, 10), 10)
        await asyncio.gather(*router.background)
    assert svc.id == "token-a" and not overlaps, "asked again while its abort was in flight"
    assert fake.held == ["r-slow"], "the abort freed the reservation made after it"


async def test_a_hung_token_service_holds_a_reservation_a_second_and_is_passed_over_after(registry, monkeypatch):
    """Found by killing processes (SIGSTOP on an idle token service): every new request waited
    ~10 s, the admission queue's head on /reserve there until RESERVE_TIMEOUT_S, everyone else
    behind it. With another service left to ask it is asked with RESERVE_QUICK_S, then passed
    over for PASSED_OVER_S: the next requests go straight to the other."""
    monkeypatch.setattr(router_module, "RESERVE_QUICK_S", 0.2)
    monkeypatch.setattr(router_module, "PASSED_OVER_S", 30.0)
    fake, asked = FullTokenService(slots=4), []

    async def handle(request: httpx.Request) -> httpx.Response:
        if request.url.host == "token-h" and request.url.path == "/reserve":  # SIGSTOPped: never answers
            asked.append(request.extensions["timeout"]["read"])
            await asyncio.sleep(asked[-1])
            raise httpx.ReadTimeout("timed out", request=request)
        if request.url.host == "token-h":  # its abort: no answer either
            raise httpx.ConnectTimeout("timed out", request=request)
        return await fake(request)

    hung = token_service("token-h").model_copy(update={"url": "http://token-h", "kv_bytes_free": 1 << 40})  # asked first
    await registry.renew(hung, ttl_s=60)
    try:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handle)) as client:
            router = Router(registry, client, GatewaySettings(route_timeout_s=60), None)
            for rid in ("r0", "r1", "r2"):
                reservation, svc = await asyncio.wait_for(router.reserve(rid, 10, 10), 10)
                assert svc.id == "token-a", rid
            await asyncio.gather(*router.background)
        assert asked == [0.2], "the hung service was asked once, and briefly"
        assert fake.held == ["r0", "r1", "r2"]
    finally:
        await registry.deregister("token-h")


async def test_a_dead_token_service_still_leased_is_not_asked_in_a_loop(registry, monkeypatch):
    """Found by killing processes: a resumed request whose only candidate was dead but still
    leased asked it ~2,000 times in 5 s (each refusal's abort woke the queue's head at once), the
    gateway's CPU spent on it. Now it is passed over PASSED_OVER_S after each refusal."""
    monkeypatch.setattr(admission, "POLL_S", 0.05)
    monkeypatch.setattr(router_module, "PASSED_OVER_S", 0.5)
    refused = []

    async def handle(request: httpx.Request) -> httpx.Response:
        refused.append(request.url.path)
        raise httpx.ConnectError("connection refused", request=request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handle)) as client:
        router = Router(registry, client, GatewaySettings(resume_wait_s=1.5), None)
        with pytest.raises(Unavailable, match="--resume-wait-s"):
            await router.reserve("r-resumed", 10, 10, exclude={"token-x"}, resume=True)
        await asyncio.gather(*router.background)
    assert 2 <= refused.count("/reserve") <= 4, refused  # once every PASSED_OVER_S of the 1.5 s


async def test_an_answer_the_gateway_cannot_read_is_the_services_failure_not_a_500(registry):
    """Found by killing processes across a code change: a prompt service restarted from newer code
    answered a prefill with a field the running gateway did not know; pydantic's ValidationError
    went up as a 500 "internal error". Now an unreadable answer is the service's failure: a 502,
    and a /reserve's service is passed over as for any other failure."""
    from common.errors import UpstreamError
    from common.protocol import PrefillRequest

    async def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/prefill":
            return httpx.Response(200, json={"request_id": "r", "first": {"request_id": "r", "index": 0, "token_id": 5,
                                                                          "from_the_future": 1},
                                             "prefill_ms": 1.0, "stream_tail_ms": 0.0})
        return httpx.Response(200, content=b"not json")

    async with httpx.AsyncClient(transport=httpx.MockTransport(handle)) as client:
        router = Router(registry, client, GatewaySettings(route_timeout_s=0.5), None)
        svc = token_service("token-a")
        req = PrefillRequest(request_id="r", prompt_ids=[1, 2], sampling=SamplingParams(), target_service_id="token-a",
                             target_kv_address="")
        with pytest.raises(UpstreamError, match="cannot read") as info:
            await router.prefill_on(svc, req)
        assert info.value.status == 502 and "from_the_future" in info.value.message
        with pytest.raises(Overloaded):  # its /reserve answered garbage: passed over, the request waits
            await router.reserve("r", 10, 10)
        assert "token-a" in router._passed_over
        await asyncio.gather(*router.background)


async def test_arrivals_are_admitted_in_arrival_order_even_when_answers_come_back_out_of_order():
    """Ten requests arrive together; the earlier ones' reservations take longer to answer. With
    each arrival trying at once they were admitted in the order the answers came back (the
    overload test saw request 1 served after request 25); one try at a time keeps arrival order."""
    queue, order = Admission(max_queued=100, timeout_s=60), []

    def attempt(i: int):
        async def go():
            await asyncio.sleep(0.01 * (10 - i))  # the earlier, the slower
            order.append(i)
            return i
        return go

    waiters = []
    for i in range(10):
        waiters.append(asyncio.create_task(queue.admit(attempt(i))))
        await asyncio.sleep(0)
    assert await asyncio.wait_for(asyncio.gather(*waiters), 10) == list(range(10))
    assert order == list(range(10))
