// Helpers shared by the CPU kernels: accumulation types, fixed-order lane reductions, and one
// parallel region per call that hands out work items dynamically.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace cs_kernels {

// fp64 accumulates in fp64; fp32, bf16 and fp16 in fp32.
template <typename scalar_t>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

// Independent accumulators per dot product: lets the compiler vectorise without reassociating,
// and fixes the summation order (results do not depend on the thread count).
constexpr int kLanes = 16;

template <typename acc_t>
inline acc_t reduce_lanes(const acc_t* lanes) {
  // Pairwise tree in a fixed order.
  acc_t tmp[kLanes];
  for (int k = 0; k < kLanes; ++k) tmp[k] = lanes[k];
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int k = 0; k < width; ++k) tmp[k] += tmp[k + width];
  }
  return tmp[0];
}

// Runs `worker()` on up to `torch.get_num_threads()` threads (fewer when there are fewer than
// `work_items` items to share), in ONE parallel region. Each worker claims its work from shared
// atomic counters until none is left, so the only place threads wait on each other is the
// join at the end: a thread the OS has descheduled (other processes on the cores) delays the
// call by the item it holds, not by every barrier of a per-layer schedule; a thread that starts
// late finds the work done and leaves. Nested inside another parallel region, or with one
// thread, `worker()` runs once on the calling thread and does everything.
template <typename F>
inline void run_workers(int64_t work_items, const F& worker) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(work_items, 1));
  if (threads <= 1 || at::in_parallel_region()) {
    worker();
    return;
  }
  // One index per thread (grain 1): every thread of the region calls `worker()` once.
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) worker();
  });
}

// `fn(b)` for every block b in [0, blocks), blocks claimed one at a time by `run_workers`.
template <typename F>
inline void for_each_block(int64_t blocks, const F& fn) {
  std::atomic<int64_t> next{0};
  run_workers(blocks, [&] {
    for (int64_t b = next.fetch_add(1, std::memory_order_relaxed); b < blocks;
         b = next.fetch_add(1, std::memory_order_relaxed)) {
      fn(b);
    }
  });
}

}  // namespace cs_kernels
