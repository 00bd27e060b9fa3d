"""ModelRunner: one per engine process, wrapping a Hugging Face causal LM.

Two forward passes, both through the model's own `forward` (any AutoModelForCausalLM whose
attention calls `past_key_values.update(k, v, layer_idx)`, the standard KV cache contract):

- `prefill(prompts, on_layer)`: a left-padded batch of prompts; `on_layer(layer, k, v)` is called
  from inside the forward as soon as each layer's K/V exists, so the caller can stream it out
  while the next layer computes. Returns the last position's logits.
- `extend(pool, slot, tokens, start)`: the KV of a few more tokens of one row, on top of KV that is
  there already (recovery: the tokens generated after the replicated index).
- `decode(pool, tokens, positions, running)`: one new token for each row of a KV pool whose rows
  [0, n) form the batch; rows not `running` are idle (reserved or free) and only touch a scratch
  column. Sequences of different lengths share the batch through a 4D mask.

KV pool layout, one tensor for the whole service: (layers, 2, slots, kv_heads, max_len + 1, head_dim);
[:, 0] are keys, [:, 1] values; column max_len is scratch for idle rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

LayerCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class KVShape:
    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def of(cls, model) -> "KVShape":
        c = model.config
        heads = c.num_attention_heads
        return cls(c.num_hidden_layers, getattr(c, "num_key_value_heads", None) or heads,
                   getattr(c, "head_dim", None) or c.hidden_size // heads, model.dtype)

    @property
    def bytes_per_token(self) -> int:  # K and V, every layer
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype.itemsize


class _CaptureCache(Cache):
    """Prefill cache: hands each layer's K/V to a callback and keeps nothing."""

    def __init__(self, on_layer: LayerCallback):
        super().__init__(layers=[])
        self.on_layer = on_layer

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.on_layer(layer_idx, key_states, value_states)  # k, v: (B, kv_heads, T, head_dim)
        return key_states, value_states


class _PoolCache(Cache):
    """Decode cache over the pool: writes the new token's K/V at each row's position and returns
    the rows' K/V up to the longest of them."""

    def __init__(self, pool: torch.Tensor, rows: int, write_pos: torch.Tensor, kv_len: int):
        super().__init__(layers=[])
        self.pool, self.rows, self.kv_len = pool, rows, kv_len
        # Where each row's new K (or V) vector goes in one layer's (slots * kv_heads * (max_len+1),
        # head_dim) view: one index_copy_ per layer. (Advanced indexing, k[rows, :, pos] = new,
        # gives the same result ~150x slower on CPU: ~6 ms per layer at 16 rows.)
        _, _, _, heads, length, _ = pool.shape
        row_heads = torch.arange(rows, device=pool.device)[:, None] * heads + torch.arange(heads, device=pool.device)
        self.flat_index = (row_heads * length + write_pos[:, None]).reshape(-1)  # (rows * kv_heads,)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = self.pool[layer_idx, 0], self.pool[layer_idx, 1]  # (slots, kv_heads, max_len+1, head_dim)
        dim = k.shape[-1]
        k.view(-1, dim).index_copy_(0, self.flat_index, key_states[:, :, -1].reshape(-1, dim))  # new: (rows, kv_heads, dim)
        v.view(-1, dim).index_copy_(0, self.flat_index, value_states[:, :, -1].reshape(-1, dim))
        return k[: self.rows, :, : self.kv_len], v[: self.rows, :, : self.kv_len]


class _RowCache(Cache):
    """Extend cache over one pool row: writes the new tokens' K/V at [start, start + m) and returns
    the row's K/V [0, start + m)."""

    def __init__(self, pool: torch.Tensor, slot: int, start: int):
        super().__init__(layers=[])
        self.pool, self.slot, self.start = pool, slot, start

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        end = self.start + key_states.shape[2]
        row = self.pool[layer_idx, :, self.slot: self.slot + 1]  # (2, 1, kv_heads, max_len+1, head_dim)
        row[0, :, :, self.start: end] = key_states
        row[1, :, :, self.start: end] = value_states
        return row[0, :, :, :end], row[1, :, :, :end]


class ModelRunner:
    def __init__(self, model):
        self.model = model
        self.kv = KVShape.of(model)
        self.device = model.device
        self.dtype = model.dtype
        self.min_value = torch.finfo(model.dtype).min

    def new_pool(self, slots: int, max_len: int) -> torch.Tensor:
        kv = self.kv
        return torch.zeros(kv.layers, 2, slots, kv.kv_heads, max_len + 1, kv.head_dim,
                           dtype=kv.dtype, device=self.device)

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], on_layer: LayerCallback) -> torch.Tensor:
        """Batch forward. on_layer gets k, v: (B, kv_heads, T, head_dim) where row b's real
        tokens are the last len(prompts[b]) (left padding). Returns each prompt's last-token
        logits: (B, vocab). Prompts of one length run unmasked, on the model's own causal path
        (on CPU that is ~1.4x faster than a padded batch with an explicit mask)."""
        T = max(len(p) for p in prompts)
        if all(len(p) == T for p in prompts):
            ids = torch.tensor(prompts, device=self.device)
            out = self.model(input_ids=ids, past_key_values=_CaptureCache(on_layer), use_cache=True, logits_to_keep=1)
            return out.logits[:, -1].float()
        pad = torch.tensor([T - len(p) for p in prompts], device=self.device)  # (B,)
        ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts], device=self.device)
        pos = torch.arange(T, device=self.device)
        position_ids = (pos[None, :] - pad[:, None]).clamp(min=0)  # (B, T)
        # key j is visible to query i when it is real (j >= pad) and not in the future (j <= i)
        allowed = (pos[None, None, :] >= pad[:, None, None]) & (pos[None, None, :] <= pos[None, :, None])
        out = self.model(input_ids=ids, position_ids=position_ids, attention_mask=self._float_mask(allowed),
                         past_key_values=_CaptureCache(on_layer), use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()

    @torch.inference_mode()
    def decode(self, pool: torch.Tensor, tokens: list[int], positions: list[int],
               running: list[bool]) -> torch.Tensor:
        """One step for pool rows [0, n), n = len(tokens). Row b's token sits at positions[b];
        idle rows (running[b] False) write to the scratch column. Returns logits (n, vocab)."""
        n = len(tokens)
        max_len = pool.shape[4] - 1
        pos = torch.tensor(positions, device=self.device)
        live = torch.tensor(running, device=self.device)
        kv_len = max(p for p, r in zip(positions, running) if r) + 1
        write_pos = torch.where(live, pos, torch.full_like(pos, max_len))
        cols = torch.arange(kv_len, device=self.device)
        allowed = (cols[None, :] <= pos[:, None]) & live[:, None] | (cols[None, :] == 0) & ~live[:, None]
        mask = self._float_mask(allowed[:, None, :])  # (n, 1, 1, kv_len)
        cache = _PoolCache(pool, n, write_pos, kv_len)
        ids = torch.tensor(tokens, device=self.device)[:, None]
        out = self.model(input_ids=ids, position_ids=torch.where(live, pos, 0)[:, None],
                         attention_mask=mask, past_key_values=cache, use_cache=True)
        return out.logits[:, -1].float()

    @torch.inference_mode()
    def extend(self, pool: torch.Tensor, slot: int, tokens: list[int], start: int) -> torch.Tensor:
        """Forward `tokens` at positions [start, start + m) of pool row `slot`, whose KV [0, start)
        is already there (a replica fetched on recovery), writing their K/V. Returns the last
        token's logits: (1, vocab)."""
        m = len(tokens)
        q = torch.arange(start, start + m, device=self.device)
        allowed = torch.arange(start + m, device=self.device)[None, :] <= q[:, None]  # (m, start + m)
        out = self.model(input_ids=torch.tensor([tokens], device=self.device), position_ids=q[None, :],
                         attention_mask=self._float_mask(allowed[None]), past_key_values=_RowCache(pool, slot, start),
                         use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()

    def _float_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """allowed: (B, Q, K) bool -> additive float mask (B, 1, Q, K)."""
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        return mask.masked_fill_(~allowed, self.min_value)[:, None]  # (B, 1, Q, K)
