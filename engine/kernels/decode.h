// A decode step's decoder layers in one call: the loop of LlamaForward.__call__ (engine/model.py),
// op for op the same kernels in the same order (so the same results, to the bit), run from C++.
//
// At a decode step each layer is ~35 small Python-level calls around its kernels (views, the
// fused QKV's split, the pool writes, the wrappers): ~1,000 a step for SmolLM2's 30 layers, 5-8
// ms of a 40-60 ms step at 16 sequences on the 2-core VM, each taking the GIL, which a service's
// event loop holds in between (its HTTP streams, Redis, replication). Here the whole stack runs
// with the GIL released, and only the embedding, RoPE's tables and the logits stay in Python.
//
//   stack = DecodeStack(q_heads, kv_heads, head_dim, scale)
//   stack.add(qkv, qkv_bias, o, o_bias, gate_up, gate_up_bias, down, down_bias,   # packed by pack_linear,
//             n_qkv, n_o, n_gate_up, n_down, ln1, eps1, ln2, eps2, gate_up_fused)  # float32 biases or None;
//                                                     # fused: gate_up packed by pack_gate_up (linear_silu_mul)
//   h = stack.run(h, pool, slot_mapping, decode_slots, decode_lengths, cos, sin)
//
// h (B, hidden) is the residual stream after the embedding, updated in place and returned;
// pool (layers, 2, slots, kv_heads, head_dim): each layer's new K/V goes to slot_mapping (B,).
//
// decode.h declares the class, decode.cpp runs it, bind.cpp binds it to Python.
#pragma once
#include "kernels.h"
#include <vector>

namespace dejavu {  // a layer's parts; DecodeStack itself keeps the global name bind.cpp gives Python

struct Packed {
  at::Tensor w;
  c10::optional<at::Tensor> bias;
  int64_t n;
  at::Tensor operator()(const at::Tensor& x) const { return linear(x, w, bias, n); }
};

struct DecodeLayer {
  Packed qkv, o, gate_up, down;
  at::Tensor ln1, ln2;
  double eps1, eps2;
  bool gate_up_fused;
  at::Tensor mlp_act(const at::Tensor& x) const {  // SiLU(gate) * up
    return gate_up_fused ? linear_silu_mul(x, gate_up.w, gate_up.bias, gate_up.n / 2) : silu_and_mul(gate_up(x));
  }
};

}  // namespace dejavu

class DecodeStack {
 public:
  DecodeStack(int64_t q_heads, int64_t kv_heads, int64_t head_dim, double scale);
  void add(at::Tensor qkv, c10::optional<at::Tensor> qkv_b, at::Tensor o, c10::optional<at::Tensor> o_b,
           at::Tensor gate_up, c10::optional<at::Tensor> gate_up_b, at::Tensor down,
           c10::optional<at::Tensor> down_b, int64_t n_qkv, int64_t n_o, int64_t n_gate_up, int64_t n_down,
           at::Tensor ln1, double eps1, at::Tensor ln2, double eps2, bool gate_up_fused);
  int64_t size() const { return static_cast<int64_t>(layers_.size()); }
  at::Tensor run(at::Tensor h, at::Tensor pool, at::Tensor slot_mapping, at::Tensor decode_slots,
                 at::Tensor decode_lengths, at::Tensor cos, at::Tensor sin) const;

 private:
  int64_t q_heads_, kv_heads_, head_dim_;
  double scale_;
  std::vector<dejavu::DecodeLayer> layers_;
};
