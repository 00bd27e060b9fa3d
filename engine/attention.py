"""Attention over a paged KV pool, for a flat batch of tokens from many sequences.

A forward's N new tokens are the concatenation of segments, one per sequence: `tokens` new tokens
at positions [start, start + len). Three kinds of segment, each computed the fastest way we
measured on CPU:

- fresh (start == 0, a prompt or its first chunk): causal attention over the segment's own new
  K/V, no pool read. On CPU our kernel (`causal_attention` in engine/kernels/paged_attention.cpp)
  takes the query heads of a KV head and 16 positions as one block of rows: at a 500-token prompt
  of SmolLM2, one core, 4.1 ms a layer against 7.8 for torch's SDPA (flash) in float32, 3.8
  against 8.5 in bf16; in bf16 on a CPU with AVX512-BF16 both products now run on VDPBF16PS,
  1.7x faster again (not where AVX512-FP16 marks a core on which VDPBF16PS runs at half the FMA
  rate: there bf16 keys and values are widened to float32). Elsewhere SDPA, one call for a run of fresh segments of one length.
- decode (one new token, start > 0): the decode segments of a step are batched. On CPU our
  kernel (`paged_decode_attention`) reads each sequence's K/V in place through its
  slots, each key and value once for all the query heads of its group (a position's KV heads as
  one row when the batch has sequences enough for every thread). Elsewhere (CUDA, or no compiler)
  each one's K/V [0, start + 1) is gathered from its blocks into one padded (B, L, kv_heads, D)
  buffer with a single index per layer, and the query heads of a KV head attend as a group: q
  viewed as (B, kv_heads, group, D) against (B, kv_heads, L, D), so no KV head is ever repeated;
  a (B, 1, 1, L) mask hides the padding. Measured on 2 cores at 16 sequences of 600 tokens,
  attention of 30 layers: gather + SDPA 58 ms, the kernel 42 ms in float32 (43 / 34 in bf16);
  the whole step 99 / 90 ms, at 32 sequences 224 / 159 ms (bench/step.py has the whole step).
- extend (several new tokens after KV that is there: a later chunk of a prompt): its K/V
  [0, start + m) is gathered from the pool and attended causally, shifted by `start` (our kernel
  on CPU, else SDPA with a mask).

The pool of one layer: (2, slots, kv_heads, head_dim), slot = block * block_size + offset. A
sequence's block table maps its token positions to slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


# Our causal kernel widens a call's keys and values to float32 whole (2 * kv_heads * head_dim * 4
# bytes a key: 64 MiB at 8K keys for Llama-3-8B's 8 x 128) and keeps a row block's scores whole;
# past this many keys SDPA's flash attention, which works in tiles, takes over.
CAUSAL_KERNEL_MAX_KEYS = 8192


@dataclass(frozen=True)
class Segment:
    """One sequence's part of a forward pass."""

    tokens: list[int]                 # new tokens, at positions [start, start + len(tokens))
    start: int = 0                    # tokens whose KV is in the pool already
    blocks: list[int] | None = None   # its block table (None: no pool, e.g. a prompt service's prefill)

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


def slots_of(blocks: list[int] | torch.Tensor, block_size: int, start: int, end: int,
             device: torch.device | str = "cpu") -> torch.Tensor:
    """Pool slots of token positions [start, end) of a sequence with block table `blocks`: (end - start,)."""
    return _slots(torch.as_tensor(blocks, dtype=torch.long), block_size, start, end).to(device)


@dataclass
class AttentionBatch:
    """Where each segment's tokens sit in the flat batch and in the pool (built once per forward)."""

    segments: list[Segment]
    offsets: list[int]                         # row of each segment's first new token
    slot_mapping: torch.Tensor | None          # (N,) pool slot of each new token (None: no pool)
    decode: list[int]                          # indices of the decode segments
    decode_rows: torch.Tensor | None = None    # (B,) their rows in the flat batch
    decode_slots: torch.Tensor | None = None   # (B, L) slots of their KV, padded with slot 0
    decode_mask: torch.Tensor | None = None    # (B, 1, 1, L) True where a key is real
    decode_lengths: torch.Tensor | None = None  # (B,) KV tokens of each, its new one included
    extend_slots: dict[int, torch.Tensor] | None = None  # segment index -> (start + m,) slots
    gathered: torch.Tensor | None = None       # (2, B * L, kv_heads, D): the decode K/V of one layer

    @property
    def decode_only(self) -> bool:
        """Every segment is one decode token: the flat batch is the decode batch, row for row."""
        return len(self.decode) == len(self.segments)

    @classmethod
    def build(cls, segments: list[Segment], block_size: int, device) -> "AttentionBatch":
        offsets, n = [], 0
        for s in segments:
            offsets.append(n)
            n += len(s.tokens)
        paged = segments[0].blocks is not None
        batch = cls(segments, offsets, None, [])
        if not paged:
            if any(s.start for s in segments):
                raise ValueError("a segment after KV that is there needs a block table")
            return batch
        batch.decode = [i for i, s in enumerate(segments) if s.start > 0 and len(s.tokens) == 1]
        if batch.decode:
            # every decode sequence's slots at once, from one zero-padded block table: a few ops a
            # step, where one per sequence took ~2 ms of Python at 16 sequences
            check_decode_blocks([segments[i] for i in batch.decode], block_size)
            lengths = torch.tensor([segments[i].end for i in batch.decode])
            L = int(lengths.max())
            table = torch.from_numpy(_padded([segments[i].blocks for i in batch.decode], -(-L // block_size)))
            slots = (table[:, :, None] * block_size + torch.arange(block_size)).view(len(batch.decode), -1)[:, :L]
            real = torch.arange(L)[None, :] < lengths[:, None]                        # (B, L)
            batch.decode_slots = torch.where(real, slots, 0).to(device)             # padding: slot 0, never read
            batch.decode_mask = real[:, None, None, :].to(device)
            batch.decode_lengths = lengths.to(device)
            batch.decode_rows = torch.tensor([offsets[i] for i in batch.decode], device=device)
        if batch.decode_only:
            batch.slot_mapping = batch.decode_slots.gather(1, (batch.decode_lengths - 1)[:, None].to(device)).view(-1)
        else:
            tables = [torch.as_tensor(s.blocks, dtype=torch.long) for s in segments]
            batch.slot_mapping = torch.cat([_slots(t, block_size, s.start, s.end) for t, s in zip(tables, segments)]).to(device)
        batch.extend_slots = {i: _slots(torch.as_tensor(s.blocks, dtype=torch.long), block_size, 0, s.end).to(device)
                              for i, s in enumerate(segments) if s.start > 0 and len(s.tokens) > 1}
        return batch

    def write(self, pool_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """New K/V (N, kv_heads, D) into one layer's pool (2, slots, kv_heads, D), one copy each."""
        pool_layer[0].index_copy_(0, self.slot_mapping, k)
        pool_layer[1].index_copy_(0, self.slot_mapping, v)


def check_decode_blocks(segments: list[Segment], block_size: int) -> None:
    """ValueError for a decode segment whose block table does not reach its new token."""
    short = next((s for s in segments if len(s.blocks) * block_size < s.end), None)
    if short is not None:
        raise ValueError(f"a decode segment at position {short.start} with {len(short.blocks)} blocks "
                         f"of {block_size} tokens")


def _slots(table: torch.Tensor, block_size: int, start: int, end: int) -> torch.Tensor:
    pos = torch.arange(start, end)
    return table[pos // block_size] * block_size + pos % block_size


def _padded(tables: list[list[int]], width: int) -> np.ndarray:
    """The first `width` blocks of each table, as rows of one int64 array; zeros past a table's end."""
    out = np.zeros((len(tables), width), dtype=np.int64)
    for row, blocks in zip(out, tables):
        n = min(len(blocks), width)
        row[:n] = blocks[:n]
    return out


class Attention:
    def __init__(self, q_heads: int, kv_heads: int, head_dim: int):
        self.q_heads, self.kv_heads, self.head_dim = q_heads, kv_heads, head_dim
        self.group = q_heads // kv_heads
        self.kernel = None  # engine.kernels.paged_attention(), set by the runner on CPU

    def _has_kernel(self, q: torch.Tensor) -> bool:
        return self.kernel is not None and q.dtype in (torch.float32, torch.bfloat16)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pool_layer: torch.Tensor | None,
                 batch: AttentionBatch) -> torch.Tensor:
        """q: (N, q_heads, D); k, v: (N, kv_heads, D), this forward's new tokens (already in the
        pool when there is one). Returns (N, q_heads * D)."""
        if batch.decode_only:  # a plain decode step: no row shuffling on the hot path
            return self._decode(q, pool_layer, batch).view(q.shape[0], -1)
        runs = _fresh_runs(batch)
        if runs == [(0, len(batch.segments))]:  # prompts of one length only (a prefill): no copy into `out`
            return self._fresh(q, k, v, len(batch.segments)).reshape(q.shape[0], -1)  # SDPA's math backend: strided
        out = torch.empty_like(q)
        if batch.decode:
            out[batch.decode_rows] = self._decode(q[batch.decode_rows], pool_layer, batch)
        for first, last in runs:
            rows = slice(batch.offsets[first], batch.offsets[last - 1] + len(batch.segments[last - 1].tokens))
            out[rows] = self._fresh(q[rows], k[rows], v[rows], last - first)
        for i, slots in (batch.extend_slots or {}).items():
            s, row = batch.segments[i], batch.offsets[i]
            rows = slice(row, row + len(s.tokens))
            out[rows] = self._extend(q[rows], pool_layer[0].index_select(0, slots), pool_layer[1].index_select(0, slots),
                                     s.start)
        return out.view(q.shape[0], -1)

    def _fresh(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs: int) -> torch.Tensor:
        """`seqs` prompts of one length T, rows back to back: causal attention. -> (seqs * T, Hq, D)"""
        if self._has_kernel(q) and q.shape[0] // seqs <= CAUSAL_KERNEL_MAX_KEYS:
            T = q.shape[0] // seqs
            outs = [self.kernel.causal_attention(q[i:i + T], k[i:i + T], v[i:i + T], 0, self.head_dim ** -0.5)
                    for i in range(0, q.shape[0], T)]
            return outs[0] if seqs == 1 else torch.cat(outs)
        q, k, v = (x.view(seqs, -1, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))  # (B, heads, T, D)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.group > 1)
        return o.transpose(1, 2).reshape(-1, self.q_heads, self.head_dim)

    def _decode(self, q: torch.Tensor, pool_layer: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        """q: (B, Hq, D), one token per sequence. -> (B, Hq, D)"""
        if self._has_kernel(q):
            return self.kernel.paged_decode_attention(q.contiguous(), pool_layer[0], pool_layer[1], batch.decode_slots,
                                                      batch.decode_lengths, self.head_dim ** -0.5)
        B, L = batch.decode_slots.shape
        if batch.gathered is None:  # one buffer for every layer: a fresh 10 MB tensor per layer costs page faults
            batch.gathered = pool_layer.new_empty((2, B * L) + pool_layer.shape[2:])
        k, v = batch.gathered
        index = batch.decode_slots.view(-1)  # index_select: ~5x faster than pool[slots] on CPU
        torch.index_select(pool_layer[0], 0, index, out=k)
        torch.index_select(pool_layer[1], 0, index, out=v)
        k, v = (x.view(B, L, self.kv_heads, -1).transpose(1, 2) for x in (k, v))  # (B, Hkv, L, D)
        qg = q.view(B, self.kv_heads, self.group, self.head_dim)  # query heads of one KV head: a group
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=batch.decode_mask)
        return o.reshape(B, self.q_heads, self.head_dim)

    def _extend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        """q: (m, Hq, D) at positions [start, start + m); k, v: (start + m, Hkv, D). -> (m, Hq, D)"""
        if self._has_kernel(q) and k.shape[0] <= CAUSAL_KERNEL_MAX_KEYS:
            return self.kernel.causal_attention(q, k, v, start, self.head_dim ** -0.5)
        m, L = q.shape[0], k.shape[0]
        allowed = torch.arange(L, device=q.device)[None, :] <= torch.arange(start, start + m, device=q.device)[:, None]
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                           attn_mask=allowed, enable_gqa=self.group > 1)
        return o[0].transpose(0, 1)


def _fresh_runs(batch: AttentionBatch) -> list[tuple[int, int]]:
    """[first, last) index ranges of consecutive fresh segments of one length."""
    runs: list[tuple[int, int]] = []
    for i, s in enumerate(batch.segments):
        if s.start != 0:
            continue
        if runs and runs[-1][1] == i and len(batch.segments[runs[-1][0]].tokens) == len(s.tokens):
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs
