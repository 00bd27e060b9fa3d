"""The Hugging Face modules behind our runner interface, for architectures our forward does not
cover (GPT-2, OPT, ...). Correct, slower: one segment (sequence) at a time, each through the
model's own forward with a cache that writes its new K/V into the paged pool and hands back the
sequence's whole K/V gathered from it. Layer-by-layer streaming degrades to one callback per
layer once every segment is computed.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from common.sampling import prompt_logprobs
from engine.attention import Segment, slots_of


class _SegmentCache(Cache):
    """One segment: new K/V (1, kv_heads, m, D) go to the pool at `new_slots` (when there is a
    pool) and to `captured`; attention reads K/V at `all_slots` [0, start + m)."""

    def __init__(self, pool: torch.Tensor | None, new_slots, all_slots, captured: list):
        super().__init__(layers=[])
        self.pool, self.new_slots, self.all_slots, self.captured = pool, new_slots, all_slots, captured

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = key_states[0].transpose(0, 1), value_states[0].transpose(0, 1)  # (m, kv_heads, D)
        self.captured.append((layer_idx, k, v))
        if self.pool is None:
            return key_states, value_states
        self.pool[layer_idx, 0].index_copy_(0, self.new_slots, k)
        self.pool[layer_idx, 1].index_copy_(0, self.new_slots, v)
        keys, values = self.pool[layer_idx, 0][self.all_slots], self.pool[layer_idx, 1][self.all_slots]
        return keys.transpose(0, 1)[None], values.transpose(0, 1)[None]  # (1, kv_heads, start + m, D)


class HFForward:
    def __init__(self, hf_model, block_size: int):
        self.model, self.block_size = hf_model, block_size
        self.min_value = torch.finfo(hf_model.dtype).min

    @torch.inference_mode()
    def run(self, segments: list[Segment], pool: torch.Tensor | None, on_layer=None,
            scored: dict[int, tuple[list[int], int]] | None = None):
        """Logits of each segment's last token, (len(segments), vocab); with `scored`
        (ModelRunner.forward_scored's), also the scored segments' prompt logprobs: (logits, scores)."""
        logits, captured, scores = [], [], {}
        for i, s in enumerate(segments):
            if scored is not None and i in scored:
                targets, k = scored[i]
                # (len(tokens), vocab) at once, the model's own head over a chunk (--max-batch-tokens
                # bounds it; our forward scores SCORE_ROWS at a time); its last row, out of the whole
                # matrix's GEMM, may differ from a one-row product in the last bits (our forward's does not)
                every = self._one(s, pool, captured, keep=0)
                scores[i] = prompt_logprobs(every[:len(targets)], targets, k)
                logits.append(every[-1:])
            else:
                logits.append(self._one(s, pool, captured))
        if on_layer is not None:  # per layer, every segment's K/V in segment order
            layers = max(i for i, _, _ in captured) + 1
            for layer in range(layers):
                parts = [(k, v) for i, k, v in captured if i == layer]
                on_layer(layer, torch.cat([k for k, _ in parts]), torch.cat([v for _, v in parts]))
        return torch.cat(logits) if scored is None else (torch.cat(logits), scores)

    def _one(self, s: Segment, pool, captured: list, keep: int = 1) -> torch.Tensor:
        """Logits of the segment's last `keep` tokens (0: all of them), float32."""
        device = self.model.device
        new = all_ = None
        if pool is not None:
            new = slots_of(s.blocks, self.block_size, s.start, s.end, device)
            all_ = slots_of(s.blocks, self.block_size, 0, s.end, device)
        elif s.start:
            raise ValueError("a segment after KV that is there needs a pool")
        q = torch.arange(s.start, s.end, device=device)
        allowed = torch.arange(s.end, device=device)[None, :] <= q[:, None]  # (m, start + m)
        mask = torch.zeros(allowed.shape, dtype=self.model.dtype, device=device).masked_fill_(~allowed, self.min_value)
        out = self.model(input_ids=torch.tensor([s.tokens], device=device), position_ids=q[None],
                         attention_mask=mask[None, None], past_key_values=_SegmentCache(pool, new, all_, captured),
                         use_cache=True, logits_to_keep=keep)
        return out.logits[0].float()
