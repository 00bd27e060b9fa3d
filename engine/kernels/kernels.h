// The kernels' C++ functions, declared once: bind.cpp binds them to Python, decode.cpp calls them.
#pragma once
#include "tensor.h"
#include <string>
#include <vector>

// paged_attention.cpp
at::Tensor paged_decode_attention(at::Tensor q, at::Tensor k_pool, at::Tensor v_pool, at::Tensor slots,
                                  at::Tensor lengths, double scale);
at::Tensor causal_attention(at::Tensor q, at::Tensor k, at::Tensor v, int64_t start, double scale);

// pointwise.cpp
at::Tensor rms_norm(at::Tensor x, at::Tensor w, double eps);
at::Tensor add_rms_norm(at::Tensor h, at::Tensor delta, at::Tensor w, double eps);
void rope_(at::Tensor x, at::Tensor cos, at::Tensor sin);
at::Tensor silu_and_mul(at::Tensor gate_up);

// linear.cpp
at::Tensor pack_linear(at::Tensor w);
at::Tensor linear(at::Tensor x, at::Tensor packed, c10::optional<at::Tensor> bias, int64_t N);
at::Tensor gate_up_order(at::Tensor w);
at::Tensor pack_gate_up(at::Tensor w);
at::Tensor linear_silu_mul(at::Tensor x, at::Tensor packed, c10::optional<at::Tensor> bias, int64_t I);
std::vector<std::string> linear_dtypes();
bool linear_bf16_widened();
