"""Colocated mode (--colocated): prompts prefilled on the token service itself, in chunks.

A prompt's life here:
1. `TokenEngine.prefill` queues a PrefillJob for a reserved sequence (its blocks already hold room
   for the prompt); the sequence is `filling`, so an abort leaves its blocks to the loop.
2. Each engine step takes up to --max-batch-tokens prompt tokens from the queue, in order: the next
   chunk of the first prompt, then of the next, ... as long as the whole chunk fits. A prompt's
   chunks are tokens [0, budget), [budget, 2 * budget), ... whatever else is queued: a re-prefill
   after a failover computes its KV in the same pieces as the first prefill, so to the bit (an
   attention over other pieces rounds differently). Each chunk is one segment of the step's
   forward, next to the running decodes, so a long prompt never stalls running streams for more
   than one chunk's worth of compute (chunked prefill).
3. A chunk's K/V goes straight into the sequence's blocks; a later chunk attends to the earlier
   ones there. When the last chunk is computed, the first token is sampled from its logits and
   the job resolves. With prompt logprobs (echo with logprobs) each chunk's prompt tokens are
   scored in its step; they come back on the first token's event.
4. A job whose sequence was aborted is dropped at the next step boundary (never mid-forward): its
   blocks are released and its caller gets NotFound.

With the prefix cache (--prefix-cache-mib, engine/prefix_cache.py), a prompt that has not started
is looked up at every step until it does, so a prompt queued behind another with the same prefix
finds the blocks that one's chunks computed. Its first chunk then starts after the hit: the hit's
blocks are copied into its own blocks in the engine thread just before the forward (no block is
shared with another sequence, so replication, aborts and frees are as for any prefill), and the
whole blocks each chunk completes that the cache lacks are copied out just after it, into the
cache as the step ends. The chunks then start at the hit, not on the grid of point 2, and the KV
is still the same to the bit on CPU (engine/prefix_cache.py, MIN_COMPUTED), so a re-prefill with
or without a hit of its own still computes the KV of the first prefill. A prompt scored (echo
with logprobs) computes every token, so looks nothing up; its blocks are kept all the same.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from common.errors import NotFound, UpstreamError
from common.protocol import PrefillRequest, PrefillResult, PromptLogprob, block_keys
from common.grammar import Matcher
from common.sampling import first_event, sample_first
from engine.attention import Segment
from engine.prefix_cache import PrefixCache
from token_service.sequence import Sequence

log = logging.getLogger(__name__)


@dataclass
class PrefillJob:
    seq: Sequence
    req: PrefillRequest
    result: asyncio.Future
    done: int = 0                # prompt tokens whose KV is computed
    started: float = 0.0         # perf_counter at its first chunk
    prompt_logprobs: list[PromptLogprob] = field(default_factory=list)  # req.prompt_logprobs: tokens 1.. so far
    matcher: Matcher | None = None  # its grammar's, at the start (grammar.start), for the first pick
    keys: list[bytes] | None = None  # the prefix cache's keys of its prompt's whole blocks, once hashed
    generation: int = -1         # the prefix cache's as it started: the blocks it computes are kept if unchanged
    cached: int = 0              # prompt tokens whose KV the prefix cache had

    @property
    def num_tokens(self) -> int:
        """The prompt's: on a resume fewer than the row holds (the tokens out are replayed after)."""
        return len(self.req.prompt_ids)


@dataclass
class Chunk:
    job: PrefillJob
    segment: Segment             # prompt tokens [start, end) over the sequence's blocks
    prefix: list[torch.Tensor] = field(default_factory=list)  # cached KV of blocks 0, 1, ...: loaded before it
    keep: list[int] = field(default_factory=list)  # the blocks it completes that the prefix cache takes

    @property
    def last(self) -> bool:
        return self.segment.end == self.job.num_tokens

    @property
    def targets(self) -> list[int]:
        """With prompt logprobs: the prompt token after each of the chunk's (none past the prompt)."""
        if self.job.req.prompt_logprobs is None:
            return []
        return self.job.req.prompt_ids[self.segment.start + 1: self.segment.end + 1]


class PrefillQueue:
    def __init__(self, budget: int, release: Callable[[Sequence], None], cache: PrefixCache | None = None,
                 block_bytes: int = 0):
        self.budget, self.release = budget, release  # prompt tokens per step; frees an aborted job's blocks
        self.cache, self.block_bytes = cache, block_bytes  # the prefix cache, if on; the KV bytes of one block
        self.jobs: collections.deque[PrefillJob] = collections.deque()

    def __bool__(self) -> bool:
        return bool(self.jobs)

    def add(self, job: PrefillJob) -> None:
        job.seq.filling = True
        self.jobs.append(job)

    def next_chunks(self) -> list[Chunk]:
        """This step's chunks: up to `budget` prompt tokens, first come first served."""
        self.reap()
        chunks, left = [], self.budget
        for job in self.jobs:
            prefix = [] if job.started else self._find(job)
            start = len(prefix) * self.cache.block_size if prefix else job.done
            n = min(job.num_tokens - start, self.budget)
            if n > left:
                break
            if not job.started and job.keys is not None and job.req.prompt_logprobs is None:
                self.cache.used(job.keys, job.num_tokens, len(prefix))
                job.cached = start
            job.done, job.started = start, job.started or time.perf_counter()
            tokens = job.req.prompt_ids[start: start + n]
            chunks.append(Chunk(job, Segment(tokens, start, job.seq.blocks), prefix, self._keep(job, start, start + n)))
            left -= n
        return chunks

    def _find(self, job: PrefillJob) -> list[torch.Tensor]:
        """The prefix cache's hit for a job that has not started (none with prompt logprobs, whose
        every token is scored: its blocks are still kept, as they are computed)."""
        if self.cache is None:
            return []
        if job.keys is None:
            job.keys = block_keys(job.req.prompt_ids, self.cache.block_size)
        job.generation = self.cache.generation
        return self.cache.find(job.keys, job.num_tokens) if job.req.prompt_logprobs is None else []

    def _keep(self, job: PrefillJob, start: int, end: int) -> list[int]:
        """The whole blocks that prompt tokens [start, end) complete and the prefix cache will take."""
        if job.keys is None:
            return []
        size = self.cache.block_size
        return [i for i in self.cache.wanted(job.keys, self.block_bytes) if start < (i + 1) * size <= end]

    def finish(self, chunks: list[Chunk], logits: torch.Tensor, scores: list[list[PromptLogprob]],
               kept: list[dict[int, torch.Tensor]] = ()) -> None:
        """The step computed `chunks`; logits: (len(chunks), vocab), each chunk's last token;
        scores: each chunk's prompt logprobs (Chunk.targets'); kept: copies of each chunk's
        Chunk.keep blocks (kept_blocks'), for the prefix cache."""
        for chunk, blocks in zip(chunks, kept):
            if blocks:
                self.cache.insert(chunk.job.keys, blocks, chunk.job.generation)
        ended = []
        for chunk, row, part in zip(chunks, logits, scores):
            job = chunk.job
            job.done = chunk.segment.end
            job.prompt_logprobs.extend(part)
            if chunk.last and not job.seq.done:
                ended.append((job, row))
        if ended:
            try:
                events = sample_first(torch.stack([r for _, r in ended]), [j.req for j, _ in ended],
                                      [j.matcher for j, _ in ended])
            except Exception as exc:  # as a failed forward: these prompts fail, the step and the service go on
                log.exception("sampling the first tokens failed")
                self.fail([Chunk(job, None) for job, _ in ended], exc)
            else:
                for (job, _), event in zip(ended, events):
                    self._resolve(job, event)
        self.reap()

    def fail(self, chunks: list[Chunk], exc: Exception) -> None:
        """The step's forward failed: its prompts fail (the gateway retries or reports), the service stays."""
        for chunk in chunks:
            job = chunk.job
            if not job.result.done():
                job.result.set_exception(UpstreamError(f"prefill failed: {type(exc).__name__}: {exc}"))
            self._drop(job)

    def _resolve(self, job: PrefillJob, event) -> None:
        job.seq.mark_all_received(job.num_tokens)
        job.seq.filling = False
        self.jobs.remove(job)
        ms = (time.perf_counter() - job.started) * 1e3
        first = first_event(job.req.sampling, event).model_copy(update={"cached_tokens": job.cached})
        if job.req.prompt_logprobs is not None:
            first = first.model_copy(update={"prompt_logprobs": job.prompt_logprobs})
        job.result.set_result(PrefillResult(request_id=job.req.request_id, prefill_ms=ms, first=first,
                                            stream_tail_ms=0.0))

    def reap(self) -> None:
        """Drop the jobs of aborted sequences: their blocks go back, their callers hear NotFound."""
        for job in [j for j in self.jobs if j.seq.done]:
            self._drop(job)

    def _drop(self, job: PrefillJob) -> None:
        if job in self.jobs:
            self.jobs.remove(job)
        job.seq.filling = False
        if job.seq.done:
            self.release(job.seq)
        if not job.result.done():
            job.result.set_exception(NotFound(f"request {job.req.request_id} was aborted during its prefill"))


def load_prefixes(pool: torch.Tensor, chunks: list[Chunk], block_size: int) -> None:
    """In the engine thread, before the forward: each chunk's cached prefix into its sequence's
    first blocks of `pool` (layers, 2, slots, kv_heads, head_dim)."""
    for chunk in chunks:
        for block, kv in zip(chunk.job.seq.blocks, chunk.prefix):
            pool[:, :, block * block_size:(block + 1) * block_size].copy_(kv)


def kept_blocks(pool: torch.Tensor, chunks: list[Chunk], block_size: int) -> list[dict[int, torch.Tensor]]:
    """In the engine thread, after the forward: a host copy of each chunk's Chunk.keep blocks, by
    block index in its prompt."""
    out = []
    for chunk in chunks:
        blocks = chunk.job.seq.blocks
        out.append({i: torch.empty(pool[:, :, :block_size].shape, dtype=pool.dtype).copy_(
            pool[:, :, blocks[i] * block_size:(blocks[i] + 1) * block_size]) for i in chunk.keep})
    return out
