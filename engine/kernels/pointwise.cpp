// The small ops of a Llama layer, fused, on CPU: each reads and writes its rows once, where
// PyTorch runs 5-8 ops (and as many passes and dispatches) for each. At a decode step of one
// sequence these ops were ~10% of the step's time, mostly dispatch; in a prefill, passes over
// memory. They follow Hugging Face's modules rounding for rounding: math in float32, the result of
// each op HF runs rounded to the tensor's dtype (a no-op in float32, where only the order of a sum
// can differ).
//
//   rms_norm(x, w, eps)             -> w * to_dtype(x * rsqrt(mean(x^2) + eps))      (N, H)
//   add_rms_norm(h, delta, w, eps)  -> h += delta in place, then rms_norm(h, w, eps)
//   rope_(x, cos, sin)              -> x = x * cos + rotate_half(x) * sin, in place   (N, heads, D)
//   silu_and_mul(gate_up)           -> silu(gate) * up, gate_up = [gate | up]          (N, 2I) -> (N, I)
#include "kernels.h"
#include "parallel.h"
#include "silu.h"
#include <immintrin.h>
#include <cmath>
#include <vector>

#if defined(__clang__)
#define DEJAVU_ONE_COPY __attribute__((noinline))
#else
#define DEJAVU_ONE_COPY __attribute__((noinline, noclone))
#endif

namespace {

constexpr int64_t GRAIN = 1 << 15;  // elements: below this one thread (a decode batch), no fork

template <typename T>
inline T round_to(float x) { return static_cast<T>(x); }

int64_t rows_grain(int64_t width) { return std::max<int64_t>(1, GRAIN / std::max<int64_t>(width, 1)); }

// A row's arithmetic is a function of its own, never inlined: parallel_for calls its body on the
// calling thread for a few rows and inside its OpenMP region for more, and an inlined body is two
// copies of the loop that -ffast-math lets the compiler sum and contract (FMA) each its own way. A
// row then came out another way beside many rows than alone: a decode row's norm in a step mixed
// with a prefill chunk differed in the last bit from the same row's in a decode-only step (25 of
// 203 rows of SmolLM2's hidden states), and in bf16 that moved greedy picks. One copy: a row's
// result is the same in a batch of any size (tests/unit/test_runner.py). noclone too: a clone for a
// call site's constant argument (delta null) would be a second copy again.
template <typename T>
DEJAVU_ONE_COPY void rms_row(T* x, const T* d, const T* w, T* o, int64_t H, float eps) {
  if (d != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) x[j] = round_to<T>(static_cast<float>(x[j]) + static_cast<float>(d[j]));
  }
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t j = 0; j < H; ++j) {
    const float f = static_cast<float>(x[j]);
    ss += f * f;
  }
  const float r = 1.f / std::sqrt(ss / static_cast<float>(H) + eps);
#pragma omp simd
  for (int64_t j = 0; j < H; ++j)
    o[j] = round_to<T>(static_cast<float>(w[j]) * static_cast<float>(round_to<T>(static_cast<float>(x[j]) * r)));
}

template <typename T>
void rms_rows(T* h, const T* delta, const T* w, T* out, int64_t N, int64_t H, int64_t h_row, int64_t d_row,
              float eps) {
  dejavu::parallel_for(0, N, rows_grain(H), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      rms_row<T>(h + i * h_row, delta != nullptr ? delta + i * d_row : nullptr, w, out + i * H, H, eps);
  });
}

// One position's heads (see rms_row for why not inlined); `in`: D floats of scratch.
template <typename T>
DEJAVU_ONE_COPY void rope_row(T* x, const T* c, const T* s, int64_t heads, int64_t D, float* in) {
  const int64_t half = D / 2;
  for (int64_t hd = 0; hd < heads; ++hd) {
    T* v = x + hd * D;
    for (int64_t j = 0; j < D; ++j) in[j] = static_cast<float>(v[j]);
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) {
      const float rot = j < half ? -in[j + half] : in[j - half];
      const float a = static_cast<float>(round_to<T>(in[j] * static_cast<float>(c[j])));
      const float b = static_cast<float>(round_to<T>(rot * static_cast<float>(s[j])));
      v[j] = round_to<T>(a + b);
    }
  }
}

template <typename T>
void rope_rows(T* x, const T* cos, const T* sin, int64_t N, int64_t heads, int64_t D, int64_t x_row) {
  dejavu::parallel_for(0, N, rows_grain(heads * D), [&](int64_t begin, int64_t end) {
    std::vector<float> in(D);
    for (int64_t i = begin; i < end; ++i) rope_row<T>(x + i * x_row, cos + i * D, sin + i * D, heads, D, in.data());
  });
}

template <typename T>
void silu_mul_rows(const T* gu, T* out, int64_t N, int64_t I) {  // a row: spans of silu.h's one copy
  dejavu::parallel_for(0, N, rows_grain(2 * I), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) dejavu::silu_mul_span(gu + i * 2 * I, gu + i * 2 * I + I, out + i * I, I);
  });
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": CPU tensors only");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name, ": float32 or bfloat16, not ",
              t.scalar_type());
  TORCH_CHECK(t.dim() >= 2 && t.stride(-1) == 1, name, ": rows with contiguous elements");
}

template <typename F>
void on_dtype(const at::Tensor& t, F&& f) {
  if (t.scalar_type() == at::kFloat) f(float{});
  else f(at::BFloat16{});
}

at::Tensor norm(at::Tensor h, const c10::optional<at::Tensor>& delta, const at::Tensor& w, double eps) {
  check_rows(h, "rms_norm");
  TORCH_CHECK(h.dim() == 2 && w.dim() == 1 && w.size(0) == h.size(1) && w.is_contiguous(), "rms_norm: x (N, H), w (H,)");
  TORCH_CHECK(w.scalar_type() == h.scalar_type(), "rms_norm: one dtype");
  if (delta) {
    check_rows(*delta, "add_rms_norm");
    TORCH_CHECK(delta->sizes() == h.sizes() && delta->scalar_type() == h.scalar_type(), "add_rms_norm: delta like h");
  }
  auto out = at::empty({h.size(0), h.size(1)}, h.options());
  on_dtype(h, [&](auto tag) {
    using T = decltype(tag);
    rms_rows<T>(h.data_ptr<T>(), delta ? delta->data_ptr<T>() : nullptr, w.data_ptr<T>(), out.data_ptr<T>(), h.size(0),
                h.size(1), h.stride(0), delta ? delta->stride(0) : 0, static_cast<float>(eps));
  });
  return out;
}

}  // namespace

namespace dejavu {

// silu.h's one copy of SiLU(gate) * up, rounded as Hugging Face's float32 / bf16 modules round it:
// the activation in the input's dtype, then the product.
DEJAVU_ONE_COPY void silu_mul_spans(const float* g, const float* u, float* o, int64_t count, int64_t step,
                                    int64_t o_step) {
  for (int64_t i = 0; i < count; ++i, g += step, u += step, o += o_step) {
#pragma omp simd
    for (int64_t j = 0; j < SILU_SPAN; ++j) {
      const float x = g[j];
      o[j] = x / (1.f + std::exp(-x)) * u[j];
    }
  }
}

// bf16: widened first, so that the arithmetic is a loop of floats, vectorized as float32's is (in
// one loop with the 16-bit loads and stores, GCC took half-width vectors and a coarser reciprocal for
// the division, which moved 3 of 307,200 results off PyTorch's bf16 F.silu(gate) * up). On AVX-512
// the widening is one 512-bit store each: GCC's loop stored halves that the next loop read back
// whole, a store-forwarding stall that made this 3x slower (a span alone, 768k elements).
DEJAVU_ONE_COPY void silu_mul_spans(const uint16_t* g, const uint16_t* u, uint16_t* o, int64_t count, int64_t step,
                                    int64_t o_step) {
  static_assert(SILU_SPAN == 16, "a span is one 512-bit vector of floats");
  alignas(64) float x[SILU_SPAN], up[SILU_SPAN];
  for (int64_t i = 0; i < count; ++i, g += step, u += step, o += o_step) {
#if defined(__AVX512F__)
    const auto widen = [](const uint16_t* b) {
      return _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b))), 16);
    };
    _mm512_store_si512(x, widen(g));
    _mm512_store_si512(up, widen(u));
#else
#pragma omp simd
    for (int64_t j = 0; j < SILU_SPAN; ++j) {
      x[j] = bf16_widen(g[j]);
      up[j] = bf16_widen(u[j]);
    }
#endif
#pragma omp simd
    for (int64_t j = 0; j < SILU_SPAN; ++j) x[j] = bf16_round(x[j] / (1.f + std::exp(-x[j]))) * up[j];
#pragma omp simd
    for (int64_t j = 0; j < SILU_SPAN; ++j) o[j] = bf16_bits(x[j]);
  }
}

}  // namespace dejavu

at::Tensor rms_norm(at::Tensor x, at::Tensor w, double eps) { return norm(x, c10::nullopt, w, eps); }

at::Tensor add_rms_norm(at::Tensor h, at::Tensor delta, at::Tensor w, double eps) {
  return norm(h, delta, w, eps);
}

void rope_(at::Tensor x, at::Tensor cos, at::Tensor sin) {
  check_rows(x, "rope_");
  TORCH_CHECK(x.dim() == 3 && x.stride(1) == x.size(2) && x.size(2) % 2 == 0, "rope_: x (N, heads, D), heads packed");
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == x.size(0) && cos.size(1) == x.size(2) && cos.is_contiguous() &&
              sin.sizes() == cos.sizes() && sin.is_contiguous(), "rope_: cos and sin (N, D), contiguous");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(), "rope_: one dtype");
  on_dtype(x, [&](auto tag) {
    using T = decltype(tag);
    rope_rows<T>(x.data_ptr<T>(), cos.data_ptr<T>(), sin.data_ptr<T>(), x.size(0), x.size(1), x.size(2), x.stride(0));
  });
}

at::Tensor silu_and_mul(at::Tensor gate_up) {
  check_rows(gate_up, "silu_and_mul");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.is_contiguous() && gate_up.size(1) % 2 == 0, "silu_and_mul: (N, 2I), contiguous");
  const int64_t I = gate_up.size(1) / 2;
  auto out = at::empty({gate_up.size(0), I}, gate_up.options());
  on_dtype(gate_up, [&](auto tag) {
    using T = decltype(tag);
    silu_mul_rows<T>(gate_up.data_ptr<T>(), out.data_ptr<T>(), gate_up.size(0), I);
  });
  return out;
}
