"""Finding services and talking to them. The gateway knows services only through the registry.

`Router.generate` is the whole disaggregated path for one request, as an async iterator of
TokenEvents: reserve KV room on a token service T (least loaded first; a full one is skipped),
prefill on a prompt service P (another P is tried if one fails; a colocated T prefills itself),
then stream decode events from T. The prefilling service is the one that prefilled the prompt's
longest prefix last, where its load allows (gateway/affinity.py). Leaving the iterator early
(stop string, client gone, error) aborts the request on T and P.
If T dies or hangs, the request goes on on another token service (gateway/recovery.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from typing import TypeVar

import httpx
import prometheus_client

from common.errors import (BadRequest, DejavuError, KVFull, Overloaded, ResumeFailed, Unavailable, UpstreamError,
                           from_body)
from common.metadata import RecentServices, Registry, RequestStore
from common.protocol import (PROTOCOL, AbortRequest, DecodeEvent, DecodeRequest, DropRequest, Message, PrefillRequest,
                             PrefillResult, PrefixCacheReset, Reservation, ReserveRequest, SamplingParams, ServiceInfo,
                             ServiceKind, TokenEvent)
from common.service import answers_health
from common.settings import GatewaySettings
from gateway import affinity
from gateway.admission import Admission
from gateway.recovery import RECOVERIES, RECOVERY_SECONDS, Run, TokenServiceLost, fence, restore

log = logging.getLogger(__name__)
REGISTRY_CACHE_S = 0.5
PREFILL_ATTEMPTS = 4  # prompt services tried for one prefill (the same one again if there is no other)
PROMPT_WAIT_POLL_S = 0.25  # after every prompt service tried failed: how often to look for one that answers
LEASE_CHECK_S = 1.0  # a call or stream silent this long makes the gateway check its service's lease
ENGINES = (ServiceKind.PROMPT, ServiceKind.TOKEN)  # services that run the model
LATE_WRITE_S = 3.0  # a lost request's replicas are dropped again after this (see _drop_replicas)
REDROP_S = (15.0, 30.0, 60.0)  # then, on a store that did not answer (hung), again after these
CLOSE_WAIT_S = 2.0  # what the gateway's stop waits for the aborts still on their way (Router.close)
STORE_MEMORY_S = 3600.0  # a service no longer listed is still known (a store's URL) this long: see _drop_replicas
OWNER_WATCH_S = 45.0  # a finished request's replica is dropped by the gateway if its owner dies within this
#                       long (longer than the owner's own drop can take: a replica send in flight, then /drop)
DROP_CONCURRENCY = 16  # replicas of a dead owner's finished requests dropped at a time
M = TypeVar("M", bound=Message)  # an internal answer (_post)
RESERVE_TIMEOUT_S = 10.0  # a /reserve unanswered this long is given up (and aborted: it may have taken room)
# ... this long while another token service is left to ask: one that hangs holds the admission
# queue's head (and everyone behind it) a second, not until its lease lapses or the timeout
RESERVE_QUICK_S = 1.0
PASSED_OVER_S = 1.0  # a token service whose /reserve failed (refused, unanswered) is not asked again this long:
#                      a dead one still leased would be asked again at every wake-up of the queue's head
PREFIX_ROUTED = prometheus_client.Counter("dejavu_gateway_prefix_routed_total", "prompts sent to the service that "
                                          "prefilled their longest prefix last (--prefix-routing)")


def _refused(exc: BaseException) -> bool:
    """A connection refused somewhere in exc's causes (httpx -> httpcore -> OSError, or a group of
    them, one an address): the host answered that nothing listens there. Not an unreachable host."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ConnectionRefusedError):
            return True
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
    return False


class LeaseLapsed(UpstreamError):
    """A service stopped renewing its lease in Redis while we waited on it."""


class Absence:
    """Since when none of a kind of service has been listed, by this gateway's reads (None: one is,
    or none ever was): requests wait for one that went lately (restarting under `dejavu up` or
    compose, or hung past its lease), not for one that never was. From the first read that found
    none, not from the last that found one: an idle gateway reads seldom."""

    def __init__(self):
        self.ever, self.since = False, None

    def read(self, listed: bool) -> None:
        if listed:
            self.ever, self.since = True, None
        elif self.ever and self.since is None:
            self.since = time.monotonic()

    def lately(self, within_s: float) -> bool:
        return self.since is not None and time.monotonic() - self.since <= within_s


class Router:
    def __init__(self, registry: Registry, client: httpx.AsyncClient, settings: GatewaySettings,
                 requests: RequestStore, model_id: str = ""):
        self.registry, self.client, self.settings, self.requests = registry, client, settings, requests
        self.model_id = model_id  # model_fingerprint of the gateway's model: engines of another are not ours
        self._cache: tuple[float, list[ServiceInfo]] = (0.0, [])
        self.recent = RecentServices(registry, settings.lease_ttl_s, remember_s=STORE_MEMORY_S)
        self._aborting: set[tuple[str, str]] = set()  # (request id, service id): an abort of a reservation in flight
        self._passed_over: dict[str, float] = {}  # token service id: when it may be asked to reserve again
        # (request id, service id): an abort of a prefill in flight, sent to a service that stopped answering;
        # a retry of that request on that service waits for it (a late abort would fail the retry)
        self._prefill_aborts: dict[tuple[str, str], asyncio.Task] = {}
        self.in_flight: Counter[str] = Counter()  # service id -> requests this gateway has there
        self.background: set[asyncio.Task] = set()
        self.admission = Admission(settings.max_queued_requests, settings.route_timeout_s)
        self.ended_on: dict[str, tuple[ServiceInfo, dict[str, float]]] = {}  # see _watch_owner
        self._watcher: asyncio.Task | None = None
        self.prompts_gone, self.tokens_gone = Absence(), Absence()  # since when none of ours is listed
        self.homes = affinity.PrefixHomes() if settings.prefix_routing else None

    async def services(self, kind: ServiceKind) -> list[ServiceInfo]:
        """The services to route to (RecentServices: a Redis that restarted empty a moment ago
        costs queued and resuming requests nothing), those of this gateway's model only."""
        at, infos = self._cache
        if time.monotonic() - at > REGISTRY_CACHE_S:
            old, infos = infos, await self.recent.services()
            self._cache = (time.monotonic(), infos)
            for engine, gone in ((ServiceKind.PROMPT, self.prompts_gone), (ServiceKind.TOKEN, self.tokens_gone)):
                gone.read(any(i.kind == engine and self._ours(i) for i in infos))
            if _kv_freed(old, infos):  # another gateway's request ended: our queue's head may fit now
                self.admission.wake()
        return [i for i in infos if i.kind == kind and (kind not in ENGINES or self._ours(i))]

    def _ours(self, engine: ServiceInfo) -> bool:
        """An engine serving another model (two models on one Redis) would mix KV, one of another
        protocol version (a rolling upgrade) would misread our calls: never routed to."""
        return (not self.model_id or engine.model_id == self.model_id) and engine.protocol == PROTOCOL

    async def generate(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams,
                       prompt_logprobs: int | None = None) -> AsyncIterator[TokenEvent]:
        """The request's tokens, in order. If its token service dies or hangs mid-decode, the
        request goes on elsewhere: the client sees a pause, the same tokens, none repeated.
        `prompt_logprobs` k: the first event carries the prompt's logprobs (TokenEvent.prompt_logprobs)."""
        run = Run(request_id, prompt_ids, sampling, prompt_logprobs)
        try:
            while True:
                try:
                    async with contextlib.aclosing(self._attempt(run)) as events:
                        async for event in events:
                            if event.grammar_error:  # not what the client asked for: no text that breaks it
                                log.warning("the grammar failed after %d tokens: %s", len(run.outputs), event.grammar_error)
                                raise BadRequest(f"grammar (structured output) failed after {len(run.outputs)} "
                                                 f"tokens: {event.grammar_error}; simplify it", code="invalid_grammar")
                            run.outputs.append(event.token_id)
                            yield event
                    return
                except TokenServiceLost as exc:
                    run.losses += 1
                    if run.losses > self.settings.resume_attempts:
                        why = ("fault tolerance is off (--resume-attempts 0)" if not self.settings.resume_attempts
                               else f"token services failed it {run.losses} times")
                        raise ResumeFailed(f"the request could not be saved: {why} (last: {exc.message})") from exc
                    run.failed_at = time.monotonic()
                    log.warning("%s; resuming on another token service after %d tokens", exc.message, len(run.outputs))
                except (Unavailable, UpstreamError) as exc:
                    if not run.lost:
                        raise
                    raise ResumeFailed(f"the request could not be saved after {len(run.outputs)} tokens: its token "
                                       f"service failed and resuming failed: {exc.message}") from exc
        finally:
            self._abort_unfenced(run)  # no further attempt (the request ended or failed): abort them now
            if run.lost:  # a dead owner never drops its replica: free it on every store
                self._spawn(self._drop_replicas(request_id, named=run.stores))

    async def _attempt(self, run: Run) -> AsyncIterator[TokenEvent]:
        """One try: reserve, then the KV (a prefill of the prompt or, on a resume, a replica restored
        if there is one), then decode. On a resume the row is the prompt plus the tokens already out
        but the newest (the next input); those whose KV neither the prefill nor the replica brought
        are replayed by the token service's decode steps (gateway/recovery.py says why)."""
        outputs = run.outputs
        prefix = run.prompt_ids + outputs[:-1]  # KV the token service needs; outputs[-1] is the next input
        remaining = run.sampling.max_tokens - max(len(outputs) - 1, 0)
        home = self.homes.home_worth_it(run.prompt_ids) if self.homes else None
        reservation, token_svc = await self.reserve(run.request_id, len(prefix), remaining, exclude=run.lost,
                                                    resume=bool(run.lost), prefer=home)
        # back where it failed (_try_resume): aborted there already, and its abort now would be the new copy's
        run.unfenced = [s for s in run.unfenced if s.id != token_svc.id]
        released, holders = False, [token_svc]  # holders: services that may still hold something of it
        try:
            path, have = None, len(run.prompt_ids)  # have: tokens of prefix whose KV the row gets from outside
            if run.lost:  # a resume: fence the old owner first, so it can no longer replicate
                await fence(self.requests, run, token_svc)
                fetched = await restore(self, run, token_svc, prefix) if outputs else None
                path, have = ("reprefill", have) if fetched is None else ("replica", fetched)
                RECOVERIES.labels(path).inc()
                self._abort_unfenced(run)  # only now: aborted earlier, a live old owner drops the replica
            if path != "replica":
                req = PrefillRequest(request_id=run.request_id, epoch=run.epoch, prompt_ids=run.prompt_ids,
                                     sampling=run.sampling, target_service_id=token_svc.id,
                                     target_kv_address=reservation.kv_address,
                                     target_kv_routes=reservation.kv_routes,
                                     prompt_logprobs=None if outputs else run.prompt_logprobs)  # wanted once
                if token_svc.colocated and token_svc.stages > 1 and req.prompt_logprobs is not None:
                    raise BadRequest("scoring the prompt ('echo' with 'logprobs', or 'prompt_logprobs') needs a token "
                                     "service of one stage in colocated mode, and this one is a pipeline (--stages): "
                                     "drop one of the two", "echo")
                try:
                    result = await (self.prefill_on(token_svc, req) if token_svc.colocated
                                    else self.prefill(req, holders, prefer=home))
                except UpstreamError as exc:
                    # the KV had nowhere to go: its target died; or, colocated, it hung past its lease
                    # (awake again by now, maybe: lost all the same, fenced and aborted after the resume)
                    if (token_svc.colocated and isinstance(exc, LeaseLapsed)) or not await self._alive(token_svc):
                        raise TokenServiceLost(f"token service {token_svc.id} died or hung during prefill: "
                                               f"{exc.message}") from exc
                    raise
                if self.homes:  # a prompt scored looks nothing up, but its blocks are kept all the same
                    if holders[-1].id == home:
                        PREFIX_ROUTED.inc()
                    self.homes.record(run.prompt_ids, holders[-1].id)  # the service that prefilled it
                del holders[1:]  # prefill answered: the prompt service holds nothing any more
                if not outputs:
                    yield result.first
                    if result.first.finish_reason:
                        return  # done at the first token: the reserved row is released in `finally`
            first = outputs[-1] if outputs else result.first.token_id  # on a resume, P's sample is not used
            decode = DecodeRequest(request_id=run.request_id, epoch=run.epoch, replay=prefix[have:], first_token=first,
                                   first_index=max(len(outputs) - 1, 0), sampling=run.sampling,
                                   history=prefix if run.sampling.needs_history else [])  # what penalties count, a grammar follows
            async with contextlib.aclosing(self.decode(token_svc, decode)) as events:
                async for event in events:
                    if run.failed_at is not None and path is not None:
                        RECOVERY_SECONDS.labels(path).observe(time.monotonic() - run.failed_at)
                        run.failed_at = None
                    released = bool(event.finish_reason)  # a finished decode frees its own row
                    yield event
                    if released:
                        return
            raise TokenServiceLost(f"token service {token_svc.id} ended the stream before the request finished")
        except TokenServiceLost:
            run.lost.add(token_svc.id)
            run.unfenced.append(token_svc)  # aborted after the next attempt's fence and restore
            holders.remove(token_svc)
            raise
        finally:
            self._done(token_svc.id)
            if released:
                self.admission.wake()  # its KV is free: the next request in the queue may take it
                self._watch_owner(token_svc, run.request_id)
            else:  # early end (stop string, client gone, failure) or no decode at all
                self._spawn(self._abort_all(run.request_id, holders))
                if token_svc in holders:  # the abort has it drop the replica: if it dies first, we do
                    self._watch_owner(token_svc, run.request_id)

    async def _abort_reservation(self, call: ReserveRequest, svc: ServiceInfo) -> None:
        """Abort a /reserve call that went unanswered (the service refuses it if the abort comes
        first); until that abort is through, the request does not try that service again."""
        self._aborting.add((call.request_id, svc.id))
        try:
            await self._abort_all(call.request_id, [svc], attempt=call.attempt)
        finally:
            self._aborting.discard((call.request_id, svc.id))

    def _done(self, service_id: str) -> None:
        """One request less in flight there; a service with none leaves the table (services come
        and go: their ids must not pile up)."""
        self.in_flight[service_id] -= 1
        if self.in_flight[service_id] <= 0:
            del self.in_flight[service_id]

    def _abort_unfenced(self, run: Run) -> None:
        if run.unfenced:
            self._spawn(self._abort_all(run.request_id, run.unfenced))
            run.unfenced = []

    async def _drop_replicas(self, *request_ids: str, named: Iterable[str] = ()) -> None:
        """Drop the requests' replicas on every store (DROP_CONCURRENCY drops at a time), now and
        once more LATE_WRITE_S later: a put an owner had in flight as a request ended (an owner
        killed before its own cleanup drops nothing) may land after the first drop (bench.chaos
        left such a replica over UCX). A store that did not answer (hung, its sockets open; not one
        that refused the connection: dead) is asked again REDROP_S later: one that wakes up kept the
        replica its whole --replica-ttl-s (600 s).
        So is a store in `named` (the ids Redis gave as the requests' replica stores) that is no
        longer listed, if it was within STORE_MEMORY_S: one hung past its lease is not listed, and
        woken it would keep the replica as long."""
        gate = asyncio.Semaphore(DROP_CONCURRENCY)
        unanswered: dict[tuple[str, str], ServiceInfo] = {}  # (request id, store id): the store

        async def one(request_id: str, store: ServiceInfo) -> None:
            async with gate:
                try:
                    await self._post(store, "/drop", DropRequest(request_id=request_id), timeout=5.0)
                    unanswered.pop((request_id, store.id), None)
                except DejavuError as exc:
                    log.debug("drop on %s: %s", store.id, exc.message)
                    if _refused(exc):  # no process there, no replica to drop
                        unanswered.pop((request_id, store.id), None)
                    else:
                        unanswered[request_id, store.id] = store

        for wait in (0.0, LATE_WRITE_S):  # every store listed
            await asyncio.sleep(wait)
            try:
                stores = await self.services(ServiceKind.CACHE_STORE)
            except Unavailable:
                stores = []
            listed = {s.id for s in stores}
            stores += [info for i in set(named) - listed if (info := self.recent.remembered(i))]
            await asyncio.gather(*(one(r, s) for r in request_ids for s in stores))
        for wait in REDROP_S:  # those that did not answer
            if not unanswered:
                return
            await asyncio.sleep(wait)
            await asyncio.gather(*(one(r, s) for (r, _), s in list(unanswered.items())))

    def _watch_owner(self, svc: ServiceInfo, request_id: str) -> None:
        """A request finished (or was aborted) on `svc`, whose replicator drops its replica now. An
        owner that dies before that drop lands leaves a replica nobody else would drop (until the
        store's TTL): bench.chaos saw it, a token service killed a few ms after a request ended, and
        so did a client that left just before its token service was killed. So the gateway watches
        the owner for OWNER_WATCH_S and drops the replica itself if it dies meanwhile."""
        self.ended_on.setdefault(svc.id, (svc, {}))[1][request_id] = time.monotonic()
        if self._watcher is None or self._watcher.done():  # not in `background`: it outlives requests
            # in a context of its own: it is no one request's, and logs under none's id (it took this one's)
            self._watcher = asyncio.get_running_loop().create_task(self._watch_owners(), context=contextvars.Context())

    async def _watch_owners(self) -> None:
        """Every LEASE_CHECK_S while requests finished lately: a token service whose lease lapsed
        and that does not answer /health is dead; drop the replicas of the requests that ended on it
        (DROP_CONCURRENCY at a time: a busy service may have ended thousands)."""
        while self.ended_on:
            await asyncio.sleep(LEASE_CHECK_S)
            try:
                for service_id, (svc, ended) in list(self.ended_on.items()):
                    if not await self._leased(svc) and not await self._alive(svc, timeout=LEASE_CHECK_S):
                        self.ended_on.pop(service_id, None)
                        log.info("token service %s died: dropping the replicas of the %d requests that ended on it "
                                 "in the last %.0f s", service_id, len(ended), OWNER_WATCH_S)
                        self._spawn(self._drop_replicas(*ended))
                        continue
                    now = time.monotonic()
                    for request_id in [r for r, at in ended.items() if now - at > OWNER_WATCH_S]:
                        del ended[request_id]
                    if not ended:
                        self.ended_on.pop(service_id, None)
            except Exception:  # noqa: BLE001 - the watch goes on; what it missed the stores' TTL frees
                log.exception("watching the owners of finished requests failed; going on")

    async def close(self) -> None:
        """Stop the owner watch (the gateway is shutting down), and give the aborts and drops that
        requests ended by the stop left running a moment to reach their engines."""
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        if self.background:
            await asyncio.wait(set(self.background), timeout=CLOSE_WAIT_S)

    async def reserve(self, request_id: str, prompt_tokens: int, max_tokens: int, exclude: set[str] = frozenset(),
                      resume: bool = False, prefer: str | None = None) -> tuple[Reservation, ServiceInfo]:
        """Room on the least loaded token service that has it (`prefer` first, within
        affinity.SLACK: where a colocated one prefilled the prompt's prefix; the id of a prompt
        service is no candidate here, it is `prefill`'s), in arrival order: a request that
        finds none waits in the admission queue (gateway/admission.py), a resumed one in front.
        Counted in `in_flight` until the caller ends it."""
        req = ReserveRequest(request_id=request_id, prompt_tokens=prompt_tokens, max_tokens=max_tokens)
        if not resume:
            try:
                return await self.admission.admit(lambda: self._try_reserve(req, exclude, prefer=prefer))
            except Overloaded:  # refused or timed out while it waited for a token service, not for room
                if self.tokens_gone.since is None:
                    raise
                raise Unavailable(self._none_message()) from None
        try:
            return await self.admission.admit(lambda: self._try_resume(req, exclude, prefer), front=True,
                                              timeout_s=self.settings.resume_wait_s)
        except Overloaded:
            raise Unavailable(f"no token service with room for it came up within {self.settings.resume_wait_s:.0f} "
                              "s (--resume-wait-s)") from None

    async def _try_reserve(self, req: ReserveRequest, exclude: set[str], resume: bool = False,
                           prefer: str | None = None) -> tuple[Reservation, ServiceInfo] | None:
        """One round over the token services that could take the request; None if all are full
        (and if none is up: for a resumed request, and for a new one while none has been for at most
        --resume-wait-s: the one that failed may be starting again, as `dejavu up` and compose
        restart it, or be hung a moment; its clients wait, as for room). Not where the only token
        services listed are another model's or cluster's: that is said at once."""
        services = [s for s in await self.services(ServiceKind.TOKEN) if s.id not in exclude]
        if not services:
            others = [s for s in self._cache[1] if s.kind == ServiceKind.TOKEN and not self._ours(s)]
            misconfigured = others or self.registry.foreign[ServiceKind.TOKEN]  # said at once, not waited for
            if resume or (self.tokens_gone.lately(self.settings.resume_wait_s) and not misconfigured):
                return None
            raise Unavailable(f"no token service of this gateway's model and version is registered ({len(others)} "
                              "serve another model or version: check --model, or finish the upgrade)"
                              if others else self._none_message())
        tokens = req.prompt_tokens + req.max_tokens
        fitting = [s for s in services if s.max_model_len >= tokens]
        if not fitting:
            raise Unavailable(f"no token service takes {tokens} tokens (the largest takes "
                              f"{max(s.max_model_len for s in services)}): check their --max-model-len")
        remembered = lambda s: s.id not in self.recent.listed  # noqa: E731 - listed now first: a remembered one may be dead
        home, now = self._home(prefer, fitting), time.monotonic()
        self._passed_over = {sid: until for sid, until in self._passed_over.items() if until > now}
        order = [s for s in sorted(fitting, key=lambda s: (remembered(s), s.id != home, self.in_flight[s.id],
                                                           s.active_requests, -s.kv_bytes_free))
                 if (req.request_id, s.id) not in self._aborting  # its abort could land after a new reservation there
                 and s.id not in self._passed_over]
        # the last one Redis lists now is waited for; before it, a hung one holds the queue a second, no
        # longer (after it come only those remembered from an earlier read, likely dead: a second too)
        patient = max((i for i, s in enumerate(order) if not remembered(s)), default=len(order) - 1)
        for i, svc in enumerate(order):
            self.in_flight[svc.id] += 1  # counted now: a burst of reservations spreads out
            reserved = False
            call = req.model_copy(update={"attempt": secrets.token_hex(8)})  # what an abort of it names
            try:
                reserved = await self._reserve_on(svc, call, patient=i == patient)
                return reserved, svc
            except KVFull:
                pass  # expected under load: the request waits its turn, nothing to log
            except (UpstreamError, Unavailable) as exc:
                log.warning("token service %s refused a reservation: %s", svc.id, exc.message)
                if isinstance(exc, UpstreamError):  # e.g. timed out: the room may be taken all the same
                    self._passed_over[svc.id] = time.monotonic() + PASSED_OVER_S
                    self._spawn(self._abort_reservation(call, svc))
            except asyncio.CancelledError:  # the client left: the room may be taken already
                self._spawn(self._abort_all(req.request_id, [svc], attempt=call.attempt))
                raise
            finally:
                if not reserved:
                    self._done(svc.id)
        return None

    def _none_message(self) -> str:
        hint = self.registry.foreign_hint(ServiceKind.TOKEN)
        if self.tokens_gone.since is None:
            return "no token service is registered: start one (python -m token_service)" + hint
        return (f"no token service is registered: none has been for {time.monotonic() - self.tokens_gone.since:.0f} s "
                f"(a request waits --resume-wait-s, {self.settings.resume_wait_s:g} s, for one to come back){hint}")

    async def _try_resume(self, req: ReserveRequest, lost: set[str],
                          prefer: str | None = None) -> tuple[Reservation, ServiceInfo] | None:
        """A resumed request's round: on the token services that have not failed it; where none
        is registered, on one that did and is back (it hung and woke: Redis lists its lease again),
        once the request's old copy there is aborted. With one token service nothing else could take
        the request, and a pause of a few seconds cost it its stream. Not while another that could
        take it is registered: one that failed it may fail it again. The old copy is aborted before
        the fence here, so its replica outlives it only by the token service's DROP_GRACE_S and the
        fence that follows (token_service/replicator.py): a slow fence costs a re-prefill."""
        services, tokens = await self.services(ServiceKind.TOKEN), req.prompt_tokens + req.max_tokens
        if not lost or any(s.id not in lost and s.max_model_len >= tokens for s in services):  # another will have room
            return await self._try_reserve(req, lost, resume=True, prefer=prefer)
        back = [s for s in services if s.id in self.recent.listed]
        aborted = set()
        for svc in back:  # the old copy goes first: the service refuses room for a request it still holds
            try:
                await self._post(svc, "/abort", AbortRequest(request_id=req.request_id), timeout=RESERVE_QUICK_S)
                aborted.add(svc.id)
            except DejavuError as exc:
                log.debug("abort on %s, back after failing the request: %s", svc.id, exc.message)
        return await self._try_reserve(req, lost - aborted, resume=True, prefer=prefer) if aborted else None

    async def _reserve_on(self, svc: ServiceInfo, req: ReserveRequest, patient: bool) -> Reservation:
        """/reserve on `svc`: `patient`, until it answers or its lease lapses (hung or dead); else
        for RESERVE_QUICK_S."""
        if not patient:
            return await self._post(svc, "/reserve", req, RESERVE_QUICK_S, Reservation)
        return await self._until_lease_lapses(self._post(svc, "/reserve", req, RESERVE_TIMEOUT_S, Reservation), svc)

    async def prefill(self, req: PrefillRequest, holders: list[ServiceInfo], prefer: str | None = None) -> PrefillResult:
        """Prefill on the least loaded prompt service (`prefer` first, the one that prefilled the
        prompt's prefix, within affinity.SLACK); on failure, abort there and try another.
        When every one tried failed, wait (up to --resume-wait-s) for a prompt service that answers
        /health and try once more: a killed one is still registered until its lease lapses, and
        `dejavu up` or compose start it again within seconds; its requests then wait, not fail
        (a 503 if none came back)."""
        try:
            return await self._prefill_round(req, holders, prefer)
        except (UpstreamError, Unavailable) as first:
            # none registered: wait too if one was, lately (its lease lapsed before it came back)
            if isinstance(first, Unavailable) and not self.prompts_gone.lately(self.settings.resume_wait_s):
                raise
            deadline = time.monotonic() + self.settings.resume_wait_s
            while True:
                live = await self.services(ServiceKind.PROMPT)
                if any(await asyncio.gather(*(self._alive(s, timeout=1.0) for s in live))):
                    break
                if time.monotonic() >= deadline:
                    raise Unavailable(f"no prompt service answered within {self.settings.resume_wait_s:.0f} s "
                                      f"(--resume-wait-s) after {first.message}") from None
                await asyncio.sleep(PROMPT_WAIT_POLL_S)
            log.info("a prompt service answers again: prefilling once more")
            return await self._prefill_round(req, holders, prefer)

    async def _prefill_round(self, req: PrefillRequest, holders: list[ServiceInfo],
                             prefer: str | None = None) -> PrefillResult:
        errors, tried = [], set()
        for _ in range(PREFILL_ATTEMPTS):
            live = await self.services(ServiceKind.PROMPT)
            if req.prompt_logprobs is not None:  # only a whole model in one process scores a prompt
                if live and all(s.stages > 1 for s in live):
                    raise BadRequest("scoring the prompt ('echo' with 'logprobs', or 'prompt_logprobs') needs a prompt "
                                     "service of one stage, and this cluster's are pipelines (--stages): drop one of "
                                     "the two", "echo")
                live = [s for s in live if s.stages <= 1]
            home = self._home(prefer, [s for s in live if s.id not in tried])
            candidates = sorted(live, key=lambda s: (s.id in tried, s.id not in self.recent.listed, s.id != home,
                                                     self.in_flight[s.id], s.active_requests))
            if not candidates:
                break
            svc = candidates[0]  # an untried one first; a failed one again only if it is still registered
            tried.add(svc.id)
            holders.append(svc)
            self.in_flight[svc.id] += 1
            try:
                if (pending := self._prefill_aborts.get((req.request_id, svc.id))) is not None:
                    await asyncio.wait({pending})  # not cancelled with this request: it still frees the row
                return await self.prefill_on(svc, req)
            except (UpstreamError, Unavailable) as exc:
                errors.append(f"{svc.id}: {exc.message}")
                log.warning("prefill on %s failed: %s", svc.id, exc.message)
                abort = self._abort_all(req.request_id, [svc])  # it may still be streaming into the row
                if isinstance(exc, LeaseLapsed):  # a hung service would hold another's retry for the abort's timeout
                    key = (req.request_id, svc.id)
                    self._prefill_aborts[key] = task = self._spawn(abort)
                    task.add_done_callback(lambda t, key=key: self._prefill_aborts.get(key) is t
                                           and self._prefill_aborts.pop(key))
                else:
                    await abort
                holders.remove(svc)
            finally:
                self._done(svc.id)
        if not errors:
            raise Unavailable("no prompt service is registered: start one (python -m prompt_service)")
        raise UpstreamError("prefill failed on every prompt service tried: " + "; ".join(errors))

    def _home(self, prefer: str | None, candidates: list[ServiceInfo]) -> str | None:
        """`prefer`, if it is a candidate with at most affinity.SLACK requests in flight more than
        the least loaded one listed now (one only remembered may be dead): a prefix is worth a
        short wait, not a queue."""
        if prefer is None or prefer not in {s.id for s in candidates}:
            return None
        loads = [self.in_flight[s.id] for s in candidates if s.id in self.recent.listed] or [0]
        return prefer if self.in_flight[prefer] <= min(loads) + affinity.SLACK else None

    async def prefill_on(self, svc: ServiceInfo, req: PrefillRequest) -> PrefillResult:
        """One prefill on `svc`: a prompt service, or in colocated mode the token service holding
        the reservation. LeaseLapsed if `svc` stops renewing its lease meanwhile."""
        return await self._until_lease_lapses(self._post(svc, "/prefill", req, self.settings.request_timeout_s,
                                                         PrefillResult), svc)

    async def decode(self, svc: ServiceInfo, req: DecodeRequest) -> AsyncIterator[TokenEvent]:
        timeout = httpx.Timeout(10.0, read=self.settings.token_timeout_s)
        try:
            async with _closing(await self.client.send(self.client.build_request(
                    "POST", svc.url + "/decode", content=req.model_dump_json(),
                    headers={"content-type": "application/json"}, timeout=timeout), stream=True)) as resp:
                if resp.status_code != 200:
                    err = _internal(svc, resp.status_code, (await resp.aread()).decode(errors="replace"))
                    raise TokenServiceLost(err.message)
                async for line in self._while_leased(resp.aiter_lines(), svc):
                    if not line:
                        continue
                    try:
                        event = DecodeEvent.model_validate_json(line)
                    except ValueError as exc:  # a service of another build than ours (PROTOCOL not bumped?)
                        raise UpstreamError(f"token service {svc.id} sent a decode event this gateway cannot read: "
                                            f"{exc}") from exc
                    if event.error:
                        raise UpstreamError(f"token service {svc.id}: {event.error}")
                    yield event.token
        except httpx.HTTPError as exc:  # refused, reset, or silent past --token-timeout-s (a hang)
            raise TokenServiceLost(f"decode stream from token service {svc.id} broke: {type(exc).__name__}: {exc}") from exc

    async def _while_leased(self, lines: AsyncIterator[str], svc: ServiceInfo) -> AsyncIterator[str]:
        """The lines of a decode stream, until its token service's lease in Redis lapses: a hung
        service is found after the lease TTL (3 s by default), sooner than --token-timeout-s."""
        it = aiter(lines)
        while True:
            try:
                line = await self._until_lease_lapses(anext(it), svc)
            except StopAsyncIteration:
                return
            except LeaseLapsed as exc:
                raise TokenServiceLost(exc.message) from exc
            yield line

    async def _until_lease_lapses(self, call, svc: ServiceInfo):
        """Await `call`, unless `svc` stops renewing its lease first (it hangs or died): then
        LeaseLapsed, instead of waiting out the call's timeout. A lease missing from a Redis that
        restarted empty, or lapsed while Redis was paused, is not death: a service that still
        answers /health is waited for (it registers again within a renewal)."""
        task = asyncio.ensure_future(call)
        try:
            while not (await asyncio.wait({task}, timeout=LEASE_CHECK_S))[0]:
                if not await self._leased(svc) and not await self._alive(svc, timeout=LEASE_CHECK_S):
                    raise LeaseLapsed(f"{svc.kind.value} service {svc.id} stopped renewing its lease and does not "
                                      "answer /health (hung or dead)")
            return task.result()
        finally:
            task.cancel()

    async def _leased(self, svc: ServiceInfo) -> bool:
        """Whether the registry itself listed `svc` at its last read (not the routing view, which
        keeps a forgotten lease a while longer); the read is the routing view's, cached."""
        try:
            await self.services(svc.kind)
        except Unavailable:  # Redis down: the read timeout is all there is
            return True
        return svc.id in self.recent.listed

    async def _post(self, svc: ServiceInfo, path: str, body, timeout: float | None = 30.0, answer: type[M] | None = None):
        """`svc`'s answer to `body` at `path`: JSON, or read as `answer`. An answer this gateway
        cannot read (a service of another build) is the service's failure, a 502, not ours (a 500)."""
        try:
            resp = await self.client.post(svc.url + path, content=body.model_dump_json(),
                                          headers={"content-type": "application/json"}, timeout=timeout)
        except httpx.HTTPError as exc:
            raise UpstreamError(f"{svc.kind.value} service {svc.id} at {svc.url} unreachable: "
                                f"{type(exc).__name__}: {exc}") from exc
        if resp.status_code != 200:
            raise _internal(svc, resp.status_code, resp.text)
        try:
            return resp.json() if answer is None else answer.model_validate_json(resp.content)
        except ValueError as exc:  # not JSON, or not the message (pydantic's ValidationError is a ValueError)
            raise UpstreamError(f"{svc.kind.value} service {svc.id} answered {path} with what this gateway cannot "
                                f"read: {str(exc)[:300]}") from exc

    async def _alive(self, svc: ServiceInfo, timeout: float = 2.0) -> bool:
        return await answers_health(svc.url, timeout, self.client)

    def _spawn(self, coro) -> asyncio.Task:
        """Run in the background (an abort must not wait on a hung service), keeping a reference."""
        task = asyncio.ensure_future(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task

    async def reset_prefix_caches(self) -> list[str]:
        """Every prompt and token service of this model forgets its prefix cache, and this gateway
        where it sent each prefix; the ids of the services that did not (their caches kept)."""
        if self.homes is not None:
            self.homes.clear()
        services = await self.services(ServiceKind.PROMPT) + await self.services(ServiceKind.TOKEN)

        async def one(svc: ServiceInfo) -> PrefixCacheReset | None:
            try:
                return await self._post(svc, "/prefix_cache/reset", Message(), 10.0, PrefixCacheReset)
            except DejavuError as exc:  # unreachable, an error, or a build without the route
                log.warning("prefix cache reset on %s failed: %s", svc.id, getattr(exc, "message", exc))
                return None

        answers = await asyncio.gather(*(one(svc) for svc in services))
        done = [a for a in answers if a is not None]
        log.info("prefix caches reset on %d of %d services: %d blocks (%.1f MiB) forgotten", len(done), len(services),
                 sum(a.blocks for a in done), sum(a.bytes for a in done) / 2**20)
        return [svc.id for svc, a in zip(services, answers) if a is None]

    async def _abort_all(self, request_id: str, services: list[ServiceInfo], attempt: str | None = None) -> None:
        """At once on every service: one that hangs must not hold back the others. With an
        `attempt`, only the room that /reserve call took (AbortRequest)."""
        body = AbortRequest(request_id=request_id, attempt=attempt)

        async def one(svc: ServiceInfo) -> None:
            try:
                await self._post(svc, "/abort", body, timeout=5.0)
            except DejavuError as exc:
                log.debug("abort on %s: %s", svc.id, exc.message)

        await asyncio.gather(*(one(svc) for svc in services))
        self.admission.wake()  # the aborted request's KV is free


@contextlib.asynccontextmanager
async def _closing(resp: httpx.Response):
    """A streamed answer, closed at the end whatever happens meanwhile. When its client leaves, the
    request is cancelled over and over (the ASGI server's cancel scope) while it cleans up: the
    close, cut short, left the connection open to the token service for good (a socket and a file
    descriptor on each side for every stream a client closed). Shielded, it runs to its end."""
    try:
        yield resp
    finally:
        await asyncio.shield(resp.aclose())


def _kv_freed(old: list[ServiceInfo], new: list[ServiceInfo]) -> bool:
    """Whether a token service has more room in `new` leases than in `old` ones (or is new)."""
    before = {s.id: s for s in old if s.kind == ServiceKind.TOKEN}
    return any(s.id not in before or s.kv_bytes_free > before[s.id].kv_bytes_free
               or s.active_requests < before[s.id].active_requests for s in new if s.kind == ServiceKind.TOKEN)


def _internal(svc: ServiceInfo, status: int, text: str) -> DejavuError:
    """An error answered by one of our services. Only "busy" (503) keeps its meaning; anything
    else is our fault, not the client's: a 502, never a 4xx that tells the caller to change."""
    err = from_body(status, text)
    if isinstance(err, Unavailable):
        return err
    return UpstreamError(f"{svc.kind.value} service {svc.id} answered {status}: {err.message}")
