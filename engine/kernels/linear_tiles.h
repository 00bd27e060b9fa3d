// The microkernels of linear.cpp, one per instruction set: tile_f32 and tile_bf16 compute up to TM
// rows x PANELS panels of 16 columns of y = x W^T + b, their accumulators in registers over the whole
// of K (linear.cpp's header says how the weights are packed and the work split).
//
// Which tiles a build has follows the CPU it is compiled for (-march=native), and says so in macros:
//   DEJAVU_LINEAR_F32           float32: AVX-512, or AVX2 + FMA
//   DEJAVU_LINEAR_BF16          bfloat16: AVX-512 with AVX512-FP16 (FMAs on widened weights),
//                               AVX512-BF16 (VDPBF16PS), or AVX2 + FMA without AVX-512
//   DEJAVU_LINEAR_BF16_WIDENED  the first and the last: bf16 weights widened to float32 in
//                               registers; x float32 (linear.cpp widens it once a call)
//   DEJAVU_LINEAR_BF16_TILE_ROUNDS  of those, AVX-512's: linear's y rounded to bf16 in the tile
//                               (store_bf16; AVX2's y is float32, rounded after); the gate/up
//                               epilogue still takes the tile's float32 sums
// with the tile shapes each takes (TM_*, PANELS_*). tests/unit/test_kernel_isa_branches.py compiles
// every branch of this ladder.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace dejavu::tiles {

constexpr int PANELS_F32 = 1;

#if defined(__AVX512F__)
#define DEJAVU_LINEAR_F32 1
constexpr int TM_F32 = 8;
// A float32 prefill (more than 32 rows): three panels x 8 rows where each core has two 512-bit FMA
// units, Intel's since Sapphire Rapids (AVX512-FP16 marks them in this build): 24 accumulator
// chains against 8, which is just the FMAs' latency times their throughput there. On a 2-core
// Xeon (family 6, model 207) SmolLM2's linears at 500 rows took 346-353 ms with two panels x 12
// rows instead of 544, 0.94x oneDNN's instead of 0.63x (dejavu bench gemm's paired ratios, December
// 7). Three panels x 8 rows load 11 vectors (3 of weights, 8 broadcasts of x) for 24 FMAs where two
// x 12 load 14: 1.15-1.19x the GFLOP/s of two x 12 in a C++ loop of SmolLM2's four linears on that
// Xeon (four panels x 6 rows: 1.12-1.15x; three x 9 and two x 14: 1.0x; blocking K so that a group's
// panels stay in L1: no gain; x packed in rows of 12: slower). Elsewhere one panel x 8 rows: on Zen
// 4, whose 512-bit FMAs are double-pumped, two panels lost (linear.cpp's header).
#if defined(__AVX512FP16__)
constexpr int PANELS_F32_PREFILL = 3, TM_F32_PREFILL = 8;
#else
constexpr int PANELS_F32_PREFILL = 1, TM_F32_PREFILL = 8;
#endif
// The panels of a tile's end, for every AVX-512 tile: store(p, n, mask, b) for panel p, its first
// column n, the mask of its columns before N and its 16 biases (zeros where there is no bias).
template <int PANELS, typename Store>
__attribute__((always_inline)) inline void each_panel(const float* bias, int64_t n0, int64_t N, Store&& store) {
  for (int p = 0; p < PANELS; ++p) {
    const int64_t n = n0 + 16 * p;
    if (n >= N) break;
    const __mmask16 mask = N - n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (N - n)) - 1);
    store(p, n, mask, bias ? _mm512_maskz_loadu_ps(mask, bias + n) : _mm512_setzero_ps());
  }
}
// The end of a tile whose float32 sums are in acc: y = acc + bias, the columns of a panel at or
// past N left alone (a last panel cut short; a panel of the zero padding).
template <int TM, int PANELS>
__attribute__((always_inline)) inline void store_f32(const __m512 (&acc)[PANELS][TM], const float* bias, float* y,
                                                     int64_t ldy, int64_t n0, int64_t N) {
  each_panel<PANELS>(bias, n0, N, [&](int p, int64_t n, __mmask16 mask, __m512 b) {
    for (int m = 0; m < TM; ++m) _mm512_mask_storeu_ps(y + m * ldy + n, mask, _mm512_add_ps(acc[p][m], b));
  });
}

// float32: panel (K, 16); one FMA per weight vector and row.
template <int TM, int PANELS>
void tile_f32(const float* x, int64_t K, const float* w, const float* bias, float* y, int64_t ldy,
              int64_t n0, int64_t N) {
  __m512 acc[PANELS][TM];
  for (int p = 0; p < PANELS; ++p)
    for (int m = 0; m < TM; ++m) acc[p][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 wv[PANELS];
    for (int p = 0; p < PANELS; ++p) {
      const float* wp = w + p * K * 16 + k * 16;
      wv[p] = _mm512_loadu_ps(wp);
      _mm_prefetch(reinterpret_cast<const char*>(wp + 256), _MM_HINT_T0);  // 1 KiB ahead
    }
    for (int m = 0; m < TM; ++m) {
      const __m512 xv = _mm512_set1_ps(x[m * K + k]);
      for (int p = 0; p < PANELS; ++p) acc[p][m] = _mm512_fmadd_ps(xv, wv[p], acc[p][m]);
    }
  }
  store_f32<TM, PANELS>(acc, bias, y, ldy, n0, N);
}
#elif defined(__AVX2__) && defined(__FMA__)
#define DEJAVU_LINEAR_F32 1
// AVX2 + FMA (no AVX-512: Zen 2/3, older Xeons): a panel's 16 columns are two 8-float vectors, the
// packing and the work items as in linear.cpp. 6 rows: 12 accumulators, 2 weight vectors and the broadcast
// row element take 15 of the 16 ymm registers (8 rows spilled). oneDNN's float32 GEMM on AVX2
// streams the weights slower at decode's few rows (dejavu bench gemm, docs/BENCHMARKS.md §5).
constexpr int TM_F32 = 6;
constexpr int PANELS_F32_PREFILL = 1, TM_F32_PREFILL = 6;  // AVX2's 16 registers: no room for more
template <int TM, int PANELS>
void tile_f32(const float* x, int64_t K, const float* w, const float* bias, float* y, int64_t ldy,
              int64_t n0, int64_t N) {
  __m256 lo[PANELS][TM], hi[PANELS][TM];
  for (int p = 0; p < PANELS; ++p)
    for (int m = 0; m < TM; ++m) lo[p][m] = hi[p][m] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m256 wl[PANELS], wh[PANELS];
    for (int p = 0; p < PANELS; ++p) {
      const float* wp = w + p * K * 16 + k * 16;
      wl[p] = _mm256_loadu_ps(wp);
      wh[p] = _mm256_loadu_ps(wp + 8);
      _mm_prefetch(reinterpret_cast<const char*>(wp + 256), _MM_HINT_T0);  // 1 KiB ahead
    }
    for (int m = 0; m < TM; ++m) {
      const __m256 xv = _mm256_broadcast_ss(x + m * K + k);
      for (int p = 0; p < PANELS; ++p) {
        lo[p][m] = _mm256_fmadd_ps(xv, wl[p], lo[p][m]);
        hi[p][m] = _mm256_fmadd_ps(xv, wh[p], hi[p][m]);
      }
    }
  }
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int p = 0; p < PANELS; ++p) {
    for (int half = 0; half < 2; ++half) {
      const int64_t n = n0 + 16 * p + 8 * half;
      if (n >= N) break;
      const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(N - n, 8))), lane);
      const __m256 b = bias ? _mm256_maskload_ps(bias + n, mask) : _mm256_setzero_ps();
      for (int m = 0; m < TM; ++m)
        _mm256_maskstore_ps(y + m * ldy + n, mask, _mm256_add_ps(half ? hi[p][m] : lo[p][m], b));
    }
  }
}
#endif

#if defined(__AVX512F__) && defined(__AVX512FP16__)
#define DEJAVU_LINEAR_BF16 1
#define DEJAVU_LINEAR_BF16_WIDENED 1
// bfloat16 on an Intel core with two 512-bit FMA units (AVX512-FP16 marks them in this build, as for
// the float32 prefill tile above): there VDPBF16PS runs at half the FMA rate, one every two cycles
// a core (C loops of independent chains on a 2-core Xeon, family 6, model 207: 203 GFLOP/s against
// 423 of float32 FMAs), and a bf16 prefill through it took longer than a float32 one (630 against 394
// ms for 500 tokens of SmolLM2). So the weights, bf16 in memory, are widened in registers as AVX2's
// tile below widens them (the even k of a packed pair: the lane shifted left by 16; the odd k: its
// low half cleared) and multiplied by FMAs; x is widened to float32 once per call and y rounded to
// bf16 once, to nearest even, by the tile itself (store_bf16): each output is the float32 GEMM of the
// same bf16 values, rounded, whatever the rows or the tile. In that C loop of SmolLM2's four linears
// at 500 rows: 322 GFLOP/s against 203 through VDPBF16PS. Tiles: two panels x 12 rows up to 32 rows,
// three x 8 beyond.
#define DEJAVU_LINEAR_BF16_TILE_ROUNDS 1  // y is bf16: tile_bf16 rounds it (AVX2's: linear.cpp, after)
constexpr int PANELS_BF16 = 2, TM_BF16 = 12, PANELS_BF16_PREFILL = 3, TM_BF16_PREFILL = 8;
// The end of a widening tile into bf16: y = bf16(acc + bias), the columns at or past N left alone.
// Rounded as silu.h's bf16_bits (which the gate/up epilogue takes), to nearest even, NaN as 0x7FC0:
// PyTorch's float -> bf16 for every other value, denormals included, which VCVTNEPS2BF16 flushes to
// zero. In the tile rather than a pass over a float32 y (at::Tensor::to) after it: a 500-token bf16
// prefill of SmolLM2 wrote and read 32M floats more that way, a decode row paid another dispatch.
template <int TM, int PANELS>
__attribute__((always_inline)) inline void store_bf16(const __m512 (&acc)[PANELS][TM], const float* bias, uint16_t* y,
                                                      int64_t ldy, int64_t n0, int64_t N) {
  const __m512i one = _mm512_set1_epi32(1), bias16 = _mm512_set1_epi32(0x7FFF), magnitude = _mm512_set1_epi32(0x7FFFFFFF);
  const __m512i inf = _mm512_set1_epi32(0x7F800000), nan = _mm512_set1_epi32(0x7FC0);
  each_panel<PANELS>(bias, n0, N, [&](int p, int64_t n, __mmask16 mask, __m512 b) {
    for (int m = 0; m < TM; ++m) {
      const __m512i u = _mm512_castps_si512(_mm512_add_ps(acc[p][m], b));
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
      __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, bias16), lsb), 16);
      r = _mm512_mask_mov_epi32(r, _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, magnitude), inf), nan);
      _mm512_mask_cvtepi32_storeu_epi16(y + m * ldy + n, mask, r);  // AVX512F alone (VPMOVDW to memory)
    }
  });
}
// Y: float (the gate/up epilogue's scratch, which rounds after the sums of its pairs) or uint16_t
// (bf16's bits: linear's y, rounded here).
template <int TM, int PANELS, typename Y>
void tile_bf16(const float* x, int64_t K, const uint16_t* w, const float* bias, Y* y, int64_t ldy,
               int64_t n0, int64_t N) {
  __m512 acc[PANELS][TM];
  for (int p = 0; p < PANELS; ++p)
    for (int m = 0; m < TM; ++m) acc[p][m] = _mm512_setzero_ps();
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const int64_t pairs = K / 2;
  for (int64_t kp = 0; kp < pairs; ++kp) {
    __m512i wv[PANELS];
    for (int p = 0; p < PANELS; ++p) {
      const uint16_t* wp = w + p * K * 16 + kp * 32;
      wv[p] = _mm512_loadu_si512(wp);
      _mm_prefetch(reinterpret_cast<const char*>(wp + 512), _MM_HINT_T0);  // 1 KiB ahead
    }
    for (int m = 0; m < TM; ++m) {  // the even k
      const __m512 xv = _mm512_set1_ps(x[m * K + 2 * kp]);
      for (int p = 0; p < PANELS; ++p)
        acc[p][m] = _mm512_fmadd_ps(xv, _mm512_castsi512_ps(_mm512_slli_epi32(wv[p], 16)), acc[p][m]);
    }
    for (int m = 0; m < TM; ++m) {  // the odd k
      const __m512 xv = _mm512_set1_ps(x[m * K + 2 * kp + 1]);
      for (int p = 0; p < PANELS; ++p)
        acc[p][m] = _mm512_fmadd_ps(xv, _mm512_castsi512_ps(_mm512_and_si512(wv[p], high)), acc[p][m]);
    }
  }
  if constexpr (std::is_same_v<Y, float>)
    store_f32<TM, PANELS>(acc, bias, y, ldy, n0, N);
  else
    store_bf16<TM, PANELS>(acc, bias, y, ldy, n0, N);
}
#elif defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define DEJAVU_LINEAR_BF16 1
// bfloat16: panel (K/2, 16, 2); one VDPBF16PS (two products a lane) per weight vector and row.
template <int TM, int PANELS>
void tile_bf16(const uint16_t* x, int64_t K, const uint16_t* w, const float* bias, uint16_t* y, int64_t ldy,
               int64_t n0, int64_t N) {
  __m512 acc[PANELS][TM];
  for (int p = 0; p < PANELS; ++p)
    for (int m = 0; m < TM; ++m) acc[p][m] = _mm512_setzero_ps();
  const int64_t pairs = K / 2;
  for (int64_t kp = 0; kp < pairs; ++kp) {
    __m512bh wv[PANELS];
    for (int p = 0; p < PANELS; ++p) {
      const uint16_t* wp = w + p * K * 16 + kp * 32;
      wv[p] = (__m512bh)_mm512_loadu_si512(wp);
      _mm_prefetch(reinterpret_cast<const char*>(wp + 512), _MM_HINT_T0);  // 1 KiB ahead
    }
    for (int m = 0; m < TM; ++m) {
      int32_t pair;
      std::memcpy(&pair, x + m * K + 2 * kp, sizeof pair);
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
      for (int p = 0; p < PANELS; ++p) acc[p][m] = _mm512_dpbf16_ps(acc[p][m], xv, wv[p]);
    }
  }
  each_panel<PANELS>(bias, n0, N, [&](int p, int64_t n, __mmask16 mask, __m512 b) {
    for (int m = 0; m < TM; ++m) {
      const __m256bh out = _mm512_cvtneps_pbh(_mm512_add_ps(acc[p][m], b));  // round to nearest even
      _mm256_mask_storeu_epi16(y + m * ldy + n, mask, (__m256i)out);
    }
  });
}
constexpr int PANELS_BF16 = 2, TM_BF16 = 12, PANELS_BF16_PREFILL = 2, TM_BF16_PREFILL = 8;
#elif defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#define DEJAVU_LINEAR_BF16 1
#define DEJAVU_LINEAR_BF16_WIDENED 1
// bfloat16 on AVX2 + FMA without AVX-512 (Zen 2/3, Haswell to Comet Lake), where oneDNN cannot
// prepack bf16 and the engine fell to F.linear: a 16-row decode step took 3.5x the float32 one's
// time (dejavu bench step, docs/BENCHMARKS.md §5). (With AVX-512 but no AVX512-BF16, oneDNN runs
// bf16 and keeps it: this tile is unmeasured there.) The weights stay bf16 in memory, half the
// bytes a decode step streams, and are widened in registers: a bf16 is the top half of a float32,
// so the even k of a packed pair is the 32-bit lane shifted left by 16 and the odd k the lane with
// its low half cleared (two shifts). x is widened to float32 once per call (linear,
// linear_silu_mul); products and sums are float32, the result rounded to bf16 once, to nearest
// even, as oneDNN's and the AVX512-BF16 tile's. One panel (16 columns) x 6 rows: 12 accumulators.
constexpr int PANELS_BF16 = 1, TM_BF16 = 6, PANELS_BF16_PREFILL = 1, TM_BF16_PREFILL = 6;
template <int TM, int PANELS>
void tile_bf16(const float* x, int64_t K, const uint16_t* w, const float* bias, float* y, int64_t ldy,
               int64_t n0, int64_t N) {
  static_assert(PANELS == 1, "the widening tile takes one panel");
  __m256 lo[TM], hi[TM];
  _Pragma("GCC unroll 16") for (int m = 0; m < TM; ++m) lo[m] = hi[m] = _mm256_setzero_ps();
  const int64_t pairs = K / 2;
  for (int64_t kp = 0; kp < pairs; ++kp) {
    const uint16_t* wp = w + kp * 32;
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp));       // columns 0-7, k pairs
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + 16));  // columns 8-15
    _mm_prefetch(reinterpret_cast<const char*>(wp + 512), _MM_HINT_T0);  // 1 KiB ahead
    const __m256 el = _mm256_castsi256_ps(_mm256_slli_epi32(a, 16)), eh = _mm256_castsi256_ps(_mm256_slli_epi32(b, 16));
    _Pragma("GCC unroll 16") for (int m = 0; m < TM; ++m) {
      const __m256 xv = _mm256_broadcast_ss(x + m * K + 2 * kp);
      lo[m] = _mm256_fmadd_ps(xv, el, lo[m]);
      hi[m] = _mm256_fmadd_ps(xv, eh, hi[m]);
    }
    // the low halves cleared by two shifts, not a mask: a mask's register spills the accumulators
    const __m256 ol = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_srli_epi32(a, 16), 16));
    const __m256 oh = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_srli_epi32(b, 16), 16));
    _Pragma("GCC unroll 16") for (int m = 0; m < TM; ++m) {
      const __m256 xv = _mm256_broadcast_ss(x + m * K + 2 * kp + 1);
      lo[m] = _mm256_fmadd_ps(xv, ol, lo[m]);
      hi[m] = _mm256_fmadd_ps(xv, oh, hi[m]);
    }
  }
  // each half stored in a loop of its own: choosing lo or hi by a variable (as tile_f32 does) made
  // GCC 12 keep the accumulators on the stack here, stored on every k (1.6-1.8x slower)
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i mask_lo = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(N - n0, 8))), lane);
  const __m256 b_lo = bias ? _mm256_maskload_ps(bias + n0, mask_lo) : _mm256_setzero_ps();
  _Pragma("GCC unroll 16") for (int m = 0; m < TM; ++m) _mm256_maskstore_ps(y + m * ldy + n0, mask_lo, _mm256_add_ps(lo[m], b_lo));
  if (n0 + 8 >= N) return;
  const __m256i mask_hi = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(N - n0 - 8, 8))), lane);
  const __m256 b_hi = bias ? _mm256_maskload_ps(bias + n0 + 8, mask_hi) : _mm256_setzero_ps();
  _Pragma("GCC unroll 16") for (int m = 0; m < TM; ++m) _mm256_maskstore_ps(y + m * ldy + n0 + 8, mask_hi, _mm256_add_ps(hi[m], b_hi));
}
#else
constexpr int PANELS_BF16 = 2;  // no bf16 tile in this build: pack_linear's layout, never read by ours
#endif

}  // namespace dejavu::tiles
