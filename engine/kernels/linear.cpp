// y = x W^T + b on CPU, for the GEMMs of a decode step: few rows (one per sequence), a weight read
// from memory once per step. oneDNN's prepacked GEMM streamed SmolLM2's weights at 12-18 GB/s at
// 1-16 rows on this project's 2-core AMD EPYC (Zen 4) VMs; this one is 1.55x (float32) and 1.68x
// (bf16) faster at 1 row, 1.19x and 1.34x at 16, as fast at a 500-token prefill (dejavu bench gemm,
// docs/BENCHMARKS.md §5).
//
//   pack_linear(W (N, K))      -> the weight in 16-column panels, read front to back:
//                                 float32 (N/16, K, 16); bfloat16 (N/16, K/2, 16, 2), k-pairs for
//                                 VDPBF16PS (the widening tiles read the same); N zero-padded to
//                                 whole panels, in groups of PANELS_F32 (1) or PANELS_BF16 (2; 1 on
//                                 AVX2); a tile of more panels than that (a prefill's) takes a
//                                 group's last panels by a tile of fewer (run)
//   linear(x (M, K), packed, bias (N,) float32 or None, N) -> (M, N), x's dtype
//   pack_gate_up(W (2I, K))    -> an MLP's [gate; up] packed as pack_linear packs it, gate panel j
//                                 next to up panel j (gate_up_order reorders its rows, or a bias)
//   linear_silu_mul(x, packed, bias (2I,) in gate_up_order or None, I) -> SiLU(gate) * up, (M, I)
//
// A microkernel takes `PANELS` panels (16, 32 or 48 output columns) and up to TM rows of x; its
// accumulators (TM x PANELS zmm registers, float32) stay in registers over the whole of K, each
// weight vector loaded once and used by every row (a row's x element broadcast). Work items are
// panel groups x row chunks, group-major: a thread's items share weight panels. bfloat16 products
// accumulate in float32 (VDPBF16PS, or FMAs on the weights widened), rounded to bfloat16 once at the
// end, as oneDNN does.
//
// float32 needs AVX-512 or AVX2 with FMA (the tiles: linear_tiles.h); bfloat16 AVX512-BF16 without
// AMX (with AVX512-FP16 too: FMAs on widened weights, VDPBF16PS being slower there; a VM that hides
// AMX, as this project's Xeon did), or AVX2 with FMA and no AVX-512 (a tile that widens the bf16
// weights to float32 in registers as well).
// On AVX2 both dtypes take one panel x 6 rows in ymm registers.
// LINEAR_DTYPES says which this build runs; the engine keeps oneDNN's GEMM for the others
// (engine/model.py, Linear).
#include "kernels.h"
#include "linear_tiles.h"
#include "parallel.h"
#include "silu.h"
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using namespace dejavu::tiles;

constexpr int64_t ROW_CHUNK = 64;  // rows of one work item: a prefill splits into chunks too
constexpr int64_t DECODE_ROWS = 32;  // up to this many rows of x: the decode tiles (TM_*); beyond, a prefill's (*_PREFILL)

// The tile shapes (linear_tiles.h), measured on the 2-core Zen 4 VM (30 layers of SmolLM2's linears, 2 threads):
// float32 one panel x 8 rows (two panels lose at 1 and 512 rows; beyond 32 rows three panels x 8 on
// a core with two 512-bit FMA units, linear_tiles.h); bfloat16 two panels x 12 rows up to 32 rows
// (at 16 rows 11.4 ms against 12.5 with one panel), x 8 beyond (three panels x 8 where AVX512-FP16
// widens the weights).
// X, W, Y: the element types of x, the packed weight and y (bf16's widening tiles: float, bf16, and
// bf16's bits where the tile rounds y itself (AVX-512), else float).
// A last group short of PANELS panels (N not a multiple of PANELS x 16 columns: the weight is padded
// to whole panels only) takes a tile of the panels it has.
template <int PANELS, int TM, typename X, typename W, typename Y, typename Tile>
void run(const X* x, int64_t M, int64_t K, const W* w, int64_t panels, const float* bias, Y* y, int64_t N,
         Tile tile) {
  static_assert(TM >= 1 && TM <= 12, "DEJAVU_TILE instantiates tiles of 1-12 rows");
  const int64_t groups = (panels + PANELS - 1) / PANELS, chunks = (M + ROW_CHUNK - 1) / ROW_CHUNK;
  // items taken a few at a time (parallel.h): about 8 takes a thread
  const int64_t take = std::max<int64_t>(1, groups * chunks / (8 * at::get_num_threads()));
  dejavu::parallel_for_dynamic(0, groups * chunks, take, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t g = item / chunks, c = item % chunks, in_group = std::min<int64_t>(PANELS, panels - g * PANELS);
      const W* wg = w + g * PANELS * K * 16;
      for (int64_t m0 = c * ROW_CHUNK; m0 < std::min(M, (c + 1) * ROW_CHUNK); m0 += TM) {
        const int64_t rows = std::min<int64_t>(TM, std::min(M, (c + 1) * ROW_CHUNK) - m0);  // within the chunk
        tile(x + m0 * K, K, wg, bias, y + m0 * N, N, g * PANELS * 16, N, rows, in_group);
      }
    }
  });
}

// A tile of `rows` <= TM rows and `panels` <= PANELS panels: the template for that shape (registers
// are fixed at compile time). A tile of fewer panels than PANELS is a group's tail (run,
// run_gate_up); PANELS is at most 3.
#define DEJAVU_ROWS(F, P)                                                                            \
  switch (rows) {                                                                                    \
    case 1: return F<1, P>(x, K, w, bias, y, ldy, n0, N);                                            \
    case 2: return F<2, P>(x, K, w, bias, y, ldy, n0, N);                                            \
    case 3: return F<3, P>(x, K, w, bias, y, ldy, n0, N);                                            \
    case 4: return F<4, P>(x, K, w, bias, y, ldy, n0, N);                                            \
    case 5: return F<5, P>(x, K, w, bias, y, ldy, n0, N);                                            \
    case 6: return F<6, P>(x, K, w, bias, y, ldy, n0, N);                                            \
    case 7: return F<7, P>(x, K, w, bias, y, ldy, n0, N);                                            \
    case 8: return F<8, P>(x, K, w, bias, y, ldy, n0, N);                                            \
    case 9: return F<9, P>(x, K, w, bias, y, ldy, n0, N);                                            \
    case 10: return F<10, P>(x, K, w, bias, y, ldy, n0, N);                                          \
    case 11: return F<11, P>(x, K, w, bias, y, ldy, n0, N);                                          \
    case 12: return F<12, P>(x, K, w, bias, y, ldy, n0, N);                                          \
    default: TORCH_CHECK(false, "linear: a tile of ", rows, " rows");                                \
  }
#define DEJAVU_TILE(F, PANELS)                                                                       \
  [](auto x, int64_t K, auto w, const float* bias, auto y, int64_t ldy, int64_t n0, int64_t N,       \
     int64_t rows, int64_t panels) {                                                                 \
    static_assert(PANELS >= 1 && PANELS <= 3, "tails of 1 or 2 panels");                             \
    if (panels == PANELS) {                                                                          \
      DEJAVU_ROWS(F, PANELS)                                                                         \
    } else if (panels == 1 || PANELS == 1) {                                                         \
      DEJAVU_ROWS(F, 1)                                                                              \
    } else {                                                                                         \
      DEJAVU_ROWS(F, (PANELS > 1 ? 2 : 1))                                                           \
    }                                                                                                \
  }

// The gate/up projection with SiLU(gate) * up in its epilogue (linear_silu_mul): the weight packed
// by pack_gate_up, gate panel j next to up panel j, so one work item computes 16 columns of each
// for its rows into a scratch tile in L1, and writes 16 columns of the activation. The gate/up
// output (M, 2I) is never written out and read back: at a 500-token prompt of SmolLM2 that was
// 6 MB a layer and a separate pass (silu_and_mul), ~20 ms of a 650 ms float32 prefill.
// A work item takes PAIRS such pairs, 2 x PAIRS panels in tiles of PANELS: one pair for tiles of
// one or two panels, three for tiles of three (linear_tiles.h); the last item fewer, if I / 16 is
// not a multiple of PAIRS.
// `Act` is the element type the activation rounds through (float, or c10::BFloat16 for bf16); S the
// tile's output (Act's bits, or float32 from the widening tile: then gate and up are rounded to Act
// first, as linear rounds its output).
template <typename Act, typename S, int PANELS, int TM, typename X, typename W, typename Y, typename Tile>
void run_gate_up(const X* x, int64_t M, int64_t K, const W* w, int64_t I, const float* bias, Y* y, Tile tile) {
  static_assert(TM >= 1 && TM <= 12, "DEJAVU_TILE instantiates tiles of 1-12 rows");
  constexpr int64_t PAIRS = PANELS == 3 ? 3 : 1, WIDTH = 32 * PAIRS;  // a scratch row: PAIRS x [16 gate | 16 up]
  static_assert(2 * PAIRS % PANELS == 0, "an item's panels are whole tiles");
  constexpr bool widened = std::is_same_v<S, float> && !std::is_same_v<Act, float>;
  const int64_t pairs = I / 16, groups = (pairs + PAIRS - 1) / PAIRS, chunks = (M + ROW_CHUNK - 1) / ROW_CHUNK;
  const int64_t take = std::max<int64_t>(1, groups * chunks / (8 * at::get_num_threads()));
  dejavu::parallel_for_dynamic(0, groups * chunks, take, [&](int64_t begin, int64_t end) {
    alignas(64) S scratch[TM * WIDTH];
    [[maybe_unused]] alignas(64) uint16_t rounded[TM * WIDTH];  // the rows' gate and up, rounded to Act (bf16)
    for (int64_t item = begin; item < end; ++item) {
      const int64_t j = item / chunks * PAIRS, c = item % chunks, stop = std::min(M, (c + 1) * ROW_CHUNK);
      const int64_t n = 2 * std::min(PAIRS, pairs - j);  // this item's panels: gate j, up j, gate j + 1, ...
      const W* wj = w + 2 * j * K * 16;
      const float* bj = bias ? bias + 32 * j : nullptr;
      for (int64_t m0 = c * ROW_CHUNK; m0 < stop; m0 += TM) {
        const int64_t rows = std::min<int64_t>(TM, stop - m0);
        for (int64_t p = 0; p < n; p += PANELS) {
          const int64_t in_tile = std::min<int64_t>(PANELS, n - p);
          tile(x + m0 * K, K, wj + p * K * 16, bj ? bj + 16 * p : nullptr, scratch + 16 * p, WIDTH, 0, 16 * in_tile,
               rows, in_tile);
        }
        using Bits = std::conditional_t<sizeof(Act) == 4, float, uint16_t>;  // Act's, as silu.h takes them
        static_assert(sizeof(Y) == sizeof(Bits), "y holds Act's values");
        const Bits* act = reinterpret_cast<const Bits*>(scratch);
        if constexpr (widened) {
          static_assert(sizeof(Act) == 2, "a widening tile's activation is bf16");
          for (int64_t r = 0; r < rows; ++r)  // the columns this item's tiles wrote
#pragma omp simd
            for (int64_t e = r * WIDTH; e < r * WIDTH + 16 * n; ++e) rounded[e] = dejavu::bf16_bits(scratch[e]);  // to nearest even
          act = rounded;
        }
        // each row's 16 activations of each pair: silu.h's one copy, as silu_and_mul computes them
        for (int64_t q = 0; q < n / 2; ++q)
          dejavu::silu_mul_spans(act + 32 * q, act + 32 * q + 16, reinterpret_cast<Bits*>(y + m0 * I + 16 * (j + q)),
                                 rows, WIDTH, I);
      }
    }
  });
}

int64_t panels_for(const at::Tensor& w) { return w.scalar_type() == at::kBFloat16 ? PANELS_BF16 : PANELS_F32; }

}  // namespace

at::Tensor pack_linear(at::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.device().is_cpu(), "pack_linear: a (N, K) CPU weight");
  const bool bf16 = w.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16 || w.scalar_type() == at::kFloat, "pack_linear: float32 or bfloat16");
  TORCH_CHECK(!bf16 || w.size(1) % 2 == 0, "pack_linear: bfloat16 needs an even K");
  const int64_t N = w.size(0), K = w.size(1), group = 16 * panels_for(w);
  const int64_t padded = (N + group - 1) / group * group;
  auto full = at::zeros({padded, K}, w.options());
  full.narrow(0, 0, N).copy_(w);
  if (!bf16) return full.view({padded / 16, 16, K}).transpose(1, 2).contiguous();         // (N/16, K, 16)
  return full.view({padded / 16, 16, K / 2, 2}).permute({0, 2, 1, 3}).contiguous();        // (N/16, K/2, 16, 2)
}

namespace {

// What `linear` and `linear_silu_mul` check alike: x (M, K) and a weight of K columns in panels of
// 16, of `panels` panels, laid out by `packer`; a float32 bias of `n_bias`. Returns the bias's data.
const float* checked(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                     int64_t n_bias, bool panels_fit, const char* what, const char* packer) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(), what, ": x (M, K), contiguous, on CPU");
  TORCH_CHECK(x.scalar_type() == packed.scalar_type(), what, ": x and the weight of one dtype");
  const int64_t K = x.size(1);
  TORCH_CHECK(packed.device().is_cpu() && packed.is_contiguous() && panels_fit &&
                  (x.scalar_type() == at::kBFloat16
                       ? packed.dim() == 4 && packed.size(1) * 2 == K && packed.size(2) == 16 && packed.size(3) == 2
                       : packed.dim() == 3 && packed.size(1) == K && packed.size(2) == 16),
              what, ": a weight packed by ", packer, " for this K and this many columns");
  if (!bias) return nullptr;
  TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->device().is_cpu() && bias->is_contiguous() &&
                  bias->numel() == n_bias,
              what, ": a float32 bias of ", n_bias, ", its columns in the weight's order");
  return bias->data_ptr<float>();
}

}  // namespace

at::Tensor linear(at::Tensor x, at::Tensor packed, c10::optional<at::Tensor> bias, int64_t N) {
  const int64_t panels = packed.dim() > 0 ? packed.size(0) : 0, group = panels_for(packed);
  [[maybe_unused]] const float* b = checked(x, packed, bias, N,
                                            panels % group == 0 && N <= panels * 16 && N > (panels - group) * 16,
                                            "linear", "pack_linear");
  const int64_t M = x.size(0), K = x.size(1);
  if (M == 0) return at::empty({M, N}, x.options());
  if (x.scalar_type() == at::kBFloat16) {
#if defined(DEJAVU_LINEAR_BF16_WIDENED)
    // x widened once; y bf16 from the tile (AVX-512's rounds it itself) or float32, rounded after (AVX2's)
#if defined(DEJAVU_LINEAR_BF16_TILE_ROUNDS)
    using Y = uint16_t;
    auto y = at::empty({M, N}, x.options());
#else
    using Y = float;
    auto y = at::empty({M, N}, x.options().dtype(at::kFloat));
#endif
    const auto* wp = reinterpret_cast<const uint16_t*>(packed.data_ptr());
    auto xf = x.to(at::kFloat);
    auto* yp = reinterpret_cast<Y*>(y.data_ptr());
    if (M <= DECODE_ROWS)
      run<PANELS_BF16, TM_BF16>(xf.data_ptr<float>(), M, K, wp, panels, b, yp, N, DEJAVU_TILE(tile_bf16, PANELS_BF16));
    else  // the same sums, in the same order
      run<PANELS_BF16_PREFILL, TM_BF16_PREFILL>(xf.data_ptr<float>(), M, K, wp, panels, b, yp, N,
                                                DEJAVU_TILE(tile_bf16, PANELS_BF16_PREFILL));
    if constexpr (std::is_same_v<Y, float>)
      return y.to(at::kBFloat16);  // to nearest even
    else
      return y;
#elif defined(DEJAVU_LINEAR_BF16)
    auto y = at::empty({M, N}, x.options());
    const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
    const auto* wp = reinterpret_cast<const uint16_t*>(packed.data_ptr());
    auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
    if (M <= DECODE_ROWS)
      run<PANELS_BF16, TM_BF16>(xp, M, K, wp, panels, b, yp, N, DEJAVU_TILE(tile_bf16, PANELS_BF16));
    else
      run<PANELS_BF16_PREFILL, TM_BF16_PREFILL>(xp, M, K, wp, panels, b, yp, N,
                                                DEJAVU_TILE(tile_bf16, PANELS_BF16_PREFILL));
    return y;
#else
    TORCH_CHECK(false, "linear: this build has no bfloat16 kernel (no AVX512-BF16, no AVX2 with FMA)");
    return {};
#endif
  }
#ifdef DEJAVU_LINEAR_F32
  auto y = at::empty({M, N}, x.options());
  if (M > DECODE_ROWS)  // a prefill (linear_tiles.h); the same sums, in the same order
    run<PANELS_F32_PREFILL, TM_F32_PREFILL>(x.data_ptr<float>(), M, K, packed.data_ptr<float>(), panels, b,
                                            y.data_ptr<float>(), N, DEJAVU_TILE(tile_f32, PANELS_F32_PREFILL));
  else
    run<PANELS_F32, TM_F32>(x.data_ptr<float>(), M, K, packed.data_ptr<float>(), panels, b, y.data_ptr<float>(), N,
                            DEJAVU_TILE(tile_f32, PANELS_F32));
  return y;
#else
  TORCH_CHECK(false, "linear: this build has no float32 kernel (no AVX-512, no AVX2 with FMA)");
  return {};
#endif
}

// The gate and up projections of an MLP (W = [gate; up], (2I, K), I a multiple of 16) packed as
// pack_linear packs, with gate panel j and up panel j side by side: (2I, K) reordered to
// [gate 0-15; up 0-15; gate 16-31; up 16-31; ...] first. Biases go through gate_up_order.
at::Tensor gate_up_order(at::Tensor w) {
  TORCH_CHECK(w.dim() >= 1 && w.size(0) % 32 == 0, "gate_up_order: 2I rows, I a multiple of 16");
  auto sizes = w.sizes().vec();
  std::vector<int64_t> split{2, w.size(0) / 32, 16};
  split.insert(split.end(), sizes.begin() + 1, sizes.end());
  return w.reshape(split).transpose(0, 1).reshape(sizes).contiguous();
}

at::Tensor pack_gate_up(at::Tensor w) { return pack_linear(gate_up_order(w)); }

// silu(x G^T + bg) * (x U^T + bu): (M, I), x's dtype. packed: pack_gate_up; bias: gate_up_order of
// the (2I,) float32 bias, or None. Equal to the bit to silu_and_mul(linear(x, pack_linear(W), b, 2I)).
at::Tensor linear_silu_mul(at::Tensor x, at::Tensor packed, c10::optional<at::Tensor> bias, int64_t I) {
  [[maybe_unused]] const float* b = checked(x, packed, bias, 2 * I, I > 0 && I % 16 == 0 && packed.dim() > 0 &&
                                            packed.size(0) == I / 8, "linear_silu_mul", "pack_gate_up");
  const int64_t M = x.size(0), K = x.size(1);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  auto y = at::empty({M, I}, x.options());
  if (M == 0) return y;
  if (bf16) {
#if defined(DEJAVU_LINEAR_BF16_WIDENED)
    const auto* wp = reinterpret_cast<const uint16_t*>(packed.data_ptr());
    auto xf = x.to(at::kFloat);
    auto* yp = reinterpret_cast<c10::BFloat16*>(y.data_ptr());
    if (M <= DECODE_ROWS)
      run_gate_up<c10::BFloat16, float, PANELS_BF16, TM_BF16>(xf.data_ptr<float>(), M, K, wp, I, b, yp,
                                                               DEJAVU_TILE(tile_bf16, PANELS_BF16));
    else
      run_gate_up<c10::BFloat16, float, PANELS_BF16_PREFILL, TM_BF16_PREFILL>(xf.data_ptr<float>(), M, K, wp, I, b, yp,
                                                                               DEJAVU_TILE(tile_bf16, PANELS_BF16_PREFILL));
    return y;
#elif defined(DEJAVU_LINEAR_BF16)
    const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
    const auto* wp = reinterpret_cast<const uint16_t*>(packed.data_ptr());
    auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
    static_assert(PANELS_BF16 == 2 && PANELS_BF16_PREFILL == 2, "a gate/up pair is one bf16 panel group");
    if (M <= DECODE_ROWS)
      run_gate_up<c10::BFloat16, uint16_t, PANELS_BF16, TM_BF16>(xp, M, K, wp, I, b, yp, DEJAVU_TILE(tile_bf16, PANELS_BF16));
    else
      run_gate_up<c10::BFloat16, uint16_t, PANELS_BF16_PREFILL, TM_BF16_PREFILL>(xp, M, K, wp, I, b, yp,
                                                                                  DEJAVU_TILE(tile_bf16, PANELS_BF16_PREFILL));
    return y;
#else
    TORCH_CHECK(false, "linear_silu_mul: this build has no bfloat16 kernel (no AVX512-BF16, no AVX2 with FMA)");
    return y;
#endif
  }
#ifdef DEJAVU_LINEAR_F32
  if (M > DECODE_ROWS)
    run_gate_up<float, float, PANELS_F32_PREFILL, TM_F32_PREFILL>(x.data_ptr<float>(), M, K, packed.data_ptr<float>(),
                                                                  I, b, y.data_ptr<float>(),
                                                                  DEJAVU_TILE(tile_f32, PANELS_F32_PREFILL));
  else
    run_gate_up<float, float, PANELS_F32, TM_F32>(x.data_ptr<float>(), M, K, packed.data_ptr<float>(), I, b,
                                                  y.data_ptr<float>(), DEJAVU_TILE(tile_f32, PANELS_F32));
  return y;
#else
  TORCH_CHECK(false, "linear_silu_mul: this build has no float32 kernel (no AVX-512, no AVX2 with FMA)");
  return y;
#endif
}

std::vector<std::string> linear_dtypes() {
  std::vector<std::string> out;
#ifdef DEJAVU_LINEAR_F32
  out.push_back("float32");
#endif
#if defined(DEJAVU_LINEAR_BF16) && !defined(__AMX_BF16__)
  // Not on a CPU with AMX (Intel Sapphire Rapids and later): there oneDNN runs bf16 GEMMs on AMX
  // tiles, far faster than our FMAs or VDPBF16PS for a prefill's rows; ours is unmeasured against
  // AMX, oneDNN stays.
  out.push_back("bfloat16");
#endif
  return out;
}

bool linear_bf16_widened() {  // bf16 by a tile that widens to float32 (AVX2's, or AVX512-FP16's: float32 sums rounded)
#if defined(DEJAVU_LINEAR_BF16_WIDENED)
  return true;
#else
  return false;
#endif
}
