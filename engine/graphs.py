"""Decode steps replayed from CUDA graphs (on CUDA, unless `--enforce-eager`, vLLM's name for it).

A decode step of a small model on a GPU is bound by launching its kernels: SmolLM2-135M's 30
layers are ~500 small kernels a step, each launched from Python, and on an H200 one stream decoded
at 9.5-36 tokens/s through the token service (docs/BENCHMARKS.md §10), against hundreds that the
GPU could do. A CUDA graph launches a whole captured step at once.

A graph replays fixed shapes at fixed addresses, so steps are bucketed:
- the batch, padded up to 1, 2, 4, then multiples of 8 (as vLLM pads), up to the service's largest;
- the KV length, padded up to 64, 128, 256, 512, then multiples of 512, up to --max-model-len:
  the attention gathers each sequence's K/V into a (B, L, kv_heads, D) buffer and masks the
  padding (engine/attention.py), so L is a shape too.
A bucket's graph is captured the first time a step of that shape comes (one warm-up run, then the
capture: logged with its time), and replayed ever after; the buckets bound how many there are
(5 batch sizes x 7 lengths for 16 sequences of 2048 tokens). They share one memory pool: a step's
intermediates, not one set per graph.

A replay reads its inputs from static buffers, one int64 tensor filled by one copy from pinned
host memory: token ids, positions, each row's new slot and KV length, and the (B, L) slots it
reads. The padding rows (a batch of 5 runs as 8) write their K/V to a scratch slot: one slot past
the pool's blocks, which `ModelRunner.new_pool` adds where graphs run, so they never touch a block
a sequence owns; a row's keys past its length are read from the scratch slot too, and masked.
Where a step does not fit a bucket (longer than --max-model-len's bucket, more rows than the
largest), or the pool is not the one the runner made for graphs, the step runs eagerly.

A pipeline stage replays its layers the same way: a later stage than the first takes the previous
one's residual stream into a static (B, hidden) buffer (a padding row's zeros), and a stage before
the last returns its own instead of logits.

`capture=False` runs the same path without a graph (the static buffers, the buckets, the padding
and the scratch slot, each step recomputed eagerly): what the CPU tests check, since only a GPU can
capture (tests/unit/test_graphs.py; on a GPU the same tests capture).
"""

from __future__ import annotations

import bisect
import logging
import time
import weakref

import numpy as np
import torch
from prometheus_client import Counter

from engine.attention import AttentionBatch, Segment

log = logging.getLogger(__name__)
CAPTURES = Counter("dejavu_engine_cuda_graph_captures", "decode-step CUDA graphs captured (one per bucket at first use)")
CAPTURE_SECONDS = Counter("dejavu_engine_cuda_graph_capture_seconds", "time spent capturing them, warm-up runs included")
REPLAYS = Counter("dejavu_engine_cuda_graph_replays", "decode steps replayed from a CUDA graph")


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, then multiples of 8, the last one >= max_batch."""
    sizes = [1, 2, 4] + list(range(8, max_batch + 8, 8))
    return [b for b in sizes if b < max_batch] + [next(b for b in sizes if b >= max_batch)]


def kv_buckets(max_model_len: int, block_size: int) -> list[int]:
    """64, 128, 256, 512, then multiples of 512, the last one >= max_model_len; each a whole
    number of blocks."""
    sizes, n = [], 64
    while True:
        size = -(-n // block_size) * block_size
        sizes.append(size)
        if size >= max_model_len:
            return sorted(set(sizes))
        n = n * 2 if n < 512 else n + 512


class _Graph:
    """One bucket: its static inputs and output, and its graph (None: replayed eagerly)."""

    def __init__(self, B: int, L: int, device: torch.device, hidden: tuple[int, torch.dtype] | None = None):
        self.B, self.L = B, L
        n = 4 * B + B * L
        self.inputs = torch.zeros(n, dtype=torch.long, device=device)
        self.host = torch.zeros(n, dtype=torch.long, pin_memory=device.type == "cuda")
        self.staging = self.host.numpy()
        self.ids, self.positions, self.slot_mapping, self.lengths = self.inputs[:4 * B].view(4, B)
        self.slots = self.inputs[4 * B:].view(B, L)
        self.rows = torch.arange(B, device=device)
        self.keys = torch.arange(L, device=device)
        # a later pipeline stage's input: the previous stage's residual stream, (B, hidden size)
        self.hidden = torch.zeros(B, hidden[0], dtype=hidden[1], device=device) if hidden else None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None


class DecodeGraphs:
    def __init__(self, llama, device: torch.device, block_size: int, max_batch: int, max_model_len: int,
                 capture: bool = True):
        self.llama, self.device, self.block_size, self.capture = llama, device, block_size, capture
        self.batches = batch_buckets(max_batch)
        self.lengths = kv_buckets(max_model_len, block_size)
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.memory = None  # one memory pool for every graph's intermediates (attach)
        self._pool: weakref.ref | None = None
        self.scratch = -1  # the scratch slot of the attached pool
        self.captures, self.capture_s = 0, 0.0

    def attach(self, pool: torch.Tensor, scratch: int) -> None:
        """Steps over `pool` replay graphs from now on (their padding rows write slot `scratch`,
        which no block holds); graphs made for another pool go."""
        self.graphs.clear()
        if self.capture:  # a new memory pool: the old one goes with the last graph that used it, and
            # capturing into it after that fails an allocator assertion (seen on an H200, torch 2.11)
            self.memory = torch.cuda.graph_pool_handle()
        self._pool, self.scratch = weakref.ref(pool, lambda _: self.graphs.clear()), scratch

    @property
    def _hidden(self) -> tuple[int, torch.dtype] | None:
        """A later stage's input shape and dtype (None: the first stage's input is token ids)."""
        return None if self.llama.first else (self.llama.hidden_size, self.llama.norm[0].dtype)

    def fits(self, segments: list[Segment], pool: torch.Tensor | None) -> bool:
        """A decode-only step over the attached pool, within the largest bucket."""
        return (self._pool is not None and pool is not None and pool is self._pool()
                and len(segments) <= self.batches[-1] and max(s.end for s in segments) <= self.lengths[-1]
                and all(len(s.tokens) == 1 and s.start > 0 and s.blocks is not None for s in segments))

    def __call__(self, segments: list[Segment], pool: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 logits of each segment's token, (len(segments), vocab); a stage before the last
        returns its residual stream instead, (len(segments), hidden), and a later stage than the
        first takes the previous one's as `hidden` (as LlamaForward does)."""
        B = self.batches[bisect.bisect_left(self.batches, len(segments))]
        L = self.lengths[bisect.bisect_left(self.lengths, max(s.end for s in segments))]
        g = self.graphs.get((B, L))
        if g is None:
            g = self.graphs[(B, L)] = self._new(B, L, pool)
        self._fill(g, segments, hidden)
        if g.graph is None:
            return self._step(g, pool)[:len(segments)].clone()
        g.graph.replay()
        REPLAYS.inc()
        return g.out[:len(segments)].clone()  # the next replay, of any graph, may overwrite g.out

    def _fill(self, g: _Graph, segments: list[Segment], hidden: torch.Tensor | None = None) -> None:
        """The step's inputs into the bucket's static buffers: padding rows write and read the
        scratch slot, and a row's keys past its length are the scratch slot too (masked).
        A padding row's hidden state is zeros, every time: the layers add to it in place, and what
        it writes to the scratch slot must stay finite, since a real row's masked keys read there
        (a NaN key would make the masked score NaN, not -inf)."""
        B, L, bs, n = g.B, g.L, self.block_size, len(segments)
        staging = g.staging
        ids, positions, new_slot, lengths = staging[:4 * B].reshape(4, B)
        slots = staging[4 * B:].reshape(B, L)
        ids[n:], positions[n:], new_slot[n:], lengths[n:] = 0, 0, self.scratch, 1
        slots[n:] = self.scratch
        table = np.zeros((n, L // bs), dtype=np.int64)
        for i, s in enumerate(segments):
            if len(s.blocks) * bs < s.end:
                raise ValueError(f"a decode segment at position {s.start} with {len(s.blocks)} blocks of {bs} tokens")
            ids[i], positions[i], lengths[i] = s.tokens[0], s.start, s.end
            k = min(len(s.blocks), L // bs)
            table[i, :k] = s.blocks[:k]
        real = (table[:, :, None] * bs + np.arange(bs)).reshape(n, L)
        np.copyto(slots[:n], np.where(np.arange(L) < lengths[:n, None], real, self.scratch))
        new_slot[:n] = slots[np.arange(n), lengths[:n] - 1]
        g.inputs.copy_(g.host)  # one copy (blocking: the host buffer is refilled next step)
        if g.hidden is not None:
            if hidden is not None:
                g.hidden[:n].copy_(hidden)
            g.hidden[n:].zero_()

    def _step(self, g: _Graph, pool: torch.Tensor) -> torch.Tensor:
        """The decode step over the static buffers (what a graph captures)."""
        batch = AttentionBatch(segments=[None] * g.B, offsets=list(range(g.B)), slot_mapping=g.slot_mapping,
                               decode=list(range(g.B)), decode_rows=g.rows, decode_slots=g.slots,
                               decode_mask=(g.keys < g.lengths[:, None])[:, None, None, :], decode_lengths=g.lengths)
        return self.llama(g.ids, g.positions, batch, pool, g.rows, None, g.hidden)

    def _new(self, B: int, L: int, pool: torch.Tensor) -> _Graph:
        g = _Graph(B, L, self.device, self._hidden)
        if not self.capture:
            return g
        start = time.perf_counter()
        self._fill(g, [])  # every row a padding row: the warm-up and the capture write the scratch slot only
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # a warm-up outside the capture: cuBLAS's workspaces, lazy inits
            self._step(g, pool)
        torch.cuda.current_stream(self.device).wait_stream(side)
        g.graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA calls meanwhile (a KV message written into the pool)
        # are not an error of this capture
        with torch.cuda.graph(g.graph, pool=self.memory, capture_error_mode="thread_local"):
            g.out = self._step(g, pool)
        took = time.perf_counter() - start
        self.captures, self.capture_s = self.captures + 1, self.capture_s + took
        CAPTURES.inc()
        CAPTURE_SECONDS.inc(took)
        log.info("CUDA graph of the decode step captured for %d rows x %d KV tokens in %.0f ms (%d graphs, %.1f s "
                 "in all)", B, L, took * 1e3, self.captures, self.capture_s)
        return g
