"""Prefix caching: the KV of prompt blocks an engine has prefilled, kept in host memory, so that a
prompt starting with the same tokens (a shared system prompt, the earlier turns of a chat, a
request resumed by re-prefill) computes only the rest. Prompt services use it
(prompt_service/engine.py), and so do colocated token services (token_service/prefill.py).

A block is --block-size prompt tokens; it is found by a hash of its tokens and of every token
before it (a chain, as vLLM's), so a block's KV is only ever reused behind the same prefix. Only
whole blocks are kept, and a prompt always computes at least its last MIN_COMPUTED tokens (the
first output token is drawn from the last one's logits; see MIN_COMPUTED for why two). The blocks
are kept least recently used first out, up to --prefix-cache-mib; a chain's first blocks are
touched last, so its tail goes before its head.
One prompt takes at most half the cache (its first blocks), so that one long prompt does not flush
the prefixes others share. The cache is read and changed on the service's event loop only; the
copies into and out of it run in the engine thread, in the forward's own call, so that taking
turns on the cores (--cpu-placement turns) they cost no turn of their own.

A hit's KV is the bits the first prefill computed; the rest of the prompt is computed as a chunk
that attends to it, as chunked prefill's later chunks do.

`clear` forgets every block (the gateway's POST /reset_prefix_cache and /flush_cache, vLLM's and
SGLang's, which benchmark clients call between a warm-up and the measured run): no prompt after it
reuses KV computed before it. A prefill in flight still uses the hit it was given, but the blocks it
computes are not kept (`generation`): they attend to KV from before the reset. Unlike vLLM's and
SGLang's, a reset never waits for, nor refuses because of, requests in flight.
"""

from __future__ import annotations

import collections
import logging

import torch
from prometheus_client import Counter, Gauge

from common.protocol import block_keys

# A hit leaves at least this many prompt tokens to compute: the KV of tokens computed after a hit
# is then the same to the bit as a prefill without one computes it, on CPU (tests/unit: chunks of
# 5-30 tokens after hits, against whole prompts and other chunkings), so a request resumed by
# re-prefill, with or without a hit of its own, gets the KV its first prefill had. A single token
# alone rounds otherwise (measured: 8e-7 off in float32; the matrix products of one row take
# another path). On CUDA other splits may round otherwise too (untested: no GPU here).
MIN_COMPUTED = 2
QUERY_TOKENS = Counter("dejavu_prompt_prefix_cache_queries_total", "prompt tokens looked up in the prefix cache")
HIT_TOKENS = Counter("dejavu_prompt_prefix_cache_hits_total", "prompt tokens whose KV came from the prefix cache")
CACHED_BYTES = Gauge("dejavu_prompt_prefix_cache_bytes", "KV bytes held by the prefix cache")
RESETS = Counter("dejavu_prompt_prefix_cache_resets_total", "times the prefix cache was cleared on request")
log = logging.getLogger(__name__)


def reset(cache: PrefixCache | None) -> tuple[int, int]:
    """A service's POST /prefix_cache/reset: (blocks, bytes) its cache forgot; (0, 0) without one."""
    if cache is None:
        return 0, 0
    blocks, size = cache.clear()
    RESETS.inc()
    log.info("prefix cache reset: %d blocks (%.1f MiB) forgotten", blocks, size / 2**20)
    return blocks, size


class PrefixCache:
    def __init__(self, capacity_bytes: int, block_size: int):
        self.capacity, self.block_size = capacity_bytes, block_size
        self.blocks: collections.OrderedDict[bytes, torch.Tensor] = collections.OrderedDict()  # LRU first
        self.bytes = 0
        self.generation = 0  # clears so far: a prefill started in an older generation keeps nothing

    def clear(self) -> tuple[int, int]:
        """Forget every block; (blocks, bytes) forgotten."""
        forgotten = len(self.blocks), self.bytes
        self.blocks.clear()
        self.bytes = 0
        self.generation += 1
        CACHED_BYTES.set(0)
        return forgotten

    def lookup(self, ids: list[int]) -> tuple[list[bytes], list[torch.Tensor]]:
        """(the keys of the prompt's whole blocks, the cached KV of its longest cached prefix of
        blocks that leaves at least MIN_COMPUTED tokens to compute), each block (layers, 2, block_size,
        kv_heads, head_dim). The blocks returned stay valid whatever is evicted meanwhile."""
        keys = block_keys(ids, self.block_size)
        hit = self.find(keys, len(ids))
        self.used(keys, len(ids), len(hit))
        return keys, hit

    def find(self, keys: list[bytes], num_tokens: int) -> list[torch.Tensor]:
        """lookup's hit for a prompt of `num_tokens` whose block keys are `keys`, changing nothing."""
        hit = []
        for key in keys[:max(num_tokens - MIN_COMPUTED, 0) // self.block_size]:
            block = self.blocks.get(key)
            if block is None:
                break
            hit.append(block)
        return hit

    def used(self, keys: list[bytes], num_tokens: int, hit: int) -> None:
        """A prompt of `num_tokens` took the first `hit` blocks of `keys` that find gave it."""
        self._touch(keys[:hit])
        QUERY_TOKENS.inc(num_tokens)
        HIT_TOKENS.inc(hit * self.block_size)

    def wanted(self, keys: list[bytes], block_bytes: int) -> list[int]:
        """The blocks of a prompt of these keys that the cache lacks and will take, each
        `block_bytes`: at most half the cache from one prompt, its first ones (one long prompt must
        not flush the prefixes others share, nor copy blocks only to have them evicted at once)."""
        most = self.capacity // 2 // block_bytes
        return [i for i in self.missing(keys) if i < most]

    def missing(self, keys: list[bytes]) -> list[int]:
        """Which of the blocks of `keys` are not kept."""
        return [i for i, key in enumerate(keys) if key not in self.blocks]

    def insert(self, keys: list[bytes], blocks: dict[int, torch.Tensor], generation: int) -> None:
        """Keep blocks[i] (block i's KV, a copy the cache owns) as key i where it is not kept yet, if
        the prefill that computed them started in this `generation` (none was cleared since)."""
        if generation != self.generation:
            return
        for i, key in enumerate(keys):
            kv = blocks.get(i)
            if kv is not None and key not in self.blocks and kv.nbytes <= self.capacity:
                self.blocks[key] = kv
                self.bytes += kv.nbytes
        self._touch(keys)
        while self.bytes > self.capacity:
            _, kv = self.blocks.popitem(last=False)
            self.bytes -= kv.nbytes
        CACHED_BYTES.set(self.bytes)

    def _touch(self, keys: list[bytes]) -> None:
        for key in reversed(keys):  # the head of a chain last: the most recently used
            if key in self.blocks:
                self.blocks.move_to_end(key)
