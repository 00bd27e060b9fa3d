"""Finding services and talking to them. The gateway knows services only through the registry.

`Router.generate` is the whole disaggregated path for one request, as an async iterator of
TokenEvents: reserve KV room on a token service T (least loaded first; a full one is skipped),
prefill on a prompt service P (another P is tried if one fails), then stream decode events from
T. Leaving the iterator early (stop string, client gone, error) aborts the request on T and P.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator

import httpx

from common.errors import DejavuError, KVFull, Unavailable, UpstreamError, from_body
from common.metadata import Registry
from common.protocol import (AbortRequest, DecodeEvent, DecodeRequest, PrefillRequest, PrefillResult, Reservation,
                             ReserveRequest, SamplingParams, ServiceInfo, ServiceKind, TokenEvent)
from common.settings import GatewaySettings

log = logging.getLogger(__name__)
REGISTRY_CACHE_S = 0.5
PREFILL_ATTEMPTS = 3


class Router:
    def __init__(self, registry: Registry, client: httpx.AsyncClient, settings: GatewaySettings):
        self.registry, self.client, self.settings = registry, client, settings
        self._cache: tuple[float, list[ServiceInfo]] = (0.0, [])
        self.in_flight: Counter[str] = Counter()  # service id -> requests this gateway has there

    async def services(self, kind: ServiceKind) -> list[ServiceInfo]:
        at, infos = self._cache
        if time.monotonic() - at > REGISTRY_CACHE_S:
            infos = await self.registry.services()
            self._cache = (time.monotonic(), infos)
        return [i for i in infos if i.kind == kind]

    async def generate(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams) -> AsyncIterator[TokenEvent]:
        reservation, token_svc = await self.reserve(request_id, len(prompt_ids), sampling.max_tokens)
        self.in_flight[token_svc.id] += 1
        released, holders = False, [token_svc]  # holders: services that may still hold something of it
        try:
            result = await self.prefill(PrefillRequest(
                request_id=request_id, prompt_ids=prompt_ids, sampling=sampling,
                target_service_id=token_svc.id, target_kv_address=reservation.kv_address), holders)
            del holders[1:]  # prefill answered: the prompt service holds nothing any more
            yield result.first
            if result.first.finish_reason:
                return  # done at the first token: the reserved row is released in `finally`
            decode = DecodeRequest(request_id=request_id, prompt_ids=prompt_ids, first_token=result.first.token_id,
                                   sampling=sampling)
            async with contextlib.aclosing(self.decode(token_svc, decode)) as events:
                async for event in events:
                    released = bool(event.finish_reason)  # a finished decode frees its own row
                    yield event
                    if released:
                        return
            raise UpstreamError(f"token service {token_svc.id} ended the stream before the request finished")
        finally:
            self.in_flight[token_svc.id] -= 1
            if not released:  # early end (stop string, client gone, error) or no decode at all
                await asyncio.shield(self._abort_all(request_id, holders))

    async def reserve(self, request_id: str, prompt_tokens: int, max_tokens: int) -> tuple[Reservation, ServiceInfo]:
        deadline = time.monotonic() + self.settings.route_timeout_s
        req = ReserveRequest(request_id=request_id, prompt_tokens=prompt_tokens, max_tokens=max_tokens)
        while True:
            services = await self.services(ServiceKind.TOKEN)
            if not services:
                raise Unavailable("no token service is registered: start one (python -m token_service)")
            fitting = [s for s in services if s.max_model_len >= prompt_tokens + max_tokens]
            if not fitting:
                raise Unavailable(f"no token service takes {prompt_tokens + max_tokens} tokens (the largest takes "
                                  f"{max(s.max_model_len for s in services)}): check their --max-model-len")
            for svc in sorted(fitting, key=lambda s: (self.in_flight[s.id], s.active_requests, -s.kv_bytes_free)):
                try:
                    return Reservation.model_validate(await self._post(svc, "/reserve", req)), svc
                except KVFull:
                    continue
                except (UpstreamError, Unavailable) as exc:
                    log.warning("token service %s refused a reservation: %s", svc.id, exc.message)
            if time.monotonic() > deadline:
                raise KVFull(f"every token service is full or failing ({len(fitting)} tried for "
                             f"{self.settings.route_timeout_s:.0f} s); retry later")
            await asyncio.sleep(0.1)

    async def prefill(self, req: PrefillRequest, holders: list[ServiceInfo]) -> PrefillResult:
        """Prefill on the least loaded prompt service; on failure, abort there and try another."""
        errors, tried = [], set()
        for _ in range(PREFILL_ATTEMPTS):
            candidates = sorted((s for s in await self.services(ServiceKind.PROMPT) if s.id not in tried),
                                key=lambda s: (self.in_flight[s.id], s.active_requests))
            if not candidates:
                break
            svc = candidates[0]
            tried.add(svc.id)
            holders.append(svc)
            self.in_flight[svc.id] += 1
            try:
                return PrefillResult.model_validate(
                    await self._post(svc, "/prefill", req, timeout=self.settings.request_timeout_s))
            except (UpstreamError, Unavailable) as exc:
                errors.append(f"{svc.id}: {exc.message}")
                log.warning("prefill on %s failed: %s", svc.id, exc.message)
                await self._abort_all(req.request_id, [svc])  # it may still be streaming into the row
                holders.remove(svc)
            finally:
                self.in_flight[svc.id] -= 1
        if not errors:
            raise Unavailable("no prompt service is registered: start one (python -m prompt_service)")
        raise UpstreamError("prefill failed on every prompt service tried: " + "; ".join(errors))

    async def decode(self, svc: ServiceInfo, req: DecodeRequest) -> AsyncIterator[TokenEvent]:
        timeout = httpx.Timeout(10.0, read=self.settings.token_timeout_s)
        try:
            async with self.client.stream("POST", svc.url + "/decode", content=req.model_dump_json(),
                                          headers={"content-type": "application/json"}, timeout=timeout) as resp:
                if resp.status_code != 200:
                    raise _internal(svc, resp.status_code, (await resp.aread()).decode(errors="replace"))
                async for line in resp.aiter_lines():
                    if not line:
                        continue
                    event = DecodeEvent.model_validate_json(line)
                    if event.error:
                        raise UpstreamError(f"token service {svc.id}: {event.error}")
                    yield event.token
        except httpx.HTTPError as exc:
            raise UpstreamError(f"decode stream from token service {svc.id} broke: {type(exc).__name__}: {exc}") from exc

    async def _post(self, svc: ServiceInfo, path: str, body, timeout: float | None = 30.0) -> dict:
        try:
            resp = await self.client.post(svc.url + path, content=body.model_dump_json(),
                                          headers={"content-type": "application/json"}, timeout=timeout)
        except httpx.HTTPError as exc:
            raise UpstreamError(f"{svc.kind.value} service {svc.id} at {svc.url} unreachable: "
                                f"{type(exc).__name__}: {exc}") from exc
        if resp.status_code != 200:
            raise _internal(svc, resp.status_code, resp.text)
        return resp.json()

    async def _abort_all(self, request_id: str, services: list[ServiceInfo]) -> None:
        for svc in services:
            try:
                await self._post(svc, "/abort", AbortRequest(request_id=request_id), timeout=5.0)
            except DejavuError as exc:
                log.debug("abort on %s: %s", svc.id, exc.message)


def _internal(svc: ServiceInfo, status: int, text: str) -> DejavuError:
    """An error answered by one of our services. Only "busy" (503) keeps its meaning; anything
    else is our fault, not the client's: a 502, never a 4xx that tells the caller to change."""
    err = from_body(status, text)
    if isinstance(err, Unavailable):
        return err
    return UpstreamError(f"{svc.kind.value} service {svc.id} answered {status}: {err.message}")
