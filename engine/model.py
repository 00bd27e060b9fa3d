"""Our forward for the Llama family (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2), in plain PyTorch.

`LlamaForward` takes the weights once, by their Hugging Face names, from the checkpoint's files
(engine/checkpoint.py) or from a model `transformers` loaded (`of_hf`), fusing q/k/v into one
projection and gate/up into another, and from then on runs its own forward over a flat batch of
tokens from many sequences:

    embed -> for each layer: RMSNorm, QKV, (Qwen3: q/k RMSNorm), RoPE, attention, O, residual,
                             RMSNorm, gate/up, SiLU(gate) * up, down, residual
          -> final RMSNorm and the LM head, only at the positions that need logits

Every op follows Hugging Face's own modules (`modeling_llama.py`) step by step, casts included, so
float32 greedy output equals `generate`. RoPE's inverse frequencies and scaling: default RoPE is
computed as transformers computes it (engine/checkpoint.py); any other (llama3, linear, yarn ...,
as long as they do not change with the sequence length) comes from a loaded model's `rotary_emb`.

Attention is not here: `engine/attention.py` owns it (and the paged KV it reads).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from engine.attention import Attention, AttentionBatch

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
LayerCallback = Callable[[int, torch.Tensor, torch.Tensor], None]  # (layer, k, v), k/v: (N, kv_heads, head_dim)
Getter = Callable[[str], "torch.Tensor | None"]  # a weight by its Hugging Face name, None if the model has none


class Unsupported(Exception):
    """This model is not one our forward runs; the Hugging Face modules run it instead."""


def check_supported(hf_model, max_model_len: int) -> None:
    c = hf_model.config
    if c.model_type not in SUPPORTED:
        raise Unsupported(f"model_type {c.model_type!r} is not one of {SUPPORTED}")
    rope = getattr(c, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") in ("dynamic", "longrope"):  # inv_freq changes with the length
        raise Unsupported(f"rope_type {rope['rope_type']!r}")
    window = getattr(c, "sliding_window", None)  # None where unused: Qwen's configs clear it, and so does a Checkpoint's
    if window and max_model_len > window:
        raise Unsupported(f"sliding-window attention ({window} tokens) with --max-model-len {max_model_len}")
    if getattr(c, "hidden_act", "silu") != "silu":
        raise Unsupported(f"hidden_act {c.hidden_act!r}")


class Linear:
    """y = x W^T + b. On CPU, by our GEMM (engine/kernels/linear.cpp) when the runner's kernel module
    runs the weight's dtype (float32: AVX-512, or AVX2 + FMA, 1.3-1.5x oneDNN's at 1-32 rows on a
    Zen 3 VM; bf16: AVX512-BF16 unless the CPU has AMX (with AVX512-FP16: FMAs on widened
    weights), or AVX2 + FMA without AVX-512, where oneDNN has no bf16 GEMM: 1.45x F.linear at 1 row
    and 5-8x at 8-500), else by oneDNN's on a weight
    prepacked once into its blocked layout, else by F.linear. Measured on a 2-core Zen 4 VM, 30
    layers of SmolLM2's linears, 2 threads (`dejavu bench gemm`): ours against prepacked oneDNN
    1.55x / 1.68x at 1 row (float32 / bf16), 1.19x / 1.34x at 16, 1.05x / 1.02x at 500 (a prefill);
    oneDNN against F.linear's MKL GEMM 2.3x at 1-16 rows in float32 and 1.5-2x in bf16
    (docs/BENCHMARKS.md §5). Each of the three sums in its own order: results differ by float
    rounding."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernel=None, gate_up: bool = False):
        self.bias, self.out_features = bias, weight.shape[0]
        self.packed = self.panels = self.kernel = self.bias32 = None
        self.fused = False  # see silu_mul
        dtype = str(weight.dtype).removeprefix("torch.")
        if (kernel is not None and weight.device.type == "cpu" and dtype in kernel.LINEAR_DTYPES
                and (weight.dtype != torch.bfloat16 or weight.shape[1] % 2 == 0)):
            self.kernel, self.fused = kernel, gate_up and weight.shape[0] % 32 == 0
            self.panels = kernel.pack_gate_up(weight.detach()) if self.fused else kernel.pack_linear(weight.detach())
            if bias is not None:
                bias32 = bias.detach().float().contiguous()
                self.bias32 = kernel.gate_up_order(bias32) if self.fused else bias32
        elif weight.device.type == "cpu" and torch.backends.mkldnn.is_available() and (
                weight.dtype == torch.float32 or weight.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 16)  # 16: a decode batch
        self.weight = None if self.packed is not None or self.panels is not None else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            raise TypeError("a gate/up projection packed with its activation: call silu_mul")
        if self.panels is not None:
            y = self.kernel.linear(x.reshape(-1, x.shape[-1]).contiguous(), self.panels, self.bias32, self.out_features)
            return y.view(*x.shape[:-1], self.out_features)
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        """SiLU(gate) * up of an MLP's gate/up projection (weight [gate; up], made with gate_up=True),
        the activation in our GEMM's epilogue (`linear_silu_mul`): the (N, 2I) projection is never
        written out and read back. Equal to the bit to the kernels' silu_and_mul of this linear's
        output; 1.04x (float32) to 1.08x (bf16) the two calls for SmolLM2's MLP at 500 rows and 16.
        Only when `fused` (our GEMM runs the dtype, I a multiple of 16); else the caller's two steps."""
        if not self.fused:
            raise TypeError("a linear packed without its activation: call it, then SiLU(gate) * up")
        y = self.kernel.linear_silu_mul(x.reshape(-1, x.shape[-1]).contiguous(), self.panels, self.bias32,
                                        self.out_features // 2)
        return y.view(*x.shape[:-1], self.out_features // 2)


class Layer:
    """One decoder layer's weights, fused: qkv (q_heads*D + 2*kv_heads*D, hidden), gate_up (2*I, hidden).
    `get(name)`: a tensor by its Hugging Face name, None where the model has none (biases, q/k norms)."""

    def __init__(self, get: Getter, prefix: str, eps: float, kernel=None):
        w = lambda part: get(f"{prefix}.{part}.weight")  # noqa: E731
        b = lambda part: get(f"{prefix}.{part}.bias")  # noqa: E731
        q_b = b("self_attn.q_proj")  # Qwen2
        qkv_b = torch.cat([q_b, b("self_attn.k_proj"), b("self_attn.v_proj")]) if q_b is not None else None
        self.qkv = Linear(torch.cat([w("self_attn.q_proj"), w("self_attn.k_proj"), w("self_attn.v_proj")]), qkv_b, kernel)
        self.o = Linear(w("self_attn.o_proj"), b("self_attn.o_proj"), kernel)
        gate_b = b("mlp.gate_proj")
        gate_up_b = torch.cat([gate_b, b("mlp.up_proj")]) if gate_b is not None else None
        self.gate_up = Linear(torch.cat([w("mlp.gate_proj"), w("mlp.up_proj")]), gate_up_b, kernel, gate_up=True)
        self.down = Linear(w("mlp.down_proj"), b("mlp.down_proj"), kernel)
        self.ln1, self.ln2 = (w("input_layernorm"), eps), (w("post_attention_layernorm"), eps)
        q_norm, k_norm = w("self_attn.q_norm"), w("self_attn.k_norm")  # Qwen3: RMSNorm per head
        self.q_norm = (q_norm, eps) if q_norm is not None else None
        self.k_norm = (k_norm, eps) if k_norm is not None else None


class LlamaForward:
    """The whole model, or one pipeline stage of it: `layers`, a contiguous range of the decoder
    layers (the embedding comes with the first, the final norm and LM head with the last)."""

    def __init__(self, config, get: Getter, rope: tuple[torch.Tensor, float], layers: range | None = None,
                 kernel=None):
        """config: a Hugging Face config's fields (or engine/checkpoint.py's, from config.json);
        get(name): a weight by its Hugging Face name; rope: (inv_freq (head_dim / 2,), cos/sin scale)."""
        c = config
        layers = range(c.num_hidden_layers) if layers is None else layers
        self.first_layer = layers.start
        self.first, self.last = layers.start == 0, layers.stop == c.num_hidden_layers
        self.q_heads, self.hidden_size = c.num_attention_heads, c.hidden_size
        self.kv_heads = getattr(c, "num_key_value_heads", None) or self.q_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // self.q_heads
        self.embed = get("model.embed_tokens.weight") if self.first else None  # (vocab, hidden)
        self.layers = [Layer(get, f"model.layers.{i}", c.rms_norm_eps, kernel) for i in layers]
        self.norm = (get("model.norm.weight"), c.rms_norm_eps)
        if self.last:  # (vocab, hidden): the file's head where it has one (transformers then does not
            # tie, whatever the config says), else the embedding (tied; the same tensor where we hold it)
            head = get("lm_head.weight")
            if head is None:
                head = self.embed if self.embed is not None else get("model.embed_tokens.weight")
            self.lm_head = Linear(head, None, kernel)
        else:
            self.lm_head = None
        # (head_dim / 2,), on the weights' device once (not copied there at every forward)
        self.inv_freq, self.rope_scale = rope[0].float().to(self.norm[0].device), float(rope[1])
        self.attention = Attention(self.q_heads, self.kv_heads, self.head_dim)
        self.ops = None  # engine.kernels.paged_attention(): fused small ops, set by the runner on CPU
        self.stack = None  # its DecodeStack: a decode step's layers in one call (use_decode_stack)

    @classmethod
    def of_hf(cls, hf_model, layers: range | None = None, kernel=None) -> "LlamaForward":
        """From a loaded Hugging Face model: its parameters by name, its rotary embedding's RoPE."""
        params = dict(hf_model.named_parameters(remove_duplicate=False))  # a tied lm_head under its own name too
        rotary = hf_model.model.rotary_emb
        return cls(hf_model.config, lambda name: p.detach() if (p := params.get(name)) is not None else None,
                   (rotary.inv_freq, rotary.attention_scaling), layers, kernel)

    def fits_ops(self) -> bool:
        """What the fused small ops assume: float32 or bf16 everywhere, an even head_dim."""
        norms = [w for layer in self.layers for w, _ in (layer.ln1, layer.ln2)] + [self.norm[0]]
        dtype = self.norm[0].dtype
        return (self.norm[0].device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
                and self.head_dim % 2 == 0 and all(w.dtype == dtype for w in norms))

    def use_decode_stack(self, kernel) -> bool:
        """Run decode steps' layers through the kernel module's DecodeStack (engine/kernels/decode.cpp:
        this loop in C++, the GIL released) where it computes exactly what the loop does: every
        linear on our GEMM, the fused ops and the attention kernel set, no per-head norms (Qwen3)."""
        linears = [lin for layer in self.layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        if (self.ops is not kernel or self.attention.kernel is not kernel or any(lin.panels is None for lin in linears)
                or any(layer.q_norm is not None for layer in self.layers)):
            return False
        self.stack = kernel.DecodeStack(self.q_heads, self.kv_heads, self.head_dim, self.head_dim ** -0.5)
        for layer in self.layers:
            lins = (layer.qkv, layer.o, layer.gate_up, layer.down)
            self.stack.add(*[t for lin in lins for t in (lin.panels, lin.bias32)], *[lin.out_features for lin in lins],
                           *layer.ln1, *layer.ln2, layer.gate_up.fused)
        return True

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                 pool: torch.Tensor | None, logits_at: torch.Tensor, on_layer: LayerCallback | None = None,
                 hidden: torch.Tensor | None = None, final: list[torch.Tensor] | None = None) -> torch.Tensor:
        """ids, positions: (N,) the new tokens of every sequence, concatenated; their K/V is written
        to `pool` (this stage's layers, 2, slots, kv_heads, head_dim) at batch.slot_mapping, when
        there is a pool, and handed to `on_layer` (model-wide layer index) when given. Returns
        float32 logits at rows `logits_at`: (len, vocab); a stage before the last returns instead
        the residual stream after its layers, (N, hidden), that the next stage takes as `hidden`
        (in place of the embedding: the first stage's input is `ids`, a later one's `hidden`).
        `final` (the last stage's): gets every row's final hidden state, (N, hidden), whose logits
        `head` gives (prompt logprobs); the logits returned are the same either way."""
        h = self.embed[ids] if self.first else hidden                # (N, hidden), the residual stream
        cos, sin = self._rope(positions, h.dtype)                    # (N, head_dim)
        if self.stack is not None and batch.decode_only and pool is not None and on_layer is None:
            # in place: a later stage's input is the caller's (a received buffer), so a copy of it
            h = h.contiguous() if self.first else h.clone(memory_format=torch.contiguous_format)
            h = self.stack.run(h, pool, batch.slot_mapping, batch.decode_slots, batch.decode_lengths, cos, sin)
        else:
            h = self._layers(h, cos, sin, batch, pool, on_layer)
        if not self.last:
            return h
        if final is not None:
            final.append(h)
        return self.head(h[logits_at])

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Float32 logits of final hidden states (rows, hidden), before the norm: (rows, vocab).
        The rows a request samples from go alone (h[logits_at]), so they come out the same whether
        or not other rows are scored: a GEMM, on a GPU above all, may reduce differently for
        another row count."""
        return self.lm_head(_rms_norm(h, *self.norm)).float()

    def _layers(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: AttentionBatch,
                pool: torch.Tensor | None, on_layer: LayerCallback | None) -> torch.Tensor:
        """The decoder layers over the residual stream h (N, hidden), in place; returns it."""
        D, Hq, Hkv = self.head_dim, self.q_heads, self.kv_heads
        x = self._norm(h, self.layers[0].ln1)
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv(x)                                       # (N, (Hq + 2 Hkv) D)
            q, k, v = qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
            q, k, v = q.view(-1, Hq, D), k.view(-1, Hkv, D), v.view(-1, Hkv, D)
            if layer.q_norm is not None:
                q, k = _rms_norm(q, *layer.q_norm), _rms_norm(k, *layer.k_norm)
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
            if pool is not None:
                batch.write(pool[i], k, v)
            if on_layer is not None:
                on_layer(self.first_layer + i, k, v)
            o = self.attention(q, k, v, pool[i] if pool is not None else None, batch)  # (N, Hq D)
            x = self._add_norm(h, layer.o(o), layer.ln2)             # h += o; x = norm(h)
            mlp = layer.down(layer.gate_up.silu_mul(x) if layer.gate_up.fused else self._silu_mul(layer.gate_up(x)))
            if i + 1 < len(self.layers):
                x = self._add_norm(h, mlp, self.layers[i + 1].ln1)
            else:
                h = h + mlp
        return h

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq.to(positions.device)  # (N, head_dim / 2), float32 as HF
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.rope_scale, emb.sin() * self.rope_scale
        return cos.to(dtype), sin.to(dtype)

    # The small ops: our fused CPU kernels (engine/kernels/pointwise.cpp) when the runner gave them,
    # else PyTorch's, op for op as HF runs them.

    def _norm(self, x: torch.Tensor, norm: tuple[torch.Tensor, float]) -> torch.Tensor:
        return self.ops.rms_norm(x, *norm) if self.ops is not None else _rms_norm(x, *norm)

    def _add_norm(self, h: torch.Tensor, delta: torch.Tensor, norm: tuple[torch.Tensor, float]) -> torch.Tensor:
        """h += delta in place (h is the forward's own residual stream); returns norm(h)."""
        if self.ops is not None:
            return self.ops.add_rms_norm(h, delta, *norm)
        h += delta
        return _rms_norm(h, *norm)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE of x (N, heads, D): in place with our kernel, else a new tensor."""
        if self.ops is not None and x.stride(1) == x.shape[2]:
            self.ops.rope_(x, cos, sin)
            return x
        return x * cos[:, None] + _rotate_half(x) * sin[:, None]

    def _silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.ops is not None:
            return self.ops.silu_and_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's LlamaRMSNorm: the variance in float32, the weight applied in the input's dtype."""
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
