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
#include <torch/extension.h>
#include <vector>

// paged_attention.cpp, pointwise.cpp, linear.cpp
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_pool, torch::Tensor v_pool, torch::Tensor slots,
                                     torch::Tensor lengths, double scale);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps);
torch::Tensor add_rms_norm(torch::Tensor h, torch::Tensor delta, torch::Tensor w, double eps);
void rope_(torch::Tensor x, torch::Tensor cos, torch::Tensor sin);
torch::Tensor silu_and_mul(torch::Tensor gate_up);
torch::Tensor linear(torch::Tensor x, torch::Tensor packed, c10::optional<torch::Tensor> bias, int64_t N);
torch::Tensor linear_silu_mul(torch::Tensor x, torch::Tensor packed, c10::optional<torch::Tensor> bias, int64_t I);

namespace {

struct Packed {
  torch::Tensor w;
  c10::optional<torch::Tensor> bias;
  int64_t n;
  torch::Tensor operator()(const torch::Tensor& x) const { return linear(x, w, bias, n); }
};

struct DecodeLayer {
  Packed qkv, o, gate_up, down;
  torch::Tensor ln1, ln2;
  double eps1, eps2;
  bool gate_up_fused;
  torch::Tensor mlp_act(const torch::Tensor& x) const {  // SiLU(gate) * up
    return gate_up_fused ? linear_silu_mul(x, gate_up.w, gate_up.bias, gate_up.n / 2) : silu_and_mul(gate_up(x));
  }
};

}  // namespace

class DecodeStack {
 public:
  DecodeStack(int64_t q_heads, int64_t kv_heads, int64_t head_dim, double scale)
      : q_heads_(q_heads), kv_heads_(kv_heads), head_dim_(head_dim), scale_(scale) {
    TORCH_CHECK(q_heads > 0 && kv_heads > 0 && q_heads % kv_heads == 0 && head_dim > 0 && head_dim % 2 == 0,
                "DecodeStack: heads and head_dim");
  }

  void add(torch::Tensor qkv, c10::optional<torch::Tensor> qkv_b, torch::Tensor o, c10::optional<torch::Tensor> o_b,
           torch::Tensor gate_up, c10::optional<torch::Tensor> gate_up_b, torch::Tensor down,
           c10::optional<torch::Tensor> down_b, int64_t n_qkv, int64_t n_o, int64_t n_gate_up, int64_t n_down,
           torch::Tensor ln1, double eps1, torch::Tensor ln2, double eps2, bool gate_up_fused) {
    TORCH_CHECK(n_qkv == (q_heads_ + 2 * kv_heads_) * head_dim_ && n_o == ln1.numel() && n_down == ln1.numel() &&
                    n_gate_up % 2 == 0 && ln2.numel() == ln1.numel(),
                "DecodeStack.add: a layer of another shape");
    layers_.push_back({{qkv, qkv_b, n_qkv}, {o, o_b, n_o}, {gate_up, gate_up_b, n_gate_up}, {down, down_b, n_down},
                       ln1, ln2, eps1, eps2, gate_up_fused});
  }

  int64_t size() const { return static_cast<int64_t>(layers_.size()); }

  torch::Tensor run(torch::Tensor h, torch::Tensor pool, torch::Tensor slot_mapping, torch::Tensor decode_slots,
                    torch::Tensor decode_lengths, torch::Tensor cos, torch::Tensor sin) const {
    const int64_t B = h.size(0), D = head_dim_, Hq = q_heads_, Hkv = kv_heads_;
    TORCH_CHECK(!layers_.empty(), "DecodeStack.run: no layers");
    TORCH_CHECK(h.dim() == 2 && h.is_contiguous() && h.size(1) == layers_[0].ln1.numel(), "DecodeStack.run: h (B, hidden)");
    TORCH_CHECK(pool.dim() == 5 && pool.size(0) == size() && pool.size(1) == 2 && pool.size(3) == Hkv &&
                    pool.size(4) == D,
                "DecodeStack.run: a pool (layers, 2, slots, kv_heads, head_dim) of this stack");
    TORCH_CHECK(slot_mapping.numel() == B && decode_lengths.numel() == B && decode_slots.size(0) == B,
                "DecodeStack.run: one slot, length and slot row per sequence");
    auto x = rms_norm(h, layers_[0].ln1, layers_[0].eps1);
    for (int64_t i = 0; i < size(); ++i) {
      const DecodeLayer& layer = layers_[i];
      auto qkv = layer.qkv(x);                                              // (B, (Hq + 2 Hkv) D)
      auto q = qkv.narrow(1, 0, Hq * D).view({B, Hq, D});
      auto k = qkv.narrow(1, Hq * D, Hkv * D).view({B, Hkv, D});
      auto v = qkv.narrow(1, (Hq + Hkv) * D, Hkv * D).view({B, Hkv, D});
      rope_(q, cos, sin);
      rope_(k, cos, sin);
      auto pool_k = pool[i][0], pool_v = pool[i][1];
      pool_k.index_copy_(0, slot_mapping, k);
      pool_v.index_copy_(0, slot_mapping, v);
      auto o = paged_decode_attention(q.contiguous(), pool_k, pool_v, decode_slots, decode_lengths, scale_);
      x = add_rms_norm(h, layer.o(o.view({B, Hq * D})), layer.ln2, layer.eps2);  // h += o; x = norm(h)
      auto mlp = layer.down(layer.mlp_act(x));
      if (i + 1 < size())
        x = add_rms_norm(h, mlp, layers_[i + 1].ln1, layers_[i + 1].eps1);
      else
        h.add_(mlp);
    }
    return h;
  }

 private:
  int64_t q_heads_, kv_heads_, head_dim_;
  double scale_;
  std::vector<DecodeLayer> layers_;
};

void bind_decode_stack(pybind11::module& m) {
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;
  pybind11::class_<DecodeStack>(m, "DecodeStack")
      .def(pybind11::init<int64_t, int64_t, int64_t, double>())
      .def("add", &DecodeStack::add, "append a decoder layer's packed weights and norms")
      .def("__len__", &DecodeStack::size)
      .def("run", &DecodeStack::run, "a decode step's decoder layers; h updated in place and returned", release());
}
