// SiLU(gate) * up over n elements, rounded as Hugging Face's float32 / bf16 modules round it: the
// activation in q's dtype, then the product. One definition for `silu_and_mul` (pointwise.cpp) and
// the gate/up GEMM's epilogue (`linear_silu_mul`, linear.cpp), so both compute it the same way.
#pragma once
#include <cmath>
#include <cstdint>

namespace dejavu {

template <typename T>
inline void silu_mul_span(const T* g, const T* u, T* o, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float x = static_cast<float>(g[j]);
    const float act = static_cast<float>(static_cast<T>(x / (1.f + std::exp(-x))));
    o[j] = static_cast<T>(act * static_cast<float>(u[j]));
  }
}

}  // namespace dejavu
