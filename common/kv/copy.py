"""gather / scatter: move KV between an engine's paged pool and one contiguous buffer in a single copy.

The paper's "buffered copies": one message's worth of K/V (many layers x many tokens) is copied
in one indexed copy rather than one small copy per layer and token (~100x faster).

Pool layout (token service): (layers, 2, slots, kv_heads, head_dim), slot = block * block_size +
offset; a sequence's token positions map to slots through its block table (engine.attention.slots_of).
Buffer layout (on the wire):  (layers, 2, tokens, kv_heads, head_dim), contiguous.
"""

from __future__ import annotations

import torch


def gather(pool: torch.Tensor, slots: torch.Tensor, layers: slice = slice(None)) -> torch.Tensor:
    """Copy the K/V at `slots` (tokens,) of a layer range out of the pool, into host memory."""
    return pool[layers].index_select(2, slots.to(pool.device)).cpu()  # (layers, 2, tokens, kv_heads, D)


def scatter(pool: torch.Tensor, slots: torch.Tensor, layers: slice, data: torch.Tensor) -> None:
    """Copy a (layers, 2, tokens, kv_heads, head_dim) buffer into the pool at `slots` (tokens,), one copy."""
    pool[layers].index_copy_(2, slots.to(pool.device), data.to(pool.device))


def gather_prefill(k: torch.Tensor, v: torch.Tensor, rows: slice, out: torch.Tensor) -> torch.Tensor:
    """One prompt's K/V of one layer out of a prefill batch: k, v (N, kv_heads, head_dim) hold every
    prompt's tokens back to back, `rows` this prompt's. Copied into `out` (1, 2, tokens, kv_heads,
    head_dim): host memory, e.g. one layer's place in a message of several layers."""
    out[0, 0].copy_(k[rows])
    out[0, 1].copy_(v[rows])
    return out
