// parallel_for(begin, end, grain, f): at::parallel_for's split (f(b, e) over at most one contiguous
// range per thread, each of `grain` items at least), run on the calling thread's OpenMP team.
//
// Not at::parallel_for itself: it is inline, and its first call on a thread sets that thread's
// count from torch's last set_num_threads, through a once-per-thread flag of which every shared
// object has its own copy. An engine process keeps one team, on its engine thread, and every other
// thread at one (engine/runner.py): at::parallel_for here dropped the engine thread to one thread
// at the first kernel call. at::get_num_threads() is torch's own function, with torch's flag.
#pragma once
#include <ATen/Parallel.h>
#include <omp.h>
#include <algorithm>

namespace dejavu {

template <typename F>
inline void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  const int64_t tasks = (n + std::max<int64_t>(grain, 1) - 1) / std::max<int64_t>(grain, 1);
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), tasks);
  if (threads <= 1 || omp_in_parallel()) {
    f(begin, end);
    return;
  }
  const int64_t chunk = (n + threads - 1) / threads;
#pragma omp parallel num_threads(threads)
  {
    const int64_t b = begin + omp_get_thread_num() * chunk, e = std::min(end, b + chunk);
    if (b < e) f(b, e);
  }
}

}  // namespace dejavu
