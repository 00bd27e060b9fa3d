// Decode attention straight from the paged KV pool, on CPU: one new token per sequence.
//
// q:               (B, q_heads, D)       float32 or bfloat16, contiguous
// k_pool, v_pool:  (slots, kv_heads, D)  one layer of the pool, q's dtype, contiguous
// slots:           (B, L) int64          pool slot of each sequence's positions [0, L)
// lengths:         (B,) int64            KV tokens of each sequence (<= L), its new token included
// returns:         (B, q_heads, D)       q's dtype
//
// Why a kernel: gathering each sequence's K/V into a padded buffer for SDPA writes and re-reads
// every byte of KV. Here each (sequence, KV head) pair reads its keys and values once, in place,
// for all the query heads of its group: on 2 cores, 30 layers at 16 sequences of 600 tokens take
// 42 ms against 58 ms for gather + SDPA in float32 (34 / 43 ms in bf16). The loops are written for the compiler to vectorize over head_dim (scores and the
// value sums) and over tokens (the exponentials, through glibc's vector math with -ffast-math).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

template <typename T, int D>
static void run(const T* q, const T* k_pool, const T* v_pool, const int64_t* slots, const int64_t* lengths, T* out,
                int64_t B, int64_t Hq, int64_t Hkv, int64_t L, float scale) {
  const int64_t G = Hq / Hkv;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), scores(G * L);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / Hkv, h = item % Hkv, n = lengths[b];
      const int64_t* seq = slots + b * L;
      for (int64_t g = 0; g < G; ++g)
        for (int d = 0; d < D; ++d) qf[g * D + d] = static_cast<float>(q[(b * Hq + h * G + g) * D + d]) * scale;
      for (int64_t t = 0; t < n; ++t) {  // scores: each key read once for the whole group
        const T* k = k_pool + (seq[t] * Hkv + h) * D;
        float kf[D];
#pragma omp simd
        for (int d = 0; d < D; ++d) kf[d] = static_cast<float>(k[d]);
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qf.data() + g * D;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int d = 0; d < D; ++d) s += qg[d] * kf[d];
          scores[g * n + t] = s;
        }
      }
      for (int64_t g = 0; g < G; ++g) {  // softmax, exact: max first
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
      for (int64_t t = 0; t < n; ++t) {  // values: each read once for the whole group
        const T* v = v_pool + (seq[t] * Hkv + h) * D;
        float vf[D];
#pragma omp simd
        for (int d = 0; d < D; ++d) vf[d] = static_cast<float>(v[d]);
        for (int64_t g = 0; g < G; ++g) {
          const float p = scores[g * n + t];
          float* a = acc.data() + g * D;
#pragma omp simd
          for (int d = 0; d < D; ++d) a[d] += p * vf[d];
        }
      }
      for (int64_t g = 0; g < G; ++g)
        for (int d = 0; d < D; ++d) out[(b * Hq + h * G + g) * D + d] = static_cast<T>(acc[g * D + d]);
    }
  });
}

template <typename T>
static void dispatch(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& slots,
                     const torch::Tensor& lengths, torch::Tensor& out, double scale) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k.size(1), L = slots.size(1);
  auto args = std::make_tuple(q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), slots.data_ptr<int64_t>(),
                              lengths.data_ptr<int64_t>(), out.data_ptr<T>());
  auto go = [&](auto fn) {
    fn(std::get<0>(args), std::get<1>(args), std::get<2>(args), std::get<3>(args), std::get<4>(args),
       std::get<5>(args), B, Hq, Hkv, L, static_cast<float>(scale));
  };
  switch (D) {  // HEAD_DIMS below
    case 16: go(run<T, 16>); break;
    case 32: go(run<T, 32>); break;
    case 64: go(run<T, 64>); break;
    case 80: go(run<T, 80>); break;
    case 96: go(run<T, 96>); break;
    case 128: go(run<T, 128>); break;
    case 256: go(run<T, 256>); break;
    default: TORCH_CHECK(false, "paged_decode_attention: head_dim ", D, " not built");
  }
}

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_pool, torch::Tensor v_pool, torch::Tensor slots,
                                     torch::Tensor lengths, double scale) {
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
  auto out = torch::empty_like(q);
  if (q.scalar_type() == at::kFloat) {
    dispatch<float>(q, k_pool, v_pool, slots_c, lengths_c, out, scale);
  } else if (q.scalar_type() == at::kBFloat16) {
    dispatch<at::BFloat16>(q, k_pool, v_pool, slots_c, lengths_c, out, scale);
  } else {
    TORCH_CHECK(false, "paged_decode_attention: float32 or bfloat16, not ", q.scalar_type());
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // the GIL is released while it runs, as torch's own ops do: the service's event loop goes on
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over a paged KV pool (CPU)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.attr("HEAD_DIMS") = pybind11::make_tuple(16, 32, 64, 80, 96, 128, 256);
}
