"""The decode step through torch.compile (`--compile`): inductor fuses the small ops between the
GEMMs (RMSNorm, RoPE, SiLU * up, the residuals) into C++ loops and runs the step as one graph.

Only plain decode steps of two sequences or more take this path; everything else (prefill,
chunks, restores, a single sequence) runs the eager forward of engine/model.py. The graph is
traced once with dynamic shapes (the batch size and the KV length are symbols), so new batch sizes
and longer sequences never recompile; a batch of one would be specialized by dynamo, and with a
static batch inductor takes MKL's GEMM, which on CPU is slower than the oneDNN prepacked GEMM of
the eager path at 1-16 rows (bench/step.py --compile).

The KV write and the attention are one custom op that writes the pool in place
(`dejavu::decode_attention`): written as tensor ops, inductor's functionalization copied the
whole pool every step (7 s a step at 16 sequences).

Measured on a 2-core AMD EPYC, SmolLM2-135M, 600 tokens of KV (docs/BENCHMARKS.md §5,
docs/bench/step-compile.json): 0.90-1.04x the eager step at 8-32 sequences in float32 and bf16,
within this machine's noise, for 35 s (float32) to 62 s (bf16, two graphs) of compilation at
start-up. The GEMMs, which are most of the step, were prepacked oneDNN calls already, and the
attention is our kernel either way: what is left to fuse is small. Hence off by default. Logits
differ from the eager step's by up to 1e-2 in float32 (another fusion order); greedy output still
equals Hugging Face's on the tests' prompts (tests/unit/test_compiled.py). What it costs besides
time: a second copy of the weights (fused for the graph, then prepacked by inductor); and a step of
several sequences runs compiled while a step of one runs eagerly, so in float32 a request's tokens
may depend on how many others shared its steps (a resumed request's replayed tokens included) where
logits are within 1e-2 of a tie.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import Attention, AttentionBatch

log = logging.getLogger(__name__)
_ATTENTION: dict[int, Attention] = {}  # the op's `which` -> a runner's Attention (kernel, or gather + SDPA)


@torch.library.custom_op("dejavu::decode_attention", mutates_args=("pool",))
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pool: torch.Tensor, layer: int,
                     slot_mapping: torch.Tensor, slots: torch.Tensor, lengths: torch.Tensor, which: int) -> torch.Tensor:
    """Write one layer's new K/V (B, kv_heads, D) to the pool at slot_mapping, then attend: (B, q_heads, D)."""
    attention, q = _ATTENTION[which], q.contiguous()
    pool[layer, 0].index_copy_(0, slot_mapping, k)
    pool[layer, 1].index_copy_(0, slot_mapping, v)
    if attention.kernel is not None and pool.dtype in (torch.float32, torch.bfloat16):  # the hot path, straight
        return attention.kernel.paged_decode_attention(q, pool[layer, 0], pool[layer, 1], slots, lengths,
                                                       attention.head_dim ** -0.5)
    mask = torch.arange(slots.shape[1], device=slots.device)[None, :] < lengths[:, None]
    batch = AttentionBatch([], [], slot_mapping, [], decode_slots=slots, decode_lengths=lengths, decode_mask=mask[:, None, None])
    return attention._decode(q, pool[layer], batch)


@decode_attention.register_fake
def _(q, k, v, pool, layer, slot_mapping, slots, lengths, which):
    return torch.empty_like(q)


class DecodeGraph(nn.Module):
    """The decode step of a Llama-family model as an nn.Module, weights as frozen parameters
    (inductor's freezing folds them and prepacks the GEMMs). The same ops as engine/model.py."""

    def __init__(self, hf_model, attention: Attention):
        super().__init__()
        inner = hf_model.model
        frozen = lambda t: nn.Parameter(t.detach(), requires_grad=False)  # noqa: E731
        cat = lambda *ts: frozen(torch.cat([t.detach() for t in ts]))  # noqa: E731
        attn = [layer.self_attn for layer in inner.layers]
        mlp = [layer.mlp for layer in inner.layers]
        self.qkv = nn.ParameterList([cat(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight) for a in attn])
        self.o = nn.ParameterList([frozen(a.o_proj.weight) for a in attn])
        self.gate_up = nn.ParameterList([cat(m.gate_proj.weight, m.up_proj.weight) for m in mlp])
        self.down = nn.ParameterList([frozen(m.down_proj.weight) for m in mlp])
        self.ln1 = nn.ParameterList([frozen(layer.input_layernorm.weight) for layer in inner.layers])
        self.ln2 = nn.ParameterList([frozen(layer.post_attention_layernorm.weight) for layer in inner.layers])
        self.norm, self.embed = frozen(inner.norm.weight), frozen(inner.embed_tokens.weight)
        self.lm_head = frozen(hf_model.lm_head.weight)
        self.register_buffer("inv_freq", inner.rotary_emb.inv_freq.float())
        self.eps, self.rope_scale = inner.norm.variance_epsilon, float(inner.rotary_emb.attention_scaling)
        self.q_heads, self.kv_heads, self.head_dim = attention.q_heads, attention.kv_heads, attention.head_dim
        self.which = id(attention)
        _ATTENTION[self.which] = attention

    def forward(self, ids, positions, slot_mapping, slots, lengths, pool):
        D, Hq, Hkv = self.head_dim, self.q_heads, self.kv_heads
        h = self.embed[ids]
        freqs = positions[:, None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = (emb.cos() * self.rope_scale).to(h.dtype)[:, None], (emb.sin() * self.rope_scale).to(h.dtype)[:, None]
        for i in range(len(self.qkv)):
            q, k, v = F.linear(self._rms(h, self.ln1[i]), self.qkv[i]).split([Hq * D, Hkv * D, Hkv * D], dim=-1)
            q, k, v = q.view(-1, Hq, D), k.view(-1, Hkv, D), v.view(-1, Hkv, D)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            o = torch.ops.dejavu.decode_attention(q, k, v, pool, i, slot_mapping, slots, lengths, self.which)
            h = h + F.linear(o.view(o.shape[0], -1), self.o[i])
            gate, up = F.linear(self._rms(h, self.ln2[i]), self.gate_up[i]).chunk(2, dim=-1)
            h = h + F.linear(F.silu(gate) * up, self.down[i])
        return F.linear(self._rms(h, self.norm), self.lm_head).float()

    def _rms(self, x, weight):
        x32 = x.to(torch.float32)
        return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class CompiledDecode:
    """`supports(model)`: whether this path can run it (plain Llama: no q/k norm, no biases).
    `__call__` runs a decode-only batch of >= 2 sequences; `warm_up` compiles ahead of traffic."""

    def __init__(self, hf_model, attention: Attention):
        self.graph = torch.compile(DecodeGraph(hf_model, attention).eval(), dynamic=True)
        self.compile_s = 0.0

    @staticmethod
    def supports(hf_model) -> bool:
        attn, mlp = hf_model.model.layers[0].self_attn, hf_model.model.layers[0].mlp
        return (getattr(attn, "q_norm", None) is None and attn.q_proj.bias is None and attn.o_proj.bias is None
                and mlp.gate_proj.bias is None)

    @staticmethod
    def configure() -> None:
        """The compiler's settings, on the thread that will trace (torch's config modules keep
        them per thread, in context variables): call it there before the first step.
        - freezing: weights are constants, folded and prepacked at compile time;
        - no duck shapes: no "these two sizes were equal when traced, so they always are" guards
          (a batch of two sequences with a two-layer model recompiled at the first batch of three).
        Imported here, not at the top: torch._inductor pulls in dynamo and sympy, which only
        --compile needs (transformers' model classes pulled them in too: engine/checkpoint.py)."""
        import torch._inductor.config as _inductor_config
        import torch.fx.experimental._config as _shape_config

        _inductor_config.freezing = True
        _shape_config.use_duck_shape = False

    @torch.inference_mode()
    def __call__(self, ids, positions, batch: AttentionBatch, pool) -> torch.Tensor:
        return self.graph(ids, positions, batch.slot_mapping, batch.decode_slots, batch.decode_lengths, pool)

    def warm_up(self, runner) -> None:
        """Compile now, on a throwaway pool: a batch of two sequences (the dynamic graph) and, where
        the runner compiles batches of one, one sequence (dynamo specializes a size of 1)."""
        from engine.attention import Segment

        self.configure()
        start = time.monotonic()
        pool, bs = runner.new_pool(5), runner.block_size
        runner.forward([Segment([1], 2 * bs - 1, [0, 1]), Segment([1], 3 * bs - 1, [2, 3, 4])], pool)
        if runner.compiled_min_batch == 1:
            runner.forward([Segment([1], 2 * bs - 1, [0, 1])], pool)
        self.compile_s = time.monotonic() - start
        log.info("decode step compiled in %.1f s (torch.compile, inductor, dynamic batch and KV length)", self.compile_s)
