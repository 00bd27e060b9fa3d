// DecodeStack (decode.h): a decode step's decoder layers in one call.
#include "decode.h"

DecodeStack::DecodeStack(int64_t q_heads, int64_t kv_heads, int64_t head_dim, double scale)
    : q_heads_(q_heads), kv_heads_(kv_heads), head_dim_(head_dim), scale_(scale) {
  TORCH_CHECK(q_heads > 0 && kv_heads > 0 && q_heads % kv_heads == 0 && head_dim > 0 && head_dim % 2 == 0,
              "DecodeStack: heads and head_dim");
}

void DecodeStack::add(at::Tensor qkv, c10::optional<at::Tensor> qkv_b, at::Tensor o, c10::optional<at::Tensor> o_b,
                      at::Tensor gate_up, c10::optional<at::Tensor> gate_up_b, at::Tensor down,
                      c10::optional<at::Tensor> down_b, int64_t n_qkv, int64_t n_o, int64_t n_gate_up, int64_t n_down,
                      at::Tensor ln1, double eps1, at::Tensor ln2, double eps2, bool gate_up_fused) {
  TORCH_CHECK(n_qkv == (q_heads_ + 2 * kv_heads_) * head_dim_ && n_o == ln1.numel() && n_down == ln1.numel() &&
                  n_gate_up % 2 == 0 && ln2.numel() == ln1.numel(),
              "DecodeStack.add: a layer of another shape");
  layers_.push_back({{qkv, qkv_b, n_qkv}, {o, o_b, n_o}, {gate_up, gate_up_b, n_gate_up}, {down, down_b, n_down},
                     ln1, ln2, eps1, eps2, gate_up_fused});
}

at::Tensor DecodeStack::run(at::Tensor h, at::Tensor pool, at::Tensor slot_mapping, at::Tensor decode_slots,
                            at::Tensor decode_lengths, at::Tensor cos, at::Tensor sin) const {
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
    const dejavu::DecodeLayer& layer = layers_[i];
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
