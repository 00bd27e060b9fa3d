"""Decode steps replayed from CUDA graphs (on CUDA, unless `--enforce-eager`, vLLM's name for it).

A decode step of a small model on a GPU is bound by launching its kernels: SmolLM2-135M's 30
layers are ~500 small kernels a step, each launched from Python, and on an H200 one stream decoded
at 9.5-36 tokens/s through the token service (docs/BENCHMARKS.md §10), against hundreds that the
GPU could do. A CUDA graph launches a whole captured step at once.

A graph replays fixed shapes at fixed addresses, so steps are bucketed:
- the batch, padded up to 1, 2, 4, then multiples of 8 (as vLLM pads), up to the service's largest;
- the KV length, padded up to 64, 128, 256, 512, then multiples of 512 up to 4096, then a quarter
  more each time, up to --max-model-len: the attention gathers each sequence's K/V into a
  (B, L, kv_heads, D) buffer and masks the padding (engine/attention.py), so L is a shape too. The
  padding is attention work: a step of 600 tokens attends over 1024. While a step is bound by its
  launches, as a small model's is, that costs nothing; for a model whose step keeps the GPU busy,
  finer buckets (or an attention that takes lengths) would.
A bucket's graph is captured the first time a step of that shape comes (one warm-up run, then the
capture: logged with its time, ~0.17 s each on an H200 for SmolLM2), and replayed ever after; the
running streams wait meanwhile (vLLM captures before serving instead). A capture that fails leaves
its bucket's steps eager. The buckets bound how many there are (5 batch sizes x 7 lengths for
16 sequences of 2048 tokens, 35 x 20 for 256 of 32K). What a graph holds of its own is small:
every graph reads one set of static input buffers and writes one output buffer, each sized for the
largest bucket (the block tables, 8 bytes a block: ~17 MiB for 256 sequences of 128K tokens in
blocks of 16; the logits, max_batch x vocab float32: 125 MiB for 256 rows of Llama 3's vocabulary),
and their intermediates share one memory pool, the size of the largest bucket's.

A replay reads its inputs from those buffers, filled by one copy from pinned host memory: token
ids, positions, each row's new slot and KV length, and its block table; the slots it reads are
computed in the graph. The padding rows (a batch of 5 runs as 8) write their K/V to a scratch slot: one slot past
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

import torch
from prometheus_client import Counter

from engine.attention import AttentionBatch, Segment, check_decode_blocks

log = logging.getLogger(__name__)
CAPTURES = Counter("dejavu_engine_cuda_graph_captures", "decode-step CUDA graphs captured (one per bucket at first use)")
CAPTURE_SECONDS = Counter("dejavu_engine_cuda_graph_capture_seconds", "time spent capturing them, warm-up runs included")
REPLAYS = Counter("dejavu_engine_cuda_graph_replays", "decode steps replayed from a CUDA graph")


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, then multiples of 8, the last one >= max_batch."""
    sizes = [1, 2, 4] + list(range(8, max_batch + 8, 8))
    return [b for b in sizes if b < max_batch] + [next(b for b in sizes if b >= max_batch)]


def kv_buckets(max_model_len: int, block_size: int) -> list[int]:
    """64, 128, 256, 512, then multiples of 512 up to 4096, then a quarter more each time (rounded
    up to 512), the last one >= max_model_len; each a whole number of blocks."""
    sizes, n = [], 64
    while True:
        size = -(-n // block_size) * block_size
        sizes.append(size)
        if size >= max_model_len:
            return sorted(set(sizes))
        n = n * 2 if n < 512 else n + 512 if n < 4096 else -(-(n + n // 4) // 512) * 512


class _Buffers:
    """The static inputs and output every graph of a DecodeGraphs reads and writes, each sized for
    its largest bucket; a bucket uses a prefix of each."""

    def __init__(self, B: int, L: int, block_size: int, device: torch.device, out: tuple[int, torch.dtype],
                 hidden: tuple[int, torch.dtype] | None):
        n = 4 * B + B * (L // block_size)  # ids, positions, new slots, lengths; the block tables
        self.inputs = torch.zeros(n, dtype=torch.long, device=device)
        self.host = torch.zeros(n, dtype=torch.long, pin_memory=device.type == "cuda")
        self.out = torch.zeros(B, out[0], dtype=out[1], device=device)
        # a later pipeline stage's input: the previous stage's residual stream, (B, hidden size)
        self.hidden = torch.zeros(B, hidden[0], dtype=hidden[1], device=device) if hidden else None
        self.rows = torch.arange(B, device=device)
        self.keys = torch.arange(L, device=device)


class _Bucket:
    """One bucket's views of the buffers, and its graph (None: replayed eagerly)."""

    def __init__(self, B: int, L: int, block_size: int, buffers: _Buffers):
        self.B, self.L, self.blocks = B, L, L // block_size
        self.size = 4 * B + B * self.blocks
        inputs, self.buffers = buffers.inputs[:self.size], buffers
        self.staging = buffers.host[:self.size].numpy()
        self.ids, self.positions, self.slot_mapping, self.lengths = inputs[:4 * B].view(4, B)
        self.table = inputs[4 * B:].view(B, self.blocks)
        self.rows, self.keys = buffers.rows[:B], buffers.keys[:L]
        self.hidden = buffers.hidden[:B] if buffers.hidden is not None else None
        self.graph: torch.cuda.CUDAGraph | None = None


class DecodeGraphs:
    """The graphs of one runner's decode steps over the pool attached last (see the module docstring)."""

    def __init__(self, llama, device: torch.device, block_size: int, max_batch: int, max_model_len: int,
                 capture: bool = True):
        self.llama, self.device, self.block_size, self.capture = llama, device, block_size, capture
        self.batches = batch_buckets(max_batch)
        self.lengths = kv_buckets(max_model_len, block_size)
        self.buckets: dict[tuple[int, int], _Bucket] = {}
        self._buffers: _Buffers | None = None  # made at the first step
        self.memory = None  # the memory pool every graph's intermediates share (attach)
        self._stream = torch.cuda.Stream(device) if capture else None  # warm-ups and captures run on it
        self._pool: weakref.ref | None = None
        self.scratch = -1  # the scratch slot of the attached pool
        self.captures, self.capture_s = 0, 0.0

    def attach(self, pool: torch.Tensor, scratch: int) -> None:
        """Steps over `pool` replay graphs from now on (their padding rows write slot `scratch`,
        which no block holds); graphs made for another pool go, and steps over it run eagerly."""
        if self._pool is not None and self._pool() is not None:
            log.info("CUDA graphs: a new KV pool takes them; steps over the one before run eagerly")
        self.buckets.clear()
        if self.capture:  # a new memory pool: the old one goes with the last graph that used it, and
            # capturing into it after that fails an allocator assertion (seen on an H200, torch 2.11)
            self.memory = torch.cuda.graph_pool_handle()
        buckets = self.buckets  # the callback holds the dict, not self: no cycle through the pool
        self._pool, self.scratch = weakref.ref(pool, lambda _: buckets.clear()), scratch

    def fits(self, segments: list[Segment], pool: torch.Tensor | None) -> bool:
        """A decode-only step over the attached pool, within the largest bucket."""
        return (self._pool is not None and pool is not None and pool is self._pool()
                and len(segments) <= self.batches[-1] and max(s.end for s in segments) <= self.lengths[-1]
                and all(len(s.tokens) == 1 and s.start > 0 and s.blocks is not None for s in segments))

    def __call__(self, segments: list[Segment], pool: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 logits of each segment's token, (len(segments), vocab); a stage before the last
        returns its residual stream instead, (len(segments), hidden), and a later stage than the
        first takes the previous one's as `hidden` (as LlamaForward does)."""
        check_decode_blocks(segments, self.block_size)
        B = self.batches[bisect.bisect_left(self.batches, len(segments))]
        L = self.lengths[bisect.bisect_left(self.lengths, max(s.end for s in segments))]
        bucket = self.buckets.get((B, L))
        if bucket is None:
            bucket = self.buckets[(B, L)] = self._new(B, L, pool)
        self._fill(bucket, segments, hidden)
        if bucket.graph is None:
            self._step(bucket, pool)
        else:
            bucket.graph.replay()
            REPLAYS.inc()
        return bucket.buffers.out[:len(segments)].clone()  # the next step, of any bucket, overwrites it

    def _fill(self, bucket: _Bucket, segments: list[Segment], hidden: torch.Tensor | None = None) -> None:
        """The step's inputs into the bucket's static buffers. A padding row writes and reads the
        scratch slot (its block table names the scratch's "block", its length is 1), and a row's
        keys past its length are the scratch slot too (masked; _step puts it there).
        A padding row's hidden state is zeros, every time: the layers add to it in place, and what
        it writes to the scratch slot must stay finite, since a real row's masked keys read there
        (a NaN key would make the masked score NaN, not -inf)."""
        B, bs, n = bucket.B, self.block_size, len(segments)
        ids, positions, new_slot, lengths = bucket.staging[:4 * B].reshape(4, B)
        table = bucket.staging[4 * B:].reshape(B, bucket.blocks)
        ids[n:], positions[n:], new_slot[n:], lengths[n:] = 0, 0, self.scratch, 1
        table[:n], table[n:] = 0, self.scratch // bs  # past a row's blocks: masked, whatever they name
        for i, s in enumerate(segments):
            ids[i], positions[i], lengths[i] = s.tokens[0], s.start, s.end
            new_slot[i] = s.blocks[s.start // bs] * bs + s.start % bs
            k = min(len(s.blocks), bucket.blocks)
            table[i, :k] = s.blocks[:k]
        # one copy, blocking: the host buffer is refilled next step. It waits for the stream to
        # drain, which costs nothing here: the step before was sampled from already
        buffers = bucket.buffers
        buffers.inputs[:bucket.size].copy_(buffers.host[:bucket.size])
        if bucket.hidden is not None:
            if hidden is not None:
                bucket.hidden[:n].copy_(hidden)
            bucket.hidden[n:].zero_()

    def _step(self, bucket: _Bucket, pool: torch.Tensor) -> None:
        """The decode step over the static buffers, its result into the output buffer (what a graph captures)."""
        bs = self.block_size
        real = bucket.keys < bucket.lengths[:, None]  # (B, L)
        slots = (bucket.table[:, :, None] * bs + bucket.keys[:bs]).view(bucket.B, bucket.L)
        batch = AttentionBatch(segments=[None] * bucket.B, offsets=list(range(bucket.B)),
                               slot_mapping=bucket.slot_mapping, decode=list(range(bucket.B)), decode_rows=bucket.rows,
                               decode_slots=torch.where(real, slots, self.scratch), decode_lengths=bucket.lengths,
                               decode_mask=real[:, None, None, :])
        out = self.llama(bucket.ids, bucket.positions, batch, pool, bucket.rows, None, bucket.hidden)
        bucket.buffers.out[:bucket.B].copy_(out)

    def _new(self, B: int, L: int, pool: torch.Tensor) -> _Bucket:
        if self._buffers is None:
            llama = self.llama
            dtype = llama.norm[0].dtype
            out = (llama.lm_head.out_features, torch.float32) if llama.last else (llama.hidden_size, dtype)
            self._buffers = _Buffers(self.batches[-1], self.lengths[-1], self.block_size, self.device, out,
                                     None if llama.first else (llama.hidden_size, dtype))
        bucket = _Bucket(B, L, self.block_size, self._buffers)
        if not self.capture:
            return bucket
        start = time.perf_counter()
        self._fill(bucket, [])  # every row a padding row: the warm-up and the capture write the scratch slot only
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):  # a warm-up outside the capture: cuBLAS's workspaces, lazy inits
            self._step(bucket, pool)
        torch.cuda.current_stream(self.device).wait_stream(self._stream)
        graph = torch.cuda.CUDAGraph()
        try:
            # torch.cuda.graph empties the allocator's cache first: what the warm-up held on its
            # stream goes back. thread_local: another thread's CUDA calls meanwhile (a KV message
            # written into the pool) are not an error of this capture
            with torch.cuda.graph(graph, pool=self.memory, capture_error_mode="thread_local"):
                self._step(bucket, pool)
        except RuntimeError as exc:  # this bucket's steps then run eagerly, as they compute the same
            log.warning("CUDA graph capture for %d rows x %d KV tokens failed, those steps run eagerly: %s", B, L, exc)
            return bucket
        bucket.graph = graph
        took = time.perf_counter() - start
        self.captures, self.capture_s = self.captures + 1, self.capture_s + took
        CAPTURES.inc()
        CAPTURE_SECONDS.inc(took)
        log.info("CUDA graph of the decode step captured for %d rows x %d KV tokens in %.0f ms (%d graphs, %.1f s "
                 "in all)", B, L, took * 1e3, self.captures, self.capture_s)
        return bucket
