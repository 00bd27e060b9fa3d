"""Recovery, the gateway's half: a token service failed a request mid-decode (ARCHITECTURE §4).

`Run` is one request across its attempts. On a resume the gateway first fences the old owner (a
new epoch in Redis, so its replica writes and index updates are refused), then has the new token
service restore the KV from the replica on a cache store: it fetches tokens [0, replicated). With
no usable replica the router falls back to a re-prefill of the prompt alone. Either way the new
token service replays the tokens out after that (DecodeRequest.replay) through decode steps, as
they were first computed: their KV, and so every token drawn after them, is the same to the bit
(one forward over them, as a prefill of prompt + tokens out did, rounds differently in float32,
and seeded sampling then drew another token now and then). Only then is the old owner aborted: one
that is slow but alive drops its replica when aborted, and the store refuses that drop only once
the fetch has moved the replica to the new epoch. (Except where the request resumes on the very
service that failed it, woken, with no other registered: that copy is aborted first, as the service
takes no room for a request it still holds; Router._try_resume.)

The restore's call is bounded by the new token service's lease (a dead or hung one is found within
the lease TTL), not by --token-timeout-s: a healthy one may wait up to the fetch's own timeout on a
dead store, then answers "replica unavailable" and the request is prefilled again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import Counter, Histogram
from redis.exceptions import RedisError

from common.errors import Unavailable, UpstreamError
from common.metadata import RequestStore
from common.protocol import (FETCH_TIMEOUT_S, STAGE_MARGIN_S, RestoreRequest, RestoreResult, SamplingParams,
                             ServiceInfo, ServiceKind)

if TYPE_CHECKING:
    from gateway.router import Router

log = logging.getLogger(__name__)
RECOVERIES = Counter("dejavu_gateway_recoveries_total", "requests moved off a failed token service", ["path"])
RECOVERY_SECONDS = Histogram("dejavu_gateway_recovery_seconds", "from a token service failing to the next token",
                             ["path"], buckets=(.1, .25, .5, 1, 2, 4, 8, 16, 32, 64, 128, 256))
for _path in ("replica", "reprefill"):  # every series exists from the start (0, not absent)
    RECOVERIES.labels(_path), RECOVERY_SECONDS.labels(_path)


@dataclass
class Run:
    """One request across its attempts."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    prompt_logprobs: int | None = None  # echo with logprobs: the prompt scored, with this many alternatives
    outputs: list[int] = field(default_factory=list)  # output token ids streamed so far
    lost: set[str] = field(default_factory=set)       # token services that failed it
    losses: int = 0                                   # times one did (one that hung and woke may again)
    epoch: int = 0
    failed_at: float | None = None                    # monotonic time of the last failure
    replica: tuple[int, str] = (0, "")                 # (tokens replicated, store id) when last fenced
    stores: set[str] = field(default_factory=set)      # every store id a fence named (dropped from at the end)
    unfenced: list[ServiceInfo] = field(default_factory=list)  # lost owners not aborted yet: see Router._attempt


class TokenServiceLost(UpstreamError):
    """The decode stream broke, or went silent past --token-timeout-s: its token service died or hangs."""


async def fence(requests: RequestStore, run: Run, owner: ServiceInfo) -> None:
    """A new epoch for the request, with `owner` as its owner: the old owner's replica writes
    and index updates are refused from now on. Keeps what Redis vouched for (replicated tokens
    and their store) in `run.replica`. Without Redis, the epoch still goes up here."""
    try:
        epoch, replicated, store = await requests.fence(run.request_id, owner.id, at_least=run.epoch + 1)
        run.epoch, run.replica = epoch, (replicated, store)
        if store:
            run.stores.add(store)
    except RedisError as exc:
        log.warning("could not fence the old owner in Redis (%s): going on at epoch %d", exc, run.epoch + 1)
        run.epoch, run.replica = run.epoch + 1, (0, "")


async def restore(router: Router, run: Run, svc: ServiceInfo, prefix: list[int]) -> int | None:
    """Have `svc` rebuild the KV from the request's replica: the tokens of `prefix` it fetched (the
    rest is replayed by the decode); None when there is no usable replica (nothing replicated yet,
    its store gone, the fetch failed): then it is prefilled again."""
    (n, store_id), store = run.replica, None
    if n >= 1:
        try:
            store = next((s for s in await router.services(ServiceKind.CACHE_STORE) if s.id == store_id), None)
        except Unavailable as exc:
            log.warning("no replica lookup (%s): prefilling again", exc.message)
            return None
    if store is None:
        log.info("no usable replica (%d tokens replicated, store %s): prefilling again", n, store_id or "none")
        return None
    req = RestoreRequest(request_id=run.request_id, epoch=run.epoch, prompt_ids=prefix,
                         replicated=min(n, len(prefix)), store_id=store.id, store_kv_address=store.kv_address,
                         store_url=store.url)
    try:
        timeout = FETCH_TIMEOUT_S + STAGE_MARGIN_S + router.settings.token_timeout_s  # a pipeline's stages fetch too
        result = await router._until_lease_lapses(router._post(svc, "/restore", req, timeout, RestoreResult), svc)
    except Unavailable as exc:  # the replica could not be fetched: the KV has to come from a prefill
        log.warning("restore from the replica on %s failed (%s): prefilling again", store.id, exc.message)
        return None
    except UpstreamError as exc:  # the new token service itself failed or hangs
        raise TokenServiceLost(f"token service {svc.id} failed the restore: {exc.message}") from exc
    log.info("resumed on %s from the replica on %s: %d tokens fetched, %d to replay", svc.id, store.id,
             result.fetched, result.recomputed)
    return result.fetched
