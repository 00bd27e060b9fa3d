"""gather / scatter: move KV between an engine's cache and one contiguous buffer in a single copy.

The paper's "buffered copies": one message's worth of K/V (many layers x many tokens) is copied
in one strided copy rather than one small copy per layer and token (~95x faster).

Pool layout (token service): (layers, 2, slots, kv_heads, max_len + 1, head_dim).
Buffer layout (on the wire):  (layers, 2, kv_heads, tokens, head_dim), contiguous.
"""

from __future__ import annotations

import torch


def gather(pool: torch.Tensor, slot: int, layers: slice, tokens: slice) -> torch.Tensor:
    """Copy one sequence's K/V for a layer range and token range out of the pool."""
    return pool[layers, :, slot, :, tokens].contiguous().cpu()


def scatter(pool: torch.Tensor, slot: int, layers: slice, tokens: slice, data: torch.Tensor) -> None:
    """Copy a (layers, 2, kv_heads, tokens, head_dim) buffer into the pool, one copy."""
    pool[layers, :, slot, :, tokens].copy_(data)


def gather_prefill(k: torch.Tensor, v: torch.Tensor, row: int, length: int,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """One prompt's K/V of one layer out of a left-padded prefill batch.
    k, v: (batch, kv_heads, T, head_dim) -> (1, 2, kv_heads, length, head_dim), contiguous; into
    `out` (host memory, e.g. one layer's place in a message of several layers) when given."""
    T = k.shape[2]
    if out is None:
        return torch.stack((k[row, :, T - length:], v[row, :, T - length:]))[None].cpu()  # the wire takes host memory
    out[0, 0].copy_(k[row, :, T - length:])
    out[0, 1].copy_(v[row, :, T - length:])
    return out
