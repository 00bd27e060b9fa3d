// Our CPU attention kernels: `paged_decode_attention` (here) and `causal_attention` (prompts, below).
//
// Decode attention straight from the paged KV pool, on CPU: one new token per sequence.
//
// q:               (B, q_heads, D)       float32 or bfloat16, contiguous
// k_pool, v_pool:  (slots, kv_heads, D)  one layer of the pool, q's dtype, contiguous
// slots:           (B, L) int64          pool slot of each sequence's positions [0, L)
// lengths:         (B,) int64            KV tokens of each sequence (<= L), its new token included
// returns:         (B, q_heads, D)       q's dtype
//
// Why a kernel: gathering each sequence's K/V into a padded buffer for SDPA writes and re-reads
// every byte of KV. Here each key and value is read once, in place, for all the query heads of
// its group (a work item: a sequence, or one KV head of it; see `run`): on 2 cores, 30 layers at
// 16 sequences of 600 tokens took 42 ms against 58 ms for gather + SDPA in float32 (34 / 43 ms in
// bf16), before the prefetch and the whole rows below. The loops are written for the compiler to
// vectorize over head_dim (scores and the value sums) and over tokens (the exponentials, through
// glibc's vector math with -ffast-math).
#include "kernels.h"
#include "parallel.h"
#include <algorithm>
#include <cmath>
#include <cstring>
#include <immintrin.h>
#include <type_traits>
#include <vector>

// Keys and values are read through the slot table, a block at a time: the hardware prefetcher
// does not follow, and the loops waited on memory (30 layers at 16 sequences of 600 tokens read
// 440 MB in float32 at ~10 GB/s, where this VM streams 28). So each loop asks for the row AHEAD
// positions on, into L2 (prefetcht1): into L1 (prefetcht0) a 768-byte row ahead is 12 lines
// in flight a row, more than L1 tracks, and the prefetches themselves stalled the loop.
constexpr int64_t AHEAD = 12;

// A work item is one sequence's KV heads [h0, h1): all of them (one contiguous row of the pool a
// position) when there are sequences enough to keep every thread busy, else one KV head (a third
// of a row for SmolLM2), so that one sequence still spreads over the threads. Whole rows: at 16
// sequences of 600 tokens, 30 layers on 2 threads, 36.5 -> 22.4 ms in float32, 21.5 -> 14.6 in
// bf16 (alternated, this VM); the whole decode step of SmolLM2 at 16 sequences 1.24x faster in
// float32 and 1.05x in bf16, at 32 1.20x and 1.08x, at 1-4 the same (medians of paired ratios, old and
// new alternated in one process).
template <typename T>
static inline void prefetch(const T* row, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += 64)
    __builtin_prefetch(reinterpret_cast<const char*>(row) + off, 0, 1);
}

template <typename T, int D>
static void run(const T* q, const T* k_pool, const T* v_pool, const int64_t* slots, const int64_t* lengths, T* out,
                int64_t B, int64_t Hq, int64_t Hkv, int64_t L, float scale) {
  const int64_t G = Hq / Hkv;
  const int64_t span = B >= 2 * at::get_num_threads() ? Hkv : 1;  // KV heads per work item
  const int64_t per_seq = Hkv / span, row_bytes = span * D * static_cast<int64_t>(sizeof(T));
  dejavu::parallel_for_dynamic(0, B * per_seq, 1, [&](int64_t begin, int64_t end) {  // items one at a time
    thread_local std::vector<float> qf, acc, scores;
    qf.resize(span * G * D), acc.resize(span * G * D), scores.resize(span * G * L);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / per_seq, h0 = item % per_seq * span, n = lengths[b];
      const int64_t* seq = slots + b * L;
      const T* qb = q + (b * Hq + h0 * G) * D;  // the query heads of KV heads [h0, h0 + span): span * G rows
      for (int64_t i = 0; i < span * G * D; ++i) qf[i] = static_cast<float>(qb[i]) * scale;
      for (int64_t t = 0; t < n; ++t) {  // scores: each key read once for its whole group
        if (t + AHEAD < n) prefetch(k_pool + (seq[t + AHEAD] * Hkv + h0) * D, row_bytes);
        const T* row = k_pool + (seq[t] * Hkv + h0) * D;
        for (int64_t h = 0; h < span; ++h) {
          float kf[D];
#pragma omp simd
          for (int d = 0; d < D; ++d) kf[d] = static_cast<float>(row[h * D + d]);
          for (int64_t g = h * G; g < (h + 1) * G; ++g) {
            const float* qg = qf.data() + g * D;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int d = 0; d < D; ++d) s += qg[d] * kf[d];
            scores[g * n + t] = s;
          }
        }
      }
      for (int64_t g = 0; g < span * G; ++g) {  // softmax, exact: max first
        float* s = scores.data() + g * n;
        float top = *std::max_element(s, s + n), sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < n; ++t) {
          s[t] = std::exp(s[t] - top);
          sum += s[t];
        }
        const float inv = 1.f / sum;
#pragma omp simd
        for (int64_t t = 0; t < n; ++t) s[t] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < n; ++t) {  // values: each read once for its whole group
        if (t + AHEAD < n) prefetch(v_pool + (seq[t + AHEAD] * Hkv + h0) * D, row_bytes);
        const T* row = v_pool + (seq[t] * Hkv + h0) * D;
        for (int64_t h = 0; h < span; ++h) {
          float vf[D];
#pragma omp simd
          for (int d = 0; d < D; ++d) vf[d] = static_cast<float>(row[h * D + d]);
          for (int64_t g = h * G; g < (h + 1) * G; ++g) {
            const float p = scores[g * n + t];
            float* a = acc.data() + g * D;
#pragma omp simd
            for (int d = 0; d < D; ++d) a[d] += p * vf[d];
          }
        }
      }
      T* ob = out + (b * Hq + h0 * G) * D;
      for (int64_t i = 0; i < span * G * D; ++i) ob[i] = static_cast<T>(acc[i]);
    }
  });
}

#if defined(__AVX512FP16__)
// A values tile of `causal`: VR rows x VC vectors of the head's dimensions over keys [0, n). p: the
// rows' weights (row r at p + r * ldp, key j at [j]); v: values in chunks (key j's at v + j * 16 * VC);
// out: the rows' sums (row r at out + r * ld). A function of its own: inlined in `causal`, its loop
// kept two of its pointers on the stack, a load every key (30 layers of a 500-token prompt 1.05-1.14x
// faster this way, 1024 tokens 1.06-1.10x, the same bits; a Xeon, family 6, model 207). Taking the
// keys in blocks that every tile reads while they sit in L1 added nothing (0.995-1.0x at 500 and 2000
// tokens).
template <int64_t VR, int64_t VC>
__attribute__((noinline)) static void values_tile(const float* p, int64_t ldp, const float* v, int64_t n, float* out,
                                                  int64_t ld) {
  __m512 acc[VR][VC];
  for (int64_t r = 0; r < VR; ++r)
    for (int64_t c = 0; c < VC; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    __m512 vv[VC];
    for (int64_t c = 0; c < VC; ++c) vv[c] = _mm512_loadu_ps(v + (j * VC + c) * 16);
    for (int64_t r = 0; r < VR; ++r) {
      const __m512 w = _mm512_set1_ps(p[r * ldp + j]);
      for (int64_t c = 0; c < VC; ++c) acc[r][c] = _mm512_fmadd_ps(w, vv[c], acc[r][c]);
    }
  }
  for (int64_t r = 0; r < VR; ++r)
    for (int64_t c = 0; c < VC; ++c) _mm512_storeu_ps(out + r * ld + 16 * c, acc[r][c]);
}
#endif

// Causal attention of M new tokens of one sequence against K/V that include them: prompts (start
// 0, the K/V are the new tokens' own) and a prompt's later chunks (start > 0, the K/V gathered
// from the pool). Query row i sits at position start + i and attends keys [0, start + i].
//
// q:     (M, Hq, D)   float32 or bfloat16; rows may be strided (a view of the fused QKV output)
// k, v:  (L, Hkv, D)  q's dtype, L == start + M, rows may be strided
// returns (M, Hq, D)  contiguous, q's dtype
//
// Why a kernel: torch's CPU flash attention runs at ~35 GFLOP/s a core here, in float32 and bf16
// alike (a 500-token prompt of SmolLM2: 8 ms a layer, a third of the bf16 prefill). Here the G
// query heads of a KV head and R positions make one block of G * R rows: keys and values are read
// (and widened to float32) once per block, and the two products run as register-tiled loops (sized
// below for AVX-512 or AVX2; intrinsics where AVX512-FP16 marks a core with two 512-bit FMA units,
// loops the compiler vectorizes elsewhere). Softmax is exact (max first); every sum is float32.
template <typename T, int D>
static void causal(const T* q, int64_t q_row, const T* k, int64_t k_row, const T* v, int64_t v_row, T* out,
                   int64_t M, int64_t start, int64_t Hq, int64_t Hkv, float scale) {
  // positions per block; tile sizes: a scores tile of SR rows x KT keys (KN tiles of them where
  // AVX512-FP16), a values tile of VR rows x DC of the head's dimensions. Each tile's sums stay in
  // registers: with AVX-512's 32 registers of 16 floats 8 x 16 and 4 x 64; with AVX2's 16 of 8
  // floats that would spill (the float32 prompt attention ran at 20 GFLOP/s on a 2-core Zen 1, a
  // third of its GEMM's), so 6 x 16 and 6 x 16, 12 registers each (33 GFLOP/s there; 6 x 16 and 3 x
  // 32: 29; 4 x 16 and 3 x 32: 28). Where a core starts two 512-bit FMAs a cycle (AVX512-FP16 marks
  // Intel's, as for the GEMM's prefill tile, linear_tiles.h), 8 accumulators are just the FMAs'
  // latency times their throughput: there 8 x 48 (24) and VR x DC of 24 vectors (6 x 64 for
  // SmolLM2's heads): 30 layers of a 500-token prompt 52.9 -> 44.4 ms, 1024 tokens 192.9 -> 158.1
  // (a 2-core Xeon, family 6, model 207; docs/BENCHMARKS.md §18). Zen 4's double-pumped FMAs keep
  // the first (unmeasured there). The order of every sum is the same whatever the tiles: so is the
  // output, to the bit.
#if defined(__AVX512FP16__)
  constexpr int64_t R = 16, KT = 16, KN = 3, SR = 8, DC = D % 64 == 0 ? 64 : D, VR = std::min<int64_t>(12, 24 / (DC / 16));
#elif defined(__AVX512F__)
  constexpr int64_t R = 16, KT = 16, SR = 8, VR = 4, DC = D;
#else
  constexpr int64_t R = 16, KT = 16, SR = 6, VR = 6, DC = 16;
#endif
  static_assert(D % DC == 0, "the head dimension is a multiple of the values tile's");
  const int64_t G = Hq / Hkv, blocks = (M + R - 1) / R, tasks = Hkv * blocks, L = start + M;
  const int64_t max_rows = (G * R + SR - 1) / SR * SR;
  // Keys and values widened to float32 once for all blocks, each laid out as its tile reads it:
  // keys transposed in tiles of KT (Hkv, LT, D, KT), a scores tile's keys one contiguous 4 KiB for
  // SmolLM2; values in chunks of DC dimensions (Hkv, D / DC, L, DC), a values tile's one stream.
  // Keys transposed whole (Hkv, D, L) put a tile's D rows L floats apart: at L = 1024 every row in
  // one L1 set, which holds 8 of them (SmolLM2 on a 2-core Zen 3, a layer: 1024 tokens 13.0 -> 11.3
  // ms, 2048 tokens 49.0 -> 41.5, bf16 1024 tokens 15.8 -> 12.9; the same bits; docs/BENCHMARKS.md §15).
  const int64_t LT = (L + KT - 1) / KT;
  std::vector<float> kt(Hkv * LT * D * KT), vf(Hkv * L * D);
#pragma omp parallel num_threads(at::get_num_threads())
  {
#pragma omp for schedule(static)
    for (int64_t j = 0; j < L; ++j)
      for (int64_t h = 0; h < Hkv; ++h) {
        const T* ks = k + j * k_row + h * D;
        const T* vs = v + j * v_row + h * D;
        float* kd = kt.data() + (h * LT + j / KT) * D * KT + j % KT;
        float* vd = vf.data() + h * L * D + j * DC;
        for (int d = 0; d < D; ++d) kd[d * KT] = static_cast<float>(ks[d]);
        for (int64_t c = 0; c < D / DC; ++c)
#pragma omp simd
          for (int d = 0; d < DC; ++d) vd[c * L * DC + d] = static_cast<float>(vs[c * DC + d]);
      }
    std::vector<float> qf(max_rows * D), scores(max_rows * L);
#if defined(__AVX512FP16__)
    std::vector<float> sums(VR * D);  // a values tile's sums
#endif
    std::vector<int64_t> count(max_rows);
    std::vector<float> inv_sum(max_rows);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t blk = blocks - 1 - task / Hkv, h = task % Hkv;  // the longest blocks first
      const int64_t i0 = blk * R, n = std::min(R, M - i0), keys = start + i0 + n;
      const int64_t rows = G * n, padded = (rows + SR - 1) / SR * SR;
      const float* kh = kt.data() + h * LT * D * KT;
      const float* vh = vf.data() + h * L * D;
      std::fill(qf.begin() + rows * D, qf.begin() + padded * D, 0.f);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t i = 0; i < n; ++i) {  // row g * n + i: position start + i0 + i, query head h * G + g
          const T* src = q + (i0 + i) * q_row + (h * G + g) * D;
          float* dst = qf.data() + (g * n + i) * D;
#pragma omp simd
          for (int d = 0; d < D; ++d) dst[d] = static_cast<float>(src[d]) * scale;
          count[g * n + i] = start + i0 + i + 1;
        }
      for (int64_t j0 = 0; j0 < keys;) {  // scores, KN x KT keys at a time, then KT
#if defined(__AVX512FP16__)
        if (keys - j0 >= KN * KT) {
          static_assert(KT == 16, "a key tile is one zmm");
          for (int64_t r0 = 0; r0 < padded; r0 += SR) {
            __m512 acc[SR][KN];
            for (int64_t r = 0; r < SR; ++r)
              for (int64_t t = 0; t < KN; ++t) acc[r][t] = _mm512_setzero_ps();
            for (int d = 0; d < D; ++d) {
              __m512 kv[KN];
              for (int64_t t = 0; t < KN; ++t) kv[t] = _mm512_loadu_ps(kh + (j0 + t * KT) * D + d * KT);
              for (int64_t r = 0; r < SR; ++r) {
                const __m512 x = _mm512_set1_ps(qf[(r0 + r) * D + d]);
                for (int64_t t = 0; t < KN; ++t) acc[r][t] = _mm512_fmadd_ps(x, kv[t], acc[r][t]);
              }
            }
            for (int64_t r = 0; r < SR && r0 + r < rows; ++r)
              for (int64_t t = 0; t < KN; ++t) _mm512_storeu_ps(scores.data() + (r0 + r) * keys + j0 + t * KT, acc[r][t]);
          }
          j0 += KN * KT;
          continue;
        }
#endif
        const int64_t kn = std::min(KT, keys - j0);
        for (int64_t r0 = 0; r0 < padded; r0 += SR) {
          float acc[SR][KT] = {};
          if (kn == KT) {
            for (int d = 0; d < D; ++d) {
              const float* kd = kh + j0 * D + d * KT;
              for (int64_t r = 0; r < SR; ++r) {
                const float x = qf[(r0 + r) * D + d];
#pragma omp simd
                for (int64_t j = 0; j < KT; ++j) acc[r][j] += x * kd[j];
              }
            }
          } else {  // the last, partial tile
            for (int d = 0; d < D; ++d)
              for (int64_t r = 0; r < SR; ++r)
                for (int64_t j = 0; j < kn; ++j) acc[r][j] += qf[(r0 + r) * D + d] * kh[j0 * D + d * KT + j];
          }
          for (int64_t r = 0; r < SR && r0 + r < rows; ++r)
            std::copy(acc[r], acc[r] + kn, scores.data() + (r0 + r) * keys + j0);
        }
        j0 += KT;
      }
      // softmax over the keys each row sees, as torch's flash attention rounds it: the weights
      // exp(s - max) in q's dtype for the product with the values, divided by their float32 sum
      // after it (in bf16 our logits then agree with Hugging Face's SDPA as well as its own do)
      for (int64_t r = 0; r < rows; ++r) {
        float* s = scores.data() + r * keys;
        const int64_t c = count[r];
        float top = *std::max_element(s, s + c), sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < c; ++t) {
          const float e = std::exp(s[t] - top);
          sum += e;
          s[t] = static_cast<float>(static_cast<T>(e));
        }
        inv_sum[r] = 1.f / sum;
        std::fill(s + c, s + keys, 0.f);
      }
      int64_t r_first = 0;  // the first row the loop below computes: after the full tiles where AVX512-FP16
#if defined(__AVX512FP16__)
      for (; r_first + VR <= rows; r_first += VR) {  // a full tile: values_tile, then each row scaled
        const int64_t last = *std::max_element(count.begin() + r_first, count.begin() + r_first + VR);
        for (int64_t d0 = 0; d0 < D; d0 += DC)
          values_tile<VR, DC / 16>(scores.data() + r_first * keys, keys, vh + d0 * L, last, sums.data() + d0, D);
        for (int64_t r = 0; r < VR; ++r) {
          const int64_t g = (r_first + r) / n, i = (r_first + r) % n;
          T* dst = out + ((i0 + i) * Hq + h * G + g) * D;
          const __m512 inv = _mm512_set1_ps(inv_sum[r_first + r]);
          alignas(64) float row[D];
          for (int64_t c = 0; c < D / 16; ++c)
            _mm512_store_ps(row + 16 * c, _mm512_mul_ps(_mm512_loadu_ps(sums.data() + r * D + 16 * c), inv));
          for (int d = 0; d < D; ++d) dst[d] = static_cast<T>(row[d]);
        }
      }
#endif
      for (int64_t r0 = r_first; r0 < rows; r0 += VR) {  // values
        const int64_t rn = std::min(VR, rows - r0);
        const int64_t last = *std::max_element(count.begin() + r0, count.begin() + r0 + rn);
        for (int64_t d0 = 0; d0 < D; d0 += DC) {
          float acc[VR][DC] = {};
          for (int64_t j = 0; j < last; ++j) {
            const float* vj = vh + d0 * L + j * DC;
            for (int64_t r = 0; r < VR; ++r) {
              const float p = r < rn ? scores[(r0 + r) * keys + j] : 0.f;
#pragma omp simd
              for (int d = 0; d < DC; ++d) acc[r][d] += p * vj[d];
            }
          }
          for (int64_t r = 0; r < rn; ++r) {
            const int64_t g = (r0 + r) / n, i = (r0 + r) % n;
            T* dst = out + ((i0 + i) * Hq + h * G + g) * D + d0;
            for (int d = 0; d < DC; ++d) dst[d] = static_cast<T>(acc[r][d] * inv_sum[r0 + r]);
          }
        }
      }
    }
  }
}

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    !defined(__AVX512FP16__)
#define DEJAVU_CAUSAL_BF16 1
// The same attention in bf16 on a CPU with AVX512-BF16 and without AVX512-FP16: both products
// through VDPBF16PS, two exact
// bf16 products a float32 lane, where `causal` widens keys and values to float32 and runs plain
// FMAs (one product a lane). The sums stay float32 and the softmax is the one above (weights
// exp(s - max) rounded to bf16, their float32 sum divided after); only the order of the sums
// differs, and the scale multiplies each score once summed (`causal` scales q first). A 500-token
// prompt of SmolLM2 on the 2-core Zen 4 VM, old and new alternated in one process: 3.0-3.3 -> 1.7-2.0
// ms a layer (1.66-1.79x); 1.45-2.3x for Llama-3-8B's heads (32 / 8 x 128); out equal to the bit to
// `causal`'s for SmolLM2's shapes (docs/BENCHMARKS.md §5).
// Not where AVX512-FP16 marks a core with two 512-bit FMA units: there VDPBF16PS runs at half their
// rate (linear_tiles.h), and `causal` on keys and values widened to float32 took a 500-token prompt
// of SmolLM2's 30 layers in 47.2 ms against this kernel's 61.3 (a 2-core Xeon, family 6, model 207,
// alternated; docs/BENCHMARKS.md §18).
//
// Keys are packed per KV head in tiles of 16 keys, head_dim in pairs (LT, D/2, 16, 2): one zmm
// holds a pair of dims of 16 keys, against which each query row's pair is broadcast. Values in
// pairs of keys (L/2, D, 2): one zmm holds 16 dims of two keys, against a row's two weights.
template <int D>
static void causal_bf16(const uint16_t* q, int64_t q_row, const uint16_t* k, int64_t k_row, const uint16_t* v,
                        int64_t v_row, uint16_t* out, int64_t M, int64_t start, int64_t Hq, int64_t Hkv, float scale) {
  static_assert(D % 16 == 0, "whole zmm registers of head_dim");
  constexpr int64_t R = 16, KT = 16, DP = D / 2, DV = D / 16;
  constexpr int SR = 12, ST = 2;                     // a scores tile: SR rows x ST tiles of 16 keys
  constexpr int VR = DV >= 24 ? 1 : 24 / DV;         // a values tile: VR rows x D (VR * DV accumulators)
  const int64_t G = Hq / Hkv, blocks = (M + R - 1) / R, tasks = Hkv * blocks, L = start + M;
  const int64_t LT = (L + KT - 1) / KT, LP = LT * KT / 2;  // key tiles; key pairs (zero-padded alike)
  const int64_t max_rows = (G * R + SR - 1) / SR * SR + VR;
  std::vector<uint16_t> kp(Hkv * LT * DP * KT * 2), vp(Hkv * LP * D * 2);
#pragma omp parallel num_threads(at::get_num_threads())
  {
#pragma omp for schedule(static)
    for (int64_t j = 0; j < LT * KT; ++j)
      for (int64_t h = 0; h < Hkv; ++h) {
        uint16_t* kd = kp.data() + ((h * LT + j / KT) * DP * KT + j % KT) * 2;
        uint16_t* vd = vp.data() + (h * LP + j / 2) * D * 2 + j % 2;
        if (j < L) {
          const uint16_t* ks = k + j * k_row + h * D;
          const uint16_t* vs = v + j * v_row + h * D;
          for (int64_t p = 0; p < DP; ++p) std::memcpy(kd + p * KT * 2, ks + 2 * p, 4);
          for (int d = 0; d < D; ++d) vd[2 * d] = vs[d];
        } else {  // padding: a zero weight times a value must be zero, never NaN
          for (int64_t p = 0; p < DP; ++p) std::memset(kd + p * KT * 2, 0, 4);
          for (int d = 0; d < D; ++d) vd[2 * d] = 0;
        }
      }
    std::vector<uint16_t> qb(max_rows * D), pb(max_rows * LT * KT);
    std::vector<float> scores(max_rows * LT * KT), inv_sum(max_rows);
    std::vector<int64_t> count(max_rows);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t blk = blocks - 1 - task / Hkv, h = task % Hkv;  // the longest blocks first
      const int64_t i0 = blk * R, n = std::min(R, M - i0), keys = start + i0 + n;
      const int64_t rows = G * n, tiles = (keys + KT - 1) / KT, pairs = (keys + 1) / 2, stride = LT * KT;
      const uint16_t* kh = kp.data() + h * LT * DP * KT * 2;
      const uint16_t* vh = vp.data() + h * LP * D * 2;
      std::fill(qb.begin() + rows * D, qb.end(), uint16_t{0});
      for (int64_t g = 0; g < G; ++g)
        for (int64_t i = 0; i < n; ++i) {  // row g * n + i: position start + i0 + i, query head h * G + g
          std::memcpy(qb.data() + (g * n + i) * D, q + (i0 + i) * q_row + (h * G + g) * D, D * 2);
          count[g * n + i] = start + i0 + i + 1;
        }
      const __m512 sv = _mm512_set1_ps(scale);
      for (int64_t r0 = 0; r0 < rows; r0 += SR) {  // scores
        for (int64_t t0 = 0; t0 < tiles; t0 += ST) {
          const int tn = static_cast<int>(std::min<int64_t>(ST, tiles - t0));
          __m512 acc[ST][SR];
          for (int t = 0; t < ST; ++t)
            for (int r = 0; r < SR; ++r) acc[t][r] = _mm512_setzero_ps();
          for (int64_t p = 0; p < DP; ++p) {
            __m512bh kv[ST];
            for (int t = 0; t < ST; ++t)  // past the last tile: the first one again, not stored
              kv[t] = (__m512bh)_mm512_loadu_si512(kh + ((t0 + (t < tn ? t : 0)) * DP + p) * KT * 2);
            for (int r = 0; r < SR; ++r) {
              int32_t pair;
              std::memcpy(&pair, qb.data() + (r0 + r) * D + 2 * p, 4);
              const __m512bh qv = (__m512bh)_mm512_set1_epi32(pair);
              for (int t = 0; t < ST; ++t) acc[t][r] = _mm512_dpbf16_ps(acc[t][r], qv, kv[t]);
            }
          }
          for (int r = 0; r < SR && r0 + r < rows; ++r)
            for (int t = 0; t < tn; ++t)
              _mm512_storeu_ps(scores.data() + (r0 + r) * stride + (t0 + t) * KT, _mm512_mul_ps(acc[t][r], sv));
        }
      }
      for (int64_t r = 0; r < rows; ++r) {  // softmax, rounded as in `causal`
        float* s = scores.data() + r * stride;
        uint16_t* w = pb.data() + r * stride;
        const int64_t c = count[r];
        float top = *std::max_element(s, s + c), sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < c; ++t) {
          const float e = std::exp(s[t] - top);
          sum += e;
          s[t] = e;
        }
        inv_sum[r] = 1.f / sum;
        int64_t t = 0;
        for (; t + 16 <= c; t += 16)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + t), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(s + t)));
        if (t < c) {
          const __mmask16 m = static_cast<__mmask16>((1u << (c - t)) - 1);
          _mm256_mask_storeu_epi16(w + t, m, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, s + t)));
        }
        std::fill(w + c, w + 2 * pairs, uint16_t{0});  // the keys this row does not see
      }
      for (int64_t r = rows; r < (rows + VR - 1) / VR * VR; ++r)
        std::fill(pb.begin() + r * stride, pb.begin() + r * stride + 2 * pairs, uint16_t{0});
      for (int64_t r0 = 0; r0 < rows; r0 += VR) {  // values
        const int64_t rn = std::min<int64_t>(VR, rows - r0);
        const int64_t last = (*std::max_element(count.begin() + r0, count.begin() + r0 + rn) + 1) / 2;
        __m512 acc[VR][DV];
        for (int r = 0; r < VR; ++r)
          for (int d = 0; d < DV; ++d) acc[r][d] = _mm512_setzero_ps();
        for (int64_t jp = 0; jp < last; ++jp) {
          __m512bh vv[DV];
          for (int d = 0; d < DV; ++d) vv[d] = (__m512bh)_mm512_loadu_si512(vh + (jp * D + d * 16) * 2);
          for (int r = 0; r < VR; ++r) {
            int32_t pair;
            std::memcpy(&pair, pb.data() + (r0 + r) * stride + 2 * jp, 4);
            const __m512bh pv = (__m512bh)_mm512_set1_epi32(pair);
            for (int d = 0; d < DV; ++d) acc[r][d] = _mm512_dpbf16_ps(acc[r][d], pv, vv[d]);
          }
        }
        for (int64_t r = 0; r < rn; ++r) {
          const int64_t g = (r0 + r) / n, i = (r0 + r) % n;
          uint16_t* dst = out + ((i0 + i) * Hq + h * G + g) * D;
          const __m512 inv = _mm512_set1_ps(inv_sum[r0 + r]);
          for (int d = 0; d < DV; ++d)
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d * 16),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][d], inv)));
        }
      }
    }
  }
}
#endif

// f(std::integral_constant<int, D>) for the head dims we build (HEAD_DIMS below): D is a compile-
// time constant in the kernels, so their loops over it unroll and vectorize.
template <typename F>
static void on_head_dim(int64_t D, const char* what, F&& f) {
  switch (D) {
    case 16: f(std::integral_constant<int, 16>{}); break;
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    case 80: f(std::integral_constant<int, 80>{}); break;
    case 96: f(std::integral_constant<int, 96>{}); break;
    case 128: f(std::integral_constant<int, 128>{}); break;
    case 256: f(std::integral_constant<int, 256>{}); break;
    default: TORCH_CHECK(false, what, ": head_dim ", D, " not built");
  }
}

template <typename T>
static void dispatch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots,
                     const at::Tensor& lengths, at::Tensor& out, double scale) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k.size(1), L = slots.size(1);
  on_head_dim(D, "paged_decode_attention", [&](auto dim) {
    run<T, decltype(dim)::value>(q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), slots.data_ptr<int64_t>(),
                                 lengths.data_ptr<int64_t>(), out.data_ptr<T>(), B, Hq, Hkv, L, static_cast<float>(scale));
  });
}

at::Tensor paged_decode_attention(at::Tensor q, at::Tensor k_pool, at::Tensor v_pool, at::Tensor slots,
                                  at::Tensor lengths, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 3 && v_pool.dim() == 3, "q (B, Hq, D), pools (slots, Hkv, D)");
  TORCH_CHECK(q.is_contiguous() && k_pool.is_contiguous() && v_pool.is_contiguous(), "contiguous tensors only");
  TORCH_CHECK(slots.scalar_type() == at::kLong && lengths.scalar_type() == at::kLong, "int64 slots and lengths");
  TORCH_CHECK(q.scalar_type() == k_pool.scalar_type() && q.scalar_type() == v_pool.scalar_type(), "one dtype");
  TORCH_CHECK(q.size(1) % k_pool.size(1) == 0 && k_pool.size(2) == q.size(2), "heads or head_dim do not match");
  TORCH_CHECK(q.device().is_cpu() && k_pool.device().is_cpu() && slots.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(slots.dim() == 2 && slots.size(0) == q.size(0) && lengths.numel() == q.size(0), "one row per sequence");
  auto slots_c = slots.contiguous(), lengths_c = lengths.contiguous();
  const int64_t* len = lengths_c.data_ptr<int64_t>();
  for (int64_t b = 0; b < q.size(0); ++b)
    TORCH_CHECK(len[b] >= 1 && len[b] <= slots_c.size(1), "lengths must be in [1, slots.size(1)]");
  auto out = at::empty_like(q);
  if (q.scalar_type() == at::kFloat) {
    dispatch<float>(q, k_pool, v_pool, slots_c, lengths_c, out, scale);
  } else if (q.scalar_type() == at::kBFloat16) {
    dispatch<at::BFloat16>(q, k_pool, v_pool, slots_c, lengths_c, out, scale);
  } else {
    TORCH_CHECK(false, "paged_decode_attention: float32 or bfloat16, not ", q.scalar_type());
  }
  return out;
}


template <typename T>
static void dispatch_causal(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                            int64_t start, double scale) {
  const int64_t M = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k.size(1);
  on_head_dim(D, "causal_attention", [&](auto dim) {
#ifdef DEJAVU_CAUSAL_BF16
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      causal_bf16<decltype(dim)::value>(
          reinterpret_cast<const uint16_t*>(q.data_ptr()), q.stride(0), reinterpret_cast<const uint16_t*>(k.data_ptr()),
          k.stride(0), reinterpret_cast<const uint16_t*>(v.data_ptr()), v.stride(0),
          reinterpret_cast<uint16_t*>(out.data_ptr()), M, start, Hq, Hkv, static_cast<float>(scale));
      return;
    }
#endif
    causal<T, decltype(dim)::value>(q.data_ptr<T>(), q.stride(0), k.data_ptr<T>(), k.stride(0), v.data_ptr<T>(),
                                    v.stride(0), out.data_ptr<T>(), M, start, Hq, Hkv, static_cast<float>(scale));
  });
}

at::Tensor causal_attention(at::Tensor q, at::Tensor k, at::Tensor v, int64_t start, double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q (M, Hq, D), k and v (L, Hkv, D)");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "one dtype");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(2) == k.size(2) && q.size(1) % k.size(1) == 0, "heads or head_dim do not match");
  TORCH_CHECK(start >= 0 && k.size(0) == start + q.size(0), "k and v must hold start + M positions");
  for (const auto* t : {&q, &k, &v})  // rows may be strided, each row's heads packed
    TORCH_CHECK(t->stride(2) == 1 && t->stride(1) == t->size(2), "each row's heads must be contiguous");
  auto out = at::empty(q.sizes(), q.options());
  if (q.size(0) == 0) return out;
  if (q.scalar_type() == at::kFloat) {
    dispatch_causal<float>(q, k, v, out, start, scale);
  } else if (q.scalar_type() == at::kBFloat16) {
    dispatch_causal<at::BFloat16>(q, k, v, out, start, scale);
  } else {
    TORCH_CHECK(false, "causal_attention: float32 or bfloat16, not ", q.scalar_type());
  }
  return out;
}
