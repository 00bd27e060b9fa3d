"""Our forward for the Llama family (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2), in plain PyTorch.

`transformers` still reads the config and the weights (`from_pretrained`); `LlamaForward` takes
the loaded modules' tensors once, fusing q/k/v into one projection and gate/up into another, and
from then on runs its own forward over a flat batch of tokens from many sequences:

    embed -> for each layer: RMSNorm, QKV, (Qwen3: q/k RMSNorm), RoPE, attention, O, residual,
                             RMSNorm, gate/up, SiLU(gate) * up, down, residual
          -> final RMSNorm and the LM head, only at the positions that need logits

Every op follows Hugging Face's own modules (`modeling_llama.py`) step by step, casts included, so
float32 greedy output equals `generate`. RoPE's inverse frequencies and scaling come from the
loaded model's `rotary_emb` (default, llama3, linear, yarn ... whatever the config asks for, as
long as they do not change with the sequence length).

Attention is not here: `engine/attention.py` owns it (and the paged KV it reads).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from engine.attention import Attention, AttentionBatch

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
LayerCallback = Callable[[int, torch.Tensor, torch.Tensor], None]  # (layer, k, v), k/v: (N, kv_heads, head_dim)


class Unsupported(Exception):
    """This model is not one our forward runs; the Hugging Face modules run it instead."""


def check_supported(hf_model, max_model_len: int) -> None:
    c = hf_model.config
    if c.model_type not in SUPPORTED:
        raise Unsupported(f"model_type {c.model_type!r} is not one of {SUPPORTED}")
    rope = getattr(c, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") in ("dynamic", "longrope"):  # inv_freq changes with the length
        raise Unsupported(f"rope_type {rope['rope_type']!r}")
    window = getattr(c, "sliding_window", None)
    if window and getattr(c, "use_sliding_window", True) and max_model_len > window:
        raise Unsupported(f"sliding-window attention ({window} tokens) with --max-model-len {max_model_len}")
    if getattr(c, "hidden_act", "silu") != "silu":
        raise Unsupported(f"hidden_act {c.hidden_act!r}")


class Layer:
    """One decoder layer's weights, fused: qkv (q_heads*D + 2*kv_heads*D, hidden), gate_up (2*I, hidden)."""

    def __init__(self, hf_layer):
        attn, mlp = hf_layer.self_attn, hf_layer.mlp
        self.qkv_w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        self.qkv_b = (torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
                      if attn.q_proj.bias is not None else None)  # Qwen2
        self.o_w, self.o_b = attn.o_proj.weight, attn.o_proj.bias
        self.q_norm = getattr(attn, "q_norm", None)  # Qwen3: RMSNorm over each head
        self.k_norm = getattr(attn, "k_norm", None)
        self.gate_up_w = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        self.gate_up_b = torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias]) if mlp.gate_proj.bias is not None else None
        self.down_w, self.down_b = mlp.down_proj.weight, mlp.down_proj.bias
        self.ln1 = (hf_layer.input_layernorm.weight, hf_layer.input_layernorm.variance_epsilon)
        self.ln2 = (hf_layer.post_attention_layernorm.weight, hf_layer.post_attention_layernorm.variance_epsilon)
        self.q_norm = (self.q_norm.weight, self.q_norm.variance_epsilon) if self.q_norm is not None else None
        self.k_norm = (self.k_norm.weight, self.k_norm.variance_epsilon) if self.k_norm is not None else None


class LlamaForward:
    def __init__(self, hf_model):
        c, inner = hf_model.config, hf_model.model
        self.q_heads = c.num_attention_heads
        self.kv_heads = getattr(c, "num_key_value_heads", None) or self.q_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // self.q_heads
        self.embed = inner.embed_tokens.weight                      # (vocab, hidden)
        self.layers = [Layer(layer) for layer in inner.layers]
        self.norm = (inner.norm.weight, inner.norm.variance_epsilon)
        self.lm_head = hf_model.lm_head.weight                      # (vocab, hidden); the embedding if tied
        self.inv_freq = inner.rotary_emb.inv_freq.float()            # (head_dim / 2,)
        self.rope_scale = float(inner.rotary_emb.attention_scaling)
        self.attention = Attention(self.q_heads, self.kv_heads, self.head_dim)

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                 pool: torch.Tensor | None, logits_at: torch.Tensor, on_layer: LayerCallback | None = None) -> torch.Tensor:
        """ids, positions: (N,) the new tokens of every sequence, concatenated; their K/V is written
        to `pool` (layers, 2, slots, kv_heads, head_dim) at batch.slot_mapping, when there is a pool,
        and handed to `on_layer` when given. Returns float32 logits at rows `logits_at`: (len, vocab)."""
        h = self.embed[ids]                                          # (N, hidden)
        cos, sin = self._rope(positions, h.dtype)                    # (N, 1, head_dim)
        D, Hq, Hkv = self.head_dim, self.q_heads, self.kv_heads
        for i, layer in enumerate(self.layers):
            x = _rms_norm(h, *layer.ln1)
            qkv = F.linear(x, layer.qkv_w, layer.qkv_b)             # (N, (Hq + 2 Hkv) D)
            q, k, v = qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
            q, k, v = q.view(-1, Hq, D), k.view(-1, Hkv, D), v.view(-1, Hkv, D)
            if layer.q_norm is not None:
                q, k = _rms_norm(q, *layer.q_norm), _rms_norm(k, *layer.k_norm)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            if pool is not None:
                batch.write(pool[i], k, v)
            if on_layer is not None:
                on_layer(i, k, v)
            o = self.attention(q, k, v, pool[i] if pool is not None else None, batch)  # (N, Hq D)
            h = h + F.linear(o, layer.o_w, layer.o_b)
            x = _rms_norm(h, *layer.ln2)
            gate, up = F.linear(x, layer.gate_up_w, layer.gate_up_b).chunk(2, dim=-1)
            h = h + F.linear(F.silu(gate) * up, layer.down_w, layer.down_b)
        h = _rms_norm(h[logits_at], *self.norm)
        return F.linear(h, self.lm_head).float()

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq.to(positions.device)  # (N, head_dim / 2), float32 as HF
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.rope_scale, emb.sin() * self.rope_scale
        return cos.to(dtype)[:, None], sin.to(dtype)[:, None]


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's LlamaRMSNorm: the variance in float32, the weight applied in the input's dtype."""
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
