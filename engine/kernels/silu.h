// SiLU(gate) * up, rounded as Hugging Face's float32 / bf16 modules round it: the activation in the
// input's dtype, then the product. One copy of the arithmetic (silu_mul_spans, defined in
// pointwise.cpp) for `silu_and_mul` and the gate/up GEMM's epilogue (`linear_silu_mul`, linear.cpp),
// so both compute it the same way; and the bf16 rounding helpers both use.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace dejavu {

// The bits of the bf16 nearest to x (ties to even), as c10::BFloat16(x) rounds, a NaN to its NaN;
// integer operations only, so a loop of them vectorizes (`#pragma omp simd`) where c10's does not.
inline uint16_t bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

inline float bf16_widen(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

inline float bf16_round(float x) { return bf16_widen(bf16_bits(x)); }

// SiLU(g) * u over `count` spans of SILU_SPAN elements, span i at g + i * step, u + i * step and
// o + i * o_step: the one copy of this arithmetic in the build (pointwise.cpp, never inlined), which
// both `silu_and_mul` (a row's spans) and the gate/up GEMM's epilogue (a tile's rows) call. Two
// inlined copies of one loop were compiled each its own way (-ffast-math: vector widths, the
// division's reciprocal): on an AVX-512 Xeon the two paths differed in the last bit for a few inputs
// in 100k, so a layer's output depended on which one it took. float, or bf16 by its bits.
inline constexpr int64_t SILU_SPAN = 16;
void silu_mul_spans(const float* g, const float* u, float* o, int64_t count, int64_t step, int64_t o_step);
void silu_mul_spans(const uint16_t* g, const uint16_t* u, uint16_t* o, int64_t count, int64_t step, int64_t o_step);

// SiLU(g) * u over n elements, T float or a bf16 type (c10::BFloat16) taken by its bits (c10's
// conversions kept the loop scalar: a bf16 silu_and_mul of 500 x 3072 took 4.1 ms against
// float32's 2.0). A last span short of SILU_SPAN goes through the same function, padded.
template <typename T>
inline void silu_mul_span(const T* g, const T* u, T* o, int64_t n) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 2, "float32 or bf16");
  using Bits = std::conditional_t<sizeof(T) == 4, float, uint16_t>;
  const auto* gb = reinterpret_cast<const Bits*>(g);
  const auto* ub = reinterpret_cast<const Bits*>(u);
  auto* ob = reinterpret_cast<Bits*>(o);
  const int64_t whole = n / SILU_SPAN * SILU_SPAN;
  if (whole > 0) silu_mul_spans(gb, ub, ob, whole / SILU_SPAN, SILU_SPAN, SILU_SPAN);
  if (whole < n) {
    Bits gt[SILU_SPAN] = {}, ut[SILU_SPAN] = {}, ot[SILU_SPAN];
    std::memcpy(gt, gb + whole, (n - whole) * sizeof(Bits));
    std::memcpy(ut, ub + whole, (n - whole) * sizeof(Bits));
    silu_mul_spans(gt, ut, ot, 1, SILU_SPAN, SILU_SPAN);
    std::memcpy(ob + whole, ot, (n - whole) * sizeof(Bits));
  }
}

}  // namespace dejavu
