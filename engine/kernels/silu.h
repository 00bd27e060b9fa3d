// SiLU(gate) * up over n elements, rounded as Hugging Face's float32 / bf16 modules round it: the
// activation in q's dtype, then the product. One definition for `silu_and_mul` (pointwise.cpp) and
// the gate/up GEMM's epilogue (`linear_silu_mul`, linear.cpp), so both compute it the same way.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace dejavu {

// The bits of the bf16 nearest to x (ties to even), as c10::BFloat16(x) rounds, a NaN to its NaN;
// integer operations only, so a loop of them vectorizes (`#pragma omp simd`) where c10's does not.
inline uint16_t bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

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
