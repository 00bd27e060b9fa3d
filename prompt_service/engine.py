"""The prefill engine. A request's life on a prompt service:

1. `submit`   the gateway asks to prefill a prompt into KV room it reserved on token service T;
              a link to T's KV address is opened (or reused) and the job queued. T a pipeline
              of stages: a link to each stage, whose layers' KV goes to it straight
              (PrefillRequest.target_kv_routes).
2. `run`      jobs are batched up to --max-batch-tokens and run as one forward pass (prompts
              back to back, no padding) in a worker thread. A prompt longer than that runs in
              chunks of --max-batch-tokens, one forward each, attending to the earlier chunks'
              KV in a pool of its own (chunked prefill).
3. on_layer   inside the forward, as soon as layer l's K/V exists, each job's slice is copied
              into one contiguous buffer and handed to the job's sender task, which streams it
              to T while layer l+1 computes (layer-by-layer streaming); a chunk's KV goes out
              as its own messages, token range and all, while the next chunk computes.
4. sample     the first output token is sampled from the last prompt position; with
              PrefillRequest.prompt_logprobs (echo with logprobs), every prompt token after the
              first is scored against the logits before it, chunk by chunk, and those come back
              on the first token's event.
5. answer     once T has acknowledged every layer, the job resolves with the first token.

With the prefix cache (engine/prefix_cache.py) a prompt is looked up as it reaches the head of the
queue; a hit's KV is sent to T first, from the cache, and the rest of the prompt is computed as a
chunk attending to it, in one forward with other prompts (whole, or the rests of hits of theirs:
the cached blocks they share are in the forward's pool once, HIT_BATCH_BYTES): on CPU the KV T
gets is the bits a prefill without the hit computes (engine/prefix_cache.py, MIN_COMPUTED), so a
request resumed by re-prefill gets the KV its first prefill had.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from prometheus_client import Gauge, Histogram

from common import grammar
from common.errors import BadRequest, UpstreamError
from common.kv.copy import gather_prefill
from common.kv.peers import KVRejected, PeerLink, Peers
from common.kv.transport import TransportError
from common.protocol import PrefillRequest, PrefillResult, PromptLogprob, TokenEvent, block_keys
from common.sampling import first_event, named_tokens, sample_first
from common.service import request_id_var
from common.settings import PromptSettings
from engine.attention import Segment
from engine.runner import ModelRunner
from engine.prefix_cache import PrefixCache

log = logging.getLogger(__name__)
# Taking turns on the host's cores with token services (--cpu-placement turns), a forward computes
# at most this many prompt tokens, as a colocated token service prefills between two decode steps:
# running streams then wait ~0.7 s at most (a 500-token prefill on 2 cores), not one of 4096 tokens.
TURN_TOKENS = 512
# Prompts with prefix-cache hits share a forward (the rest of each computed at once, as a batch of
# whole prompts is) while the forward's pool, where each piece's KV sits for the rests to attend to,
# holds at most this much (a first piece that needs more runs alone); a block cached once is in it
# once, however many hits share it. (A judgment: a few hundred MB at most for a batch of chat turns.)
HIT_BATCH_BYTES = 256 << 20

PREFILL_SECONDS = Histogram("dejavu_prompt_prefill_seconds", "one prefill forward pass (a batch)",
                            buckets=(.05, .1, .25, .5, 1, 2, 4, 8, 16))
STREAM_TAIL_SECONDS = Histogram("dejavu_prompt_stream_tail_seconds",
                                "from the last layer computed to the last layer acknowledged",
                                buckets=(.001, .003, .01, .03, .1, .3, 1))
QUEUED = Gauge("dejavu_prompt_queued_requests", "prefills waiting for a batch")
IN_FLIGHT = Gauge("dejavu_prompt_in_flight_requests", "prefills accepted and not yet answered")


Route = tuple[str, int, int]  # (KV address, first layer, end layer): where those layers' KV goes


def routes_of(req: PrefillRequest, layers: int) -> list[Route]:
    """Where the KV of each layer goes: the token service, or each stage of a token pipeline."""
    routes = [tuple(r) for r in req.target_kv_routes] or [(req.target_kv_address, 0, layers)]
    if [r[1] for r in routes] != [0] + [r[2] for r in routes[:-1]] or routes[-1][2] != layers or \
            any(start >= end for _, start, end in routes):
        raise BadRequest(f"target_kv_routes {routes} do not split the model's {layers} layers in order",
                         param="target_kv_routes")
    return routes


def layers_per_message(settings: PromptSettings, layers: int) -> int:
    """Layer by layer, a KV message goes out every this many layers (and after the last): one
    message per layer costs the forward ~10-15 % on a 2-core CPU (each send wakes threads that
    contend with it), five messages ~3 % (bench.stream). after_prefill: all layers in one."""
    if settings.kv_streaming == "after_prefill":
        return layers
    return settings.kv_stream_layers or -(-layers // 5)


def message_groups(routes: list[Route], every: int, layers: range) -> dict[int, range]:
    """By layer of `layers` (the ones this process computes), the layers of the KV message it goes
    in: runs of `every`, none across two routes."""
    groups = {}
    for _, start, end in routes:
        lo, hi = max(start, layers.start), min(end, layers.stop)
        for first in range(lo, hi, every):
            group = range(first, min(first + every, hi))
            groups.update(dict.fromkeys(group, group))
    return groups


async def open_links(peers: Peers, routes: list[Route], layers: range, target: str) -> list[tuple[range, PeerLink]]:
    """A link to each route that takes some of `layers`. Raises UpstreamError."""
    links = []
    for address, start, end in routes:
        if max(start, layers.start) < min(end, layers.stop):
            try:
                links.append((range(start, end), await peers.get(address)))
            except TransportError as exc:
                raise UpstreamError(f"cannot reach token service {target} at {address} (layers [{start}, "
                                    f"{end})): {exc}") from exc
    return links


@dataclass(frozen=True)
class Sink:
    """Where one piece of a forward's K/V goes: its rows in the flat batch, its tokens, its messages
    (and `keep`, where the prefix cache takes them too: (first layer, end layer, buffer) each)."""
    rows: slice
    tokens: range
    groups: dict[int, range]
    outbox: asyncio.Queue
    keep: list | None = None


def layer_sink(loop: asyncio.AbstractEventLoop, sinks: list[Sink]):
    """A forward's on_layer callback: each layer's K/V of each piece copied once, straight into the
    piece's message being filled (host memory, the wire's (layers, 2, tokens, kv_heads, D) layout);
    a message full goes to the piece's outbox, (layers [a, b), tokens [c, d), buffer)."""
    slabs: list[torch.Tensor | None] = [None] * len(sinks)

    def on_layer(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:  # runs in the engine thread
        for i, sink in enumerate(sinks):
            group = sink.groups[layer]
            if layer == group.start:
                slabs[i] = torch.empty((len(group), 2, len(sink.tokens), k.shape[1], k.shape[2]), dtype=k.dtype)
            gather_prefill(k, v, sink.rows, out=slabs[i][layer - group.start: layer - group.start + 1])
            if layer == group.stop - 1:
                message = (group.start, group.stop, sink.tokens.start, sink.tokens.stop, slabs[i])
                loop.call_soon_threadsafe(sink.outbox.put_nowait, message)
                if sink.keep is not None:
                    sink.keep.append((group.start, group.stop, slabs[i]))

    return on_layer


async def send_messages(outbox: asyncio.Queue, links: list[tuple[range, PeerLink]], request_id: str, epoch: int,
                        ended: Callable[[], bool], acks: list[asyncio.Future]) -> None:
    """Send the outbox's messages, each on the link of its layers, until a None; their
    acknowledgements go to `acks`. Once `ended()`, the rest are drained unsent."""
    while (item := await outbox.get()) is not None:
        if ended():
            continue
        layer_start, layer_end, token_start, token_end, buf = item
        link = next(link for layers, link in links if layer_start in layers)
        acks.append(await link.send(buf, request_id=request_id, epoch=epoch, layer_start=layer_start,
                                    layer_end=layer_end, token_start=token_start, token_end=token_end))


@dataclass
class PrefillJob:
    req: PrefillRequest
    routes: list[Route]
    links: list[tuple[range, PeerLink]]  # to the routes that take this process's layers
    messages: dict[int, range]           # by layer of this process: the layers of the message holding it
    result: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    outbox: asyncio.Queue = field(default_factory=asyncio.Queue)  # (layers [a, b), tokens [c, d), buffer)
    first: TokenEvent | None = None
    prefill_ms: float = 0.0         # forward time of its batches or chunks
    computed_at: float = 0.0        # perf_counter when the last layer was computed
    done: int = 0                   # prompt tokens computed (a chunked prompt's progress)
    pool: torch.Tensor | None = None  # a chunked prompt's KV so far, for its later chunks to attend to
    prompt_logprobs: list[PromptLogprob] = field(default_factory=list)  # req.prompt_logprobs: tokens 1.. so far
    matcher: grammar.Matcher | None = None  # its grammar's, at the start (grammar.start), for the first pick
    inherited: bool = False         # it superseded a call of its request with chunks on a pipeline's stages
    looked_up: bool = False         # the prefix cache was asked (as it reached the head of the queue)
    keys: list[bytes] = field(default_factory=list)  # the prefix cache's keys of its whole blocks
    generation: int = -1            # the prefix cache's when looked up: the blocks it computes are kept if unchanged
    prefix: list[torch.Tensor] = field(default_factory=list)  # cached KV of its first blocks, not loaded yet
    cached: int = 0                 # prompt tokens whose KV the prefix cache had
    kept: list | None = None        # a whole prompt's KV messages, for the prefix cache (Sink.keep)

    @property
    def num_tokens(self) -> int:
        return len(self.req.prompt_ids)

    def fail(self, exc: Exception) -> None:
        """End the job with an error; its sender stops at the next frame boundary (a frame cut
        in the middle would break the link every other request to that token service shares)."""
        if not self.result.done():
            self.result.set_exception(exc)
        self.outbox.put_nowait(None)


@dataclass(frozen=True)
class Piece:
    """Prompt tokens [start, end) of a job, computed in one forward: the whole prompt, a chunk, or
    the rest after a prefix-cache hit."""
    job: PrefillJob
    start: int
    end: int


class PrefillEngine:
    def __init__(self, runner: ModelRunner, settings: PromptSettings, peers: Peers):
        self.runner, self.settings, self.peers = runner, settings, peers
        self.queue: collections.deque[PrefillJob] = collections.deque()
        self.queued = asyncio.Event()
        self.jobs: dict[str, PrefillJob] = {}
        self.arrivals: dict[str, int] = {}  # request id: the ticket of its latest call (`submit`)
        self.tickets = itertools.count()
        self.pipeline = None  # --stages: the stages after this one (prompt_service/pipeline.py)
        self.cache = (PrefixCache(settings.prefix_cache_mib << 20, runner.block_size)
                      if settings.prefix_cache_mib and runner is not None else None)

    @property
    def layers_per_message(self) -> int:
        return layers_per_message(self.settings, self.runner.kv.layers)

    async def submit(self, req: PrefillRequest) -> PrefillResult:
        try:
            self.runner.check_tokens(req.prompt_ids, "prompt_ids")  # a bad id would fail the whole batch
            self.runner.check_tokens(named_tokens(req.sampling), "sampling (logit_bias, stop_token_ids)")
        except ValueError as exc:
            raise BadRequest(str(exc), code="invalid_token_id") from None
        if req.prompt_logprobs is not None and self.pipeline is not None:  # the gateway sends them elsewhere
            raise BadRequest("prompt logprobs (echo with logprobs) are not computed by a prompt pipeline "
                             "(--stages)", param="prompt_logprobs")
        # A gateway that gave up on this service (it stalled past the health check) may ask again
        # while the first call still runs: the call that arrived last wins, whichever is further along
        ticket = self.arrivals[req.request_id] = next(self.tickets)
        try:
            return await self._submit(req, ticket)
        finally:
            if self.arrivals.get(req.request_id) == ticket:
                del self.arrivals[req.request_id]

    async def _submit(self, req: PrefillRequest, ticket: int) -> PrefillResult:
        matcher = None
        if req.sampling.grammar:  # in a thread: a large grammar compiles for up to a second, the first reads the tokenizer
            matcher = await asyncio.to_thread(grammar.request_matcher, req.sampling.grammar, self.runner.vocab_size)
        routes, mine = routes_of(req, self.runner.kv.layers), self.runner.layers  # a pipeline's head: its layers
        links = await open_links(self.peers, routes, mine, req.target_service_id)
        if self.arrivals.get(req.request_id) != ticket:
            raise UpstreamError(f"request {req.request_id}: superseded by a newer prefill of it")
        stale = self.jobs.get(req.request_id)
        if stale is not None:  # an earlier call, further along: it fails, its caller has gone
            log.warning("a newer prefill of the same request arrived: the earlier one fails")
            stale.fail(UpstreamError(f"request {req.request_id}: superseded by a newer prefill of it"))
        job = self.jobs[req.request_id] = PrefillJob(req, routes, links,
                                                     message_groups(routes, self.layers_per_message, mine),
                                                     matcher=matcher, inherited=stale is not None and stale.done > 0)
        IN_FLIGHT.inc()
        sender = asyncio.create_task(self._send_layers(job))
        self.queue.append(job)
        self.queued.set()
        QUEUED.set(len(self.queue))
        try:
            return await job.result
        finally:
            mine = self.jobs.get(req.request_id) is job  # not a newer call's since
            if mine and self.pipeline is not None and job.done < job.num_tokens and (job.done or job.inherited):  # chunks' KV on the stages
                self.pipeline.drop(req.request_id)
            job.fail(UpstreamError(f"request {req.request_id} ended"))  # no-op unless cancelled
            if mine:
                del self.jobs[req.request_id]
            IN_FLIGHT.dec()
            await asyncio.shield(sender)

    def _look_up(self, job: PrefillJob) -> None:
        """The prefix cache's longest hit for the job's prompt: its first tokens are then done."""
        job.looked_up = True
        if self.caching:
            job.generation = self.cache.generation
        if self.caching and job.req.prompt_logprobs is None:  # echo with logprobs: every prompt token is scored
            job.keys, job.prefix = self.cache.lookup(job.req.prompt_ids)
            job.done = job.cached = len(job.prefix) * self.runner.block_size

    @property
    def prefix_cache(self) -> PrefixCache | None:
        return self.cache if self.caching else None

    @property
    def caching(self) -> bool:
        """Prefix caching is on (not for a prompt pipeline's stages: each would cache its own layers)."""
        return self.cache is not None and self.pipeline is None

    def abort(self, request_id: str) -> bool:
        job = self.jobs.get(request_id)
        if job:
            job.fail(UpstreamError(f"request {request_id} aborted"))
        return job is not None

    async def run(self) -> None:
        while True:
            await self.queued.wait()
            work = self._next_work()
            if not self.queue:
                self.queued.clear()
            QUEUED.set(len(self.queue))
            if work:
                await self._execute(work)

    def _next_work(self) -> list[Piece]:
        """Up to --max-batch-tokens (TURN_TOKENS when taking turns) of prompt: whole prompts and
        the rests of prefix-cache hits back to back (while their pool fits HIT_BATCH_BYTES), or the
        next chunk of a prompt longer than that (alone, so its chunks stream out one after another)."""
        budget, work = self.settings.max_batch_tokens, []
        if self.settings.cpu_turns:  # a turn on the host's cores: the decode steps wait while it lasts
            budget = min(budget, TURN_TOKENS)
        cached, blocks, hits = set(), 0, False  # the pool a forward with hits would need (_forward_pool)
        most = HIT_BATCH_BYTES // (self.runner.pool_bytes_per_token * self.runner.block_size) if self.runner else 0
        while self.queue and budget > 0:
            job = self.queue[0]
            if job.result.done():  # aborted while queued
                self.queue.popleft()
                continue
            if not job.looked_up:  # at the head, not on arrival: a burst's later prompts find the first's blocks
                self._look_up(job)
            left = job.num_tokens - job.done
            keys, own = self._pool_blocks(job, cached)
            # a chunk runs alone (the pool it keeps is the forward's); hits while their pool fits
            if work and (left > budget or job.pool is not None
                         or ((hits or job.done) and blocks + len(keys) + own > most)):
                break
            end = job.done + min(left, budget)
            work.append(Piece(job, job.done, end))
            budget -= end - job.done
            cached.update(keys)
            blocks, hits = blocks + len(keys) + own, hits or job.done > 0
            most = max(most, blocks)  # a first piece past the bound runs alone
            if end < job.num_tokens:
                break  # a chunk: the job stays at the head of the queue for its next one
            self.queue.popleft()
            if job.pool is not None:
                break  # the last chunk of a prompt: alone too
        return work

    def _pool_blocks(self, job: PrefillJob, cached: set[tuple[int, bytes]]) -> tuple[list[tuple[int, bytes]], int]:
        """What a job adds to a forward's pool (_forward_pool) beside the blocks of `cached`
        (generation, key)s: (those of its cached blocks not among them, how many blocks of its own)."""
        if self.runner is None:
            return [], 0
        own = -(-job.num_tokens // self.runner.block_size) - len(job.prefix)
        keys = [(job.generation, key) for key in job.keys[:len(job.prefix)]]
        return [key for key in keys if key not in cached], own

    def _forward_pool(self, work: list[Piece]) -> tuple[torch.Tensor, list[list[int]], list[tuple[int, torch.Tensor]]]:
        """One pool for a forward with hits: (the pool, each piece's block table in it, the cached
        blocks to load into it first as (block, KV)). A block cached once is in it once, however
        many of the pieces' prompts start with it: their rests attend to it, none writes it. (By
        generation and key: a hit looked up before a reset of the cache shares nothing with one after.)"""
        shared, loads, tables, n = {}, [], [], 0
        for piece in work:
            job, table = piece.job, []
            for key, kv in zip(((job.generation, k) for k in job.keys), job.prefix):
                if key not in shared:
                    shared[key] = n
                    loads.append((n, kv))
                    n += 1
                table.append(shared[key])
            own = -(-job.num_tokens // self.runner.block_size) - len(table)
            tables.append(table + list(range(n, n + own)))
            n += own
        return self.runner.new_pool(n), tables, loads

    async def _execute(self, work: list[Piece]) -> None:
        """One forward over `work`; each piece's K/V goes out as messages of a few layers each,
        as soon as those layers are computed. Whole prompts alone need no pool; a chunked prompt
        keeps its KV so far in a pool of its own, which its later chunks attend to; a forward with
        the rests of hits has one pool for all its pieces (_forward_pool)."""
        loop = asyncio.get_running_loop()
        sinks, at = [], 0  # each piece's rows in the forward's flat (N, kv_heads, D) K/V
        for piece in work:
            n, job = piece.end - piece.start, piece.job
            if self.caching and n == job.num_tokens >= self.runner.block_size:  # a whole prompt: kept for the cache
                job.kept = []
            sinks.append(Sink(slice(at, at + n), range(piece.start, piece.end), job.messages, job.outbox, job.kept))
            at += n
        on_layer = layer_sink(loop, sinks)

        start = time.perf_counter()
        try:  # (a pool that cannot be allocated fails this batch's requests, as a failed forward does)
            job, pool, tables, loads = work[0].job, None, [None] * len(work), []
            if work[0].end < job.num_tokens or job.pool is not None:  # a chunk: blocks 0, 1, ... of the job's own pool
                tables = [list(range(-(-job.num_tokens // self.runner.block_size)))]
                if job.pool is None:
                    job.pool = self.runner.new_pool(len(tables[0]))
                pool, loads = job.pool, list(enumerate(job.prefix))
            elif any(p.start for p in work):  # hits (and whole prompts): one pool for the forward
                pool, tables, loads = self._forward_pool(work)
            # the prefix cache's work rides in the forward's call to the engine thread (taking turns on the
            # cores, a call of its own would wait for a turn): hits' blocks loaded first and their KV sent,
            # the blocks the cache lacks of the prompts this forward ends copied after
            sends = [(p.job, p.job.prefix) for p in work if p.job.prefix]
            for piece in work:
                piece.job.prefix = []
            wanted = [(p.job, table, self._wanted(p.job)) for p, table in zip(work, tables)
                      if p.end == p.job.num_tokens] if self.caching else []
            segments = [Segment(p.job.req.prompt_ids[p.start: p.end], p.start, table) for p, table in zip(work, tables)]
            scored = {i: (p.job.req.prompt_ids[p.start + 1: p.end + 1], p.job.req.prompt_logprobs)
                      for i, p in enumerate(work) if p.job.req.prompt_logprobs is not None}
            if scored:
                (logits, scores), copies = await self.runner.run(
                    self._compute, loop, pool, loads, sends, wanted, self.runner.forward_scored, segments, pool,
                    on_layer, scored)
                for i, part in scores.items():
                    work[i].job.prompt_logprobs.extend(part)
            else:
                logits, copies = await self.runner.run(self._compute, loop, pool, loads, sends, wanted,
                                                       self.runner.forward, segments, pool, on_layer)
            if self.pipeline is not None:  # the head's output through the later stages, which stream their layers' KV
                logits = await self.pipeline.prefill([[p.job.req.request_id, p.job.req.epoch, p.start, p.end,
                                                       p.job.num_tokens, p.job.routes] for p in work], logits)
        except Exception as exc:  # a bad batch fails its requests, never the service
            log.exception("prefill forward failed")
            for piece in work:
                piece.job.fail(UpstreamError(f"prefill failed: {type(exc).__name__}: {exc}"))
            return
        done = time.perf_counter()
        PREFILL_SECONDS.observe(done - start)
        ended = [(p.job, row) for p, row in zip(work, logits) if p.end == p.job.num_tokens]
        for piece in work:
            piece.job.done = piece.end
            piece.job.prefill_ms += (done - start) * 1000
        if not ended:
            return
        try:
            events = sample_first(torch.stack([row for _, row in ended]), [j.req for j, _ in ended],
                                  [j.matcher for j, _ in ended])
        except Exception as exc:  # as a failed forward: its requests fail, the service stays
            log.exception("sampling the first tokens failed")
            for job, _ in ended:
                job.fail(UpstreamError(f"sampling failed: {type(exc).__name__}: {exc}"))
            return
        for (job, _), event in zip(ended, events):
            job.first, job.computed_at, job.pool, job.kept = first_event(job.req.sampling, event), done, None, None
            scores = {"prompt_logprobs": job.prompt_logprobs} if job.req.prompt_logprobs is not None else {}
            job.first = job.first.model_copy(update={"cached_tokens": job.cached, **scores})
            loop.call_soon(job.outbox.put_nowait, None)  # after every message: the sender may answer
        for job, blocks in copies:
            self.cache.insert(job.keys, blocks, job.generation)

    def _wanted(self, job: PrefillJob) -> list[int]:
        """The blocks of a prompt this forward ends that the prefix cache lacks and will take."""
        if job.generation != self.cache.generation:  # looked up before a reset: insert would drop them
            return []
        job.keys = job.keys or block_keys(job.req.prompt_ids, self.runner.block_size)
        return self.cache.wanted(job.keys, self.runner.pool_bytes_per_token * self.runner.block_size)

    def _compute(self, loop, pool: torch.Tensor | None, loads: list[tuple[int, torch.Tensor]],
                 sends: list[tuple[PrefillJob, list[torch.Tensor]]],
                 wanted: list[tuple[PrefillJob, list[int] | None, list[int]]], forward, *args):
        """In the engine thread: cached blocks into the forward's pool (`loads`: (block, KV)) and
        each hit's KV messages out (`sends`: (job, its cached blocks); the token service gets the
        prefix first; hits of one prefix share its messages' buffers), the forward, then copies of
        the blocks `wanted` of the prompts it ends ((job, its block table in `pool` or None, which
        of its blocks): from the pool, or from a whole prompt's messages): (the forward's result,
        [(job, {block: KV})])."""
        size, first = self.runner.block_size, self.runner.layers.start
        for block, kv in loads:
            pool[:, :, block * size:(block + 1) * size].copy_(kv)
        made: dict[tuple, torch.Tensor] = {}
        for job, prefix in sends:
            tokens = len(prefix) * size
            for group in sorted(set(job.messages.values()), key=lambda g: g.start):
                layers = slice(group.start - first, group.stop - first)
                key = (job.generation, job.keys[len(prefix) - 1], group)
                if key not in made:
                    made[key] = torch.cat([b[layers] for b in prefix], dim=2)
                loop.call_soon_threadsafe(job.outbox.put_nowait, (group.start, group.stop, 0, tokens, made[key]))
        out = forward(*args)
        copies = []
        for ended, table, blocks in wanted:
            if not blocks or (table is None and not ended.kept):
                continue
            if table is not None:
                copies.append((ended, {i: _host_copy(pool[:, :, table[i] * size:(table[i] + 1) * size])
                                       for i in blocks}))
            else:
                parts = [buf for _, _, buf in sorted(ended.kept, key=lambda m: m[0])]  # the layers in order
                copies.append((ended, {i: torch.cat([p[:, :, i * size:(i + 1) * size] for p in parts])
                                       for i in blocks}))
        return out, copies

    async def _send_layers(self, job: PrefillJob) -> None:
        request_id_var.set(job.req.request_id)
        acks: list[asyncio.Future] = []
        try:
            await send_messages(job.outbox, job.links, job.req.request_id, job.req.epoch, job.result.done, acks)
            if job.result.done():
                return
            await asyncio.wait_for(asyncio.gather(*acks), self.settings.ack_timeout_s)
            tail = time.perf_counter() - job.computed_at
            STREAM_TAIL_SECONDS.observe(tail)
            if not job.result.done():
                job.result.set_result(PrefillResult(request_id=job.req.request_id, first=job.first,
                                                    prefill_ms=job.prefill_ms, stream_tail_ms=tail * 1000))
        except Exception as exc:  # noqa: BLE001 - whatever broke, the request fails, the service stays
            if not isinstance(exc, (TransportError, KVRejected, asyncio.TimeoutError)):
                log.exception("KV sender failed")
            job.fail(UpstreamError(
                f"streaming KV to token service {job.req.target_service_id} failed: {type(exc).__name__}: {exc}"))
        finally:
            _forget(acks)


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy in host memory (one copy, from any device, of any slice)."""
    return torch.empty(t.shape, dtype=t.dtype).copy_(t)


def _forget(acks: list[asyncio.Future]) -> None:
    """Acknowledgements nobody waits for any more (the job ended early): cancelled, or their error
    marked as seen, so that asyncio does not log each one as "never retrieved"."""
    for ack in acks:
        if not ack.done():
            ack.cancel()
        elif not ack.cancelled():
            ack.exception()
